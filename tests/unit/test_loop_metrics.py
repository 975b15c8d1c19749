"""The metrics an on-call's alerts read that the loops publish themselves: heartbeats, backlog."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from libs.kafka import Guarantee, LoopConfig, ProcessingLoop
from libs.runtime.heartbeat import beat
from services.notifier.sink import receipts_behind
from services.producer.runner import PollLoop
from services.producer.sink import InMemoryBatchSink
from services.producer.sources import InMemorySource
from tests.support.kafka import wait_until
from tests.unit.test_producer_runner import NOW, make_runner

HEARTBEAT = "loop_heartbeat_timestamp_seconds"


def heartbeat(loop: str) -> float:
    return REGISTRY.get_sample_value(HEARTBEAT, {"loop": loop}) or 0.0


def test_beat_sets_the_wall_time() -> None:
    before = time.time()
    beat("unit-beat")
    assert before <= heartbeat("unit-beat") <= time.time()


def test_the_producer_loop_beats_every_round() -> None:
    stop = threading.Event()
    source = InMemorySource({"onboarding": []})
    loop = PollLoop(
        [make_runner(source, InMemoryBatchSink())],
        stop,
        poll_interval_s=0.05,
        clock=lambda: NOW,
        name="unit-producer",
    )
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: heartbeat("unit-producer") > 0, timeout_s=10, message="first beat")
        first = heartbeat("unit-producer")
        wait_until(lambda: heartbeat("unit-producer") > first, timeout_s=10, message="next beat")
    finally:
        stop.set()
        t.join(10)


def test_the_processing_loop_beats_while_idle() -> None:
    """No record arrives (so no checkpoint): the heartbeat still moves with every poll."""
    stop = threading.Event()
    # librdkafka's mock cluster: no broker process needed for a loop that only polls
    mock = {"bootstrap.servers": "", "test.mock.num.brokers": 1}
    loop = ProcessingLoop(
        LoopConfig(name="unit-idle", topics=["unit-idle-in"], guarantee=Guarantee.AT_LEAST_ONCE),
        {**mock, "group.id": "unit-idle", "enable.auto.commit": False},
        dict(mock),
        lambda msg, out: None,
        service="unit",
        stop=stop,
    )
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: heartbeat("unit-idle") > 0, timeout_s=20, message="first beat")
        first = heartbeat("unit-idle")
        wait_until(lambda: heartbeat("unit-idle") > first, timeout_s=20, message="next beat")
        assert loop.stats.checkpoints == 0
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


@pytest.mark.parametrize(
    ("partitions", "behind"),
    [
        # read to the end, all finished
        ([(100, 100, 0)], 0),
        # 20 not consumed yet, 5 consumed and waiting for Slack
        ([(120, 100, 5)], 25),
        # a partition not fetched yet: its end and position are unknown (-1001)
        ([(-1001, -1001, 0), (50, 40, 2)], 12),
        # position known, end not yet: only the consumed-unfinished count
        ([(-1001, 7, 3)], 3),
        # the cached end may lag the position for a moment: never negative
        ([(10, 12, 1)], 1),
        ([], 0),
    ],
)
def test_receipts_behind(partitions: list[tuple[int, int, int]], behind: int) -> None:
    assert receipts_behind(partitions) == behind
