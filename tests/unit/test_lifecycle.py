"""The service lifecycle of ``libs.runtime.service`` on a fake service: the order of its steps,
exit codes, start and stop lines, health answers in each phase."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from pydantic import SecretStr

from libs.kafka import KafkaSettings, TopicSpec
from libs.runtime import (
    EXIT_FATAL,
    EXIT_OK,
    Lifecycle,
    ServiceRuntime,
    StartRefusedError,
    run_lifecycle,
)
from libs.serde import InMemorySchemaRegistry, RegistryAuthError, RegistryError
from tests.support.net import free_port

pytestmark = pytest.mark.timeout(60)

KAFKA = KafkaSettings(
    bootstrap_servers="127.0.0.1:1",
    security_protocol="SASL_SSL",
    sasl_username="key",
    sasl_password=SecretStr("s3cr3t"),
    client_id="fake",
)
TOPIC = TopicSpec("fake-topic", partitions=1, replication_factor=1)


class FakeService:
    """Records every hook call; hooks can be replaced per test."""

    def __init__(self, calls: list[str], stop: threading.Event) -> None:
        self.calls = calls
        self.stop = stop
        self.topic_specs: list[TopicSpec] = [TOPIC]
        self.on: dict[str, Callable[[], None]] = {}
        self.alive = True
        self.ready = True

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        if name in self.on:
            self.on[name]()

    def config(self) -> Mapping[str, object]:
        self.calls.append("config")
        return {"setting": "value"}

    def topics(self) -> Sequence[TopicSpec]:
        self.calls.append("topics")
        return self.topic_specs

    def prepare(self) -> None:
        self._hook("prepare")

    def bootstrap(self) -> None:
        self._hook("bootstrap")

    def run(self) -> None:
        self._hook("run")

    def close(self) -> None:
        self._hook("close")

    def liveness(self) -> tuple[bool, dict[str, object]]:
        return self.alive, {"service": "alive" if self.alive else "wedged"}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        return self.ready, {}

    def counts(self) -> Mapping[str, object]:
        self.calls.append("counts")
        return {"handled": 3}


class Registry(InMemorySchemaRegistry):
    """An in-memory registry whose ``check`` runs ``answer`` (raise to fail it)."""

    def __init__(self, answer: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.answer = answer
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        self.answer()


def make(
    registry: Registry | None = None, *, metrics_port: int = 0
) -> tuple[FakeService, ServiceRuntime, list[str]]:
    calls: list[str] = []
    stop = threading.Event()

    def ensure_topics(config: dict[str, Any], specs: Sequence[TopicSpec]) -> None:
        assert config["bootstrap.servers"] == "127.0.0.1:1"
        calls.append(f"ensure_topics {[s.name for s in specs]}")

    runtime = ServiceRuntime(
        name="fake",
        kafka=KAFKA,
        registry=registry or Registry(),
        registry_url="http://registry:8081",
        registry_credentials_setting="REGISTRY_CREDENTIALS",
        metrics_port=metrics_port,
        stop=stop,
        ensure_topics=ensure_topics,
    )
    return FakeService(calls, stop), runtime, calls


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == msg]


def test_steps_run_in_the_documented_order(caplog: pytest.LogCaptureFixture) -> None:
    service, runtime, calls = make()
    caplog.set_level(logging.INFO)
    assert run_lifecycle(service, runtime) == EXIT_OK
    assert calls == [
        "config",
        "topics",
        "ensure_topics ['fake-topic']",
        "prepare",
        "bootstrap",
        "run",
        "close",
        "counts",
    ]
    [start] = logged(caplog, "fake starting")
    assert start.setting == "value"  # type: ignore[attr-defined]
    assert start.schema_registry_url == "http://registry:8081"  # type: ignore[attr-defined]
    assert start.kafka["sasl.password"] == "********"  # type: ignore[attr-defined]
    assert "s3cr3t" not in caplog.text
    [stopped] = logged(caplog, "fake stopped")
    assert stopped.handled == 3  # type: ignore[attr-defined]
    assert stopped.seconds >= 0  # type: ignore[attr-defined]


def test_no_topics_means_no_admin_client() -> None:
    service, runtime, calls = make()
    service.topic_specs = []
    assert run_lifecycle(service, runtime) == EXIT_OK
    assert not [c for c in calls if c.startswith("ensure_topics")]


def test_stop_while_waiting_for_the_registry_exits_0_without_bootstrap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()
    service, runtime, calls = make(registry)

    def down() -> None:
        if registry.checks >= 2:
            runtime.stop.set()  # the SIGTERM handler's part
        raise RegistryError("connection refused")

    registry.answer = down
    caplog.set_level(logging.INFO)
    assert run_lifecycle(service, runtime) == EXIT_OK
    assert "bootstrap" not in calls and "run" not in calls
    assert calls[-2:] == ["close", "counts"]
    assert logged(caplog, "stopped while waiting for the schema registry")
    assert logged(caplog, "fake stopped")


def test_rejected_registry_credentials_stop_with_one_line_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def rejected() -> None:
        raise RegistryAuthError("schema registry at http://registry:8081: HTTP 401")

    service, runtime, calls = make(Registry(rejected))
    caplog.set_level(logging.INFO)
    assert run_lifecycle(service, runtime) == EXIT_FATAL
    assert "bootstrap" not in calls and "close" in calls
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage() == (
        "the schema registry rejects the credentials (REGISTRY_CREDENTIALS), not starting"
    )
    assert "HTTP 401" in error.error  # type: ignore[attr-defined]
    assert error.exc_info is None  # one line, no traceback


def test_a_refused_start_is_one_error_line_and_exit_1(caplog: pytest.LogCaptureFixture) -> None:
    service, runtime, calls = make()

    def refuse() -> None:
        raise StartRefusedError("token rejected, not starting", error="invalid_auth")

    service.on["prepare"] = refuse
    caplog.set_level(logging.INFO)
    assert run_lifecycle(service, runtime) == EXIT_FATAL
    assert calls[-3:] == ["prepare", "close", "counts"]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage() == "token rejected, not starting"
    assert error.error == "invalid_auth"  # type: ignore[attr-defined]


def test_a_fatal_error_propagates_after_close_and_the_stop_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, runtime, calls = make()

    def crash() -> None:
        raise RuntimeError("wedged")

    service.on["run"] = crash
    caplog.set_level(logging.INFO)
    with pytest.raises(RuntimeError, match="wedged"):
        run_lifecycle(service, runtime)
    assert calls[-3:] == ["run", "close", "counts"]
    assert logged(caplog, "fake stopped")


def test_a_stop_during_bootstrap_skips_the_loop() -> None:
    service, runtime, calls = make()
    service.on["bootstrap"] = runtime.stop.set
    assert run_lifecycle(service, runtime) == EXIT_OK
    assert "run" not in calls and calls[-2:] == ["close", "counts"]


def test_health_answers_follow_the_phase() -> None:
    service, runtime, _ = make()
    lifecycle = Lifecycle(service, runtime)
    seen: dict[str, tuple[bool, bool]] = {}

    def record(step: str) -> Callable[[], None]:
        def probe() -> None:
            seen[step] = (lifecycle.liveness()[0], lifecycle.readiness()[0])

        return probe

    service.alive = False  # a service check that would fail: not asked before the bootstrap
    service.on["prepare"] = record("prepare")
    service.on["bootstrap"] = record("bootstrap")
    service.on["run"] = record("run")
    assert lifecycle.run() == EXIT_OK
    # alive during the start steps whatever the service says; ready only while running
    assert seen == {"prepare": (True, False), "bootstrap": (False, False), "run": (False, True)}
    assert lifecycle.readiness()[0] is False  # stopped


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def test_health_server_is_up_while_waiting_for_the_registry() -> None:
    registry = Registry()
    port = free_port()
    service, runtime, _ = make(registry, metrics_port=port)
    service.alive = False
    answers: list[tuple[int, dict[str, Any]]] = []

    def down() -> None:
        if registry.checks == 2:  # the health server started before the first check
            answers.extend([_get(port, "/healthz"), _get(port, "/readyz")])
            runtime.stop.set()
        raise RegistryError("connection refused")

    registry.answer = down
    assert run_lifecycle(service, runtime) == EXIT_OK
    [(live_status, live), (ready_status, ready)] = answers
    assert live_status == 200 and live["lifecycle"] == "waiting for the schema registry"
    assert ready_status == 503 and ready["lifecycle"] == "waiting for the schema registry"
    with pytest.raises(urllib.error.URLError):
        _get(port, "/healthz")  # stopped with the service
