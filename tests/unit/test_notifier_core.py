"""The notifier's pure core: classification, decisions, backoff, pacing, rendering."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from libs.serde import SlackDeliveryReceipt, SlackMessage
from services.notifier import core
from services.notifier.core import (
    AttemptMarker,
    Bucket,
    Delivery,
    ErrorKind,
    Fatal,
    Finish,
    Found,
    NotFound,
    Posted,
    Proceed,
    RateLimited,
    Rejected,
    Rendered,
    Retry,
    RetryPolicy,
    Step,
    Unavailable,
)

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=1)
POLICY = RetryPolicy(max_attempts=3, backoff_base_s=1.0, backoff_max_s=8.0, history_margin_s=60)
BLOCKS = [
    {"type": "header", "text": {"type": "plain_text", "text": "Connector failed"}},
    {
        "type": "section",
        "text": {"type": "mrkdwn", "text": "*Acme* &amp; co: <https://c.io/x|console>"},
    },
    {
        "type": "section",
        "fields": [
            {"type": "mrkdwn", "text": "*Cluster*\nlkc-1"},
            {"type": "mrkdwn", "text": "*Type*\nS3 sink"},
        ],
    },
    {"type": "divider"},
    {
        "type": "context",
        "elements": [
            {"type": "mrkdwn", "text": "pipeline p1"},
            {"type": "plain_text", "text": "id m1"},
        ],
    },
    {
        "type": "actions",
        "elements": [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Docs"},
                "url": "https://d.io",
            },
            {"type": "button", "text": {"type": "plain_text", "text": "Ack"}},
        ],
    },
    {"type": "image", "image_url": "https://i.io/x.png", "alt_text": "graph"},
    {"type": "rich_text", "elements": []},
]


def message(text: str = "Connector failed for Acme", blocks: str | None = None) -> SlackMessage:
    return SlackMessage(
        message_id="m1",
        pipeline="p1",
        channel="U123",
        text=text,
        blocks=json.dumps(BLOCKS) if blocks is None else blocks,
        org_id="org-1",
        source_event_id="ev-1",
        created_at=T0,
    )


def delivery(**changes: object) -> Delivery:
    d = Delivery(message())
    return Delivery(**{**d.__dict__, **changes})  # type: ignore[arg-type]


# -- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("ratelimited", ErrorKind.RETRYABLE),
        ("internal_error", ErrorKind.RETRYABLE),
        ("fatal_error", ErrorKind.RETRYABLE),
        ("service_unavailable", ErrorKind.RETRYABLE),
        ("request_timeout", ErrorKind.RETRYABLE),
        ("channel_not_found", ErrorKind.PERMANENT),
        ("invalid_blocks", ErrorKind.PERMANENT),
        ("not_in_channel", ErrorKind.PERMANENT),
        ("msg_too_long", ErrorKind.PERMANENT),
        ("is_archived", ErrorKind.PERMANENT),
        ("something_new_from_slack", ErrorKind.PERMANENT),
        ("invalid_auth", ErrorKind.FATAL),
        ("not_authed", ErrorKind.FATAL),
        ("token_revoked", ErrorKind.FATAL),
        ("missing_scope", ErrorKind.FATAL),
    ],
)
def test_classify_error(code: str, kind: ErrorKind) -> None:
    assert core.classify_error(code) is kind


# -- the skip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "final"),
    [(None, False), ("DELIVERED", True), ("FAILED", True), ("DRY_RUN", True), ("PENDING", False)],
)
def test_already_final(status: str | None, final: bool) -> None:
    receipt = (
        None
        if status is None
        else SlackDeliveryReceipt("m1", "U123", status, attempts=1, delivered_at=T0)
    )
    assert core.already_final(receipt) is final


@pytest.mark.parametrize(
    ("status", "final"),
    [(None, False), ("FAILED", False), ("DELIVERED", True), ("DRY_RUN", True), ("PENDING", False)],
)
def test_a_redriven_message_is_stopped_only_by_a_successful_receipt(
    status: str | None, final: bool
) -> None:
    receipt = (
        None
        if status is None
        else SlackDeliveryReceipt("m1", "U123", status, attempts=1, delivered_at=T0)
    )
    assert core.already_final(receipt, redriven=True) is final


# -- next_action ------------------------------------------------------------------------------


def test_fresh_message_is_posted_with_blocks_text_and_metadata() -> None:
    action = core.next_action(core.start(message(), None, now=NOW), now=NOW, policy=POLICY)
    assert isinstance(action, Proceed) and action.step is Step.POST
    assert action.request == core.PostRequest(
        channel="U123",
        text="Connector failed for Acme",
        blocks=BLOCKS,
        metadata={
            "event_type": "field_alert",
            "event_payload": {"message_id": "m1", "pipeline": "p1"},
        },
    )


def test_marker_puts_the_message_in_doubt_with_its_attempts() -> None:
    marker = AttemptMarker("U123", attempts=2, first_attempt_at=T0)
    d = core.start(message(), marker, now=NOW)
    assert (d.in_doubt, d.attempts, d.first_attempt_at) == (True, 2, T0)
    # whoever made that post had stopped by the takeover: the attempt ended by then
    assert d.last_attempt_ended_at == NOW
    action = core.next_action(d, now=NOW, policy=POLICY)
    assert isinstance(action, Proceed) and action.step is Step.CHECK_HISTORY


@pytest.mark.parametrize(
    ("changes", "error_part"),
    [
        (
            {"failures": 3, "attempts": 3, "last_error": "http 500"},
            "gave up after 3 attempts: http 500",
        ),
        (
            {"in_doubt": True, "check_failures": 3, "attempts": 1, "last_error": "timeout"},
            "could not be verified",
        ),
    ],
)
def test_cap_gives_up_with_failed_receipt_and_dead_letter(
    changes: dict[str, object], error_part: str
) -> None:
    action = core.next_action(delivery(**changes), now=NOW, policy=POLICY)
    assert isinstance(action, Finish)
    assert action.receipt.status == "FAILED"
    assert error_part in str(action.receipt.error)
    assert action.dead_letter == action.receipt.error
    assert action.receipt.delivered_at == NOW


@pytest.mark.parametrize(
    ("blocks", "reason"),
    [
        ("not json", "blocks is not JSON"),
        ('{"type": "divider"}', "not a JSON array"),
        ("[1]", "not a JSON array"),
    ],
)
def test_invalid_blocks_fail_without_calling_slack(blocks: str, reason: str) -> None:
    action = core.next_action(Delivery(message(blocks=blocks)), now=NOW, policy=POLICY)
    assert isinstance(action, Finish)
    assert action.receipt.status == "FAILED" and action.receipt.attempts == 0
    assert reason in str(action.dead_letter)


def test_empty_text_is_derived_from_the_blocks() -> None:
    request = core.prepare_post(message(text="  "))
    assert isinstance(request, core.PostRequest)
    assert request.text.startswith("== Connector failed ==\n*Acme* & co: console (https://c.io/x)")
    no_blocks = core.prepare_post(message(text="", blocks=""))
    assert isinstance(no_blocks, core.PostRequest)
    assert (no_blocks.text, no_blocks.blocks) == ("m1", [])


def test_begin_post_counts_and_keeps_the_first_attempt_time() -> None:
    d1, marker1 = core.begin_post(Delivery(message()), T0)
    d2, marker2 = core.begin_post(d1, NOW)
    assert (d2.attempts, d2.first_attempt_at) == (2, T0)
    assert marker1 == AttemptMarker("U123", 1, T0)
    assert marker2 == AttemptMarker("U123", 2, T0)


def test_begin_post_keeps_every_other_field_of_the_delivery() -> None:
    import dataclasses

    d = Delivery(
        message(),
        attempts=2,
        failures=1,
        check_failures=1,
        in_doubt=True,
        first_attempt_at=T0,
        last_attempt_ended_at=NOW,
        last_error="timeout",
        unverified=True,
        target=core.UpdateTarget("C1", "1.2"),
        waiting_since=NOW,
    )
    # every field set away from its default: a field added to Delivery must be added here,
    # and begin_post (which writes the copy out field by field) is checked against it
    defaults = Delivery(message())
    for f in dataclasses.fields(Delivery):
        if f.name != "message":
            assert getattr(d, f.name) != getattr(defaults, f.name), f.name
    started, _ = core.begin_post(d, NOW)
    assert started == dataclasses.replace(d, attempts=3)
    updating, _ = core.begin_update(d, NOW)  # the same copy
    assert updating == dataclasses.replace(d, attempts=3)


# -- after_post -------------------------------------------------------------------------------


def _post(outcome: core.PostOutcome, jitter: float = 0.0, **changes: object) -> core.Decision:
    d = delivery(attempts=1, first_attempt_at=T0, **changes)
    return core.after_post(d, outcome, now=NOW, policy=POLICY, jitter=jitter)


@pytest.mark.parametrize(
    ("outcome", "status", "ts", "error", "dead_letter"),
    [
        (Posted("1.000100", "D9"), "DELIVERED", "1.000100", None, None),
        (Rendered(), "DRY_RUN", None, None, None),
        (Rejected("channel_not_found"), "FAILED", None, "channel_not_found", "channel_not_found"),
        (Rejected("invalid_blocks"), "FAILED", None, "invalid_blocks", "invalid_blocks"),
        (Rejected("not_in_channel"), "FAILED", None, "not_in_channel", "not_in_channel"),
        (Rejected("msg_too_long"), "FAILED", None, "msg_too_long", "msg_too_long"),
    ],
)
def test_post_outcomes_that_finish(
    outcome: core.PostOutcome,
    status: str,
    ts: str | None,
    error: str | None,
    dead_letter: str | None,
) -> None:
    decision = _post(outcome)
    assert isinstance(decision, Finish)
    r = decision.receipt
    assert (r.message_id, r.channel, r.status, r.attempts) == ("m1", "U123", status, 1)
    assert (r.slack_ts, r.error, r.delivered_at) == (ts, error, NOW)
    assert decision.dead_letter == dead_letter


@pytest.mark.parametrize(
    ("outcome", "jitter", "delay", "in_doubt", "failures", "rate_limited"),
    [
        (RateLimited(7), 0.5, 7.0, False, 0, True),
        (RateLimited(0), 0.5, 0.0, False, 0, True),
        (Rejected("ratelimited"), 0.5, 1.0, False, 0, True),
        (Unavailable("http 500: internal_error", True), 0.0, 0.5, True, 1, False),
        (Unavailable("http 500: internal_error", True), 0.999, 0.9995, True, 1, False),
        (Unavailable("timeout", True), 0.0, 0.5, True, 1, False),
        (Unavailable("connection refused", False), 0.0, 0.5, False, 1, False),
        (Rejected("internal_error"), 0.0, 0.5, True, 1, False),
        (Rejected("fatal_error"), 0.0, 0.5, True, 1, False),
        (Rejected("service_unavailable"), 0.0, 0.5, False, 1, False),
    ],
)
def test_post_outcomes_that_retry(
    outcome: core.PostOutcome,
    jitter: float,
    delay: float,
    in_doubt: bool,
    failures: int,
    rate_limited: bool,
) -> None:
    decision = _post(outcome, jitter)
    assert isinstance(decision, Retry)
    assert decision.delay_s == pytest.approx(delay)
    assert decision.delivery.in_doubt is in_doubt
    assert decision.delivery.failures == failures
    assert decision.rate_limited is rate_limited
    assert decision.delivery.attempts == 1


def test_backoff_grows_with_failures() -> None:
    decision = _post(Unavailable("timeout", True), 0.0, failures=2)
    assert isinstance(decision, Retry)
    assert decision.delay_s == pytest.approx(2.0)  # 1 * 2**2 = 4, half fixed


@pytest.mark.parametrize(
    "code", ["invalid_auth", "not_authed", "account_inactive", "token_revoked"]
)
def test_token_errors_are_fatal(code: str) -> None:
    assert _post(Rejected(code)) == Fatal(code)


# -- after_history ----------------------------------------------------------------------------


def _check(outcome: core.HistoryOutcome, **changes: object) -> core.Decision:
    fields: dict[str, object] = {
        "attempts": 1,
        "first_attempt_at": T0,
        "in_doubt": True,
        "failures": 1,
        **changes,
    }
    d = delivery(**fields)
    return core.after_history(d, outcome, now=NOW, policy=POLICY, jitter=0.0)


def test_found_in_history_is_delivered_without_posting() -> None:
    decision = _check(Found("1.000200"))
    assert isinstance(decision, Finish)
    assert (decision.receipt.status, decision.receipt.slack_ts) == ("DELIVERED", "1.000200")
    assert decision.receipt.attempts == 1
    assert decision.dead_letter is None


def test_not_found_goes_on_to_post() -> None:
    decision = _check(NotFound())
    assert isinstance(decision, Proceed) and decision.step is Step.POST
    assert decision.delivery.in_doubt is False
    assert decision.delivery.failures == 1


def test_not_found_after_the_last_allowed_failure_gives_up() -> None:
    decision = _check(NotFound(), failures=3, last_error="timeout")
    assert isinstance(decision, Finish) and decision.receipt.status == "FAILED"


@pytest.mark.parametrize("code", ["channel_not_found", "not_in_channel"])
def test_history_without_access_posts_unverified(code: str) -> None:
    decision = _check(Rejected(code))
    assert isinstance(decision, Proceed) and decision.step is Step.POST
    assert decision.delivery.unverified is True


@pytest.mark.parametrize(
    ("outcome", "delay"),
    [
        (RateLimited(3), 3.0),
        (Unavailable("timeout", True), 0.5),
        (Rejected("internal_error"), 0.5),
    ],
)
def test_history_failures_retry_the_check(outcome: core.HistoryOutcome, delay: float) -> None:
    decision = _check(outcome)
    assert isinstance(decision, Retry)
    assert decision.delay_s == pytest.approx(delay)
    assert decision.delivery.in_doubt is True
    assert decision.delivery.failures == 1  # the post's count is untouched


def test_history_token_error_is_fatal() -> None:
    assert _check(Rejected("invalid_auth")) == Fatal("invalid_auth")


def test_history_window_starts_at_the_first_attempt_minus_the_margin() -> None:
    assert core.history_oldest(delivery(first_attempt_at=NOW), POLICY) == NOW - timedelta(
        seconds=60
    )
    assert core.history_oldest(delivery(), POLICY) == T0 - timedelta(seconds=60)


# -- a whole delivery, step by step -----------------------------------------------------------


def test_500_then_success_is_one_post_with_two_attempts() -> None:
    d, _ = core.begin_post(core.start(message(), None, now=T0), T0)
    first = core.after_post(d, Unavailable("http 500", True), now=NOW, policy=POLICY, jitter=0.3)
    assert isinstance(first, Retry) and first.delivery.in_doubt
    assert first.delivery.last_attempt_ended_at == NOW
    check = core.next_action(first.delivery, now=NOW, policy=POLICY)
    assert isinstance(check, Proceed) and check.step is Step.CHECK_HISTORY
    # right after the failed post, "not found" proves nothing yet: Slack may still store it
    early = core.after_history(check.delivery, NotFound(), now=NOW, policy=POLICY, jitter=0.3)
    assert isinstance(early, Retry) and early.delivery.in_doubt
    assert early.delay_s == pytest.approx(POLICY.history_settle_s)
    settled = NOW + timedelta(seconds=POLICY.history_settle_s)
    again = core.next_action(early.delivery, now=settled, policy=POLICY)
    assert isinstance(again, Proceed) and again.step is Step.CHECK_HISTORY
    proceed = core.after_history(again.delivery, NotFound(), now=settled, policy=POLICY, jitter=0.3)
    assert isinstance(proceed, Proceed) and proceed.step is Step.POST
    d2, marker = core.begin_post(proceed.delivery, settled)
    assert marker.attempts == 2
    done = core.after_post(d2, Posted("2.0", "U123"), now=settled, policy=POLICY, jitter=0.3)
    assert isinstance(done, Finish)
    assert (done.receipt.status, done.receipt.attempts) == ("DELIVERED", 2)


# -- the in-doubt check: window, settle delay, unverifiable checks (issue 11) -----------------

SETTLE = POLICY.history_settle_s  # 20 s (the default); margin 60 s


@pytest.mark.parametrize(
    ("case", "changes", "outcome", "expected"),
    [
        # "not found" is trusted only once the settle delay since the attempt's end has passed
        ("not found 1 s after the timeout", {"ended": 1}, NotFound(), ("retry", 19.0, 0)),
        ("not found as the delay ends", {"ended": 20}, NotFound(), ("post", None, 0)),
        ("not found long after", {"ended": 600}, NotFound(), ("post", None, 0)),
        # the attempt's end unknown: counted from the first attempt, the earliest it can be
        ("not found, end unknown", {"ended": None, "first": 5}, NotFound(), ("retry", 15.0, 0)),
        # a check that could not read its whole window proves nothing: check again, counted
        (
            "window exceeded",
            {"ended": 600},
            Rejected(core.HISTORY_WINDOW_EXCEEDED),
            ("retry", 0.5, 1),
        ),
        (
            "window exceeded again",
            {"ended": 600, "check_failures": 1},
            Rejected(core.HISTORY_WINDOW_EXCEEDED),
            ("retry", 1.0, 2),
        ),
        ("found early", {"ended": 0}, Found("9.000001"), ("delivered", None, 0)),
    ],
)
def test_in_doubt_check_decisions(
    case: str,
    changes: dict[str, object],
    outcome: core.HistoryOutcome,
    expected: tuple[object, ...],
) -> None:
    ended, first = changes.pop("ended"), changes.pop("first", 600)
    d = delivery(
        attempts=1,
        in_doubt=True,
        first_attempt_at=NOW - timedelta(seconds=first),  # type: ignore[arg-type]
        last_attempt_ended_at=None if ended is None else NOW - timedelta(seconds=ended),  # type: ignore[arg-type]
        **changes,
    )
    decision = core.after_history(d, outcome, now=NOW, policy=POLICY, jitter=0.0)
    kind, delay, check_failures = expected
    if kind == "retry":
        assert isinstance(decision, Retry), case
        assert decision.delay_s == pytest.approx(delay), case
        assert decision.delivery.in_doubt, case  # checked again, never posted from here
        assert decision.delivery.check_failures == check_failures, case
        assert not decision.rate_limited, case
    elif kind == "post":
        assert isinstance(decision, Proceed) and decision.step is Step.POST, case
        assert not decision.delivery.unverified, case
    else:
        assert isinstance(decision, Finish) and decision.receipt.status == "DELIVERED", case


def test_a_window_that_can_never_be_read_ends_failed_with_a_dead_letter_never_a_repost() -> None:
    """The soak's duplicate (issue 11): "window exceeded" was taken for "no access to the
    history" and posted again. Now every check is retried until the cap, then FAILED."""
    d = delivery(attempts=1, in_doubt=True, first_attempt_at=T0, last_attempt_ended_at=T0)
    now = NOW
    for _ in range(POLICY.max_attempts):
        action = core.next_action(d, now=now, policy=POLICY)
        assert isinstance(action, Proceed) and action.step is Step.CHECK_HISTORY
        decision = core.after_history(
            action.delivery,
            Rejected(core.HISTORY_WINDOW_EXCEEDED),
            now=now,
            policy=POLICY,
            jitter=0.5,
        )
        assert isinstance(decision, Retry)
        d, now = decision.delivery, now + timedelta(seconds=decision.delay_s)
    final = core.next_action(d, now=now, policy=POLICY)
    assert isinstance(final, Finish)
    assert final.receipt.status == "FAILED" and final.receipt.attempts == 1
    assert core.IN_DOUBT_UNVERIFIED in str(final.receipt.error)
    assert core.HISTORY_WINDOW_EXCEEDED in str(final.receipt.error)
    assert final.dead_letter == final.receipt.error


