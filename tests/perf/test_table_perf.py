"""Global-table benchmark: the enricher's lookup gate, warm restarts, lookups and memory.

Run with ``make bench`` or just this file:
``.venv/bin/python -m pytest tests/perf/test_table_perf.py -m perf -s --timeout=0``.

Both lookup tables of the enricher are loaded as the enricher loads them (``bootstrap_all``
over ``csdr_assignment`` and ``slack_users``), in a separate process so its peak RSS (VmHWM)
is the tables' own and not this test process's. Sizes: ``BENCH_OWNERS`` (default 1,000,000)
and ``BENCH_USERS`` (default 100,000), 1.1M records in all. Each of ``BENCH_RUNS`` runs
(default 3; medians are printed):

* cold gate: an empty state dir, both tables loaded to the high watermarks (records/s, wall
  and CPU seconds: on a shared machine the CPU time is the steadier figure), the CPU split by
  thread (``/proc/self/task``: the Python thread, librdkafka's ``rdk:*``, RocksDB's
  ``rocksdb:*`` flushes and compactions). Compactions still running when the gate ends are
  not counted;
* warm restart: 1% of the owners are rewritten, the same state dir reopened: the gate must read
  only those records;
* lookups: ``BENCH_LOOKUPS`` (default 200,000) joins, owner then user, over random orgs
  (~2% unknown), after the warm gate;
* peak RSS of the process (MB, VmHWM), which holds both tables.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer

from libs.kafka import KafkaSettings
from libs.serde import AvroSerializer, ConfluentSchemaRegistry, CsdrAssignment, SlackUser
from libs.tables import GlobalTable, avro_table, bootstrap_all
from tests.support.kafka import create_topics, unique
from tests.support.proc import thread_cpu_s

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
OWNERS = int(os.environ.get("BENCH_OWNERS", "1000000"))
USERS = int(os.environ.get("BENCH_USERS", "100000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LOOKUPS = int(os.environ.get("BENCH_LOOKUPS", "200000"))
PARTITIONS = 3


@dataclass
class Figures:
    """What one process reports (one line of JSON on stdout)."""

    records: int
    gate_s: float
    gate_cpu_s: float
    lookups_per_s: float
    lookups_per_cpu_s: float
    peak_rss_mb: float
    #: gate CPU seconds by thread group ("python", "rdkafka", "rocksdb", "other")
    gate_cpu_threads: dict[str, float]


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, by group."""
    groups: dict[str, float] = {}
    me = os.getpid()
    for tid, (name, seconds) in thread_cpu_s(me).items():
        if tid == me:
            group = "python"
        elif name.startswith("rdk:"):
            group = "rdkafka"
        elif name.startswith("rocksdb:"):
            group = "rocksdb"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + seconds
    return groups


def _producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "batch.size": 1_000_000,
        }
    )


def _produce_all(bootstrap: str, topic: str, pairs: Iterator[tuple[bytes, bytes]]) -> None:
    p = _producer(bootstrap)
    for n, (key, value) in enumerate(pairs):
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.01)
        if n % 10_000 == 0:
            p.poll(0)
    assert p.flush(120) == 0


def _owners(
    registry: ConfluentSchemaRegistry, topic: str, ids: range, tag: str
) -> Iterator[tuple[bytes, bytes]]:
    enc = AvroSerializer(registry, CsdrAssignment)
    for i in ids:
        owner = CsdrAssignment(f"org-{i}", f"Org {i}{tag}", f"owner-{i % USERS}@example.com", T0)
        yield f"org-{i}".encode(), enc(topic, owner)


def _users(registry: ConfluentSchemaRegistry, topic: str) -> Iterator[tuple[bytes, bytes]]:
    enc = AvroSerializer(registry, SlackUser)
    for i in range(USERS):
        email = f"owner-{i}@example.com"
        yield email.encode(), enc(topic, SlackUser(email, f"U{i:07d}", T0, f"Owner {i}"))


