"""Serde: every schema round-trips, the wire format is Confluent's, errors name the record."""

from __future__ import annotations

import dataclasses
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


def _fastavro_bytes(record: Any) -> bytes:
    import io

    import fastavro

    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / type(record).SCHEMA).read_text()))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record.to_avro())
    return buf.getvalue()


def _edge_records() -> list[Any]:
    """Values where a hand-written Avro writer could go wrong: lengths at varint boundaries,
    multi-byte UTF-8, empty and absent strings, negative and large longs, timestamps before
    the epoch, with microseconds, in other zones."""
    from datetime import timedelta, timezone

    out: list[Any] = list(SAMPLES)
    stamps = [
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1900, 1, 1, tzinfo=UTC),
        datetime(2262, 1, 1, 0, 0, 0, 1500, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 0, 0, 999, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
        datetime(1970, 1, 1, tzinfo=UTC),
    ]
    texts = [
        "",
        "é",
        "日本🚀",
        "x" * 63,
        "x" * 64,
        "é" * 32,
        "w" * 4095,
        "v" * 4096,
        "y" * 8191,
        "z" * 8192,
        "q" * 70_000,
    ]
    for n, (stamp, text) in enumerate(zip(stamps * 2, texts, strict=False)):
        out.append(SlackMessage(text, "p", text, text, text, text, text, stamp))
        out.append(SlackUser(text, text, stamp, None if n % 2 else text))
        out.append(SlackDeliveryReceipt(text, text, "DRY_RUN", -(2**31) + n, stamp, text, None))
        out.append(ProducerCursor(text, stamp, text, stamp, [0, -1, 2**63 - 1, -(2**63)][n % 4]))
    return out


def _flat(record_type: type[Any]) -> bool:
    from libs.serde.avro import flat_layout, load_schema_text

    return flat_layout(load_schema_text(record_type.SCHEMA)) is not None


def test_the_enricher_output_takes_the_direct_writer() -> None:
    assert _flat(SlackMessage)
    assert not _flat(ProducerCursor)  # timestamp-micros: fastavro writes it


@pytest.mark.parametrize("record", _edge_records(), ids=lambda r: type(r).__name__)
def test_direct_writer_gives_fastavros_bytes(record: Any) -> None:
    encoded = AvroSerializer(InMemorySchemaRegistry(), type(record))("t", record)
    assert encoded[5:] == _fastavro_bytes(record)


def test_timestamps_of_one_millisecond_in_a_row_are_written_as_fastavro_writes_each() -> None:
    """The writer keeps the last timestamp's bytes: the same millisecond reached through other
    microseconds or zones, or a different one next, is still each value's own."""
    from datetime import timedelta, timezone

    encode = AvroSerializer(InMemorySchemaRegistry(), SlackMessage)
    plus2 = timezone(timedelta(hours=2))
    stamps = [
        T0,
        T0.replace(microsecond=999),
        T0.astimezone(plus2),
        T0 + timedelta(milliseconds=1),
        T0,
        T0 - timedelta(microseconds=1),
        datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        T0,
    ]
    for stamp in stamps:
        record = SlackMessage("m", "p", "c", "t", "[]", "o", "e", stamp)
        assert encode("t", record)[5:] == _fastavro_bytes(record), stamp


