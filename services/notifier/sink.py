"""The notifier's sink loop: consume, deliver per channel, produce receipts, then commit.

``libs.kafka.ProcessingLoop`` is a consume-transform-produce loop: a record is finished when
its handler returns. A Slack post is a side effect that takes from milliseconds to a rate
limit's minutes, so this loop tracks every record until its receipt is acknowledged. It is
the I/O shell around two pure parts: ``services.notifier.core`` decides what to do with one
message from what Slack answered, and ``services.notifier.scheduler`` decides which channel
goes next, which partition is paused and which offsets are committable (per-channel FIFOs,
pacing, ``Retry-After`` holds; see its docstring). This module does the calls.

Offsets
    An offset is *finished* when every record produced for it (its receipt, and a dead letter
    for a permanent failure) is acknowledged by the broker (``acks=all``), or at once when the
    message is skipped (a final receipt exists). A dead letter is produced before its receipt,
    and the receipt only once the letter is acknowledged: a final receipt makes the message
    skipped on every replay, so it must never be on the topic without its letter. Per partition
    the contiguous prefix of finished offsets is committed every ``commit_interval_s``, on
    revoke and on stop. A crash replays only unfinished messages, and the receipts table plus
    the in-doubt markers keep the replay from posting twice.

Updates
    An update (``SlackMessage.update_of``) is a ``chat.update`` of the ts its original's
    receipt records (``core.next_update``), with a marker before the call as for a post. While
    the original has no receipt the update stays at the head of its channel (later updates of
    the same original must not overtake it) and the channel is looked at again every
    ``RetryPolicy.update_recheck_s``; other channels and polling go on. Its offset is not
    finished meanwhile, so the partition's commits wait for it (at most ``update_wait_s``).

Pausing, never sleeping
    The loop keeps polling the consumer all the time; it only ever waits inside ``consume()``
    or on the completion queue of the Slack calls, each bounded by ``poll_timeout_s``, so
    ``max.poll.interval.ms`` is never at risk, whatever Slack does.

Bounded client calls
    Every blocking Kafka call of the loop (the synchronous commit, the producer flush, the
    consumer close) goes through ``libs.kafka.ConsumerClient``/``ProducerClient``, which
    bound it with ``call_bounded``: librdkafka does not always honour its own timeouts, and a
    commit stuck in a coordinator request would stall every channel and get the member
    evicted without the process noticing. A call past ``client_call_bound_s`` raises
    ``ClientCallTimeoutError``; the client is not called again and the service exits
    non-zero (unfinished offsets stay uncommitted and are replayed, without reposting, by
    the next owner).

Threads
    Slack calls are blocking HTTP (slack-sdk over urllib, up to ``slack_timeout_s``). They run
    on a small thread pool (``concurrency``, one call per channel at a time), so a slow or
    timing-out call for one channel does not stall the others, and 100 channels at one post per
    second each need ~100 posts/s, more than one thread doing sequential HTTPS round trips to
    Slack (100-300 ms each) can do. Everything else (Kafka, the tables, the markers, the core's
    decisions) happens on the loop's own thread; workers only call Slack.

Rebalances
    On revoke the loop stops starting calls for the revoked partitions, waits (bounded) for
    their calls in flight, produces and flushes their receipts and commits, so the next owner
    starts after every message whose outcome is known. On a lost partition nothing is
    committed; calls still in flight are finished and their receipts produced (a receipt is a
    fact either way and keeps the next owner from posting again).

    The committed offset covers only the contiguous prefix; messages past it may already have
    receipts (channels of one partition progress independently), and the next owner skips them
    only if its receipts table has read those receipts. The previous owner flushed them before
    committing, so they are below the receipts topic's high watermarks once the partition is
    reassigned: the new owner snapshots those high watermarks right after the assignment and
    starts no message of the partition before the table's positions reach them
    (``services.notifier.gate``), polling the table on every turn meanwhile. The in-doubt
    markers (``services.notifier.markers``) gate the partition the same way on their own topic.

A consumer fenced under its own ``group.instance.id`` (``libs.kafka.consumer`` says how a
static member fences itself) is replaced in place: its partitions count as lost, and the new
consumer gets them back through the same gates, so a post that was in flight is checked
against Slack's history before anything is posted again.

Clients come from ``consumer_factory``/``producer_factory`` (``libs.kafka.ports``), so the
whole loop runs in unit tests on the in-memory twins of ``libs.kafka.memory``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from random import Random
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge

from libs.kafka import (
    AckTicket,
    CommitFailedError,
    ConsumerClient,
    DeadLetterPublisher,
    FatalLoopError,
    ProducerClient,
    is_fatal,
)
from libs.kafka.bounded import MARGIN_S
from libs.kafka.consumer import Budget, partition_names, replace_fenced, self_fenced
from libs.kafka.ports import ConsumerFactory, ConsumerPort, ProducerFactory
from libs.kafka.redrive import HEADER_REDRIVEN_FROM
from libs.runtime.heartbeat import beat
from libs.serde import (
    DeserializationError,
    SlackDeliveryReceipt,
    SlackMessage,
)
from services.notifier import core
from services.notifier.core import (
    Decision,
    Delivery,
    Fatal,
    Finish,
    Proceed,
    Retry,
    RetryPolicy,
    Step,
)
from services.notifier.gate import PartitionGate
from services.notifier.markers import InDoubtStore
from services.notifier.scheduler import Channel, ChannelScheduler, Entry, SchedulerConfig
from services.notifier.slack import Notifier

log = logging.getLogger(__name__)

TP = tuple[str, int]
Headers = list[tuple[str, str | bytes | None]] | None

#: While markers wait for their acknowledgement, a finished Slack call is noticed within this.
MARKER_WAIT_SLICE_S = 0.001
#: the "receipts" summary line (receipts by outcome) comes at most this often
RECEIPT_LOG_INTERVAL_S = 1.0
#: keys of applied receipts remembered for the early-marked messages' second lookup
APPLIED_KEYS_MAX = 10_000

MESSAGES = Counter(
    "notifier_messages_total",
    "Messages finished, by outcome (delivered, updated, failed, dry_run, skipped, undecodable)",
    ["outcome"],
)
SLACK_CALLS = Counter(
    "notifier_slack_calls_total", "Slack calls, by method and result", ["method", "result"]
)
RETRIES = Counter("notifier_retries_total", "Retries scheduled, by reason", ["reason"])
IN_DOUBT = Counter(
    "notifier_in_doubt_checks_total",
    "History checks of in-doubt posts, by result (found, not_found, unverified)",
    ["result"],
)
UPDATE_CHECKS = Counter(
    "notifier_update_checks_total",
    "Checks of in-doubt updates, by result (applied, not_applied, unverified)",
    ["result"],
)
UPDATE_WAITS = Gauge(
    "notifier_update_waits", "Updates waiting for the receipt of their original message"
)
BUFFERED = Gauge("notifier_buffered_messages", "Consumed messages not finished yet")
PAUSED = Gauge("notifier_paused_partitions", "Partitions paused (buffer full or on hold)")
INFLIGHT = Gauge("notifier_slack_calls_in_flight", "Slack calls in flight")
BEHIND = Gauge(
    "notifier_receipts_behind_messages",
    "Messages of this replica's partitions without a final outcome (receipt) yet: "
    "not consumed, or consumed and not finished",
)


# The children of the per-message counters, looked up once per label value rather than
# through ``labels()`` (validation and a lock) on every message.
_messages = functools.cache(MESSAGES.labels)
_slack_calls = functools.cache(SLACK_CALLS.labels)


class SlackDeliveryError(Exception):
    """A message Slack refused for good (the dead letter's ``dlq.error.class``)."""


class ReceiptTable(Protocol):
    """What the loop needs of the receipts table (a ``GlobalTable`` in production).

    ``positions()`` are the next offsets to apply per partition of the receipts topic;
    ``on_change`` (set by the loop) hears the keys of every batch of records applied: the
    answers of ``get`` change only then.
    """

    on_change: Callable[[list[bytes]], None] | None

    def get(self, key: str) -> SlackDeliveryReceipt | None: ...

    def poll(self, max_records: int = 1000, timeout_s: float = 0.0) -> int: ...

    def positions(self) -> dict[int, int]: ...

    def high_watermarks(self, timeout_s: float = 10.0) -> dict[int, int]: ...

    def caught_up_to(self, marks: Mapping[int, int]) -> bool: ...


class OwnReceipts:
    """This process's receipts until the receipts table has read them back.

    Read-your-own-write: the next copy of a message (a replay right behind it in its channel)
    and an update waiting for its original must see a receipt before it has gone round the
    topic and the table. Written through to the table's RocksDB, that was a store write per
    message, and an Avro decode per lookup; here it is a dict entry until the table's
    position in the receipt's partition has passed the receipt's offset (its delivery report
    says where it landed): from then on the table holds it, or a later record of its key.

    Kept across revokes: until the table has read it, the receipt is at least as recent as
    anything the table can answer for its key (every later record of the key lands after it
    in the same partition), whoever owns the message. A receipt without its delivery report
    stays (one the broker refuses stops the loop).
    """

    def __init__(self) -> None:
        self._receipts: dict[str, SlackDeliveryReceipt] = {}
        # per partition of the receipts topic, in the order of their delivery reports (the
        # offsets' order: the producer is idempotent)
        self._landed: dict[int, deque[tuple[int, SlackDeliveryReceipt]]] = {}

    def get(self, message_id: str) -> SlackDeliveryReceipt | None:
        """The latest receipt this process wrote for ``message_id``, until the table has it."""
        return self._receipts.get(message_id)

    def wrote(self, receipt: SlackDeliveryReceipt) -> None:
        """``receipt`` is being produced (answered from here from now on)."""
        self._receipts[receipt.message_id] = receipt

    def landed(self, receipt: SlackDeliveryReceipt, partition: int, offset: int) -> None:
        """The broker acknowledged ``receipt`` at ``partition``/``offset``."""
        landed = self._landed.get(partition)
        if landed is None:
            landed = self._landed[partition] = deque()
        landed.append((offset, receipt))

    def release(self, positions: Mapping[int, int]) -> None:
        """Forget the receipts the table has read, given its ``positions``."""
        for partition, landed in self._landed.items():
            position = positions.get(partition, 0)
            while landed and landed[0][0] < position:
                receipt = landed.popleft()[1]
                # not a newer receipt of the same message that is still on its way
                if self._receipts.get(receipt.message_id) is receipt:
                    del self._receipts[receipt.message_id]

    def __len__(self) -> int:
        return len(self._receipts)


Decode = Callable[[bytes | None, str, int, int], SlackMessage]
Encode = Callable[[SlackDeliveryReceipt], bytes]


@dataclass(frozen=True)
class SinkConfig:
    """How the loop runs; built by the app from its settings."""

    topic: str
    receipts_topic: str
    dlq_topic: str
    service: str = "notifier"
    concurrency: int = 16
    rate_per_channel_per_s: float = 1.0
    rate_burst: int = 1
    pace: bool = True
    max_buffered_per_partition: int = 500
    poll_timeout_s: float = 0.1
    commit_interval_s: float = 1.0
    batch_size: int = 500
    drain_timeout_s: float = 15.0
    table_poll_interval_s: float = 0.1
    decode_retry_s: float = 5.0
    #: how long the high watermarks snapshot of an assignment may take (per table partition)
    gate_timeout_s: float = 5.0
    #: how long a blocking Kafka call (commit, flush, close) may take before the client
    #: counts as wedged (flush and close are given less, so the bound is theirs plus a margin)
    client_call_bound_s: float = 30.0 + MARGIN_S
    #: consumers fenced under their own instance id and replaced in place within 10 minutes
    #: before the loop gives up (exits non-zero)
    max_consumer_replacements: int = 3
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def scheduling(self) -> SchedulerConfig:
        """The scheduler's part of the config."""
        return SchedulerConfig(
            concurrency=self.concurrency,
            rate_per_channel_per_s=self.rate_per_channel_per_s,
            rate_burst=self.rate_burst,
            pace=self.pace,
            max_buffered_per_partition=self.max_buffered_per_partition,
        )


@dataclass
class SinkStats:
    """Counts for the stop log line and for tests."""

    consumed: int = 0
    delivered: int = 0
    #: updates applied with chat.update (DELIVERED receipts of updates; not in ``delivered``)
    updated: int = 0
    failed: int = 0
    dry_run: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    undecodable: int = 0
    posts: int = 0
    updates: int = 0
    history_checks: int = 0
    update_checks: int = 0
    #: updates that had to wait for their original's receipt
    update_waits: int = 0
    found_in_history: int = 0
    unverified: int = 0
    retries: int = 0
    rate_limited: int = 0
    commits: int = 0
    assignments: int = 0
    revocations: int = 0
    pauses: int = 0


@dataclass(eq=False)
class _Ahead:
    """The marker of a queued post, begun while the post before it in the channel is in flight.

    ``delivery`` is the post as ``core.begin_post`` counted it; ``then`` is the post waiting
    for the marker to be durable (set once the message is the channel's head). ``receipt``
    is what the receipts lookup answered then (not final), in the loop's ``epoch`` of
    receipts applied by the table (``SinkLoop._receipts_applied``).
    """

    delivery: Delivery
    receipt: SlackDeliveryReceipt | None
    epoch: int
    durable: bool = False
    then: Callable[[], None] | None = None

    def acked(self) -> None:
        self.durable = True
        if self.then is not None:
            then, self.then = self.then, None
            then()


@dataclass(eq=False)
class _Item:
    """What the loop keeps of a consumed record (the scheduler's ``Entry.item``)."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    message: SlackMessage
    delivery: Delivery | None = None
    #: its marker, begun early (``SinkLoop._mark_ahead``) and not used by a post yet
    ahead: _Ahead | None = None


_Entry = Entry[_Item]
_Channel = Channel[_Item]


@dataclass(eq=False)
class _Completion:
    """A Slack call of a channel's head: what it answered, or what it raised."""

    channel: _Channel
    entry: _Entry
    step: Step
    outcome: object = None
    error: BaseException | None = None


_Job = tuple[Callable[[], object], _Completion]


class _Worker:
    """A Slack call thread and the calls handed to it (``None``: end)."""

    __slots__ = ("jobs", "thread")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None


class _SlackCalls:
    """The threads the Slack calls run on: as many as calls are in flight, up to ``size``.

    A call is a function and its ``_Completion``; the worker fills in the answer and puts the
    completion on ``done`` (the loop's queue). Not a ``ThreadPoolExecutor``: its ``Future``
    (a condition and its lock, created per call), the work item and the done callback were a
    tenth of the loop thread's time per message, for nothing the loop uses.

    A call is handed to the thread that finished a call last (idle threads are a stack, each
    thread waits on a queue of its own), and a thread is started only when none is idle: one
    channel, whose calls come one after the other, runs on one thread, even after a burst
    started more. (From one shared queue, with a thread started at every submit up to
    ``size``, eight threads took turns at one channel's calls, each woken cold: a call cost
    the loop's thread ~17 us of hand-off instead of ~9, and the workers ~47 us instead of
    ~33.) No lock, which a worker preempted while holding it would make the loop wait on:
    the stack's ``append`` and ``pop`` are atomic under the GIL, and a worker goes on the
    stack before the loop hears of its answer, so the call the loop starts on that answer
    finds it there.
    """

    def __init__(self, size: int, done: queue.SimpleQueue[_Completion]) -> None:
        self._size = size
        self._done = done
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._next = 0
        self._closed = False

    def submit(self, call: Callable[[], object], completion: _Completion) -> None:
        """Run ``call`` on a worker; its answer arrives on the queue as ``completion``."""
        if self._closed:
            raise RuntimeError("Slack calls submitted after shutdown")
        job = (call, completion)
        try:
            worker = self._idle.pop()  # the warmest: the others stay asleep
        except IndexError:
            if len(self._workers) < self._size:
                worker = _Worker()
                self._workers.append(worker)
                worker.jobs.put(job)
                worker.thread = threading.Thread(
                    target=self._work,
                    args=(worker,),
                    name=f"slack_{len(self._workers) - 1}",
                    daemon=False,
                )
                worker.thread.start()
                return
            # Every thread busy. The loop keeps its calls within ``size`` (the scheduler's
            # concurrency), so this is only a safety net: the call waits behind one in
            # flight. A worker takes what was handed to it before it goes idle, so nothing
            # is left behind (one handed over as it went idle runs too, though it sits on the
            # stack meanwhile: a later call may wait behind it, none is lost).
            self._next = (self._next + 1) % self._size
            worker = self._workers[self._next]
        worker.jobs.put(job)

    def _work(self, me: _Worker) -> None:
        done, idle, jobs = self._done, self._idle, me.jobs
        job = jobs.get()
        while job is not None:
            call, completion = job
            try:
                completion.outcome = call()
            except BaseException as exc:  # the loop's thread decides what it means (_complete)
                completion.error = exc
            try:
                job = jobs.get_nowait()  # handed to it while busy, or the end (None)
            except queue.Empty:
                # idle before the loop hears of the answer (the class docstring says why)
                idle.append(me)
                done.put(completion)
                job = jobs.get()
            else:
                done.put(completion)

    @property
    def threads(self) -> int:
        """Worker threads started so far."""
        return len(self._workers)

    def shutdown(self) -> None:
        """Drop the calls not started; each worker ends after the call it is in (bounded by
        the Slack client's timeout)."""
        self._closed = True
        for worker in self._workers:
            with contextlib.suppress(queue.Empty):
                while True:
                    worker.jobs.get_nowait()
            worker.jobs.put(None)


class SinkLoop:
    """Runs until ``stop`` is set or a fatal error; see the module docstring."""

    def __init__(
        self,
        config: SinkConfig,
        consumer_config: dict[str, Any],
        producer_config: dict[str, Any],
        *,
        notifier: Notifier,
        table: ReceiptTable,
        markers: InDoubtStore,
        decode: Decode,
        encode: Encode,
        stop: threading.Event,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        rng: Random | None = None,
        consumer_factory: ConsumerFactory = Consumer,
        producer_factory: ProducerFactory = Producer,
    ) -> None:
        self.config = config
        self.stats = SinkStats()
        self._notifier = notifier
        self._table = table
        self._markers = markers
        self._decode = decode
        self._encode = encode
        self._stop = stop
        self._now = wall_clock
        self._mono = monotonic
        self._rng = rng or Random()
        self._consumer_factory = consumer_factory
        self._consumer_config = consumer_config
        self._consumer_budget = Budget(config.max_consumer_replacements)
        self._consumer: ConsumerPort = consumer_factory(consumer_config)
        self._consumer_client = ConsumerClient(
            self._consumer, timeout_s=config.drain_timeout_s, bound_s=config.client_call_bound_s
        )
        # A flush is given drain_timeout_s; the client bounds it at that plus a margin.
        self._client = ProducerClient(
            producer_factory(producer_config),
            timeout_s=config.drain_timeout_s,
            transactional=False,
        )
        self._completions: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
        self._calls = _SlackCalls(config.concurrency, self._completions)
        self.scheduler: ChannelScheduler[_Item] = ChannelScheduler(config.scheduling())
        self._receipts_gate = PartitionGate(
            table, name="receipts", timeout_s=config.gate_timeout_s, monotonic=monotonic
        )
        self._fatal: str | None = None
        self._last_commit = self._mono()
        self._last_table_poll = 0.0
        #: receipts by outcome since the last "receipts" summary line (FAILED ones excepted)
        self._receipt_counts: dict[str, int] = {}
        #: receipts produced here that the table has not read back yet
        self.own_receipts = OwnReceipts()
        # The keys of the receipts the table applied since ``_applied_epoch`` began: a message
        # looked up when its marker was begun ahead is looked up again at its turn only if its
        # key is among them (or a new epoch began).
        self._applied_keys: set[bytes] = set()
        self._applied_epoch = 0
        table.on_change = self._receipts_applied
        self._last_receipt_log = self._mono()
        self._closing = False
        #: posts waiting for their marker's acknowledgement (``_submit``)
        self._posts_waiting = 0
        self.last_turn = self._mono()
        self.assigned: set[TP] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> SinkStats:
        """Consume and deliver until stopped; drain, commit and close on the way out."""
        self._subscribe()
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._turn()
            self._drain(None)
            self._flush()
            self._commit(None)
            self._log_receipts(self._mono())
        finally:
            # Revoke callbacks during close() have nothing left to do: drained and committed.
            self._closing = True
            self._calls.shutdown()
            try:
                for problem in self._consumer_client.close(10.0):
                    log.error(problem)
            finally:
                for problem in self._client.close(10.0):
                    log.error(problem)
        if self._fatal is not None:
            raise FatalLoopError(f"stopping on a fatal Slack error: {self._fatal}")
        return self.stats

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            [self.config.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _replace_consumer(self, err: KafkaError) -> None:
        """Go on with a new consumer after a fence under our own instance id (module doc)."""
        self._consumer_client = replace_fenced(
            self._consumer_client,
            lambda: self._consumer_factory(self._consumer_config),
            err=err,
            budget=self._consumer_budget,
            owned=set(self.assigned),
            lose=lambda tps: self._on_lost(self._consumer, tps),
            close_timeout_s=10.0,
            log_extra={},
        )
        self._consumer = self._consumer_client.consumer
        self._subscribe()

    def _turn(self) -> None:
        now = self._mono()
        self.last_turn = now
        beat(self.config.service)
        self._take_completions(block_s=0.0)
        self._client.poll()
        self._markers.poll()
        self._check_delivery()
        self._dispatch()
        self._flow_control(now)
        self._receipts_gate.poll()
        gated = self._receipts_gate.waiting
        if gated or now - self._last_table_poll >= self.config.table_poll_interval_s:
            self._last_table_poll = now
            while self._table.poll(max_records=1000) >= 1000:
                pass
            self.own_receipts.release(self._table.positions())
        if now - self._last_commit >= self.config.commit_interval_s:
            self._commit(None)
            self._observe_backlog()
        if now - self._last_receipt_log >= RECEIPT_LOG_INTERVAL_S:
            self._log_receipts(now)
        wait = self.scheduler.wait_s(self._mono(), self.config.poll_timeout_s)
        if self.scheduler.in_flight:
            msgs = self._consumer.consume(self.config.batch_size, 0)
            if not msgs:
                # Wake on the first finished Slack call or durable marker, not at the end.
                self._await_calls(wait)
                return
        else:
            msgs = self._consumer.consume(self.config.batch_size, wait)
        self._accept(msgs)

    # -- consuming -------------------------------------------------------------------------
    def _accept(self, msgs: list[Message]) -> None:
        held: set[TP] = set()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if self_fenced(err, self._consumer_config):
                    # the rest of the batch came from partitions that are no longer ours
                    self._replace_consumer(err)
                    return
                if is_fatal(err):
                    raise FatalLoopError(f"consumer error: {err.str()}")
                log.warning("consumer error", extra={"error": err.str()})
                continue
            tp: TP = (str(msg.topic()), int(msg.partition() or 0))
            if tp in held or self.scheduler.tracker.epoch(tp) is None:
                continue  # on hold since earlier in this batch, or a partition no longer ours
            offset = int(msg.offset() or 0)
            self.stats.consumed += 1
            try:
                message = self._decode(msg.value(), tp[0], tp[1], offset)
            except DeserializationError as exc:
                if exc.registry_unavailable:
                    # Not the record's fault: consume it again once the registry answers.
                    self._hold(tp, offset, str(exc))
                    held.add(tp)
                    self.stats.consumed -= 1
                    continue
                epoch = self.scheduler.track(tp, offset)
                assert epoch is not None
                self._dead_letter_undecodable(msg, tp, offset, epoch, exc)
                continue
            epoch = self.scheduler.track(tp, offset)
            assert epoch is not None
            item = _Item(msg.key(), msg.value(), _headers(msg), message)
            self.scheduler.enqueue(tp, offset, epoch, message.channel, item)
        BUFFERED.set(self.scheduler.outstanding())

    def _hold(self, tp: TP, offset: int, reason: str) -> None:
        self.scheduler.hold(tp, offset, self._mono(), self.config.decode_retry_s)
        self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
        log.warning(
            "schema registry unavailable, partition on hold",
            extra={"partition": f"{tp[0]}[{tp[1]}]", "offset": offset, "error": reason},
        )

    def _dead_letter_undecodable(
        self, msg: Message, tp: TP, offset: int, epoch: int, exc: Exception
    ) -> None:
        self.stats.undecodable += 1
        _messages("undecodable").inc()
        ticket = self.scheduler.tracker.expect(tp, offset, epoch, 1)
        self._publish_dead_letter(ticket, None, msg.key(), msg.value(), _headers(msg), exc)

    # -- starting Slack calls --------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._stop.is_set():
            return  # stopping: the calls in flight are drained, nothing new starts
        now = self._mono()
        while (channel := self.scheduler.next_due(now)) is not None:
            self._start_head(channel, now)
            now = self._mono()

    def _start_head(self, channel: _Channel, now: float) -> None:
        """Run the channel's head as far as it goes without waiting."""
        while (entry := channel.head) is not None and not channel.busy:
            item = entry.item
            wall = self._now()  # one clock read for the message's start, action and marker
            if item.delivery is None:
                if not (self._receipts_gate.is_open(entry.tp) and self._markers.ready(entry.tp)):
                    # the receipts table, or the partition's in-doubt markers, have not read
                    # yet what was written before the partition came to this replica
                    self.scheduler.defer(channel, now + self.config.poll_timeout_s)
                    return
                existing = self._current_receipt(item)
                if core.already_final(existing, redriven=_redriven(item.headers)):
                    self._skip(channel, entry, existing)
                    continue
                # a marker begun ahead is this process's own (_mark_ahead saw none before it)
                marker = None if item.ahead else self._markers.get(item.message.message_id)
                item.delivery = core.start(item.message, marker, now=wall)
                if marker is not None:
                    log.info(
                        "update of a previous run is in doubt, checking the message first"
                        if item.message.update_of is not None
                        else "post of a previous run is in doubt, checking the history first",
                        extra=_ids(entry, attempts=marker.attempts),
                    )
            waiting = item.delivery.waiting_since is not None
            action = core.next_action(
                item.delivery,
                now=wall,
                policy=self.config.policy,
                original=self._original(item.message),
            )
            if isinstance(action, core.Wait):
                item.delivery = action.delivery
                if self._original_behind(channel, entry):
                    continue
                self._wait(channel, entry, action, first=not waiting)
                return
            if isinstance(action, Finish):
                self.scheduler.pop(channel)
                self._produce_finish(entry, action)
                continue
            if waiting:
                log.info("the original has its receipt now, updating it", extra=_ids(entry))
            item.delivery = action.delivery  # an update keeps its target from here on
            if action.step in (Step.POST, Step.UPDATE):
                wait = self.scheduler.take_token(channel, now)
                if wait > 0:
                    self.scheduler.defer(channel, now + wait)
                    return
            self._submit(channel, entry, action, wall)
            return

    def _original(self, message: SlackMessage) -> SlackDeliveryReceipt | None:
        """The receipt of the message an update applies to (None for a post)."""
        return None if message.update_of is None else self._receipt(message.update_of)

    def _receipt(self, message_id: str) -> SlackDeliveryReceipt | None:
        """The message's receipt: this process's own first, then the table's."""
        own = self.own_receipts.get(message_id)
        return own if own is not None else self._table.get(message_id)

    def _current_receipt(self, item: _Item) -> SlackDeliveryReceipt | None:
        """The receipt of a message at its turn.

        A message whose marker was begun ahead was looked up a moment before: unless the
        table has applied a record of its key since, a receipt that came meanwhile can only
        be one this process produced (a copy of the message finishing, say a call of a
        revoked partition that was still in flight), and that is in ``own_receipts``.
        """
        ahead = item.ahead
        message_id = item.message.message_id
        if (
            ahead is None
            or ahead.epoch != self._applied_epoch
            or message_id.encode() in self._applied_keys
        ):
            return self._receipt(message_id)
        own = self.own_receipts.get(message_id)
        return own if own is not None else ahead.receipt

    def _receipts_applied(self, keys: list[bytes]) -> None:
        """The receipts table applied records of ``keys`` (its ``on_change``)."""
        if len(self._applied_keys) + len(keys) > APPLIED_KEYS_MAX:
            # bounded: the marks begun before the new epoch are looked up again at their turn
            self._applied_epoch += 1
            self._applied_keys = set()
        self._applied_keys.update(keys)

    def _original_behind(self, channel: _Channel, entry: _Entry) -> bool:
        """Move the update's original to the front when it is queued behind the update.

        Upstream orders an original before its updates; if it ever does not, the update would
        wait for a receipt that only the message behind it can produce, and fail after
        ``update_wait_s`` while the original stays stuck behind it.
        """
        update_of = entry.item.message.update_of
        behind = next(
            (e for e in channel.queue if e is not entry and e.item.message.message_id == update_of),
            None,
        )
        if behind is None:
            return False
        log.warning(
            "the original of the update is queued behind it, posting the original first",
            extra=_ids(entry, update_of=update_of),
        )
        self.scheduler.move_to_front(channel, behind)
        return True

    def _wait(self, channel: _Channel, entry: _Entry, action: core.Wait, *, first: bool) -> None:
        """The update's original has no receipt yet: the channel looks again later."""
        entry.item.delivery = action.delivery
        if first:
            self.stats.update_waits += 1
            log.info(
                "the original of the update has no receipt yet, waiting for it",
                extra=_ids(
                    entry,
                    update_of=entry.item.message.update_of,
                    wait_s=self.config.policy.update_wait_s,
                ),
            )
        self.scheduler.defer(channel, self._mono() + action.delay_s)

    def _submit(self, channel: _Channel, entry: _Entry, action: Proceed, now: datetime) -> None:
        item = entry.item
        self.scheduler.call_started(channel)
        if action.step in (Step.POST, Step.UPDATE):
            request = action.request
            assert request is not None
            call: Callable[[], object]
            ahead: _Ahead | None = None
            if isinstance(request, core.UpdateRequest):
                item.delivery, marker = core.begin_update(action.delivery, now)
                call = partial(self._notifier.update, request)
                self.stats.updates += 1
            else:
                ahead, item.ahead = item.ahead, None
                if ahead is None or action.delivery.attempts or action.delivery.in_doubt:
                    ahead = None
                    item.delivery, marker = core.begin_post(action.delivery, now)
                else:
                    item.delivery = ahead.delivery  # its marker is begun already
                call = partial(self._notifier.post, request)
                self.stats.posts += 1
            step = action.step

            def post() -> None:
                if entry.dropped:
                    # revoked while its marker was being written: the next owner posts it
                    # (after a history check, as the marker says it is in doubt)
                    self.scheduler.call_ended(channel)
                    self.scheduler.pop(channel)
                    self.scheduler.proceed(channel, self._mono())
                    return
                self._calls.submit(call, _Completion(channel, entry, step))

            def post_when_durable() -> None:
                self._posts_waiting -= 1
                post()

            # The marker must be durable before the call: if the process dies before the
            # receipt is acknowledged, the next owner knows this post (or update) is in doubt.
            if ahead is None:
                self._posts_waiting += 1
                self._markers.begin(
                    entry.tp,
                    item.message.message_id,
                    marker,
                    on_durable=post_when_durable,
                    offset=entry.offset,
                )
            elif ahead.durable:
                post()
            else:
                self._posts_waiting += 1
                ahead.then = post_when_durable
            if step is Step.POST:
                self._mark_ahead(channel)
        elif action.step is Step.CHECK_UPDATE:
            item.delivery = action.delivery
            target = action.delivery.target
            assert target is not None
            self._calls.submit(
                partial(
                    self._notifier.find_update, target.channel, target.ts, item.message.message_id
                ),
                _Completion(channel, entry, Step.CHECK_UPDATE),
            )
            self.stats.update_checks += 1
        else:
            item.delivery = action.delivery
            policy = self.config.policy
            self._calls.submit(
                partial(
                    self._notifier.find_post,
                    item.message.channel,
                    item.message.message_id,
                    core.history_oldest(action.delivery, policy),
                    core.history_latest(action.delivery, policy),
                ),
                _Completion(channel, entry, Step.CHECK_HISTORY),
            )
            self.stats.history_checks += 1

    def _mark_ahead(self, channel: _Channel) -> None:
        """Begin the marker of the post behind the head while the head's post is in flight.

        A post waits for its marker's acknowledgement (a broker round trip, ``acks=all``);
        begun here, it overlaps the post before it, and the next post starts as soon as that
        one is answered. A marker only says "a post may have been made": one whose post never
        comes costs a history check on a takeover, never a duplicate post, and is tombstoned
        on revoke and stop (``_cancel_ahead``) or by the message's receipt. So it is begun only
        when the post could follow at once (the channel's bucket holds a token: with Slack's
        pacing of one post per second and a burst of 1, never), for a plain post that is
        neither final nor in doubt already (an update's target is only known at its turn).
        The message is checked again at its turn (``_start_head``): its receipt may come in
        the meantime (a replay of the message behind its first copy).
        """
        if len(channel.queue) < 2:
            return
        head, entry = channel.queue[0], channel.queue[1]
        item, message = entry.item, entry.item.message
        if (
            item.delivery is not None
            or item.ahead is not None
            or entry.dropped
            or message.update_of is not None
            or message.message_id == head.item.message.message_id
            or not self.scheduler.has_token(channel, self._mono())
            or not (self._receipts_gate.is_open(entry.tp) and self._markers.ready(entry.tp))
        ):
            return
        receipt = self._receipt(message.message_id)
        if core.already_final(receipt) or self._markers.get(message.message_id) is not None:
            return
        started, marker = core.begin_post(Delivery(message), self._now())
        ahead = item.ahead = _Ahead(started, receipt, self._applied_epoch)
        self._markers.begin(
            entry.tp, message.message_id, marker, on_durable=ahead.acked, offset=entry.offset
        )

    def _cancel_ahead(self, tps: set[TP]) -> None:
        """Tombstone the early markers of ``tps`` whose post was never started."""
        for channel in self.scheduler.channels.values():
            for entry in channel.queue:
                if entry.tp in tps and entry.item.ahead is not None:
                    entry.item.ahead = None
                    self._markers.delete(entry.item.message.message_id)

    # -- Slack answers ---------------------------------------------------------------------
    def _take_completions(self, block_s: float) -> None:
        try:
            first = self._completions.get(timeout=block_s) if block_s > 0 else None
        except queue.Empty:
            return
        if first is not None:
            self._complete(first)
        while True:
            try:
                self._complete(self._completions.get_nowait())
            except queue.Empty:
                return

    def _await_calls(self, wait_s: float) -> None:
        """Wait at most ``wait_s`` for a finished Slack call or a marker becoming durable.

        Finished calls arrive on the completion queue, but a post starts from its marker's
        acknowledgement, which only a poll of the markers' producer serves: waiting on the
        queue alone held every post back by a whole ``poll_timeout_s`` after its marker was
        durable (one channel made 9 posts a second against a Slack answering in 1.4 ms).
        While a post waits for its marker, both are watched, in slices of
        ``MARKER_WAIT_SLICE_S``; an acknowledgement submits its post from within the poll, so
        the wait goes on (as it did) until a call finishes or the loop is due, rather than a
        turn per marker. Markers begun ahead that no post waits for yet are not watched (a
        wake-up per message for nothing): their acknowledgements are served once a call
        finishes, before what it made due is dispatched.
        """
        deadline = self._mono() + wait_s
        while self._posts_waiting and self._markers.awaiting() and self._completions.empty():
            remaining = deadline - self._mono()
            if remaining <= 0:
                return
            self._markers.wait_durable(min(remaining, MARKER_WAIT_SLICE_S))
        self._take_completions(block_s=max(0.0, deadline - self._mono()))
        if self._markers.awaiting():
            # the next post of the channel may start from a marker begun ahead at once
            self._markers.wait_durable(0.0)
        # A finished call frees its channel's next message: start it now rather than after
        # the next turn's polls (a channel's posts follow each other at the pace of answers).
        self._dispatch()

    def _complete(self, c: _Completion) -> None:
        channel, entry = c.channel, c.entry
        self.scheduler.call_ended(channel)
        delivery = entry.item.delivery
        assert delivery is not None
        outcome = c.outcome
        exc = c.error
        if exc is not None:
            if not isinstance(exc, Exception):
                raise exc  # KeyboardInterrupt, SystemExit: not the call's answer
            # a bug in an adapter: treat as an unanswered call
            log.error("Slack call raised", extra=_ids(entry), exc_info=exc)
            outcome = core.Unavailable(f"{type(exc).__name__}: {exc}", in_doubt=True)
        now = self._now()
        jitter = self._rng.random()
        expected, method, decide = _ANSWERS[c.step]
        if not isinstance(outcome, expected):
            outcome = core.Unavailable(f"unexpected answer {outcome!r}", in_doubt=True)
        _slack_calls(method, _result(outcome)).inc()
        decision: Decision = decide(
            delivery, outcome, now=now, policy=self.config.policy, jitter=jitter
        )
        check = _CHECKS.get(c.step)
        if check is not None:
            self._count_check(check, entry, outcome, decision)
        if entry.dropped:
            # Its partition was revoked or lost while the call was in flight: still record a
            # final outcome (a fact the next owner's table will see), retry nothing.
            self.scheduler.pop(channel)
            if isinstance(decision, Finish):
                self._produce_finish(entry, decision)
            self.scheduler.proceed(channel, self._mono())
            return
        self._decide(channel, entry, decision)

    def _count_check(
        self, check: _Check, entry: _Entry, outcome: object, decision: Decision
    ) -> None:
        if isinstance(outcome, core.Found):
            if check.counts_found_in_history:
                self.stats.found_in_history += 1
            check.metric.labels(check.found).inc()
            log.info(check.found_log, extra=_ids(entry))
        elif isinstance(outcome, core.NotFound):
            check.metric.labels(check.not_found).inc()
        elif isinstance(decision, Proceed | Finish) and not isinstance(outcome, core.RateLimited):
            self.stats.unverified += 1
            check.metric.labels("unverified").inc()
            log.warning(
                check.unverified_log, extra=_ids(entry, error=getattr(outcome, "error", None))
            )

    def _decide(self, channel: _Channel, entry: _Entry, decision: Decision) -> None:
        if isinstance(decision, Finish):
            self.scheduler.pop(channel)
            self._produce_finish(entry, decision)
            self.scheduler.proceed(channel, self._mono())
        elif isinstance(decision, Retry):
            entry.item.delivery = decision.delivery
            self.stats.retries += 1
            RETRIES.labels("ratelimited" if decision.rate_limited else "error").inc()
            if decision.rate_limited:
                self.stats.rate_limited += 1
            log.info(
                "retrying later",
                extra=_ids(
                    entry,
                    reason=decision.reason,
                    delay_s=round(decision.delay_s, 3),
                    attempts=decision.delivery.attempts,
                ),
            )
            self.scheduler.retry_after(channel, decision.delay_s, self._mono())
        elif isinstance(decision, Proceed):
            entry.item.delivery = decision.delivery
            self.scheduler.proceed(channel, self._mono())
        elif isinstance(decision, core.Wait):
            self._wait(channel, entry, decision, first=False)
        elif isinstance(decision, Fatal):
            self._fatal = decision.error
            log.error(
                "fatal Slack error: every message would fail alike, stopping",
                extra=_ids(entry, error=decision.error),
            )

    # -- finishing ---------------------------------------------------------------------------
    def _skip(
        self, channel: _Channel, entry: _Entry, existing: SlackDeliveryReceipt | None
    ) -> None:
        self.scheduler.pop(channel)
        self.stats.skipped += 1
        _messages("skipped").inc()
        log.info(
            "already has a final receipt, skipped",
            extra=_ids(entry, status=existing.status if existing else None),
        )
        # A marker left by a crash between the receipt's ack and the marker's deletion.
        self._markers.delete(entry.item.message.message_id)
        self.scheduler.finish(entry.tp, entry.offset, entry.epoch)

    def _produce_finish(self, entry: _Entry, decision: Finish) -> None:
        receipt = decision.receipt
        status = receipt.status
        update_of = entry.item.message.update_of
        outcome = status.lower()
        if status == "DELIVERED" and update_of is not None:
            self.stats.updated += 1
            outcome = "updated"
        elif status == "DELIVERED":
            self.stats.delivered += 1
        elif status == "DRY_RUN":
            self.stats.dry_run += 1
            if update_of is not None and receipt.slack_ts is None:
                # the original was only rendered (the adapter logs the other case)
                log.info(
                    "dry-run, would update %s (only rendered):\n%s",
                    update_of,
                    core.render_text(entry.item.message),
                    extra=_ids(entry, update_of=update_of),
                )
        else:
            self.stats.failed += 1
        _messages(outcome).inc()
        # A FAILED receipt is a line of its own; the others are counted into the periodic
        # "receipts" summary (_log_receipts), with a line each at DEBUG: a line per message was
        # a tenth of the loop's CPU (the record, the JSON, one write each), and the receipts
        # topic (``python -m services.notifier receipt``) is where a message's outcome is.
        level = logging.WARNING if status == "FAILED" else logging.DEBUG
        if status != "FAILED":
            self._receipt_counts[outcome] = self._receipt_counts.get(outcome, 0) + 1
        if log.isEnabledFor(level):
            extra = _ids(entry, status=status, attempts=receipt.attempts, slack_ts=receipt.slack_ts)
            if update_of is not None:
                extra["update_of"] = update_of
            if receipt.error:
                extra["error"] = receipt.error
            log.log(level, "receipt", extra=extra)
        value = self._encode(receipt)
        ticket = self.scheduler.tracker.expect(
            entry.tp, entry.offset, entry.epoch, 2 if decision.dead_letter else 1
        )
        message_id = entry.item.message.message_id
        own = self.own_receipts

        def landed(msg: Message) -> None:
            partition, offset = msg.partition(), msg.offset()
            if partition is not None and offset is not None:  # always, for an acknowledged one
                own.landed(receipt, partition, offset)

        def produce_receipt() -> None:
            self._produce(
                self.config.receipts_topic,
                receipt.message_id.encode(),
                value,
                None,
                ticket,
                message_id,
                landed=landed,
            )

        if decision.dead_letter:
            # The dead letter first, the receipt only once the broker has it: a final receipt
            # makes every later owner skip the message, so it must never exist without its
            # dead letter (a kill -9 between the two lost the letter for good).
            item = entry.item
            self._publish_dead_letter(
                ticket,
                message_id,
                item.key,
                item.value,
                item.headers,
                SlackDeliveryError(decision.dead_letter),
                then=produce_receipt,
            )
        else:
            produce_receipt()
        # Read-your-own-write: the next copy of this message (a replay right behind it in the
        # channel queue) must see the receipt before it has gone round the topic.
        own.wrote(receipt)

    def _log_receipts(self, now: float) -> None:
        """One INFO line with the receipts (by outcome) produced since the previous one."""
        if self._receipt_counts:
            log.info(
                "receipts",
                extra={
                    **self._receipt_counts,
                    "seconds": round(now - self._last_receipt_log, 1),
                },
            )
            self._receipt_counts = {}
        self._last_receipt_log = now

    def _publish_dead_letter(
        self,
        ticket: AckTicket,
        message_id: str | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        error: Exception,
        *,
        then: Callable[[], None] | None = None,
    ) -> None:
        def produce(topic: str, *, key: bytes | None, value: bytes | None, headers: Any) -> None:
            self._produce(topic, key, value, list(headers or ()), ticket, message_id, then=then)

        DeadLetterPublisher(produce, self.config.service).publish(
            source_topic=ticket.tp[0],
            partition=ticket.tp[1],
            offset=ticket.offset,
            key=key,
            value=value,
            error=error,
            original_headers=headers,
            topic=self.config.dlq_topic,
        )
        self.stats.dead_lettered += 1

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        ticket: AckTicket,
        message_id: str | None,
        *,
        then: Callable[[], None] | None = None,
        landed: Callable[[Message], None] | None = None,
    ) -> None:
        def on_acked(msg: Message) -> None:
            if landed is not None:
                landed(msg)
            if self.scheduler.tracker.acked(ticket) and message_id is not None:
                # the receipt is on the topic: the post is no longer in doubt
                self._markers.delete(message_id)
            if then is not None:
                then()

        self._client.produce(topic, key, value, headers, on_delivered=on_acked)

    def _check_delivery(self) -> None:
        self._client.check_delivery(
            "; their offsets stay uncommitted and are replayed (without reposting) after the "
            "restart"
        )

    # -- flow control and commits ----------------------------------------------------------
    def _flow_control(self, now: float) -> None:
        for change in self.scheduler.flow(now):
            tp = change.tp
            partition = [TopicPartition(tp[0], tp[1])]
            extra: dict[str, object] = {
                "partition": f"{tp[0]}[{tp[1]}]",
                "buffered": change.outstanding,
            }
            if change.action == "resume":
                self._consumer.resume(partition)
                log.info("partition resumed", extra=extra)
            else:
                self._consumer.pause(partition)
                self.stats.pauses += 1
                log.info("partition paused", extra={**extra, "reason": change.reason})
        PAUSED.set(len(self.scheduler.paused))
        # once a turn rather than at every call's start and end (two gauge writes a message)
        INFLIGHT.set(self.scheduler.in_flight)

    def _commit(self, only: list[TP] | None, *, in_rebalance: bool = False) -> None:
        self._last_commit = self._mono()
        self.scheduler.prune(self._last_commit)
        offsets = self.scheduler.committable(only)
        if not offsets:
            return
        try:
            # bounded: a wedged commit stops the loop (ClientCallTimeoutError); in the revoke
            # callback on the calling thread (ConsumerClient.commit says why)
            self._consumer_client.commit(offsets, in_rebalance=in_rebalance)
        except CommitFailedError as exc:
            # A rebalance in progress, say: the offsets are committed at the next interval (or
            # the next owner replays a few messages, which the receipts table skips).
            log.warning("commit failed, will retry", extra={"error": str(exc)})
            return
        self.scheduler.committed(offsets)
        self.stats.commits += 1

    def _observe_backlog(self) -> None:
        # Local calls only: librdkafka caches the end offsets from its fetch answers and
        # knows the positions, so this costs no broker round trip.
        tps = [TopicPartition(t, p) for t, p in sorted(self.assigned)]
        positions = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.position(tps)}
        BEHIND.set(
            receipts_behind(
                (
                    self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1],
                    positions.get(tp, OFFSET_INVALID),
                    self.scheduler.tracker.outstanding(tp),
                )
                for tp in sorted(self.assigned)
            )
        )
        # Only a channel's head can wait, so this counts the waiting updates.
        UPDATE_WAITS.set(
            sum(
                1
                for ch in self.scheduler.channels.values()
                if ch.head is not None
                and ch.head.item.delivery is not None
                and ch.head.item.delivery.waiting_since is not None
            )
        )

    def _flush(self) -> None:
        remaining = self._client.flush_pending(self.config.drain_timeout_s)
        self._check_delivery()
        if remaining:
            log.warning("receipts not acknowledged at stop", extra={"remaining": remaining})

    def _drain(self, partitions: set[TP] | None) -> None:
        """Wait (bounded) for the Slack calls in flight of ``partitions`` (None: all)."""
        deadline = self._mono() + self.config.drain_timeout_s
        while (
            self.scheduler.in_flight
            and self.scheduler.calls_in_flight(partitions)
            and self._mono() < deadline
        ):
            self._markers.poll()  # a post waiting for its marker is in flight too
            self._take_completions(block_s=min(0.1, max(0.0, deadline - self._mono())))
            self._client.poll()
        pending = self.scheduler.calls_in_flight(partitions)
        if pending:
            log.warning(
                "Slack calls still in flight after the drain timeout", extra={"calls": pending}
            )

    # -- rebalances ------------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return  # a replaced consumer closing: it owns nothing any more
        self.stats.assignments += 1
        tps = [(p.topic, p.partition) for p in partitions]
        self.scheduler.assign(tps)
        # nothing of these partitions starts before the tables reach their high watermarks
        self._receipts_gate.close(tps)
        self._markers.assign(tps)
        self.assigned.update(tps)
        log.info("partitions assigned", extra={"partitions": partition_names(partitions)})

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return
        self.stats.revocations += 1
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("partitions revoked", extra={"partitions": partition_names(partitions)})
        self._cancel_ahead(revoked)
        if self._closing:
            self._release(revoked)
            return
        self.scheduler.forget(revoked)
        self._drain(revoked)
        self._flush()
        self._commit(list(revoked), in_rebalance=True)
        self._release(revoked)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._consumer_client.retired:
            return
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("partitions lost", extra={"partitions": partition_names(partitions)})
        self._cancel_ahead(lost)
        self.scheduler.forget(lost)
        self._release(lost)

    def _release(self, tps: set[TP]) -> None:
        self.scheduler.release(tps)
        self._receipts_gate.forget(tps)
        self._markers.revoke(tps)
        self.assigned -= tps


