"""Per-partition key-value state of a processing loop (the alert lifecycle's open groups, parks).

The contract every implementation keeps (the RocksDB store with its compacted changelog, and
the in-memory twin below that unit tests use):

* state belongs to one *input* partition ``(topic, partition)``: it moves with the partition
  and is restored before the partition's first record is handled;
* reads see the writes of the current transaction; writes become durable only with the
  transaction that carries the outputs and the consumed offsets (exactly-once), and are
  discarded if it aborts;
* ``prefix`` iterates keys in byte order, so a key layout like ``b"park/" + org_id + b"/" +
  event_id`` finds every parked event of one org without scanning the store.

Keys and values are bytes; the caller chooses the encoding (a compact JSON or Avro record).

The implementation lives in submodules, imported by the composition root only (this module
stays free of I/O libraries, so pure cores may import the protocol):

* ``libs.state.stores.StateStores``: the stores of one loop (``ProcessingLoop(state=...)``),
  their restores and their changelog writes; the checkpoint order is documented there;
* ``libs.state.changelog``: ``changelog_topic(group_id, input_topic)`` and
  ``changelog_specs(...)``, the compacted topics to create before the loop starts;
* ``libs.state.local`` / ``libs.state.partition``: one partition's RocksDB and its overlay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class KeyValueState(Protocol):
    """The state of one input partition, as a handler sees it."""

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, including uncommitted writes of this transaction."""
        ...

    def put(self, key: bytes, value: bytes) -> None:
        """Set ``key``; durable with the current transaction."""
        ...

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (a tombstone in the changelog); durable with the current transaction."""
        ...

    def prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, in key order."""
        ...


class MemoryState:
    """A ``KeyValueState`` in a dict: the twin for unit tests of code that keeps state."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        # a snapshot: callers may write while iterating
        for key in sorted(k for k in self.data if k.startswith(prefix)):
            yield key, self.data[key]


__all__ = ["KeyValueState", "MemoryState"]
