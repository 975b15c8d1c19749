"""Golden corpus: the enricher's output is byte-identical to what it produced before.

The corpus (``tests/support/enricher_corpus.py``) covers every pipeline, dm, fallback and
dropped misses, filtered events, mrkdwn escaping, URL quoting (unicode, spaces, ``&<>|``) and
truncation at Slack's limits. A performance change that alters one byte of any alert fails
here; an intended change of output regenerates the file and shows up in review as its diff.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from libs.serde import AvroDeserializer, AvroSerializer, InMemorySchemaRegistry, SlackMessage
from services.enricher.core import Alert, Drop, Miss, process, slack_user_key
from services.enricher.handler import EventHandler
from tests.support.enricher_corpus import (
    GOLDEN,
    NOW,
    Case,
    ConsumedRecord,
    DictLookup,
    ListEmitter,
    cases,
    digest,
)

OUT_TOPIC = "slack-messages"


def run_case(case: Case, registry: InMemorySchemaRegistry) -> dict[str, Any]:
    """What the enricher makes of one case, as the golden file records it.

    The bytes come from ``EventHandler``, the code the service runs per event; the core's
    ``route`` is asked too, for what the handler only counts (drop and miss reasons).
    """
    topic = str(case.pipeline.source_topic_setting)
    wire = AvroSerializer(registry, case.pipeline.record_type)(topic, case.event)
    handler = EventHandler(
        registry,
        {topic: case.pipeline},
        DictLookup({case.event.org_id: case.owner} if case.owner else {}),
        DictLookup(
            {slack_user_key(case.owner.csdr_email): case.user} if case.owner and case.user else {}
        ),
        out_topic=OUT_TOPIC,
        fallback_channel=case.fallback,
        clock=lambda: NOW,
    )
    out = ListEmitter()
    handler(ConsumedRecord(topic, wire), out)  # type: ignore[arg-type]
    event = AvroDeserializer(registry, case.pipeline.record_type)(
        wire, topic=topic, partition=0, offset=0
    )
    # the core's own answer (filter, lookups, route), independent of the handler's shell
    owners = DictLookup({event.org_id: case.owner} if case.owner else {})
    users = DictLookup(
        {slack_user_key(case.owner.csdr_email): case.user} if case.owner and case.user else {}
    )
    outcome = process(
        event,
        pipeline=case.pipeline,
        owners=owners,
        users=users,
        now=NOW,
        fallback_channel=case.fallback,
    )
    if isinstance(outcome, Drop):
        assert out.records == []
        return {"outcome": "drop", "reason": outcome.reason}
    if isinstance(outcome, Miss):
        assert out.records == []
        return {"outcome": "miss", "reason": outcome.reason, "detail": outcome.detail}
    assert isinstance(outcome, Alert)
    [(out_topic, key, value)] = out.records
    assert out_topic == OUT_TOPIC and key is not None and value is not None
    message = AvroDeserializer(registry, SlackMessage)(
        value, topic=OUT_TOPIC, partition=0, offset=0
    )
    # created_at goes over the wire in milliseconds
    assert message == dataclasses.replace(outcome.message, created_at=message.created_at)
    result: dict[str, Any] = {
        "outcome": "alert",
        "miss": outcome.miss,
        "key": key.decode(),
        "avro_sha256": digest(value),
    }
    if not case.name.startswith("random/"):
        # readable for review; the random sample is pinned by its digest alone
        result.update(text=message.text, blocks=message.blocks)
    return result


def run_corpus() -> dict[str, dict[str, Any]]:
    """Every case's result by name (one registry, so schema ids are stable)."""
    registry = InMemorySchemaRegistry()
    return {case.name: run_case(case, registry) for case in cases()}


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


def test_corpus_matches_golden_file(golden: dict[str, dict[str, Any]]) -> None:
    actual = run_corpus()
    assert sorted(actual) == sorted(golden), "the corpus changed: regenerate and review"
    different = [name for name in golden if actual[name] != golden[name]]
    if different:
        first = different[0]
        for field in golden[first]:
            assert actual[first].get(field) == golden[first][field], (
                f"{len(different)} cases differ, first {first!r} in {field!r}"
            )
    assert not different


def test_corpus_covers_what_it_claims(golden: dict[str, dict[str, Any]]) -> None:
    """Guards the corpus itself: each behaviour it exists for is actually in it."""
    results = list(golden.values())
    alerts = [r for r in results if r["outcome"] == "alert"]
    assert {r["outcome"] for r in results} == {"alert", "drop", "miss"}
    assert {r["miss"] for r in alerts} == {None, "no_owner", "no_slack_user"}
    assert {r["reason"] for r in results if r["outcome"] == "miss"} == {
        "no_owner",
        "no_slack_user",
    }
    shown = [r for r in alerts if "blocks" in r]
    assert any("truncated" in r["blocks"] for r in shown)
    assert any("truncated" in r["text"] for r in shown)
    assert any("&lt;!channel&gt;" in r["blocks"] for r in shown)
    assert any("%F0%9F%9A%80" in r["blocks"] for r in shown)  # an astral emoji, quoted
    assert any("%20" in r["blocks"] and "%26" in r["blocks"] for r in shown)
    for r in shown:
        blocks = json.loads(r["blocks"])
        assert len(blocks) <= 50
        for block in blocks:
            text = block.get("text", {}).get("text", "")
            assert len(text) <= (150 if block["type"] == "header" else 3000)
        assert len(r["text"]) <= 1500
