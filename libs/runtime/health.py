"""A small HTTP server for Prometheus metrics, liveness and readiness."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

#: a check answers (healthy, details)
Check = Callable[[], tuple[bool, dict[str, object]]]


def seconds_since(monotonic_ts: float) -> float:
    """Seconds elapsed since ``monotonic_ts`` (a ``time.monotonic()`` reading)."""
    return time.monotonic() - monotonic_ts


def _always_ok() -> tuple[bool, dict[str, object]]:
    return True, {}


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) on loopback or all.

    Both checks answer 200 with a JSON body when true and 503 when false, so the body says why a
    pod is not ready (a table still loading, say) to whoever runs ``kubectl describe``.
    """

    def __init__(
        self,
        port: int,
        *,
        host: str = "0.0.0.0",
        liveness: Check = _always_ok,
        readiness: Check = _always_ok,
    ) -> None:
        self._liveness = liveness
        self._readiness = readiness
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    check = server._liveness if path == "/healthz" else server._readiness
                    try:
                        ok, details = check()
                    except Exception as exc:  # a failing check is an unhealthy answer
                        ok, details = False, {"error": repr(exc)}
                    body = json.dumps({"ok": ok, **details}, default=str).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return int(self._httpd.server_address[1])

    def start(self) -> HealthServer:
        """Serve in a daemon thread."""
        self._thread.start()
        log.info("health server listening", extra={"port": self.port})
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