#: per Slack call: the answers it may give, the API method it counts under, the core's decision
_ANSWERS: dict[Step, tuple[Any, str, Callable[..., Decision]]] = {
    Step.POST: (core.PostOutcome, "chat.postMessage", core.after_post),
    Step.UPDATE: (core.UpdateOutcome, "chat.update", core.after_update),
    Step.CHECK_UPDATE: (core.HistoryOutcome, "conversations.history", core.after_update_check),
    Step.CHECK_HISTORY: (core.HistoryOutcome, "conversations.history", core.after_history),
}


@dataclass(frozen=True)
class _Check:
    """How the answer to a check of an in-doubt call is counted and logged."""

    metric: Counter
    found: str
    not_found: str
    found_log: str
    unverified_log: str
    #: a found post counts in ``SinkStats.found_in_history``
    counts_found_in_history: bool = False


#: the checks by the step that made them
_CHECKS = {
    Step.CHECK_HISTORY: _Check(
        IN_DOUBT,
        "found",
        "not_found",
        "in-doubt post found in the history, not posting again",
        "in-doubt post cannot be verified, posting again (at-least-once)",
        counts_found_in_history=True,
    ),
    Step.CHECK_UPDATE: _Check(
        UPDATE_CHECKS,
        "applied",
        "not_applied",
        "in-doubt update found applied, not updating again",
        "in-doubt update cannot be verified, applying it again (at-least-once)",
    ),
}


