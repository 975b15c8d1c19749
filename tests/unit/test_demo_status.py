"""``make demo``'s counters line: shown when it changes, not every few seconds while idle."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "local" / "demo.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("field_alerts_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_an_unchanged_line_is_shown_once_then_only_as_a_heartbeat(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    status = demo.StatusLine()
    shown = [status.show("events in 20", t) for t in (0.0, 5.5, 11.0, 59.0)]
    assert shown == [True, False, False, False]
    assert status.show("events in 20", 60.0) is True  # a minute later: still alive
    assert capsys.readouterr().out.splitlines() == ["events in 20", "events in 20"]


def test_a_changed_line_is_shown_at_once_and_a_forced_one_always(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    status = demo.StatusLine()
    status.show("events in 20", 0.0)
    assert status.show("events in 21", 5.5) is True
    assert status.show("events in 21", 6.0, force=True) is True  # the last word before exit
    assert status.checked_at == 6.0
    assert capsys.readouterr().out.splitlines() == [
        "events in 20",
        "events in 21",
        "events in 21",
    ]