@pytest.mark.parametrize(
    ("first", "ended", "oldest", "latest"),
    [
        # [first attempt - margin, last attempt's end + settle + margin]
        (T0, NOW, T0 - timedelta(seconds=60), NOW + timedelta(seconds=80)),
        (T0, T0, T0 - timedelta(seconds=60), T0 + timedelta(seconds=80)),
        # no attempt recorded (not in doubt): from creation, unbounded above
        (None, None, T0 - timedelta(seconds=60), None),
    ],
)
def test_history_window_is_bounded_on_both_sides(
    first: datetime | None, ended: datetime | None, oldest: datetime, latest: datetime | None
) -> None:
    d = delivery(first_attempt_at=first, last_attempt_ended_at=ended)
    assert core.history_oldest(d, POLICY) == oldest
    assert core.history_latest(d, POLICY) == latest


def test_a_takeover_checks_a_window_that_ends_after_the_takeover() -> None:
    """The marker's post was made by a process that stopped before this one took over, so
    its ts is before the takeover (plus the settle delay and the skew margin); a post the old
    process started long after writing its marker (waiting for the marker's acknowledgement
    during a broker restart) is still inside."""
    takeover = T0 + timedelta(minutes=5)
    d = core.start(message(), AttemptMarker("U123", 3, T0), now=takeover)
    assert core.history_oldest(d, POLICY) == T0 - timedelta(seconds=60)
    assert core.history_latest(d, POLICY) == takeover + timedelta(seconds=80)
    # a check right at the takeover that does not find the post waits for it to settle
    early = core.after_history(d, NotFound(), now=takeover, policy=POLICY, jitter=0.0)
    assert isinstance(early, Retry) and early.delay_s == pytest.approx(SETTLE)
    late = takeover + timedelta(seconds=SETTLE)
    posted = core.after_history(early.delivery, NotFound(), now=late, policy=POLICY, jitter=0.0)
    assert isinstance(posted, Proceed) and posted.step is Step.POST


