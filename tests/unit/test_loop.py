"""ProcessingLoop on the in-memory Kafka twins: checkpoints, rollbacks, poison, revokes.

The same behaviours are tested against the real broker in tests/integration/test_loop_faults.py;
here they run in milliseconds and with faults the real broker cannot be made to produce.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from prometheus_client import REGISTRY

from libs.kafka import (
    Emitter,
    FatalLoopError,
    Guarantee,
    LoopConfig,
    LoopStats,
    ProcessingLoop,
    RetryLater,
)
from libs.kafka.memory import InMemoryBroker, InMemoryConsumer, InMemoryProducer
from libs.serde import DeserializationError
from tests.support.kafka import wait_until

pytestmark = pytest.mark.timeout(60)

IN, OUT = "in", "out"
Handler = Callable[["Rig", Message, Emitter], None]


def passthrough(rig: Rig, msg: Message, out: Emitter) -> None:
    out.produce(OUT, msg.key(), msg.value())


class Rig:
    """A loop over ``in`` (2 partitions) -> ``out`` on the twins, on a thread of its own."""

    def __init__(
        self, handler: Handler = passthrough, *, instance_id: str | None = None, **config: Any
    ) -> None:
        self.broker = InMemoryBroker()
        for topic, partitions in ((IN, 2), (OUT, 1), (IN + ".dlq", 1)):
            self.broker.create_topic(topic, partitions)
        self.consumers: list[InMemoryConsumer] = []
        self.producers: list[InMemoryProducer] = []
        self.handler = handler
        self.stop = threading.Event()
        defaults: dict[str, Any] = {"checkpoint_interval_s": 0.05, "poll_timeout_s": 0.02}
        consumer_config: dict[str, Any] = {
            "group.id": "g",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
        if instance_id is not None:
            consumer_config["group.instance.id"] = instance_id
        self.loop = ProcessingLoop(
            LoopConfig(name="test", topics=[IN], **{**defaults, **config}),
            consumer_config,
            {"transactional.id": "g-tx"},
            lambda msg, out: self.handler(self, msg, out),
            service="test",
            stop=self.stop,
            consumer_factory=self._consumer,
            producer_factory=self._producer,
        )
        self.error: BaseException | None = None
        self.stats: LoopStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _consumer(self, config: dict[str, Any]) -> InMemoryConsumer:
        self.consumers.append(self.broker.consumer(config))
        return self.consumers[-1]

    def _producer(self, config: dict[str, Any]) -> InMemoryProducer:
        self.producers.append(self.broker.producer(config))
        return self.producers[-1]

    def _run(self) -> None:
        try:
            self.stats = self.loop.run()
        except BaseException as exc:
            self.error = exc

    def send(self, records: list[tuple[bytes, bytes, int]]) -> None:
        p = self.broker.producer({})
        for key, value, partition in records:
            p.produce(IN, value=value, key=key, partition=partition)
        assert p.flush(1) == 0

    def start(self) -> Rig:
        self.thread.start()
        return self

    def finish(self) -> LoopStats:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "loop did not stop"
        assert self.error is None, self.error
        assert self.stats is not None
        return self.stats

    def outputs(self) -> Counter[bytes]:
        return Counter(bytes(m.value() or b"") for m in self.broker.records(OUT))

    def committed(self) -> list[int | None]:
        return [self.broker.committed_offset("g", IN, p) for p in (0, 1)]

    def ends(self) -> list[int]:
        return [self.broker.end_offset(IN, p) for p in (0, 1)]


def values(n: int, prefix: str = "v") -> list[tuple[bytes, bytes, int]]:
    return [(b"k", f"{prefix}{i}".encode(), i % 2) for i in range(n)]


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_every_record_out_once_and_committed(guarantee: Guarantee) -> None:
    rig = Rig(guarantee=guarantee).start()
    records = values(20)
    rig.send(records)
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    stats = rig.finish()
    assert rig.outputs() == Counter(v for _, v, _ in records)
    assert stats.consumed == 20 and stats.dead_lettered == 0


def test_retry_later_rewinds_every_fetched_partition() -> None:
    """A batch holds records of both partitions; the handler asks to retry later on the first
    record of one of them. Both partitions must be rewound, or the unhandled records of the
    other (fetched, position moved past them) would be lost."""
    asked: list[bytes] = []

    def flaky(rig: Rig, msg: Message, out: Emitter) -> None:
        if msg.value() == b"v3" and not asked:
            asked.append(b"v3")
            raise RetryLater("lookup not ready", delay_s=0.05)
        out.produce(OUT, msg.key(), msg.value())

    rig = Rig(flaky)
    records = values(10)
    rig.send(records)  # before the start: the first fetch returns records of both partitions
    rig.start()
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    stats = rig.finish()
    assert asked == [b"v3"] and stats.aborts == 1
    assert rig.outputs() == Counter(v for _, v, _ in records)


def test_poison_is_dead_lettered_and_the_loop_goes_on() -> None:
    def strict(rig: Rig, msg: Message, out: Emitter) -> None:
        if msg.value() == b"bad":
            raise DeserializationError("garbage", topic=IN, partition=0, offset=0)
        out.produce(OUT, msg.key(), msg.value())

    rig = Rig(strict).start()
    rig.send([(b"k", b"a", 0), (b"k", b"bad", 0), (b"k", b"b", 0)])
    wait_until(lambda: rig.committed()[0] == rig.ends()[0], timeout_s=20, message="committed")
    stats = rig.finish()
    assert stats.dead_lettered == 1
    assert rig.outputs() == Counter([b"a", b"b"])
    [dead] = rig.broker.records(IN + ".dlq")
    assert dead.value() == b"bad"


def test_a_handler_bug_stops_the_loop_and_commits_nothing_of_its_interval() -> None:
    def buggy(rig: Rig, msg: Message, out: Emitter) -> None:
        out.produce(OUT, msg.key(), msg.value())
        if msg.value() == b"boom":
            raise KeyError("a bug")

    rig = Rig(buggy, checkpoint_interval_s=60.0).start()
    rig.send([(b"k", b"a", 0), (b"k", b"boom", 0)])
    rig.thread.join(20)
    assert not rig.thread.is_alive()
    assert isinstance(rig.error, FatalLoopError), rig.error
    assert f"{IN}[0]@1" in str(rig.error)
    # the open transaction is aborted on the way out: its outputs are never visible
    assert rig.outputs() == Counter()
    assert rig.committed() == [None, None]
    assert rig.broker.records(IN + ".dlq") == []


def test_an_abortable_commit_error_rolls_back_and_replays() -> None:
    rig = Rig()
    records = values(6)
    rig.send(records)
    rig.start()
    wait_until(lambda: rig.producers, timeout_s=10)
    rig.producers[0].fail(
        "commit_transaction",
        KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True),
    )
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    stats = rig.finish()
    assert stats.aborts >= 1
    assert rig.outputs() == Counter(v for _, v, _ in records)


def test_a_failed_output_delivery_aborts_the_transaction_and_replays() -> None:
    # Exactly-once outputs carry no delivery report of their own: the failed record makes
    # the transaction abortable (librdkafka, and the twin), its commit fails, and the
    # interval is replayed.
    rig = Rig()
    rig.producers[0].fail_delivery(OUT, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    records = values(6)
    rig.send(records)
    rig.start()
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    stats = rig.finish()
    assert stats.aborts >= 1
    assert rig.outputs() == Counter(v for _, v, _ in records)


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_outputs_get_a_python_delivery_report_only_without_transactions(
    guarantee: Guarantee,
) -> None:
    # A report per output is a Python call and a Message per delivered record whenever
    # success reports are on (a loop with state): only at-least-once needs it, to see
    # failures before committing the offsets.
    rig = Rig(guarantee=guarantee)
    producer = rig.producers[0]
    reports: list[object] = []
    produce = producer.produce

    def spy(topic: str, *args: Any, **kwargs: Any) -> None:
        reports.append(kwargs.get("on_delivery"))
        produce(topic, *args, **kwargs)

    producer.produce = spy  # type: ignore[method-assign]
    records = values(6)
    rig.send(records)
    rig.start()
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    rig.finish()
    assert len(reports) == 6
    if guarantee is Guarantee.EXACTLY_ONCE:
        assert reports == [None] * 6
    else:
        assert all(r is not None for r in reports)


def test_only_a_transactional_producer_may_go_without_failure_reports() -> None:
    # without a transaction to fail, a failed delivery would go unnoticed
    from libs.kafka.producer import ProducerClient

    producer = InMemoryBroker().producer({})
    with pytest.raises(ValueError, match="transactional"):
        ProducerClient(producer, timeout_s=1, transactional=False, record_failures=False)


@pytest.mark.parametrize("call", ["send_offsets_to_transaction", "commit_transaction"])
def test_a_commit_that_keeps_timing_out_rolls_back_and_replays(call: str) -> None:
    # What a broker restart looks like to librdkafka: the transaction coordinator does not
    # answer in time, a retriable error that does not require an abort. Retried, then
    # aborted and replayed: never a stopped loop (seen: the enricher exited 1 on it).
    rig = Rig()
    records = values(6)
    rig.send(records)
    rig.start()
    wait_until(lambda: rig.producers, timeout_s=10)
    rig.producers[0].fail(
        call,
        KafkaError(KafkaError._TIMED_OUT, "coordinator did not answer", retriable=True),
        times=5,
    )
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=30, message="committed")
    stats = rig.finish()
    assert rig.error is None
    assert stats.aborts >= 1
    assert rig.outputs() == Counter(v for _, v, _ in records)


def test_revoke_checkpoints_before_the_partition_moves() -> None:
    rig = Rig(checkpoint_interval_s=60.0).start()
    rig.send(values(6))
    wait_until(lambda: rig.loop.stats.consumed == 6, timeout_s=20, message="consumed")
    assert rig.committed() == [None, None]  # no checkpoint yet: the interval is long
    other = rig.broker.consumer(
        {"group.id": "g", "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    )
    other.subscribe([IN])
    wait_until(
        lambda: (other.consume(1, 0.05) or True) and len(other.assignment()) == 1,
        timeout_s=20,
        message="a partition moved",
    )
    moved = other.assignment()[0].partition
    assert rig.committed()[moved] == rig.ends()[moved]
    rig.finish()
    other.close()
    assert rig.outputs() == Counter(v for _, v, _ in values(6))


def test_a_fenced_producer_stops_the_loop() -> None:
    rig = Rig(checkpoint_interval_s=60.0).start()
    rig.send(values(2))
    wait_until(lambda: rig.loop.stats.consumed == 2, timeout_s=20, message="consumed")
    zombie_killer = rig.broker.producer({"transactional.id": "g-tx"})
    zombie_killer.init_transactions()
    rig.stop.set()
    rig.thread.join(20)
    assert isinstance(rig.error, FatalLoopError), rig.error
    assert rig.outputs() == Counter()


def test_a_fatal_consumer_error_event_stops_the_loop() -> None:
    """A static member fenced by an instance with its group.instance.id gets an error event
    with the code _FATAL whose fatal() is False; the consumer is dead for good. The loop went
    on polling it (a live process consuming nothing: alerts lost in a broker-restart e2e run)."""
    rig = Rig().start()
    wait_until(lambda: rig.consumers, timeout_s=10, message="consumer created")
    consumer = rig.consumers[0]
    real_poll = consumer.poll
    fenced = KafkaError(
        KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer"
    )
    assert not fenced.fatal()  # the reason is_fatal exists
    sent: list[bool] = []

    def poll(timeout: float = -1) -> Message | None:
        if not sent:
            sent.append(True)
            return Message(topic=IN, error=fenced)
        return real_poll(timeout)

    consumer.poll = poll  # type: ignore[method-assign]
    rig.thread.join(20)
    assert not rig.thread.is_alive(), "the loop kept polling a fenced consumer"
    assert isinstance(rig.error, FatalLoopError), rig.error
    assert "Static consumer fenced" in str(rig.error)


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_a_static_member_fenced_by_itself_goes_on_with_a_new_consumer(
    guarantee: Guarantee,
) -> None:
    """A static member's session timed out (a coordinator moving during a broker roll), its
    rejoin under the same group.instance.id fenced the old member id, and librdkafka made
    that fatal: both enrichers of a fleet e2e run exited with no other instance of their id
    alive. The loop now drops what it owned as lost and goes on with a new consumer; the
    open interval is replayed once (exactly-once: not visible twice)."""
    rig = Rig(instance_id="pod-1", guarantee=guarantee, checkpoint_interval_s=60.0).start()
    rig.send(values(10))
    wait_until(lambda: rig.loop.stats.consumed == 10, timeout_s=20, message="first records")
    rig.consumers[0].fence()  # the interval's 10 outputs are not committed yet
    wait_until(lambda: len(rig.consumers) == 2, timeout_s=20, message="a new consumer")
    rig.send(values(10, prefix="w"))
    wait_until(lambda: rig.loop.stats.consumed >= 30, timeout_s=20, message="replay and more")
    stats = rig.finish()
    assert rig.committed() == rig.ends()
    expected = Counter(v for _, v, _ in values(10) + values(10, prefix="w"))
    if guarantee is Guarantee.EXACTLY_ONCE:
        assert rig.outputs() == expected
        assert stats.aborts >= 1  # the fenced member's open transaction
    else:  # at-least-once: the uncommitted interval may come out twice, never not at all
        assert set(rig.outputs()) == set(expected)


def test_a_static_member_fenced_again_and_again_stops_the_loop() -> None:
    """Two live processes given the same group.instance.id fence each other forever: past
    the budget the loop stops (the process restarts and the operator sees it)."""
    rig = Rig(instance_id="pod-1", max_consumer_replacements=2).start()
    for n in range(1, 4):
        wait_until(lambda n=n: len(rig.consumers) == n, timeout_s=20, message=f"consumer {n}")
        wait_until(
            lambda: rig.consumers[-1].assignment(), timeout_s=20, message="partitions assigned"
        )
        rig.consumers[-1].fence()
    rig.thread.join(20)
    assert not rig.thread.is_alive(), "the loop kept replacing its consumer"
    assert isinstance(rig.error, FatalLoopError), rig.error
    assert "replaced 2 times in 10 minutes" in str(rig.error)


def records_counted() -> tuple[float, float]:
    """``loop_records_consumed_total`` of ``in`` and ``loop_records_produced_total`` of ``out``
    of the rigs' loop ("test"), as /metrics shows them."""
    consumed = REGISTRY.get_sample_value(
        "loop_records_consumed_total", {"loop": "test", "topic": IN}
    )
    produced = REGISTRY.get_sample_value(
        "loop_records_produced_total", {"loop": "test", "topic": OUT}
    )
    return consumed or 0.0, produced or 0.0


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_record_counters_are_published_at_each_checkpoint(guarantee: Guarantee) -> None:
    """The per-record counters are plain integers added to Prometheus at each checkpoint
    (a counter's inc() locks): none of an interval shows before its checkpoint, all of it
    after, and the checkpoint on the way out adds the rest."""
    consumed, produced = records_counted()
    # a checkpoint after every 6 records, none by time
    rig = Rig(guarantee=guarantee, checkpoint_interval_s=60.0, max_uncommitted=6).start()
    rig.send(values(3))
    wait_until(lambda: rig.loop.stats.consumed == 3, timeout_s=20, message="consumed")
    assert records_counted() == (consumed, produced)  # no checkpoint yet: not published
    rig.send(values(3, prefix="w"))
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    assert records_counted() == (consumed + 6, produced + 6)
    rig.send(values(4, prefix="x"))
    wait_until(lambda: rig.loop.stats.consumed == 10, timeout_s=20, message="consumed more")
    assert records_counted() == (consumed + 6, produced + 6)
    rig.finish()  # the checkpoint on the way out
    assert records_counted() == (consumed + 10, produced + 10)


