"""Tables without a broker: the store contract, header checks, get-time decode failures, marks."""

from __future__ import annotations

import gc
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import REGISTRY as METRICS
from rocksdict import DBCompressionType

from libs.kafka import HEADER_SOURCE_OFFSET, DeadLetterPublisher, dlq_topic
from libs.kafka.memory import InMemoryBroker
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    CsdrAssignment,
    DeserializationError,
    InMemorySchemaRegistry,
    RegistryError,
    SlackUser,
)
from libs.tables import (
    GlobalTable,
    InMemoryStore,
    RocksDictStore,
    TableError,
    TableState,
    TableStore,
    avro_table,
    global_table,
)
from libs.tables import store as table_store
from libs.tables.global_table import BLOCKED, UNDECODABLE

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


def _level0_files(store: RocksDictStore) -> int:
    return int(store._require_db().property_int_value("rocksdb.num-files-at-level0") or 0)


def _flushes(store: RocksDictStore, n: int) -> None:
    """``n`` memtable flushes of overlapping keys: ``n`` level-0 files."""
    for i in range(n):
        store.write([(f"k{j}".encode(), f"v{i}".encode()) for j in range(100)], {0: i + 1})
        store.flush()


def _wait_compacted(store: RocksDictStore) -> None:
    deadline = time.monotonic() + 30
    while _level0_files(store) >= 4:
        assert time.monotonic() < deadline, f"{_level0_files(store)} level-0 files stay"
        time.sleep(0.01)


def test_a_bulk_load_defers_compactions_to_its_end(tmp_path: Path) -> None:
    s = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"})
    s.open()
    s.bulk_load(True)
    _flushes(s, 5)
    db = s._require_db()
    # past RocksDB's trigger (4) and none pending: nothing is compacted during the load
    assert _level0_files(s) == 5
    assert db.property_int_value("rocksdb.compaction-pending") == 0
    assert db.property_int_value("rocksdb.num-running-compactions") == 0
    s.bulk_load(False)
    _wait_compacted(s)
    assert s.get(b"k7") == b"v4" and s.offsets() == {0: 5}
    s.close()


def test_a_bulk_load_cut_short_is_compacted_after_a_reopen(tmp_path: Path) -> None:
    s = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"})
    s.open()
    s.bulk_load(True)
    _flushes(s, 5)
    s.close()  # a gate stopped before its end: the hint is not kept
    s.open()
    _wait_compacted(s)
    assert s.get(b"k7") == b"v4" and s.offsets() == {0: 5}
    s.close()


def _block_cache(db: Any) -> tuple[int, int]:
    """(capacity, usage) of the block cache a store reads through, in bytes."""
    return (
        int(db.property_int_value("rocksdb.block-cache-capacity") or 0),
        int(db.property_int_value("rocksdb.block-cache-usage") or 0),
    )


def test_a_reopened_store_keeps_its_bloom_filter_and_block_cache(tmp_path: Path) -> None:
    # rocksdict reopens an existing store with the options it persisted, which name no bloom
    # filter (``filter_policy=nullptr``) and get a new 8 MB cache: each lookup then searched
    # every file's index and data blocks, a key absent from all of them included
    s = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"}, block_cache_mb=4)
    for _ in range(2):  # created, then reopened
        s.open()
        s.write([(f"k{j:05d}".encode(), b"v" * 100) for j in range(0, 20_000, 2)], {0: 1})
        s.flush()
        s.close()
    s.open()
    db = s._require_db()
    capacity, opened = _block_cache(db)  # open read the format and the offsets
    assert capacity == 4 * 1024 * 1024
    # 1,000 absent keys inside the stored key range, in two files: the filters answer all
    # but their false positives (1 % at 10 bits per key, ~20 of 4 KB data blocks); without
    # them each lookup reads a data block of each file (~500 distinct blocks, 2 MB)
    assert all(s.get(f"k{j:05d}".encode()) is None for j in range(1, 20_000, 20))
    assert _block_cache(db)[1] - opened < 100 * 4096
    assert s.get(b"k10002") == b"v" * 100 and _block_cache(db)[1] > opened
    s.close()