# -- backoff and pacing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "jitter", "delay"),
    [
        (1, 0.0, 0.5),
        (1, 1.0, 1.0),
        (2, 0.0, 1.0),
        (3, 0.5, 3.0),
        (4, 0.0, 4.0),
        (10, 0.0, 4.0),
        (10, 1.0, 8.0),
        (1, -5.0, 0.5),
        (1, 5.0, 1.0),
    ],
)
def test_backoff_delay(failures: int, jitter: float, delay: float) -> None:
    assert core.backoff_delay(failures, POLICY, jitter) == pytest.approx(delay)


def test_token_bucket_one_per_second() -> None:
    bucket, wait = core.take_token(None, 100.0, 1.0, 1)
    assert wait == 0.0
    bucket, wait = core.take_token(bucket, 100.25, 1.0, 1)
    assert wait == pytest.approx(0.75)
    bucket, wait = core.take_token(bucket, 101.0, 1.0, 1)
    assert wait == 0.0
    assert bucket == Bucket(0.0, 101.0)


def test_token_bucket_burst_then_rate() -> None:
    bucket = None
    waits = []
    for _ in range(4):
        bucket, wait = core.take_token(bucket, 0.0, 2.0, 3)
        waits.append(wait)
    assert waits == [0.0, 0.0, 0.0, pytest.approx(0.5)]
    _, wait = core.take_token(bucket, 0.5, 2.0, 3)
    assert wait == 0.0


