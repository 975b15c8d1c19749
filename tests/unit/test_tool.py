"""Operator commands: exit codes and the one line an operator reads, for each way to fail."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator

import pytest
from pydantic_settings import BaseSettings

from libs.kafka import TopicError
from libs.kafka.redrive import SelectionError
from services.common.settings import CommonSettings
from services.common.tool import (
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_OK,
    EXIT_USAGE,
    run_tool,
)


@pytest.fixture(autouse=True)
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://127.0.0.1:9")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], root.level = saved


def _run(fail: BaseException | None) -> int:
    def command(args: argparse.Namespace, loaded: list[BaseSettings]) -> int:
        assert isinstance(loaded[0], CommonSettings)
        if fail is not None:
            raise fail
        return EXIT_OK

    return run_tool(
        prog="tool",
        parser=argparse.ArgumentParser(prog="tool"),
        settings_models=[CommonSettings],
        run=command,
        argv=[],
        usage_errors=(SelectionError,),
    )


def test_success_is_0() -> None:
    assert _run(None) == EXIT_OK


def test_bad_input_is_2_with_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(SelectionError("bad time 'x'")) == EXIT_USAGE
    assert capsys.readouterr().err == "tool: bad time 'x'\n"


def test_a_library_error_is_1_with_its_message_and_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _run(TopicError("topic t does not exist")) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "tool: topic t does not exist" in err and "Traceback" not in err


def test_an_unexpected_error_is_1_with_a_traceback_in_the_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _run(RuntimeError("boom")) == EXIT_FATAL
    err = capsys.readouterr().err
    assert '"msg": "command failed"' in err and "RuntimeError: boom" in err


def test_a_closed_pipe_ends_quietly() -> None:
    assert _run(BrokenPipeError()) == EXIT_OK


def test_a_missing_setting_is_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    assert _run(None) == EXIT_CONFIG
    assert "KAFKA_BOOTSTRAP_SERVERS is required but not set" in capsys.readouterr().err