def test_a_store_written_with_snappy_reads_after_the_switch_to_lz4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stores written before the tables compressed with LZ4 keep their Snappy files until a
    # compaction rewrites them: both must read, before and after that compaction
    with monkeypatch.context() as m:
        m.setattr(table_store, "DBCompressionType", SimpleNamespace(lz4=DBCompressionType.snappy))
        s = RocksDictStore(tmp_path / "t", name="t", format_info={"format": "1"})
        s.open()
        s.write([(f"k{j}".encode(), f"v{j}".encode() * 20) for j in range(2000)], {0: 2000})
        s.close()
    s.open()
    s.write([(f"k{j}".encode(), f"w{j}".encode() * 20) for j in range(0, 2000, 2)], {0: 3000})
    s.flush()
    expected = {f"k{j}".encode(): f"{'vw'[j % 2 == 0]}{j}".encode() * 20 for j in range(2000)}
    assert all(s.get(k) == v for k, v in expected.items())
    s._require_db().compact_range(None, None)
    assert all(s.get(k) == v for k, v in expected.items()) and s.offsets() == {0: 3000}
    s.close()


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


# -- applying, on a fake consumer ----------------------------------------------------------------
class FakeConsumer:
    """The part of ``confluent_kafka.Consumer`` a table uses, over an in-memory log."""

    def __init__(self, log: dict[int, list[Message]], cluster_id: str = "cluster-1") -> None:
        self.log = log
        self.cluster_id = cluster_id
        self.next: dict[int, int] = {}

    def list_topics(self, topic: str, timeout: float) -> Any:
        if topic != TOPIC:
            return SimpleNamespace(topics={}, cluster_id=self.cluster_id)  # no dead letters yet
        meta = SimpleNamespace(error=None, partitions={p: None for p in self.log})
        return SimpleNamespace(topics={topic: meta}, cluster_id=self.cluster_id)

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        records = self.log[tp.partition]
        return 0, (records[-1].offset() + 1 if records else 0)  # type: ignore[operator]

    def assign(self, tps: list[TopicPartition]) -> None:
        self.next = {tp.partition: max(0, tp.offset) for tp in tps}

    def seek(self, tp: TopicPartition) -> None:
        self.next[tp.partition] = tp.offset

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out = []
        for p, records in self.log.items():
            for m in records:
                if m.offset() >= self.next[p] and len(out) < num_messages:  # type: ignore[operator]
                    out.append(m)
                    self.next[p] = m.offset() + 1  # type: ignore[operator]
        return out

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.next[tp.partition]) for tp in tps]

    def close(self) -> None:
        pass


def _loaded(
    registry: AnsweringRegistry, log: dict[int, list[Message]], tmp_path: Path, **kw: Any
) -> tuple[GlobalTable[SlackUser], list[tuple[bytes | None, int]]]:
    """A table over ``log`` whose dead letters land in the returned list (key, source offset)."""
    letters: list[tuple[bytes | None, int]] = []

    def produce(topic: str, *, key: bytes | None, value: bytes | None, headers: Any) -> None:
        assert topic == dlq_topic(TOPIC)
        letters.append((key, int(dict(headers)[HEADER_SOURCE_OFFSET])))

    table = avro_table(
        SlackUser,
        name=kw.pop("name", "users"),
        topic=TOPIC,
        state_dir=tmp_path,
        consumer_config={},
        registry=registry,
        dead_letters=DeadLetterPublisher(produce, "test"),
        store=InMemoryStore(),
        consumer_factory=lambda conf: FakeConsumer(log),
        **kw,
    )
    return table, letters


def _msg(offset: int, key: bytes | None, value: bytes | None, partition: int = 0) -> Message:
    return Message(topic=TOPIC, partition=partition, offset=offset, key=key, value=value)


def _count_schema_fetches(registry: AnsweringRegistry) -> list[int]:
    """The schema ids ``registry`` is asked for from now on, in order."""
    fetched: list[int] = []
    lookup = registry.schema_by_id

    def counting(schema_id: int) -> str:
        fetched.append(schema_id)
        return lookup(schema_id)

    registry.schema_by_id = counting  # type: ignore[method-assign]
    return fetched


