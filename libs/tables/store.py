"""Where a table's records and positions live: RocksDB (rocksdict), and an in-memory twin.

The store knows nothing about Kafka consumers or decoding: it holds raw values by key and the
next offset of every partition, and writes both in one batch so they can never disagree.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter
from rocksdict import (
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from libs.tables.errors import TableError

log = logging.getLogger(__name__)

_DATA = b"d"
_OFFSET = b"o"
_META = b"m:meta"
#: the id of the cluster the offsets were read from
_CLUSTER = b"m:cluster"
_PARTITION = struct.Struct(">I")
_NEXT_OFFSET = struct.Struct(">q")
#: bumped when the store's key layout changes: an old store is then wiped and rebuilt
LAYOUT_VERSION = "1"
#: level-0 files (memtable flushes) that start a compaction: RocksDB's default...
_L0_COMPACTION_TRIGGER = 4
#: ...and during a bulk load: below RocksDB's write slowdown trigger (20), so a load of any
#: size never throttles its own writes
_L0_COMPACTION_TRIGGER_BULK = 16

REBUILDS = Counter(
    "table_rebuilds_total", "Times the store was wiped and rebuilt", ["table", "reason"]
)

#: (key, value) to write; a ``None`` value deletes the key (a tombstone)
Entry = tuple[bytes, bytes | None]


class TableStore(Protocol):
    """A table's persistent state: values by key plus the next offset of each partition."""

    def open(self) -> None:
        """Open (or create) the store; wipe it when it is corrupt or of another format."""
        ...

    def wipe(self, reason: str) -> None:
        """Delete everything (data and offsets); the store stays open and empty."""
        ...

    def cluster_id(self) -> str | None:
        """The cluster the stored offsets belong to (None: not recorded)."""
        ...

    def set_cluster_id(self, cluster_id: str) -> None:
        """Record the cluster the offsets belong to (``wipe`` forgets it)."""
        ...

    def offsets(self) -> dict[int, int]:
        """The stored next offset of every partition written so far."""
        ...

    def write(self, entries: Iterable[Entry], offsets: dict[int, int]) -> None:
        """Apply ``entries`` and set ``offsets`` atomically (one batch)."""
        ...

    def get(self, key: bytes) -> bytes | None:
        """The raw value of ``key``, ``None`` when absent."""
        ...

    def estimate_keys(self) -> int:
        """Number of data keys (an estimate is acceptable)."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable."""
        ...

    def bulk_load(self, on: bool) -> None:
        """A hint: many writes follow (``on``) or they are done; changes no data."""
        ...

    def close(self) -> None:
        """Flush and release the store."""
        ...


