"""Serde: every schema round-trips, the wire format is Confluent's, errors name the record."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.serde import (
    ALL_RECORDS,
    SCHEMA_DIR,
    AvroDeserializer,
    AvroSerializer,
    ConnectorStatusChanged,
    CsdrAssignment,
    DeserializationError,
    InMemorySchemaRegistry,
    OnboardingStarted,
    ProducerCursor,
    SlackDeliveryReceipt,
    SlackMessage,
    SlackUser,
    decode_key,
    encode_key,
)

T0 = datetime(2026, 11, 25, 8, 30, 15, 123000, tzinfo=UTC)

SAMPLES: list[Any] = [
    ConnectorStatusChanged(
        "ev-1",
        "org-1",
        "env-1",
        "lkc-1",
        "lcc-1",
        "orders-cdc",
        "PostgresCdcSource",
        "PROVISIONING",
        "FAILED",
        T0,
        "auth failed",
    ),
    ConnectorStatusChanged(
        "ev-2",
        "org-1",
        "env-1",
        "lkc-1",
        "lcc-1",
        "orders-cdc",
        "PostgresCdcSource",
        "RUNNING",
        "PAUSED",
        T0,
    ),
    OnboardingStarted("ev-3", "org-2", "Acme", "ENTERPRISE", T0, "onboarding", "AWS"),
    OnboardingStarted("ev-4", "org-2", "Acme", "FREE", T0, "onboarding"),
    CsdrAssignment("org-2", "Acme", "ana@example.com", T0, "Ana"),
    SlackUser("ana@example.com", "U123", T0, "ana"),
    SlackMessage("m-1", "onboarding-started", "U123", "hi", "[]", "org-2", "ev-3", T0),
    SlackDeliveryReceipt("m-1", "U123", "DELIVERED", 2, T0, "1700000000.000100"),
    SlackDeliveryReceipt("m-2", "U123", "FAILED", 1, T0, None, "channel_not_found"),
    ProducerCursor(
        "onboarding-started", datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "org-9", T0, 42
    ),
]


def test_every_schema_file_has_a_record_type() -> None:
    files = {p.name for p in SCHEMA_DIR.glob("*.avsc")}
    assert files == {r.SCHEMA for r in ALL_RECORDS}


def test_record_fields_match_schema_fields() -> None:
    import dataclasses

    for record in ALL_RECORDS:
        schema = json.loads((SCHEMA_DIR / record.SCHEMA).read_text())
        assert {f["name"] for f in schema["fields"]} == {
            f.name
            for f in dataclasses.fields(record)  # type: ignore[arg-type]
        }, record.__name__


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record: Any) -> None:
    registry = InMemorySchemaRegistry()
    encoded = AvroSerializer(registry, type(record))("topic-a", record)
    magic, schema_id = struct.unpack(">bI", encoded[:5])
    assert magic == 0
    assert registry.subjects() == {"topic-a-value": [schema_id]}
    decoded = AvroDeserializer(registry, type(record))(
        encoded, topic="topic-a", partition=0, offset=0
    )
    assert decoded == record


def test_reader_resolves_an_older_writer_schema() -> None:
    """A record written before a field was added decodes with the field's default."""
    registry = InMemorySchemaRegistry()
    old = json.loads((SCHEMA_DIR / "slack_user.avsc").read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] != "display_name"]
    old_id = registry.register("users-value", json.dumps(old))
    import io

    import fastavro

    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, old_id))
    fastavro.schemaless_writer(
        buf, fastavro.parse_schema(old), {"email": "a@b.c", "slack_user_id": "U1", "updated_at": T0}
    )
    user = AvroDeserializer(registry, SlackUser)(
        buf.getvalue(), topic="users", partition=0, offset=7
    )
    assert user == SlackUser("a@b.c", "U1", T0, None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "null value"),
        (b"", "not Confluent wire format"),
        (b'{"json": true}', "not Confluent wire format"),
        (struct.pack(">bI", 0, 999) + b"\x02", "writer schema 999 unavailable"),
    ],
)
def test_decode_errors_name_topic_partition_offset(data: bytes | None, reason: str) -> None:
    deserialize = AvroDeserializer(InMemorySchemaRegistry(), SlackUser)
    with pytest.raises(DeserializationError) as info:
        deserialize(data, topic="data-slack-users", partition=4, offset=1234)
    assert reason in str(info.value)
    assert "topic=data-slack-users partition=4 offset=1234" in str(info.value)
    assert (info.value.topic, info.value.partition, info.value.offset) == (
        "data-slack-users",
        4,
        1234,
    )


def test_truncated_body_is_a_deserialization_error() -> None:
    registry = InMemorySchemaRegistry()
    good = AvroSerializer(registry, CsdrAssignment)("t", SAMPLES[4])
    with pytest.raises(DeserializationError, match="cannot decode CsdrAssignment"):
        AvroDeserializer(registry, CsdrAssignment)(good[:9], topic="t", partition=0, offset=3)


def test_keys_are_utf8_strings() -> None:
    assert encode_key("ana@example.com") == b"ana@example.com"
    assert decode_key(b"org-\xc3\xa9", topic="t", partition=0, offset=0) == "org-é"
    with pytest.raises(DeserializationError, match="not UTF-8"):
        decode_key(b"\xff\xfe", topic="t", partition=1, offset=2)
    with pytest.raises(DeserializationError, match="no key"):
        decode_key(None, topic="t", partition=1, offset=2)
