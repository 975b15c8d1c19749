"""The sink loop's bookkeeping: commit only the contiguous prefix of finished offsets; its own
receipts answered until the receipts table has read them back."""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.kafka import OffsetTracker
from libs.serde import SlackDeliveryReceipt
from services.notifier.core import Step
from services.notifier.sink import OwnReceipts, _Completion, _SlackCalls
from tests.support.kafka import wait_until

TP = ("slack-messages", 0)
OTHER = ("slack-messages", 1)


def tracker(*offsets: int) -> tuple[OffsetTracker, int]:
    t = OffsetTracker()
    epoch = t.assign(TP)
    for o in offsets:
        t.add(TP, o)
    return t, epoch


@pytest.mark.parametrize(
    ("consumed", "finished", "commit", "outstanding"),
    [
        ([5, 6, 7], [], None, 3),
        ([5, 6, 7], [6, 7], None, 3),
        ([5, 6, 7], [5], 6, 2),
        ([5, 6, 7], [7, 5], 6, 2),
        ([5, 6, 7], [7, 6, 5], 8, 0),
        # offsets are sparse (compaction never touches this topic, but transaction markers do)
        ([5, 9, 12], [5, 9], 10, 1),
    ],
)
def test_contiguous_prefix(
    consumed: list[int], finished: list[int], commit: int | None, outstanding: int
) -> None:
    t, epoch = tracker(*consumed)
    for o in finished:
        t.finish(TP, o, epoch)
    assert t.committable().get(TP) == commit
    assert t.outstanding(TP) == outstanding


def test_committed_offsets_are_not_offered_again() -> None:
    t, epoch = tracker(1, 2)
    t.finish(TP, 1, epoch)
    t.committed(t.committable())
    assert t.committable() == {}
    t.finish(TP, 2, epoch)
    assert t.committable() == {TP: 3}


def test_a_finish_of_a_previous_assignment_is_ignored() -> None:
    t, old = tracker(1, 2)
    t.drop(TP)
    new = t.assign(TP)
    t.add(TP, 1)
    t.finish(TP, 1, old)
    assert t.committable() == {}
    t.finish(TP, 1, new)
    assert t.committable() == {TP: 2}


def test_rewind_forgets_the_tail() -> None:
    t, epoch = tracker(1, 2, 3)
    t.finish(TP, 3, epoch)
    t.rewind(TP, 2)
    assert t.outstanding(TP) == 1
    t.add(TP, 2)
    t.finish(TP, 1, epoch)
    t.finish(TP, 2, epoch)
    assert t.committable() == {TP: 3}


def test_partitions_are_independent_and_filterable() -> None:
    t = OffsetTracker()
    e0, e1 = t.assign(TP), t.assign(OTHER)
    t.add(TP, 1)
    t.add(OTHER, 10)
    t.finish(TP, 1, e0)
    t.finish(OTHER, 10, e1)
    assert t.committable() == {TP: 2, OTHER: 11}
    assert t.committable([OTHER]) == {OTHER: 11}
    assert t.total_outstanding() == 0
    assert sorted(t.partitions()) == [TP, OTHER]


def test_untracked_partitions_are_ignored() -> None:
    t = OffsetTracker()
    t.add(TP, 1)
    t.finish(TP, 1, 1)
    assert t.committable() == {}
    assert t.outstanding(TP) == 0


def test_out_of_order_add_is_refused() -> None:
    t, _ = tracker(5)
    with pytest.raises(ValueError, match="out of order"):
        t.add(TP, 5)


# -- receipts of this process until the table reads them back ----------------------------------


def _receipt(message_id: str, status: str = "DELIVERED") -> SlackDeliveryReceipt:
    return SlackDeliveryReceipt(
        message_id=message_id,
        channel="C1",
        status=status,
        attempts=1,
        slack_ts="1.0001",
        error=None,
        delivered_at=datetime(2026, 11, 25, 9, 0, tzinfo=UTC),
    )


