"""State store restore benchmark: a cold restore of 200k changelog records, and a warm one.

Run: ``.venv/bin/python -m pytest tests/perf/test_state_restore_perf.py -m perf -s --timeout=0``
(size: ``BENCH_STATE_RECORDS``, default 200,000). The changelog has 3 partitions of ~100-byte
values under distinct keys (the alert lifecycle's groups and parks are of that size); the
restore is driven exactly as the loop drives it, slice after slice of ``StateStores.restore``,
until every partition's position reached the end. Prints records/s (wall) and CPU seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from libs.kafka import KafkaSettings, ensure_topics
from libs.state.changelog import changelog_specs, changelog_topic
from libs.state.stores import StateStores
from tests.support.kafka import create_topics, unique

pytestmark = [pytest.mark.perf, pytest.mark.integration]

RECORDS = int(os.environ.get("BENCH_STATE_RECORDS", "200000"))
PARTITIONS = 3


def _fill(bootstrap: str, changelog: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    value = b"v" * 100
    for i in range(RECORDS):
        key = f"group/org-{i:07d}/alert-{i}".encode()
        while True:
            try:
                producer.produce(changelog, key=key, value=value)
                break
            except BufferError:  # a full local queue on a loaded machine: let it drain
                producer.poll(0.1)
    assert producer.flush(120) == 0


def _restore(stores: StateStores, topic: str) -> tuple[float, float]:
    stores.assigned([(topic, p) for p in range(PARTITIONS)])
    wall, cpu = time.perf_counter(), time.process_time()
    while stores.restoring:
        stores.restore()
    return time.perf_counter() - wall, time.process_time() - cpu


def test_restore_rate(bootstrap: str, tmp_path: Path) -> None:
    topic, group = unique("bench-in"), unique("bench")
    create_topics(bootstrap, [topic], partitions=PARTITIONS)
    ensure_topics(
        {"bootstrap.servers": bootstrap},
        changelog_specs(group, {topic: PARTITIONS}, replication_factor=1),
    )
    _fill(bootstrap, changelog_topic(group, topic))
    config = KafkaSettings(bootstrap_servers=bootstrap).consumer_config(group)

    cold = StateStores("bench", tmp_path, group, config)
    cold_s, cold_cpu = _restore(cold, topic)
    assert cold.restored_records == RECORDS
    state = cold.state((topic, 0))
    assert sum(1 for _ in state.prefix(b"group/")) > 0
    cold.close()

    warm = StateStores("bench", tmp_path, group, config)
    warm_s, _ = _restore(warm, topic)
    assert warm.restored_records == 0
    warm.close()

    print(
        f"\nstate restore, {RECORDS} changelog records over {PARTITIONS} partitions: "
        f"cold {cold_s:.2f}s ({RECORDS / cold_s:,.0f} records/s, {cold_cpu:.2f}s CPU), "
        f"warm {warm_s:.3f}s (nothing to re-read)"
    )
