"""The in-memory Kafka twins: the port contract, plus the fault injection the loop tests use."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from libs.kafka.memory import InMemoryBroker, InMemoryConsumer, InMemoryProducer
from tests.support.kafka_contract import CHECKS, Kit


class MemoryKit:
    """``Kit`` on a fresh ``InMemoryBroker``."""

    def __init__(self) -> None:
        self.broker = InMemoryBroker()
        self._names = itertools.count()

    def topic(self, partitions: int = 1) -> str:
        name = f"t{next(self._names)}"
        self.broker.create_topic(name, partitions)
        return name

    def group(self) -> str:
        return f"g{next(self._names)}"

    def consumer(self, group: str, **overrides: Any) -> InMemoryConsumer:
        return self.broker.consumer(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **overrides,
            }
        )

    def producer(self, transactional_id: str | None = None) -> InMemoryProducer:
        conf = {} if transactional_id is None else {"transactional.id": transactional_id}
        return self.broker.producer(conf)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(check: Callable[[Kit], None]) -> None:
    check(MemoryKit())


def test_an_injected_failure_is_raised_once() -> None:
    kit = MemoryKit()
    topic = kit.topic()
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    c.consume(1, 0)
    c.fail("commit", KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    with pytest.raises(KafkaException):
        c.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    c.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
    assert kit.broker.committed_offset(c.group_id, topic, 0) == 0


def test_a_hung_call_blocks_until_released() -> None:
    kit = MemoryKit()
    topic = kit.topic()
    c = kit.consumer(kit.group())
    c.subscribe([topic])
    c.consume(1, 0)
    release = c.hang("commit")
    done = threading.Event()

    def commit() -> None:
        c.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
        done.set()

    threading.Thread(target=commit, daemon=True).start()
    assert not done.wait(0.3)
    release.set()
    assert done.wait(10)


def test_a_failed_delivery_is_reported_and_not_appended() -> None:
    kit = MemoryKit()
    topic = kit.topic()
    p = kit.producer()
    p.fail_delivery(topic, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    errors: list[KafkaError | None] = []
    for v in (b"big", b"ok"):
        p.produce(topic, value=v, on_delivery=lambda err, _m: errors.append(err))
    assert p.flush(1) == 0
    assert [e.code() if e else None for e in errors] == [KafkaError.MSG_SIZE_TOO_LARGE, None]
    assert [m.value() for m in kit.broker.records(topic)] == [b"ok"]


def test_lose_calls_on_lost_and_a_lost_member_cannot_commit() -> None:
    kit = MemoryKit()
    topic = kit.topic()
    c = kit.consumer(kit.group())
    lost: list[TopicPartition] = []
    c.subscribe([topic], on_lost=lambda _c, parts: lost.extend(parts))
    c.consume(1, 0)
    assert len(c.assignment()) == 1
    c.lose()
    c.consume(1, 0)
    assert [(p.topic, p.partition) for p in lost] == [(topic, 0)]
    assert c.assignment() == []
    with pytest.raises(KafkaException):
        c.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)


def test_a_full_local_queue_raises_buffer_error() -> None:
    kit = MemoryKit()
    topic = kit.topic()
    p = kit.broker.producer({"queue.buffering.max.messages": 2})
    p.produce(topic, value=b"1")
    p.produce(topic, value=b"2")
    with pytest.raises(BufferError):
        p.produce(topic, value=b"3")
    p.poll(0)
    p.produce(topic, value=b"3")
