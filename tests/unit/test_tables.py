"""Tables without a broker: the store contract, header checks, get-time decode failures, marks."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    CsdrAssignment,
    DeserializationError,
    InMemorySchemaRegistry,
    RegistryError,
    SlackUser,
)
from libs.tables import GlobalTable, InMemoryStore, RocksDictStore, TableStore, avro_table
from libs.tables.global_table import UNDECODABLE

T0 = datetime(2026, 11, 25, tzinfo=UTC)
TOPIC = "data-slack-users"


class HttpError(Exception):
    """What the registry client raises, with the HTTP status the registry answered."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status_code = status


class AnsweringRegistry(InMemorySchemaRegistry):
    """An in-memory registry that answers 404 for unknown ids, or is down (HTTP 503)."""

    down = False

    def schema_by_id(self, schema_id: int) -> str:
        if self.down:
            raise RegistryError("registry unavailable") from HttpError(503)
        try:
            return super().schema_by_id(schema_id)
        except RegistryError:
            raise RegistryError(f"schema id {schema_id} not found") from HttpError(404)


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TableStore]:
    s: TableStore = (
        InMemoryStore()
        if request.param == "memory"
        else RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"})
    )
    s.open()
    yield s
    s.close()


# -- the store contract: both implementations ------------------------------------------------
def test_store_writes_values_and_offsets_together(store: TableStore) -> None:
    store.write([(b"a", b"1"), (b"b", b"2")], {0: 2})
    store.write([(b"a", None), (b"c", b"3")], {0: 4, 1: 1})
    assert [store.get(k) for k in (b"a", b"b", b"c")] == [None, b"2", b"3"]
    assert store.offsets() == {0: 4, 1: 1}
    # an estimate: RocksDB may count the deleted key until a compaction drops it
    assert store.estimate_keys() in (2, 3)


def test_store_wipe_forgets_data_and_offsets(store: TableStore) -> None:
    store.write([(b"a", b"1")], {2: 7})
    store.wipe("test")
    assert store.get(b"a") is None and store.offsets() == {}
    store.write([(b"b", b"2")], {2: 1})
    assert store.get(b"b") == b"2"


def test_rocksdb_store_keeps_offsets_across_a_reopen(tmp_path: Path) -> None:
    s = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"})
    s.open()
    s.write([(b"k", b"v")], {0: 11, 2: 5})
    s.close()
    s.open()
    assert s.offsets() == {0: 11, 2: 5} and s.get(b"k") == b"v"
    s.close()
    changed = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "2"})
    changed.open()  # another format: rebuilt from nothing
    assert changed.offsets() == {} and changed.get(b"k") is None
    changed.close()


# -- the header check ---------------------------------------------------------------------------
def test_check_header_validates_without_decoding() -> None:
    registry = AnsweringRegistry()
    value = AvroSerializer(registry, SlackUser)(TOPIC, SlackUser("a@x", "U1", T0))
    decoder = AvroDeserializer(registry, SlackUser)
    schema_id = decoder.check_header(value, topic=TOPIC, partition=0, offset=1)
    assert schema_id == struct.unpack(">I", value[1:5])[0]
    # the payload is not looked at: a truncated body passes the header check, not decoding
    assert decoder.check_header(value[:5], topic=TOPIC, partition=0, offset=1) == schema_id
    with pytest.raises(DeserializationError):
        decoder(value[:5], topic=TOPIC, partition=0, offset=1)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"garbage", "not Confluent wire format"),
        (b"\x00\x00\x00", "not Confluent wire format"),
        (b"\x00\x00\x01\x86\xa0payload", "writer schema 100000 unavailable"),
    ],
)
def test_check_header_rejects_poison(value: bytes, reason: str) -> None:
    decoder = AvroDeserializer(AnsweringRegistry(), SlackUser)
    with pytest.raises(DeserializationError, match=reason) as info:
        decoder.check_header(value, topic=TOPIC, partition=1, offset=9)
    # an id the registry answers 404 for is the record's fault: poison, not "retry later"
    assert not info.value.registry_unavailable


