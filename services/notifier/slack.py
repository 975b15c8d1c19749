"""The Slack port of the notifier and its adapters: slack-sdk, dry-run, and an in-memory twin.

``SlackWebNotifier`` turns every answer (and every exception) of ``slack_sdk.WebClient`` into
one of the core's outcome values, so the core decides on data, never on exceptions.

slack-sdk's own retries are switched off (``retry_handlers=[]``): its default
``ConnectionErrorRetryHandler`` re-sends a request after a connection reset, which for a post
that Slack had already processed is exactly the duplicate this service exists to prevent.
Every retry goes through the core, which checks the channel's history first when the previous
post is in doubt.

The client is slack-sdk's ``WebClient`` with one change below it: each call thread keeps its
HTTP connection open between calls (``keepalive.KeepAliveWebClient``) instead of opening a new
one, and a new TLS handshake, per call. What an error means for a post is unchanged.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from urllib.error import URLError

from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web import SlackResponse

from services.notifier.core import (
    HISTORY_WINDOW_EXCEEDED,
    Found,
    HistoryOutcome,
    JsonObject,
    NotFound,
    Posted,
    PostOutcome,
    PostRequest,
    RateLimited,
    Rejected,
    Rendered,
    Unavailable,
    Updated,
    UpdateOutcome,
    UpdateRequest,
    find_in_history,
    render_request,
)
from services.notifier.keepalive import KeepAliveWebClient

log = logging.getLogger(__name__)

# slack-sdk logs an ERROR line for every failed request before raising; the notifier logs each
# failure itself, with the message id, so the SDK's lines would only double the noise.
_SDK_LOG = logging.getLogger(__name__ + ".sdk")
_SDK_LOG.setLevel(logging.CRITICAL)


class Notifier(Protocol):
    """What the delivery loop needs of Slack. Implementations must be thread-safe."""

    @property
    def dry_run(self) -> bool:
        """True when nothing is really posted."""
        ...

    def post(self, request: PostRequest) -> PostOutcome:
        """``chat.postMessage``; never raises for a Slack or network failure."""
        ...

    def find_post(
        self, channel: str, message_id: str, oldest: datetime, latest: datetime | None = None
    ) -> HistoryOutcome:
        """Look for a post of ``message_id`` (by its metadata) in ``channel``.

        Reads the messages from ``oldest`` to ``latest`` (both inclusive; None: up to now).
        ``Rejected(HISTORY_WINDOW_EXCEEDED)`` when the window holds more than the adapter is
        willing to read: neither found nor not found.
        """
        ...

    def update(self, request: UpdateRequest) -> UpdateOutcome:
        """``chat.update`` of the message at ``request.ts``; never raises for a Slack failure."""
        ...

    def find_update(self, channel: str, ts: str, message_id: str) -> HistoryOutcome:
        """Whether the message at ``ts`` shows the update ``message_id`` (its metadata)."""
        ...

    def check_auth(self) -> Rejected | Unavailable | None:
        """``auth.test``: None when the token works."""
        ...


def _outcome_of_api_error(response: SlackResponse) -> RateLimited | Rejected | Unavailable:
    status = int(response.status_code)
    error = response.get("error") if isinstance(response.data, dict) else None
    code = str(error) if error else f"http_{status}"
    if status == 429:
        retry_after = response.headers.get("Retry-After") or response.headers.get("retry-after")
        try:
            seconds = float(retry_after) if retry_after is not None else 1.0
        except ValueError:
            seconds = 1.0
        return RateLimited(seconds)
    if status >= 500:
        # A 5xx may come after Slack acted (a proxy timing out behind it): in doubt.
        return Unavailable(f"http {status}: {code}", in_doubt=True)
    return Rejected(code)


def _outcome_of_exception(exc: Exception) -> Unavailable:
    if isinstance(exc, URLError):
        # urllib wraps only what fails while connecting or sending the request: Slack never
        # saw a complete request, so nothing was posted.
        return Unavailable(f"connection: {exc.reason}", in_doubt=False)
    if isinstance(exc, TimeoutError):
        return Unavailable("timeout waiting for the answer", in_doubt=True)
    # The request was sent and the answer was lost (reset, remote closed, a bad response).
    return Unavailable(f"{type(exc).__name__}: {exc}", in_doubt=True)


def _shows_update(messages: Sequence[Mapping[str, object]], message_id: str) -> bool:
    """True when one of ``messages`` carries the metadata of the update ``message_id``."""
    for m in messages:
        meta = m.get("metadata")
        payload = meta.get("event_payload") if isinstance(meta, Mapping) else None
        if isinstance(payload, Mapping) and payload.get("message_id") == message_id:
            return True
    return False


def _slack_ts(at: datetime) -> str:
    """A time as Slack's ``ts`` (seconds with microseconds; never negative)."""
    return f"{max(0.0, at.timestamp()):.6f}"