# -- history matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "found"),
    [
        ([], None),
        ([{"ts": "1.1", "text": "no metadata"}], None),
        (
            [
                {
                    "ts": "1.1",
                    "metadata": {"event_type": "other", "event_payload": {"message_id": "m1"}},
                }
            ],
            None,
        ),
        (
            [
                {
                    "ts": "1.1",
                    "metadata": {
                        "event_type": "field_alert",
                        "event_payload": {"message_id": "m2"},
                    },
                }
            ],
            None,
        ),
        (
            [
                {
                    "ts": "1.2",
                    "metadata": {
                        "event_type": "field_alert",
                        "event_payload": {"message_id": "m2"},
                    },
                },
                {
                    "ts": "1.1",
                    "metadata": {
                        "event_type": "field_alert",
                        "event_payload": {"message_id": "m1"},
                    },
                },
            ],
            "1.1",
        ),
        ([{"ts": "1.1", "metadata": "garbage"}], None),
        (
            [
                {
                    "ts": 5,
                    "metadata": {
                        "event_type": "field_alert",
                        "event_payload": {"message_id": "m1"},
                    },
                }
            ],
            None,
        ),
    ],
)
def test_find_in_history(messages: list[dict[str, object]], found: str | None) -> None:
    assert core.find_in_history(messages, "m1") == found


