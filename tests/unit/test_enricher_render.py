"""Block Kit rendering: Slack's limits, escaping, truncation; accepted by the fake Slack."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator
from typing import Any

import pytest
from slack_sdk import WebClient

from libs.serde import SlackMessage
from services.enricher.core import Alert, route
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING
from services.enricher.render import (
    MAX_BLOCKS,
    MAX_FALLBACK_TEXT,
    MAX_FIELD_TEXT,
    MAX_HEADER_TEXT,
    MAX_SECTION_TEXT,
    Detail,
    Fact,
    Link,
    Mrkdwn,
    Note,
    blocks,
    escape,
    fallback_text,
    fit,
    quote_url_value,
)
from tests.support.fake_slack import FakeSlack
from tests.unit.test_enricher_core import NOW, connector_event, onboarding_event, owner, user

TOKEN = "xoxb-test"
HOSTILE = "<!channel> Acme & <Sons> <@U123|ceo> <https://evil.example|click>"
ERROR_50K = "java.lang.IllegalStateException: <bad> & worse\n" + "x" * 50_000


def mrkdwn_texts(node: Any) -> Iterator[str]:
    """Every mrkdwn text in a block structure."""
    if isinstance(node, dict):
        if node.get("type") == "mrkdwn" and isinstance(node.get("text"), str):
            yield node["text"]
        for value in node.values():
            yield from mrkdwn_texts(value)
    elif isinstance(node, list):
        for item in node:
            yield from mrkdwn_texts(item)


def hostile_messages() -> list[SlackMessage]:
    """Alerts built from the worst inputs: huge error, names with control characters."""
    bad_owner = owner()
    bad_owner = type(bad_owner)(
        org_id="org-1",
        org_name=HOSTILE + " " + "N" * 500,
        csdr_email="jane.doe@example.com",
        updated_at=bad_owner.updated_at,
        csdr_name="<!here> Jane",
    )
    events: list[tuple[Any, Any]] = [
        (connector_event(error=ERROR_50K, name=HOSTILE), CONNECTOR),
        (connector_event(error=None, name="x" * 5000), CONNECTOR),
        (connector_event(error="```injected``` code fence & <tags>"), CONNECTOR),
        (onboarding_event(), ONBOARDING),
    ]
    out = []
    for event, pipeline in events:
        for who, fallback in ((bad_owner, None), (None, "C0FALLBACK")):
            outcome = route(
                event,
                who,
                user() if who else None,
                pipeline=pipeline,
                now=NOW,
                fallback_channel=fallback,
            )
            assert isinstance(outcome, Alert)
            out.append(outcome.message)
    return out


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a & b", "a &amp; b"),
        ("<!channel>", "&lt;!channel&gt;"),
        ("plain *bold* _it_", "plain *bold* _it_"),
        ("&amp;", "&amp;amp;"),
        ("", ""),
    ],
)
def test_escape(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped


@pytest.mark.parametrize(
    ("value", "limit"),
    [("x" * 50_000, 3000), ("&" * 5000, 2000), ("<>" * 100, 101), ("short", 3000), ("é" * 50, 40)],
)
def test_fit_never_exceeds_the_limit_nor_splits_an_escape(value: str, limit: int) -> None:
    out = fit(value, limit)
    assert len(out) <= limit
    if len(escape(value)) <= limit:
        assert out == escape(value)
        return
    assert out.endswith(f"(truncated, {len(value):,} chars)")
    head = out[: out.rindex("…")]
    assert re.fullmatch(r"([^&<>]|&amp;|&lt;|&gt;)*", head), head[-20:]


def test_fit_below_the_marker_length_uses_an_ellipsis() -> None:
    assert fit("abcdef&", 3) == "ab…"
    assert fit("&&&&", 3) == "…"


def test_fit_marks_a_50k_error_visibly() -> None:
    out = fit(ERROR_50K, 2900)
    assert out.startswith("java.lang.IllegalStateException: &lt;bad&gt; &amp; worse")
    assert out.endswith("… (truncated, 50,047 chars)")


URL_UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def test_url_values_are_percent_encoded() -> None:
    assert quote_url_value("a b/c|d>e&f") == "a%20b%2Fc%7Cd%3Ee%26f"
    assert quote_url_value("lcc-Ok_1.2~") == "lcc-Ok_1.2~"
    assert quote_url_value("é") == "%C3%A9"


@pytest.mark.parametrize(
    "value",
    ["", "-", "org-1", "ORG1", "a.b", "a_b", "a~b", "-a-", "é1", "½", "a b", "a-b/c", "x\x00", "٣"],
)
def test_url_quoting_keeps_exactly_the_unreserved_characters(value: str) -> None:
    """The shortcuts for ASCII letters, digits and "-" answer what quoting byte by byte does."""
    expected = "".join(
        chr(b) if chr(b) in URL_UNRESERVED else f"%{b:02X}" for b in value.encode("utf-8")
    )
    assert quote_url_value(value) == expected


def test_hostile_inputs_stay_within_limits_and_are_escaped() -> None:
    for msg in hostile_messages():
        parsed = json.loads(msg.blocks)
        assert 0 < len(parsed) <= MAX_BLOCKS
        for block in parsed:
            if block["type"] == "header":
                assert block["text"]["type"] == "plain_text"
                assert 0 < len(block["text"]["text"]) <= MAX_HEADER_TEXT
            if block["type"] == "section" and "text" in block:
                assert 0 < len(block["text"]["text"]) <= MAX_SECTION_TEXT
            for f in block.get("fields", []):
                assert 0 < len(f["text"]) <= MAX_FIELD_TEXT
        for text in [*mrkdwn_texts(parsed), msg.text]:
            # the only '<' left open links we built ourselves, never a mention or a command
            assert "<!" not in text and "<@" not in text and "<https://evil" not in text
            for opened in re.findall(r"<([^>]*)>", text):
                assert opened.startswith("https://"), opened
        assert 0 < len(msg.text) <= MAX_FALLBACK_TEXT
        assert "*" not in msg.text.split("\n")[0]  # plain text: no markup in the fallback


def test_long_error_is_truncated_visibly_in_blocks_and_fallback() -> None:
    msg = hostile_messages()[0]
    [detail] = [b for b in json.loads(msg.blocks) if b.get("block_id") == "detail"]
    text = detail["text"]["text"]
    assert text.startswith("*Error*\n```java.lang.IllegalStateException: &lt;bad&gt; &amp; worse")
    assert text.endswith("… (truncated, 50,047 chars)```")
    assert "(truncated, 50,047 chars)" in msg.text


def test_code_fence_in_a_value_cannot_close_the_block_early() -> None:
    msg = hostile_messages()[4]
    [detail] = [b for b in json.loads(msg.blocks) if b.get("block_id") == "detail"]
    assert detail["text"]["text"].count("```") == 2


def test_note_limits_hold_for_oversized_notes() -> None:
    note = Note(
        title="T" * 400,
        summary=Mrkdwn("*{x}*", {"x": "<" * 4000}),
        facts=[Fact(f"label {i}", "v" * 3000) for i in range(15)],
        detail=Detail("Error", "e" * 10),
        steps=["step & more"] * 200,
        links=[
            Link("ok", "https://a.example/x?y=1&z=2"),
            Link("not a url", "javascript:alert(1)"),
            Link("huge", "https://a.example/" + "a" * 4000),
        ],
        warning="<!everyone> no owner",
        footer="f" * 5000,
    )
    out = blocks(note)
    assert len(out) <= MAX_BLOCKS
    [links] = [b for b in out if b.get("block_id") == "links"]
    assert links["text"]["text"] == "<https://a.example/x?y=1&amp;z=2|ok>"
    [facts] = [b for b in out if b.get("block_id") == "facts"]
    assert len(facts["fields"]) == 10
    assert fallback_text(note).startswith("&lt;!everyone&gt; no owner\n")


def test_rendered_messages_are_accepted_by_slack() -> None:
    messages = hostile_messages()
    with FakeSlack(token=TOKEN) as fake:
        client = WebClient(token=TOKEN, base_url=fake.base_url)
        for msg in messages:
            response = client.chat_postMessage(
                channel=msg.channel,
                text=msg.text,
                blocks=json.loads(msg.blocks),
                metadata={"event_type": "field_alert", "event_payload": {"id": msg.message_id}},
            )
            assert response["ok"] is True
        posts = fake.posts()
    assert len(posts) == len(messages)
    assert {p.channel for p in posts} == {"U0JANE", "C0FALLBACK"}
    assert all(p.blocks for p in posts)


def test_the_fake_slack_rejects_what_we_guard_against() -> None:
    """The limits above are Slack's: the fake answers invalid_blocks without the guards."""
    raw = [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * (MAX_SECTION_TEXT + 1)}}]
    with FakeSlack(token=TOKEN) as fake:
        client = WebClient(token=TOKEN, base_url=fake.base_url)
        from slack_sdk.errors import SlackApiError

        with pytest.raises(SlackApiError) as raised:
            client.chat_postMessage(channel="C1", text="t", blocks=raw)
        assert raised.value.response["error"] == "invalid_blocks"


