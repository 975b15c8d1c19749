"""The notifier's channel scheduler, table-driven on a fake clock.

``simulate`` plays the sink loop's part with time as a number: it starts whatever the
scheduler says is due, answers each call after ``call_s`` (a retry delay when the row says
so) and jumps the clock to the next event. The rows say when each message's call starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from services.notifier.scheduler import Channel, ChannelScheduler, FlowChange, SchedulerConfig

TP = ("slack-messages", 0)
OTHER = ("slack-messages", 1)


def cfg(**knobs: object) -> SchedulerConfig:
    return SchedulerConfig(**knobs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    id: str
    messages: list[str]  # the channel of each message, in offset order
    starts: list[tuple[float, int]]  # (time, message index) of every call started
    config: SchedulerConfig = field(default_factory=cfg)
    #: (message index, attempt number) -> retry after this many seconds instead of finishing
    retries: Mapping[tuple[int, int], float] = field(default_factory=dict)
    call_s: float = 0.0


def simulate(row: Row, until: float = 60.0) -> tuple[list[tuple[float, int]], dict[TP, int]]:
    s: ChannelScheduler[int] = ChannelScheduler(row.config)
    s.assign([TP])
    for offset, channel in enumerate(row.messages):
        epoch = s.track(TP, offset)
        assert epoch is not None
        s.enqueue(TP, offset, epoch, channel, offset)
    clock = 0.0
    starts: list[tuple[float, int]] = []
    attempts: dict[int, int] = {}
    calls: list[tuple[float, Channel[int]]] = []  # (answer time, channel)
    for _ in range(10_000):
        for end, channel in sorted((c for c in calls if c[0] <= clock), key=lambda c: c[0]):
            calls.remove((end, channel))
            s.call_ended(channel)
            entry = channel.queue[0]
            delay = row.retries.get((entry.item, attempts[entry.item]))
            if delay is not None:
                s.retry_after(channel, delay, clock)
            else:
                s.pop(channel)
                s.finish(entry.tp, entry.offset, entry.epoch)
                s.proceed(channel, clock)
        while (channel := s.next_due(clock)) is not None:
            entry = channel.queue[0]
            wait = s.take_token(channel, clock)
            if wait > 0:
                s.defer(channel, clock + wait)
                continue
            s.call_started(channel)
            attempts[entry.item] = attempts.get(entry.item, 0) + 1
            starts.append((round(clock, 6), entry.item))
            calls.append((clock + row.call_s, channel))
        events = [c[0] for c in calls]
        wait_s = s.wait_s(clock, until)
        if s.in_flight < row.config.concurrency and wait_s < until:
            events.append(clock + wait_s)
        if not events:
            return starts, s.committable()
        clock = max(clock, min(events))
        if clock > until:
            break
    raise AssertionError("the simulation did not settle")


ROWS = [
    Row("paced one per second per channel", ["C1", "C1", "C1"], [(0, 0), (1, 1), (2, 2)]),
    Row(
        "channels are paced independently",
        ["C1", "C2", "C1", "C2"],
        [(0, 0), (0, 1), (1, 2), (1, 3)],
    ),
    Row(
        "a burst of two",
        ["C1", "C1", "C1"],
        [(0, 0), (0, 1), (1, 2)],
        config=cfg(rate_burst=2),
    ),
    Row(
        "a 429 holds only its own channel, and its later messages wait behind it",
        ["C1", "C2", "C1", "C2"],
        [(0, 0), (0, 1), (1, 3), (5, 0), (6, 2)],
        retries={(0, 1): 5.0},
    ),
    Row(
        "a retry is paced like any post, and the next message waits behind it",
        ["C1", "C1"],
        [(0, 0), (1.0, 0), (2.0, 1)],
        retries={(0, 1): 0.25},
    ),
    Row(
        "unpaced, a backoff alone delays the channel",
        ["C1", "C1", "C2"],
        [(0, 0), (0, 2), (0.25, 0), (0.25, 1)],
        retries={(0, 1): 0.25},
        config=cfg(pace=False),
    ),
    Row(
        "no pacing in dry-run",
        ["C1", "C1", "C1"],
        [(0, 0), (0, 1), (0, 2)],
        config=cfg(pace=False),
    ),
    Row(
        "one call slot serialises channels",
        ["C1", "C2", "C3"],
        [(0, 0), (0.5, 1), (1.0, 2)],
        config=cfg(concurrency=1, pace=False),
        call_s=0.5,
    ),
    Row(
        "only the head of a channel is in flight",
        ["C1", "C1"],
        [(0, 0), (2.0, 1)],
        config=cfg(pace=False),
        call_s=2.0,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_when_calls_start(row: Row) -> None:
    starts, committable = simulate(row)
    assert sorted(starts) == sorted((float(t), i) for t, i in row.starts)
    # every message finished: the whole partition is committable
    assert committable == {TP: len(row.messages)}


def _scheduler(**config: object) -> ChannelScheduler[int]:
    s: ChannelScheduler[int] = ChannelScheduler(SchedulerConfig(**config))  # type: ignore[arg-type]
    s.assign([TP, OTHER])
    return s


def _consume(s: ChannelScheduler[int], tp: tuple[str, int], offsets: range, channel: str) -> None:
    for o in offsets:
        epoch = s.track(tp, o)
        assert epoch is not None
        s.enqueue(tp, o, epoch, channel, o)


@pytest.mark.parametrize(
    ("consumed", "finished", "expected"),
    [
        (3, 0, []),
        (4, 0, [FlowChange(TP, "pause", 4, "buffer full")]),
        (4, 1, []),  # finished before the check: 3 outstanding
        (6, 0, [FlowChange(TP, "pause", 6, "buffer full")]),
    ],
)
def test_a_full_buffer_pauses_its_partition(
    consumed: int, finished: int, expected: list[FlowChange]
) -> None:
    s = _scheduler(max_buffered_per_partition=4)
    _consume(s, TP, range(consumed), "C1")
    epoch = s.tracker.epoch(TP)
    assert epoch is not None
    for o in range(finished):
        s.finish(TP, o, epoch)
    assert s.flow(1.0) == expected


def test_a_paused_partition_resumes_at_half_the_limit() -> None:
    s = _scheduler(max_buffered_per_partition=4)
    _consume(s, TP, range(4), "C1")
    assert [c.action for c in s.flow(0.0)] == ["pause"]
    epoch = s.tracker.epoch(TP)
    assert epoch is not None
    s.finish(TP, 0, epoch)
    assert s.flow(1.0) == []  # 3 outstanding: above half, stays paused (no flapping)
    s.finish(TP, 1, epoch)
    assert s.flow(2.0) == [FlowChange(TP, "resume", 2, "drained")]
    assert s.paused == set()


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (1.0, [FlowChange(TP, "pause", 1, "on hold")]),
        (5.0, []),  # the hold is over before it was ever applied
    ],
)
def test_a_hold_pauses_until_it_expires(now: float, expected: list[FlowChange]) -> None:
    s = _scheduler()
    _consume(s, TP, range(3), "C1")
    s.hold(TP, 1, now=0.0, seconds=5.0)  # offsets 1 and 2 are consumed again later
    assert s.tracker.outstanding(TP) == 1
    assert s.flow(now) == expected


def test_a_held_partition_resumes_when_the_hold_expires() -> None:
    s = _scheduler()
    s.hold(TP, 0, now=0.0, seconds=5.0)
    assert [c.action for c in s.flow(1.0)] == ["pause"]
    assert s.flow(4.9) == []
    assert s.flow(5.0) == [FlowChange(TP, "resume", 0, "drained")]


def test_revoke_keeps_an_in_flight_head_marked_and_drops_the_rest() -> None:
    s = _scheduler(pace=False)
    _consume(s, TP, range(2), "C1")
    _consume(s, OTHER, range(2), "C2")
    channel = s.next_due(1.0)
    assert channel is not None and channel.name == "C1"
    s.call_started(channel)
    s.forget({TP})
    assert [e.offset for e in s.channels["C1"].queue] == [0]
    assert s.channels["C1"].queue[0].dropped
    assert [e.offset for e in s.channels["C2"].queue] == [0, 1]
    assert s.calls_in_flight({TP}) == 1 and s.calls_in_flight({OTHER}) == 0
    s.release({TP})
    assert s.tracker.epoch(TP) is None
    assert "C1" in s.channels  # busy: kept until its call answers


def test_idle_channels_are_pruned_once_their_bucket_refilled() -> None:
    s = _scheduler(rate_per_channel_per_s=1.0, rate_burst=1)
    _consume(s, TP, range(1), "C1")
    _consume(s, TP, range(1, 2), "C2")
    for name, delay in (("C1", None), ("C2", 30.0)):
        channel = s.channels[name]
        assert s.take_token(channel, 10.0) == 0
        s.call_started(channel)
        s.call_ended(channel)
        if delay is not None:
            s.retry_after(channel, delay, 10.0)  # a Retry-After still to honour
        entry = s.pop(channel)
        s.finish(entry.tp, entry.offset, entry.epoch)
    s.prune(10.5)
    assert set(s.channels) == {"C1", "C2"}  # C1's bucket is not full again yet
    s.prune(11.5)
    assert set(s.channels) == {"C2"}
    assert s.committable() == {TP: 2}


def test_a_partition_no_longer_ours_is_not_tracked() -> None:
    s = _scheduler()
    s.release({OTHER})
    assert s.track(OTHER, 0) is None
    assert s.track(TP, 0) is not None


def test_the_scheduler_is_pure() -> None:
    """No I/O, clock or client: the same rule as the cores, except the offset tracker."""
    from tests.unit.test_architecture import CORE_FORBIDDEN, ROOT, _forbidden, _imports

    imports = _imports(ROOT / "services/notifier/scheduler.py") - {"libs.kafka.acks"}
    assert sorted(n for n in imports if _forbidden(n, CORE_FORBIDDEN)) == []