def _load(argv: Sequence[str]) -> Figures:
    """The measured process: load both tables like the enricher, then time lookups."""
    bootstrap, registry_url, state, owners_topic, users_topic = argv
    registry = ConfluentSchemaRegistry(registry_url)
    consumer_config = KafkaSettings(bootstrap_servers=bootstrap).consumer_config(None)
    owners: GlobalTable[CsdrAssignment] = avro_table(
        CsdrAssignment,
        name="csdr_assignment",
        topic=owners_topic,
        state_dir=Path(state),
        consumer_config=consumer_config,
        registry=registry,
    )
    users: GlobalTable[SlackUser] = avro_table(
        SlackUser,
        name="slack_users",
        topic=users_topic,
        state_dir=Path(state),
        consumer_config=consumer_config,
        registry=registry,
    )
    threads_before = _thread_cpu()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    bootstrap_all([owners, users], threading.Event())
    gate_s = time.monotonic() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    gate_threads = {
        group: round(seconds - threads_before.get(group, 0.0), 3)
        for group, seconds in _thread_cpu().items()
    }
    # CPU of every thread of the process (librdkafka's and RocksDB's included): on a shared
    # machine the steadier figure of the two
    gate_cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    records = owners.applied_since_start + users.applied_since_start
    rng = random.Random(7)
    orgs = [f"org-{rng.randrange(int(OWNERS * 1.02))}" for _ in range(LOOKUPS)]
    started, cpu_started = time.monotonic(), time.process_time()
    for org in orgs:
        owner = owners.get(org)
        if owner is not None:
            users.get(owner.csdr_email)
    lookups_per_s = LOOKUPS / (time.monotonic() - started)
    lookups_per_cpu_s = LOOKUPS / (time.process_time() - cpu_started)
    owners.close()
    users.close()
    registry.close()
    peak = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return Figures(
        records, gate_s, gate_cpu_s, lookups_per_s, lookups_per_cpu_s, peak, gate_threads
    )


def _run(argv: list[str], env: dict[str, str]) -> Figures:
    cmd = [sys.executable, "-m", "tests.perf.test_table_perf", "load", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return Figures(**json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.perf
def test_table_benchmark(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    registry_url: str,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    owners_topic, users_topic = unique("bench-t-owners"), unique("bench-t-users")
    create_topics(bootstrap, [owners_topic, users_topic], partitions=PARTITIONS, compacted=True)
    started = time.monotonic()
    _produce_all(bootstrap, owners_topic, _owners(registry, owners_topic, range(OWNERS), ""))
    _produce_all(bootstrap, users_topic, _users(registry, users_topic))
    produce_s = time.monotonic() - started
    fresh = max(1, OWNERS // 100)
    cold: list[Figures] = []
    warm: list[Figures] = []
    for run in range(RUNS):
        state = tmp_path / unique("state")
        argv = [bootstrap, registry_url, str(state), owners_topic, users_topic]
        cold.append(_run(argv, dict(service_env)))
        _produce_all(
            bootstrap, owners_topic, _owners(registry, owners_topic, range(fresh), f" v{run}")
        )
        warm.append(_run(argv, dict(service_env)))

    def med(figures: list[Figures], pick: str) -> float:
        return statistics.median(float(getattr(f, pick)) for f in figures)

    lines = [
        "",
        f"table benchmark: {os.cpu_count()} cores shared with the broker and registry; "
        f"medians of {RUNS} runs; {OWNERS:,} owners + {USERS:,} users produced in "
        f"{produce_s:.0f}s",
        f"cold gate: {med(cold, 'records'):,.0f} records in {med(cold, 'gate_s'):.2f}s "
        f"= {statistics.median(f.records / f.gate_s for f in cold):,.0f} records/s "
        f"(runs: {', '.join(f'{f.gate_s:.2f}s' for f in cold)}); "
        f"CPU {med(cold, 'gate_cpu_s'):.2f}s; peak RSS {med(cold, 'peak_rss_mb'):.0f} MB",
        "cold gate CPU by thread: "
        + ", ".join(
            f"{group} {statistics.median(f.gate_cpu_threads.get(group, 0.0) for f in cold):.2f}s"
            for group in ("python", "rdkafka", "rocksdb", "other")
        ),
        f"warm restart: {med(warm, 'records'):,.0f} new records in {med(warm, 'gate_s'):.2f}s "
        f"(runs: {', '.join(f'{f.gate_s:.2f}s' for f in warm)}); "
        f"CPU {med(warm, 'gate_cpu_s'):.2f}s; peak RSS {med(warm, 'peak_rss_mb'):.0f} MB",
        f"lookups (owner then user): {med(warm, 'lookups_per_s'):,.0f} joins/s "
        f"(runs: {', '.join(f'{f.lookups_per_s:,.0f}' for f in warm)}); "
        f"{med(warm, 'lookups_per_cpu_s'):,.0f} joins per CPU second",
    ]
    print("\n".join(lines))
    assert all(f.records >= OWNERS + USERS for f in cold)
    assert all(f.records == fresh for f in warm)


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        figures = _load(sys.argv[2:])
        sys.stdout.write(json.dumps(figures.__dict__) + "\n")
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} load BOOTSTRAP REGISTRY_URL STATE OWNERS_TOPIC USERS_TOPIC")