class RocksDictStore:
    """``TableStore`` in one RocksDB column family (rocksdict, raw mode).

    Keys: ``d<key>`` data, ``o<partition:u32be>`` next offset (i64be), ``m:meta`` the format.
    Writes skip the WAL: data and offsets share one memtable that is flushed atomically, so a
    crash loses only a suffix of both together, and the table re-reads exactly that suffix.
    A bulk load (``bulk_load``, the table's gate) defers compactions to its end: a restore
    writes keys in offset order, i.e. spread over the whole key range, so every flush
    overlapped all the data compacted before it and each compaction during the load
    rewrote that again. At the end one compaction merges the flushed files, in the
    background. Reads stay correct meanwhile (more files to look in, each behind its bloom
    filter).
    Memory is bounded by ``write_buffer_mb`` (times two memtables while one flushes) plus
    ``block_cache_mb``: a lookup that misses the block cache reads the OS page cache, which is
    not the process's RSS.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        format_info: dict[str, str],
        write_buffer_mb: int = 8,
        block_cache_mb: int = 8,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self._format = {"layout": LAYOUT_VERSION, **format_info}
        self._write_buffer_mb = write_buffer_mb
        self._block_cache_mb = block_cache_mb
        self._db: Rdict | None = None
        self._write_opts = WriteOptions()
        # a property at run time, though rocksdict's stubs declare a method
        self._write_opts.disable_wal = True  # type: ignore[method-assign,assignment]
        self._offsets: dict[int, int] = {}

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._open_db()
        except Exception as exc:  # rocksdict raises bare Exception on corruption
            log.warning(
                "table store does not open, rebuilding",
                extra={"table": self.name, "path": str(self.path), "error": str(exc)},
            )
            self._remove("corrupt")
            db = self._open_db()
        meta = db.get(_META)
        if meta is not None and _load_meta(meta) != self._format:
            log.warning(
                "table store format changed, rebuilding",
                extra={"table": self.name, "stored": _load_meta(meta), "expected": self._format},
            )
            db.close()
            self._remove("format")
            db = self._open_db()
            meta = None
        if meta is None:
            db.put(_META, json.dumps(self._format).encode())
        self._db = db
        self._offsets = self._load_offsets()

    def _open_db(self) -> Rdict:
        # Every option here applies to an existing store too: its column options are passed
        # (``column_families``). Without them rocksdict reopens a store with the column
        # options it loads from the store's OPTIONS file, which names no bloom filter
        # (``filter_policy=nullptr``: rocksdict's bloom is not persisted) and gets a new 8 MB
        # block cache of rocksdict's: after a restart every lookup searched each file's index
        # and data blocks, a key absent from all of them included (2 µs instead of 0.7), and a
        # bulk load cut short (a crash, a stop during the gate) kept its deferred compaction
        # trigger (``set_options`` persists).
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(2)
        opts.set_write_buffer_size(self._write_buffer_mb * 1024 * 1024)
        opts.set_max_write_buffer_number(2)
        opts.set_level_zero_file_num_compaction_trigger(_L0_COMPACTION_TRIGGER)
        # A table much larger than its block cache (1M keys: ~80 MB of blocks, 8 MB of cache)
        # decompresses a data block for most lookups: LZ4's is cheaper than Snappy's (0.6 to
        # 1.0 µs less per owner-and-user join at 1M keys, none at 100k), files the same size.
        # Existing Snappy files stay readable and are rewritten by their next compaction.
        opts.set_compression_type(DBCompressionType.lz4())
        table = BlockBasedOptions()
        table.set_block_cache(Cache(self._block_cache_mb * 1024 * 1024))
        # A point lookup of a missing key (a join miss) costs no data block read. Index and
        # filter blocks stay out of the block cache (~2 MB per 1M keys), so lookups never
        # evict and re-read them.
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        return Rdict(str(self.path), opts, column_families={"default": opts})

    def _remove(self, reason: str) -> None:
        REBUILDS.labels(self.name, reason).inc()
        if self._db is not None:
            self._db.close()
            self._db = None
        shutil.rmtree(self.path, ignore_errors=True)
        self._offsets = {}

    def wipe(self, reason: str) -> None:
        self._remove(reason)
        self.open()

    def _load_offsets(self) -> dict[int, int]:
        db = self._require_db()
        offsets: dict[int, int] = {}
        it = db.iter()
        it.seek(_OFFSET)
        while it.valid():
            key = it.key()
            if not key.startswith(_OFFSET) or len(key) != 1 + _PARTITION.size:
                break
            (partition,) = _PARTITION.unpack_from(key, 1)
            (offsets[partition],) = _NEXT_OFFSET.unpack(it.value())
            it.next()
        del it
        return offsets

    def _require_db(self) -> Rdict:
        if self._db is None:
            raise TableError(f"table {self.name} is not open")
        return self._db

    def cluster_id(self) -> str | None:
        raw = self._require_db().get(_CLUSTER)
        return None if raw is None else bytes(raw).decode()

    def set_cluster_id(self, cluster_id: str) -> None:
        self._require_db().put(_CLUSTER, cluster_id.encode(), self._write_opts)

    def offsets(self) -> dict[int, int]:
        return dict(self._offsets)

    def write(self, entries: Iterable[Entry], offsets: dict[int, int]) -> None:
        db = self._require_db()
        batch = WriteBatch(raw_mode=True)
        put, delete = batch.put, batch.delete
        for key, value in entries:
            if value is None:
                delete(_DATA + key)
            else:
                put(_DATA + key, value)
        for partition, next_offset in offsets.items():
            put(_OFFSET + _PARTITION.pack(partition), _NEXT_OFFSET.pack(next_offset))
        db.write(batch, self._write_opts)
        self._offsets.update(offsets)

    def get(self, key: bytes) -> bytes | None:
        raw: bytes | None = self._require_db().get(_DATA + key)
        return raw

    def estimate_keys(self) -> int:
        if self._db is None:
            return 0
        n = self._db.property_int_value("rocksdb.estimate-num-keys") or 0
        # minus the meta, cluster and offset keys
        meta_keys = 1 + (self._db.get(_CLUSTER) is not None)
        return max(0, int(n) - meta_keys - len(self._offsets))

    def flush(self) -> None:
        self._require_db().flush()

    def bulk_load(self, on: bool) -> None:
        trigger = _L0_COMPACTION_TRIGGER_BULK if on else _L0_COMPACTION_TRIGGER
        self._require_db().set_options({"level0_file_num_compaction_trigger": str(trigger)})

    def close(self) -> None:
        if self._db is not None:
            self._db.flush()
            self._db.close()
            self._db = None


class InMemoryStore:
    """``TableStore`` in a dict: the honest twin of ``RocksDictStore`` for unit tests."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._offsets: dict[int, int] = {}
        self._cluster_id: str | None = None
        self.wipes: list[str] = []
        #: the last ``bulk_load`` hint (nothing else changes with it here)
        self.bulk = False

    def open(self) -> None:
        """Nothing to open: the store lives as long as the object."""

    def wipe(self, reason: str) -> None:
        self.wipes.append(reason)
        self._data.clear()
        self._offsets.clear()
        self._cluster_id = None

    def cluster_id(self) -> str | None:
        return self._cluster_id

    def set_cluster_id(self, cluster_id: str) -> None:
        self._cluster_id = cluster_id

    def offsets(self) -> dict[int, int]:
        return dict(self._offsets)

    def write(self, entries: Iterable[Entry], offsets: dict[int, int]) -> None:
        for key, value in entries:
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value
        self._offsets.update(offsets)

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def estimate_keys(self) -> int:
        return len(self._data)

    def flush(self) -> None:
        """Nothing to flush."""

    def bulk_load(self, on: bool) -> None:
        self.bulk = on

    def close(self) -> None:
        """Nothing to release."""


def _load_meta(raw: bytes) -> dict[str, Any]:
    try:
        loaded = json.loads(bytes(raw))
        return loaded if isinstance(loaded, dict) else {}
    except ValueError:
        return {}
