"""Delivery decisions of the notifier: records and outcomes in, decisions out.

No I/O, no clock, no randomness: the shell passes ``now`` (wall time for receipts, monotonic
seconds for pacing) and ``jitter`` (a number in [0, 1) from an injectable random source), calls
Slack, and feeds what Slack answered back in.

One message goes through these steps (``Delivery`` is its state):

1. ``already_final``: a message whose ``message_id`` has a final receipt (DELIVERED, FAILED,
   DRY_RUN) in the receipts table is skipped. This makes re-consumption (offsets reset, a new
   group, a replay upstream) free of duplicate posts.
2. ``next_action``: a message in doubt (a post may have reached Slack without the notifier seeing
   the answer) is first looked up in the channel's history by the ``message_id`` carried in its
   Slack message metadata; otherwise it is posted, unless the retry cap is reached. The check
   reads a window bounded on both sides (``history_oldest``, ``history_latest``), trusts "not
   found" only once Slack has had time to store a late post (``settle_wait``), and a check that
   cannot be completed ends in a FAILED receipt and a dead letter, never in a second post.
3. ``after_post`` / ``after_history``: what Slack answered decides: a receipt (``Finish``,
   with a dead letter for permanent failures), a retry after a delay (``Retry``; a 429's
   ``Retry-After`` or capped exponential backoff with jitter), the next step (``Proceed``), or
   ``Fatal`` for errors that condemn every message alike (a revoked token).

Which failures leave a post in doubt follows Slack's own error descriptions: ``internal_error``
and ``fatal_error`` say "it's possible some aspect of the operation succeeded", HTTP 5xx and a
read timeout give no answer at all; a 429 or ``service_unavailable`` means Slack did nothing.

Updates (``SlackMessage.update_of`` names the original, always the first post) never become
posts. ``next_action`` is given the original's receipt from the receipts table:

=====================================  ==========================================================
original's receipt                     the update
=====================================  ==========================================================
DELIVERED with ``slack_ts``            ``Step.UPDATE``: ``chat.update`` of that channel and ts
DRY_RUN                                DRY_RUN receipt, no call (nothing was posted to edit)
FAILED, or DELIVERED without a ts      FAILED ``original_failed`` + dead letter
none yet (or not final)                ``Wait`` (the channel waits, polling goes on), up to
                                       ``RetryPolicy.update_wait_s``; then FAILED
                                       ``original_not_delivered`` + dead letter
=====================================  ==========================================================

An update's receipt carries its own ``message_id`` with the original's channel and ``slack_ts``.
Its Slack call is retried and classified as a post's (``after_update``); an update in doubt is
checked first (``Step.CHECK_UPDATE``, ``after_update_check``): the metadata of the message at
``ts`` names the last update applied to it. Updates of one original reach Slack in the order of
the channel's FIFO, so "it names this update" is exactly "this update was applied". A check
that cannot be made (no access, retries exhausted) applies the update again: an edit to the same
content is invisible, a lost update is not (counted as unverified).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final, cast

from libs.serde import DeliveryStatus, SlackDeliveryReceipt, SlackMessage

JsonObject = dict[str, object]

#: ``event_type`` of the Slack message metadata every post carries.
EVENT_TYPE: Final = "field_alert"

#: ``Rejected`` code of a history check that read its page or time budget before reaching the
#: start of its window: it proves neither that the post is there nor that it is not.
HISTORY_WINDOW_EXCEEDED: Final = "history_window_exceeded"

#: receipt error and dead letter reason prefix of an in-doubt post given up without a repost
IN_DOUBT_UNVERIFIED: Final = "in_doubt_unverified"

FINAL_STATUSES: Final = frozenset(
    {DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.DRY_RUN}
)

#: Slack error codes worth retrying, and whether the failed call may still have posted.
RETRYABLE_ERRORS: Final[Mapping[str, bool]] = {
    "ratelimited": False,
    "service_unavailable": False,
    "request_timeout": False,
    "team_added_to_org": False,
    "internal_error": True,
    "fatal_error": True,
}

#: Errors of the token or app, not of one message: every message would fail the same way, so
#: a FAILED receipt per message would silently write off the whole backlog. The service stops
#: instead (exit 1, offsets of unfinished messages uncommitted) and is restarted until the
#: token is fixed.
TOKEN_ERRORS: Final = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
)
FATAL_ERRORS: Final = TOKEN_ERRORS | frozenset(
    {
        "not_allowed_token_type",
        "missing_scope",
        "no_permission",
        "ekm_access_denied",
        "org_login_required",
    }
)


class ErrorKind(StrEnum):
    """How a Slack error code is handled."""

    RETRYABLE = "retryable"
    PERMANENT = "permanent"
    FATAL = "fatal"


def classify_error(code: str) -> ErrorKind:
    """Retryable, fatal for the service, or (anything else) permanent for this message.

    Unknown codes are permanent: retrying an error we do not understand is an endless loop
    at worst; a FAILED receipt and a dead letter keep the message for an operator.
    """
    if code in RETRYABLE_ERRORS:
        return ErrorKind.RETRYABLE
    if code in FATAL_ERRORS:
        return ErrorKind.FATAL
    return ErrorKind.PERMANENT


# -- outcomes of one Slack call (the adapter's answer) -----------------------------------------


@dataclass(frozen=True)
class Posted:
    """``chat.postMessage`` succeeded; ``channel`` is the conversation Slack posted into."""

    ts: str
    channel: str


@dataclass(frozen=True)
class Rendered:
    """Dry-run: the message was rendered to the log instead of being posted."""


@dataclass(frozen=True)
class Found:
    """The in-doubt post is in the channel's history."""

    ts: str


