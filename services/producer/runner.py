"""One query's poll cycle, and the loop that schedules every query.

``QueryRunner.poll_once(now)`` is one batch: fetch rows after the cursor up to
``now - delay``, plan the batch (pure core), write it atomically, move the in-memory cursor.
It takes ``now`` so tests drive it step by step. ``PollLoop`` runs the runners: a query with a
full batch (a backlog) is polled again at once, a caught-up one after the poll interval, a
failing one after a capped exponential backoff; waits happen on the stop event, so a stop
interrupts them, and a batch in flight is finished (or aborted) before the loop returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge

from libs.runtime.collector import cyclic_gc_paused
from libs.runtime.heartbeat import beat
from libs.serde import ProducerCursor
from services.producer.core import (
    QueryDefinition,
    backoff_s,
    cursor_lag_s,
    plan_batch,
    start_position,
    window_end,
)
from services.producer.sink import BatchSink, SinkError
from services.producer.sources.base import TableRef, WarehouseError, WarehouseSource

log = logging.getLogger(__name__)

ROWS_READ = Counter("producer_rows_read_total", "Warehouse rows read", ["query"])
EVENTS = Counter("producer_events_produced_total", "Events committed", ["query"])
DEAD = Counter("producer_dead_letters_total", "Rows dead-lettered", ["query"])
BATCHES = Counter("producer_batches_total", "Batches committed", ["query"])
FAILURES = Counter(
    "producer_poll_failures_total", "Polls that failed and were retried", ["query", "kind"]
)
CURSOR_TS = Gauge(
    "producer_cursor_timestamp_seconds", "Timestamp of the query's cursor (Unix)", ["query"]
)
CURSOR_LAG = Gauge(
    "producer_cursor_lag_seconds",
    "How far the cursor is behind now (about delay + interval when caught up)",
    ["query"],
)
CURSOR_LOADED = Gauge("producer_cursor_loaded", "1 once the cursor is read back", ["query"])
ROWS_TOTAL = Gauge("producer_cursor_rows_total", "Rows read since the cursor began", ["query"])


def utc_now() -> datetime:
    """The wall clock, timezone-aware."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class PollReport:
    """What one ``poll_once`` did."""

    query: str
    rows: int = 0
    events: int = 0
    dead_letters: int = 0
    backlog: bool = False
    stopped: bool = False


@dataclass
class RunnerStats:
    """Counts since start, for the stop log line and tests."""

    rows: int = 0
    events: int = 0
    dead_letters: int = 0
    batches: int = 0
    failures: int = 0


