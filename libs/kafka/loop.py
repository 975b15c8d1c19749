"""The consume-process-produce loop with checkpoints, dead letters and graceful shutdown.

Checkpoint order (the only order that never loses or duplicates output):

* exactly-once: every output and dead letter of the interval is produced inside one
  transaction; the checkpoint sends the consumed positions with
  ``send_offsets_to_transaction`` and commits the transaction, so output and progress become
  visible to ``read_committed`` readers together or not at all;
* at-least-once: flush the producer (every output acknowledged), then commit the offsets;
  a crash between the two replays the interval, never skips it.

After either, ``on_checkpoint`` runs (the place to flush local state). A checkpoint happens
every ``checkpoint_interval_s``, after ``max_uncommitted`` records, when partitions are revoked,
and on stop. The loop never sleeps: a handler that needs to wait raises ``RetryLater`` and
the loop rewinds to the last checkpoint and pauses the assignment while it keeps polling.

A rollback (``RetryLater``, an aborted transaction) returns *every* partition the loop has
received records from since the checkpoint to its checkpoint, including partitions whose
records were fetched in the same batch but not handled yet: their position has moved past
those records, and dropping them without a seek would lose them for good.

Fail closed: only ``poison_errors`` (decoding and validation errors) dead-letter a record. Any
other exception of the handler is a bug or an outage, not the record's fault: the loop stops
with the record's coordinates, and Kubernetes restarts the process, which replays from the
last checkpoint. Every blocking producer and consumer call is bounded (``call_bounded``): a
client that does not answer in time is wedged. A wedged transactional producer is replaced in
place (``_replace_producer``); any other wedged client stops the loop rather than hang it. A
static member's consumer fenced under its own ``group.instance.id`` is replaced in place too
(``_replace_consumer``, ``libs.kafka.consumer.replace_fenced``): its partitions count as lost,
and the new consumer gets them back, restores their state and resumes from the committed
offsets.

State (``state``, ``libs.state.stores.StateStores``): handlers read and write the state of the
partition of the record they handle (``Emitter.state``). The checkpoint produces the
interval's state writes to the changelog before the offsets (in the same transaction, with
exactly-once) and writes them to the local stores only once committed; a rollback drops them.
Assigned partitions stay paused until their state is restored, between polls of the group
consumer. ``punctuate`` runs every ``punctuate_interval_s`` with the state of every restored
partition; what it produces and writes is committed with the next checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge

from libs.kafka.consumer import (
    Budget,
    ConsumerClient,
    partition_names,
    replace_fenced,
    self_fenced,
)
from libs.kafka.dlq import DeadLetterPublisher, Headers
from libs.kafka.errors import (
    ClientCallTimeoutError,
    DeliveryError,
    FatalLoopError,
    InvalidRecordError,
    is_fatal,
)
from libs.kafka.ports import ConsumerFactory, ConsumerPort, ProducerFactory
from libs.kafka.producer import ProducerClient, TransactionAbortedError
from libs.runtime.heartbeat import beat
from libs.serde import DeserializationError
from libs.state import KeyValueState

if TYPE_CHECKING:  # the loop runs without state too: rocksdict is imported only when used
    from libs.state.stores import StateStores

log = logging.getLogger(__name__)

RECORDS_IN = Counter("loop_records_consumed_total", "Records consumed", ["loop", "topic"])
RECORDS_OUT = Counter("loop_records_produced_total", "Records produced", ["loop", "topic"])
CHECKPOINTS = Counter("loop_checkpoints_total", "Checkpoints committed", ["loop"])
ABORTS = Counter("loop_aborts_total", "Intervals rolled back and replayed", ["loop", "reason"])
LAST_CHECKPOINT = Gauge("loop_last_checkpoint_timestamp_seconds", "Last checkpoint", ["loop"])


class Guarantee(StrEnum):
    """Processing guarantee of a loop."""

    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


class RetryLater(Exception):  # noqa: N818 - a signal, not a failure
    """Raised by a handler when a dependency is temporarily unavailable.

    The loop rolls back to the last checkpoint, pauses its partitions for ``delay_s`` while
    still polling (so the group membership stays alive), then replays.
    """

    def __init__(self, reason: str, delay_s: float = 1.0) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Emitter(Protocol):
    """What a handler produces through."""

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None: ...

    @property
    def state(self) -> KeyValueState:
        """The state of the partition of the record being handled (RuntimeError without)."""
        ...


Handler = Callable[[Message, Emitter], None]
#: (state of every assigned and restored partition, an emitter, wall-clock epoch seconds)
Punctuator = Callable[[Mapping[tuple[str, int], KeyValueState], Emitter, float], None]


@dataclass
class LoopConfig:
    """How a loop runs; built by the service from its settings."""

    name: str
    topics: Sequence[str]
    guarantee: Guarantee = Guarantee.EXACTLY_ONCE
    checkpoint_interval_s: float = 0.5
    max_uncommitted: int = 5000
    batch_size: int = 500
    poll_timeout_s: float = 0.2
    transaction_timeout_s: float = 30.0
    #: exceptions that mean "this record is bad": it is dead-lettered and the loop goes on;
    #: any other exception of the handler stops the loop (fail closed)
    poison_errors: tuple[type[BaseException], ...] = (DeserializationError, InvalidRecordError)
    #: how long closing the clients may take before the process gives up on them
    close_timeout_s: float = 10.0
    #: wedged transactional producers replaced in place within 10 minutes before the loop
    #: gives up (exits non-zero)
    max_producer_replacements: int = 3
    #: static-member consumers fenced under their own instance id and replaced in place
    #: within 10 minutes before the loop gives up
    max_consumer_replacements: int = 3
    #: how often the punctuator runs (wall-clock driven work: windows closing, parks expiring)
    punctuate_interval_s: float = 1.0


@dataclass
class LoopStats:
    """Counts for the stop log line and for tests."""

    consumed: int = 0
    produced: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0
    aborts: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)


class _Out:
    """The emitter handed to handlers: counts and forwards to the producer."""

    def __init__(self, loop: ProcessingLoop) -> None:
        self._loop = loop

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None:
        self._loop._produce(topic, key=key, value=value, headers=headers)

    @property
    def state(self) -> KeyValueState:
        loop = self._loop
        if loop._state is None:
            raise RuntimeError("this loop keeps no state (ProcessingLoop(state=...))")
        if loop._current is None:
            raise RuntimeError("no record is being handled: a punctuator gets the states")
        return loop._state.state(loop._current)


class ProcessingLoop:
    """Runs ``handler`` over every record of ``config.topics`` until ``stop`` is set."""

    def __init__(
        self,
        config: LoopConfig,
        consumer_config: dict[str, Any],
        producer_config: dict[str, Any],
        handler: Handler,
        *,
        service: str,
        stop: threading.Event,
        on_checkpoint: Callable[[], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        consumer_factory: ConsumerFactory = Consumer,
        producer_factory: ProducerFactory = Producer,
        state: StateStores | None = None,
        punctuate: Punctuator | None = None,
    ) -> None:
        self.config = config
        self.stats = LoopStats()
        # Records consumed and produced per topic since the counters were last published
        # (``_publish_counts``, at every checkpoint and on close): a Prometheus counter's
        # inc() takes a lock per call, and the hot path counted one per record each way.
        self._in_counts: dict[str, int] = {}
        self._out_counts: dict[str, int] = {}
        self._handler = handler
        self._stop = stop
        self._on_checkpoint = on_checkpoint
        self._on_idle = on_idle
        self._eos = config.guarantee is Guarantee.EXACTLY_ONCE
        if self._eos and "transactional.id" not in producer_config:
            raise ValueError("exactly-once needs a transactional.id in the producer config")
        if not self._eos:
            producer_config = {k: v for k, v in producer_config.items() if k != "transactional.id"}
        producer_config = dict(producer_config)
        producer_config.setdefault(
            "transaction.timeout.ms", int(config.transaction_timeout_s * 1000)
        )
        self._consumer_factory = consumer_factory
        self._consumer_config = consumer_config
        self._consumer: ConsumerPort = consumer_factory(consumer_config)
        # blocking consumer calls are given the transaction timeout and bounded past it
        self._consumer_client = ConsumerClient(
            self._consumer, timeout_s=config.transaction_timeout_s
        )
        self._producer_factory = producer_factory
        self._producer_config = producer_config
        self._client = self._new_client()
        self._producer_budget = Budget(config.max_producer_replacements)
        self._consumer_budget = Budget(config.max_consumer_replacements)
        # set when the loop stops on an error: nothing more is committed on the way out
        self._failed = False
        self._dlq = DeadLetterPublisher(self._produce, service)
        self._out = _Out(self)
        # next offset to consume per partition, as of the records handled since the checkpoint
        self._pending: dict[tuple[str, int], int] = {}
        # offset of the first record received per partition since the checkpoint (rewind target)
        self._base: dict[tuple[str, int], int] = {}
        self._uncommitted = 0
        self._last_checkpoint = time.monotonic()
        self._paused_until: float | None = None
        self.last_poll = time.monotonic()
        self._state = state
        self._punctuate = punctuate
        self._last_punctuate = time.monotonic()
        #: the partition of the record being handled (``Emitter.state``)
        self._current: tuple[str, int] | None = None

    def _new_client(self) -> ProducerClient:
        return ProducerClient(
            self._producer_factory(self._producer_config),
            timeout_s=self.config.transaction_timeout_s,
            transactional=self._eos,
            # exactly-once: a failed output aborts the transaction, so no Python report per
            # output (with success reports on, for state, one per record delivered)
            record_failures=not self._eos,
        )

    # -- producing -------------------------------------------------------------------------
    def _produce(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        self._client.produce(topic, key, value, headers)
        self.stats.produced += 1
        counts = self._out_counts
        counts[topic] = counts.get(topic, 0) + 1

    # -- checkpoints -----------------------------------------------------------------------
    def _offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self._pending.items()]

    def checkpoint(self, *, in_rebalance: bool = False) -> None:
        """Make everything handled so far durable (see the module docstring for the order).

        ``in_rebalance``: called from the revoke callback (``ConsumerClient.commit``).
        """
        self._publish_counts()  # whatever becomes of the interval: records count when handled
        state = self._state
        if self._pending or self._client.in_transaction or (state is not None and state.dirty):
            offsets = self._offsets()
            if state is not None:
                if self._eos:
                    offsets += self._fencing_offsets(state.dirty_partitions())
                state.write_changelog(self._client.produce_run)
            if self._eos:
                try:
                    self._client.commit(offsets, self._consumer.consumer_group_metadata())
                except TransactionAbortedError as exc:
                    self._rollback(str(exc))
                    return
                except ClientCallTimeoutError as exc:
                    self._replace_producer(str(exc))
                    return
            else:
                self._flush_and_commit(offsets, in_rebalance=in_rebalance)
            if state is not None:
                state.commit()  # only now: local state never holds what was not committed
            self._pending.clear()
            self._base.clear()
            self._uncommitted = 0
            self.stats.checkpoints += 1
            CHECKPOINTS.labels(self.config.name).inc()
            LAST_CHECKPOINT.labels(self.config.name).set(time.time())
        if self._on_checkpoint is not None:
            self._on_checkpoint()
        self._last_checkpoint = time.monotonic()

    def _publish_counts(self) -> None:
        """Add the records counted since the last call to the Prometheus counters.

        Called at every checkpoint (every ``checkpoint_interval_s`` at the latest, with
        at-least-once too) and on close, so the counters lag the loop by at most an interval.
        A record counts once it is handled, as when the counters were incremented per record:
        an interval rolled back and replayed counts its records again, and nothing counted is
        dropped by a rollback (the counts are only ever cleared here).
        """
        name = self.config.name
        for counts, metric in ((self._in_counts, RECORDS_IN), (self._out_counts, RECORDS_OUT)):
            if counts:
                for topic, n in counts.items():
                    metric.labels(name, topic).inc(n)
                counts.clear()

    def _fencing_offsets(self, written: list[tuple[str, int]]) -> list[TopicPartition]:
        """Positions of partitions whose state changed without a record handled (punctuation).

        Offsets in the transaction are what fences a zombie (KIP-447): the coordinator
        refuses them from a member of an old generation, and the transaction aborts. A
        transaction with state writes but no offsets would commit even after the partition
        moved to another member, whose restored state it would then contradict. Unhandled
        records have been rolled back, so the position is the next record to handle. A
        partition that has returned no record since it was assigned has no position yet
        (librdkafka): its writes go unfenced, as the loop has nothing of its own to commit.
        """
        idle = [TopicPartition(t, p) for t, p in written if (t, p) not in self._pending]
        if not idle:
            return []
        return [tp for tp in self._consumer.position(idle) if tp.offset >= 0]

    def _flush_and_commit(self, offsets: list[TopicPartition], *, in_rebalance: bool) -> None:
        try:
            self._client.flush()
        except DeliveryError as exc:
            raise DeliveryError(
                f"{exc}; offsets not committed, the interval will be replayed after restart"
            ) from exc
        # A commit the group refuses (CommitFailedError) stops the loop: the outputs are
        # flushed, so the restart replays the interval (at-least-once).
        self._consumer_client.commit(offsets, in_rebalance=in_rebalance)

    def _rollback(self, reason: str) -> None:
        """Throw away the interval since the last checkpoint and rewind to replay it."""
        log.warning(
            "rolling back to last checkpoint", extra={"loop": self.config.name, "reason": reason}
        )
        self.stats.aborts += 1
        ABORTS.labels(self.config.name, reason.split(":")[0]).inc()
        try:
            self._client.abort()
        except ClientCallTimeoutError as exc:
            if not self._eos:
                raise
            self._replace_producer(str(exc))
            return
        if self._state is not None:
            self._state.abort()
        self._rewind()
        self._pending.clear()
        self._uncommitted = 0

    def _replace_producer(self, reason: str) -> None:
        """Abandon a wedged transactional producer for a new one with the same id.

        The new producer's ``init_transactions`` fences the wedged one and aborts whatever
        transaction it had open; that transaction may have committed before, though, so the
        consumer resumes from the offsets the group has committed (``committed()`` of a
        ``read_committed`` consumer waits for pending transactional offsets), not from our
        own idea of the last checkpoint. Too many replacements in a row mean something else
        is wrong: the loop stops (``ClientCallTimeoutError``) and the process restarts.
        """
        if not self._producer_budget.spend():
            raise ClientCallTimeoutError(
                f"{reason}; the producer was replaced {self._producer_budget.used - 1} times "
                "in 10 minutes, giving up"
            )
        log.error(
            "producer wedged, replacing it (the new one fences the old)",
            extra={"loop": self.config.name, "reason": reason},
        )
        self.stats.aborts += 1
        ABORTS.labels(self.config.name, "producer wedged").inc()
        self._client = self._new_client()
        for attempt in range(1, 4):
            try:
                # waits for the coordinator to abort the wedged producer's transaction
                self._client.init_transactions()
                break
            except FatalLoopError as exc:
                # CONCURRENT_TRANSACTIONS while the coordinator still aborts the old
                # transaction, a timeout: anything but a fatal error is worth another try
                cause = exc.__cause__
                fatal = not isinstance(cause, KafkaException) or cause.args[0].fatal()
                if fatal or attempt == 3:
                    raise
                log.warning(
                    "init_transactions of the replacement failed, retrying",
                    extra={"loop": self.config.name, "error": str(exc), "attempt": attempt},
                )
        # Only partitions that returned records since the checkpoint can be past the
        # committed offsets; the others' positions are where the group's offsets are.
        moved = [TopicPartition(t, p) for t, p in self._base]
        committed = self._consumer_client.committed(moved)
        for tp in committed:
            # nothing committed yet: back to the first record received since assignment
            offset = tp.offset if tp.offset >= 0 else self._base[(tp.topic, tp.partition)]
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        if self._state is not None:
            # the changelog may hold the abandoned transaction's writes: restore again
            self._consumer.pause([TopicPartition(t, p) for t, p in self._state.invalidate()])
        self._pending.clear()
        self._base.clear()
        self._uncommitted = 0

    def _replace_consumer(self, err: KafkaError) -> None:
        """Replace a consumer fenced under its own ``group.instance.id`` (module docstring).

        Everything it owned counts as lost, as on a session timeout: the open transaction is
        aborted (its offsets were sent under the fenced member) and uncommitted state dropped;
        the new consumer resumes from the committed offsets and restores the state again.
        """
        owned = set(self._pending) | set(self._base)
        if self._state is not None:
            owned |= set(self._state.states()) | set(self._state.restoring_partitions())
        self._consumer_client = replace_fenced(
            self._consumer_client,
            lambda: self._consumer_factory(self._consumer_config),
            err=err,
            budget=self._consumer_budget,
            owned=owned,
            lose=lambda tps: self._on_lost(self._consumer, tps),
            close_timeout_s=self.config.close_timeout_s,
            log_extra={"loop": self.config.name},
        )
        ABORTS.labels(self.config.name, "consumer fenced").inc()
        self._consumer = self._consumer_client.consumer
        self._subscribe()

    def _rewind(self) -> None:
        # Seek every partition received from since the checkpoint back to its first record
        # after it; seeking also drops what librdkafka had prefetched past that point.
        for (topic, partition), offset in self._base.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))
        self._base.clear()

    # -- rebalances ------------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return  # a replaced consumer closing: it owns nothing any more
        log.info(
            "partitions assigned",
            extra={"loop": self.config.name, "partitions": partition_names(partitions)},
        )
        if self._paused_until is not None:
            consumer.pause(partitions)
        if self._state is not None:
            # no record of these is handled before their state is restored (and the pause
            # may not hold here: see _drop_unrestored)
            consumer.pause(partitions)
            self._state.assigned([(tp.topic, tp.partition) for tp in partitions])

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return
        log.info(
            "partitions revoked",
            extra={"loop": self.config.name, "partitions": partition_names(partitions)},
        )
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        if self._failed:
            if self._state is not None:
                self._state.lost(revoked)
            return  # stopping on an error: the next owner replays from the last checkpoint
        # Commit before the partitions move: their next owner starts from our offsets.
        self.checkpoint(in_rebalance=True)
        if self._state is not None:
            self._state.revoked(revoked)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return
        log.warning(
            "partitions lost",
            extra={"loop": self.config.name, "partitions": partition_names(partitions)},
        )
        # Our offsets may no longer be committed; the new owner replays from its checkpoint.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = {k: v for k, v in self._pending.items() if k not in lost}
        self._base = {k: v for k, v in self._base.items() if k not in lost}
        if self._client.in_transaction:
            self._rollback("partitions lost")
        if self._state is not None:
            self._state.lost(lost)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> LoopStats:
        """Consume until the stop event is set; checkpoint and close on the way out."""
        if self._eos:
            self._client.init_transactions()
        self._subscribe()
        log.info(
            "loop started",
            extra={
                "loop": self.config.name,
                "topics": list(self.config.topics),
                "guarantee": self.config.guarantee.value,
            },
        )
        try:
            while not self._stop.is_set():
                self._poll_once()
            self.checkpoint()
        except BaseException:
            self._failed = True
            raise
        finally:
            self._close()
        log.info(
            "loop stopped",
            extra={
                "loop": self.config.name,
                "consumed": self.stats.consumed,
                "produced": self.stats.produced,
                "dead_lettered": self.stats.dead_lettered,
                "checkpoints": self.stats.checkpoints,
                "aborts": self.stats.aborts,
            },
        )
        return self.stats

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            list(self.config.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _poll_once(self) -> None:
        now = time.monotonic()
        self.last_poll = now
        beat(self.config.name)
        if self._paused_until is not None and now >= self._paused_until:
            self._consumer.resume(self._resumable(self._consumer.assignment()))
            self._paused_until = None
        if self._on_idle is not None:
            self._on_idle()
        poll_timeout = self.config.poll_timeout_s
        if self._state is not None and self._state.restoring:
            self._restore_step()
            poll_timeout = 0.0  # restoring is the work: the poll only keeps the member alive
        # Wait for the first record only, then take whatever else is already fetched:
        # consume(n, timeout) would hold a partial batch for the whole timeout at low rates.
        first = self._consumer.poll(poll_timeout)
        msgs = (
            [] if first is None else [first, *self._consumer.consume(self.config.batch_size - 1, 0)]
        )
        if self._state is not None and self._state.restoring:  # after the poll: it assigns
            msgs = self._drop_unrestored(msgs)
        # Every partition we received records from now has a rewind target, handled or not: a
        # rollback below must return the unhandled rest of this batch too (see module doc).
        for msg in msgs:
            if msg.error() is None:
                self._base.setdefault(
                    (str(msg.topic()), int(msg.partition() or 0)), int(msg.offset() or 0)
                )
        for i, msg in enumerate(msgs):
            err = msg.error()
            if err is not None:
                if self_fenced(err, self._consumer_config):
                    # the rest of the batch came from partitions that are no longer ours
                    self._replace_consumer(err)
                    return
                if is_fatal(err):
                    raise FatalLoopError(f"consumer error: {err.str()}")
                log.warning("consumer error", extra={"loop": self.config.name, "error": err.str()})
                continue
            try:
                self._handle(msg)
            except RetryLater as retry:
                self._retry_later(retry, discarded=len(msgs) - i)
                return
        if (
            self._punctuate is not None
            and self._paused_until is None  # a dependency is down: the punctuator waits too
            and now - self._last_punctuate >= self.config.punctuate_interval_s
        ):
            self._last_punctuate = now
            self._run_punctuator()
        self._client.poll()
        if (
            self._uncommitted >= self.config.max_uncommitted
            or time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval_s
        ):
            self.checkpoint()

    def _retry_later(self, retry: RetryLater, *, discarded: int) -> None:
        self._rollback(f"retry later: {retry}")
        self._consumer.pause(self._consumer.assignment())
        self._paused_until = time.monotonic() + retry.delay_s
        log.warning(
            "pausing",
            extra={
                "loop": self.config.name,
                "reason": str(retry),
                "delay_s": retry.delay_s,
                "discarded": discarded,
            },
        )

    # -- state -----------------------------------------------------------------------------
    def _resumable(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """``partitions`` without those whose state is still being restored."""
        if self._state is None:
            return partitions
        state = self._state
        return [tp for tp in partitions if state.is_ready((tp.topic, tp.partition))]

    def _restore_step(self) -> None:
        assert self._state is not None
        ready = self._state.restore()
        if ready and self._paused_until is None:
            # still paused for a RetryLater: resumed with the rest when the pause ends
            self._consumer.resume([TopicPartition(t, p) for t, p in ready])

    def _drop_unrestored(self, msgs: list[Message]) -> list[Message]:
        """Never hand a record of a partition whose state is not restored to the handler.

        The pause in ``_on_assign`` does not hold for a partition the consumer has not known
        before: librdkafka ignores a pause of a partition it keeps no state for yet, and the
        assignment made after the callback starts fetching it (seen on the real broker).
        So every partition still restoring is paused again here, after the poll that
        assigned it, and records already fetched are not consumed: the partition is sought
        back to the first of them, to be fetched again once restored.
        """
        assert self._state is not None
        state = self._state
        self._consumer.pause([TopicPartition(t, p) for t, p in state.restoring_partitions()])
        keep: list[Message] = []
        back: dict[tuple[str, int], int] = {}
        for msg in msgs:
            if msg.error() is None:
                tp = (str(msg.topic()), int(msg.partition() or 0))
                if not state.is_ready(tp):
                    back.setdefault(tp, int(msg.offset() or 0))
                    continue
            keep.append(msg)
        for (topic, partition), offset in back.items():
            log.info(
                "records of a partition still restoring were fetched; sought back",
                extra={"loop": self.config.name, "partition": f"{topic}[{partition}]"},
            )
            self._consumer.seek(TopicPartition(topic, partition, offset))
        return keep

    def _run_punctuator(self) -> None:
        assert self._punctuate is not None
        states = self._state.states() if self._state is not None else {}
        try:
            self._punctuate(states, self._out, time.time())
        except RetryLater as retry:
            self._retry_later(retry, discarded=0)
        except FatalLoopError:
            raise
        except Exception as exc:
            raise FatalLoopError(f"punctuator failed: {type(exc).__name__}: {exc}") from exc

    def _handle(self, msg: Message) -> None:
        topic, partition, offset = (
            str(msg.topic()),
            int(msg.partition() or 0),
            int(msg.offset() or 0),
        )
        key = (topic, partition)
        self._base.setdefault(key, offset)
        self.stats.consumed += 1
        counts = self._in_counts
        counts[topic] = counts.get(topic, 0) + 1
        self._current = key
        try:
            self._handler(msg, self._out)
        except (RetryLater, FatalLoopError):
            raise
        except self.config.poison_errors as exc:
            self._dlq.publish_message(msg, exc)
            self.stats.dead_lettered += 1
        except Exception as exc:
            # Not the record's fault (a bug, an outage): dead-lettering would write off the
            # whole stream. Stop; the restart replays from the last checkpoint.
            log.error(
                "handler failed on a record that is not poison, stopping",
                extra={
                    "loop": self.config.name,
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "error_class": f"{type(exc).__module__}.{type(exc).__qualname__}",
                    "error": str(exc),
                },
            )
            raise FatalLoopError(
                f"handler failed on {topic}[{partition}]@{offset}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._current = None
        self._pending[key] = offset + 1
        self._uncommitted += 1

    def _close(self) -> None:
        # Errors here would replace the exception that brought us here (a fatal transaction
        # state after a broker outage, say): log them instead. A wedged client is not called
        # again; each step gets ``close_timeout_s``, so closing never hangs the process.
        bound = self.config.close_timeout_s
        self._publish_counts()  # a loop stopped by an error has not checkpointed them
        try:
            for problem in self._client.close(bound):
                log.error(problem, extra={"loop": self.config.name})
            if self._client.wedged:
                log.error(
                    "a client is wedged; consumer not closed", extra={"loop": self.config.name}
                )
                return
            for problem in self._consumer_client.close(bound):
                log.error(problem, extra={"loop": self.config.name})
        finally:
            if self._state is not None:
                # after the consumer: its close revokes, and the revoke's checkpoint commits
                self._state.close()