def test_each_schema_id_is_checked_once_and_poison_is_dead_lettered(tmp_path: Path) -> None:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    good = [encode(TOPIC, SlackUser(f"u{i}@x", f"U{i}", T0)) for i in range(50)]
    log = {
        0: [
            *(_msg(i, f"u{i}@x".encode(), v) for i, v in enumerate(good)),
            _msg(50, b"bad@x", b"garbage"),
            _msg(51, b"unknown@x", b"\x00\x7f\xff\xff\xf0" + good[0][5:]),
            _msg(52, None, good[0]),
            _msg(53, b"u3@x", None),  # tombstone
        ]
    }
    fetched = _count_schema_fetches(registry)
    table, letters = _loaded(registry, log, tmp_path)
    table.bootstrap(threading.Event(), timeout_s=10)
    assert len(fetched) == 2  # the good records' id once, the unknown id once
    assert letters == [(b"bad@x", 50), (b"unknown@x", 51), (None, 52)]
    assert table.applied_since_start == 51 and table.positions() == {0: 54}
    assert table.get("u7@x") == SlackUser("u7@x", "U7", T0) and table.get("u3@x") is None


def test_records_of_several_schema_ids_check_each_id_once(tmp_path: Path) -> None:
    registry = AnsweringRegistry()
    users = AvroSerializer(registry, SlackUser)
    owners = AvroSerializer(registry, CsdrAssignment)  # another id the registry knows
    a = users(TOPIC, SlackUser("a@x", "UA", T0))
    b = owners(TOPIC, CsdrAssignment("o", "O", "a@x", T0))
    assert a[:5] != b[:5]
    log = {0: [_msg(i, f"k{i}".encode(), (a, b)[i % 2]) for i in range(20)]}
    fetched = _count_schema_fetches(registry)
    table, letters = _loaded(registry, log, tmp_path)
    table.bootstrap(threading.Event(), timeout_s=10)
    assert sorted(fetched) == sorted(int.from_bytes(v[1:5], "big") for v in (a, b))
    assert letters == [] and table.applied_since_start == 20
    assert table.get("k0") == SlackUser("a@x", "UA", T0)
    assert table.get("k1") is None and table.undecodable_reads == 1  # stored, not a user


class _RecordingStore(InMemoryStore):
    """Records each write's entries, whether the cycle collector was on and the bulk hint."""

    def __init__(self) -> None:
        super().__init__()
        self.at_write: list[tuple[int, bool, bool]] = []

    def write(self, entries: Any, offsets: dict[int, int]) -> None:
        entries = list(entries)
        self.at_write.append((len(entries), gc.isenabled(), self.bulk))
        super().write(entries, offsets)


class _FailingConsumer(FakeConsumer):
    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        raise KafkaException(KafkaError(KafkaError._FATAL, "fenced", fatal=True))


def _recording_table(
    log: dict[int, list[Message]],
    store: InMemoryStore,
    consumer: type[FakeConsumer],
    **kw: Any,
) -> GlobalTable[SlackUser]:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    for p, n in ((0, 3), (1, 2)):
        log[p] = [
            _msg(i, f"u{p}{i}".encode(), encode(TOPIC, SlackUser("u@x", "U", T0)), p)
            for i in range(n)
        ]
    return avro_table(
        SlackUser,
        name="users",
        topic=TOPIC,
        state_dir=Path("/nonexistent"),
        consumer_config={},
        registry=registry,
        store=store,
        consumer_factory=lambda conf: consumer(log),
        batch_size=2,
        **kw,
    )


def test_the_gate_applies_its_batches_with_the_cycle_collector_paused() -> None:
    store = _RecordingStore()
    table = _recording_table({}, store, FakeConsumer)
    assert gc.isenabled()
    table.bootstrap(threading.Event(), timeout_s=10)
    assert gc.isenabled()  # on again after each batch
    applied = [on for n, on, _ in store.at_write if n]  # the batches, not position moves
    assert len(applied) >= 3 and not any(applied)
    assert table.positions() == {0: 3, 1: 2}


