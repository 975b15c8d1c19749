"""The alert lifecycle's own CPU per event, in-process: the enricher's hot path with and without it.

``EventHandler`` runs over the event mix of ``test_enricher_hotpath`` (half connector failures,
half onboardings, ~2% unknown orgs: fallback copies, parked) twice per run: without the
lifecycle, and with grouping and parking on over a real per-partition state (a
``PartitionState`` over RocksDB, as the service's), with a checkpoint every ``CHECKPOINT``
events as the loop makes it: the overlay produced to a changelog partition (a librdkafka
producer with no broker: ``produce`` copies and queues, the queue is purged after each
checkpoint) and then written to RocksDB in one batch. Free of broker, delivery-report and
scheduling noise, so the lifecycle's share of the CPU per output can be compared between
commits (the Kafka benchmark, ``test_enricher_perf.py``, adds those).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from libs.state import KeyValueState
from libs.state.local import LocalStore
from libs.state.partition import PartitionState
from services.enricher import handler as handler_module
from services.enricher.handler import EventHandler, LifecycleConfig
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING
from tests.perf.test_enricher_hotpath import (
    EVENTS,
    hot_path_handler,
    hot_path_inputs,
)
from tests.support.enricher_corpus import ConsumedRecord, ListEmitter

RUNS = int(os.environ.get("BENCH_RUNS", "3"))

CHECKPOINT = int(os.environ.get("BENCH_CHECKPOINT_EVENTS", "1000"))
#: ``on`` or ``off``: only that pass (the same setup otherwise), so that an instruction count
#: of the whole process (``valgrind --tool=callgrind``) of one minus the other is the
#: lifecycle's own, free of the load's noise (tests/perf/ENRICHER.md, "Lifecycle pass")
PASSES = os.environ.get("BENCH_PASSES", "both")
#: the service's defaults: a one-hour grouping window, parks kept for a day
LIFECYCLE = LifecycleConfig({CONNECTOR.name: 3_600_000, ONBOARDING.name: 3_600_000}, 86_400_000)


def _handlers() -> tuple[EventHandler, EventHandler, list[ConsumedRecord]]:
    """(without the lifecycle, with it, the events): ``test_enricher_hotpath``'s mix."""
    inputs = hot_path_inputs()
    return hot_path_handler(inputs), hot_path_handler(inputs, LIFECYCLE), inputs.records


class StateEmitter(ListEmitter):
    """Collects outputs; ``state`` is the handled record's partition state (one partition)."""

    def __init__(self, state: KeyValueState) -> None:
        super().__init__()
        self.state = state


def _checkpoint(state: PartitionState, producer: Producer, position: int) -> int:
    """What the loop's checkpoint does with one partition's state (``StateStores``)."""
    entries = state.entries()
    for key, value in entries:
        producer.produce("changelog", value, key, 0)
    producer.purge()
    producer.poll(0)
    state.commit(position + len(entries))
    return position + len(entries)


def _run(
    handler: EventHandler, records: list[ConsumedRecord], out: ListEmitter, producer: Producer
) -> tuple[float, float]:
    """(CPU µs per event, of which the checkpoints) over one pass."""
    state = getattr(out, "state", None)
    out.records.clear()
    position = 0
    in_checkpoints = 0.0
    started = time.process_time()
    for i, record in enumerate(records, 1):
        handler(record, out)  # type: ignore[arg-type]
        if state is not None and i % CHECKPOINT == 0:
            at = time.process_time()
            position = _checkpoint(state, producer, position)
            in_checkpoints += time.process_time() - at
    spent = time.process_time() - started
    return spent / len(records) * 1e6, in_checkpoints / len(records) * 1e6


@pytest.mark.perf
def test_lifecycle_cost_in_process(tmp_path: Path) -> None:
    plain, lifecycle, records = _handlers()
    with_state: list[tuple[float, float]] = []
    without: list[float] = []
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    for run in range(RUNS + 1):  # the first pass of each warms caches; not counted
        # a new store each run: the events open new groups, as in the service's benchmark
        local = LocalStore(tmp_path / f"run-{run}", store="bench", changelog=("changelog", 0))
        local.open()
        figure_off, figure_on = 0.0, (0.0, 0.0)
        if PASSES in ("both", "off"):
            figure_off, _ = _run(plain, records, ListEmitter(), producer)
        if PASSES in ("both", "on"):
            figure_on = _run(lifecycle, records, StateEmitter(PartitionState(local)), producer)
        local.close()
        if run:
            without.append(figure_off)
            with_state.append(figure_on)
    off = statistics.median(without)
    on = statistics.median(f for f, _ in with_state)
    checkpoints = statistics.median(c for _, c in with_state)
    # the service runs the mypyc build; this bench does with TEST_COMPILED=1 (tests/conftest.py)
    code = "pure Python" if str(handler_module.__file__).endswith(".py") else "compiled"
    print(
        f"\nlifecycle in-process ({EVENTS} events, checkpoint every {CHECKPOINT}, medians of "
        f"{RUNS}, {code}): off {off:.1f} µs/event, on {on:.1f} µs/event (checkpoints "
        f"{checkpoints:.1f}), lifecycle +{on - off:.1f} µs/event"
    )
