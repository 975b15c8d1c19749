"""Producer backfill throughput from DuckDB and the BigQuery emulator, against a raw baseline.

Run with ``make bench`` (``pytest tests/perf -m perf -s --timeout=0``) or only this file:
``.venv/bin/python -m pytest tests/perf/test_producer_perf.py -m perf -s --timeout=0``.

Each run backfills the same table from a fresh cursor into fresh topics, in-process (query,
map, Avro, one Kafka transaction per batch with the cursor), and is timed from the loaded
cursor to the end of the backlog. The baseline, measured in the same runs, produces the same
number of pre-built values (no warehouse, no Avro, no mapping) with the same producer config
and one transaction per batch, so the ratio is the cost of the warehouse and the mapping.
Besides the rate, each run's CPU time per row (user + system of this process, every thread:
librdkafka's included) is printed, steadier than a rate on a shared machine, and the
process's resident memory after the runs. Figures are medians of ``RUNS`` runs; there is no
timing assertion. ``BENCH_PRODUCER_BQ_ROWS=0`` leaves the BigQuery emulator out.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from libs.kafka import KafkaSettings, dlq_topic
from libs.serde import AvroSerializer, InMemorySchemaRegistry, OnboardingStarted, SchemaRegistry
from services.producer.queries import ONBOARDING_STARTED
from services.producer.runner import QueryRunner
from services.producer.sink import KafkaTransactionalSink
from tests.integration.test_producer_sources import (
    BigQueryHarness,
    DuckDBHarness,
    WarehouseHarness,
    onboarding_row,
)
from tests.support.bigquery import BigQueryEmulator, shared_emulator
from tests.support.kafka import create_topics, unique

pytestmark = pytest.mark.perf

ROWS = int(os.environ.get("BENCH_PRODUCER_ROWS", "100000"))
BQ_ROWS = int(os.environ.get("BENCH_PRODUCER_BQ_ROWS", str(ROWS)))
BATCH = int(os.environ.get("BENCH_PRODUCER_BATCH", "5000"))
RUNS = int(os.environ.get("BENCH_PRODUCER_RUNS", "3"))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    with shared_emulator(tmp_path_factory) as emu:
        yield emu


def _rows(count: int) -> list[dict[str, object]]:
    base = datetime.now(UTC) - timedelta(days=2)
    # pairs of rows share a timestamp: the key tie-break is exercised at every batch edge
    return [
        onboarding_row(f"org-{i:06d}", base + timedelta(microseconds=13 * (i // 2)), cloud="aws")
        for i in range(count)
    ]


def _topics(bootstrap: str) -> tuple[str, str]:
    events, cursors = unique("bench-onboarding"), unique("bench-cursors")
    create_topics(bootstrap, [events, dlq_topic(events)], partitions=3)
    create_topics(bootstrap, [cursors], partitions=1, compacted=True)
    return events, cursors


@dataclass(frozen=True)
class Timing:
    """One run: wall seconds and CPU seconds of this process (every thread) over it."""

    wall_s: float
    cpu_s: float


def rss_mb() -> tuple[float, float]:
    """This process's resident memory now and its peak (VmRSS, VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def backfill_seconds(
    harness: WarehouseHarness, bootstrap: str, registry: SchemaRegistry, expected: int
) -> Timing:
    """Time one backfill of the whole table from an empty cursor."""
    events, cursors = _topics(bootstrap)
    source = harness.source()
    table = harness.table_ref()
    runner = QueryRunner(
        ONBOARDING_STARTED,
        table,
        source=source,
        sink=KafkaTransactionalSink(
            KafkaSettings(bootstrap_servers=bootstrap),
            registry,
            query=ONBOARDING_STARTED.name,
            record_type=OnboardingStarted,
            output_topic=events,
            cursor_topic=cursors,
            source=source.qualified_name(table),
            transactional_id=unique("bench-producer"),
        ),
        batch_size=BATCH,
        delay_s=0,
    )
    runner.load()
    now = datetime.now(UTC)
    cpu, started = time.process_time(), time.perf_counter()
    while runner.poll_once(now).backlog:
        pass
    elapsed = Timing(time.perf_counter() - started, time.process_time() - cpu)
    runner.close()
    source.close()
    assert runner.stats.events == expected, f"{runner.stats.events} events, expected {expected}"
    return elapsed