def test_check_header_when_the_registry_is_down_is_not_poison() -> None:
    registry = AnsweringRegistry()
    value = AvroSerializer(registry, SlackUser)(TOPIC, SlackUser("a@x", "U1", T0))
    registry.down = True
    with pytest.raises(DeserializationError) as info:
        AvroDeserializer(registry, SlackUser).check_header(
            value, topic=TOPIC, partition=0, offset=0
        )
    assert info.value.registry_unavailable


# -- get ---------------------------------------------------------------------------------------
def _table(registry: AnsweringRegistry, tmp_path: Path) -> GlobalTable[SlackUser]:
    table = avro_table(
        SlackUser,
        name="users",
        topic=TOPIC,
        state_dir=tmp_path,
        consumer_config={"bootstrap.servers": "127.0.0.1:1"},
        registry=registry,
        store=InMemoryStore(),
    )
    table.open()
    return table


def test_get_answers_an_undecodable_value_as_absent_and_counts_it(tmp_path: Path) -> None:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    table = _table(registry, tmp_path)
    good = encode(TOPIC, SlackUser("a@x", "U1", T0))
    table.put_local("a@x", good)
    table.put_local("bad@x", good[:5] + b"\xff\xff\xff")  # a valid header, a corrupt body
    before = UNDECODABLE.labels("users")._value.get()
    assert table.get("a@x") == SlackUser("a@x", "U1", T0)
    assert table.get("bad@x") is None
    assert table.get("bad@x") is None
    assert table.get("nobody@x") is None
    assert table.undecodable_reads == 2
    assert table.status()["undecodable_reads"] == 2
    assert UNDECODABLE.labels("users")._value.get() - before == 2


def test_get_raises_when_the_registry_cannot_answer(tmp_path: Path) -> None:
    """The value is fine and only the registry is missing: the caller retries, nothing is
    counted as undecodable."""
    writer = AnsweringRegistry()
    value = AvroSerializer(writer, SlackUser)(TOPIC, SlackUser("a@x", "U1", T0))
    reader = AnsweringRegistry()
    reader.down = True
    table = _table(reader, tmp_path)
    table.put_local("a@x", value)
    with pytest.raises(DeserializationError) as info:
        table.get("a@x")
    assert info.value.registry_unavailable and table.undecodable_reads == 0


def test_get_after_a_header_check_needs_no_registry(tmp_path: Path) -> None:
    """Restore fetched the writer schema once; a later lookup decodes while it is down."""
    registry = AnsweringRegistry()
    value = AvroSerializer(registry, CsdrAssignment)(
        TOPIC, CsdrAssignment("org-1", "Org", "a@x", T0)
    )
    decoder = AvroDeserializer(registry, CsdrAssignment)
    decoder.check_header(value, topic=TOPIC, partition=0, offset=0)
    registry.down = True
    assert decoder(value, topic=TOPIC, partition=0, offset=0).org_id == "org-1"


# -- positions and marks -------------------------------------------------------------------
def test_caught_up_to_compares_positions_with_marks(tmp_path: Path) -> None:
    store = InMemoryStore()
    table = avro_table(
        SlackUser,
        name="users",
        topic=TOPIC,
        state_dir=tmp_path,
        consumer_config={"bootstrap.servers": "127.0.0.1:1"},
        registry=AnsweringRegistry(),
        store=store,
    )
    store.write([(b"k", b"v")], {0: 10, 1: 4})
    table.open()
    assert table.positions() == {0: 10, 1: 4}
    assert table.caught_up_to({0: 10, 1: 4})
    assert table.caught_up_to({0: 9, 1: 0, 2: 0})  # an empty partition: mark 0
    assert not table.caught_up_to({0: 11, 1: 4})
    assert not table.caught_up_to({2: 1})
