"""The audit itself: it must see a duplicate post, a lost alert and a broken exactly-once
promise, or a green e2e run would prove nothing. No stack needed."""

from __future__ import annotations

from collections import Counter

import pytest

from libs.serde import InMemorySchemaRegistry
from tests.e2e.harness import (
    FALLBACK_CHANNEL,
    Audit,
    Expect,
    Observed,
    Report,
    format_summary,
)
from tests.support.fake_slack import StoredMessage

pytestmark = pytest.mark.e2e

DLQ = "t.data-slack-users.dlq"


def _post(channel: str, mid: str, text: str = "hi", posted_at: float = 0.0) -> StoredMessage:
    meta = {"event_type": "field_alert", "event_payload": {"message_id": mid}}
    return StoredMessage(channel=channel, ts="1.0", text=text, metadata=meta, posted_at=posted_at)


def _observed(**overrides: object) -> Observed:
    base: dict[str, object] = {
        "posts": {
            "m1": [_post("U1", "m1")],
            "m2": [_post(FALLBACK_CHANNEL, "m2", "No Slack user found for x")],
        },
        "receipts": {"m1": ["DELIVERED"], "m2": ["DELIVERED"]},
        "messages": Counter({"m1": 1, "m2": 1}),
        "message_events": {"m1": "e1", "m2": "e2"},
        "dlq_keys": {DLQ: Counter({b"bad": 1})},
        "dlq_message_ids": Counter(),
        "onboarding_event_ids": Counter({"e2": 1}),
        "unparsed_posts": 0,
    }
    base.update(overrides)
    return Observed(**base)  # type: ignore[arg-type]


def _audit() -> Audit:
    audit = Audit(InMemorySchemaRegistry())
    for e in (
        Expect("e1", "delivered", "dm", event_id="e1", message_id="m1", channel="U1"),
        Expect(
            "e2",
            "missed",
            "no_slack_user",
            event_id="e2",
            message_id="m2",
            channel=FALLBACK_CHANNEL,
        ),
        Expect("e3", "filtered", "not_failed", event_id="e3"),
        Expect("poison", "dead_lettered", "garbage", dlq_topic=DLQ, dlq_key=b"bad"),
    ):
        audit.add(e)
    return audit


def test_a_clean_run_accounts_for_every_input() -> None:
    r = _audit().report(_observed(), "clean")
    assert (r.inputs, r.delivered, r.missed, r.filtered, r.dead_lettered) == (4, 1, 1, 1, 1)
    assert (r.duplicates, r.dup_messages, r.lost, r.problems) == (0, 0, 0, [])


def test_duplicates_in_the_read_committed_view_are_counted() -> None:
    obs = _observed(messages=Counter({"m1": 3, "m2": 1}), onboarding_event_ids=Counter({"e2": 2}))
    r = _audit().report(obs, "dups")
    assert r.dup_messages == 3
    with pytest.raises(AssertionError):
        r.assert_ok()


def test_longest_delay_counts_the_inputs_of_the_fault_window() -> None:
    audit = Audit(InMemorySchemaRegistry())
    for mid, entered in (("m1", 100.0), ("m2", 110.0), ("m3", 130.0)):
        audit.add(Expect(mid, "delivered", "dm", message_id=mid, channel="U1", entered_at=entered))
    posts = {
        "m1": [_post("U1", "m1", posted_at=150.0)],  # before the fault: 50 s, not counted
        "m2": [_post("U1", "m2", posted_at=121.5), _post("U1", "m2", posted_at=125.0)],
        "m3": [_post("U1", "m3", posted_at=131.0)],
    }
    obs = _observed(posts=posts)
    assert audit.max_delay(obs, (105.0, 135.0)) == pytest.approx(11.5)
    assert audit.max_delay(obs, None) == pytest.approx(50.0)
    assert audit.max_delay(obs, (200.0, 300.0)) is None