def test_a_collector_turned_off_by_someone_else_stays_off() -> None:
    table = _recording_table({}, _RecordingStore(), FakeConsumer)
    gc.disable()
    try:
        table.bootstrap(threading.Event(), timeout_s=10)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_failing_batch_turns_the_collector_back_on() -> None:
    table = _recording_table({}, _RecordingStore(), _FailingConsumer)
    table.begin_bootstrap()
    with pytest.raises(KafkaException):
        table.step_bootstrap()
    assert gc.isenabled()


def test_the_gate_loads_in_bulk_and_ends_the_bulk_load_when_caught_up() -> None:
    store = _RecordingStore()
    table = _recording_table({}, store, FakeConsumer, bulk_load_min_records=5)  # 5 behind
    table.begin_bootstrap()
    assert store.bulk
    while not table.step_bootstrap():
        pass
    assert store.at_write and all(bulk for _, _, bulk in store.at_write)
    assert not store.bulk and table.ready()
    table.close()


def test_a_gate_not_far_behind_is_no_bulk_load() -> None:
    store = _RecordingStore()
    table = _recording_table({}, store, FakeConsumer, bulk_load_min_records=6)  # 5 behind
    table.bootstrap(threading.Event(), timeout_s=10)
    assert store.at_write and not any(bulk for _, _, bulk in store.at_write)
    assert table.ready()


def test_registry_down_pauses_at_the_record_and_dead_letters_nothing(tmp_path: Path) -> None:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    log = {
        0: [
            _msg(i, f"u{i}@x".encode(), encode(TOPIC, SlackUser(f"u{i}@x", "U", T0)))
            for i in range(5)
        ]
    }
    registry.down = True
    table, letters = _loaded(registry, log, tmp_path, retry_s=0.0)
    blocked = BLOCKED.labels("users")._value.get()
    table.begin_bootstrap()
    assert not table.step_bootstrap()
    assert letters == [] and table.positions() == {0: 0}
    assert BLOCKED.labels("users")._value.get() == blocked + 1
    assert not table.caught_up_to({0: 5})
    registry.down = False
    assert table.step_bootstrap()
    assert table.ready() and table.positions() == {0: 5} and letters == []
    assert table.caught_up_to({0: 5})


def test_on_change_hears_live_keys_only_tombstones_included(tmp_path: Path) -> None:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    log = {0: [_msg(0, b"a@x", encode(TOPIC, SlackUser("a@x", "UA", T0)))]}
    table, _ = _loaded(registry, log, tmp_path)
    table.bootstrap(threading.Event(), timeout_s=10)
    heard: list[list[bytes]] = []
    table.on_change = heard.append  # set after the gate: the bootstrap's keys are not heard
    log[0] += [
        _msg(1, b"b@x", encode(TOPIC, SlackUser("b@x", "UB", T0))),
        _msg(2, b"a@x", None),
        _msg(3, b"bad@x", b"garbage"),  # dead-lettered, not applied: not a change
    ]
    assert table.poll() == 2
    assert heard == [[b"b@x", b"a@x"]]
    assert table.poll() == 0 and heard == [[b"b@x", b"a@x"]]


