"""The rebalance gate: a partition opens once a table reached the marks of its assignment."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from libs.serde import DeserializationError
from libs.tables import TableError
from services.notifier.core import AttemptMarker
from services.notifier.gate import PartitionGate
from services.notifier.markers import decode_marker, encode_marker

TP = ("slack-messages", 0)
OTHER = ("slack-messages", 1)


class FakeTable:
    """Positions and high watermarks set by the test; ``down`` makes the snapshot fail."""

    def __init__(self) -> None:
        self.positions: dict[int, int] = {0: 0, 1: 0}
        self.highs: dict[int, int] = {0: 3, 1: 5}
        self.down = False
        self.snapshots = 0
        self.checks = 0

    def high_watermarks(self, timeout_s: float = 10.0) -> dict[int, int]:
        self.snapshots += 1
        if self.down:
            raise TableError("broker does not answer")
        return dict(self.highs)

    def caught_up_to(self, marks: Mapping[int, int]) -> bool:
        self.checks += 1
        return all(self.positions.get(p, 0) >= m for p, m in marks.items())


def test_a_partition_opens_once_every_table_partition_reached_its_mark() -> None:
    table = FakeTable()
    gate = PartitionGate(table, name="receipts")
    assert gate.is_open(TP)  # never gated
    gate.close([TP, OTHER])
    assert not gate.is_open(TP)  # no snapshot yet
    gate.poll()
    table.highs = {0: 9, 1: 9}  # written after the snapshot: not waited for
    assert gate.waiting and not gate.is_open(TP)
    table.positions = {0: 3, 1: 4}
    assert not gate.is_open(TP)
    table.positions = {0: 3, 1: 5}
    assert gate.is_open(TP) and gate.is_open(OTHER)
    assert not gate.waiting


def test_a_partition_with_nothing_queued_opens_at_the_poll() -> None:
    """No message of OTHER asks ``is_open``; the gate still stops waiting for it.

    While the gate waits, the loop polls its tables on every turn: a partition that never
    received a message kept both tables polled once per message for good (8,044 polls in
    8,000 one-channel messages, where 0.1 s apart were due).
    """
    table = FakeTable()
    gate = PartitionGate(table, name="receipts")
    gate.close([TP, OTHER])
    gate.poll()
    assert gate.waiting
    table.positions = {0: 3, 1: 5}
    table.checks = 0
    gate.poll()
    assert not gate.waiting
    assert table.checks == 1  # both partitions share the assignment's snapshot
    assert gate.is_open(TP) and gate.is_open(OTHER)


def test_a_failed_snapshot_keeps_the_partition_gated_and_is_retried() -> None:
    table, clock = FakeTable(), [0.0]
    gate = PartitionGate(table, name="receipts", retry_s=1.0, monotonic=lambda: clock[0])
    table.down = True
    table.positions = {0: 100, 1: 100}
    gate.close([TP])
    gate.poll()
    assert not gate.is_open(TP)  # no marks: never opens on a guess
    gate.poll()
    assert table.snapshots == 1  # not before retry_s
    table.down = False
    clock[0] = 1.0
    gate.poll()
    assert table.snapshots == 2 and gate.is_open(TP)


def test_a_revoked_partition_is_forgotten() -> None:
    gate = PartitionGate(FakeTable(), name="receipts")
    gate.close([TP])
    gate.forget([TP])
    assert gate.is_open(TP) and not gate.waiting


def test_a_marker_round_trips_through_the_topic_format() -> None:
    t = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    marker = AttemptMarker("C1", 2, t)
    raw = encode_marker(marker, message_id="m1", tp=TP, offset=7, started_at=t)
    assert decode_marker(raw, "slack-message-attempts", 0, 0) == marker
    with pytest.raises(DeserializationError):
        decode_marker(b"{}", "slack-message-attempts", 0, 3)