class QueryRunner:
    """Polls one query over one table into one sink."""

    def __init__(
        self,
        query: QueryDefinition,
        table: TableRef,
        *,
        source: WarehouseSource,
        sink: BatchSink,
        batch_size: int,
        delay_s: float,
        start_from: datetime | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.query = query
        self.table = table
        self.source_name = source.qualified_name(table)
        self.stats = RunnerStats()
        self.cursor: ProducerCursor | None = None
        self.loaded = False
        self._source = source
        self._sink = sink
        self._batch_size = batch_size
        self._delay_s = delay_s
        self._start_from = start_from
        self._stop = stop or threading.Event()

    @property
    def name(self) -> str:
        """The query's name (its cursor key, its metric label)."""
        return self.query.name

    def load(self) -> None:
        """Fence the previous instance and read the committed cursor back."""
        self._sink.start()
        self.cursor = self._sink.load_cursor()
        self.loaded = True
        CURSOR_LOADED.labels(self.name).set(1)
        self.observe(None)
        log.info(
            "cursor loaded",
            extra={
                "query": self.name,
                "source": self.source_name,
                "cursor_timestamp": self.cursor.last_timestamp.isoformat() if self.cursor else None,
                "cursor_key": self.cursor.last_key if self.cursor else None,
                "rows_total": self.cursor.rows_total if self.cursor else 0,
            },
        )

    def poll_once(self, now: datetime) -> PollReport:
        """Read and produce one batch; ``WarehouseError``/``SinkError`` leave the cursor as is."""
        if not self.loaded:
            raise RuntimeError("load() the cursor before polling")
        with cyclic_gc_paused():
            # the batch's rows and records are freed when _poll_once returns, before the
            # collector is back
            return self._poll_once(now)

    def _poll_once(self, now: datetime) -> PollReport:
        after = start_position(self.cursor, self._start_from)
        rows = self._source.fetch(
            self.query,
            self.table,
            after=after,
            until=window_end(now, self._delay_s),
            limit=self._batch_size,
        )
        ROWS_READ.labels(self.name).inc(len(rows))
        plan = plan_batch(
            self.query,
            rows,
            self.cursor,
            after=after,
            source=self.source_name,
            now=now,
            limit=self._batch_size,
        )
        if plan is None:
            self.observe(now)
            return PollReport(self.name)
        if self._stop.is_set():
            # Nothing is written yet: drop the rows, the next start reads them again.
            return PollReport(self.name, stopped=True)
        self._sink.write(plan)
        self.cursor = plan.cursor
        self.stats.rows += plan.rows
        self.stats.events += len(plan.events)
        self.stats.dead_letters += len(plan.dead_letters)
        self.stats.batches += 1
        EVENTS.labels(self.name).inc(len(plan.events))
        DEAD.labels(self.name).inc(len(plan.dead_letters))
        BATCHES.labels(self.name).inc()
        self.observe(now)
        log.info(
            "batch committed",
            extra={
                "query": self.name,
                "rows": plan.rows,
                "events": len(plan.events),
                "dead_letters": len(plan.dead_letters),
                "cursor_timestamp": plan.cursor.last_timestamp.isoformat(),
                "cursor_key": plan.cursor.last_key,
                "rows_total": plan.cursor.rows_total,
                "lag_s": cursor_lag_s(plan.cursor, now),
                "backlog": plan.backlog,
            },
        )
        return PollReport(
            self.name,
            rows=plan.rows,
            events=len(plan.events),
            dead_letters=len(plan.dead_letters),
            backlog=plan.backlog,
        )

    def observe(self, now: datetime | None) -> None:
        """Publish the cursor gauges; the lag too when ``now`` is given (also after failures)."""
        if self.cursor is None:
            return
        CURSOR_TS.labels(self.name).set(self.cursor.last_timestamp.timestamp())
        ROWS_TOTAL.labels(self.name).set(self.cursor.rows_total)
        lag = cursor_lag_s(self.cursor, now) if now is not None else None
        if lag is not None:
            CURSOR_LAG.labels(self.name).set(lag)

    def close(self) -> None:
        """Close the sink (aborting an open transaction)."""
        self._sink.close()


@dataclass
class _Schedule:
    runner: QueryRunner
    next_due: float = 0.0
    failures: int = 0


@dataclass
class PollLoop:
    """Runs every query until ``stop`` is set: backlogs at once, retries with backoff."""

    runners: Sequence[QueryRunner]
    stop: threading.Event
    poll_interval_s: float
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    clock: Callable[[], datetime] = utc_now
    monotonic: Callable[[], float] = time.monotonic
    #: the ``loop`` label of its heartbeat gauge
    name: str = "producer"
    heartbeat: float = field(default=0.0, init=False)

    @property
    def ready(self) -> bool:
        """True once every query's cursor is loaded."""
        return all(r.loaded for r in self.runners)

    def run(self) -> None:
        """Load every cursor (retrying), then poll until stopped."""
        self.heartbeat = self.monotonic()
        for runner in self.runners:
            self._load(runner)
        schedules = [_Schedule(r) for r in self.runners]
        while not self.stop.is_set():
            self.heartbeat = self.monotonic()
            beat(self.name)
            for sched in schedules:
                if self.stop.is_set():
                    break
                if sched.next_due <= self.monotonic():
                    self._poll(sched)
            wait = min(s.next_due for s in schedules) - self.monotonic()
            if wait > 0:
                self.stop.wait(wait)

    def _load(self, runner: QueryRunner) -> None:
        attempt = 0
        while not self.stop.is_set():
            try:
                runner.load()
                return
            except SinkError as exc:
                attempt += 1
                delay = backoff_s(attempt, initial_s=self.retry_initial_s, max_s=self.retry_max_s)
                log.warning(
                    "cursor load failed, retrying",
                    extra={"query": runner.name, "error": str(exc), "retry_in_s": delay},
                )
                self.stop.wait(delay)

    def _poll(self, sched: _Schedule) -> None:
        runner = sched.runner
        now = self.clock()
        try:
            report = runner.poll_once(now)
        except (WarehouseError, SinkError) as exc:
            runner.observe(now)  # the lag keeps growing while the query cannot run
            kind = "warehouse" if isinstance(exc, WarehouseError) else "kafka"
            sched.failures += 1
            runner.stats.failures += 1
            FAILURES.labels(runner.name, kind).inc()
            delay = backoff_s(
                sched.failures, initial_s=self.retry_initial_s, max_s=self.retry_max_s
            )
            sched.next_due = self.monotonic() + delay
            log.warning(
                "poll failed, cursor unchanged, retrying",
                extra={
                    "query": runner.name,
                    "kind": kind,
                    "error_class": type(exc).__name__,
                    "error": str(exc),
                    "attempt": sched.failures,
                    "retry_in_s": delay,
                },
            )
            return
        sched.failures = 0
        sched.next_due = self.monotonic() + (0.0 if report.backlog else self.poll_interval_s)