class _CountedGauge:
    """A labelled gauge that counts its writes and passes them on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0

    def labels(self, *values: str) -> Any:
        child = self.inner.labels(*values)

        def set_(value: float) -> None:
            self.writes += 1
            child.set(value)

        return SimpleNamespace(set=set_)


def test_a_poll_that_changes_nothing_writes_no_gauge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)
    log = {0: [_msg(0, b"a@x", encode(TOPIC, SlackUser("a@x", "UA", T0)))]}
    table, _ = _loaded(registry, log, tmp_path, name="gauges", lagging_threshold=1)
    table.bootstrap(threading.Event(), timeout_s=10)
    lag = _CountedGauge(global_table.LAG)
    state = _CountedGauge(global_table.STATE)
    monkeypatch.setattr(global_table, "LAG", lag)
    monkeypatch.setattr(global_table, "STATE", state)

    for _ in range(50):
        assert table.poll() == 0
    assert (lag.writes, state.writes) == (0, 0)

    def sample(name: str, **labels: str) -> float | None:
        return METRICS.get_sample_value(name, {"table": "gauges", **labels})

    # a change still shows: two records behind, one read, then the other
    log[0] += [
        _msg(i, f"{i}@x".encode(), encode(TOPIC, SlackUser("b@x", "UB", T0))) for i in (1, 2, 3)
    ]
    assert table.poll(max_records=1) == 1
    assert table.lag() == 2 and sample("table_lag_records") == 2
    assert sample("table_state", state="lagging") == 1
    assert sample("table_state", state="caught_up") == 0
    assert table.poll() == 2
    assert table.lag() == 0 and sample("table_lag_records") == 0
    assert sample("table_state", state="caught_up") == 1
    assert sample("table_state", state="lagging") == 0


@pytest.mark.parametrize("kind", ["memory", "rocksdb"])
def test_a_store_of_a_vanished_cluster_is_rebuilt(kind: str, tmp_path: Path) -> None:
    # The state dir outlives a purged cluster whose recreated topic already has as many
    # records as the stored offsets: the watermark check alone would resume there.
    registry = AnsweringRegistry()
    encode = AvroSerializer(registry, SlackUser)

    def user(offset: int, name: str) -> Message:
        return _msg(offset, f"{name}@x".encode(), encode(TOPIC, SlackUser(f"{name}@x", name, T0)))

    def load(log: dict[int, list[Message]], cluster_id: str) -> GlobalTable[SlackUser]:
        store: TableStore = (
            memory
            if kind == "memory"
            else RocksDictStore(tmp_path / "users", name="users", format_info={"format": "1"})
        )
        table = avro_table(
            SlackUser,
            name="users",
            topic=TOPIC,
            state_dir=tmp_path,
            consumer_config={},
            registry=registry,
            store=store,
            consumer_factory=lambda conf: FakeConsumer(log, cluster_id),
        )
        table.bootstrap(threading.Event(), timeout_s=10)
        return table

    memory = InMemoryStore()
    old = load({0: [user(0, "gone"), user(1, "left")]}, "old-cluster")
    assert old.get("gone@x") is not None
    old.close()
    again = load({0: [user(0, "gone"), user(1, "left")]}, "old-cluster")
    assert again.positions() == {0: 2} and again.get("gone@x") is not None  # resumed
    again.close()
    new = load({0: [user(0, "a"), user(1, "b"), user(2, "c")]}, "new-cluster")
    assert new.get("gone@x") is None and new.get("left@x") is None
    assert [new.get(f"{n}@x") is not None for n in "abc"] == [True, True, True]
    new.close()


# -- the bootstrap while the cluster cannot answer, on the in-memory twin ----------------------
@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(global_table, "_WAIT_FIRST_S", 0.01)
    monkeypatch.setattr(global_table, "_WAIT_MAX_S", 0.05)


def _twin_table(
    tmp_path: Path,
    broker: InMemoryBroker,
    faults: list[tuple[str, KafkaError, int]],
    **kw: Any,
) -> GlobalTable[SlackUser]:
    """A table on ``broker`` whose consumer fails as ``faults`` say (method, error, times)."""

    def consumer(conf: dict[str, Any]) -> Any:
        c = broker.consumer(conf)
        for method, error, times in faults:
            c.fail(method, error, times)
        return c

    return avro_table(
        SlackUser,
        name="users",
        topic=TOPIC,
        state_dir=tmp_path,
        consumer_config={},
        registry=REGISTRY,
        store=InMemoryStore(),
        consumer_factory=consumer,
        **kw,
    )


REGISTRY = AnsweringRegistry()


def _users_on(broker: InMemoryBroker, n: int) -> None:
    broker.create_topic(TOPIC, 2)
    encode = AvroSerializer(REGISTRY, SlackUser)
    producer = broker.producer({})
    for i in range(n):
        user = SlackUser(f"u{i}@x", f"U{i}", T0)
        producer.produce(TOPIC, key=user.email, value=encode(TOPIC, user), partition=i % 2)
    assert producer.flush(1) == 0


@pytest.mark.usefixtures("fast_backoff")
def test_a_broker_restart_during_the_bootstrap_is_waited_out(tmp_path: Path) -> None:
    """The errors a broker restart gives the watermark snapshot: the table waits, says why,
    asks again, and loads everything; it did exit the service before."""
    broker = InMemoryBroker()
    _users_on(broker, 10)
    table = _twin_table(
        tmp_path,
        broker,
        [
            ("list_topics", KafkaError(KafkaError._TRANSPORT, "connection refused"), 1),
            ("get_watermark_offsets", KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), 1),
            ("get_watermark_offsets", KafkaError(KafkaError.LEADER_NOT_AVAILABLE), 1),
            ("get_watermark_offsets", KafkaError(KafkaError.OFFSET_NOT_AVAILABLE), 1),
            ("get_watermark_offsets", KafkaError(KafkaError._TIMED_OUT), 1),
            # the stopped broker removed from the metadata (seen on the 3-node stack)
            ("get_watermark_offsets", KafkaError(KafkaError._DESTROY_BROKER), 1),
        ],
    )
    table.begin_bootstrap()
    assert table.state is TableState.WAITING and not table.ready()
    assert "_TRANSPORT" in str(table.status()["waiting"])
    seen = set()
    deadline = time.monotonic() + 30
    while not table.step_bootstrap():
        assert time.monotonic() < deadline, table.status()
        seen.add(str(table.status()["waiting"]).split(":")[0])
    assert seen >= {"NOT_LEADER_FOR_PARTITION", "LEADER_NOT_AVAILABLE", "OFFSET_NOT_AVAILABLE"}
    assert table.ready() and table.status()["waiting"] is None
    assert table.positions() == {0: 5, 1: 5} and table.get("u7@x") == SlackUser("u7@x", "U7", T0)
    table.close()


@pytest.mark.usefixtures("fast_backoff")
def test_the_gate_can_be_stopped_while_the_cluster_cannot_answer(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    _users_on(broker, 2)
    table = _twin_table(
        tmp_path, broker, [("list_topics", KafkaError(KafkaError._ALL_BROKERS_DOWN), 10_000)]
    )
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    table.bootstrap(stop, timeout_s=30)
    assert stop.is_set() and table.state is TableState.WAITING
    table.close()


@pytest.mark.parametrize(
    "code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED]
)
def test_what_no_retry_cures_stops_the_bootstrap(tmp_path: Path, code: int) -> None:
    broker = InMemoryBroker()
    _users_on(broker, 2)
    table = _twin_table(tmp_path, broker, [("get_watermark_offsets", KafkaError(code), 1)])
    with pytest.raises(TableError, match="cannot read the partitions"):
        table.begin_bootstrap()
    table.close()


@pytest.mark.usefixtures("fast_backoff")
def test_a_missing_topic_is_waited_for_within_the_grace_only(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    late = _twin_table(tmp_path / "late", broker, [], missing_topic_grace_s=30)
    late.begin_bootstrap()
    assert late.state is TableState.WAITING
    _users_on(broker, 4)  # created a moment later: loaded
    late.bootstrap(threading.Event(), timeout_s=30)
    assert late.ready() and late.positions() == {0: 2, 1: 2}
    late.close()
    never = _twin_table(tmp_path / "never", InMemoryBroker(), [], missing_topic_grace_s=0.2)
    started = time.monotonic()
    with pytest.raises(TableError, match="does not exist"):
        never.bootstrap(threading.Event(), timeout_s=30)
    assert time.monotonic() - started < 10
    never.close()


@pytest.mark.usefixtures("fast_backoff")
def test_a_gate_timeout_says_what_the_table_waits_for(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    _users_on(broker, 2)
    table = _twin_table(
        tmp_path, broker, [("list_topics", KafkaError(KafkaError._ALL_BROKERS_DOWN), 10_000)]
    )
    with pytest.raises(TableError, match=r"waiting for the cluster.*_ALL_BROKERS_DOWN"):
        table.bootstrap(threading.Event(), timeout_s=0.3)
    table.close()