def test_record_counters_keep_what_a_rollback_replays_and_a_failed_stop_leaves() -> None:
    """Records count when handled, as they did per record: those of an aborted interval count
    again when replayed, and those handled after the last checkpoint of a loop stopped by an
    error are published on close."""
    asked: list[bytes] = []

    def flaky_then_buggy(rig: Rig, msg: Message, out: Emitter) -> None:
        if msg.value() == b"v3" and not asked:
            asked.append(b"v3")
            raise RetryLater("lookup not ready", delay_s=0.05)
        out.produce(OUT, msg.key(), msg.value())
        if msg.value() == b"boom":
            raise KeyError("a bug")

    consumed, produced = records_counted()
    rig = Rig(flaky_then_buggy)
    rig.send(values(6))
    rig.start()
    wait_until(lambda: rig.committed() == rig.ends(), timeout_s=20, message="committed")
    assert rig.loop.stats.aborts == 1
    replayed = rig.loop.stats.consumed
    assert replayed > 6  # the aborted interval's records were handled twice
    assert records_counted() == (consumed + replayed, produced + rig.loop.stats.produced)
    rig.send([(b"k", b"a", 0), (b"k", b"boom", 0)])
    rig.thread.join(20)
    assert isinstance(rig.error, FatalLoopError), rig.error
    # the stopped loop committed nothing of its last interval but counted both records
    assert rig.loop.stats.consumed == replayed + 2
    assert records_counted() == (consumed + replayed + 2, produced + rig.loop.stats.produced)