def test_utc_minute_is_strftime_across_minutes_zones_and_naive_times() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from services.enricher.render import utc_minute

    base = datetime(2026, 11, 25, 9, 30, 59, 999_999, tzinfo=UTC)
    moments = [
        base,
        base - timedelta(seconds=59),  # same minute: the cached text
        base + timedelta(microseconds=1),  # the next minute
        base.astimezone(timezone(timedelta(hours=5, minutes=45))),  # same instant elsewhere
        base - timedelta(days=1),  # same clock minute, another day
        datetime(1969, 12, 31, 23, 59, 30, tzinfo=UTC),  # before the epoch
        datetime(5, 1, 2, 3, 4, tzinfo=UTC),  # strftime does not pad such years
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 11, 25, 9, 30),  # naive: local time, as astimezone() takes it
        base,
    ]
    for moment in moments:
        assert utc_minute(moment) == moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def test_links_of_no_field_are_rendered_once_per_pipeline() -> None:
    pipeline = CONNECTOR.with_link_templates(
        {"docs": "https://docs.example/{{literal}}?a=1&b=2", "crm": "not a url"}
    )
    plan = {label: constant for label, _, constant in pipeline.link_plan}
    assert plan["Connector docs"] == "<https://docs.example/{literal}?a=1&amp;b=2|Connector docs>"
    assert plan["CRM record"] == ""  # no field and not a URL: left out, once
    assert plan["Connector in Cloud Console"] is None  # uses fields: rendered per event
    broken = CONNECTOR.with_link_templates({"docs": "https://x/{"})
    assert {label: c for label, _, c in broken.link_plan}["Connector docs"] == ""  # malformed
    outcome = route(
        connector_event(), owner(), user(), pipeline=pipeline, now=NOW, fallback_channel=None
    )
    assert isinstance(outcome, Alert)
    parsed = json.loads(outcome.message.blocks)
    links = next(b for b in parsed if b["block_id"] == "links")["text"]["text"]
    assert "https://docs.example/{literal}?a=1&amp;b=2|Connector docs" in links
    assert "CRM record" not in links