# -- dry-run rendering ------------------------------------------------------------------------


def test_render_text_is_readable() -> None:
    assert core.render_text(message()) == "\n".join(
        [
            "to U123 (p1, m1)",
            "text: Connector failed for Acme",
            "== Connector failed ==",
            "*Acme* & co: console (https://c.io/x)",
            "  *Cluster* lkc-1",
            "  *Type* S3 sink",
            "---",
            "  (pipeline p1 | id m1)",
            "  [Docs](https://d.io) [Ack]",
            "[image: graph]",
            "[rich_text block]",
        ]
    )


def test_render_text_names_an_invalid_message() -> None:
    assert core.render_text(message(blocks="nope")).startswith(
        "to U123 (p1, m1): invalid_message: blocks is not JSON"
    )


# -- updates -----------------------------------------------------------------------------------

ORIGINAL_TS = "1764061200.000100"


def update_message(message_id: str = "m1-u1", update_of: str = "m1") -> SlackMessage:
    return SlackMessage(
        message_id=message_id,
        pipeline="p1",
        channel="U123",
        text="Connector failed again (2 failures)",
        blocks=json.dumps(BLOCKS),
        org_id="org-1",
        source_event_id="ev-2",
        created_at=T0,
        update_of=update_of,
    )


def original_receipt(
    status: str = "DELIVERED", ts: str | None = ORIGINAL_TS, error: str | None = None
) -> SlackDeliveryReceipt:
    return SlackDeliveryReceipt(
        message_id="m1",
        channel="D0DM",
        status=status,
        attempts=1,
        slack_ts=ts,
        error=error,
        delivered_at=T0,
    )