@dataclass(frozen=True)
class Updated:
    """``chat.update`` succeeded: the message at ``ts`` in ``channel`` shows the update."""

    ts: str
    channel: str


@dataclass(frozen=True)
class NotFound:
    """The channel's history (within the searched window) has no post of the message."""


@dataclass(frozen=True)
class RateLimited:
    """HTTP 429: Slack did nothing; try again after ``retry_after_s``."""

    retry_after_s: float


@dataclass(frozen=True)
class Rejected:
    """Slack answered ``{"ok": false, "error": code}`` (HTTP 200 or 4xx)."""

    error: str


@dataclass(frozen=True)
class Unavailable:
    """No usable answer: HTTP 5xx, a timeout, a connection error.

    ``in_doubt``: the request may have reached Slack and been acted on (a read timeout, a
    dropped connection after sending, a 5xx); False when it surely was not (connect refused).
    """

    error: str
    in_doubt: bool


PostOutcome = Posted | Rendered | RateLimited | Rejected | Unavailable
UpdateOutcome = Updated | Rendered | RateLimited | Rejected | Unavailable
HistoryOutcome = Found | NotFound | RateLimited | Rejected | Unavailable


# -- state and decisions -----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Retry caps and backoff."""

    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    #: clock skew allowed between this host and Slack, on both sides of the history window
    history_margin_s: float = 60.0
    #: how long after the last attempt ended Slack may still store the post (``NotFound`` is
    #: trusted only once this much time has passed)
    history_settle_s: float = 20.0
    #: how long an update waits for its original's receipt before it fails
    update_wait_s: float = 900.0
    #: how often a waiting update looks at the receipts table again
    update_recheck_s: float = 0.5


@dataclass(frozen=True)
class AttemptMarker:
    """What the shell persists before each post: proof that a post may have happened.

    It is written before ``chat.postMessage`` and deleted once the message's receipt is
    acknowledged; finding one for a message at start means the process died while the post's
    outcome was unknown.
    """

    channel: str
    attempts: int
    first_attempt_at: datetime


@dataclass(frozen=True)
class Delivery:
    """Where one message stands.

    ``attempts`` counts ``chat.postMessage`` calls (across restarts, via the marker);
    ``failures`` and ``check_failures`` count retryable failures of posts and of history
    checks (they drive backoff and the cap; a 429 counts as neither, it is back-pressure).
    """

    message: SlackMessage
    attempts: int = 0
    failures: int = 0
    check_failures: int = 0
    in_doubt: bool = False
    first_attempt_at: datetime | None = None
    #: when the last post attempt ended as far as this process can tell: its answer (or its
    #: timeout), or, for a marker read back, when this process took the message over (whoever
    #: made that post had stopped by then). Slack may still store a post after that moment.
    last_attempt_ended_at: datetime | None = None
    last_error: str | None = None
    #: a history check could not be made (no access to the history): the next post is
    #: at-least-once
    unverified: bool = False
    #: an update: the original's message in Slack, once its receipt was found
    target: UpdateTarget | None = None
    #: an update: when it started waiting for its original's receipt (wall time)
    waiting_since: datetime | None = None


@dataclass(frozen=True)
class UpdateTarget:
    """The original of an update as its receipt records it: where ``chat.update`` goes."""

    channel: str
    ts: str


