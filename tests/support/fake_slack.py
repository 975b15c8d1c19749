"""A fake Slack Web API server for tests (standard library only).

``slack_sdk.WebClient(token=..., base_url=fake.base_url)`` works against it unchanged. It
answers ``auth.test``, ``chat.postMessage``, ``chat.update`` and ``conversations.history`` the
way Slack does (HTTP 200 with ``{"ok": false, "error": ...}`` for API errors, HTTP 429 with
``Retry-After`` for rate limits), records every call and stores every posted message, and can be
scripted to misbehave per channel.

In-process use::

    with FakeSlack(token="xoxb-test") as fake:
        client = WebClient(token="xoxb-test", base_url=fake.base_url)
        fake.rate_limit("C1", retry_after_s=1, times=2)   # next two posts to C1 get 429
        ...
        assert fake.posts("C1")[0].metadata == {...}

Records: ``calls(method=None, channel=None)`` (every API call: method, channel, params, HTTP
status answered, time, client), ``held()`` (the ``slow`` calls whose answer is being held back
right now: posts or updates in flight), ``posts(channel=None)`` (stored messages, as they read
now), ``wait_for_posts(n)`` (a deadline instead of a sleep) and ``reset()``.

Updates are logged per message: ``updates(channel=None, ts=None)`` lists every ``chat.update``
applied (``StoredUpdate``: channel, ts, the update's ``message_id`` from its metadata, text,
metadata, time), ``wait_for_updates(n)`` waits for them. Counting by the notifier's message ids
(Slack message metadata ``event_payload.message_id``): ``post_counts()`` counts posts by the id
they were *posted* with (``StoredMessage.posted_metadata``; ``metadata`` is what an update left),
``update_counts()`` applied updates by the update's id. A message posted or updated twice shows
as a count of 2.

Connections: HTTP/1.1, kept alive between requests unless the client sends ``Connection:
close`` (as Slack does; urllib, hence plain slack-sdk, always closes). ``connections()`` counts
them (accepted so far, open now) and ``drop_connections()`` closes the idle ones, as Slack's
edge ends idle connections.

Several clients can share one fake and still be told apart: ``client_url(label)`` is a base URL
(``/client/<label>/api/``) whose calls are recorded with ``client=label``.

Requests
--------
- ``POST /api/<method>`` with ``application/x-www-form-urlencoded`` or ``application/json``
  bodies; query parameters are merged in. ``blocks``, ``metadata`` and ``attachments`` may be
  JSON values (JSON bodies) or JSON strings (form bodies or JSON bodies). Booleans may be
  ``true``/``false`` or ``"1"``/``"0"`` (what slack-sdk sends in forms).
- ``GET /api/<method>?...`` for the read methods (``auth.test``, ``conversations.history``);
  a GET of a write method answers HTTP 405 ``{"ok": false, "error": "method_not_allowed"}``
  (a choice of this fake).
- Auth: ``Authorization: Bearer <token>``, or a ``token`` form/query parameter (not in JSON
  bodies, as in Slack). Absent: ``not_authed``; not one of the server's tokens:
  ``invalid_auth``.

Methods
-------
- ``auth.test``: identity of the fake bot (``FakeSlack.TEAM_ID``, ``BOT_USER_ID``, ``BOT_ID``).
- ``chat.postMessage``: needs ``channel`` (``channel_not_found``) and ``text``, ``blocks`` or
  ``attachments`` (``no_text``). ``blocks``: a JSON array (``invalid_blocks_format``) of at
  most 50 known block types, each an object with a ``type``; section text at most 3000
  characters, section fields at most 10 of 2000, header text at most 150, unique ``block_id``
  (else ``invalid_blocks`` with Slack-like ``errors``). ``text`` over 40000 characters:
  ``msg_too_long``. ``metadata`` must be ``{"event_type": str, "event_payload": {...}}``
  (``invalid_metadata_format``). Answers ``{"ok", "channel", "ts", "message"}``; ``ts`` values
  are unique and increasing, in Slack's ``"1700000000.000100"`` format.
- ``chat.update``: ``channel`` + ``ts`` of a stored message (``message_not_found``; a message
  ``delete``d is gone too; one marked with ``lock(channel, ts)``, as one posted by someone
  else, answers ``cant_update_message``); replaces the given ``text``/``blocks``/``metadata``,
  marks the message edited and logs the update. Scripted behaviours apply as to posts (pass
  ``method="chat.update"``): 429, 5xx, Slack errors, and ``slow`` with ``then_store=True``
  applies the update at once and holds the answer back (the kill-mid-update case).
- ``conversations.history``: ``channel``, ``limit`` (default 100, at most 999), ``oldest``,
  ``latest``, ``inclusive``, ``cursor``, ``include_all_metadata``; newest first; thread replies
  are left out (unless broadcast), and messages carry ``metadata`` only when
  ``include_all_metadata`` is true, as in Slack. An edited message carries its current text,
  blocks and metadata (the last update's) and ``edited``.
- Anything else: ``unknown_method``.

Scripting
---------
Each channel has a queue of behaviours, consumed one per matching call, then an optional
persistent behaviour (``times=None``). ``channel=None`` scripts every channel (checked after the
channel's own queue). ``method`` restricts a behaviour to one API method (default
``chat.postMessage``; ``None`` means any method). Behaviours:

- ``rate_limit``: HTTP 429, ``Retry-After: <retry_after_s>`` (whole seconds, as Slack sends and
  slack-sdk parses), body ``{"ok": false, "error": "ratelimited"}``.
- ``server_error``: HTTP ``status`` (5xx), body ``{"ok": false, "error": <error>}``.
- ``slow``: with ``then_store=True`` the request is processed at once (the message is stored
  and visible in history) but the answer is held back ``delay_s``: the client times out after
  Slack acted, the in-doubt case. With ``then_store=False`` nothing is processed and, after
  ``delay_s``, HTTP 503 ``service_unavailable`` is answered. ``store_after_s`` (with
  ``then_store=True``) processes the request only after that long, then holds the answer
  ``delay_s`` more: an overloaded Slack that stores a post after the client gave up on it,
  so that a history read right after the client's timeout does not show it yet. The post's
  ``ts`` is the time it is stored, as Slack's is the time it processes the post.
- ``slack_error``: HTTP 200 ``{"ok": false, "error": <code>}`` (``channel_not_found``,
  ``invalid_blocks``, ``not_in_channel``, ``invalid_auth``, ``msg_too_long``...).

``enforce_rate_limit(per_channel_per_s, burst)`` adds a token-bucket limit on
``chat.postMessage`` per channel (off by default): faster posts get 429 with ``Retry-After``.

Process mode and control API
----------------------------
``python -m tests.support.fake_slack [--host 127.0.0.1] [--port 0] [--token xoxb-test]...
[--rate-limit PER_S [--burst N]]`` prints one line ``FAKE_SLACK_URL=http://HOST:PORT/api/`` to
stdout and serves until SIGTERM or SIGINT (exit 0). The same server (in-process too) has a
control API on ``/_fake/`` (``FakeSlack.control_url``), unauthenticated (loopback test use
only), JSON in and out:

- ``POST /_fake/script``: ``{"kind": "rate_limit"|"server_error"|"slow"|"slack_error",
  "channel": "C1"|null, "times": 1|null, "method": "chat.postMessage"|null, ...}`` with the
  kind's fields: ``retry_after_s``; ``status``, ``error``; ``delay_s``, ``then_store``,
  ``store_after_s``;
  ``error`` (the Slack code). ``times`` defaults to 1, ``null`` makes it persistent.
- ``POST /_fake/rate_limit``: ``{"per_channel_per_s": 1.0|null, "burst": 1}`` (null: off).
- ``POST /_fake/reset``: forget messages, calls, scripts and the rate limit.
- ``GET /_fake/posts[?channel=C1]``: ``{"ok": true, "posts": [StoredMessage.to_dict()...]}``.
- ``GET /_fake/calls[?method=chat.postMessage][&channel=C1]``:
  ``{"ok": true, "calls": [RecordedCall.to_dict()...]}``.
- ``GET /_fake/updates[?channel=C1][&ts=...]``: ``{"ok": true, "updates":
  [StoredUpdate.to_dict()...]}``.
- ``GET /_fake/counts``: ``{"ok": true, "posts": {message_id: n}, "updates": {message_id: n}}``.

Bad control requests get HTTP 400 ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "Behaviour",
    "BehaviourKind",
    "FakeSlack",
    "RecordedCall",
    "StoredMessage",
    "StoredUpdate",
    "main",
    "message_id_of",
]

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
BehaviourKind = Literal["rate_limit", "server_error", "slow", "slack_error"]

_BEHAVIOUR_KINDS: Final = ("rate_limit", "server_error", "slow", "slack_error")
_READ_METHODS: Final = frozenset({"auth.test", "conversations.history"})
_WRITE_METHODS: Final = frozenset({"chat.postMessage", "chat.update"})
_MAX_BLOCKS: Final = 50
_MAX_SECTION_TEXT: Final = 3000
_MAX_SECTION_FIELDS: Final = 10
_MAX_FIELD_TEXT: Final = 2000
_MAX_HEADER_TEXT: Final = 150
_MAX_BLOCK_ID: Final = 255
_MAX_TEXT: Final = 40000
_MAX_HISTORY_LIMIT: Final = 999
_DEFAULT_HISTORY_LIMIT: Final = 100
_CURSOR_PREFIX: Final = "next_ts:"
_KNOWN_BLOCK_TYPES: Final = frozenset(
    {
        "actions",
        "context",
        "divider",
        "file",
        "header",
        "image",
        "input",
        "markdown",
        "rich_text",
        "section",
        "table",
        "video",
    }
)
_MICROS: Final = 1_000_000


@dataclass(frozen=True)
class Behaviour:
    """One scripted misbehaviour; see the module docstring for what each kind answers."""

    kind: BehaviourKind
    retry_after_s: int = 1
    status: int = 500
    error: str = "internal_error"
    delay_s: float = 0.0
    then_store: bool = True
    #: ``slow`` with ``then_store``: process the request only after this long
    store_after_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _BEHAVIOUR_KINDS:
            raise ValueError(f"unknown behaviour kind {self.kind!r}")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        if self.kind == "server_error" and not 500 <= self.status <= 599:
            raise ValueError("server_error status must be 5xx")
        if self.delay_s < 0 or self.store_after_s < 0:
            raise ValueError("delay_s and store_after_s must be >= 0")
        if not self.error:
            raise ValueError("error must not be empty")


@dataclass(frozen=True)
class RecordedCall:
    """One API call as the fake saw it.

    ``params`` merges query and body parameters as received (form values stay strings),
    without ``token``; ``status`` is the HTTP status answered, ``at`` the arrival time (epoch
    seconds) and ``behaviour`` the scripted behaviour applied, if any.
    """

    method: str
    http_verb: str
    content_type: str
    channel: str | None
    params: JsonObject
    status: int
    ok: bool
    error: str | None
    behaviour: BehaviourKind | None
    at: float
    #: the label of the ``client_url`` the call came through (None: ``base_url``)
    client: str | None = None

    def to_dict(self) -> JsonObject:
        """Return a JSON-serialisable copy."""
        return asdict(self)


@dataclass
class StoredMessage:
    """A message posted to the fake, as stored (``blocks`` and ``metadata`` parsed)."""

    channel: str
    ts: str
    text: str
    blocks: list[JsonObject] | None = None
    metadata: JsonObject | None = None
    thread_ts: str | None = None
    reply_broadcast: bool = False
    edited_ts: str | None = None
    posted_at: float = field(default_factory=time.time)
    #: the metadata it was posted with (``metadata`` is replaced by updates)
    posted_metadata: JsonObject | None = None
    #: how many ``chat.update`` calls were applied to it
    update_count: int = 0
    #: deleted (``FakeSlack.delete``): gone from history, updates answer message_not_found
    deleted: bool = False
    #: ``FakeSlack.lock``: chat.update answers cant_update_message
    locked: bool = False

    def to_dict(self) -> JsonObject:
        """Return a JSON-serialisable copy."""
        return asdict(self)

    @property
    def posted_message_id(self) -> str | None:
        """The notifier's message id it was posted with (None without such metadata)."""
        return message_id_of(self.posted_metadata)

    def to_api(self, *, include_metadata: bool) -> JsonObject:
        """Render the message as Slack's message object."""
        message: JsonObject = {
            "type": "message",
            "user": FakeSlack.BOT_USER_ID,
            "bot_id": FakeSlack.BOT_ID,
            "app_id": FakeSlack.APP_ID,
            "team": FakeSlack.TEAM_ID,
            "text": self.text,
            "ts": self.ts,
        }
        if self.blocks:
            message["blocks"] = copy.deepcopy(self.blocks)
        if self.thread_ts is not None:
            message["thread_ts"] = self.thread_ts
        if self.edited_ts is not None:
            message["edited"] = {"user": FakeSlack.BOT_USER_ID, "ts": self.edited_ts}
        if include_metadata and self.metadata is not None:
            message["metadata"] = copy.deepcopy(self.metadata)
        return message


