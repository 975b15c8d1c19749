"""The rebalance gate: a newly assigned partition starts once a table has read what was written.

A table (the receipts, the in-doubt markers) is a ``GlobalTable`` every replica follows. When a
partition of ``slack-messages`` moves to this replica, its previous owner has flushed the
partition's receipts (on revoke) or its markers (before each post) to the table's topic; the
new owner must not decide anything about the partition's messages before its copy of the
table holds those records. Positions against high watermarks close that by construction:

* at assignment, snapshot the table topic's high watermarks (everything acknowledged before
  the partition was handed over is below them);
* the partition's messages wait until the table's positions reach the snapshot
  (``caught_up_to``), while the loop keeps polling the consumer and the table.

The snapshot is one bounded broker round trip per table partition, taken by ``poll()`` on the
loop's next turn rather than in the assignment callback: the callback stays as short as it was
(a rebalance waits for it). Taken a few milliseconds after the assignment, the snapshot can
only be higher, which waits for more, never less. A snapshot that fails (the broker does not
answer in time) keeps the partition gated and is retried at most every ``retry_s``: the
partition waits, it never starts on a guess.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from libs.tables import TableError

log = logging.getLogger(__name__)

TP = tuple[str, int]


class Followed(Protocol):
    """What the gate needs of a table (``libs.tables.GlobalTable`` has both)."""

    def high_watermarks(self, timeout_s: float = 10.0) -> dict[int, int]: ...

    def caught_up_to(self, marks: Mapping[int, int]) -> bool: ...


class PartitionGate:
    """Which assigned partitions still wait for ``table`` (module docstring)."""

    def __init__(
        self,
        table: Followed,
        *,
        name: str,
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self._name = name
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._mono = monotonic
        #: gated partitions -> the marks they wait for (None: the snapshot is still to take)
        self._waiting: dict[TP, Mapping[int, int] | None] = {}
        self._next_retry = 0.0

    def close(self, tps: Iterable[TP]) -> None:
        """``tps`` were assigned: gate them on the next snapshot of the high watermarks."""
        for tp in tps:
            self._waiting[tp] = None

    def forget(self, tps: Iterable[TP]) -> None:
        """``tps`` are no longer ours."""
        for tp in tps:
            self._waiting.pop(tp, None)

    def is_open(self, tp: TP) -> bool:
        """True once ``tp``'s snapshot is reached (or ``tp`` was never gated); never blocks."""
        if tp not in self._waiting:
            return True
        marks = self._waiting[tp]
        if marks is None or not self._table.caught_up_to(marks):
            return False
        self._open(tp)
        return True

    def _open(self, tp: TP) -> None:
        del self._waiting[tp]
        log.info(
            "partition gate open",
            extra={"table": self._name, "partition": f"{tp[0]}[{tp[1]}]"},
        )

    @property
    def waiting(self) -> bool:
        """Some partition waits (the caller then polls its table on every turn)."""
        return bool(self._waiting)

    def poll(self) -> None:
        """Take the snapshot of newly gated partitions (a failed one: every ``retry_s``), and
        open those whose snapshot is reached.

        Opening here, not only when a message asks ``is_open``, matters for the partitions
        that receive nothing: while any partition waits, the caller polls its table on every
        turn, and a partition without messages kept that going for good (a table poll per
        message instead of one per interval).
        """
        if not self._waiting:
            return
        missing = [tp for tp, marks in self._waiting.items() if marks is None]
        if missing and self._mono() >= self._next_retry:
            marks = self._snapshot()
            if marks is not None:
                for tp in missing:
                    self._waiting[tp] = marks
        # the partitions of one assignment share one snapshot: ask the table once for it
        # (``caught_up_to`` reads the consumer's positions), not once per partition
        reached: dict[int, bool] = {}
        for tp, marks in list(self._waiting.items()):
            if marks is None:
                continue
            if id(marks) not in reached:
                reached[id(marks)] = self._table.caught_up_to(marks)
            if reached[id(marks)]:
                self._open(tp)

    def _snapshot(self) -> Mapping[int, int] | None:
        try:
            return self._table.high_watermarks(self._timeout_s)
        except TableError as exc:
            self._next_retry = self._mono() + self._retry_s
            log.warning(
                "high watermarks not read, the partitions stay gated",
                extra={"table": self._name, "error": str(exc)},
            )
            return None