def test_an_update_of_a_delivered_original_is_a_chat_update_of_its_ts() -> None:
    action = core.next_action(
        Delivery(update_message()), now=NOW, policy=POLICY, original=original_receipt()
    )
    assert isinstance(action, Proceed) and action.step is Step.UPDATE
    request = action.request
    assert isinstance(request, core.UpdateRequest)
    # the original's channel and ts, the update's own content and message id
    assert (request.channel, request.ts, request.update_of) == ("D0DM", ORIGINAL_TS, "m1")
    assert request.text == "Connector failed again (2 failures)"
    assert request.blocks == BLOCKS
    assert request.metadata == {
        "event_type": "field_alert",
        "event_payload": {"message_id": "m1-u1", "pipeline": "p1", "update_of": "m1"},
    }
    assert action.delivery.target == core.UpdateTarget("D0DM", ORIGINAL_TS)


@pytest.mark.parametrize(
    ("original", "status", "error", "dead_letter"),
    [
        (original_receipt("DRY_RUN", ts=None), "DRY_RUN", None, False),
        (
            original_receipt("FAILED", ts=None, error="channel_not_found"),
            "FAILED",
            "original_failed",
            True,
        ),
        (original_receipt("DELIVERED", ts=None), "FAILED", "original_failed", True),
    ],
    ids=["dry-run", "failed", "delivered-without-ts"],
)
def test_an_update_whose_original_cannot_be_edited_finishes_without_a_call(
    original: SlackDeliveryReceipt, status: str, error: str | None, dead_letter: bool
) -> None:
    action = core.next_action(Delivery(update_message()), now=NOW, policy=POLICY, original=original)
    assert isinstance(action, Finish)
    r = action.receipt
    assert (r.message_id, r.status, r.error, r.attempts) == ("m1-u1", status, error, 0)
    assert (action.dead_letter is not None) is dead_letter
    if dead_letter:
        assert action.dead_letter is not None and "m1" in action.dead_letter