@dataclass(frozen=True)
class PostRequest:
    """A ``chat.postMessage`` call: blocks, fallback text and metadata with the message id."""

    channel: str
    text: str
    blocks: list[JsonObject]
    metadata: JsonObject


@dataclass(frozen=True)
class UpdateRequest:
    """A ``chat.update`` call of the original at ``channel``/``ts``; ``update_of`` names it."""

    channel: str
    ts: str
    text: str
    blocks: list[JsonObject]
    metadata: JsonObject
    update_of: str


class Step(StrEnum):
    """The next Slack call of a delivery."""

    CHECK_HISTORY = "check_history"
    POST = "post"
    CHECK_UPDATE = "check_update"
    UPDATE = "update"


@dataclass(frozen=True)
class Proceed:
    """Make the ``step`` call now (``request`` is set for a post or an update)."""

    step: Step
    delivery: Delivery
    request: PostRequest | UpdateRequest | None = None


@dataclass(frozen=True)
class Finish:
    """The message is done: produce ``receipt``; ``dead_letter`` (a reason) when set."""

    receipt: SlackDeliveryReceipt
    dead_letter: str | None = None


@dataclass(frozen=True)
class Retry:
    """Call again after ``delay_s``; the channel waits with it (messages stay in order)."""

    delivery: Delivery
    delay_s: float
    reason: str
    rate_limited: bool = False


@dataclass(frozen=True)
class Fatal:
    """Stop the service: the error is not this message's fault and would hit every message."""

    error: str


@dataclass(frozen=True)
class Wait:
    """An update whose original has no receipt yet: look again after ``delay_s``.

    The channel waits with it (a later update of the same original must not overtake it);
    other channels go on, and so does polling.
    """

    delivery: Delivery
    delay_s: float


Decision = Proceed | Finish | Retry | Fatal | Wait


def already_final(receipt: SlackDeliveryReceipt | None, *, redriven: bool = False) -> bool:
    """True when the message already has a final receipt and must not be posted again.

    ``redriven``: the record is a dead letter an operator sent back (``python -m services.dlq
    redrive``). Its FAILED receipt is the very failure being re-driven, so it does not stop
    it (otherwise a re-drive of the notifier's dead letters would do nothing); DELIVERED and
    DRY_RUN still do, which keeps a second re-drive (``--force``) from posting twice.
    """
    if receipt is None or receipt.status not in FINAL_STATUSES:
        return False
    return not (redriven and receipt.status == DeliveryStatus.FAILED)


def start(message: SlackMessage, marker: AttemptMarker | None, *, now: datetime) -> Delivery:
    """The initial state; a leftover marker means a post of a previous run is in doubt.

    The marker's post was made by a process that has stopped (or lost the partition) by
    ``now``, when this one takes the message over: ``now`` bounds when that attempt ended,
    which is what the history window and the settle delay count from. The time the marker
    was written does not: a post waits for its marker to be durable (seconds during a broker
    restart), and a marker begun ahead of its post waits for the post before it.
    """
    if marker is None:
        return Delivery(message)
    return Delivery(
        message,
        attempts=marker.attempts,
        in_doubt=True,
        first_attempt_at=marker.first_attempt_at,
        last_attempt_ended_at=now,
        last_error="process stopped with the post's outcome unknown",
    )


def next_action(
    d: Delivery,
    *,
    now: datetime,
    policy: RetryPolicy,
    original: SlackDeliveryReceipt | None = None,
) -> Proceed | Finish | Wait:
    """Check the history when in doubt, post otherwise; give up once the cap is reached.

    An update goes to ``next_update`` (``original``: the receipt of ``update_of``, if any).
    """
    if d.message.update_of is not None:
        return next_update(d, original, now=now, policy=policy)
    if d.in_doubt:
        if d.check_failures >= policy.max_attempts:
            # Not posted again: the post may well be in the channel (an unverifiable check
            # is not evidence of absence). The dead letter keeps the message for an operator,
            # who can look at the channel and re-drive it.
            return _give_up(
                d,
                now,
                f"{IN_DOUBT_UNVERIFIED}: the in-doubt post could not be verified "
                f"({d.last_error}), not posted again",
            )
        return Proceed(Step.CHECK_HISTORY, d)
    if d.failures >= policy.max_attempts:
        return _give_up(d, now, str(d.last_error))
    prepared = prepare_post(d.message)
    if isinstance(prepared, str):
        return Finish(
            receipt(d.message, DeliveryStatus.FAILED, now, d.attempts, error=prepared), prepared
        )
    return Proceed(Step.POST, d, prepared)