def _is_user_id(channel: str) -> bool:
    return channel[:1] in ("U", "W")


class SlackWebNotifier:
    """``Notifier`` over ``slack_sdk.WebClient`` (``base_url`` points it at a fake in tests)."""

    def __init__(
        self,
        token: str,
        *,
        base_url: str = "https://slack.com/api/",
        timeout_s: float = 10.0,
        keep_alive_s: float = 30.0,
        history_limit: int = 200,
        history_max_pages: int = 20,
        history_budget_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # One kept-alive connection per call thread (keepalive.py); keep_alive_s=0 opens a
        # connection per call, as plain slack-sdk does.
        self._client = KeepAliveWebClient(
            token=token,
            base_url=base_url,
            timeout=max(1, round(timeout_s)),
            retry_handlers=[],
            logger=_SDK_LOG,
            idle_s=keep_alive_s,
        )
        # WebClient's timeout is an int of seconds; sub-second timeouts are rounded up to 1.
        self._history_limit = history_limit
        self._history_max_pages = history_max_pages
        # An in-doubt check is bounded in time, not only in pages: a stop waits for it
        # (``drain_timeout_s``), and so does its channel. Default: two call timeouts.
        self._history_budget_s = 2.0 * timeout_s if history_budget_s is None else history_budget_s
        self._mono = monotonic
        # A message to a user id is posted into the bot's DM with that user, whose channel id
        # (D...) is what conversations.history needs: learnt from post answers.
        self._conversations: dict[str, str] = {}

    @property
    def dry_run(self) -> bool:
        return False

    def post(self, request: PostRequest) -> PostOutcome:
        try:
            response = self._client.chat_postMessage(
                channel=request.channel,
                text=request.text,
                blocks=request.blocks or None,
                metadata=request.metadata,
            )
        except SlackApiError as exc:
            return _outcome_of_api_error(exc.response)
        except (OSError, http.client.HTTPException, SlackClientError) as exc:
            return _outcome_of_exception(exc)
        channel = str(response.get("channel") or request.channel)
        if channel != request.channel:
            self._conversations[request.channel] = channel
        return Posted(str(response["ts"]), channel)

    def _conversation(self, channel: str) -> str:
        known = self._conversations.get(channel)
        if known is not None:
            return known
        if _is_user_id(channel):
            try:
                opened = self._client.conversations_open(users=channel)
                dm = opened.get("channel")
                if isinstance(dm, dict) and isinstance(dm.get("id"), str):
                    self._conversations[channel] = dm["id"]
                    return str(dm["id"])
            except (SlackApiError, OSError, http.client.HTTPException, SlackClientError) as exc:
                log.info(
                    "cannot resolve the DM of a user id, reading its history directly",
                    extra={"channel": channel, "error": str(exc)},
                )
        return channel

    def find_post(
        self, channel: str, message_id: str, oldest: datetime, latest: datetime | None = None
    ) -> HistoryOutcome:
        conversation = self._conversation(channel)
        # Newest first, from ``latest`` down to ``oldest`` (both inclusive): pages go on while
        # Slack has more of the window, up to the page cap and the time budget.
        upper = None if latest is None else _slack_ts(max(latest, oldest))
        deadline = self._mono() + self._history_budget_s
        cursor: str | None = None
        try:
            for page in range(self._history_max_pages):
                if page and self._mono() > deadline:
                    break
                response = self._client.conversations_history(
                    channel=conversation,
                    oldest=_slack_ts(oldest),
                    latest=upper,
                    inclusive=True,
                    limit=self._history_limit,
                    include_all_metadata=True,
                    cursor=cursor,
                )
                messages = response.get("messages") or []
                ts = find_in_history([m for m in messages if isinstance(m, dict)], message_id)
                if ts is not None:
                    return Found(ts)
                meta = response.get("response_metadata") or {}
                cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
                if not response.get("has_more") or not cursor:
                    return NotFound()
        except SlackApiError as exc:
            return _outcome_of_api_error(exc.response)
        except (OSError, http.client.HTTPException, SlackClientError) as exc:
            return _outcome_of_exception(exc)
        # More history in the window than we are willing to read: not "not found".
        return Rejected(HISTORY_WINDOW_EXCEEDED)

    def update(self, request: UpdateRequest) -> UpdateOutcome:
        # chat.update takes the conversation id: a DM's D..., not the user id it was posted to.
        conversation = self._conversation(request.channel)
        try:
            response = self._client.chat_update(
                channel=conversation,
                ts=request.ts,
                text=request.text,
                # [] clears the blocks: left out, Slack would keep the original's
                blocks=request.blocks,
                metadata=request.metadata,
            )
        except SlackApiError as exc:
            return _outcome_of_api_error(exc.response)
        except (OSError, http.client.HTTPException, SlackClientError) as exc:
            return _outcome_of_exception(exc)
        return Updated(str(response.get("ts") or request.ts), conversation)

    def find_update(self, channel: str, ts: str, message_id: str) -> HistoryOutcome:
        # Exactly the message at ts (oldest = latest = ts, inclusive): its metadata is that of
        # the last update applied to it.
        conversation = self._conversation(channel)
        try:
            response = self._client.conversations_history(
                channel=conversation,
                oldest=ts,
                latest=ts,
                inclusive=True,
                limit=1,
                include_all_metadata=True,
            )
        except SlackApiError as exc:
            return _outcome_of_api_error(exc.response)
        except (OSError, http.client.HTTPException, SlackClientError) as exc:
            return _outcome_of_exception(exc)
        messages = [
            m for m in response.get("messages") or [] if isinstance(m, dict) and m.get("ts") == ts
        ]
        # A message gone (deleted) is not found: applying the update then fails for good.
        return Found(ts) if _shows_update(messages, message_id) else NotFound()

    def check_auth(self) -> Rejected | Unavailable | None:
        try:
            self._client.auth_test()
        except SlackApiError as exc:
            outcome = _outcome_of_api_error(exc.response)
            return (
                Unavailable("ratelimited", False) if isinstance(outcome, RateLimited) else outcome
            )
        except (OSError, http.client.HTTPException, SlackClientError) as exc:
            return _outcome_of_exception(exc)
        return None


class DryRunNotifier:
    """``Notifier`` without a token: logs a readable rendering of each message instead."""

    @property
    def dry_run(self) -> bool:
        return True

    def post(self, request: PostRequest) -> PostOutcome:
        payload = request.metadata.get("event_payload")
        message_id = payload.get("message_id") if isinstance(payload, dict) else None
        log.info(
            "dry-run, not posted:\n%s",
            render_request(request),
            extra={"channel": request.channel, "message_id": message_id},
        )
        return Rendered()

    def find_post(
        self, channel: str, message_id: str, oldest: datetime, latest: datetime | None = None
    ) -> HistoryOutcome:
        return NotFound()

    def update(self, request: UpdateRequest) -> UpdateOutcome:
        payload = request.metadata.get("event_payload")
        message_id = payload.get("message_id") if isinstance(payload, dict) else None
        log.info(
            "dry-run, would update %s at %s:\n%s",
            request.update_of,
            request.ts,
            render_request(PostRequest(request.channel, request.text, request.blocks, {})),
            extra={"channel": request.channel, "message_id": message_id},
        )
        return Rendered()

    def find_update(self, channel: str, ts: str, message_id: str) -> HistoryOutcome:
        return NotFound()

    def check_auth(self) -> Rejected | Unavailable | None:
        return None


# -- the in-memory twin ------------------------------------------------------------------------


@dataclass(frozen=True)
class FakePost:
    """A post the fake stored; ``updates`` are the ``chat.update`` calls applied to it."""

    ts: str
    request: PostRequest
    updates: list[UpdateRequest] = field(default_factory=list)

    @property
    def metadata(self) -> JsonObject:
        """Its metadata now: the last update's, else the post's."""
        return self.updates[-1].metadata if self.updates else self.request.metadata


#: A scripted answer: an outcome, or "store_then_timeout" (Slack posts or applies the update,
#: the answer is lost), or "store_late" (a post only: the answer is lost and an overloaded
#: Slack stores the post only after the channel's next history read has answered without it).
FakeBehaviour = PostOutcome | HistoryOutcome | UpdateOutcome | str
STORE_THEN_TIMEOUT = "store_then_timeout"
STORE_LATE = "store_late"


def _posted_id(post: FakePost) -> object:
    payload = post.request.metadata.get("event_payload")
    return payload.get("message_id") if isinstance(payload, Mapping) else None


class FakeNotifier:
    """In-memory ``Notifier``: stores posts, answers history from them, scripted per channel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.posts: list[FakePost] = []
        self.calls: list[tuple[str, str]] = []
        self._scripts: dict[tuple[str, str], deque[FakeBehaviour]] = {}
        #: ``STORE_LATE`` posts not stored yet
        self._late: list[PostRequest] = []
        self._ts = 0
        self.auth_error: Rejected | None = None

    @property
    def dry_run(self) -> bool:
        return False

    def script(self, channel: str, *answers: FakeBehaviour, method: str = "post") -> None:
        """Answer the next calls of ``method`` (post | history | update) to ``channel``.

        ``history`` scripts the history reads of both in-doubt posts and in-doubt updates.
        """
        with self._lock:
            self._scripts.setdefault((method, channel), deque()).extend(answers)

    def _next(self, method: str, channel: str) -> FakeBehaviour | None:
        queue = self._scripts.get((method, channel))
        return queue.popleft() if queue else None

    def _store(self, request: PostRequest) -> str:
        # Slack's ts is its clock at posting, unique per channel: wall time, made increasing.
        self._ts = max(int(time.time() * 1_000_000), self._ts + 1)
        ts = f"{self._ts // 1_000_000}.{self._ts % 1_000_000:06d}"
        self.posts.append(FakePost(ts, request))
        return ts

    def post(self, request: PostRequest) -> PostOutcome:
        with self._lock:
            self.calls.append(("post", request.channel))
            scripted = self._next("post", request.channel)
            if scripted == STORE_THEN_TIMEOUT:
                self._store(request)
                return Unavailable("timeout waiting for the answer", in_doubt=True)
            if scripted == STORE_LATE:
                self._late.append(request)
                return Unavailable("timeout waiting for the answer", in_doubt=True)
            if isinstance(scripted, Posted | Rendered | RateLimited | Rejected | Unavailable):
                return scripted
            return Posted(self._store(request), request.channel)

    def find_post(
        self, channel: str, message_id: str, oldest: datetime, latest: datetime | None = None
    ) -> HistoryOutcome:
        with self._lock:
            self.calls.append(("history", channel))
            scripted = self._next("history", channel)
            if isinstance(scripted, Found | NotFound | RateLimited | Rejected | Unavailable):
                return scripted
            upper = None if latest is None else latest.timestamp()
            messages = [
                {"ts": p.ts, "metadata": p.metadata}
                for p in reversed(self.posts)
                if p.request.channel == channel
                and float(p.ts) >= oldest.timestamp()
                and (upper is None or float(p.ts) <= upper)
            ]
            # the late posts of the channel are stored now, after this read missed them
            for request in [r for r in self._late if r.channel == channel]:
                self._late.remove(request)
                self._store(request)
        ts = find_in_history(messages, message_id)
        return NotFound() if ts is None else Found(ts)

    def update(self, request: UpdateRequest) -> UpdateOutcome:
        with self._lock:
            self.calls.append(("update", request.channel))
            scripted = self._next("update", request.channel)
            if isinstance(scripted, Updated | Rendered | RateLimited | Rejected | Unavailable):
                return scripted
            post = next(
                (
                    p
                    for p in self.posts
                    if p.request.channel == request.channel and p.ts == request.ts
                ),
                None,
            )
            if post is None:
                return Rejected("message_not_found")
            post.updates.append(request)
            if scripted == STORE_THEN_TIMEOUT:
                return Unavailable("timeout waiting for the answer", in_doubt=True)
            return Updated(request.ts, request.channel)

    def find_update(self, channel: str, ts: str, message_id: str) -> HistoryOutcome:
        with self._lock:
            self.calls.append(("history", channel))
            scripted = self._next("history", channel)
            if isinstance(scripted, Found | NotFound | RateLimited | Rejected | Unavailable):
                return scripted
            messages = [
                {"ts": p.ts, "metadata": p.metadata}
                for p in self.posts
                if p.request.channel == channel and p.ts == ts
            ]
        return Found(ts) if _shows_update(messages, message_id) else NotFound()

    def check_auth(self) -> Rejected | Unavailable | None:
        return self.auth_error

    def updates_of(self, message_id: str) -> list[UpdateRequest]:
        """The updates applied to the post of ``message_id``, in order."""
        with self._lock:
            return [u for p in self.posts if _posted_id(p) == message_id for u in p.updates]

    def posts_to(self, channel: str) -> list[FakePost]:
        """Stored posts of one channel."""
        with self._lock:
            return [p for p in self.posts if p.request.channel == channel]
