"""The producer against the real broker and registry, with DuckDB and the BigQuery emulator.

Each scenario drives ``QueryRunner.poll_once(now)`` in-process (``now`` injected, so delay
windows need no waiting) over a real transactional Kafka sink, and reads the result back with
``read_committed``. The process-level scenarios (kill -9, SIGTERM) are in
test_producer_process.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import Message, Producer

from libs.kafka import FatalLoopError, KafkaSettings, dlq_topic
from libs.serde import AvroDeserializer, OnboardingStarted, ProducerCursor, SchemaRegistry
from services.producer.core import event_id
from services.producer.queries import ONBOARDING_STARTED
from services.producer.runner import QueryRunner
from services.producer.sink import CursorLoadError, KafkaTransactionalSink
from services.producer.sources import InMemorySource, TableRef
from tests.integration.test_producer_sources import (
    WarehouseHarness,
    make_harness,
    onboarding_row,
)
from tests.support.bigquery import BigQueryEmulator, shared_emulator
from tests.support.kafka import consume_all, create_topics, produce, unique

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    with shared_emulator(tmp_path_factory) as emu:
        yield emu


@pytest.fixture(
    params=[
        pytest.param("duckdb", id="duckdb"),
        pytest.param("bigquery", id="bigquery", marks=pytest.mark.bigquery),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> WarehouseHarness:
    return make_harness(request.param, request, tmp_path)


class Topics:
    """Fresh output, dead-letter and cursor topics for one test."""

    def __init__(self, bootstrap: str) -> None:
        self.events = unique("onboarding")
        self.dlq = dlq_topic(self.events)
        self.cursors = unique("cursors")
        create_topics(bootstrap, [self.events, self.dlq], partitions=3)
        create_topics(bootstrap, [self.cursors], partitions=1, compacted=True)


@pytest.fixture
def topics(bootstrap: str) -> Topics:
    return Topics(bootstrap)


class Rig:
    """Builds runners (a restart is a new runner with the same transactional id)."""

    def __init__(
        self,
        bootstrap: str,
        registry: SchemaRegistry,
        topics: Topics,
        harness: WarehouseHarness | None,
    ) -> None:
        self.bootstrap = bootstrap
        self.registry = registry
        self.topics = topics
        self.harness = harness
        self.txn_id = unique("producer-test")
        self.memory = InMemorySource()
        self.runners: list[QueryRunner] = []

    def sink(self, source_name: str, *, load_timeout_s: float = 30) -> KafkaTransactionalSink:
        return KafkaTransactionalSink(
            KafkaSettings(bootstrap_servers=self.bootstrap),
            self.registry,
            query=ONBOARDING_STARTED.name,
            record_type=OnboardingStarted,
            output_topic=self.topics.events,
            cursor_topic=self.topics.cursors,
            source=source_name,
            transactional_id=self.txn_id,
            transaction_timeout_s=30,
            load_timeout_s=load_timeout_s,
        )

    def runner(self, *, batch_size: int = 100, delay_s: float = 60.0) -> QueryRunner:
        if self.harness is not None:
            source, table = self.harness.source(), self.harness.table_ref()
        else:
            source, table = self.memory, TableRef(("onboarding",))
        runner = QueryRunner(
            ONBOARDING_STARTED,
            table,
            source=source,
            sink=self.sink(source.qualified_name(table)),
            batch_size=batch_size,
            delay_s=delay_s,
        )
        runner.load()
        self.runners.append(runner)
        return runner

    def drain(self, runner: QueryRunner, now: datetime = NOW) -> int:
        batches = 0
        while runner.poll_once(now).rows:
            batches += 1
        return batches

    def events(self, expected: int | None = None) -> list[OnboardingStarted]:
        decode = AvroDeserializer(self.registry, OnboardingStarted)
        msgs = consume_all(self.bootstrap, self.topics.events, expected=expected, idle_s=1.5)
        out = []
        for m in msgs:
            record = decode(m.value(), topic=self.topics.events, partition=0, offset=0)
            assert m.key() == record.org_id.encode()
            out.append(record)
        return sorted(out, key=lambda e: (e.started_at, e.org_id))

    def committed_cursor(self) -> ProducerCursor | None:
        runner = self.runner()  # reading back is what a restart does
        return runner.cursor

    def close(self) -> None:
        for r in self.runners:
            r.close()


@pytest.fixture
def rig(
    bootstrap: str, registry: SchemaRegistry, topics: Topics, harness: WarehouseHarness
) -> Iterator[Rig]:
    r = Rig(bootstrap, registry, topics, harness)
    yield r
    r.close()


def test_rows_sharing_a_timestamp_split_across_batches_are_produced_once(rig: Rig) -> None:
    assert rig.harness is not None
    t = NOW - timedelta(hours=1)
    tied = [onboarding_row(f"org-{i:02d}", t) for i in (4, 0, 6, 2, 5, 1, 3)]
    around = [onboarding_row("org-99", t - US), onboarding_row("org-00", t + US)]
    rig.harness.insert(tied + around)
    runner = rig.runner(batch_size=3)
    assert rig.drain(runner) == 3  # 9 rows: 3 + 3 + 3, the tie cut twice
    # a restart (new producer, same transactional id) reads the cursor back: nothing again
    again = rig.runner(batch_size=3)
    assert again.cursor == runner.cursor
    assert again.poll_once(NOW).rows == 0
    events = rig.events(expected=9)
    rows = [(t - US, "org-99")] + [(t, f"org-{i:02d}") for i in range(7)] + [(t + US, "org-00")]
    # the event ids carry the microseconds (OnboardingStarted.started_at is millis)
    assert sorted(e.event_id for e in events) == sorted(
        event_id("onboarding-started", key, ts) for ts, key in rows
    )
    assert all(e.source == runner.source_name for e in events)
    cursor = again.cursor
    assert cursor is not None
    assert (cursor.last_timestamp, cursor.last_key, cursor.rows_total) == (t + US, "org-00", 9)


def test_a_row_committed_late_within_the_delay_is_still_produced(rig: Rig) -> None:
    assert rig.harness is not None
    rig.harness.insert([onboarding_row("early", NOW - timedelta(seconds=45))])
    runner = rig.runner(delay_s=30)
    assert runner.poll_once(NOW).rows == 1
    # committed now with a timestamp 5 s ago: inside the 30 s window, so not read yet ...
    rig.harness.insert([onboarding_row("late", NOW - timedelta(seconds=5))])
    assert runner.poll_once(NOW).rows == 0
    assert runner.poll_once(NOW + timedelta(seconds=24)).rows == 0
    # ... and read once the window has passed it
    assert runner.poll_once(NOW + timedelta(seconds=26)).rows == 1
    # a row committed with a timestamp older than the cursor is behind it for good: the
    # documented limit of the delay window (core module docstring)
    rig.harness.insert([onboarding_row("too-late", NOW - timedelta(seconds=40))])
    assert runner.poll_once(NOW + timedelta(seconds=120)).rows == 0
    assert [e.org_id for e in rig.events(expected=2)] == ["early", "late"]


def test_a_malformed_row_is_dead_lettered_and_later_rows_flow(rig: Rig) -> None:
    assert rig.harness is not None
    t = NOW - timedelta(hours=1)
    rig.harness.insert(
        [
            onboarding_row("before", t),
            onboarding_row(None, t + US, org_name="No Id Inc"),
            onboarding_row("no-plan", t + 2 * US, plan=None),
            onboarding_row("after", t + 3 * US),
        ]
    )
    runner = rig.runner(batch_size=2)
    rig.drain(runner)
    assert runner.stats.dead_letters == 2
    assert sorted(e.org_id for e in rig.events(expected=2)) == ["after", "before"]
    letters = consume_all(rig.bootstrap, rig.topics.dlq, expected=2, idle_s=1.5)
    by_reason = {_headers(m)["dlq.error.message"]: m for m in letters}
    assert set(by_reason) == {
        "org_id (the row key) is NULL or empty",
        "plan is missing or empty (got None)",
    }
    no_id = by_reason["org_id (the row key) is NULL or empty"]
    headers = _headers(no_id)
    assert headers["dlq.source.topic"] == runner.source_name
    assert headers["dlq.source.partition"] == "-1"
    assert headers["dlq.source.offset"] == "1"  # the row's ordinal in cursor order
    assert headers["dlq.service"] == "producer"
    assert headers["dlq.error.class"] == "services.producer.sink.UnmappableRowError"
    assert no_id.key() is None
    body = json.loads(no_id.value())
    assert body["org_id"] is None and body["org_name"] == "No Id Inc"
    assert datetime.fromisoformat(body["started_at"]) == t + US
    assert by_reason["plan is missing or empty (got None)"].key() == b"no-plan"
    cursor = runner.cursor
    assert cursor is not None and cursor.last_key == "after" and cursor.rows_total == 4


def _headers(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in msg.headers() or []}


@pytest.mark.parametrize("harness", [None], ids=["memory"])
def test_a_restarted_producer_fences_the_old_one(rig: Rig) -> None:
    t = NOW - timedelta(hours=1)
    rig.memory.create_table("onboarding")
    rig.memory.insert("onboarding", [onboarding_row("a", t), onboarding_row("b", t + US)])
    old = rig.runner(batch_size=1)
    assert old.poll_once(NOW).rows == 1
    new = rig.runner(batch_size=1)  # init_transactions with the same id fences `old`
    with pytest.raises(FatalLoopError):
        old.poll_once(NOW)
    assert new.poll_once(NOW).rows == 1
    assert [e.org_id for e in rig.events(expected=2)] == ["a", "b"]


@pytest.mark.parametrize("harness", [None], ids=["memory"])
def test_a_tombstone_restarts_the_query_and_replays_with_the_same_ids(
    rig: Rig, bootstrap: str
) -> None:
    t = NOW - timedelta(hours=1)
    rig.memory.create_table("onboarding")
    rig.memory.insert("onboarding", [onboarding_row("a", t)])
    rig.drain(rig.runner())
    produce(bootstrap, rig.topics.cursors, [(ONBOARDING_STARTED.name, None)])
    replay = rig.runner()
    assert replay.cursor is None
    rig.drain(replay)
    first, second = rig.events(expected=2)
    assert first == second  # the replay is recognisable: same event id
    assert first.event_id == str(uuid.UUID(first.event_id))


class ProcessKilledError(Exception):
    """The process dies here: nothing after this point of ``write`` runs, nothing is closed."""


def crash_at(point: str, sink: KafkaTransactionalSink) -> None:
    """Make ``sink`` die at ``point`` of its next batch, its producer left as it is.

    The dead instance's producer is not aborted or closed, like a process killed with kill -9
    (even a little worse: it stays connected, a zombie the restart has to fence). Where the
    transaction is open, what was produced is flushed first, so its records are in the log.
    """
    produce, commit = sink._produce, sink._client.commit

    def flushed_then_crash() -> None:
        sink._client.producer.flush(30)
        raise ProcessKilledError(point)

    if point == "events produced, cursor not":

        def produce_until_the_cursor(topic: str, **kwargs: Any) -> None:
            if topic == sink.cursor_topic:
                flushed_then_crash()
            produce(topic, **kwargs)

        sink._produce = produce_until_the_cursor  # type: ignore[method-assign]
    elif point == "cursor produced, commit not sent":
        sink._client.commit = lambda *a, **kw: flushed_then_crash()  # type: ignore[method-assign]
    elif point == "committed, runner not told":

        def commit_then_crash(*args: Any, **kwargs: Any) -> None:
            commit(*args, **kwargs)
            raise ProcessKilledError(point)

        sink._client.commit = commit_then_crash  # type: ignore[method-assign]
    else:
        raise ValueError(point)


@pytest.mark.parametrize("harness", [None], ids=["memory"])
@pytest.mark.parametrize(
    ("point", "aborted"),
    [
        ("events produced, cursor not", 3),
        ("cursor produced, commit not sent", 3),
        ("committed, runner not told", 0),
    ],
)
def test_a_crash_at_any_point_of_a_batch_then_a_restart_produces_every_row_once(
    rig: Rig, bootstrap: str, point: str, aborted: int
) -> None:
    """The kill -9 of test_producer_process.py, at chosen points instead of a random one."""
    t = NOW - timedelta(hours=1)
    keys = [f"org-{i}" for i in range(8)]
    rig.memory.create_table("onboarding")
    # ties across every batch boundary: the key alone tells where a batch ended
    rig.memory.insert(
        "onboarding", [onboarding_row(k, t + (i // 2) * US) for i, k in enumerate(keys)]
    )
    dead = rig.runner(batch_size=3)
    assert dead.poll_once(NOW).rows == 3
    crash_at(point, cast(KafkaTransactionalSink, dead._sink))
    with pytest.raises(ProcessKilledError):
        dead.poll_once(NOW)

    restarted = rig.runner(batch_size=3)  # fences the dead instance, reads the cursor back
    rows_done = 6 if point == "committed, runner not told" else 3
    assert restarted.cursor is not None and restarted.cursor.rows_total == rows_done
    rig.drain(restarted)

    events = rig.events(expected=len(keys))
    assert sorted(e.org_id for e in events) == keys  # each once: no gap, no duplicate
    # what the dead instance had in the log is there, aborted: a read_uncommitted reader
    # sees it on top of the committed records
    everything = consume_all(
        bootstrap, rig.topics.events, expected=len(keys) + aborted, read_committed=False
    )
    assert len(everything) == len(keys) + aborted


@pytest.mark.parametrize("harness", [None], ids=["memory"])
@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_a_transaction_open_on_the_cursor_topic_holds_the_load_until_it_completes(
    rig: Rig, bootstrap: str, outcome: str
) -> None:
    """Another client's transaction open on the cursor partition when the cursor is read back
    (a transaction still being aborted has this shape: last stable offset below the high
    watermark) is waited for, within the load timeout; past it the load fails naming the
    partition, and the poll loop retries it. Nothing wedges."""
    t = NOW - timedelta(hours=1)
    rig.memory.create_table("onboarding")
    rig.memory.insert("onboarding", [onboarding_row("a", t)])
    rig.drain(rig.runner())
    other = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": unique("other"), "linger.ms": 0}
    )
    other.init_transactions(30)
    other.begin_transaction()
    other.produce(rig.topics.cursors, key=b"another-query", value=b"not a cursor")
    assert other.flush(30) == 0

    sink = rig.sink("memory.onboarding", load_timeout_s=3)
    try:
        sink.start()
        with pytest.raises(CursorLoadError, match=rf"{rig.topics.cursors} \[0\].*did not complete"):
            sink.load_cursor()
        if outcome == "commit":
            other.commit_transaction(30)
        else:
            other.abort_transaction(30)
        loaded = sink.load_cursor()
        assert loaded is not None and loaded.last_key == "a" and loaded.rows_total == 1
    finally:
        sink.close()
