"""One contract for the Kafka ports, run against the in-memory twins and the real clients.

``tests/unit/test_kafka_memory.py`` runs every ``check_*`` function here on
``libs.kafka.memory``; ``tests/integration/test_kafka_ports.py`` runs the same functions on
``confluent_kafka`` clients against the session broker. A behaviour the loops rely on belongs
here, so that a twin that drifts from Kafka fails a unit test instead of hiding a bug.

The checks only use what the ports offer plus a ``Kit`` that makes topics, groups and
clients. Waits are deadlines on conditions (a real group join takes seconds), never sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from libs.kafka.ports import ConsumerPort, ProducerPort


class Kit(Protocol):
    """Builds what a check needs, on a twin broker or on the real one."""

    def topic(self, partitions: int = 1) -> str: ...

    def group(self) -> str: ...

    def consumer(self, group: str, **overrides: Any) -> ConsumerPort: ...

    def producer(self, transactional_id: str | None = None) -> ProducerPort: ...


def _until(predicate: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def _produce(p: ProducerPort, topic: str, values: list[bytes], partition: int = 0) -> list[int]:
    offsets: list[int] = []

    def report(err: object, msg: Message) -> None:
        assert err is None, err
        offsets.append(int(msg.offset() or 0))

    for v in values:
        p.produce(topic, value=v, key=b"k", partition=partition, on_delivery=report)
    assert p.flush(30) == 0
    return offsets


def _read(c: ConsumerPort, n: int, timeout_s: float = 60.0) -> list[Message]:
    out: list[Message] = []

    def enough() -> bool:
        out.extend(m for m in c.consume(n - len(out), 0.2) if m.error() is None)
        return len(out) >= n

    _until(enough, f"{n} records")
    return out


def _quiet(c: ConsumerPort, seconds: float = 2.0) -> list[Message]:
    """What arrives within ``seconds`` (used to show that nothing does)."""
    deadline = time.monotonic() + seconds
    out: list[Message] = []
    while time.monotonic() < deadline:
        out.extend(m for m in c.consume(10, 0.2) if m.error() is None)
    return out


def _assigned(c: ConsumerPort, n: int) -> None:
    def ready() -> bool:
        c.consume(1, 0.1)  # rebalance callbacks run inside consume
        return len(c.assignment()) == n

    _until(ready, f"{n} partitions assigned")


def check_produce_then_consume_in_order(kit: Kit) -> None:
    topic = kit.topic()
    offsets = _produce(kit.producer(), topic, [b"a", b"b", b"c"])
    assert offsets == [0, 1, 2]
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    msgs = _read(c, 3)
    assert [m.value() for m in msgs] == [b"a", b"b", b"c"]
    assert [m.offset() for m in msgs] == [0, 1, 2]
    assert msgs[0].key() == b"k" and msgs[0].topic() == topic and msgs[0].partition() == 0
    assert c.position([TopicPartition(topic, 0)])[0].offset == 3
    c.close()


def check_headers_round_trip(kit: Kit) -> None:
    topic = kit.topic()
    p = kit.producer()
    p.produce(topic, value=b"v", key=b"k", partition=0, headers=[("h", b"1"), ("n", None)])
    assert p.flush(30) == 0
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    [msg] = _read(c, 1)
    assert msg.headers() == [("h", b"1"), ("n", None)]
    c.close()


def check_a_new_member_resumes_from_the_committed_offset(kit: Kit) -> None:
    topic, group = kit.topic(), kit.group()
    _produce(kit.producer(), topic, [b"a", b"b", b"c", b"d"])
    first = kit.consumer(group)
    first.subscribe([topic])
    _read(first, 2)
    tp = TopicPartition(topic, 0)
    assert first.committed([tp], timeout=30)[0].offset < 0  # nothing committed yet
    first.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    assert first.committed([tp], timeout=30)[0].offset == 2
    first.close()
    second = kit.consumer(group)
    second.subscribe([topic])
    assert [m.value() for m in _read(second, 2)] == [b"c", b"d"]
    second.close()


def check_commit_inside_on_revoke_counts(kit: Kit) -> None:
    """The loops commit their progress in ``on_revoke``; close() runs it."""
    topic, group = kit.topic(), kit.group()
    _produce(kit.producer(), topic, [b"a", b"b", b"c"])
    c = kit.consumer(group)
    revoked: list[list[TopicPartition]] = []

    def on_revoke(consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked.append(partitions)
        consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)

    c.subscribe([topic], on_revoke=on_revoke)
    _read(c, 3)
    c.close()
    assert [(p.topic, p.partition) for p in revoked[0]] == [(topic, 0)]
    again = kit.consumer(group)
    again.subscribe([topic])
    assert [m.value() for m in _read(again, 2)] == [b"b", b"c"]
    again.close()


def check_seek_rewinds(kit: Kit) -> None:
    topic = kit.topic()
    _produce(kit.producer(), topic, [b"a", b"b", b"c"])
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    _read(c, 3)
    c.seek(TopicPartition(topic, 0, 1))
    assert [m.value() for m in _read(c, 2)] == [b"b", b"c"]
    c.close()


def check_pause_stops_fetching_and_resume_goes_on(kit: Kit) -> None:
    topic = kit.topic()
    p = kit.producer()
    _produce(p, topic, [b"a"])
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    _read(c, 1)
    c.pause([TopicPartition(topic, 0)])
    _produce(p, topic, [b"b", b"c"])
    assert _quiet(c) == []
    c.resume([TopicPartition(topic, 0)])
    assert [m.value() for m in _read(c, 2)] == [b"b", b"c"]
    c.close()


def check_assign_callbacks_and_sharing_with_a_second_member(kit: Kit) -> None:
    topic, group = kit.topic(partitions=2), kit.group()
    assigned: dict[str, set[int]] = {"a": set(), "b": set()}

    def track(name: str) -> Callable[[Any, list[TopicPartition]], None]:
        def on_assign(_c: Any, partitions: list[TopicPartition]) -> None:
            assigned[name] |= {p.partition for p in partitions}

        return on_assign

    def untrack(name: str) -> Callable[[Any, list[TopicPartition]], None]:
        def on_revoke(_c: Any, partitions: list[TopicPartition]) -> None:
            assigned[name] -= {p.partition for p in partitions}

        return on_revoke

    a = kit.consumer(group)
    a.subscribe([topic], on_assign=track("a"), on_revoke=untrack("a"))
    _assigned(a, 2)
    assert assigned["a"] == {0, 1}
    b = kit.consumer(group)
    b.subscribe([topic], on_assign=track("b"), on_revoke=untrack("b"))

    def shared() -> bool:
        a.consume(1, 0.1)
        b.consume(1, 0.1)
        return len(assigned["a"]) == 1 and len(assigned["b"]) == 1

    _until(shared, "one partition each")
    assert assigned["a"] | assigned["b"] == {0, 1}
    b.close()
    a.close()


def check_read_committed_sees_committed_transactions_only(kit: Kit) -> None:
    topic = kit.topic()
    p = kit.producer(transactional_id=kit.group())
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, value=b"aborted", key=b"k", partition=0)
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    p.produce(topic, value=b"open", key=b"k", partition=0)
    p.flush(30)
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    # an open transaction holds back everything after it (the last stable offset)
    assert _quiet(c) == []
    p.commit_transaction(30)
    [msg] = _read(c, 1)
    assert msg.value() == b"open"
    # offsets: aborted record 0, its abort marker 1, the committed record 2, its marker 3
    assert msg.offset() == 2
    c.close()


def check_offsets_sent_to_a_transaction_commit_with_it(kit: Kit) -> None:
    src, out, group = kit.topic(), kit.topic(), kit.group()
    _produce(kit.producer(), src, [b"a", b"b"])
    c = kit.consumer(group)
    c.subscribe([src])
    _read(c, 2)
    p = kit.producer(transactional_id=group)
    p.init_transactions(30)
    tp = TopicPartition(src, 0)
    p.begin_transaction()
    p.produce(out, value=b"x", key=b"k", partition=0)
    p.send_offsets_to_transaction([TopicPartition(src, 0, 1)], c.consumer_group_metadata(), 30)
    p.flush(30)  # an abort racing the first AddPartitionsToTxn is fatal (librdkafka #4849)
    p.abort_transaction(30)
    assert c.committed([tp], timeout=30)[0].offset < 0
    p.begin_transaction()
    p.produce(out, value=b"y", key=b"k", partition=0)
    p.send_offsets_to_transaction([TopicPartition(src, 0, 2)], c.consumer_group_metadata(), 30)
    p.commit_transaction(30)
    assert c.committed([tp], timeout=30)[0].offset == 2
    c.close()


def check_a_new_transactional_producer_fences_the_old_one(kit: Kit) -> None:
    topic, txn_id = kit.topic(), kit.group()
    old = kit.producer(transactional_id=txn_id)
    old.init_transactions(30)
    old.begin_transaction()
    old.produce(topic, value=b"zombie", key=b"k", partition=0)
    old.flush(30)
    new = kit.producer(transactional_id=txn_id)
    new.init_transactions(60)  # aborts the old producer's open transaction
    with pytest.raises(KafkaException) as info:
        old.commit_transaction(30)
    assert info.value.args[0].fatal()
    new.begin_transaction()
    new.produce(topic, value=b"live", key=b"k", partition=0)
    new.commit_transaction(30)
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    assert [m.value() for m in _read(c, 1)] == [b"live"]
    assert _quiet(c, 1.0) == []
    c.close()


def check_a_partition_moves_after_its_owner_committed_in_on_revoke(kit: Kit) -> None:
    """Cooperative rebalancing: the new owner starts where the old one committed on revoke."""
    topic, group = kit.topic(partitions=2), kit.group()
    p = kit.producer()
    for partition in (0, 1):
        _produce(p, topic, [b"old1", b"old2"], partition=partition)
    a = kit.consumer(group)
    closing: list[bool] = []

    def on_revoke(consumer: Any, partitions: list[TopicPartition]) -> None:
        if closing:
            # What is checked is the move; the revoke of close() has nothing left to commit
            # (the loops commit before they close), and a commit there is a race with the
            # leave: it failed with UNKNOWN_MEMBER_ID in 1 of 2 runs of a loaded machine.
            return
        ends = [TopicPartition(tp.topic, tp.partition, 2) for tp in partitions]
        consumer.commit(offsets=ends, asynchronous=False)

    a.subscribe([topic], on_revoke=on_revoke)
    _read(a, 4)
    b = kit.consumer(group)
    b.subscribe([topic])

    def moved() -> bool:
        a.consume(1, 0.1)
        b.consume(1, 0.1)
        return len(b.assignment()) == 1

    _until(moved, "a partition moved to the second member")
    partition = b.assignment()[0].partition
    _produce(p, topic, [b"new"], partition=partition)
    assert [m.value() for m in _read(b, 1)] == [b"new"]
    # `a` first, while it is still a member: closed after `b`, it would have to rejoin the
    # rebalance `b`'s leave starts.
    closing.append(True)
    a.close()
    b.close()


def check_restore_consumer_reads_to_the_log_end_by_positions(kit: Kit) -> None:
    """What ``libs.state.stores`` relies on to restore a changelog partition: the high
    watermark follows the isolation level (the last stable offset under read_committed,
    the log end otherwise), a group-less consumer reads from an explicit offset, and its
    position moves past transaction markers no record is returned for."""
    topic = kit.topic()
    p = kit.producer(transactional_id=kit.group())
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(topic, value=b"a", key=b"a", partition=0)
    p.produce(topic, value=b"b", key=b"b", partition=0)
    p.commit_transaction(30)  # offsets 0, 1, commit marker 2
    p.begin_transaction()
    p.produce(topic, value=b"c", key=b"c", partition=0)  # offset 3, open
    p.flush(30)
    tp = TopicPartition(topic, 0)
    committed: Any = kit.consumer(kit.group())
    uncommitted: Any = kit.consumer(kit.group(), **{"isolation.level": "read_uncommitted"})
    assert committed.get_watermark_offsets(tp, timeout=30) == (0, 3)
    assert uncommitted.get_watermark_offsets(tp, timeout=30) == (0, 4)
    meta = committed.list_topics(topic, timeout=30)
    assert len(meta.topics[topic].partitions) == 1
    committed.incremental_assign([TopicPartition(topic, 0, 1)])
    assert [m.value() for m in _read(committed, 1)] == [b"b"]

    def position() -> int:
        committed.consume(1, 0.1)
        return int(committed.position([tp])[0].offset)

    _until(lambda: position() == 3, "position past the commit marker, at the open transaction")
    p.commit_transaction(30)  # commit marker 4
    assert [m.value() for m in _read(committed, 1)] == [b"c"]
    _until(lambda: position() == 5, "position past the second commit marker")
    committed.incremental_unassign([tp])
    assert committed.assignment() == []
    committed.close()
    uncommitted.close()


def check_assign_reads_without_joining_a_group(kit: Kit) -> None:
    topic = kit.topic(partitions=2)
    _produce(kit.producer(), topic, [b"a", b"b", b"c"])
    c = kit.consumer(kit.group())
    meta = c.list_topics(topic, timeout=30).topics[topic]
    assert meta.error is None and sorted(meta.partitions) == [0, 1]
    missing = f"{topic}-missing"
    gone = c.list_topics(missing, timeout=30).topics[missing]
    assert gone.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and not gone.partitions
    assert c.get_watermark_offsets(TopicPartition(topic, 0), timeout=30) == (0, 3)
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    assert [m.value() for m in _read(c, 3)] == [b"a", b"b", b"c"]
    assert [(p.topic, p.partition) for p in c.assignment()] == [(topic, 0)]
    c.assign([TopicPartition(topic, 0, 1)])
    assert [m.value() for m in _read(c, 2)] == [b"b", b"c"]
    c.close()


CHECKS: list[Callable[[Kit], None]] = [
    check_produce_then_consume_in_order,
    check_headers_round_trip,
    check_a_new_member_resumes_from_the_committed_offset,
    check_commit_inside_on_revoke_counts,
    check_seek_rewinds,
    check_pause_stops_fetching_and_resume_goes_on,
    check_assign_callbacks_and_sharing_with_a_second_member,
    check_read_committed_sees_committed_transactions_only,
    check_offsets_sent_to_a_transaction_commit_with_it,
    check_a_new_transactional_producer_fences_the_old_one,
    check_a_partition_moves_after_its_owner_committed_in_on_revoke,
    check_restore_consumer_reads_to_the_log_end_by_positions,
    check_assign_reads_without_joining_a_group,
]
