"""GlobalTable against the real broker: the gate, tombstones, restarts, healing, markers."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from libs.kafka import DeadLetterPublisher, KafkaSettings, dlq_topic, plain_produce
from libs.serde import AvroDeserializer, AvroSerializer, ConfluentSchemaRegistry, SlackUser
from libs.tables import GlobalTable, TableError, TableState, avro_table
from tests.support.kafka import consume_all, create_topics, produce, unique, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 25, tzinfo=UTC)


def _user(i: int, suffix: str = "") -> SlackUser:
    return SlackUser(f"user{i}@example.com", f"U{i}{suffix}", T0)


class Env:
    def __init__(self, bootstrap: str, registry: ConfluentSchemaRegistry, tmp: Path) -> None:
        self.bootstrap = bootstrap
        self.topic = unique("users")
        create_topics(bootstrap, [self.topic], partitions=3, compacted=True)
        self.encode = AvroSerializer(registry, SlackUser)
        self.decoder = AvroDeserializer(registry, SlackUser)
        self.state_dir = tmp
        self.invalid: list[tuple[int, str]] = []

    def decode(self, value: bytes, topic: str, partition: int, offset: int) -> SlackUser:
        return self.decoder(value, topic=topic, partition=partition, offset=offset)

    def records(self, users: list[SlackUser]) -> list[tuple[str, bytes | None]]:
        return [(u.email, self.encode(self.topic, u)) for u in users]

    def table(self, **kwargs: Any) -> GlobalTable[SlackUser]:
        def on_invalid(msg: Message, exc: Exception) -> None:
            self.invalid.append((int(msg.offset() or 0), str(exc)))

        return GlobalTable(
            name="users",
            topic=self.topic,
            state_dir=self.state_dir,
            consumer_config=KafkaSettings(bootstrap_servers=self.bootstrap).consumer_config(None),
            decode=self.decode,
            on_invalid=on_invalid,
            **kwargs,
        )

    def loaded(self, **kwargs: Any) -> GlobalTable[SlackUser]:
        t = self.table(**kwargs)
        t.bootstrap(threading.Event(), timeout_s=60)
        return t


@pytest.fixture
def env(bootstrap: str, registry: ConfluentSchemaRegistry, tmp_path: Path) -> Env:
    return Env(bootstrap, registry, tmp_path)


def test_gate_loads_everything_written_before_start(env: Env) -> None:
    produce(env.bootstrap, env.topic, env.records([_user(i) for i in range(500)]))
    produce(env.bootstrap, env.topic, [("user7@example.com", None)])  # tombstone
    produce(env.bootstrap, env.topic, [("bad@example.com", b"garbage")])
    t = env.loaded()
    try:
        assert t.state is TableState.CAUGHT_UP and t.ready()
        assert t.get("user3@example.com") == _user(3)
        assert t.get("user7@example.com") is None
        assert t.get("nobody@example.com") is None
        assert t.get("bad@example.com") is None
        assert len(env.invalid) == 1 and "not Confluent wire format" in env.invalid[0][1]
        assert t.applied_since_start == 501 and t.lag() == 0
    finally:
        t.close()


def test_live_updates_and_tombstones_after_the_gate(env: Env) -> None:
    produce(env.bootstrap, env.topic, env.records([_user(1)]))
    t = env.loaded()
    try:
        produce(env.bootstrap, env.topic, env.records([_user(1, "-new"), _user(2)]))
        wait_until(
            lambda: t.poll(timeout_s=0.2) or t.get("user2@example.com"),
            message="live update applied",
        )
        wait_until(
            lambda: (t.poll(timeout_s=0.1), t.get("user1@example.com"))[1] == _user(1, "-new"),
            message="overwrite applied",
        )
        produce(env.bootstrap, env.topic, [("user1@example.com", None)])
        wait_until(
            lambda: (t.poll(timeout_s=0.1), t.get("user1@example.com") is None)[1],
            message="tombstone applied",
        )
    finally:
        t.close()


def test_restart_reads_only_new_records(env: Env) -> None:
    produce(env.bootstrap, env.topic, env.records([_user(i) for i in range(1000)]))
    env.loaded().close()
    produce(env.bootstrap, env.topic, env.records([_user(i, "-v2") for i in range(990, 1003)]))
    t = env.loaded()
    try:
        assert t.applied_since_start == 13
        assert t.get("user995@example.com") == _user(995, "-v2")
        assert t.get("user5@example.com") == _user(5)
    finally:
        t.close()


def test_transaction_markers_and_aborted_records_do_not_hang_the_gate(env: Env) -> None:
    p = Producer({"bootstrap.servers": env.bootstrap, "transactional.id": unique("tx")})
    p.init_transactions()
    for i in range(5):
        p.begin_transaction()
        for key, value in env.records([_user(i)]):
            p.produce(env.topic, key=key.encode(), value=value)
        p.commit_transaction()
    p.begin_transaction()
    for key, value in env.records([_user(99)]):
        p.produce(env.topic, key=key.encode(), value=value)
    # written before the abort: the aborted record is in the log, and an abort racing the
    # transaction's AddPartitionsToTxn fails fatally (librdkafka #4849; seen in CI)
    assert p.flush(30) == 0
    p.abort_transaction()
    # the log now ends in a commit marker and an abort marker: no record sits at high - 1
    t = env.loaded()
    try:
        assert t.get("user4@example.com") == _user(4)
        assert t.get("user99@example.com") is None
        assert t.applied_since_start == 5
    finally:
        t.close()
    # the positions past the markers were stored too: a restart has nothing to read
    t = env.loaded()
    try:
        assert t.applied_since_start == 0
    finally:
        t.close()


def test_offset_below_low_watermark_rebuilds(env: Env) -> None:
    # retention (compact,delete) is how a lookup topic's low watermark moves past a stale copy;
    # DeleteRecords, which the broker refuses on compact-only topics, stands in for it here
    env.topic = unique("users-retained")
    create_topics(
        env.bootstrap, [env.topic], partitions=3, config={"cleanup.policy": "compact,delete"}
    )
    produce(env.bootstrap, env.topic, env.records([_user(i) for i in range(30)]))
    env.loaded().close()
    produce(env.bootstrap, env.topic, env.records([_user(i, "-v2") for i in range(30)]))
    admin = AdminClient({"bootstrap.servers": env.bootstrap})
    marks = {}
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": env.bootstrap, "group.id": unique("w")})
    for p in range(3):
        marks[p] = c.get_watermark_offsets(TopicPartition(env.topic, p), timeout=10)[1]
    c.close()
    # delete everything but the last record of each partition: stored offsets fall below low
    futures = admin.delete_records(
        [TopicPartition(env.topic, p, max(0, h - 1)) for p, h in marks.items() if h > 0]
    )
    for fut in futures.values():
        fut.result(timeout=30)
    t = env.loaded()
    try:
        assert t.applied_since_start == sum(1 for h in marks.values() if h > 0)
        from libs.tables.global_table import REBUILDS

        assert REBUILDS.labels("users", "offsets")._value.get() >= 1
    finally:
        t.close()


def test_corrupt_store_and_changed_format_rebuild(env: Env) -> None:
    produce(env.bootstrap, env.topic, env.records([_user(i) for i in range(20)]))
    env.loaded().close()
    t = env.loaded(format_version="2")  # e.g. a new value schema
    try:
        assert t.applied_since_start == 20
    finally:
        t.close()
    for f in (env.state_dir / "users").iterdir():
        if f.name.startswith(("MANIFEST", "CURRENT")):
            f.write_bytes(b"\x00garbage")
    t = env.loaded(format_version="2")
    try:
        assert t.applied_since_start == 20
        assert t.get("user19@example.com") == _user(19)
    finally:
        t.close()


def test_missing_topic_is_a_clear_error(env: Env) -> None:
    env.topic = unique("missing")
    t = env.table()
    with pytest.raises(TableError, match="does not exist"):
        t.bootstrap(threading.Event(), timeout_s=10)
    t.close()


def test_put_local_is_read_before_the_topic_echo(env: Env) -> None:
    t = env.loaded()
    try:
        [(key, value)] = env.records([_user(5)])
        t.put_local(key, value)
        assert t.get(key) == _user(5)
    finally:
        t.close()


def test_registry_down_during_a_rebuild_dead_letters_nothing(
    bootstrap: str, registry: ConfluentSchemaRegistry, registry_url: str, tmp_path: Path
) -> None:
    """A table rebuilt while the schema registry is unreachable: its records are not the
    records' fault, so none is dead-lettered (before the fix every one was, and the stored
    offsets moved past them, which cost the notifier its duplicate-post protection). The
    table waits at the first record, stays loading, and completes once the registry answers."""
    from tests.e2e.harness import proxy

    env = Env(bootstrap, registry, tmp_path)
    produce(bootstrap, env.topic, env.records([_user(i) for i in range(30)]))
    with proxy(registry_url) as (registry_proxy, url):
        down = ConfluentSchemaRegistry(url)
        decoder = AvroDeserializer(down, SlackUser)
        env.decoder = decoder
        table = env.table(retry_s=0.5)
        stop = threading.Event()
        done = threading.Event()

        def gate() -> None:
            table.bootstrap(stop)
            done.set()

        thread = threading.Thread(target=gate, daemon=True)
        thread.start()
        try:
            wait_until(lambda: table.blocked_reason, timeout_s=30, message="table blocked")
            time.sleep(2.0)  # several retries against the refused registry
            assert not done.is_set() and not table.ready()
            assert env.invalid == [], env.invalid
            wait_until(lambda: table.status()["blocked"], timeout_s=10, message="status says why")
            registry_proxy.up()
            assert done.wait(60), "the gate did not pass once the registry answered"
        finally:
            stop.set()
            thread.join(30)
        assert env.invalid == []
        assert table.ready() and table.status()["blocked"] is None
        assert [table.get(f"user{i}@example.com") for i in range(30)] == [
            _user(i) for i in range(30)
        ]
        table.close()
        down.close()


def test_a_rebuild_does_not_dead_letter_the_same_poison_again(
    bootstrap: str, registry: ConfluentSchemaRegistry, tmp_path: Path
) -> None:
    """Every instance that rebuilt a table used to dead-letter the same poison again. The table
    reads its dead-letter topic at bootstrap and skips records already there (by their source
    coordinates), so two rebuilds and a second replica leave one dead letter per poison."""
    env = Env(bootstrap, registry, tmp_path)
    dlq = dlq_topic(env.topic)
    create_topics(bootstrap, [dlq], partitions=1)
    produce(bootstrap, env.topic, [*env.records([_user(1)]), ("poison@x", b"garbage")])
    producer = Producer({"bootstrap.servers": bootstrap})
    publisher = DeadLetterPublisher(plain_produce(producer), "test")

    def load(state: Path) -> None:
        table = GlobalTable(
            name="users",
            topic=env.topic,
            state_dir=state,
            consumer_config=KafkaSettings(bootstrap_servers=bootstrap).consumer_config(None),
            decode=env.decode,
            on_invalid=publisher.publish_message,
            dead_letter_topic=dlq,
        )
        table.bootstrap(threading.Event(), timeout_s=60)
        assert table.get("user1@example.com") == _user(1)
        table.close()
        assert producer.flush(30) == 0

    load(tmp_path / "first")
    load(tmp_path / "first-rebuilt")  # a lost volume
    load(tmp_path / "second-replica")
    letters = consume_all(bootstrap, dlq, idle_s=2)
    assert [m.key() for m in letters] == [b"poison@x"]


def test_caught_up_to_marks_taken_after_the_gate(env: Env) -> None:
    """What the notifier's next owner of a partition needs: snapshot the high watermarks, keep
    polling, and ask (without blocking) whether the table reached them. The marks here end
    in transaction markers, which no record fills: positions must still reach them."""
    produce(env.bootstrap, env.topic, env.records([_user(i) for i in range(10)]))
    t = env.loaded()
    try:
        assert t.positions() == t.high_watermarks()
        assert t.caught_up_to(t.high_watermarks())
        p = Producer({"bootstrap.servers": env.bootstrap, "transactional.id": unique("tx")})
        p.init_transactions()
        p.begin_transaction()
        for key, value in env.records([_user(i, "-tx") for i in range(20, 26)]):
            p.produce(env.topic, key=key.encode(), value=value)
        p.commit_transaction()
        marks = t.high_watermarks()
        assert not t.caught_up_to(marks)
        wait_until(
            lambda: (t.poll(timeout_s=0.1), t.caught_up_to(marks))[1],
            message="caught up to the marks",
        )
        assert all(t.positions()[p] >= mark for p, mark in marks.items())
        assert t.get("user25@example.com") == _user(25, "-tx")
    finally:
        t.close()
    t = env.loaded()  # the positions past the markers were stored: nothing to re-read
    try:
        assert t.applied_since_start == 0 and t.caught_up_to(marks)
    finally:
        t.close()


def test_restore_checks_headers_and_get_survives_an_undecodable_value(
    bootstrap: str, registry: ConfluentSchemaRegistry, tmp_path: Path
) -> None:
    """Restore looks at the wire header only: no magic byte, or a schema id the registry does
    not know, is poison (dead-lettered once); a valid header on a corrupt body is stored, and
    ``get`` answers it as absent and counts it instead of failing the lookup's caller."""
    env = Env(bootstrap, registry, tmp_path)
    dlq = dlq_topic(env.topic)
    create_topics(bootstrap, [dlq], partitions=1)
    [(_, good)] = env.records([_user(1)])
    unknown_id = b"\x00" + (2**31 - 7).to_bytes(4, "big") + good[5:]
    produce(
        bootstrap,
        env.topic,
        [
            *env.records([_user(1), _user(2)]),
            ("garbage@x", b"garbage"),
            ("unknown-id@x", unknown_id),
            ("corrupt@x", good[:5] + b"\xff\xff\xff\xff"),
        ],
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    table = avro_table(
        SlackUser,
        name="users",
        topic=env.topic,
        state_dir=tmp_path,
        consumer_config=KafkaSettings(bootstrap_servers=bootstrap).consumer_config(None),
        registry=registry,
        dead_letters=DeadLetterPublisher(plain_produce(producer), "test"),
    )
    table.bootstrap(threading.Event(), timeout_s=60)
    try:
        assert producer.flush(30) == 0
        assert table.applied_since_start == 3 and table.invalid_total == 2
        letters = consume_all(bootstrap, dlq, idle_s=2)
        assert sorted(m.key() for m in letters) == [b"garbage@x", b"unknown-id@x"]
        assert table.get("user2@example.com") == _user(2)
        assert table.get("unknown-id@x") is None and table.undecodable_reads == 0
        assert table.get("corrupt@x") is None
        assert table.undecodable_reads == 1
        assert table.status()["undecodable_reads"] == 1
    finally:
        table.close()