def test_direct_writer_falls_back_on_values_it_does_not_handle() -> None:
    from libs.serde import SerializationError

    naive = datetime(2026, 1, 1, 12, 0)  # fastavro's local-time rule decides, as before
    record = SlackMessage("m", "p", "c", "t", "[]", "o", "e", naive)
    encode = AvroSerializer(InMemorySchemaRegistry(), SlackMessage)
    assert encode("t", record)[5:] == _fastavro_bytes(record)
    with pytest.raises(SerializationError):
        encode("t", SlackMessage("m", "p", None, "t", "[]", "o", "e", T0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record", [r for r in _edge_records() if _flat(type(r))], ids=lambda r: type(r).__name__
)
def test_the_generated_writer_gives_the_direct_writers_bytes(record: Any) -> None:
    from libs.serde.avro import flat_layout, flat_writer, load_schema_text, write_flat

    layout = flat_layout(load_schema_text(type(record).SCHEMA))
    assert layout is not None
    parts = [b"head"]
    write_flat(layout, record, parts)
    assert flat_writer(layout)(b"head", record) == b"".join(parts)
    strings = [n for n, _ in layout if isinstance(getattr(record, n), str)][:2]
    given = flat_writer(layout, strings)
    utf8 = [getattr(record, n).encode() for n in strings]
    assert given(b"head", record, *utf8) == given(b"head", record, *[None] * len(utf8))
    assert given(b"head", record, *utf8) == b"".join(parts)
    assert given(b"head", record) == b"".join(parts)  # the UTF-8 left out: encoded here


def _no_fastavro_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastavro

    def not_fastavro(*args: object, **kwargs: object) -> None:
        raise AssertionError("written by fastavro's writer")

    monkeypatch.setattr(fastavro, "schemaless_writer", not_fastavro)


@pytest.mark.parametrize(
    "record", [r for r in _edge_records() if _flat(type(r))], ids=lambda r: type(r).__name__
)
def test_a_flat_record_is_written_by_the_generated_writer_whichever_way_it_is_called(
    record: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libs.serde.avro as avro

    expected = _fastavro_bytes(record)

    def not_write_flat(*args: object) -> None:
        raise AssertionError("written by write_flat, not the generated writer")

    # write_flat is the reference, not a second writer of the same layout
    monkeypatch.setattr(avro, "write_flat", not_write_flat)
    _no_fastavro_writer(monkeypatch)
    plain = AvroSerializer(InMemorySchemaRegistry(), type(record))
    assert plain("t", record)[5:] == expected
    assert plain.encode("t", record)[5:] == expected
    if isinstance(record, SlackMessage):
        given = AvroSerializer(InMemorySchemaRegistry(), SlackMessage, utf8_fields=("blocks",))
        # without the UTF-8 arguments: the same generated writer, not fastavro
        assert given("t", record)[5:] == expected
        assert given.encode("t", record)[5:] == expected


def test_encode_with_utf8_gives_the_serializers_bytes_and_falls_back_as_it_does() -> None:
    from libs.serde import SerializationError

    encode = AvroSerializer(InMemorySchemaRegistry(), SlackMessage, utf8_fields=("blocks",))
    for record in [r for r in _edge_records() if isinstance(r, SlackMessage)]:
        expected = encode("t", record)
        assert encode.encode("t", record, record.blocks.encode()) == expected
        assert encode.encode("t", record, None) == expected
    naive = datetime(2026, 1, 1, 12, 0)  # fastavro's local-time rule decides, as before
    record = SlackMessage("m", "p", "c", "t", "[]", "o", "e", naive)
    assert encode.encode("t", record, b"[]") == encode("t", record)
    with pytest.raises(SerializationError):
        encode.encode("t", SlackMessage("m", "p", None, "t", "[]", "o", "e", T0), b"[]")  # type: ignore[arg-type]
    with pytest.raises(SerializationError):  # a lone surrogate has no UTF-8: as __call__
        encode.encode("t", SlackMessage("m", "p", "\ud800", "t", "[]", "o", "e", T0), None)
    with pytest.raises(ValueError):
        AvroSerializer(InMemorySchemaRegistry(), SlackMessage, utf8_fields=("created_at",))


def _fastavro_record(record_type: type[Any], body: bytes) -> Any:
    import io

    import fastavro

    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / record_type.SCHEMA).read_text()))
    return record_type.from_avro(fastavro.schemaless_reader(io.BytesIO(body), schema, None))


def test_the_enricher_inputs_take_the_direct_reader() -> None:
    for record_type in (ConnectorStatusChanged, OnboardingStarted, CsdrAssignment, SlackUser):
        assert _flat(record_type)


