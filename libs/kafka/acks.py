"""Sink acknowledgements: which consumed offsets are finished, and what may be committed.

A sink (the notifier) finishes records out of order: a side effect per record, then the
records it produced for it acknowledged by the broker. Only the contiguous prefix of finished
offsets of a partition may be committed, or a crash would skip unfinished records.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

TP = tuple[str, int]


@dataclass(eq=False)
class AckTicket:
    """The records still to be acknowledged before one consumed offset is finished."""

    tp: TP
    offset: int
    epoch: int
    pending: int


class OffsetTracker:
    """Per partition, the offsets handed out and which of them are finished.

    ``committable()`` gives, per partition whose finished prefix advanced, the offset to commit:
    the first offset not finished yet (or one past the last consumed). Offsets must be added
    in increasing order per partition (Kafka's order); finishing is in any order. An
    ``epoch`` per assignment keeps a late finish of a previous assignment from counting.
    """

    @dataclass
    class _Partition:
        epoch: int
        pending: deque[int] = field(default_factory=deque)
        done: set[int] = field(default_factory=set)
        next_commit: int | None = None
        committed: int | None = None

    def __init__(self) -> None:
        self._parts: dict[TP, OffsetTracker._Partition] = {}
        self._epochs = itertools.count(1)

    def assign(self, tp: TP) -> int:
        """Start tracking ``tp``; returns the epoch finishes must name."""
        epoch = next(self._epochs)
        self._parts[tp] = OffsetTracker._Partition(epoch)
        return epoch

    def epoch(self, tp: TP) -> int | None:
        """The current epoch of ``tp``, None when not tracked."""
        part = self._parts.get(tp)
        return None if part is None else part.epoch

    def add(self, tp: TP, offset: int) -> None:
        """An offset was consumed."""
        part = self._parts.get(tp)
        if part is None:
            return
        if part.pending and offset <= part.pending[-1]:
            raise ValueError(f"offset {offset} of {tp} added out of order")
        part.pending.append(offset)

    def rewind(self, tp: TP, offset: int) -> None:
        """Forget ``offset`` and everything after it (they will be consumed again)."""
        part = self._parts.get(tp)
        if part is None:
            return
        while part.pending and part.pending[-1] >= offset:
            part.done.discard(part.pending.pop())

    def finish(self, tp: TP, offset: int, epoch: int) -> None:
        """An offset's work is done; advance the committable prefix."""
        part = self._parts.get(tp)
        if part is None or part.epoch != epoch:
            return
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            first = part.pending.popleft()
            part.done.discard(first)
            part.next_commit = first + 1

    def expect(self, tp: TP, offset: int, epoch: int, records: int) -> AckTicket:
        """``offset`` finishes once ``records`` produced for it are acknowledged."""
        return AckTicket(tp, offset, epoch, records)

    def acked(self, ticket: AckTicket) -> bool:
        """One record of ``ticket`` was acknowledged; True when that finished its offset."""
        ticket.pending -= 1
        if ticket.pending:
            return False
        self.finish(ticket.tp, ticket.offset, ticket.epoch)
        return True

    def outstanding(self, tp: TP) -> int:
        """Consumed and not finished."""
        part = self._parts.get(tp)
        return 0 if part is None else len(part.pending)

    def total_outstanding(self) -> int:
        """Consumed and not finished, over every partition."""
        return sum(len(p.pending) for p in self._parts.values())

    def committable(self, only: Sequence[TP] | None = None) -> dict[TP, int]:
        """Offsets to commit (next offset to consume) where the prefix moved since the last."""
        out: dict[TP, int] = {}
        for tp, part in self._parts.items():
            if only is not None and tp not in only:
                continue
            if part.next_commit is not None and part.next_commit != part.committed:
                out[tp] = part.next_commit
        return out

    def committed(self, offsets: dict[TP, int]) -> None:
        """Record that ``offsets`` were committed."""
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = offset

    def drop(self, tp: TP) -> None:
        """Stop tracking ``tp`` (revoked or lost)."""
        self._parts.pop(tp, None)

    def partitions(self) -> list[TP]:
        """Tracked partitions."""
        return list(self._parts)