def begin_post(d: Delivery, now: datetime) -> tuple[Delivery, AttemptMarker]:
    """Count the post about to be made and return the marker to persist before making it."""
    first = d.first_attempt_at or now
    started = _attempt_begun(d, first)
    return started, AttemptMarker(d.message.channel, started.attempts, first)


def _attempt_begun(d: Delivery, first: datetime) -> Delivery:
    """``d`` with one more attempt (a post or an update), the first of them begun at ``first``.

    ``replace(d, attempts=..., first_attempt_at=...)`` written out: once per call,
    ``dataclasses.replace`` (a walk over the fields' metadata) cost twice the constructor.
    tests/unit/test_notifier_core.py holds it to ``replace`` with every field set.
    """
    return Delivery(
        d.message,
        attempts=d.attempts + 1,
        failures=d.failures,
        check_failures=d.check_failures,
        in_doubt=d.in_doubt,
        first_attempt_at=first,
        last_attempt_ended_at=d.last_attempt_ended_at,
        last_error=d.last_error,
        unverified=d.unverified,
        target=d.target,
        waiting_since=d.waiting_since,
    )


def after_post(
    d: Delivery, outcome: PostOutcome, *, now: datetime, policy: RetryPolicy, jitter: float
) -> Decision:
    """Decide from the answer to a post (``d`` as returned by ``begin_post``)."""
    msg = d.message
    if isinstance(outcome, Posted):
        return Finish(receipt(msg, DeliveryStatus.DELIVERED, now, d.attempts, ts=outcome.ts))
    if isinstance(outcome, Rendered):
        return Finish(receipt(msg, DeliveryStatus.DRY_RUN, now, d.attempts))
    return _after_failure(d, outcome, now=now, policy=policy, jitter=jitter)


def _after_failure(
    d: Delivery,
    outcome: RateLimited | Rejected | Unavailable,
    *,
    now: datetime,
    policy: RetryPolicy,
    jitter: float,
) -> Decision:
    """A post or an update that failed: retry, give up on this message, or stop the service."""
    if isinstance(outcome, RateLimited):
        return Retry(
            replace(d, last_error="ratelimited"),
            max(0.0, outcome.retry_after_s),
            "ratelimited",
            rate_limited=True,
        )
    if isinstance(outcome, Rejected):
        kind = classify_error(outcome.error)
        if kind is ErrorKind.FATAL:
            return Fatal(outcome.error)
        if kind is ErrorKind.PERMANENT:
            failed = _receipt_of(d, DeliveryStatus.FAILED, now, error=outcome.error)
            return Finish(failed, outcome.error)
        if outcome.error == "ratelimited":
            return Retry(replace(d, last_error="ratelimited"), 1.0, "ratelimited", True)
        return _retry(d, outcome.error, RETRYABLE_ERRORS[outcome.error], policy, jitter, now)
    return _retry(d, outcome.error, outcome.in_doubt, policy, jitter, now)


def after_history(
    d: Delivery, outcome: HistoryOutcome, *, now: datetime, policy: RetryPolicy, jitter: float
) -> Decision:
    """Decide from the in-doubt check.

    Found is delivered. Not found goes on to post, but only once the settle delay has passed
    since the last attempt ended (``settle_wait``): a post Slack is still storing would
    otherwise be posted twice; before that the check is made again after the remaining
    delay. A check that read its whole budget without reaching the window's start
    (``HISTORY_WINDOW_EXCEEDED``) proves nothing either way: it is retried as a failed check,
    and after ``max_attempts`` the message gets a FAILED receipt and a dead letter, never a
    repost.
    """
    if isinstance(outcome, Found):
        return Finish(receipt(d.message, DeliveryStatus.DELIVERED, now, d.attempts, ts=outcome.ts))
    if isinstance(outcome, NotFound):
        wait = settle_wait(d, now, policy)
        if wait > 0:
            reason = "history check: not found yet, Slack may still be storing the post"
            return Retry(replace(d, last_error=reason), wait, reason)
        return next_action(replace(d, in_doubt=False, check_failures=0), now=now, policy=policy)
    if isinstance(outcome, RateLimited):
        return Retry(d, max(0.0, outcome.retry_after_s), "history ratelimited", rate_limited=True)
    if isinstance(outcome, Rejected):
        if outcome.error == HISTORY_WINDOW_EXCEEDED:
            return _retry_check(d, outcome.error, policy, jitter)
        kind = classify_error(outcome.error)
        if kind is ErrorKind.RETRYABLE:
            return _retry_check(d, outcome.error, policy, jitter)
        if outcome.error in TOKEN_ERRORS:
            return Fatal(outcome.error)
        # No access to the history (a missing history scope, a DM the app cannot read): the
        # post cannot be verified, and an alert posted twice beats an alert never posted.
        unverified = replace(d, in_doubt=False, check_failures=0, unverified=True)
        return next_action(unverified, now=now, policy=policy)
    return _retry_check(d, outcome.error, policy, jitter)