@dataclass(frozen=True)
class StoredUpdate:
    """One ``chat.update`` applied to a stored message (``metadata`` parsed, if sent)."""

    channel: str
    ts: str
    message_id: str | None
    text: str | None
    blocks: list[JsonObject] | None
    metadata: JsonObject | None
    edited_ts: str
    at: float

    def to_dict(self) -> JsonObject:
        """Return a JSON-serialisable copy."""
        return asdict(self)


def message_id_of(metadata: object) -> str | None:
    """``event_payload.message_id`` of Slack message metadata, if it is a string."""
    payload = metadata.get("event_payload") if isinstance(metadata, dict) else None
    mid = payload.get("message_id") if isinstance(payload, dict) else None
    return mid if isinstance(mid, str) else None


@dataclass
class _ScriptEntry:
    behaviour: Behaviour
    method: str | None
    remaining: int | None

    def matches(self, method: str) -> bool:
        return self.method is None or self.method == method


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class _Reply:
    status: int
    body: JsonObject
    headers: tuple[tuple[str, str], ...] = ()


class _ApiError(Exception):
    """A Slack API error answered as HTTP 200 ``{"ok": false, "error": code}``."""

    def __init__(self, code: str, errors: Sequence[str] = ()) -> None:
        super().__init__(code)
        self.code = code
        self.errors = list(errors)

    def body(self) -> JsonObject:
        body: JsonObject = {"ok": False, "error": self.code}
        if self.errors:
            body["errors"] = self.errors
            body["response_metadata"] = {"messages": [f"[ERROR] {e}" for e in self.errors]}
        return body


