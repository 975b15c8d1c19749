"""The registry proxy of the fleet scenarios: it must really answer 503, really hang and really
forward, or a green registry-outage scenario would prove nothing. No stack needed."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e.harness import RegistryProxy

pytestmark = pytest.mark.e2e


class _Registry(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def proxy() -> Iterator[RegistryProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p = RegistryProxy(f"http://127.0.0.1:{server.server_address[1]}/apis/ccompat/v7")
    try:
        yield p
    finally:
        p.close()
        server.shutdown()
        server.server_close()


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_forwards_answers_503_and_hangs_until_the_mode_changes(proxy: RegistryProxy) -> None:
    assert proxy.url.endswith("/apis/ccompat/v7")
    status, body = _get(proxy.url + "/subjects")
    assert (status, json.loads(body)) == (200, {"path": "/apis/ccompat/v7/subjects"})

    proxy.set_mode("503")
    status, body = _get(proxy.url + "/subjects")
    assert status == 503 and "unavailable" in body

    proxy.set_mode("hang")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(proxy.url + "/schemas/ids/1", timeout_s=1.0)
    # a request held while hanging is forwarded once the registry is back
    answers: list[tuple[int, str]] = []
    waiter = threading.Thread(target=lambda: answers.append(_get(proxy.url + "/x", 30)))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive(), "the proxy answered while hanging"
    proxy.set_mode("pass")
    waiter.join(10)
    assert answers and answers[0][0] == 200
    assert proxy.answered["503"] == 1 and proxy.answered["pass"] >= 2