def _framed_edge_records() -> list[Any]:
    # the direct reader's records: every flat type, at the writer's edge values (timestamps
    # come back in UTC and to the millisecond, as fastavro gives them)
    edge = [r for r in _edge_records() if _flat(type(r))]
    long_text = "é" * 40 + "\x00" + "🚀" * 3000
    edge.append(CsdrAssignment(long_text, "", long_text, T0, None))
    edge.append(OnboardingStarted("", "o", "n", "p", T0, "s", None))
    edge.append(OnboardingStarted("e", "o", "n", "p", T0, "s", ""))
    return edge


@pytest.mark.parametrize("record", _framed_edge_records(), ids=lambda r: type(r).__name__)
def test_direct_reader_gives_fastavros_records(record: Any) -> None:
    registry = InMemorySchemaRegistry()
    framed = AvroSerializer(registry, type(record))("t", record)
    decode = AvroDeserializer(registry, type(record))
    first = decode(framed, topic="t", partition=0, offset=0)  # resolves the id: fastavro
    again = decode(framed, topic="t", partition=0, offset=1)  # the direct reader
    expected = _fastavro_record(type(record), framed[5:])
    assert first == again == expected
    stamps = [v for v in (getattr(again, n) for n in again.__slots__) if isinstance(v, datetime)]
    assert all(s.tzinfo is UTC for s in stamps)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # the last timestamp byte missing
        lambda b: b[:9],  # a string cut short
        lambda b: b[:5],  # no body at all
        lambda b: b[:5] + b"\x03" + b[6:],  # a negative string length
        lambda b: b[:5] + b"\x08\xff\xfe\xfd\xfc" + b[10:],  # not UTF-8
    ],
)
def test_direct_reader_refuses_what_fastavro_refuses(damage: Any) -> None:
    registry = InMemorySchemaRegistry()
    user = SlackUser("ana@example.com", "U1", T0, "Ana")
    framed = AvroSerializer(registry, SlackUser)("t", user)
    decode = AvroDeserializer(registry, SlackUser)
    assert decode(framed, topic="t", partition=0, offset=0) == user
    bad = damage(framed)
    with pytest.raises(Exception):  # noqa: B017 (whatever fastavro raises on it)
        _fastavro_record(SlackUser, bad[5:])
    with pytest.raises(DeserializationError, match="cannot decode SlackUser with schema 1"):
        decode(bad, topic="t", partition=3, offset=7)


def test_direct_reader_refuses_a_union_index_out_of_range() -> None:
    registry = InMemorySchemaRegistry()
    user = SlackUser("a", "U1", T0, None)
    framed = AvroSerializer(registry, SlackUser)("t", user)
    decode = AvroDeserializer(registry, SlackUser)
    decode(framed, topic="t", partition=0, offset=0)
    # email "a", id "U1", then display_name's union index: 2 (zig-zag 4) does not exist
    bad = framed[:10] + b"\x04" + framed[11:]
    assert framed[10] == 0
    with pytest.raises(DeserializationError, match="union index"):
        decode(bad, topic="t", partition=0, offset=0)


def _damaged(framed: bytes) -> list[bytes]:
    """``framed`` cut short (in its first 60 bytes and its last 3), and with each of its
    body's first 35 bytes replaced by a few values (varint continuations, negative lengths,
    union indexes, invalid UTF-8)."""
    cuts = {*range(5, min(len(framed), 60)), *range(max(5, len(framed) - 3), len(framed))}
    out = [framed[:cut] for cut in sorted(cuts)]
    for at in range(5, min(len(framed), 40)):
        out += [framed[:at] + bytes((b,)) + framed[at + 1 :] for b in (0x01, 0x03, 0x04, 0xFF)]
    return out