def test_an_update_waits_for_its_original_then_applies_it() -> None:
    """A fake clock: no receipt of the original yet, twice; then it arrives."""
    policy = replace_policy(update_wait_s=60.0, update_recheck_s=0.5)
    d = Delivery(update_message())
    first = core.next_action(d, now=NOW, policy=policy, original=None)
    assert isinstance(first, core.Wait)
    assert first.delay_s == 0.5 and first.delivery.waiting_since == NOW
    later = NOW + timedelta(seconds=30)
    second = core.next_action(first.delivery, now=later, policy=policy, original=None)
    assert isinstance(second, core.Wait) and second.delivery.waiting_since == NOW
    arrived = core.next_action(
        second.delivery, now=later, policy=policy, original=original_receipt()
    )
    assert isinstance(arrived, Proceed) and arrived.step is Step.UPDATE
    assert arrived.delivery.waiting_since is None


@pytest.mark.parametrize(
    ("waited_s", "kind"),
    [(0.0, "wait"), (59.9, "wait"), (60.0, "failed"), (600.0, "failed")],
)
def test_the_wait_for_the_original_is_bounded_and_never_becomes_a_post(
    waited_s: float, kind: str
) -> None:
    policy = replace_policy(update_wait_s=60.0)
    d = Delivery(update_message(), waiting_since=NOW)
    action = core.next_action(d, now=NOW + timedelta(seconds=waited_s), policy=policy)
    if kind == "wait":
        assert isinstance(action, core.Wait)
        assert 0 <= action.delay_s <= policy.update_recheck_s
    else:
        assert isinstance(action, Finish)
        assert (action.receipt.status, action.receipt.error) == (
            "FAILED",
            "original_not_delivered",
        )
        assert action.dead_letter is not None
        assert action.dead_letter.startswith("original_not_delivered")


def replace_policy(**changes: float) -> RetryPolicy:
    return RetryPolicy(**{**POLICY.__dict__, **changes})  # type: ignore[arg-type]


def started_update(**changes: object) -> Delivery:
    action = core.next_action(
        Delivery(update_message()), now=NOW, policy=POLICY, original=original_receipt()
    )
    assert isinstance(action, Proceed)
    d, marker = core.begin_update(action.delivery, NOW)
    assert (marker.channel, marker.attempts) == ("D0DM", 1)
    return Delivery(**{**d.__dict__, **changes})  # type: ignore[arg-type]


def test_an_applied_update_is_delivered_with_the_original_channel_and_ts() -> None:
    d = started_update()
    decision = core.after_update(
        d, core.Updated(ORIGINAL_TS, "D0DM"), now=NOW, policy=POLICY, jitter=0.5
    )
    assert isinstance(decision, Finish) and decision.dead_letter is None
    r = decision.receipt
    assert (r.message_id, r.channel, r.slack_ts, r.status, r.attempts) == (
        "m1-u1",
        "D0DM",
        ORIGINAL_TS,
        "DELIVERED",
        1,
    )


@pytest.mark.parametrize(
    "code",
    [
        "message_not_found",
        "cant_update_message",
        "edit_window_closed",
        "channel_not_found",
        "invalid_blocks",
    ],
)
def test_permanent_update_errors_fail_with_a_dead_letter(code: str) -> None:
    decision = core.after_update(
        started_update(), Rejected(code), now=NOW, policy=POLICY, jitter=0.5
    )
    assert isinstance(decision, Finish)
    assert (decision.receipt.status, decision.receipt.error) == ("FAILED", code)
    assert decision.dead_letter == code


