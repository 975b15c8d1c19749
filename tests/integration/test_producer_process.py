"""``python -m services.producer`` as a process: kill -9 mid-batch and restart, SIGTERM, health.

The warehouse holds many rows with many shared timestamps and the batch is small. At a random
point after output appears the producer is frozen (SIGSTOP) until it is caught with an open
transaction whose records are already in the log, then killed with SIGKILL: a kill in the
middle of a batch by construction, not by luck. After every kill the producer restarts; at the
end the ``read_committed`` output must hold every row exactly once, and the
``read_uncommitted`` view holds exactly the aborted records on top.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from libs.serde import AvroDeserializer, OnboardingStarted, SchemaRegistry
from services.producer.core import event_id
from tests.integration.test_producer_sources import (
    WarehouseHarness,
    make_harness,
    onboarding_row,
)
from tests.support.bigquery import BigQueryEmulator, shared_emulator
from tests.support.kafka import consume_all, unique, wait_until
from tests.support.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROWS = 1500
BATCH = 25
KILLS = 2


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    with shared_emulator(tmp_path_factory) as emu:
        yield emu


class ProducerProcess:
    """One run of the producer, its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.producer"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


class TopicCounter:
    """Counts the records of a topic in one isolation level, following it as it grows.

    The count is of distinct ``(partition, offset)`` pairs, so a consumer that reads part of
    the topic again (an offset reset goes back to the beginning, never past records to the
    end) cannot inflate it, and no reset can make it miss records for good. The consumer's
    errors are kept for the failure messages: they used to be dropped without a trace.
    """

    #: how often the topic is looked up while it does not exist yet: a lookup per loop turn
    #: was ~2,000 metadata requests a second, most of a core of the broker the producer needs
    LOOKUP_INTERVAL_S = 0.1

    def __init__(self, bootstrap: str, topic: str, *, committed: bool) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("watch"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed" if committed else "read_uncommitted",
            }
        )
        self._topic = topic
        self._partitions: list[TopicPartition] = []
        self._next_lookup = 0.0
        self._seen: set[tuple[int, int]] = set()
        self.errors: list[str] = []

    @property
    def count(self) -> int:
        return len(self._seen)

    def _assign(self) -> bool:
        if self._partitions:
            return True
        now = time.monotonic()
        if now < self._next_lookup:
            time.sleep(self._next_lookup - now)
        self._next_lookup = time.monotonic() + self.LOOKUP_INTERVAL_S
        try:
            meta = self._consumer.list_topics(self._topic, timeout=5).topics[self._topic]
        except KafkaException:
            return False
        if meta.error is not None or not meta.partitions:
            return False
        self._partitions = [TopicPartition(self._topic, p) for p in sorted(meta.partitions)]
        self._consumer.assign(
            [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        )
        return True

    def poll(self, timeout_s: float = 0.05) -> int:
        if not self._assign():
            return self.count
        for m in self._consumer.consume(500, timeout_s):
            err = m.error()
            if err is None:
                self._seen.add((m.partition() or 0, m.offset() or 0))
            elif len(self.errors) < 20:
                self.errors.append(f"{err.name()}: {err.str()}")
        return self.count

    def read_to_end(self, timeout_s: float = 60) -> int:
        """Read up to the high watermarks taken now (the writer has stopped); the count.

        Reached by position, as ``libs.kafka.read_to_end`` does: transaction markers occupy
        offsets no record is returned for. No quiet period to guess: a loaded machine can
        leave a fetch unanswered longer than any such guess.
        """
        deadline = time.monotonic() + timeout_s
        while not self._assign():
            assert time.monotonic() < deadline, f"{self._topic} never appeared"
        ends = {}
        for tp in self._partitions:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
            if high > low:
                ends[tp.partition] = high
        while ends:
            assert time.monotonic() < deadline, (
                f"{self._topic} not read to {ends} in {timeout_s}s: {self.describe()}"
            )
            self.poll(0.2)
            for tp in self._consumer.position(
                [TopicPartition(self._topic, p) for p in sorted(ends)]
            ):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return self.count

    def describe(self) -> str:
        """The count and the consumer's errors, for a failure message."""
        return f"{self.count} records seen, consumer errors: {self.errors or 'none'}"

    def close(self) -> None:
        self._consumer.close()


class TransactionProbe:
    """Tells whether a topic has an open transaction: last stable offset below high watermark.

    ``ListOffsets`` answers with the high watermark for read_uncommitted and the last stable
    offset (the first offset of the oldest open transaction) for read_committed.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._topic = topic
        self._views = [
            Consumer(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": unique("probe"),
                    "isolation.level": level,
                }
            )
            for level in ("read_committed", "read_uncommitted")
        ]
        meta = self._views[0].list_topics(topic, timeout=10).topics[topic]
        self._partitions = [TopicPartition(topic, p) for p in meta.partitions]

    def open_transactions(self) -> dict[int, int]:
        """Where the open transactions start: partition -> last stable offset.

        Only partitions whose last stable offset is below the high watermark, that is with
        records of an open transaction in the log; empty when every transaction is complete.
        """
        committed, uncommitted = self._views
        starts = {}
        for tp in self._partitions:
            stable = committed.get_watermark_offsets(tp, timeout=30)[1]
            high = uncommitted.get_watermark_offsets(tp, timeout=30)[1]
            if high > stable:
                starts[tp.partition] = stable
        return starts

    def close(self) -> None:
        for c in self._views:
            c.close()


#: how long a frozen producer's transaction must stay open, unchanged, to count as the batch
#: it is in the middle of (a commit already sent completes on the broker meanwhile)
SETTLE_S = 1.0
#: how long to keep trying to catch the producer inside a transaction
CATCH_TIMEOUT_S = 120.0


class Killable(Protocol):
    """What ``kill_inside_a_transaction`` does to a process (``ProducerProcess``)."""

    log_path: Path

    def signal(self, sig: signal.Signals) -> None: ...

    def wait(self, timeout_s: float = 60) -> int: ...


class OpenTransactions(Protocol):
    """What ``kill_inside_a_transaction`` asks the log (``TransactionProbe``)."""

    def open_transactions(self) -> dict[int, int]: ...


def kill_inside_a_transaction(proc: Killable, probe: OpenTransactions, rng: random.Random) -> None:
    """Freeze the producer until it is caught with an open transaction, then SIGKILL it.

    With the process stopped (SIGSTOP), a transaction that stays open where it started for
    ``SETTLE_S`` is the batch the process is in the middle of: an ``EndTxn`` already on its
    way would have moved the last stable offset by then. The settle period used to be a
    fixed 0.2 s, which a loaded broker can overrun while it writes the commit markers: the
    "killed inside a transaction" producer had in fact committed. Otherwise let the producer
    run a few more milliseconds and try again, until ``CATCH_TIMEOUT_S`` has passed.
    """
    deadline = time.monotonic() + CATCH_TIMEOUT_S
    while time.monotonic() < deadline:
        proc.signal(signal.SIGSTOP)
        caught = probe.open_transactions()
        settled = time.monotonic() + SETTLE_S
        while caught and time.monotonic() < settled:
            time.sleep(0.1)
            still = probe.open_transactions()
            if any(still.get(p) != start for p, start in caught.items()):
                caught = {}  # completed meanwhile: the producer was committing
        if caught:
            proc.signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            return
        proc.signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.01))
    raise AssertionError(
        f"never caught the producer inside a transaction in {CATCH_TIMEOUT_S:.0f}s:\n"
        f"{proc.log_path.read_text()[-3000:]}"
    )


def wait_for_output(seen: TopicCounter, proc: ProducerProcess, threshold: int, what: str) -> None:
    """Wait until ``seen`` counts ``threshold`` records while ``proc`` runs.

    A timeout says how far the output got, what the watching consumer ran into and what the
    producer logged: it failed once in a clean-clone CI run on a loaded machine (53 records
    not seen in 120 s before the SIGTERM) with nothing to tell a stalled producer from a
    slow one or from a watcher that had stopped counting.
    """
    try:
        wait_until(
            lambda: seen.poll() >= threshold or not proc.alive(),
            timeout_s=120,
            interval_s=0.0,  # poll() itself waits (consume, topic lookups)
            message=f"output to reach {threshold} records {what}",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; {seen.describe()}; producer log:\n{proc.log_path.read_text()[-4000:]}"
        ) from exc
    assert proc.alive(), f"producer exited early:\n{proc.log_path.read_text()[-3000:]}"


#: the cursor reader's debug lines worth keeping: what each fetch returned (offsets, last
#: stable offset), the aborted message sets it skipped and the abort markers it saw
_TRACE_FACILITIES = {"FETCH", "CONSUME", "MSG", "TXN"}


def reader_trace(proc: ProducerProcess) -> str:
    """Each run's cursor load, as the producer logged it with ``PRODUCER_CURSOR_READER_DEBUG``.

    A restart once loaded the cursor record of the transaction its ``init_transactions`` had
    aborted (25 rows never produced) and nothing in the log said what its fetches returned:
    this keeps, for every start, the reader's fetch responses, the aborted message sets and
    abort markers they held, and the cursor it loaded.
    """
    out = []
    for line in proc.log_lines():
        msg = str(line.get("msg", ""))
        if msg in {"producer starting", "cursor loaded"} or line.get("level") == "ERROR":
            fields = {k: line.get(k) for k in ("cursor_key", "rows_total", "offset") if k in line}
            out.append(f"{line.get('ts')} {msg} {fields or ''}")
        elif line.get("logger") == "librdkafka.cursor-reader" and (
            line.get("facility") in _TRACE_FACILITIES
            and "Fetch 1/" not in msg
            and "is fetchable" not in msg
        ):
            out.append(f"{line.get('ts')} {line.get('facility')} {line.get('client')}: {msg}")
    return "cursor reader trace:\n" + "\n".join(out[-200:])


def _rows(now: datetime) -> list[dict[str, object]]:
    base = now - timedelta(days=1)
    # three rows per timestamp (ties everywhere), microsecond steps between timestamps
    return [
        onboarding_row(f"org-{i:05d}", base + timedelta(microseconds=7 * (i // 3)))
        for i in range(ROWS)
    ]


def _env(
    service_env: dict[str, str], harness: WarehouseHarness, events: str, cursors: str
) -> dict[str, str]:
    env = dict(service_env)
    env.update(harness.env())
    env.update(
        {
            "TOPIC_ONBOARDING_EVENTS": events,
            "TOPIC_PRODUCER_CURSORS": cursors,
            "PRODUCER_BATCH_SIZE": str(BATCH),
            "PRODUCER_POLL_INTERVAL_S": "0.5",
            "PRODUCER_DELAY_S": "5",
            "PRODUCER_RETRY_INITIAL_S": "0.2",
            "PRODUCER_RETRY_MAX_S": "2",
            "PRODUCER_TRANSACTIONAL_ID": unique("producer-kill"),
            # what the cursor reader's fetches returned and skipped: once, a restart loaded
            # the cursor of the batch its init_transactions had aborted (reader_trace)
            "PRODUCER_CURSOR_READER_DEBUG": "fetch,msg,eos",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.mark.parametrize(
    ("kind", "seed"),
    [
        pytest.param("duckdb", 1, id="duckdb-seed1"),
        pytest.param("duckdb", 2, id="duckdb-seed2"),
        pytest.param("bigquery", 3, id="bigquery-seed3", marks=pytest.mark.bigquery),
    ],
)
def test_kill_9_mid_batch_then_restart_produces_every_row_exactly_once(
    kind: str,
    seed: int,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    bootstrap: str,
    registry: SchemaRegistry,
    service_env: dict[str, str],
) -> None:
    rng = random.Random(seed)
    harness = make_harness(kind, request, tmp_path)
    rows = _rows(datetime.now(UTC))
    harness.insert(rows)
    events, cursors = unique("onboarding"), unique("cursors")
    env = _env(service_env, harness, events, cursors)
    log_path = tmp_path / "producer.log"
    seen = TopicCounter(bootstrap, events, committed=False)
    probe: TransactionProbe | None = None
    try:
        # first a graceful stop in the middle of the backfill: exit 0, nothing half-written
        proc = ProducerProcess(env, log_path)
        threshold = rng.randint(BATCH, ROWS // (KILLS + 2))
        wait_for_output(seen, proc, threshold, "before SIGTERM")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-3000:]
        assert any(line.get("msg") == "producer stopped" for line in proc.log_lines())
        for kill in range(KILLS):
            # a random point after this run's output has started to appear
            threshold = seen.count + rng.randint(BATCH, ROWS // (KILLS + 1))
            proc = ProducerProcess(env, log_path)
            try:
                wait_for_output(seen, proc, threshold, f"before kill {kill + 1}")
                probe = probe or TransactionProbe(bootstrap, events)
                kill_inside_a_transaction(proc, probe, rng)
            finally:
                if proc.alive():
                    proc.signal(signal.SIGKILL)
                    proc.wait()

        port = free_port()
        final = ProducerProcess(dict(env, METRICS_PORT=str(port)), log_path)
        try:
            wait_until(
                lambda: _get(port, "/readyz")[0] == 200 or not final.alive(),
                timeout_s=60,
                message="readiness",
            )
            assert final.alive(), f"producer exited early:\n{log_path.read_text()[-3000:]}"
            result = consume_all(bootstrap, events, expected=ROWS, timeout_s=180)
            status, metrics = _get(port, "/metrics")
            assert status == 200
            assert 'producer_cursor_lag_seconds{query="onboarding-started"}' in metrics
            assert 'producer_events_produced_total{query="onboarding-started"}' in metrics
        finally:
            final.signal(signal.SIGTERM)
            rc = final.wait()
        assert rc == 0, log_path.read_text()[-3000:]
        # the SIGTERM run and the final run logged their stop; the killed ones could not
        stops = [line for line in final.log_lines() if line.get("msg") == "producer stopped"]
        assert len(stops) == 2

        decode = AvroDeserializer(registry, OnboardingStarted)
        got = [decode(m.value(), topic=events, partition=0, offset=0) for m in result]
        assert len(got) == ROWS, (
            f"expected {ROWS} committed records, got {len(got)}\n{reader_trace(final)}"
        )
        dupes = [k for k, n in Counter(e.org_id for e in got).items() if n > 1]
        assert not dupes, f"produced more than once: {dupes[:10]}\n{reader_trace(final)}"
        assert {e.event_id for e in got} == {
            event_id("onboarding-started", str(r["org_id"]), r["started_at"])  # type: ignore[arg-type]
            for r in rows
        }
        # every kill left an open transaction's records in the log; the restarts aborted them
        assert seen.read_to_end() - ROWS >= KILLS, seen.describe()
    finally:
        seen.close()
        if probe is not None:
            probe.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class _ScriptedProducer:
    """A process and the log it writes to, for ``kill_inside_a_transaction`` alone.

    The first time it is frozen it has just sent the commit of its batch: the transaction is
    open for another ``commit_lag_s`` (a loaded broker writing the markers), then complete.
    Once continued it opens the next batch, which stays open.
    """

    def __init__(self, log_path: Path, commit_lag_s: float) -> None:
        self.log_path = log_path
        self.signals: list[signal.Signals] = []
        self.killed_in: dict[int, int] | None = None
        self._commit_lag_s = commit_lag_s
        self._committing_until: float | None = None

    def signal(self, sig: signal.Signals) -> None:
        self.signals.append(sig)
        if sig == signal.SIGSTOP and self._committing_until is None:
            self._committing_until = time.monotonic() + self._commit_lag_s
        if sig == signal.SIGKILL:
            self.killed_in = self.open_transactions()

    def wait(self, timeout_s: float = 60) -> int:
        return -signal.SIGKILL

    def open_transactions(self) -> dict[int, int]:
        if signal.SIGCONT in self.signals:
            return {1: 25}  # the next batch: its records from offset 25 on, open
        assert self._committing_until is not None
        return {0: 0} if time.monotonic() < self._committing_until else {}


def test_a_commit_still_completing_while_frozen_is_not_taken_for_a_batch_in_the_middle(
    tmp_path: Path,
) -> None:
    # 0.5 s for the markers: more than the fixed 0.2 s the check used to allow, well within
    # what a loaded 2-core machine takes
    producer = _ScriptedProducer(tmp_path / "producer.log", commit_lag_s=0.5)
    producer.log_path.write_text("")
    kill_inside_a_transaction(producer, producer, random.Random(0))
    assert producer.killed_in == {1: 25}, "killed while the previous batch was committing"
    assert producer.signals == [signal.SIGSTOP, signal.SIGCONT, signal.SIGSTOP, signal.SIGKILL]


def test_sigterm_while_waiting_for_the_warehouse_exits_0(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    # the DuckDB file does not exist yet: the producer keeps retrying with backoff
    env = dict(service_env)
    env.update(
        {
            "PRODUCER_WAREHOUSE": f"duckdb://{tmp_path / 'absent.duckdb'}",
            "TOPIC_ONBOARDING_EVENTS": unique("onboarding"),
            "TOPIC_PRODUCER_CURSORS": unique("cursors"),
            "PRODUCER_TRANSACTIONAL_ID": unique("producer-term"),
            "PRODUCER_RETRY_INITIAL_S": "30",
            "LOG_FORMAT": "json",
            "KAFKA_SASL_PASSWORD": "s3cr3t-never-logged",
        }
    )
    proc = ProducerProcess(env, tmp_path / "producer.log")
    try:
        wait_until(
            lambda: any(
                line.get("msg") == "poll failed, cursor unchanged, retrying"
                for line in proc.log_lines()
            ),
            timeout_s=60,
            message="a failed poll",
        )
        started = time.monotonic()
    finally:
        proc.signal(signal.SIGTERM)
        rc = proc.wait()
    assert rc == 0
    assert time.monotonic() - started < 10  # the 30 s backoff wait was interrupted
    lines = proc.log_lines()
    failed = [
        line for line in lines if line.get("msg") == "poll failed, cursor unchanged, retrying"
    ]
    assert failed[0]["kind"] == "warehouse" and "does not exist" in str(failed[0]["error"])
    start = [line for line in lines if line.get("msg") == "producer starting"]
    assert start and "onboarding_table" in json.dumps(start[0])
    assert "s3cr3t-never-logged" not in proc.log_path.read_text()
