"""The notifier's channel scheduler: which message goes next, which partition waits.

Pure bookkeeping, no I/O and no clock: the sink loop (``services.notifier.sink``) passes the
monotonic time in and carries the decisions out (starts Slack calls, pauses and resumes
partitions, commits offsets). Everything here is deterministic, so it is unit-tested
table-driven with a fake clock (``tests/unit/test_notifier_scheduler.py``).

Channels
    ``slack-messages`` is keyed by channel, so a channel lives in one partition, but a
    partition carries many channels. Consumed messages wait in a FIFO per channel; only the
    head of a channel is ever in flight, so posts stay in order per channel while a
    rate-limited or failing channel waits (``Retry-After``, backoff) without holding up the
    others. Each channel also has a token bucket (about one post per second, as Slack allows).
    Channels ready to go sit in a heap by time; at most ``concurrency`` calls are in flight.

Partitions
    A partition is paused when its consumed-but-unfinished messages reach
    ``max_buffered_per_partition`` and resumed at half of that (hysteresis, so it does not
    flap), or while it is on hold (the schema registry was unavailable: its records are
    consumed again after ``hold``). When a newly assigned partition may start is the sink's
    business (``services.notifier.gate``: its tables must first reach the high watermarks
    taken at the assignment).

Offsets
    ``libs.kafka.OffsetTracker`` knows which offsets are finished; only the contiguous prefix
    per partition is committable.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from libs.kafka.acks import OffsetTracker
from services.notifier.core import Bucket, take_token

TP = tuple[str, int]
T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    """The knobs of scheduling; the sink builds it from ``SinkConfig``."""

    concurrency: int = 16
    rate_per_channel_per_s: float = 1.0
    rate_burst: int = 1
    pace: bool = True
    max_buffered_per_partition: int = 500


@dataclass(eq=False)
class Entry(Generic[T]):
    """One consumed message until it is finished; ``item`` is the sink's own data."""

    tp: TP
    offset: int
    epoch: int
    channel: str
    item: T
    #: its partition was revoked or lost while its call was in flight: finish, never retry
    dropped: bool = False


@dataclass(eq=False)
class Channel(Generic[T]):
    """A channel's FIFO and its pacing state."""

    name: str
    queue: deque[Entry[T]] = field(default_factory=deque)
    busy: bool = False
    #: a Retry-After or backoff: nothing of the channel starts before this
    not_before: float = 0.0
    bucket: Bucket | None = None
    #: the time of its live entry in the ready heap (older entries are stale)
    scheduled: float | None = None

    @property
    def head(self) -> Entry[T] | None:
        return self.queue[0] if self.queue else None


@dataclass(frozen=True)
class FlowChange:
    """Pause or resume one partition; ``outstanding`` and ``reason`` are for the log."""

    tp: TP
    action: Literal["pause", "resume"]
    outstanding: int
    reason: str


