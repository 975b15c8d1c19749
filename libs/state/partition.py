"""The state of one input partition as handlers see it: this interval's writes over RocksDB.

Writes go to an in-memory overlay (last value per key, ``None`` for a delete); reads look at
the overlay first, then at the committed local store. The overlay is what the checkpoint
produces to the changelog, and it reaches RocksDB only after the transaction committed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from libs.state.local import Entry, LocalStore


class PartitionState:
    """``KeyValueState`` of one input partition (overlay over committed state)."""

    def __init__(self, local: LocalStore) -> None:
        self.local = local
        #: this interval's writes, last value per key; ``None``: deleted
        self.overlay: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        if key in self.overlay:
            return self.overlay[key]
        return self.local.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.overlay[key] = value

    def delete(self, key: bytes) -> None:
        self.overlay[key] = None

    def prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # A snapshot of the overlay: the caller may write while iterating (the committed
        # store does not change before the next checkpoint, which runs between records).
        mine = sorted((k, v) for k, v in self.overlay.items() if k.startswith(prefix))
        return _merge(iter(mine), self.local.scan(prefix))

    @property
    def dirty(self) -> bool:
        """Writes not committed yet."""
        return bool(self.overlay)

    def entries(self) -> list[Entry]:
        """This interval's writes, for the changelog."""
        return list(self.overlay.items())

    def commit(self, position: int | None) -> int:
        """The transaction committed: write the overlay (and ``position``) locally, in one batch.

        The store is caught up now: this partition's changelog has no writer but us.
        """
        n = self.local.write(self.overlay.items(), position, caught_up_at=time.time())
        self.overlay = {}
        return n

    def discard(self) -> None:
        """The transaction aborted (or the partition was lost): forget this interval's writes."""
        self.overlay = {}


def _merge(
    overlay: Iterator[tuple[bytes, bytes | None]], committed: Iterator[tuple[bytes, bytes]]
) -> Iterator[tuple[bytes, bytes]]:
    """Both sorted by key; the overlay wins on equal keys and its deletes hide keys."""
    o = next(overlay, None)
    c = next(committed, None)
    while o is not None or c is not None:
        if c is None or (o is not None and o[0] <= c[0]):
            assert o is not None
            if c is not None and o[0] == c[0]:
                c = next(committed, None)
            if o[1] is not None:
                yield o[0], o[1]
            o = next(overlay, None)
        else:
            yield c
            c = next(committed, None)