def _redriven(headers: Headers) -> bool:
    """True for a record an operator re-drove from the dead-letter topic."""
    return any(name == HEADER_REDRIVEN_FROM for name, _ in headers or ())


def _headers(msg: Message) -> Headers:
    headers = msg.headers()
    if not headers:
        return None
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def receipts_behind(partitions: Iterable[tuple[int, int, int]]) -> int:
    """How many messages still wait for their receipt, over ``(end, position, outstanding)``.

    Per partition, ``end - position`` messages are not consumed yet (``end`` is the last
    stable offset, as the consumer reads committed) and ``outstanding`` are consumed but not
    finished. A partition whose end or position is not known yet (no fetch answered: a
    negative logical offset) counts its outstanding messages only. Transaction markers make
    the end run ahead of the last message by one per transaction still to be read, so this
    is an upper bound, exact once the partition is read to its end.
    """
    total = 0
    for end, position, outstanding in partitions:
        if end >= 0 and position >= 0:
            total += max(0, end - position)
        total += outstanding
    return total


def _result(outcome: object) -> str:
    if isinstance(outcome, core.Rejected):
        return outcome.error
    if isinstance(outcome, core.Unavailable):
        return "unavailable"
    return type(outcome).__name__.lower()


def _ids(entry: _Entry, **more: object) -> dict[str, object]:
    return {
        "message_id": entry.item.message.message_id,
        "channel": entry.item.message.channel,
        "partition": entry.tp[1],
        "offset": entry.offset,
        **more,
    }