def settle_wait(d: Delivery, now: datetime, policy: RetryPolicy) -> float:
    """Seconds until a ``NotFound`` of ``d``'s check may be trusted (0: now).

    Slack may store a post after the call that made it has ended on our side: a read timeout
    leaves the request with Slack, and a process killed mid-call leaves one in flight. The
    run that posted twice (issue 11) checked 0.2 s after a timeout, before an overloaded
    Slack had stored the post. Counting from when the last attempt ended (``start`` and
    ``_retry`` record it; unknown: the first attempt, the earliest it can have been) keeps
    the delay to the cases that need it: a check long after the attempt posts at once.
    """
    ended = d.last_attempt_ended_at or d.first_attempt_at or d.message.created_at
    settled_at = ended + timedelta(seconds=policy.history_settle_s)
    return max(0.0, (settled_at - now).total_seconds())


def _retry(
    d: Delivery, error: str, in_doubt: bool, policy: RetryPolicy, jitter: float, now: datetime
) -> Retry:
    failures = d.failures + 1
    nd = replace(
        d, failures=failures, in_doubt=in_doubt, last_error=error, last_attempt_ended_at=now
    )
    return Retry(nd, backoff_delay(failures, policy, jitter), error)


def _retry_check(d: Delivery, error: str, policy: RetryPolicy, jitter: float) -> Retry:
    failures = d.check_failures + 1
    nd = replace(d, check_failures=failures, last_error=f"history check: {error}")
    return Retry(nd, backoff_delay(failures, policy, jitter), f"history check: {error}")


def _give_up(d: Delivery, now: datetime, error: str) -> Finish:
    reason = f"gave up after {d.attempts} attempts: {error}"
    return Finish(_receipt_of(d, DeliveryStatus.FAILED, now, error=reason), reason)


# -- updates -----------------------------------------------------------------------------------

#: receipt errors of updates that cannot be applied
ORIGINAL_FAILED: Final = "original_failed"
ORIGINAL_NOT_DELIVERED: Final = "original_not_delivered"


def next_update(
    d: Delivery,
    original: SlackDeliveryReceipt | None,
    *,
    now: datetime,
    policy: RetryPolicy,
) -> Proceed | Finish | Wait:
    """The next step of an update (module docstring's table); never a post.

    ``original`` is the receipt of ``d.message.update_of``; it is only read until the target
    is known (``d.target``), which is kept for the retries and checks that follow.
    """
    msg = d.message
    assert msg.update_of is not None
    if msg.update_of == msg.message_id:
        reason = "invalid_message: update_of names the message itself"
        return Finish(receipt(msg, DeliveryStatus.FAILED, now, d.attempts, error=reason), reason)
    if d.target is None:
        resolved = _resolve_original(d, original, now=now, policy=policy)
        if not isinstance(resolved, Delivery):
            return resolved
        d = resolved
    if d.in_doubt:
        return Proceed(Step.CHECK_UPDATE, d)
    if d.failures >= policy.max_attempts:
        return _give_up(d, now, str(d.last_error))
    assert d.target is not None  # resolved above
    prepared = prepare_update(msg, d.target)
    if isinstance(prepared, str):
        return Finish(_receipt_of(d, DeliveryStatus.FAILED, now, error=prepared), prepared)
    return Proceed(Step.UPDATE, d, prepared)