def baseline_seconds(bootstrap: str, count: int, value_size: int) -> Timing:
    """Produce ``count`` pre-built values plus a cursor per batch, one transaction per batch."""
    events, cursors = _topics(bootstrap)
    producer = Producer(
        KafkaSettings(bootstrap_servers=bootstrap).producer_config(
            transactional_id=unique("bench-baseline"),
            **{"transaction.timeout.ms": 60000},
        )
    )
    producer.init_transactions(30)
    payloads = [(f"org-{i:06d}".encode(), os.urandom(value_size)) for i in range(count)]
    cursor_value = os.urandom(64)
    cpu, started = time.process_time(), time.perf_counter()
    for start in range(0, count, BATCH):
        producer.begin_transaction()
        for key, value in payloads[start : start + BATCH]:
            while True:
                try:
                    producer.produce(events, key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.produce(cursors, key=b"onboarding-started", value=cursor_value)
        producer.commit_transaction(60)
    elapsed = Timing(time.perf_counter() - started, time.process_time() - cpu)
    producer.flush(10)
    return elapsed


def _encoded_size() -> int:
    """The size of one encoded event of these rows, so the baseline moves the same bytes."""
    row = _rows(1)[0]
    record = OnboardingStarted(
        event_id="5f0c3f52-3c57-5d4b-9c1e-0d6f0e2d9a11",
        org_id=str(row["org_id"]),
        org_name=str(row["org_name"]),
        plan=str(row["plan"]),
        cloud=str(row["cloud"]),
        started_at=datetime.now(UTC),
        source="test-project.alerts.onboarding_0123456789",
    )
    return len(AvroSerializer(InMemorySchemaRegistry(), OnboardingStarted)("t", record))


def _median_rate(count: int, runs: list[Timing]) -> float:
    return count / statistics.median(t.wall_s for t in runs) if runs else 0.0


def _median_cpu_us(count: int, runs: list[Timing]) -> float:
    return statistics.median(t.cpu_s for t in runs) / count * 1e6 if runs else 0.0


def test_backfill_throughput(
    tmp_path: Path,
    bootstrap: str,
    registry: SchemaRegistry,
    request: pytest.FixtureRequest,
) -> None:
    duck = DuckDBHarness(tmp_path / "bench.duckdb")
    duck.insert(_rows(ROWS))
    value_size = _encoded_size()

    timings: dict[str, list[Timing]] = {"baseline": [], "duckdb": [], "bigquery": []}
    plan: list[tuple[str, Callable[[], Timing]]] = [
        ("baseline", lambda: baseline_seconds(bootstrap, ROWS, value_size)),
        ("duckdb", lambda: backfill_seconds(duck, bootstrap, registry, ROWS)),
    ]
    bq_load_s = 0.0
    if BQ_ROWS:
        emulator: BigQueryEmulator = request.getfixturevalue("emulator")
        bq = BigQueryHarness(emulator)
        loaded = time.perf_counter()
        bq.insert(_rows(BQ_ROWS))
        bq_load_s = time.perf_counter() - loaded
        plan.append(("bigquery", lambda: backfill_seconds(bq, bootstrap, registry, BQ_ROWS)))
    for run in range(RUNS):
        for name, measure in plan:  # interleaved, so drift on a shared machine hits all
            timing = measure()
            timings[name].append(timing)
            print(
                f"run {run + 1}/{RUNS} {name:<9} {timing.wall_s:8.2f} s  cpu {timing.cpu_s:6.2f} s"
            )
    rss, peak = rss_mb()

    base = _median_rate(ROWS, timings["baseline"])
    base_cpu = _median_cpu_us(ROWS, timings["baseline"])
    duck_rate = _median_rate(ROWS, timings["duckdb"])
    duck_cpu = _median_cpu_us(ROWS, timings["duckdb"])
    print()
    print(f"producer backfill, batch {BATCH} rows per transaction, medians of {RUNS} runs")
    print(
        f"  baseline (raw {value_size}-byte values)  {ROWS:>7} rows  {base:>9.0f} rows/s"
        f"  {base_cpu:6.1f} CPU us/row"
    )
    print(
        f"  duckdb                        {ROWS:>7} rows  {duck_rate:>9.0f} rows/s"
        f"  {duck_cpu:6.1f} CPU us/row  ({duck_rate / base:.2f}x baseline)"
    )
    if BQ_ROWS:
        bq_rate = _median_rate(BQ_ROWS, timings["bigquery"])
        print(
            f"  bigquery emulator             {BQ_ROWS:>7} rows  {bq_rate:>9.0f} rows/s"
            f"  {_median_cpu_us(BQ_ROWS, timings['bigquery']):6.1f} CPU us/row"
            f"  ({bq_rate / base:.3f}x baseline; loading the table took {bq_load_s:.1f} s)"
        )
    print(f"  bench process RSS after the runs {rss:.0f} MB (peak {peak:.0f} MB)")