def test_own_receipts_are_answered_until_the_tables_position_passes_them() -> None:
    own = OwnReceipts()
    r1, r2, r3 = _receipt("m1"), _receipt("m2"), _receipt("m3")
    for r in (r1, r2, r3):
        own.wrote(r)
    own.landed(r1, 0, 10)
    own.landed(r2, 0, 11)
    # r3 has no delivery report yet: it stays whatever the positions say
    own.release({0: 11, 1: 500})
    assert own.get("m1") is None  # the table has read offset 10
    assert own.get("m2") is r2 and own.get("m3") is r3
    own.release({0: 12})
    assert own.get("m2") is None and own.get("m3") is r3
    own.landed(r3, 1, 7)
    own.release({0: 12, 1: 7})
    assert own.get("m3") is r3
    own.release({0: 12, 1: 8})
    assert len(own) == 0


def test_a_newer_own_receipt_of_the_same_message_stays_until_its_own_offset_is_read() -> None:
    """A FAILED receipt, then a DELIVERED one of the same message (a re-drive): the table
    reading the first must not drop the second, which it has not read yet."""
    own = OwnReceipts()
    failed, delivered = _receipt("m1", "FAILED"), _receipt("m1")
    own.wrote(failed)
    own.landed(failed, 2, 4)
    own.wrote(delivered)
    own.release({2: 5})
    assert own.get("m1") is delivered
    own.landed(delivered, 2, 9)
    own.release({2: 9})
    assert own.get("m1") is delivered
    own.release({2: 10})
    assert own.get("m1") is None


# -- the Slack call threads -------------------------------------------------------------------


def _completion() -> Any:
    # the pool passes completions through untouched; what they hold is the loop's business
    return _Completion(channel=None, entry=None, step=Step.POST)  # type: ignore[arg-type]


def test_calls_one_after_the_other_run_on_one_thread() -> None:
    """One channel's posts come one at a time: one thread, not one per call up to the size
    (eight threads taking turns, each woken cold, contending with the loop for the GIL)."""
    done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
    calls = _SlackCalls(8, done)
    try:
        for n in range(20):
            completion = _completion()
            calls.submit(lambda n=n: n, completion)  # type: ignore[misc]
            assert done.get(timeout=20) is completion and completion.outcome == n
        assert calls.threads == 1
    finally:
        calls.shutdown()


def test_calls_in_flight_at_once_get_a_thread_each_up_to_the_size() -> None:
    done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
    calls = _SlackCalls(3, done)
    release = threading.Event()
    try:
        started = [_completion() for _ in range(4)]
        for completion in started:
            calls.submit(lambda: release.wait(20), completion)
        assert calls.threads == 3  # the fourth call waits for a free thread
        release.set()
        answered = {id(done.get(timeout=20)) for _ in started}
        assert answered == {id(c) for c in started}
        again = _completion()
        calls.submit(lambda: "ok", again)  # three threads free: none started
        assert done.get(timeout=20) is again and again.outcome == "ok"
        assert calls.threads == 3
    finally:
        calls.shutdown()


def test_after_a_burst_calls_one_after_the_other_stay_on_one_thread() -> None:
    """The threads a burst started stay, but a call goes to the thread that finished last:
    the others stay asleep instead of taking turns."""
    done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
    calls = _SlackCalls(8, done)
    release = threading.Event()
    try:
        burst = [_completion() for _ in range(4)]
        for completion in burst:
            calls.submit(lambda: release.wait(20), completion)
        release.set()
        for _ in burst:
            done.get(timeout=20)
        names = set()
        for _ in range(20):
            completion = _completion()
            calls.submit(lambda: threading.current_thread().name, completion)
            assert done.get(timeout=20) is completion
            names.add(completion.outcome)
        assert calls.threads == 4 and len(names) == 1
    finally:
        calls.shutdown()


def test_the_call_threads_end_at_shutdown_and_drop_what_waits() -> None:
    done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
    calls = _SlackCalls(1, done)
    release = threading.Event()
    ran: list[str] = []
    calls.submit(lambda: release.wait(20), _completion())
    calls.submit(lambda: ran.append("dropped"), _completion())  # waits: the one thread is busy
    calls.shutdown()
    release.set()
    assert done.get(timeout=20).outcome is True
    workers = [w.thread for w in calls._workers if w.thread is not None]
    wait_until(lambda: not any(t.is_alive() for t in workers), timeout_s=20, message="ended")
    assert ran == [] and done.empty()
    with pytest.raises(RuntimeError):
        calls.submit(lambda: None, _completion())