def _resolve_original(
    d: Delivery, original: SlackDeliveryReceipt | None, *, now: datetime, policy: RetryPolicy
) -> Delivery | Finish | Wait:
    msg = d.message
    status = original.status if original is not None else None
    if original is not None and status == DeliveryStatus.DELIVERED and original.slack_ts:
        # The original's channel: where it was posted, whatever this message says.
        target = UpdateTarget(original.channel, original.slack_ts)
        return replace(d, target=target, waiting_since=None)
    if status == DeliveryStatus.DRY_RUN:
        return Finish(receipt(msg, DeliveryStatus.DRY_RUN, now, d.attempts))
    if original is not None and status in FINAL_STATUSES:
        why = original.error or "delivered without a ts"
        reason = f"{ORIGINAL_FAILED}: the original {msg.update_of} is {status} ({why})"
        failed = receipt(msg, DeliveryStatus.FAILED, now, d.attempts, error=ORIGINAL_FAILED)
        return Finish(failed, reason)
    since = d.waiting_since or now
    waited = (now - since).total_seconds()
    if waited >= policy.update_wait_s:
        reason = (
            f"{ORIGINAL_NOT_DELIVERED}: no receipt of the original {msg.update_of} "
            f"after {waited:.0f} s"
        )
        failed = receipt(msg, DeliveryStatus.FAILED, now, d.attempts, error=ORIGINAL_NOT_DELIVERED)
        return Finish(failed, reason)
    delay = min(policy.update_recheck_s, policy.update_wait_s - waited)
    return Wait(replace(d, waiting_since=since), max(0.0, delay))


def begin_update(d: Delivery, now: datetime) -> tuple[Delivery, AttemptMarker]:
    """Count the update about to be made and return the marker to persist before making it."""
    assert d.target is not None
    first = d.first_attempt_at or now
    started = _attempt_begun(d, first)
    return started, AttemptMarker(d.target.channel, started.attempts, first)


def after_update(
    d: Delivery, outcome: UpdateOutcome, *, now: datetime, policy: RetryPolicy, jitter: float
) -> Decision:
    """Decide from the answer to ``chat.update``: errors are classified as for a post.

    ``message_not_found``, ``cant_update_message``, ``edit_window_closed`` are permanent
    (FAILED receipt + dead letter), as any code not known to be retryable or fatal.
    """
    if isinstance(outcome, Updated):
        return Finish(_receipt_of(d, DeliveryStatus.DELIVERED, now))
    if isinstance(outcome, Rendered):
        return Finish(_receipt_of(d, DeliveryStatus.DRY_RUN, now))
    return _after_failure(d, outcome, now=now, policy=policy, jitter=jitter)


def after_update_check(
    d: Delivery, outcome: HistoryOutcome, *, now: datetime, policy: RetryPolicy, jitter: float
) -> Decision:
    """Decide from the check of an update in doubt: applied, or apply it (again).

    "Not applied" waits for the settle delay as a post's "not found" does: applying an
    update twice is invisible, but one Slack applies late, after this update was applied
    again and the next update of the same message too, would put the older text back.
    """
    if isinstance(outcome, Found):
        return Finish(_receipt_of(d, DeliveryStatus.DELIVERED, now))
    if isinstance(outcome, NotFound):
        wait = settle_wait(d, now, policy)
        if wait > 0:
            reason = "update check: not applied yet, Slack may still be applying it"
            return Retry(replace(d, last_error=reason), wait, reason)
        return next_update(
            replace(d, in_doubt=False, check_failures=0), None, now=now, policy=policy
        )
    if isinstance(outcome, RateLimited):
        return Retry(d, max(0.0, outcome.retry_after_s), "history ratelimited", rate_limited=True)
    if isinstance(outcome, Rejected):
        if outcome.error in TOKEN_ERRORS:
            return Fatal(outcome.error)
        if classify_error(outcome.error) is not ErrorKind.RETRYABLE:
            return _apply_unverified(d, now, policy)
    failures = d.check_failures + 1
    if failures >= policy.max_attempts:
        # Applying an update twice shows the same message; not applying it loses it.
        return _apply_unverified(d, now, policy)
    error = outcome.error
    return _retry_check(d, error, policy, jitter)


def _apply_unverified(d: Delivery, now: datetime, policy: RetryPolicy) -> Proceed | Finish | Wait:
    unverified = replace(d, in_doubt=False, check_failures=0, unverified=True)
    return next_update(unverified, None, now=now, policy=policy)


def prepare_update(message: SlackMessage, target: UpdateTarget) -> UpdateRequest | str:
    """The ``chat.update`` call that makes the original at ``target`` show ``message``.

    Empty blocks are sent as ``[]``: Slack keeps the previous blocks when they are left out.
    """
    assert message.update_of is not None
    prepared = prepare_post(message)
    if isinstance(prepared, str):
        return prepared
    meta = metadata(message)
    payload = meta["event_payload"]
    assert isinstance(payload, dict)
    payload["update_of"] = message.update_of
    return UpdateRequest(
        target.channel, target.ts, prepared.text, prepared.blocks, meta, message.update_of
    )


