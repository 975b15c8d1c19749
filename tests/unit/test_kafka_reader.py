"""``read_to_end`` on the in-memory twin: a broker restart during the read is waited out."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from libs.kafka import TopicError, read_to_end
from libs.kafka.memory import InMemoryBroker, InMemoryConsumer

TOPIC = "cursors"


def _broker(records: int) -> InMemoryBroker:
    broker = InMemoryBroker()
    broker.create_topic(TOPIC, 2)
    producer = broker.producer({})
    for i in range(records):
        producer.produce(TOPIC, key=f"k{i}", value=f"v{i}", partition=i % 2)
    assert producer.flush(1) == 0
    return broker


def _reader(broker: InMemoryBroker) -> InMemoryConsumer:
    return broker.consumer({"group.id": "reader-nogroup", "enable.auto.commit": False})


class ErrorEvents:
    """A consumer whose ``consume`` returns ``events`` (error events) before the records, as
    librdkafka reports a broker connection that went down."""

    def __init__(self, consumer: InMemoryConsumer, events: list[KafkaError]) -> None:
        self._consumer = consumer
        self._events = [Message(error=e) for e in events]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        events, self._events = self._events, []
        return events + self._consumer.consume(num_messages, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def test_a_broker_restart_during_the_read_is_waited_out() -> None:
    broker = _broker(6)
    c = _reader(broker)
    c.fail("list_topics", KafkaError(KafkaError._TRANSPORT, "connection refused"), 2)
    c.fail("get_watermark_offsets", KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
    c.fail("get_watermark_offsets", KafkaError(KafkaError.OFFSET_NOT_AVAILABLE))
    reader: Any = ErrorEvents(c, [KafkaError(KafkaError._ALL_BROKERS_DOWN)])
    values = sorted(m.value() for m in read_to_end(reader, TOPIC, timeout_s=30))
    assert values == [f"v{i}".encode() for i in range(6)]


def test_a_transient_error_past_the_deadline_is_raised() -> None:
    c = _reader(_broker(2))
    c.fail("get_watermark_offsets", KafkaError(KafkaError._TIMED_OUT), 1000)
    with pytest.raises(KafkaException):
        list(read_to_end(c, TOPIC, timeout_s=0.5))


@pytest.mark.parametrize(
    "code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED]
)
def test_what_no_retry_cures_is_raised_at_once(code: int) -> None:
    c = _reader(_broker(2))
    c.fail("list_topics", KafkaError(code))
    with pytest.raises(KafkaException) as raised:
        list(read_to_end(c, TOPIC, timeout_s=30))
    assert raised.value.args[0].code() == code


def test_a_missing_topic() -> None:
    broker = InMemoryBroker()
    assert list(read_to_end(_reader(broker), "nothing", timeout_s=30, missing_ok=True)) == []
    with pytest.raises(TopicError, match="not available"):
        list(read_to_end(_reader(broker), "nothing", timeout_s=0.5))
