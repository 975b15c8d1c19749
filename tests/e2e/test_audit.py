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


def _post(channel: str, mid: str, text: str = "hi") -> StoredMessage:
    meta = {"event_type": "field_alert", "event_payload": {"message_id": mid}}
    return StoredMessage(channel=channel, ts="1.0", text=text, metadata=meta)


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
    assert (r.duplicates, r.lost, r.problems) == (0, 0, [])


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
            Report("b", inputs=1, missed=1, duplicates=1, notes=["kill -9 at 3s"]),
        ]
    )
    header, *_ = table.splitlines()
    assert header.split() == [
        "scenario",
        "inputs",
        "delivered",
        "filtered",
        "dead-lettered",
        "missed",
        "duplicates",
        "lost",
        "seconds",
    ]
    total = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert total.split() == ["TOTAL", "4", "1", "1", "1", "1", "1", "0", "2"]
    assert "b: kill -9 at 3s" in table