class _ControlError(Exception):
    """A bad control API request (HTTP 400)."""


class FakeSlack:
    """A local Slack Web API server; thread-safe, usable as a context manager.

    Args:
        token: the valid token, or several.
        host: the address to listen on.
        port: the port; 0 picks a free one (see ``port`` and ``base_url`` after ``start``).
    """

    TEAM_ID: Final = "T0FAKETEAM"
    BOT_USER_ID: Final = "U0FAKEBOT"
    BOT_ID: Final = "B0FAKEBOT"
    APP_ID: Final = "A0FAKEAPP"

    def __init__(
        self, token: str | Sequence[str] = "xoxb-test", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        tokens = [token] if isinstance(token, str) else list(token)
        if not tokens or not all(tokens):
            raise ValueError("at least one non-empty token is needed")
        self._tokens = frozenset(tokens)
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._messages: list[StoredMessage] = []
        self._updates: list[StoredUpdate] = []
        self._calls: list[RecordedCall] = []
        self._held: list[RecordedCall] = []
        self._queues: dict[str | None, list[_ScriptEntry]] = {}
        self._persistent: dict[str | None, list[_ScriptEntry]] = {}
        self._rate_per_s: float | None = None
        self._burst = 1
        self._buckets: dict[str, _Bucket] = {}
        self._last_ts_micros = 0

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeSlack:
        """Bind and serve in a background thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("FakeSlack is already running")
        self._stopping.clear()
        server = _Server((self._host, self._port), self)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-slack"
        )
        thread.daemon = True
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving, wake held-back (``slow``) answers, close the socket and join threads."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        thread.join()
        # server_close joins the request threads (ThreadingMixIn.block_on_close).
        server.server_close()
        self._server = self._thread = None

    # --------------------------------------------------------------------------- connections

    def connections(self) -> tuple[int, int]:
        """(connections accepted so far, connections open now)."""
        server = self._server
        if server is None:
            return (0, 0)
        return server.connections_accepted, server.open_connections()

    def drop_connections(self) -> int:
        """Close the idle connections (waiting for their client's next request), as Slack's
        edge ends idle kept-alive connections. Returns how many there were."""
        server = self._server
        return 0 if server is None else server.drop_idle_connections()

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only while running)."""
        if self._server is None:
            raise RuntimeError("FakeSlack is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """The Web API base URL for ``WebClient(base_url=...)``, ending with ``/api/``."""
        return f"http://{self._host}:{self.port}/api/"

    def client_url(self, label: str) -> str:
        """A Web API base URL whose calls are recorded with ``client=label``."""
        if not label or "/" in label:
            raise ValueError("a client label is non-empty and has no '/'")
        return f"http://{self._host}:{self.port}/client/{label}/api/"

    @property
    def control_url(self) -> str:
        """The control API base URL, ending with ``/_fake/``."""
        return f"http://{self._host}:{self.port}/_fake/"

    # ----------------------------------------------------------------------------- scripting

    def script(
        self,
        channel: str | None,
        behaviour: Behaviour,
        *,
        times: int | None = 1,
        method: str | None = "chat.postMessage",
    ) -> None:
        """Queue ``behaviour`` for the next ``times`` matching calls (``None``: persistent).

        A persistent behaviour replaces an earlier persistent one for the same channel and
        method; it applies once the channel's queue has nothing matching.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        entry = _ScriptEntry(behaviour, method, times)
        with self._lock:
            if times is None:
                kept = [e for e in self._persistent.get(channel, []) if e.method != method]
                self._persistent[channel] = [*kept, entry]
            else:
                self._queues.setdefault(channel, []).append(entry)

    def rate_limit(
        self,
        channel: str | None,
        retry_after_s: int = 1,
        *,
        times: int | None = 1,
        method: str | None = "chat.postMessage",
    ) -> None:
        """Answer HTTP 429 ``ratelimited`` with ``Retry-After: retry_after_s``."""
        self.script(
            channel,
            Behaviour("rate_limit", retry_after_s=retry_after_s),
            times=times,
            method=method,
        )

    def server_error(
        self,
        channel: str | None,
        status: int = 500,
        *,
        times: int | None = 1,
        error: str = "internal_error",
        method: str | None = "chat.postMessage",
    ) -> None:
        """Answer HTTP ``status`` (5xx) with ``{"ok": false, "error": error}``."""
        behaviour = Behaviour("server_error", status=status, error=error)
        self.script(channel, behaviour, times=times, method=method)

    def slow(
        self,
        channel: str | None,
        delay_s: float,
        *,
        times: int | None = 1,
        then_store: bool = True,
        method: str | None = "chat.postMessage",
        store_after_s: float = 0.0,
    ) -> None:
        """Hold the answer back ``delay_s``; ``then_store`` processes the request at once, or
        after ``store_after_s`` (the answer then comes ``delay_s`` after that)."""
        behaviour = Behaviour(
            "slow", delay_s=delay_s, then_store=then_store, store_after_s=store_after_s
        )
        self.script(channel, behaviour, times=times, method=method)

    def slack_error(
        self,
        channel: str | None,
        code: str,
        *,
        times: int | None = 1,
        method: str | None = "chat.postMessage",
    ) -> None:
        """Answer HTTP 200 ``{"ok": false, "error": code}``."""
        self.script(channel, Behaviour("slack_error", error=code), times=times, method=method)

    def clear_script(self) -> None:
        """Drop every queued and persistent behaviour."""
        with self._lock:
            self._queues.clear()
            self._persistent.clear()

    def enforce_rate_limit(self, per_channel_per_s: float | None = 1.0, *, burst: int = 1) -> None:
        """Limit ``chat.postMessage`` per channel (token bucket); ``None`` turns it off."""
        if per_channel_per_s is not None and per_channel_per_s <= 0:
            raise ValueError("per_channel_per_s must be > 0 or None")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        with self._lock:
            self._rate_per_s = per_channel_per_s
            self._burst = burst
            self._buckets.clear()

    # ----------------------------------------------------------------------------- records

    def calls(self, method: str | None = None, channel: str | None = None) -> list[RecordedCall]:
        """Recorded calls in the order they were answered, optionally filtered."""
        with self._lock:
            return [
                c
                for c in self._calls
                if (method is None or c.method == method)
                and (channel is None or c.channel == channel)
            ]

    def held(self) -> list[RecordedCall]:
        """The ``slow`` calls whose answer is being held back now (the client still waits)."""
        with self._lock:
            return list(self._held)

    def posts(self, channel: str | None = None) -> list[StoredMessage]:
        """Copies of the stored messages in post order, optionally for one channel.

        Deleted messages are included (``deleted``): they were posted.
        """
        with self._lock:
            return [
                copy.deepcopy(m) for m in self._messages if channel is None or m.channel == channel
            ]

    def updates(self, channel: str | None = None, ts: str | None = None) -> list[StoredUpdate]:
        """Every ``chat.update`` applied, in order, optionally for one channel or message."""
        with self._lock:
            return [
                u
                for u in self._updates
                if (channel is None or u.channel == channel) and (ts is None or u.ts == ts)
            ]

    def post_counts(self) -> Counter[str]:
        """Posts per message id they were posted with; 2 or more is a duplicate post."""
        with self._lock:
            ids = [m.posted_message_id for m in self._messages]
        return Counter(i for i in ids if i is not None)

    def update_counts(self) -> Counter[str]:
        """Applied updates per update message id; 2 or more is an update applied twice."""
        with self._lock:
            return Counter(u.message_id for u in self._updates if u.message_id is not None)

    def wait_for_updates(
        self, count: int, channel: str | None = None, timeout_s: float = 5.0
    ) -> list[StoredUpdate]:
        """Wait until at least ``count`` updates are applied; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = [u for u in self._updates if channel is None or u.channel == channel]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(found)} of {count} updates after {timeout_s}s")
                self._changed.wait(remaining)

    def delete(self, channel: str, ts: str) -> None:
        """Delete a stored message, as a user would: gone from history, not updatable."""
        with self._lock:
            self._stored(channel, ts).deleted = True

    def lock(self, channel: str, ts: str) -> None:
        """Make a stored message not updatable by the bot (``cant_update_message``)."""
        with self._lock:
            self._stored(channel, ts).locked = True

    def _stored(self, channel: str, ts: str) -> StoredMessage:
        """The stored message at ``ts``; the caller holds the lock."""
        for m in self._messages:
            if m.channel == channel and m.ts == ts:
                return m
        raise KeyError(f"no message {ts} in {channel}")

    def wait_for_posts(
        self, count: int, channel: str | None = None, timeout_s: float = 5.0
    ) -> list[StoredMessage]:
        """Wait until at least ``count`` messages are stored; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = [m for m in self._messages if channel is None or m.channel == channel]
                if len(found) >= count:
                    return copy.deepcopy(found)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(found)} of {count} posts after {timeout_s}s")
                self._changed.wait(remaining)

    def reset(self) -> None:
        """Forget messages, calls, scripts and the rate limit (tokens and port stay)."""
        with self._lock:
            self._messages.clear()
            self._updates.clear()
            self._calls.clear()
            self._queues.clear()
            self._persistent.clear()
            self._rate_per_s = None
            self._burst = 1
            self._buckets.clear()

    # ----------------------------------------------------------------------------- API

    def _handle_api(
        self,
        http_verb: str,
        method: str,
        query: str,
        content_type: str,
        authorization: str | None,
        body: bytes,
        client: str | None = None,
    ) -> _Reply:
        at = time.time()
        params: JsonObject = {}
        behaviour: Behaviour | None = None
        channel: str | None = None
        try:
            params = _parse_params(http_verb, query, content_type, body)
            channel = _opt_str(params, "channel")
            reply, behaviour = self._answer(http_verb, method, channel, params, authorization)
        except _ApiError as error:
            reply = _Reply(200, error.body())
        recorded = {k: v for k, v in params.items() if k != "token"}
        call = RecordedCall(
            method=method,
            http_verb=http_verb,
            content_type=content_type.split(";", 1)[0].strip().lower(),
            channel=channel,
            params=recorded,
            status=reply.status,
            ok=bool(reply.body.get("ok")),
            error=reply.body.get("error"),
            behaviour=behaviour.kind if behaviour is not None else None,
            at=at,
            client=client,
        )
        with self._changed:
            self._calls.append(call)
            self._changed.notify_all()
        if behaviour is not None and behaviour.kind == "slow":
            with self._lock:
                self._held.append(call)
            try:
                # Interrupted by stop() so that shutting down never waits for a scripted delay.
                self._stopping.wait(behaviour.delay_s)
            finally:
                with self._lock:
                    self._held.remove(call)
        return reply

    def _answer(
        self,
        http_verb: str,
        method: str,
        channel: str | None,
        params: JsonObject,
        authorization: str | None,
    ) -> tuple[_Reply, Behaviour | None]:
        known = method in _READ_METHODS or method in _WRITE_METHODS
        if not known:
            raise _ApiError("unknown_method")
        if http_verb == "GET" and method not in _READ_METHODS:
            return _Reply(
                405, {"ok": False, "error": "method_not_allowed"}, (("Allow", "POST"),)
            ), None
        self._check_auth(params, authorization)
        behaviour = self._take_behaviour(method, channel)
        if behaviour is not None and behaviour.kind == "slow" and behaviour.then_store:
            # Interrupted by stop(), as the held-back answer is.
            self._stopping.wait(behaviour.store_after_s)
        try:
            return self._behave(method, channel, params, behaviour), behaviour
        except _ApiError as error:
            return _Reply(200, error.body()), behaviour

    def _behave(
        self, method: str, channel: str | None, params: JsonObject, behaviour: Behaviour | None
    ) -> _Reply:
        if behaviour is not None:
            if behaviour.kind == "rate_limit":
                return _rate_limited(behaviour.retry_after_s)
            if behaviour.kind == "server_error":
                return _Reply(behaviour.status, {"ok": False, "error": behaviour.error})
            if behaviour.kind == "slack_error":
                raise _ApiError(behaviour.error)
            if not behaviour.then_store:
                return _Reply(503, {"ok": False, "error": "service_unavailable"})
        if method == "chat.postMessage" and channel is not None:
            retry_after = self._consume_rate_token(channel)
            if retry_after is not None:
                return _rate_limited(retry_after)
        if method == "auth.test":
            return _Reply(200, self._auth_test())
        if method == "chat.postMessage":
            return _Reply(200, self._post_message(channel, params))
        if method == "chat.update":
            return _Reply(200, self._update(channel, params))
        return _Reply(200, self._history(channel, params))

    def _check_auth(self, params: JsonObject, authorization: str | None) -> None:
        token: str | None = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _ApiError("invalid_auth")
            token = value.strip()
        else:
            token = _opt_str(params, "token")
        if not token:
            raise _ApiError("not_authed")
        if token not in self._tokens:
            raise _ApiError("invalid_auth")

    def _take_behaviour(self, method: str, channel: str | None) -> Behaviour | None:
        keys: list[str | None] = [channel, None] if channel is not None else [None]
        with self._lock:
            for key in keys:
                queue = self._queues.get(key, [])
                for index, entry in enumerate(queue):
                    if entry.matches(method):
                        assert entry.remaining is not None
                        entry.remaining -= 1
                        if entry.remaining <= 0:
                            del queue[index]
                        return entry.behaviour
            for key in keys:
                for entry in self._persistent.get(key, []):
                    if entry.matches(method):
                        return entry.behaviour
        return None

    def _consume_rate_token(self, channel: str) -> int | None:
        """Take a token from the channel's bucket; the Retry-After seconds when there is none."""
        with self._lock:
            rate = self._rate_per_s
            if rate is None:
                return None
            now = time.monotonic()
            bucket = self._buckets.setdefault(channel, _Bucket(float(self._burst), now))
            bucket.tokens = min(float(self._burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / rate))

    def _auth_test(self) -> JsonObject:
        return {
            "ok": True,
            "url": "https://fake-slack.example/",
            "team": "Fake Team",
            "user": "fake-bot",
            "team_id": self.TEAM_ID,
            "user_id": self.BOT_USER_ID,
            "bot_id": self.BOT_ID,
            "is_enterprise_install": False,
        }

    def _post_message(self, channel: str | None, params: JsonObject) -> JsonObject:
        if not channel:
            raise _ApiError("channel_not_found")
        text = _opt_str(params, "text")
        blocks = _parse_blocks(params.get("blocks"))
        metadata = _parse_metadata(params.get("metadata"))
        has_attachments = bool(params.get("attachments"))
        if not text and not blocks and not has_attachments:
            raise _ApiError("no_text")
        if text is not None and len(text) > _MAX_TEXT:
            raise _ApiError("msg_too_long")
        thread_ts = _opt_str(params, "thread_ts") or None
        with self._changed:
            message = StoredMessage(
                channel=channel,
                ts=self._next_ts(),
                text=text or "",
                blocks=blocks or None,
                metadata=metadata,
                thread_ts=thread_ts,
                reply_broadcast=_bool(params.get("reply_broadcast")),
                posted_metadata=copy.deepcopy(metadata),
            )
            self._messages.append(message)
            self._changed.notify_all()
            api_message = message.to_api(include_metadata=True)
        return {"ok": True, "channel": channel, "ts": message.ts, "message": api_message}

    def _update(self, channel: str | None, params: JsonObject) -> JsonObject:
        if not channel:
            raise _ApiError("channel_not_found")
        ts = _opt_str(params, "ts")
        text = _opt_str(params, "text")
        has_blocks = params.get("blocks") is not None
        blocks = _parse_blocks(params.get("blocks"))
        has_metadata = params.get("metadata") is not None
        metadata = _parse_metadata(params.get("metadata"))
        if text is None and not has_blocks and not has_metadata and not params.get("attachments"):
            raise _ApiError("no_text")
        if text is not None and len(text) > _MAX_TEXT:
            raise _ApiError("msg_too_long")
        with self._changed:
            message = next(
                (
                    m
                    for m in self._messages
                    if m.channel == channel and m.ts == ts and not m.deleted
                ),
                None,
            )
            if message is None:
                raise _ApiError("message_not_found")
            if message.locked:
                raise _ApiError("cant_update_message")
            if text is not None:
                message.text = text
            if has_blocks:
                message.blocks = blocks or None
            if has_metadata:
                message.metadata = metadata
            message.edited_ts = self._next_ts()
            message.update_count += 1
            self._updates.append(
                StoredUpdate(
                    channel=channel,
                    ts=message.ts,
                    message_id=message_id_of(metadata),
                    text=text,
                    blocks=copy.deepcopy(blocks) if has_blocks else None,
                    metadata=copy.deepcopy(metadata),
                    edited_ts=message.edited_ts,
                    at=time.time(),
                )
            )
            self._changed.notify_all()
            api_message = message.to_api(include_metadata=True)
        return {
            "ok": True,
            "channel": channel,
            "ts": message.ts,
            "text": api_message["text"],
            "message": api_message,
        }

    def _history(self, channel: str | None, params: JsonObject) -> JsonObject:
        if not channel:
            raise _ApiError("channel_not_found")
        limit = _opt_int(params, "limit", "invalid_limit")
        if limit is None or limit <= 0:
            limit = _DEFAULT_HISTORY_LIMIT
        limit = min(limit, _MAX_HISTORY_LIMIT)
        inclusive = _bool(params.get("inclusive"))
        oldest = _ts_micros(_opt_str(params, "oldest") or "0", "invalid_ts_oldest")
        latest_raw = _opt_str(params, "latest")
        latest = _ts_micros(latest_raw, "invalid_ts_latest") if latest_raw else None
        cursor = _opt_str(params, "cursor")
        before: int | None = None
        if cursor:
            if not cursor.startswith(_CURSOR_PREFIX):
                raise _ApiError("invalid_cursor")
            before = _ts_micros(cursor[len(_CURSOR_PREFIX) :], "invalid_cursor")
        include_metadata = _bool(params.get("include_all_metadata"))

        def wanted(m: StoredMessage) -> bool:
            if m.channel != channel or m.deleted:
                return False
            if m.thread_ts is not None and m.thread_ts != m.ts and not m.reply_broadcast:
                return False
            ts = _ts_micros(m.ts, "internal_error")
            if before is not None and ts >= before:
                return False
            if ts < oldest or (ts == oldest and not inclusive):
                return False
            return latest is None or ts < latest or (ts == latest and inclusive)

        with self._lock:
            found = [m for m in reversed(self._messages) if wanted(m)]
            page = [m.to_api(include_metadata=include_metadata) for m in found[:limit]]
        body: JsonObject = {
            "ok": True,
            "messages": page,
            "has_more": len(found) > limit,
            "pin_count": 0,
        }
        if len(found) > limit:
            body["response_metadata"] = {"next_cursor": _CURSOR_PREFIX + page[-1]["ts"]}
        return body

    def _next_ts(self) -> str:
        """A unique, increasing Slack ``ts``; the caller holds the lock."""
        micros = max(int(time.time() * _MICROS), self._last_ts_micros + 1)
        self._last_ts_micros = micros
        return f"{micros // _MICROS}.{micros % _MICROS:06d}"

    # ----------------------------------------------------------------------------- control

    def _handle_control(self, http_verb: str, action: str, query: str, body: bytes) -> _Reply:
        try:
            return _Reply(200, {"ok": True, **self._control(http_verb, action, query, body)})
        except (_ControlError, ValueError, TypeError) as error:
            return _Reply(400, {"ok": False, "error": str(error)})

    def _control(self, http_verb: str, action: str, query: str, body: bytes) -> JsonObject:
        args = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if http_verb == "GET" and action == "posts":
            return {"posts": [m.to_dict() for m in self.posts(args.get("channel"))]}
        if http_verb == "GET" and action == "calls":
            calls = self.calls(method=args.get("method"), channel=args.get("channel"))
            return {"calls": [c.to_dict() for c in calls]}
        if http_verb == "GET" and action == "updates":
            updates = self.updates(channel=args.get("channel"), ts=args.get("ts"))
            return {"updates": [u.to_dict() for u in updates]}
        if http_verb == "GET" and action == "counts":
            return {"posts": dict(self.post_counts()), "updates": dict(self.update_counts())}
        if http_verb != "POST":
            raise _ControlError(f"no control endpoint {http_verb} /_fake/{action}")
        request = _json_object(body) if body else {}
        if action == "reset":
            self.reset()
            return {}
        if action == "rate_limit":
            rate = request.get("per_channel_per_s")
            if rate is not None and not isinstance(rate, int | float):
                raise _ControlError("per_channel_per_s must be a number or null")
            burst = request.get("burst", 1)
            if not isinstance(burst, int):
                raise _ControlError("burst must be an integer")
            self.enforce_rate_limit(None if rate is None else float(rate), burst=burst)
            return {}
        if action == "script":
            self._script_from_json(request)
            return {}
        raise _ControlError(f"no control endpoint POST /_fake/{action}")

    def _script_from_json(self, request: JsonObject) -> None:
        kind = request.get("kind")
        if kind not in _BEHAVIOUR_KINDS:
            raise _ControlError(f"kind must be one of {', '.join(_BEHAVIOUR_KINDS)}")
        channel = request.get("channel")
        method = request.get("method", "chat.postMessage")
        times = request.get("times", 1)
        if channel is not None and not isinstance(channel, str):
            raise _ControlError("channel must be a string or null")
        if method is not None and not isinstance(method, str):
            raise _ControlError("method must be a string or null")
        if times is not None and not isinstance(times, int):
            raise _ControlError("times must be an integer or null")
        fields: JsonObject = {}
        for name in ("retry_after_s", "status", "error", "delay_s", "then_store", "store_after_s"):
            if name in request:
                fields[name] = request[name]
        behaviour = Behaviour(kind=kind, **fields)
        self.script(channel, behaviour, times=times, method=method)


class _Handler(BaseHTTPRequestHandler):
    """Routes ``/api/<method>`` and ``/_fake/<action>``; quiet.

    HTTP/1.1, as Slack: a connection stays open for the client's next request unless the
    client asks for ``Connection: close`` (urllib, hence plain slack-sdk, always does).
    """

    server: _Server
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: without TCP_NODELAY the body waits for
    # the client's delayed ACK (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True
    # An idle connection must not hold a thread forever (stop() also ends idle connections).
    timeout = 10.0

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed(self.connection)

    def parse_request(self) -> bool:
        # a request line has arrived: the connection is busy until it is answered
        self.server.mark(self.connection, busy=True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.mark(self.connection, busy=False)
            if self.server.closing:
                self.close_connection = True  # answered; do not wait for another request

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's per-request log lines."""

    def _dispatch(self, http_verb: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        fake = self.server.fake
        path, client = url.path, None
        if path.startswith("/client/"):
            client, _, rest = path[len("/client/") :].partition("/")
            path = "/" + rest
        if path.startswith("/api/"):
            reply = fake._handle_api(
                http_verb,
                path[len("/api/") :],
                url.query,
                self.headers.get("Content-Type", ""),
                self.headers.get("Authorization"),
                body,
                client or None,
            )
        elif url.path.startswith("/_fake/"):
            reply = fake._handle_control(http_verb, url.path[len("/_fake/") :], url.query, body)
        else:
            reply = _Reply(404, {"ok": False, "error": "not_found"})
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        payload = json.dumps(reply.body).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            # The client gave up (a timeout against a ``slow`` behaviour): nobody to answer.
            logger.debug("fake slack: client went away before the answer", exc_info=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], fake: FakeSlack) -> None:
        self.fake = fake
        #: open connections, and whether each is answering a request now
        self._connections: dict[socket.socket, bool] = {}
        self._connections_lock = threading.Lock()
        #: connections accepted so far
        self.connections_accepted = 0
        self.closing = False
        super().__init__(address, _Handler)

    def opened(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections[connection] = False
            self.connections_accepted += 1

    def mark(self, connection: socket.socket, *, busy: bool) -> None:
        with self._connections_lock:
            if connection in self._connections:
                self._connections[connection] = busy

    def closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.pop(connection, None)

    def open_connections(self) -> int:
        with self._connections_lock:
            return len(self._connections)

    def drop_idle_connections(self) -> int:
        """Shut down the open connections waiting for a request; returns how many."""
        with self._connections_lock:
            idle = [c for c, busy in self._connections.items() if not busy]
        for connection in idle:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        return len(idle)

    def server_close(self) -> None:
        # A kept-alive connection waits for its client's next request: end those waits, or
        # joining the request threads would take the handler's whole idle timeout. One
        # answering a request (a held answer that stop() woke) finishes its answer first.
        self.closing = True
        self.drop_idle_connections()
        super().server_close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a machine
        # without working DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("fake slack: error while handling a request", exc_info=True)


# --------------------------------------------------------------------------------- parsing


def _parse_params(http_verb: str, query: str, content_type: str, body: bytes) -> JsonObject:
    params: JsonObject = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if http_verb == "GET" or not body:
        return params
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        try:
            decoded = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _ApiError("invalid_json") from None
        if not isinstance(decoded, dict):
            raise _ApiError("json_not_object")
        # Slack only takes tokens from the Authorization header when the body is JSON.
        decoded.pop("token", None)
        params.update(decoded)
    elif media_type in ("application/x-www-form-urlencoded", ""):
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise _ApiError("invalid_form_data") from None
        params.update({k: v[-1] for k, v in form.items()})
    else:
        raise _ApiError("invalid_form_data")
    return params


def _opt_str(params: JsonObject, name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise _ApiError("invalid_arguments", [f"{name} must be a string"])


def _opt_int(params: JsonObject, name: str, error: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _ApiError(error)
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise _ApiError(error) from None


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    return isinstance(value, str) and value.strip().lower() in ("1", "true", "yes")


def _ts_micros(value: str, error: str) -> int:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _ApiError(error) from None
    if not number.is_finite() or number < 0:
        raise _ApiError(error)
    return int(number * _MICROS)


def _json_value(value: object, error: str) -> object:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise _ApiError(error) from None
    return value


def _parse_blocks(raw: object) -> list[JsonObject] | None:
    if raw is None or raw == "":
        return None
    blocks = _json_value(raw, "invalid_blocks_format")
    if not isinstance(blocks, list):
        raise _ApiError("invalid_blocks_format", ["must be an array [json-pointer:/blocks]"])
    errors: list[str] = []
    if len(blocks) > _MAX_BLOCKS:
        errors.append(f"no more than {_MAX_BLOCKS} items allowed [json-pointer:/blocks]")
    block_ids: set[str] = set()
    for index, block in enumerate(blocks):
        errors.extend(_block_errors(block, f"/blocks/{index}", block_ids))
    if errors:
        raise _ApiError("invalid_blocks", errors)
    return [dict(b) for b in blocks]


def _block_errors(block: object, pointer: str, block_ids: set[str]) -> list[str]:
    if not isinstance(block, dict):
        return [f"must be an object [json-pointer:{pointer}]"]
    kind = block.get("type")
    if not isinstance(kind, str):
        return [f"missing required field: type [json-pointer:{pointer}]"]
    if kind not in _KNOWN_BLOCK_TYPES:
        return [f"unsupported type: {kind} [json-pointer:{pointer}/type]"]
    errors: list[str] = []
    block_id = block.get("block_id")
    if block_id is not None:
        if not isinstance(block_id, str) or not 0 < len(block_id) <= _MAX_BLOCK_ID:
            errors.append(f"invalid block_id [json-pointer:{pointer}/block_id]")
        elif block_id in block_ids:
            errors.append(f"duplicate block_id {block_id} [json-pointer:{pointer}/block_id]")
        else:
            block_ids.add(block_id)
    if kind == "section":
        text, fields = block.get("text"), block.get("fields")
        if text is None and fields is None:
            errors.append(f"must provide either text or fields [json-pointer:{pointer}]")
        if text is not None:
            errors.extend(_text_errors(text, f"{pointer}/text", _MAX_SECTION_TEXT))
        if fields is not None:
            if not isinstance(fields, list) or len(fields) > _MAX_SECTION_FIELDS:
                errors.append(
                    f"must be an array of at most {_MAX_SECTION_FIELDS} items "
                    f"[json-pointer:{pointer}/fields]"
                )
            else:
                for i, item in enumerate(fields):
                    errors.extend(_text_errors(item, f"{pointer}/fields/{i}", _MAX_FIELD_TEXT))
    elif kind == "header":
        errors.extend(
            _text_errors(block.get("text"), f"{pointer}/text", _MAX_HEADER_TEXT, plain_only=True)
        )
    elif kind in ("context", "actions"):
        elements = block.get("elements")
        most = 10 if kind == "context" else 25
        if not isinstance(elements, list) or not 0 < len(elements) <= most:
            errors.append(
                f"must be an array of 1 to {most} items [json-pointer:{pointer}/elements]"
            )
    return errors


def _text_errors(text: object, pointer: str, most: int, *, plain_only: bool = False) -> list[str]:
    allowed = ("plain_text",) if plain_only else ("plain_text", "mrkdwn")
    if not isinstance(text, dict) or text.get("type") not in allowed:
        return [f"must be a text object of type {' or '.join(allowed)} [json-pointer:{pointer}]"]
    value = text.get("text")
    if not isinstance(value, str) or not value:
        return [f"must be a non-empty string [json-pointer:{pointer}/text]"]
    if len(value) > most:
        return [f"must be less than {most + 1} characters [json-pointer:{pointer}/text]"]
    return []


def _parse_metadata(raw: object) -> JsonObject | None:
    if raw is None or raw == "":
        return None
    metadata = _json_value(raw, "invalid_metadata_format")
    if (
        not isinstance(metadata, dict)
        or not isinstance(metadata.get("event_type"), str)
        or not metadata["event_type"]
        or not isinstance(metadata.get("event_payload"), dict)
    ):
        raise _ApiError("invalid_metadata_format")
    return {"event_type": metadata["event_type"], "event_payload": metadata["event_payload"]}


def _json_object(body: bytes) -> JsonObject:
    try:
        decoded = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _ControlError(f"body is not JSON: {error}") from None
    if not isinstance(decoded, dict):
        raise _ControlError("body must be a JSON object")
    return decoded


def _rate_limited(retry_after_s: int) -> _Reply:
    return _Reply(
        429, {"ok": False, "error": "ratelimited"}, (("Retry-After", str(retry_after_s)),)
    )


# --------------------------------------------------------------------------------- process


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print ``FAKE_SLACK_URL=<base_url>`` once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_slack", description="Fake Slack Web API for tests."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--token", action="append", help="a valid token; repeatable (default xoxb-test)"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        metavar="PER_S",
        help="enforce a chat.postMessage rate limit per channel (default off)",
    )
    parser.add_argument("--burst", type=int, default=1, help="bucket size for --rate-limit")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FakeSlack(token=args.token or ["xoxb-test"], host=args.host, port=args.port) as fake:
        if args.rate_limit is not None:
            fake.enforce_rate_limit(args.rate_limit, burst=args.burst)
        print(f"FAKE_SLACK_URL={fake.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
