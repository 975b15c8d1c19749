"""Waiting for the schema registry at start: an unreachable registry is waited on, a registry
that rejects the credentials is not (time does not fix a wrong key:secret)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from libs.serde import (
    ConfluentSchemaRegistry,
    RegistryAuthError,
    RegistryError,
    wait_for_registry,
)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def _answering(status: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"error_code": status, "message": f"answer {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def registry_answering(request: pytest.FixtureRequest) -> Iterator[str]:
    """A registry stand-in on loopback answering every request with ``request.param``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _answering(request.param))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _wait_bounded(url: str, stop_after_s: float) -> tuple[bool | BaseException, float]:
    """``wait_for_registry`` with a stop event set after ``stop_after_s`` (so a wait ends)."""
    registry = ConfluentSchemaRegistry(url, "key:wrong-secret", timeout_s=2)
    stop = threading.Event()
    timer = threading.Timer(stop_after_s, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        result: bool | BaseException = wait_for_registry(registry, stop, initial_s=0.2)
    except RegistryError as exc:
        result = exc
    finally:
        timer.cancel()
        registry.close()
    return result, time.monotonic() - started


@pytest.mark.parametrize("registry_answering", [401, 403], indirect=True)
def test_rejected_credentials_raise_instead_of_waiting(registry_answering: str) -> None:
    result, elapsed = _wait_bounded(registry_answering, stop_after_s=20)
    assert isinstance(result, RegistryAuthError), result
    assert "rejects the credentials" in str(result)
    assert elapsed < 15  # the first answer, not the stop event, ended it


@pytest.mark.parametrize("registry_answering", [503], indirect=True)
def test_a_registry_in_trouble_is_waited_on(registry_answering: str) -> None:
    result, elapsed = _wait_bounded(registry_answering, stop_after_s=3)
    assert result is False  # stopped while waiting
    assert elapsed >= 2.5


@pytest.mark.parametrize("registry_answering", [401], indirect=True)
def test_service_exits_1_with_a_line_naming_the_credentials_setting(
    registry_answering: str, tmp_path: Path
) -> None:
    """The notifier reaches the registry wait without Kafka (no topic creation, dry-run)."""
    proc = subprocess.run(
        [sys.executable, "-m", "services.notifier"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "SCHEMA_REGISTRY_URL": registry_answering,
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "key:s3cr3t-wrong",
            "SCHEMA_REGISTRY_TIMEOUT_S": "2",
            "NOTIFIER_CREATE_TOPICS": "false",
            "NOTIFIER_STATE_DIR": str(tmp_path / "state"),
            "METRICS_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    # librdkafka's own lines (logger "librdkafka": the closed Kafka port) are not the
    # service's error line
    errors = [r for r in records if r["level"] == "ERROR" and r["logger"] != "librdkafka"]
    assert [r["msg"] for r in errors] == [
        "the schema registry rejects the credentials (SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO), "
        "not starting"
    ]
    assert "HTTP 401" in errors[0]["error"] and "exc" not in errors[0]
    assert "s3cr3t" not in proc.stderr
