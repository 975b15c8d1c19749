"""Static group membership against the real broker: a restarted instance gets its partitions
back at once, without the others taking them over in between (no 45 s stall, no rebalance)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Consumer

from libs.kafka import KafkaSettings
from services.enricher.app import Enricher
from services.enricher.settings import EnricherSettings
from tests.support.kafka import create_topics, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SESSION_TIMEOUT_MS = 45_000


def _config(bootstrap: str, group: str, instance: str | None) -> dict[str, Any]:
    settings = EnricherSettings(
        group_id=group,
        group_instance_id=instance,
        session_timeout_ms=SESSION_TIMEOUT_MS,
    )
    app: Any = SimpleNamespace(
        _kafka=KafkaSettings(bootstrap_servers=bootstrap, client_id="static"), _settings=settings
    )
    conf = Enricher._loop_consumer_config(app)
    # the member runs in another process: only the plain settings cross over, not the
    # Python logger librdkafka's lines go through
    conf.pop("logger", None)
    return conf


MEMBER = """
import json, sys, time
from confluent_kafka import Consumer
conf, topic = json.loads(sys.argv[1]), sys.argv[2]
c = Consumer(conf)
c.subscribe([topic])
while True:
    c.poll(0.2)
    parts = sorted(tp.partition for tp in c.assignment())
    if parts:
        print(json.dumps(parts), flush=True)
        break
while True:  # a member that keeps polling until it is killed
    c.poll(0.2)
"""


def _start_member(conf: dict[str, Any], topic: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", MEMBER, json.dumps(conf), topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()


def _partitions_of(proc: subprocess.Popen[str], timeout_s: float, other: Consumer) -> set[int]:
    """The member's assignment, polling ``other`` meanwhile (a rebalance waits for it)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        other.poll(0.1)
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return set(json.loads(proc.stdout.readline()))
    raise AssertionError(f"no assignment within {timeout_s:.0f}s")


def test_a_restarted_static_member_gets_its_partitions_back_at_once(bootstrap: str) -> None:
    """kill -9 of a member (no LeaveGroup, as a crashed pod), then the same instance id
    restarts: it rejoins in place and gets the same partitions within seconds. A dynamic
    member would wait for the session timeout (45 s) before the group rebalanced."""
    topic, group = unique("static"), unique("static-group")
    create_topics(bootstrap, [topic], partitions=4)
    conf_a = _config(bootstrap, group, "enricher-pod-a")
    b = Consumer(_config(bootstrap, group, "enricher-pod-b"))
    b.subscribe([topic])
    a = _start_member(conf_a, topic)
    try:
        _partitions_of(a, 60, b)
        deadline = time.monotonic() + 60
        while len(b.assignment()) not in (1, 2, 3) and time.monotonic() < deadline:
            b.poll(0.2)
        b_parts = {tp.partition for tp in b.assignment()}
        a_parts = set(range(4)) - b_parts
        assert a_parts and b_parts, (a_parts, b_parts)
        _kill(a)
        restarted = time.monotonic()
        a = _start_member(conf_a, topic)
        back = _partitions_of(a, SESSION_TIMEOUT_MS / 1000 - 10, b)
        took = time.monotonic() - restarted
        for _ in range(10):
            b.poll(0.1)
        assert back == a_parts, f"restarted member got {back}, had {a_parts}"
        assert took < 20, f"{took:.1f}s to get its partitions back"
        assert {tp.partition for tp in b.assignment()} == b_parts, "the others took them over"
    finally:
        _kill(a)
        b.close()