def _receipt_of(
    d: Delivery, status: str, now: datetime, *, error: str | None = None
) -> SlackDeliveryReceipt:
    """The receipt of ``d``: an update's names the original's channel and ts."""
    if d.target is None:
        return receipt(d.message, status, now, d.attempts, error=error)
    return receipt(
        d.message,
        status,
        now,
        d.attempts,
        ts=d.target.ts,
        error=error,
        channel=d.target.channel,
    )


def backoff_delay(failures: int, policy: RetryPolicy, jitter: float) -> float:
    """Capped exponential backoff with "equal jitter": half fixed, half random.

    ``failures`` >= 1; ``jitter`` in [0, 1). The fixed half keeps a retry from following a
    failure immediately; the random half spreads the retries of many channels apart.
    """
    exp = min(policy.backoff_max_s, policy.backoff_base_s * 2.0 ** max(0, failures - 1))
    return exp / 2.0 + exp / 2.0 * min(max(jitter, 0.0), 1.0)


def history_oldest(d: Delivery, policy: RetryPolicy) -> datetime:
    """Where an in-doubt check starts reading: the first attempt (or creation) minus a margin.

    The first attempt's time is taken before its marker is written, so before any post of
    the message; the margin absorbs clock skew between this host and Slack (whose clock sets
    the ``ts``).
    """
    since = d.first_attempt_at or d.message.created_at
    return since - timedelta(seconds=policy.history_margin_s)


def history_latest(d: Delivery, policy: RetryPolicy) -> datetime | None:
    """Where an in-doubt check stops reading (None: unbounded, up to now).

    A post of the message is stored by the time the settle delay after the last attempt's
    end has passed (``settle_wait``), plus the clock skew margin. Bounding the window on
    this side too is what keeps the check's reading finite on a busy channel: Slack pages
    newest first, and without ``latest`` every message posted to the channel since (other
    partitions, other replicas, other apps) came before the one looked for. That is how the
    soak's second run read 3 pages of a busy channel without reaching the post, and posted it
    again (issue 11).
    """
    if d.last_attempt_ended_at is None:
        return None
    return d.last_attempt_ended_at + timedelta(
        seconds=policy.history_settle_s + policy.history_margin_s
    )


def find_in_history(messages: Sequence[Mapping[str, object]], message_id: str) -> str | None:
    """The ``ts`` of the message whose metadata carries ``message_id``, or None.

    A post edited since carries its last update's metadata, whose ``update_of`` names it.
    """
    for m in messages:
        meta = m.get("metadata")
        if not isinstance(meta, Mapping) or meta.get("event_type") != EVENT_TYPE:
            continue
        payload = meta.get("event_payload")
        if isinstance(payload, Mapping) and message_id in (
            payload.get("message_id"),
            payload.get("update_of"),
        ):
            ts = m.get("ts")
            if isinstance(ts, str):
                return ts
    return None


def receipt(
    message: SlackMessage,
    status: str,
    now: datetime,
    attempts: int,
    *,
    ts: str | None = None,
    error: str | None = None,
    channel: str | None = None,
) -> SlackDeliveryReceipt:
    """The receipt of ``message`` (``channel``: where it went, by default its own)."""
    return SlackDeliveryReceipt(
        message_id=message.message_id,
        channel=message.channel if channel is None else channel,
        status=status,
        attempts=attempts,
        delivered_at=now,
        slack_ts=ts,
        error=error,
    )


def metadata(message: SlackMessage) -> JsonObject:
    """The Slack message metadata that ties a post to its message and receipt."""
    return {
        "event_type": EVENT_TYPE,
        "event_payload": {"message_id": message.message_id, "pipeline": message.pipeline},
    }


# Slack's fallback text limit is 40000; the fallback built from blocks stays far below.
_MAX_DERIVED_TEXT: Final = 3000


def prepare_post(message: SlackMessage) -> PostRequest | str:
    """The ``chat.postMessage`` call for ``message``, or why it cannot be made."""
    if not message.channel:
        return "invalid_message: empty channel"
    blocks = parse_blocks(message.blocks)
    if isinstance(blocks, str):
        return f"invalid_message: {blocks}"
    text = message.text.strip()
    if not text:
        # slack-sdk warns and screen readers and notifications show nothing without a text.
        text = "\n".join(_block_lines(blocks))[:_MAX_DERIVED_TEXT] or message.message_id
    return PostRequest(message.channel, text, blocks, metadata(message))


