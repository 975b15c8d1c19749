"""ConsumerClient on the twin: classified commits, bounded calls, a wedged consumer left alone."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, TopicPartition

from libs.kafka import ClientCallTimeoutError, CommitFailedError, ConsumerClient, FatalLoopError
from libs.kafka.memory import InMemoryBroker, InMemoryConsumer

pytestmark = pytest.mark.timeout(30)
TP = ("t", 0)


def member() -> InMemoryConsumer:
    broker = InMemoryBroker()
    broker.create_topic("t")
    c = broker.consumer({"group.id": "g", "enable.auto.commit": False})
    c.subscribe(["t"])
    c.consume(1, 0)  # joins
    return c


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (KafkaError(KafkaError.REBALANCE_IN_PROGRESS), CommitFailedError),
        (KafkaError(KafkaError._FENCED, "fenced", fatal=True), FatalLoopError),
    ],
)
def test_commit_errors_are_classified(error: KafkaError, raised: type[Exception]) -> None:
    c = member()
    c.fail("commit", error)
    client = ConsumerClient(c, timeout_s=1.0)
    with pytest.raises(raised):
        client.commit({TP: 3})
    client.commit({TP: 3})
    assert c.committed([TopicPartition(*TP)])[0].offset == 3


def test_a_wedged_call_is_bounded_and_the_consumer_is_not_called_again() -> None:
    c = member()
    release = c.hang("commit")
    client = ConsumerClient(c, timeout_s=0.1, bound_s=0.2)
    try:
        with pytest.raises(ClientCallTimeoutError, match="consumer commit"):
            client.commit([TopicPartition("t", 0, 1)])
        assert client.wedged
        with pytest.raises(ClientCallTimeoutError, match="wedged"):
            client.committed([TopicPartition("t", 0)])
        assert client.close() == ["the consumer is wedged; not closed"]
    finally:
        release.set()


def test_nothing_to_commit_makes_no_call() -> None:
    c = member()
    c.fail("commit", KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    ConsumerClient(c, timeout_s=1.0).commit({})
    assert ConsumerClient(c, timeout_s=1.0).close() == []