@pytest.mark.parametrize(
    ("outcome", "rate_limited", "in_doubt"),
    [
        (RateLimited(7.0), True, False),
        (Unavailable("http 500: internal_error", in_doubt=True), False, True),
        (Unavailable("connection: refused", in_doubt=False), False, False),
        (Rejected("service_unavailable"), False, False),
    ],
)
def test_update_failures_retry_as_a_posts_do(
    outcome: core.UpdateOutcome, rate_limited: bool, in_doubt: bool
) -> None:
    decision = core.after_update(started_update(), outcome, now=NOW, policy=POLICY, jitter=0.0)
    assert isinstance(decision, Retry)
    assert decision.rate_limited is rate_limited
    assert decision.delivery.in_doubt is in_doubt
    if rate_limited:
        assert decision.delay_s == 7.0
    # the retry is an update again (after a check when in doubt), never a post
    again = core.next_action(decision.delivery, now=NOW, policy=POLICY, original=None)
    assert isinstance(again, Proceed)
    assert again.step is (Step.CHECK_UPDATE if in_doubt else Step.UPDATE)


def test_a_token_error_on_update_is_fatal() -> None:
    decision = core.after_update(
        started_update(), Rejected("invalid_auth"), now=NOW, policy=POLICY, jitter=0.0
    )
    assert decision == Fatal("invalid_auth")


def test_an_update_in_doubt_is_checked_before_it_is_applied_again() -> None:
    marker = AttemptMarker("D0DM", 1, T0)
    d = core.start(update_message(), marker, now=NOW)
    action = core.next_action(d, now=NOW, policy=POLICY, original=original_receipt())
    assert isinstance(action, Proceed) and action.step is Step.CHECK_UPDATE
    found = core.after_update_check(
        action.delivery, Found(ORIGINAL_TS), now=NOW, policy=POLICY, jitter=0.0
    )
    assert isinstance(found, Finish)
    assert (found.receipt.status, found.receipt.slack_ts, found.receipt.attempts) == (
        "DELIVERED",
        ORIGINAL_TS,
        1,
    )
    # not applied right at the takeover: Slack may still be applying it, look again later
    early = core.after_update_check(action.delivery, NotFound(), now=NOW, policy=POLICY, jitter=0.0)
    assert isinstance(early, Retry) and early.delay_s == pytest.approx(POLICY.history_settle_s)
    assert early.delivery.in_doubt
    settled = NOW + timedelta(seconds=POLICY.history_settle_s)
    not_found = core.after_update_check(
        early.delivery, NotFound(), now=settled, policy=POLICY, jitter=0.0
    )
    assert isinstance(not_found, Proceed) and not_found.step is Step.UPDATE
    assert not not_found.delivery.unverified


@pytest.mark.parametrize(
    ("outcome", "check_failures", "expected"),
    [
        (Unavailable("http 503", in_doubt=True), 0, "retry"),
        (Rejected("internal_error"), 1, "retry"),
        (Unavailable("http 503", in_doubt=True), POLICY.max_attempts - 1, "apply"),
        (Rejected("missing_scope"), 0, "apply"),
        (Rejected("channel_not_found"), 0, "apply"),
        (RateLimited(3.0), POLICY.max_attempts - 1, "retry"),
        (Rejected("token_revoked"), 0, "fatal"),
    ],
)
def test_an_update_check_that_cannot_be_made_retries_then_applies_unverified(
    outcome: core.HistoryOutcome, check_failures: int, expected: str
) -> None:
    d = started_update(in_doubt=True, check_failures=check_failures)
    decision = core.after_update_check(d, outcome, now=NOW, policy=POLICY, jitter=0.0)
    if expected == "retry":
        assert isinstance(decision, Retry)
    elif expected == "fatal":
        assert isinstance(decision, Fatal)
    else:
        # applying twice shows the same message; not applying loses the update
        assert isinstance(decision, Proceed) and decision.step is Step.UPDATE
        assert decision.delivery.unverified


def test_an_update_naming_itself_fails() -> None:
    action = core.next_action(
        Delivery(update_message("m1", update_of="m1")),
        now=NOW,
        policy=POLICY,
        original=original_receipt(),
    )
    assert isinstance(action, Finish) and action.receipt.status == "FAILED"


def test_an_updated_post_is_still_found_by_its_own_id() -> None:
    """An in-doubt post edited since carries its update's metadata; ``update_of`` names it."""
    edited = {
        "ts": ORIGINAL_TS,
        "metadata": {
            "event_type": core.EVENT_TYPE,
            "event_payload": {"message_id": "m1-u2", "update_of": "m1"},
        },
    }
    assert core.find_in_history([edited], "m1") == ORIGINAL_TS
    assert core.find_in_history([edited], "m1-u2") == ORIGINAL_TS
    assert core.find_in_history([edited], "m1-u1") is None
