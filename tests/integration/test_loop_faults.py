"""ProcessingLoop under faults, against the real broker: rollbacks return every fetched
record, handler bugs stop the loop instead of dead-lettering, a wedged client call is bounded."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Message, Producer

from libs.kafka import (
    ClientCallTimeoutError,
    Emitter,
    FatalLoopError,
    Guarantee,
    KafkaSettings,
    LoopConfig,
    LoopStats,
    ProcessingLoop,
    RetryLater,
)
from tests.support.kafka import consume_all, create_topics, produce, unique, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Run:
    """A loop over ``topic_in`` -> ``topic_out`` on a thread of its own."""

    def __init__(self, bootstrap: str, handler: Any, **loop_kwargs: Any) -> None:
        self.bootstrap = bootstrap
        self.topic_in, self.topic_out = unique("faults-in"), unique("faults-out")
        self.group = unique("faults")
        create_topics(bootstrap, [self.topic_in, self.topic_out, self.topic_in + ".dlq"])
        self.stop = threading.Event()
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        config = loop_kwargs.pop("config", {})
        consumer_overrides = loop_kwargs.pop("consumer_overrides", {})
        self.loop = ProcessingLoop(
            LoopConfig(name="faults", topics=[self.topic_in], **config),
            kafka.consumer_config(self.group, **consumer_overrides),
            kafka.producer_config(transactional_id=f"{self.group}-tx"),
            lambda msg, out: handler(self, msg, out),
            service="faults",
            stop=self.stop,
            **loop_kwargs,
        )
        self.error: BaseException | None = None
        self.stats: LoopStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.loop.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Run:
        self.thread.start()
        return self

    def finish(self, timeout_s: float = 60) -> None:
        self.stop.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "loop did not stop"

    def outputs(self, **kwargs: Any) -> list[bytes]:
        return [bytes(m.value()) for m in consume_all(self.bootstrap, self.topic_out, **kwargs)]


def _passthrough(run: Run, msg: Message, out: Emitter) -> None:
    out.produce(run.topic_out, msg.key(), msg.value())


def test_retry_later_mid_batch_returns_every_fetched_partition(bootstrap: str) -> None:
    """Records of several partitions arrive in one batch; the handler asks to retry later
    in the middle of it. The records of partitions the loop had not reached yet were fetched
    (their position moved past them): the rollback must seek them back too. Before the fix
    they were dropped for good (seen: 63 events in, 42 never out)."""
    seen_partitions: list[int] = []
    retried = threading.Event()

    def handler(run: Run, msg: Message, out: Emitter) -> None:
        p = int(msg.partition() or 0)
        if not seen_partitions:
            # the first batch holds one partition: meanwhile the other two are fetched, so
            # the next batch holds both, and the retry comes at the first record of it
            time.sleep(2.0)
        if p not in seen_partitions:
            seen_partitions.append(p)
        if len(seen_partitions) == 2 and not retried.is_set():
            retried.set()
            raise RetryLater("registry blip", delay_s=0.5)
        out.produce(run.topic_out, msg.key(), msg.value())

    run = Run(bootstrap, handler)
    values = [f"v{i}".encode() for i in range(90)]
    produce(bootstrap, run.topic_in, [(f"k{i}", v) for i, v in enumerate(values)])
    run.start()
    try:
        wait_until(
            lambda: len(set(run.outputs(idle_s=0.5))) >= len(values) or run.error,
            timeout_s=60,
            message="every record out",
        )
    finally:
        run.finish()
    assert run.error is None, run.error
    assert retried.is_set()
    out = Counter(run.outputs(idle_s=1))
    assert set(out) == set(values), f"lost: {sorted(set(values) - set(out))[:10]}"
    assert max(out.values()) == 1, "exactly-once: a record is in the output twice"


def test_a_handler_bug_stops_the_loop_instead_of_dead_lettering(bootstrap: str) -> None:
    """Only decoding and validation errors are poison. A bug in a core (here a KeyError) stops
    the loop with the record's coordinates; nothing is dead-lettered and the record's offset
    is not committed, so the restart replays it."""

    def handler(run: Run, msg: Message, out: Emitter) -> None:
        if msg.value() == b"boom":
            raise KeyError("a bug")
        out.produce(run.topic_out, msg.key(), msg.value())

    run = Run(bootstrap, handler)
    produce(bootstrap, run.topic_in, [("k", b"ok-1"), ("k", b"boom"), ("k", b"ok-2")])
    run.start()
    run.thread.join(60)
    assert not run.thread.is_alive(), "loop did not stop on a handler bug"
    assert isinstance(run.error, FatalLoopError), run.error
    assert "KeyError" in str(run.error) and run.topic_in in str(run.error), run.error
    assert consume_all(bootstrap, run.topic_in + ".dlq", idle_s=1) == []
    assert run.outputs(idle_s=1) in ([], [b"ok-1"])
    assert b"ok-2" not in run.outputs(idle_s=0.5)


class _HangingProducer(Producer):  # type: ignore[misc]
    """A producer whose ``send_offsets_to_transaction`` never returns (librdkafka #5456)."""

    def send_offsets_to_transaction(self, *args: Any, **kwargs: Any) -> None:
        threading.Event().wait(3600)


def test_a_wedged_producer_is_replaced_in_place_and_nothing_is_lost(bootstrap: str) -> None:
    """librdkafka can block in send_offsets_to_transaction far past the timeout it is given
    (#5456). The loop bounds the call, abandons the wedged producer for a new one with the
    same transactional id (which fences it), resumes from the group's committed offsets and
    goes on: every record out exactly once, no restart. Before the fix the loop hung."""
    made: list[str] = []

    def factory(config: dict[str, Any]) -> Producer:
        made.append("hanging" if not made else "healthy")
        return _HangingProducer(config) if len(made) == 1 else Producer(config)

    run = Run(
        bootstrap,
        _passthrough,
        config={"transaction_timeout_s": 2.0},
        producer_factory=factory,
    )
    values = [f"v{i}".encode() for i in range(30)]
    produce(bootstrap, run.topic_in, [(f"k{i}", v) for i, v in enumerate(values)])
    run.start()
    try:
        wait_until(
            lambda: len(run.outputs(idle_s=0.5)) >= len(values) or run.error,
            timeout_s=90,
            message="every record out after the producer was replaced",
        )
    finally:
        run.finish()
    assert run.error is None, run.error
    assert made == ["hanging", "healthy"]
    out = Counter(run.outputs(idle_s=1))
    assert set(out) == set(values) and max(out.values()) == 1, out


def test_a_static_member_fenced_under_its_own_instance_id_goes_on_with_a_new_consumer(
    bootstrap: str,
) -> None:
    """A second join under the loop's group.instance.id gives the id a new member id and
    fences the loop's member for good (a fatal error), as the member's own rejoin after a
    session timeout against a moving coordinator did in a fleet e2e run (both enrichers
    exited). The loop replaces its consumer, which takes the id back, and goes on: every
    record out exactly once, no restart."""
    made: list[Consumer] = []

    def factory(config: dict[str, Any]) -> Consumer:
        made.append(Consumer(config))
        return made[-1]

    static = {"group.instance.id": "pod-1", "session.timeout.ms": 6000}
    run = Run(bootstrap, _passthrough, consumer_overrides=static, consumer_factory=factory)
    first = [f"a{i}".encode() for i in range(20)]
    produce(bootstrap, run.topic_in, [(f"k{i}", v) for i, v in enumerate(first)])
    run.start()
    intruder: Consumer | None = None
    try:
        wait_until(
            lambda: len(run.outputs(idle_s=0.5)) >= len(first) or run.error,
            timeout_s=90,
            message="the first records out",
        )
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        intruder = Consumer(kafka.consumer_config(run.group, **static))
        intruder.subscribe([run.topic_in])
        intruder_ = intruder

        def replaced() -> bool:
            intruder_.poll(0.2)  # drives its join, which fences the loop's member
            return len(made) >= 2 or run.error is not None

        wait_until(replaced, timeout_s=90, message="the loop's consumer replaced")
        assert run.error is None, run.error
        second = [f"b{i}".encode() for i in range(20)]
        produce(bootstrap, run.topic_in, [(f"k{i}", v) for i, v in enumerate(second)])
        wait_until(
            lambda: len(run.outputs(idle_s=0.5)) >= len(first) + len(second) or run.error,
            timeout_s=90,
            message="every record out after the consumer was replaced",
        )
    finally:
        if intruder is not None:
            with contextlib.suppress(KafkaException):  # fenced in turn by the new consumer
                intruder.close()
        run.finish()
    assert run.error is None, run.error
    out = Counter(run.outputs(idle_s=1))
    assert set(out) == set(first) | set(second) and max(out.values()) == 1, out


def test_a_producer_that_keeps_wedging_stops_the_loop(bootstrap: str) -> None:
    """Replacing is bounded too: a producer that wedges every time stops the loop with
    ClientCallTimeoutError (the service exits non-zero and is restarted) instead of hanging."""
    run = Run(
        bootstrap,
        _passthrough,
        config={"transaction_timeout_s": 2.0, "max_producer_replacements": 1},
        producer_factory=_HangingProducer,
    )
    produce(bootstrap, run.topic_in, [("k", b"v")])
    started = time.monotonic()
    run.start()
    run.thread.join(120)
    elapsed = time.monotonic() - started
    assert not run.thread.is_alive(), "the loop hangs in send_offsets_to_transaction"
    assert isinstance(run.error, ClientCallTimeoutError), run.error
    assert "replaced 1 times" in str(run.error)
    assert elapsed < 90, elapsed
    # nothing of the wedged transactions is visible to read_committed readers
    assert run.outputs(idle_s=1) == []


def test_at_least_once_loop_still_dead_letters_poison(bootstrap: str) -> None:
    """The default poison classes: a DeserializationError is dead-lettered, the loop goes on."""
    from libs.serde import DeserializationError

    def handler(run: Run, msg: Message, out: Emitter) -> None:
        if msg.value() == b"bad":
            raise DeserializationError("garbage", topic="t", partition=0, offset=0)
        out.produce(run.topic_out, msg.key(), msg.value())

    run = Run(bootstrap, handler, config={"guarantee": Guarantee.AT_LEAST_ONCE})
    produce(bootstrap, run.topic_in, [("k", b"a"), ("k", b"bad"), ("k", b"b")])
    run.start()
    try:
        wait_until(lambda: len(run.outputs(idle_s=0.5)) >= 2, timeout_s=60, message="2 outputs")
        [dead] = consume_all(bootstrap, run.topic_in + ".dlq", expected=1, timeout_s=30)
        assert dead.value() == b"bad"
    finally:
        run.finish()
    assert run.error is None, run.error
