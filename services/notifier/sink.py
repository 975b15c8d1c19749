"""The notifier's sink loop: consume, deliver per channel, produce receipts, then commit.

``libs.kafka.ProcessingLoop`` is a consume-transform-produce loop: a record is finished when
its handler returns. A Slack post is a side effect that takes from milliseconds to a rate
limit's minutes, so this loop tracks every record until its receipt is acknowledged:

Offsets
    An offset is *finished* when every record produced for it (its receipt, and a dead letter
    for a permanent failure) is acknowledged by the broker (``acks=all``), or at once when the
    message is skipped (a final receipt exists). Per partition the contiguous prefix of finished
    offsets is committed every ``commit_interval_s``, on revoke and on stop
    (``libs.kafka.OffsetTracker``). A crash replays only unfinished messages, and the receipts
    table plus the in-doubt markers keep the replay from posting twice.

Channels
    ``slack-messages`` is keyed by channel, so a channel lives in one partition, but a
    partition carries many channels. Consumed messages wait in a FIFO per channel; only the
    head of a channel is ever in flight, so posts stay in order per channel while a rate-limited
    or failing channel waits (``Retry-After``, backoff) without holding up the others. Each
    channel also has a local token bucket (about one post per second, as Slack allows).

Pausing, never sleeping
    A partition is paused when its consumed-but-unfinished messages reach
    ``max_buffered_per_partition`` and resumed at half of that. The loop keeps polling the
    consumer all the time; it only ever waits inside ``consume()`` or on the completion queue
    of the Slack calls, each bounded by ``poll_timeout_s``, so ``max.poll.interval.ms`` is never
    at risk, whatever Slack does.

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
    committing, so they are on the topic before the partition is reassigned; the new owner
    polls its table on every turn and starts no message of a newly assigned partition for
    ``assign_settle_s`` (0.5 s), far longer than the table takes to fetch them. This narrows
    the window to practically nothing but does not close it by construction: that would need
    the table to expose its positions, so the loop could wait until they reach the receipts
    topic's high watermarks snapshotted at assignment (proposed for ``libs.tables``).

The offset bookkeeping is ``libs.kafka.OffsetTracker``; the pause/resume bookkeeping does not
depend on Slack either and could move there when a second sink needs it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import Random
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge

from libs.kafka import (
    DeadLetterPublisher,
    DeliveryError,
    FatalLoopError,
    OffsetTracker,
    ProducerClient,
)
from libs.kafka.bounded import MARGIN_S, call_bounded
from libs.runtime.heartbeat import beat
from libs.serde import (
    DeserializationError,
    SlackDeliveryReceipt,
    SlackMessage,
)
from services.notifier import core
from services.notifier.core import (
    Bucket,
    Decision,
    Delivery,
    Fatal,
    Finish,
    Proceed,
    Retry,
    RetryPolicy,
    Step,
)
from services.notifier.markers import AttemptLog
from services.notifier.slack import Notifier

log = logging.getLogger(__name__)

TP = tuple[str, int]
Headers = list[tuple[str, str | bytes | None]] | None

MESSAGES = Counter(
    "notifier_messages_total",
    "Messages finished, by outcome (delivered, failed, dry_run, skipped, undecodable)",
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
BUFFERED = Gauge("notifier_buffered_messages", "Consumed messages not finished yet")
PAUSED = Gauge("notifier_paused_partitions", "Partitions paused (buffer full or on hold)")
INFLIGHT = Gauge("notifier_slack_calls_in_flight", "Slack calls in flight")
BEHIND = Gauge(
    "notifier_receipts_behind_messages",
    "Messages of this replica's partitions without a final outcome (receipt) yet: "
    "not consumed, or consumed and not finished",
)


class SlackDeliveryError(Exception):
    """A message Slack refused for good (the dead letter's ``dlq.error.class``)."""


class ReceiptTable(Protocol):
    """What the loop needs of the receipts table (a ``GlobalTable`` in production)."""

    def get(self, key: str) -> SlackDeliveryReceipt | None: ...

    def put_local(self, key: str, value: bytes | None) -> None: ...

    def poll(self, max_records: int = 1000, timeout_s: float = 0.0) -> int: ...


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
    #: after an assignment, how long the partition's messages wait for the receipts table
    assign_settle_s: float = 0.5
    policy: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class SinkStats:
    """Counts for the stop log line and for tests."""

    consumed: int = 0
    delivered: int = 0
    failed: int = 0
    dry_run: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    undecodable: int = 0
    posts: int = 0
    history_checks: int = 0
    found_in_history: int = 0
    unverified: int = 0
    retries: int = 0
    rate_limited: int = 0
    commits: int = 0
    assignments: int = 0
    revocations: int = 0
    pauses: int = 0


# -- per message and per channel state ---------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    """One consumed record until its receipt (and dead letter) is acknowledged."""

    tp: TP
    offset: int
    epoch: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    message: SlackMessage
    delivery: Delivery | None = None
    acks_pending: int = 0
    dropped: bool = False


@dataclass(eq=False)
class _Channel:
    name: str
    queue: deque[_Entry] = field(default_factory=deque)
    busy: bool = False
    not_before: float = 0.0
    bucket: Bucket | None = None
    scheduled: float | None = None


@dataclass(frozen=True)
class _Completion:
    channel: _Channel
    entry: _Entry
    step: Step
    future: Future[object]


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
        markers: AttemptLog,
        decode: Decode,
        encode: Encode,
        stop: threading.Event,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        rng: Random | None = None,
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
        self._consumer = Consumer(consumer_config)
        self._client = ProducerClient(
            Producer(producer_config), timeout_s=config.drain_timeout_s, transactional=False
        )
        self._producer = self._client.producer
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="slack")
        self._completions: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
        self._tracker = OffsetTracker()
        self._channels: dict[str, _Channel] = {}
        self._ready: list[tuple[float, int, _Channel]] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._paused: set[TP] = set()
        self._hold_until: dict[TP, float] = {}
        self._settle_until: dict[TP, float] = {}
        self._delivery_errors: list[str] = []
        self._fatal: str | None = None
        self._last_commit = self._mono()
        self._last_table_poll = 0.0
        self._closing = False
        self.last_turn = self._mono()
        self.assigned: set[TP] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> SinkStats:
        """Consume and deliver until stopped; drain, commit and close on the way out."""
        self._consumer.subscribe(
            [self.config.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._turn()
            self._drain(None)
            self._flush()
            self._commit(None)
        finally:
            # Revoke callbacks during close() have nothing left to do: drained and committed.
            self._closing = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            try:
                call_bounded("consumer close", 10.0 + MARGIN_S, self._consumer.close)
            finally:
                for problem in self._client.close(10.0):
                    log.error(problem)
        if self._fatal is not None:
            raise FatalLoopError(f"stopping on a fatal Slack error: {self._fatal}")
        return self.stats

    def _turn(self) -> None:
        now = self._mono()
        self.last_turn = now
        beat(self.config.service)
        self._take_completions(block_s=0.0)
        self._producer.poll(0)
        self._raise_delivery_errors()
        self._dispatch()
        self._flow_control(now)
        settling = self._settling(now)
        if settling or now - self._last_table_poll >= self.config.table_poll_interval_s:
            self._last_table_poll = now
            while self._table.poll(max_records=1000) >= 1000:
                pass
        if now - self._last_commit >= self.config.commit_interval_s:
            self._commit(None)
            self._observe_backlog()
        wait = self.config.poll_timeout_s
        if self._ready and self._in_flight < self.config.concurrency:
            wait = max(0.0, min(wait, self._ready[0][0] - self._mono()))
        if self._in_flight:
            msgs = self._consumer.consume(self.config.batch_size, 0)
            if not msgs:
                # Wake on the first finished Slack call rather than at the end of the wait.
                self._take_completions(block_s=wait)
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
                if err.fatal():
                    raise FatalLoopError(f"consumer error: {err.str()}")
                log.warning("consumer error", extra={"error": err.str()})
                continue
            tp: TP = (str(msg.topic()), int(msg.partition() or 0))
            if tp in held:
                continue
            epoch = self._tracker.epoch(tp)
            if epoch is None:
                continue  # a partition no longer ours
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
                self._tracker.add(tp, offset)
                self._dead_letter_undecodable(msg, tp, offset, epoch, exc)
                continue
            self._tracker.add(tp, offset)
            entry = _Entry(
                tp, offset, epoch, msg.key(), msg.value(), _headers(msg), message=message
            )
            channel = self._channels.get(message.channel)
            if channel is None:
                channel = self._channels[message.channel] = _Channel(message.channel)
            channel.queue.append(entry)
            if len(channel.queue) == 1 and not channel.busy:
                self._schedule(channel, channel.not_before)
        BUFFERED.set(self._tracker.total_outstanding())

    def _settling(self, now: float) -> bool:
        for tp in [tp for tp, until in self._settle_until.items() if now >= until]:
            del self._settle_until[tp]
        return bool(self._settle_until)

    def _hold(self, tp: TP, offset: int, reason: str) -> None:
        self._tracker.rewind(tp, offset)
        self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
        self._hold_until[tp] = self._mono() + self.config.decode_retry_s
        log.warning(
            "schema registry unavailable, partition on hold",
            extra={"partition": f"{tp[0]}[{tp[1]}]", "offset": offset, "error": reason},
        )

    def _dead_letter_undecodable(
        self, msg: Message, tp: TP, offset: int, epoch: int, exc: Exception
    ) -> None:
        self.stats.undecodable += 1
        MESSAGES.labels("undecodable").inc()
        token = _Acks(tp, offset, epoch, None, 1)
        self._publish_dead_letter(token, tp, offset, msg.key(), msg.value(), _headers(msg), exc)

    # -- scheduling ------------------------------------------------------------------------
    def _schedule(self, channel: _Channel, at: float) -> None:
        channel.scheduled = at
        heapq.heappush(self._ready, (at, next(self._seq), channel))

    def _dispatch(self) -> None:
        now = self._mono()
        while (
            self._ready and self._ready[0][0] <= now and self._in_flight < self.config.concurrency
        ):
            at, _, channel = heapq.heappop(self._ready)
            if channel.scheduled != at or channel.busy or not channel.queue:
                continue  # superseded by a later schedule
            channel.scheduled = None
            self._start_head(channel, now)
            now = self._mono()

    def _start_head(self, channel: _Channel, now: float) -> None:
        """Run the channel's head as far as it goes without waiting."""
        while channel.queue and not channel.busy:
            entry = channel.queue[0]
            settle = self._settle_until.get(entry.tp)
            if settle is not None and now < settle and entry.delivery is None:
                self._schedule(channel, settle)
                return
            if entry.delivery is None:
                existing = self._table.get(entry.message.message_id)
                if core.already_final(existing):
                    self._skip(channel, entry, existing)
                    continue
                marker = self._markers.get(entry.message.message_id)
                entry.delivery = core.start(entry.message, marker)
                if marker is not None:
                    log.info(
                        "post of a previous run is in doubt, checking the history first",
                        extra=_ids(entry, attempts=marker.attempts),
                    )
            action = core.next_action(entry.delivery, now=self._now(), policy=self.config.policy)
            if isinstance(action, Finish):
                self._finish(channel, entry, action)
                continue
            if action.step is Step.POST and self.config.pace:
                channel.bucket, wait = core.take_token(
                    channel.bucket, now, self.config.rate_per_channel_per_s, self.config.rate_burst
                )
                if wait > 0:
                    self._schedule(channel, now + wait)
                    return
            self._submit(channel, entry, action)
            return

    def _submit(self, channel: _Channel, entry: _Entry, action: Proceed) -> None:
        delivery = action.delivery
        if action.step is Step.POST:
            assert action.request is not None
            delivery, marker = core.begin_post(delivery, self._now())
            # Written before the call: if the process dies before the receipt is acknowledged,
            # the next run knows this post is in doubt.
            self._markers.put(entry.message.message_id, marker)
            request = action.request
            future: Future[object] = self._pool.submit(self._notifier.post, request)
            self.stats.posts += 1
        else:
            oldest = core.history_oldest(delivery, self.config.policy)
            future = self._pool.submit(
                self._notifier.find_post, entry.message.channel, entry.message.message_id, oldest
            )
            self.stats.history_checks += 1
        entry.delivery = delivery
        channel.busy = True
        self._in_flight += 1
        INFLIGHT.set(self._in_flight)
        completion = _Completion(channel, entry, action.step, future)
        future.add_done_callback(lambda _: self._completions.put(completion))

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

    def _complete(self, c: _Completion) -> None:
        self._in_flight -= 1
        INFLIGHT.set(self._in_flight)
        channel, entry = c.channel, c.entry
        channel.busy = False
        assert entry.delivery is not None
        try:
            outcome = c.future.result()
        except Exception as exc:  # a bug in an adapter: treat as an unanswered call
            log.exception("Slack call raised", extra=_ids(entry))
            outcome = core.Unavailable(f"{type(exc).__name__}: {exc}", in_doubt=True)
        now = self._now()
        jitter = self._rng.random()
        decision: Decision
        if c.step is Step.POST:
            if not isinstance(outcome, core.PostOutcome):
                outcome = core.Unavailable(f"unexpected answer {outcome!r}", in_doubt=True)
            SLACK_CALLS.labels("chat.postMessage", _result(outcome)).inc()
            decision = core.after_post(
                entry.delivery, outcome, now=now, policy=self.config.policy, jitter=jitter
            )
        else:
            if not isinstance(outcome, core.HistoryOutcome):
                outcome = core.Unavailable(f"unexpected answer {outcome!r}", in_doubt=True)
            SLACK_CALLS.labels("conversations.history", _result(outcome)).inc()
            decision = core.after_history(
                entry.delivery, outcome, now=now, policy=self.config.policy, jitter=jitter
            )
            self._count_check(entry, outcome, decision)
        if entry.dropped:
            # Its partition was revoked or lost while the call was in flight: still record a
            # final outcome (a fact the next owner's table will see), retry nothing.
            channel.queue.popleft()
            if isinstance(decision, Finish):
                self._produce_finish(entry, decision)
            self._continue(channel)
            return
        self._decide(channel, entry, decision)

    def _count_check(self, entry: _Entry, outcome: object, decision: Decision) -> None:
        if isinstance(outcome, core.Found):
            self.stats.found_in_history += 1
            IN_DOUBT.labels("found").inc()
            log.info("in-doubt post found in the history, not posting again", extra=_ids(entry))
        elif isinstance(outcome, core.NotFound):
            IN_DOUBT.labels("not_found").inc()
        elif isinstance(decision, Proceed | Finish) and not isinstance(outcome, core.RateLimited):
            self.stats.unverified += 1
            IN_DOUBT.labels("unverified").inc()
            log.warning(
                "in-doubt post cannot be verified, posting again (at-least-once)",
                extra=_ids(entry, error=getattr(outcome, "error", None)),
            )

    def _decide(self, channel: _Channel, entry: _Entry, decision: Decision) -> None:
        if isinstance(decision, Finish):
            self._finish(channel, entry, decision)
            self._continue(channel)
        elif isinstance(decision, Retry):
            entry.delivery = decision.delivery
            self.stats.retries += 1
            RETRIES.labels("ratelimited" if decision.rate_limited else "error").inc()
            if decision.rate_limited:
                self.stats.rate_limited += 1
            channel.not_before = self._mono() + decision.delay_s
            log.info(
                "retrying later",
                extra=_ids(
                    entry,
                    reason=decision.reason,
                    delay_s=round(decision.delay_s, 3),
                    attempts=decision.delivery.attempts,
                ),
            )
            self._schedule(channel, channel.not_before)
        elif isinstance(decision, Proceed):
            entry.delivery = decision.delivery
            self._schedule(channel, max(channel.not_before, self._mono()))
        elif isinstance(decision, Fatal):
            self._fatal = decision.error
            log.error(
                "fatal Slack error: every message would fail alike, stopping",
                extra=_ids(entry, error=decision.error),
            )

    def _continue(self, channel: _Channel) -> None:
        if channel.queue and not channel.busy:
            self._schedule(channel, max(channel.not_before, self._mono()))

    # -- finishing ---------------------------------------------------------------------------
    def _skip(
        self, channel: _Channel, entry: _Entry, existing: SlackDeliveryReceipt | None
    ) -> None:
        channel.queue.popleft()
        self.stats.skipped += 1
        MESSAGES.labels("skipped").inc()
        log.info(
            "already has a final receipt, skipped",
            extra=_ids(entry, status=existing.status if existing else None),
        )
        # A marker left by a crash between the receipt's ack and the marker's deletion.
        self._markers.delete(entry.message.message_id)
        self._tracker.finish(entry.tp, entry.offset, entry.epoch)

    def _finish(self, channel: _Channel, entry: _Entry, decision: Finish) -> None:
        channel.queue.popleft()
        self._produce_finish(entry, decision)

    def _produce_finish(self, entry: _Entry, decision: Finish) -> None:
        receipt = decision.receipt
        status = receipt.status
        if status == "DELIVERED":
            self.stats.delivered += 1
        elif status == "DRY_RUN":
            self.stats.dry_run += 1
        else:
            self.stats.failed += 1
        MESSAGES.labels(status.lower()).inc()
        extra = _ids(entry, status=status, attempts=receipt.attempts, slack_ts=receipt.slack_ts)
        if receipt.error:
            extra["error"] = receipt.error
        log.log(logging.WARNING if status == "FAILED" else logging.INFO, "receipt", extra=extra)
        value = self._encode(receipt)
        acks = _Acks(
            entry.tp,
            entry.offset,
            entry.epoch,
            entry.message.message_id,
            2 if decision.dead_letter else 1,
        )
        self._produce(self.config.receipts_topic, receipt.message_id.encode(), value, None, acks)
        # Read-your-own-write: the next copy of this message (a replay right behind it in the
        # channel queue) must see the receipt before it has gone round the topic.
        self._table.put_local(receipt.message_id, value)
        if decision.dead_letter:
            self._publish_dead_letter(
                acks,
                entry.tp,
                entry.offset,
                entry.key,
                entry.value,
                entry.headers,
                SlackDeliveryError(decision.dead_letter),
            )

    def _publish_dead_letter(
        self,
        acks: _Acks,
        tp: TP,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        error: Exception,
    ) -> None:
        def produce(topic: str, *, key: bytes | None, value: bytes | None, headers: Any) -> None:
            self._produce(topic, key, value, list(headers or ()), acks)

        DeadLetterPublisher(produce, self.config.service).publish(
            source_topic=tp[0],
            partition=tp[1],
            offset=offset,
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
        acks: _Acks,
    ) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            self._acked(acks, err)

        self._client.produce(topic, key, value, headers, on_delivery)

    def _acked(self, acks: _Acks, err: KafkaError | None) -> None:
        if err is not None:
            self._delivery_errors.append(f"{err.str()} (offset {acks.offset} of {acks.tp})")
            return
        acks.pending -= 1
        if acks.pending:
            return
        if acks.message_id is not None:
            self._markers.delete(acks.message_id)
        self._tracker.finish(acks.tp, acks.offset, acks.epoch)

    def _raise_delivery_errors(self) -> None:
        if self._delivery_errors:
            errors = self._delivery_errors[:3]
            raise DeliveryError(
                f"receipts or dead letters not acknowledged: {errors}; their offsets stay "
                "uncommitted and are replayed (without reposting) after the restart"
            )

    # -- flow control and commits ----------------------------------------------------------
    def _flow_control(self, now: float) -> None:
        limit = self.config.max_buffered_per_partition
        for tp in self._tracker.partitions():
            hold = self._hold_until.get(tp)
            if hold is not None and now >= hold:
                del self._hold_until[tp]
                hold = None
            outstanding = self._tracker.outstanding(tp)
            if tp in self._paused:
                if hold is None and outstanding <= limit // 2:
                    self._consumer.resume([TopicPartition(tp[0], tp[1])])
                    self._paused.discard(tp)
                    log.info(
                        "partition resumed",
                        extra={"partition": f"{tp[0]}[{tp[1]}]", "buffered": outstanding},
                    )
            elif hold is not None or outstanding >= limit:
                self._consumer.pause([TopicPartition(tp[0], tp[1])])
                self._paused.add(tp)
                self.stats.pauses += 1
                log.info(
                    "partition paused",
                    extra={
                        "partition": f"{tp[0]}[{tp[1]}]",
                        "buffered": outstanding,
                        "reason": "on hold" if hold is not None else "buffer full",
                    },
                )
        PAUSED.set(len(self._paused))

    def _commit(self, only: Sequence[TP] | None) -> None:
        self._last_commit = self._mono()
        self._prune_channels()
        offsets = self._tracker.committable(only)
        if not offsets:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise FatalLoopError(f"commit failed: {err.str()}") from exc
            # A rebalance in progress, say: the offsets are committed at the next interval (or
            # the next owner replays a few messages, which the receipts table skips).
            log.warning("commit failed, will retry", extra={"error": err.str()})
            return
        self._tracker.committed(offsets)
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
                    self._tracker.outstanding(tp),
                )
                for tp in sorted(self.assigned)
            )
        )

    def _prune_channels(self) -> None:
        # One entry per DM user ever seen would grow without bound; an idle channel whose
        # bucket has refilled and whose Retry-After has passed carries no state worth keeping.
        horizon = self._mono() - self.config.rate_burst / self.config.rate_per_channel_per_s
        idle = [
            name
            for name, ch in self._channels.items()
            if not ch.queue
            and not ch.busy
            and ch.not_before < horizon
            and (ch.bucket is None or ch.bucket.updated < horizon)
        ]
        for name in idle:
            del self._channels[name]

    def _flush(self) -> None:
        remaining = self._producer.flush(self.config.drain_timeout_s)
        self._raise_delivery_errors()
        if remaining:
            log.warning("receipts not acknowledged at stop", extra={"remaining": remaining})

    def _drain(self, partitions: set[TP] | None) -> None:
        """Wait (bounded) for the Slack calls in flight of ``partitions`` (None: all)."""

        def pending() -> int:
            return sum(
                1
                for ch in self._channels.values()
                if ch.busy and ch.queue and (partitions is None or ch.queue[0].tp in partitions)
            )

        deadline = self._mono() + self.config.drain_timeout_s
        while self._in_flight and pending() and self._mono() < deadline:
            self._take_completions(block_s=min(0.1, max(0.0, deadline - self._mono())))
            self._producer.poll(0)
        if pending():
            log.warning(
                "Slack calls still in flight after the drain timeout", extra={"calls": pending()}
            )

    # -- rebalances ------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats.assignments += 1
        settle = self._mono() + self.config.assign_settle_s
        for p in partitions:
            tp = (p.topic, p.partition)
            self._tracker.assign(tp)
            self.assigned.add(tp)
            self._settle_until[tp] = settle
        log.info("partitions assigned", extra={"partitions": _names(partitions)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats.revocations += 1
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("partitions revoked", extra={"partitions": _names(partitions)})
        if self._closing:
            self._release(revoked)
            return
        self._forget_queued(revoked)
        self._drain(revoked)
        self._flush()
        self._commit(list(revoked))
        self._release(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("partitions lost", extra={"partitions": _names(partitions)})
        self._forget_queued(lost)
        self._release(lost)

    def _forget_queued(self, tps: set[TP]) -> None:
        """Drop queued messages of ``tps``; a head in flight stays, marked, until it completes."""
        for channel in self._channels.values():
            head = channel.queue[0] if channel.busy and channel.queue else None
            kept = deque(e for e in channel.queue if e.tp not in tps and e is not head)
            if head is not None:
                head.dropped = head.dropped or head.tp in tps
                kept.appendleft(head)
            channel.queue = kept

    def _release(self, tps: set[TP]) -> None:
        for tp in tps:
            self._tracker.drop(tp)
            self._paused.discard(tp)
            self._hold_until.pop(tp, None)
            self._settle_until.pop(tp, None)
            self.assigned.discard(tp)
        for name in [n for n, ch in self._channels.items() if not ch.queue and not ch.busy]:
            del self._channels[name]


@dataclass(eq=False)
class _Acks:
    """Acknowledgements still awaited for one offset."""

    tp: TP
    offset: int
    epoch: int
    message_id: str | None
    pending: int


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
        "message_id": entry.message.message_id,
        "channel": entry.message.channel,
        "partition": entry.tp[1],
        "offset": entry.offset,
        **more,
    }


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
