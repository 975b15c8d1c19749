"""Small helpers for tests that talk to the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def unique(prefix: str) -> str:
    """A fresh topic or group name, so tests never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    *,
    partitions: int = 3,
    compacted: bool = False,
    config: dict[str, str] | None = None,
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    conf = {"cleanup.policy": "compact" if compacted else "delete", **(config or {})}
    futures = admin.create_topics([NewTopic(n, partitions, 1, config=conf) for n in names])
    for fut in futures.values():
        fut.result(timeout=30)


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[Any, Any]],
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    """Produce ``(key, value)`` pairs (str keys are UTF-8 encoded) and wait for all acks."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    n = 0
    for key, value in records:
        k = key.encode() if isinstance(key, str) else key
        p.produce(topic, key=k, value=value, headers=headers)
        n += 1
        if n % 10000 == 0:
            p.poll(0)
    assert p.flush(60) == 0, "records not acknowledged"
    return n


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout_s: float = 30.0,
    read_committed: bool = True,
    idle_s: float = 2.0,
) -> list[Message]:
    """Read a topic from the beginning until ``expected`` records or ``idle_s`` of silence."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, -2) for p in meta.partitions])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                # a short extra read shows whether there is more than expected
                extra = c.consume(100, 0.5)
                out.extend(m for m in extra if m.error() is None)
                break
            msgs = c.consume(500, 0.2)
            got = [m for m in msgs if m.error() is None]
            if got:
                out.extend(got)
                last = time.monotonic()
            elif expected is None and time.monotonic() - last > idle_s:
                break
    finally:
        c.close()
    return out


def wait_until(
    predicate: Any, *, timeout_s: float = 30.0, interval_s: float = 0.1, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``message`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)