@pytest.mark.parametrize("record", _framed_edge_records(), ids=lambda r: type(r).__name__)
def test_the_generated_reader_reads_what_read_flat_reads(record: Any) -> None:
    """Same records on good bodies; on damaged ones the same error (type and text) or, where
    read_flat reads a record from them, the same record."""
    from libs.serde.avro import _generated_reader, flat_layout, load_schema_text, read_flat

    record_type = type(record)
    layout = flat_layout(load_schema_text(record_type.SCHEMA))
    assert layout is not None
    read = _generated_reader(layout, record_type)
    assert read is not None
    framed = AvroSerializer(InMemorySchemaRegistry(), record_type)("t", record)
    assert read(framed, 5) == record_type(**read_flat(layout, framed, 5))
    for bad in _damaged(framed):
        try:
            expected: Any = record_type(**read_flat(layout, bad, 5))
        except Exception as exc:  # whatever read_flat raises, the same
            expected = (type(exc), str(exc))
        try:
            got: Any = read(bad, 5)
        except Exception as exc:
            got = (type(exc), str(exc))
        assert got == expected, bad


def test_the_generated_reader_calls_a_record_type_that_does_more_than_set_its_fields() -> None:
    """Records are built through their slots only where ``__init__`` would do no more; a
    type with its own ``__init__`` or a ``__post_init__`` is called as it always was."""
    from libs.serde.avro import _generated_reader, flat_layout, load_schema_text
    from libs.serde.records import slot_setters

    layout = flat_layout(load_schema_text(SlackUser.SCHEMA))
    assert layout is not None
    names = ["email", "slack_user_id", "updated_at", "display_name"]
    assert slot_setters(SlackUser, names) is not None
    framed = AvroSerializer(InMemorySchemaRegistry(), SlackUser)("t", SlackUser("A", "U1", T0))

    @dataclasses.dataclass(frozen=True, slots=True)
    class Lowered:
        email: str
        slack_user_id: str
        updated_at: datetime
        display_name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "email", self.email.lower())

    @dataclasses.dataclass(frozen=True, slots=True)
    class Counted:
        email: str
        slack_user_id: str
        updated_at: datetime
        display_name: str | None

        def __init__(self, *values: Any) -> None:
            for name, value in zip(names, values, strict=True):
                object.__setattr__(self, name, value)
            calls.append(values[0])

    @dataclasses.dataclass(slots=True)
    class Mutable:
        email: str
        slack_user_id: str
        updated_at: datetime
        display_name: str | None = None

    calls: list[str] = []
    for record_type in (Lowered, Counted, Mutable):
        assert slot_setters(record_type, names) is None
    for record_type, email in ((Lowered, "a"), (Counted, "A"), (Mutable, "A")):
        read = _generated_reader(layout, record_type)
        assert read is not None
        assert read(framed, 5) == record_type(email, "U1", T0, None)
    assert calls == ["A", "A"]  # the reader's and the expected value's


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_a_positional_builder_builds_what_the_type_builds(record: Any) -> None:
    from libs.serde import positional_builder

    record_type = type(record)
    build = positional_builder(record_type)
    assert build is not record_type  # every record type is built through its slots
    values = [getattr(record, f.name) for f in dataclasses.fields(record)]
    built = build(*values)
    assert type(built) is record_type and built == record_type(*values) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(record)[0].name, "x")


def test_a_positional_builder_is_the_type_when_its_init_does_more() -> None:
    from libs.serde import positional_builder

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        name: str

        def __post_init__(self) -> None:
            if not self.name:
                raise ValueError("empty")

    @dataclasses.dataclass(frozen=True, slots=True)
    class KeywordOnly:
        name: str = dataclasses.field(kw_only=True)

    assert positional_builder(Checked) is Checked
    assert positional_builder(KeywordOnly) is KeywordOnly
    assert positional_builder(dict) is dict


def test_a_record_type_not_built_from_its_fields_keeps_read_flat() -> None:
    from libs.serde.avro import _generated_reader, flat_layout, load_schema_text

    layout = flat_layout(load_schema_text(SlackUser.SCHEMA))
    assert _generated_reader(layout, SlackUser) is not None
    assert _generated_reader(None, SlackUser) is None
    assert _generated_reader(layout, CsdrAssignment) is None  # other fields
    assert _generated_reader(layout, dict) is None  # not a dataclass
