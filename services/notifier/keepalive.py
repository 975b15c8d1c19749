"""slack-sdk's ``WebClient`` over one kept-alive HTTP/1.1 connection per thread.

slack-sdk's synchronous client sends every call through ``urllib.request.urlopen``, which asks
for ``Connection: close``: each call opens a new TCP connection and, against slack.com, runs a
new TLS handshake (a few round trips and a few milliseconds of CPU) before the request is even
sent. ``KeepAliveWebClient`` keeps everything slack-sdk does above the wire (the method
arguments, JSON bodies, headers, ``SlackResponse``, ``SlackApiError``, 429 handling) and
replaces only the one method that sends a request: each thread that calls it keeps its own
``http.client`` connection open between calls.

What a failure means is what it meant through urllib, because the notifier's in-doubt rule
(``slack._outcome_of_exception``) reads it: an error while connecting or sending is raised as
``URLError`` (the request never reached Slack whole, so Slack cannot have acted on it); an
error after the request was sent (a reset, a timeout, the remote closing) is raised as it is,
and the call is in doubt. An answer that is not 2xx is raised as ``HTTPError`` with its headers
and body, as urllib does (slack-sdk turns it into ``SlackApiError``; no redirect is followed:
Slack's API does not redirect).

A connection is not reused once it has been idle for ``idle_s`` or when the server has closed
it (the socket reads as ready while idle: an end of file, or bytes nobody asked for): the next
call opens a new one, before anything is sent. The server can still close it in the moment
between that check and the request; the call is then in doubt (the notifier checks the
channel's history before posting again), never repeated blindly. ``idle_s=0`` sends every call
through urllib, as plain slack-sdk does; so does a client with a proxy (slack-sdk reads one from
``HTTPS_PROXY`` and the like when none is given), which this class does not tunnel through.
"""

from __future__ import annotations

import http.client
import io
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request

from slack_sdk import WebClient


class _Connection:
    """A thread's connection and when it last finished a call."""

    __slots__ = ("http", "idle_since")

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.http = connection
        self.idle_since = 0.0


class KeepAliveWebClient(WebClient):
    """``WebClient`` whose calls reuse one HTTP/1.1 connection per calling thread.

    Thread-safe as ``WebClient`` is: each thread has its own connection. ``close()`` closes
    them all (a thread's next call opens a new one).
    """

    def __init__(
        self,
        *args: Any,
        idle_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.idle_s = idle_s
        self._mono = monotonic
        base = urlsplit(self.base_url)
        self._scheme = base.scheme.lower()
        self._netloc = base.netloc
        self._host = base.hostname or ""
        self._port = base.port
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[_Connection] = []
        #: connections opened so far (a new one per call would equal the calls made)
        self.connections_opened = 0
        # A client dropped without close() closes its sockets too (no ResourceWarning).
        self._closer = weakref.finalize(self, _close_all, self._open, self._lock)

    def close(self) -> None:
        """Close every thread's connection (a thread's next call opens a new one)."""
        _close_all(self._open, self._lock)

    def _perform_urllib_http_request_internal(self, url: str, req: Request) -> dict[str, Any]:
        target = urlsplit(url)
        if (
            self.idle_s <= 0
            or self.proxy is not None
            or target.scheme.lower() != self._scheme
            or target.netloc != self._netloc
            or self._scheme not in ("http", "https")
        ):
            # no reuse asked, a proxy, or a URL outside the base: urllib, as slack-sdk does
            return super()._perform_urllib_http_request_internal(url, req)
        conn = self._connection()
        path = target.path + (f"?{target.query}" if target.query else "")
        try:
            conn.http.request(
                req.get_method(), path, body=req.data, headers=dict(req.header_items())
            )
        except OSError as exc:
            # not sent whole (or not connected): Slack cannot have acted on it
            conn.http.close()
            raise URLError(exc) from exc
        try:
            response = conn.http.getresponse()
            body = response.read()
        except BaseException:
            conn.http.close()  # the answer is lost: the call is in doubt, the connection too
            raise
        conn.idle_since = self._mono()
        # http.client closes the socket itself when the server said it would close it; the
        # next request on this connection then opens a new one.
        headers = response.headers
        if not 200 <= response.status < 300:
            raise HTTPError(url, response.status, response.reason, headers, io.BytesIO(body))
        charset = headers.get_content_charset() or "utf-8"
        return {"status": response.status, "headers": headers, "body": body.decode(charset)}

    def _connection(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Connection(self._new_http())
            self._local.conn = conn
        sock = conn.http.sock
        if sock is not None and (self._mono() - conn.idle_since >= self.idle_s or _readable(sock)):
            conn.http.close()
        if conn.http.sock is None:
            with self._lock:  # http.client connects at the next request
                self.connections_opened += 1
                if conn not in self._open:  # new, or dropped by close(): closed by the next
                    self._open.append(conn)
        return conn

    def _new_http(self) -> http.client.HTTPConnection:
        timeout = float(self.timeout)
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self.ssl
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)


def _close_all(opened: list[_Connection], lock: threading.Lock) -> None:
    with lock:
        closing = list(opened)
        opened.clear()
    for c in closing:
        c.http.close()


def _readable(sock: Any) -> bool:
    """True when an idle connection's socket has something to read: the server closed it.

    ``poll``, not ``select``: a process holding RocksDB files and Kafka sockets can have
    descriptors above ``select``'s limit of 1024.
    """
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
    except (OSError, ValueError):
        return True  # closed under us: not reusable
    return bool(poller.poll(0))