@pytest.mark.parametrize(
    ("overrides", "lost", "duplicates", "problem"),
    [
        ({"posts": {"m2": [_post(FALLBACK_CHANNEL, "m2", "No Slack user found")]}}, 1, 0, "lost"),
        (
            {"posts": {"m1": [_post("U1", "m1")] * 2, "m2": [_post(FALLBACK_CHANNEL, "m2")]}},
            1,  # the fallback post does not say why
            1,
            "duplicate",
        ),
        ({"posts": {"m1": [_post("U9", "m1")]}}, 2, 0, "posted to ['U9']"),
        ({"receipts": {"m2": ["DELIVERED"]}}, 1, 0, "no DELIVERED receipt"),
        ({"dlq_keys": {DLQ: Counter()}}, 1, 0, "not in t.data-slack-users.dlq"),
        ({"message_events": {"m1": "e1", "m2": "e2", "m3": "e3"}}, 1, 0, "filtered event e3"),
        ({"messages": Counter({"m1": 2, "m2": 1})}, 0, 0, "enricher exactly-once broken"),
        ({"onboarding_event_ids": Counter({"e2": 2})}, 0, 0, "producer exactly-once broken"),
    ],
)
def test_the_audit_sees_what_went_wrong(
    overrides: dict[str, object], lost: int, duplicates: int, problem: str
) -> None:
    r = _audit().report(_observed(**overrides), "broken")
    assert (r.lost, r.duplicates) == (lost, duplicates), r
    assert any(problem in p for p in r.problems), r.problems
    with pytest.raises(AssertionError):
        r.assert_ok()


def test_summary_table_has_every_column_and_a_total() -> None:
    table = format_summary(
        [
            Report("a", inputs=3, delivered=1, filtered=1, dead_lettered=1, seconds=2),
            Report(
                "b",
                inputs=1,
                missed=1,
                duplicates=1,
                dup_messages=2,
                max_delay_s=7.46,
                notes=["kill -9 at 3s"],
            ),
        ]
    )
    header, *_ = table.splitlines()
    assert header.split() == [
        "scenario",
        "inputs",
        "delivered",
        "grouped",
        "filtered",
        "dead-lettered",
        "missed",
        "dup-posts",
        "dup-rc-msgs",
        "lost",
        "max-delay-s",
        "seconds",
    ]
    total = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "4", "1", "0", "1", "1", "1", "1", "2", "0", "7.5", "2"]
    assert table.splitlines()[2].split()[-2:] == ["-", "2"]
    assert "b: kill -9 at 3s" in table


def _grouped(**overrides: object) -> Observed:
    """e4 (same owner as e1) grouped into m1: its update m4 is in U1."""
    base: dict[str, object] = {
        "updates": {"m4": ("m1", "U1")},
        "receipts": {"m1": ["DELIVERED"], "m2": ["DELIVERED"], "m4": ["DELIVERED"]},
        "messages": Counter({"m1": 1, "m2": 1, "m4": 1}),
        "message_events": {"m1": "e1", "m2": "e2", "m4": "e4"},
    }
    base.update(overrides)
    return _observed(**base)


def _audit_with_grouped() -> Audit:
    audit = _audit()
    audit.add(Expect("e4", "delivered", "dm", event_id="e4", message_id="m4", channel="U1"))
    return audit


def test_an_input_grouped_into_a_delivered_alert_is_accounted_for() -> None:
    r = _audit_with_grouped().report(_grouped(), "grouped")
    assert (r.inputs, r.delivered, r.grouped, r.lost, r.problems) == (5, 1, 1, 0, [])
    assert "grouped" in format_summary([r]).splitlines()[0]


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"updates": {"m4": ("m1", "U9")}}, "update m4 went to U9"),
        ({"updates": {"m4": ("m9", "U1")}}, "grouped into m9, which is not in Slack"),
        ({"updates": {"m4": ("m1", "U1"), "m1": ("m0", "U1")}}, "points at another update"),
        (
            {"receipts": {"m1": ["DELIVERED"], "m2": ["DELIVERED"]}},
            "no DELIVERED receipt for update",
        ),
    ],
)
def test_the_audit_sees_a_bad_update(overrides: dict[str, object], problem: str) -> None:
    r = _audit_with_grouped().report(_grouped(**overrides), "bad update")
    assert r.lost >= 1 and any(problem in p for p in r.problems), r.problems
