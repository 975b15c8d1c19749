"""ConfluentSchemaRegistry gives up on a registry that accepts connections and never answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from libs.serde import ConfluentSchemaRegistry, RegistryError


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on loopback that accepts every connection and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


# Without a timeout the client waits forever: the test's own timeout makes that a failure.
@pytest.mark.timeout(60)
def test_schema_by_id_times_out_on_a_silent_registry(silent_server: str) -> None:
    registry = ConfluentSchemaRegistry(silent_server, timeout_s=1)
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError, match="unreachable"):
            registry.schema_by_id(1)
    finally:
        registry.close()
    # 3 attempts of 1 s plus at most 1.5 s of backoff; generous for a loaded machine
    assert time.monotonic() - started < 15


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ConfluentSchemaRegistry("http://127.0.0.1:1", timeout_s=0)