def parse_blocks(raw: str) -> list[JsonObject] | str:
    """The ``blocks`` JSON array, or the reason it is not one. Empty means no blocks."""
    if not raw.strip():
        return []
    try:
        parsed: object = json.loads(raw)
    except ValueError as exc:
        return f"blocks is not JSON: {exc}"
    if not isinstance(parsed, list) or not all(isinstance(b, dict) for b in parsed):
        return "blocks is not a JSON array of objects"
    # JSON object keys are strings: the parsed objects are passed on as they are (a copy of
    # each was a tenth of preparing a post)
    return cast(list[JsonObject], parsed)


# -- dry-run rendering -------------------------------------------------------------------------

_LINK = re.compile(r"<([^<>|]+)\|([^<>]+)>|<([^<>|]+)>")


def _plain(text: str) -> str:
    """mrkdwn to plain text: links as ``label (url)``, entities unescaped."""

    def link(m: re.Match[str]) -> str:
        if m.group(3) is not None:
            return m.group(3)
        return f"{m.group(2)} ({m.group(1)})"

    out = _LINK.sub(link, text)
    return out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _text_of(obj: object) -> str:
    if isinstance(obj, Mapping):
        text = obj.get("text")
        if isinstance(text, str):
            return _plain(text)
        if isinstance(text, Mapping):
            return _text_of(text)
        if obj.get("type") == "image":
            return f"[image: {obj.get('alt_text', '')}]"
    if isinstance(obj, str):
        return _plain(obj)
    return ""


def _block_lines(blocks: Sequence[Mapping[str, object]]) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            lines.append(f"== {_text_of(block.get('text'))} ==")
        elif kind == "section":
            if block.get("text") is not None:
                lines.extend(_text_of(block.get("text")).splitlines())
            fields = block.get("fields")
            if isinstance(fields, list):
                lines.extend("  " + _text_of(f).replace("\n", " ") for f in fields)
            accessory = block.get("accessory")
            if isinstance(accessory, Mapping) and isinstance(accessory.get("url"), str):
                lines.append(f"  -> {_text_of(accessory.get('text'))} ({accessory['url']})")
        elif kind == "context":
            elements = block.get("elements")
            if isinstance(elements, list):
                lines.append("  (" + " | ".join(_text_of(e) for e in elements) + ")")
        elif kind == "actions":
            elements = block.get("elements")
            if isinstance(elements, list):
                buttons = []
                for e in elements:
                    url = e.get("url") if isinstance(e, Mapping) else None
                    label = _text_of(e.get("text")) if isinstance(e, Mapping) else ""
                    buttons.append(f"[{label}]({url})" if url else f"[{label}]")
                lines.append("  " + " ".join(buttons))
        elif kind == "divider":
            lines.append("---")
        elif kind == "image":
            lines.append(f"[image: {block.get('alt_text', '')}]")
        else:
            lines.append(f"[{kind} block]")
    return lines


def render_request(request: PostRequest) -> str:
    """A compact, readable text rendering of a post for the dry-run log.

    Who it is for, the fallback text, then the blocks: ``== header ==``, section text and
    fields, context in parentheses, buttons as ``[label](url)`` and links as ``label (url)``.
    """
    payload = request.metadata.get("event_payload")
    ids = (
        f" ({payload.get('pipeline')}, {payload.get('message_id')})"
        if isinstance(payload, Mapping)
        else ""
    )
    lines = [f"to {request.channel}{ids}", f"text: {_plain(request.text)}"]
    lines.extend(_block_lines(request.blocks))
    return "\n".join(lines)


def render_text(message: SlackMessage) -> str:
    """``render_request`` of the message's post, or why it cannot be posted."""
    prepared = prepare_post(message)
    if isinstance(prepared, str):
        return f"to {message.channel} ({message.pipeline}, {message.message_id}): {prepared}"
    return render_request(prepared)


# -- pacing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """A token bucket (``updated`` in monotonic seconds)."""

    tokens: float
    updated: float


def take_token(
    bucket: Bucket | None, now: float, rate_per_s: float, burst: int
) -> tuple[Bucket, float]:
    """Take one token: the new bucket and 0, or the unchanged level and the seconds to wait."""
    if bucket is None:
        bucket = Bucket(float(burst), now)
    tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.updated) * rate_per_s)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate_per_s
