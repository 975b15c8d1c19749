"""QueryRunner and PollLoop over the in-memory source and sink: scheduling, retries, stop."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from libs.serde import OnboardingStarted, ProducerCursor
from services.producer.core import BatchPlan, Position, QueryDefinition, WarehouseRow
from services.producer.queries import ONBOARDING_STARTED
from services.producer.runner import PollLoop, QueryRunner
from services.producer.sink import BatchAbortedError, CursorLoadError, InMemoryBatchSink
from services.producer.sources import InMemorySource, TableRef, WarehouseError
from services.producer.sources.base import WarehouseTimeoutError
from tests.support.kafka import wait_until

TABLE = TableRef(("onboarding",))
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
OLD = NOW - timedelta(hours=1)


def row(org_id: str | None, ts: datetime = OLD) -> dict[str, object]:
    return {"org_id": org_id, "org_name": "N", "plan": "p", "cloud": None, "started_at": ts}


def make_runner(
    source: InMemorySource,
    sink: InMemoryBatchSink,
    *,
    batch_size: int = 10,
    delay_s: float = 60.0,
    stop: threading.Event | None = None,
) -> QueryRunner:
    return QueryRunner(
        ONBOARDING_STARTED,
        TABLE,
        source=source,
        sink=sink,
        batch_size=batch_size,
        delay_s=delay_s,
        stop=stop,
    )


def keys(sink: InMemoryBatchSink) -> list[str]:
    return [k for k, _ in sink.events]


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def run_in_thread(loop: PollLoop) -> threading.Thread:
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    return t


def test_poll_once_requires_the_cursor_first() -> None:
    runner = make_runner(InMemorySource({"onboarding": []}), InMemoryBatchSink())
    with pytest.raises(RuntimeError):
        runner.poll_once(NOW)


def test_ties_split_across_batches_are_produced_once_in_order() -> None:
    source = InMemorySource({"onboarding": [row(f"o{i}") for i in (5, 1, 4, 2, 3, 6, 0)]})
    sink = InMemoryBatchSink()
    runner = make_runner(source, sink, batch_size=3)
    runner.load()
    reports = [runner.poll_once(NOW) for _ in range(4)]
    assert [r.rows for r in reports] == [3, 3, 1, 0]
    assert [r.backlog for r in reports] == [True, True, False, False]
    assert keys(sink) == [f"o{i}" for i in range(7)]
    assert sink.cursor is not None and sink.cursor.rows_total == 7
    assert (sink.cursor.last_timestamp, sink.cursor.last_key) == (OLD, "o6")


def test_restart_resumes_from_the_committed_cursor() -> None:
    source = InMemorySource({"onboarding": [row(f"o{i}") for i in range(5)]})
    sink = InMemoryBatchSink()
    first = make_runner(source, sink, batch_size=2)
    first.load()
    first.poll_once(NOW)
    second = make_runner(source, sink, batch_size=2)  # same sink: the committed cursor
    second.load()
    assert second.cursor == sink.cursor
    while second.poll_once(NOW).rows:
        pass
    assert keys(sink) == [f"o{i}" for i in range(5)]


def test_the_delay_window_holds_back_young_rows_and_misses_rows_older_than_the_cursor() -> None:
    source = InMemorySource({"onboarding": [row("old", NOW - timedelta(seconds=40))]})
    sink = InMemoryBatchSink()
    runner = make_runner(source, sink, delay_s=30)
    runner.load()
    assert runner.poll_once(NOW).rows == 1
    # committed late, but within the delay: its timestamp is still ahead of the window
    source.insert("onboarding", [row("late", NOW - timedelta(seconds=5))])
    assert runner.poll_once(NOW).rows == 0
    assert runner.poll_once(NOW + timedelta(seconds=26)).rows == 1
    # committed later than the delay after its timestamp: behind the cursor, never produced
    source.insert("onboarding", [row("too-late", NOW - timedelta(seconds=20))])
    assert runner.poll_once(NOW + timedelta(seconds=60)).rows == 0
    assert keys(sink) == ["old", "late"]


def test_unmappable_rows_are_dead_lettered_and_later_rows_flow() -> None:
    rows = [row("a"), row(None, OLD + timedelta(seconds=1)), row("b", OLD + timedelta(seconds=2))]
    rows[0]["org_name"] = None
    sink = InMemoryBatchSink()
    runner = make_runner(InMemorySource({"onboarding": rows}), sink)
    runner.load()
    report = runner.poll_once(NOW)
    assert (report.rows, report.events, report.dead_letters) == (3, 1, 2)
    assert keys(sink) == ["b"]
    assert [d.reason for d in sink.dead_letters] == [
        "org_name is missing or empty (got None)",
        "org_id (the row key) is NULL or empty",
    ]
    assert [d.ordinal for d in sink.dead_letters] == [0, 1]


def test_errors_leave_the_cursor_where_it_was() -> None:
    source = InMemorySource({"onboarding": [row("a"), row("b")]})
    sink = InMemoryBatchSink(failures=[BatchAbortedError("broker gone")])
    runner = make_runner(source, sink, batch_size=1)
    runner.load()
    with pytest.raises(BatchAbortedError):
        runner.poll_once(NOW)
    assert runner.cursor is None
    source.fail_next(WarehouseTimeoutError("slow"))
    with pytest.raises(WarehouseTimeoutError):
        runner.poll_once(NOW)
    assert runner.poll_once(NOW).rows == 1
    assert runner.poll_once(NOW).rows == 1
    assert keys(sink) == ["a", "b"]


class GcObservingSink(InMemoryBatchSink):
    """Records whether the cycle collector was enabled while a batch was written."""

    collector_on_at_write: list[bool]

    def write(self, plan: BatchPlan) -> None:
        self.collector_on_at_write.append(gc.isenabled())
        super().write(plan)


def test_the_cycle_collector_is_off_during_a_batch_and_back_after_it_even_on_errors() -> None:
    source = InMemorySource({"onboarding": [row("a"), row("b")]})
    sink = GcObservingSink(failures=[BatchAbortedError("broker gone")])
    sink.collector_on_at_write = []
    runner = make_runner(source, sink, batch_size=1)
    runner.load()
    assert gc.isenabled()
    with pytest.raises(BatchAbortedError):
        runner.poll_once(NOW)
    assert gc.isenabled()
    assert runner.poll_once(NOW).rows == 1
    assert gc.isenabled()
    assert sink.collector_on_at_write == [False, False]
    gc.disable()  # whoever turned it off (a test harness, an embedding app) keeps it off
    try:
        assert runner.poll_once(NOW).rows == 1
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert keys(sink) == ["a", "b"]


def test_a_stop_during_the_query_writes_nothing() -> None:
    stop = threading.Event()

    class StoppingSource(InMemorySource):
        def fetch(
            self,
            query: QueryDefinition,
            table: TableRef,
            *,
            after: Position,
            until: datetime,
            limit: int,
        ) -> list[WarehouseRow]:
            rows = super().fetch(query, table, after=after, until=until, limit=limit)
            stop.set()  # SIGTERM arrives while the query runs
            return rows

    sink = InMemoryBatchSink()
    runner = make_runner(StoppingSource({"onboarding": [row("a")]}), sink, stop=stop)
    runner.load()
    assert runner.poll_once(NOW).stopped
    assert sink.batches == 0 and runner.cursor is None


def test_loop_drains_a_backlog_without_waiting_for_the_interval(stop: threading.Event) -> None:
    source = InMemorySource({"onboarding": [row(f"o{i:03d}") for i in range(95)]})
    sink = InMemoryBatchSink()
    loop = PollLoop([make_runner(source, sink)], stop, poll_interval_s=3600, clock=lambda: NOW)
    t = run_in_thread(loop)
    wait_until(lambda: len(sink.events) == 95, timeout_s=5, message="backlog drained")
    # 10 batches of at most 10 rows; the 10th is partial and schedules the next poll an hour out
    assert sink.batches == 10
    time.sleep(0.1)
    assert source.fetches == 10
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_loop_retries_warehouse_and_kafka_errors_with_backoff(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    source = InMemorySource({"onboarding": [row(f"o{i}") for i in range(3)]})
    source.fail_next(WarehouseError("down"), WarehouseTimeoutError("slow"))
    sink = InMemoryBatchSink(
        failures=[BatchAbortedError("abort")], load_failures=[CursorLoadError("no broker")]
    )
    runner = make_runner(source, sink)
    loop = PollLoop(
        [runner],
        stop,
        poll_interval_s=3600,
        retry_initial_s=0.05,
        retry_max_s=0.15,
        clock=lambda: NOW,
    )
    with caplog.at_level(logging.WARNING, logger="services.producer.runner"):
        t = run_in_thread(loop)
        wait_until(lambda: len(sink.events) == 3, timeout_s=5, message="rows after retries")
        stop.set()
        t.join(5)
    assert keys(sink) == ["o0", "o1", "o2"]
    assert runner.stats.failures == 3  # two warehouse errors, one aborted transaction
    assert sink.batches == 1
    retries = [(r.getMessage(), getattr(r, "retry_in_s", None)) for r in caplog.records]
    assert retries == [
        ("cursor load failed, retrying", 0.05),
        ("poll failed, cursor unchanged, retrying", 0.05),
        ("poll failed, cursor unchanged, retrying", 0.1),
        ("poll failed, cursor unchanged, retrying", 0.15),
    ]
    assert [getattr(r, "kind", None) for r in caplog.records[1:]] == [
        "warehouse",
        "warehouse",
        "kafka",
    ]


def test_a_stop_interrupts_a_backoff_wait() -> None:
    stop = threading.Event()
    source = InMemorySource({"onboarding": []})
    source.fail_next(WarehouseError("down"))
    loop = PollLoop(
        [make_runner(source, InMemoryBatchSink())],
        stop,
        poll_interval_s=3600,
        retry_initial_s=3600,
        clock=lambda: NOW,
    )
    t = run_in_thread(loop)
    wait_until(lambda: source.fetches == 1, timeout_s=5, message="first poll")
    started = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - started < 2


def test_loop_readiness_follows_the_cursor_load(stop: threading.Event) -> None:
    sink = InMemoryBatchSink(
        cursor=ProducerCursor("onboarding-started", OLD, "o1", NOW, 2),
        load_failures=[CursorLoadError("not yet")],
    )
    source = InMemorySource({"onboarding": [row("o0"), row("o1"), row("o2")]})
    loop = PollLoop(
        [make_runner(source, sink)],
        stop,
        poll_interval_s=3600,
        retry_initial_s=0.2,
        clock=lambda: NOW,
    )
    assert not loop.ready
    t = run_in_thread(loop)
    wait_until(lambda: loop.ready, timeout_s=5, message="ready")
    wait_until(lambda: sink.events, timeout_s=5, message="row after the stored cursor")
    stop.set()
    t.join(5)
    assert keys(sink) == ["o2"]
    [(_, record)] = sink.events
    assert isinstance(record, OnboardingStarted) and record.source == "onboarding"