class ChannelScheduler(Generic[T]):
    """Channels, pacing, holds and offsets of the sink (module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.tracker = OffsetTracker()
        self.channels: dict[str, Channel[T]] = {}
        self.in_flight = 0
        self.paused: set[TP] = set()
        self._ready: list[tuple[float, int, Channel[T]]] = []
        self._seq = itertools.count()
        self._hold_until: dict[TP, float] = {}

    # -- partitions ----------------------------------------------------------------------------
    def assign(self, tps: Iterable[TP]) -> None:
        """Start tracking ``tps``."""
        for tp in tps:
            self.tracker.assign(tp)

    def forget(self, tps: set[TP]) -> None:
        """Drop queued messages of ``tps``; a head in flight stays, marked, until it completes."""
        for channel in self.channels.values():
            head = channel.head if channel.busy else None
            kept = deque(e for e in channel.queue if e.tp not in tps and e is not head)
            if head is not None:
                head.dropped = head.dropped or head.tp in tps
                kept.appendleft(head)
            channel.queue = kept

    def release(self, tps: Iterable[TP]) -> None:
        """Stop tracking ``tps`` (revoked or lost); idle channels go."""
        for tp in tps:
            self.tracker.drop(tp)
            self.paused.discard(tp)
            self._hold_until.pop(tp, None)
        for name in [n for n, ch in self.channels.items() if not ch.queue and not ch.busy]:
            del self.channels[name]

    def hold(self, tp: TP, offset: int, now: float, seconds: float) -> None:
        """Consume ``tp`` again from ``offset`` after ``seconds``; paused until then.

        The caller seeks the consumer back to ``offset``.
        """
        self.tracker.rewind(tp, offset)
        self._hold_until[tp] = now + seconds

    # -- messages ------------------------------------------------------------------------------
    def track(self, tp: TP, offset: int) -> int | None:
        """An offset was consumed; its epoch, or None when ``tp`` is not ours (drop it)."""
        epoch = self.tracker.epoch(tp)
        if epoch is not None:
            self.tracker.add(tp, offset)
        return epoch

    def enqueue(self, tp: TP, offset: int, epoch: int, channel: str, item: T) -> Entry[T]:
        """Queue a tracked message behind its channel's earlier ones."""
        entry = Entry(tp, offset, epoch, channel, item)
        ch = self.channels.get(channel)
        if ch is None:
            ch = self.channels[channel] = Channel(channel)
        ch.queue.append(entry)
        if len(ch.queue) == 1 and not ch.busy:
            self._schedule(ch, ch.not_before)
        return entry

    def finish(self, tp: TP, offset: int, epoch: int) -> None:
        """A message's records are acknowledged (or it was skipped): its offset is done."""
        self.tracker.finish(tp, offset, epoch)

    # -- what runs next ------------------------------------------------------------------------
    def next_due(self, now: float) -> Channel[T] | None:
        """A channel whose head may start now, if a call slot is free."""
        while self._ready and self._ready[0][0] <= now and self.in_flight < self.config.concurrency:
            at, _, channel = heapq.heappop(self._ready)
            if channel.scheduled != at or channel.busy or not channel.queue:
                continue  # superseded by a later schedule
            channel.scheduled = None
            return channel
        return None

    def take_token(self, channel: Channel[T], now: float) -> float:
        """Pace a post: 0 when it may go now, else the seconds to wait (the bucket is kept)."""
        if not self.config.pace:
            return 0.0
        channel.bucket, wait = take_token(
            channel.bucket, now, self.config.rate_per_channel_per_s, self.config.rate_burst
        )
        return wait

    def has_token(self, channel: Channel[T], now: float) -> bool:
        """Whether a post of the channel could go at ``now``; the bucket is left as it is."""
        if not self.config.pace:
            return True
        _, wait = take_token(
            channel.bucket, now, self.config.rate_per_channel_per_s, self.config.rate_burst
        )
        return wait == 0.0

    def defer(self, channel: Channel[T], at: float) -> None:
        """Look at the channel again at ``at`` (a gated partition or the token bucket)."""
        self._schedule(channel, at)

    def pop(self, channel: Channel[T]) -> Entry[T]:
        """The head is done with (finished, skipped or dropped)."""
        return channel.queue.popleft()

    def move_to_front(self, channel: Channel[T], entry: Entry[T]) -> None:
        """Let a queued ``entry`` go before the (idle) head: an update's original behind it.

        Offsets are finished one by one, so the order in the queue is free for commits.
        """
        assert not channel.busy
        channel.queue.remove(entry)
        channel.queue.appendleft(entry)

    def call_started(self, channel: Channel[T]) -> None:
        """The head's Slack call is in flight; the channel starts nothing else meanwhile."""
        channel.busy = True
        self.in_flight += 1

    def call_ended(self, channel: Channel[T]) -> None:
        """The head's call answered (its outcome is decided next)."""
        channel.busy = False
        self.in_flight -= 1

    def retry_after(self, channel: Channel[T], delay_s: float, now: float) -> None:
        """The head retries after ``delay_s``; the whole channel waits with it (order)."""
        channel.not_before = now + delay_s
        self._schedule(channel, channel.not_before)

    def proceed(self, channel: Channel[T], now: float) -> None:
        """Run the channel's next step (the same head's, or the next message's) when allowed."""
        if channel.queue and not channel.busy:
            self._schedule(channel, max(channel.not_before, now))

    def wait_s(self, now: float, longest: float) -> float:
        """How long the loop may wait for input before a channel is due (at most ``longest``)."""
        if self._ready and self.in_flight < self.config.concurrency:
            return max(0.0, min(longest, self._ready[0][0] - now))
        return longest

    def calls_in_flight(self, tps: set[TP] | None = None) -> int:
        """Calls in flight, of the heads of ``tps`` (None: all)."""
        return sum(
            1
            for ch in self.channels.values()
            if ch.busy and ch.queue and (tps is None or ch.queue[0].tp in tps)
        )

    def _schedule(self, channel: Channel[T], at: float) -> None:
        channel.scheduled = at
        heapq.heappush(self._ready, (at, next(self._seq), channel))

    # -- flow control --------------------------------------------------------------------------
    def flow(self, now: float) -> list[FlowChange]:
        """Pauses and resumes to apply now (the state assumes the caller applies them)."""
        limit = self.config.max_buffered_per_partition
        changes: list[FlowChange] = []
        for tp in self.tracker.partitions():
            hold = self._hold_until.get(tp)
            if hold is not None and now >= hold:
                del self._hold_until[tp]
                hold = None
            outstanding = self.tracker.outstanding(tp)
            if tp in self.paused:
                if hold is None and outstanding <= limit // 2:
                    self.paused.discard(tp)
                    changes.append(FlowChange(tp, "resume", outstanding, "drained"))
            elif hold is not None or outstanding >= limit:
                self.paused.add(tp)
                reason = "on hold" if hold is not None else "buffer full"
                changes.append(FlowChange(tp, "pause", outstanding, reason))
        return changes

    # -- offsets -------------------------------------------------------------------------------
    def committable(self, only: Sequence[TP] | None = None) -> dict[TP, int]:
        """Offsets to commit (the next offset to consume) where the finished prefix moved."""
        return self.tracker.committable(only)

    def committed(self, offsets: dict[TP, int]) -> None:
        """``offsets`` were committed."""
        self.tracker.committed(offsets)

    def outstanding(self) -> int:
        """Consumed messages not finished, over every partition."""
        return self.tracker.total_outstanding()

    def prune(self, now: float) -> None:
        """Forget idle channels that carry no state worth keeping.

        One channel per DM user ever seen would grow without bound; an idle channel whose
        bucket has refilled and whose Retry-After has passed is the same as a new one.
        """
        horizon = now - self.config.rate_burst / self.config.rate_per_channel_per_s
        idle = [
            name
            for name, ch in self.channels.items()
            if not ch.queue
            and not ch.busy
            and ch.not_before < horizon
            and (ch.bucket is None or ch.bucket.updated < horizon)
        ]
        for name in idle:
            del self.channels[name]
