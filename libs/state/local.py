"""The local copy of one partition's state: RocksDB (rocksdict) holding committed state only.

One RocksDB per input partition (``<state_dir>/<store>/<topic>-<partition>``), so a partition
is opened, closed, wiped and moved on its own. Keys: ``d<key>`` data, ``p`` the changelog
position (the next changelog offset to read, i64be), ``t`` when the store was last caught up
with its changelog (epoch seconds, f64be), ``m`` the format (layout version and changelog
partition: a store of another layout or changelog is wiped).

Data and position are written in one batch, so they never disagree. A checkpoint's batch goes
through the WAL (not synced: a killed process loses nothing, a lost machine at most a suffix),
so a restart after kill -9 restores only what other owners wrote since. Restore batches skip
the WAL (bulk speed) and the store is flushed when the restore ends: a crash in between loses
a suffix of data and position together, and the next restore re-reads exactly that suffix.
Nothing uncommitted is ever written here (see ``libs.state.stores``).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import Counter
from rocksdict import (
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from libs.state.errors import StateError

log = logging.getLogger(__name__)

#: (``Final``: a constant where the module is compiled, not a module dict lookup per key)
_DATA: Final = b"d"
_POSITION = b"p"
_CAUGHT_UP = b"t"
_SECONDS = struct.Struct(">d")
_META = b"m"
_OFFSET = struct.Struct(">q")
#: bumped when the key layout changes: an older store is then wiped and rebuilt
LAYOUT_VERSION = "1"

WIPES = Counter(
    "state_store_wipes_total", "Local state stores wiped and rebuilt", ["store", "reason"]
)

#: (key, value) to write; ``None`` deletes the key
Entry = tuple[bytes, bytes | None]


class LocalStore:
    """Committed state of one input partition plus its changelog position.

    ``cache`` and ``write_buffers`` are shared by every partition's store of a loop (one
    memory budget however many partitions it owns); without them the store has its own.
    """

    def __init__(
        self,
        path: Path,
        *,
        store: str,
        changelog: tuple[str, int],
        cluster_id: str | None = None,
        cache: Cache | None = None,
        write_buffers: WriteBufferManager | None = None,
    ) -> None:
        self.path = Path(path)
        self.store = store
        self._format = {
            "layout": LAYOUT_VERSION,
            "changelog": changelog[0],
            "partition": str(changelog[1]),
        }
        if cluster_id is not None:
            # The changelog's name and the stored position cannot tell a purged and recreated
            # cluster's changelog from the one this state came from (the new log may well
            # have reached the position): the cluster id can, as every new cluster has one.
            self._format["cluster"] = cluster_id
        self._cache = cache or Cache(4 * 1024 * 1024)
        self._write_buffers = write_buffers
        self._db: Rdict | None = None
        self._logged = WriteOptions()
        self._bulk = WriteOptions()
        # a property at run time, though rocksdict's stubs declare a method
        self._bulk.disable_wal = True  # type: ignore[method-assign,assignment]
        #: the next changelog offset to read; None: nothing restored or written yet
        self.position: int | None = None
        #: epoch seconds when the store last held everything its changelog had (None: never)
        self.caught_up_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Open (or create) the store; a corrupt store or one of another format is wiped."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._open_db()
        except Exception as exc:  # rocksdict raises bare Exception on corruption
            if "lock" in str(exc).lower():
                # another process (or loop) has this store open: wiping it would destroy
                # live state under it; two owners of one partition's store is a deployment
                # error (a state dir shared by replicas)
                raise StateError(f"state store {self.path} is in use: {exc}") from exc
            log.warning(
                "state store does not open, rebuilding it from the changelog",
                extra={"store": self.store, "path": str(self.path), "error": str(exc)},
            )
            self._remove("corrupt")
            db = self._open_db()
        meta = db.get(_META)
        stored = None if meta is None else _load_meta(meta)
        if stored is not None and "cluster" not in self._format:
            # the cluster is not known (a tool reading the store): nothing to compare it with
            stored.pop("cluster", None)
        if stored is not None and stored != self._format:
            # a store of before the cluster was recorded is rebuilt too: it cannot be trusted
            other_cluster = {**stored, "cluster": None} == {**self._format, "cluster": None}
            log.warning(
                "state store of another cluster, rebuilding it from the changelog"
                if other_cluster
                else "state store format changed, rebuilding it from the changelog",
                extra={"store": self.store, "stored": stored, "expected": self._format},
            )
            db.close()
            self._remove("cluster" if other_cluster else "format")
            db = self._open_db()
            meta = None
        if meta is None:
            db.put(_META, json.dumps(self._format, sort_keys=True).encode())
        raw = db.get(_POSITION)
        self.position = None if raw is None else _OFFSET.unpack(raw)[0]
        raw = db.get(_CAUGHT_UP)
        self.caught_up_at = None if raw is None else _SECONDS.unpack(raw)[0]
        self._db = db

    def _open_db(self) -> Rdict:
        # The column options are passed (``column_families``) so that they apply to an
        # existing store too: rocksdict otherwise reopens it with those of its OPTIONS file,
        # which name no bloom filter (rocksdict's is not persisted) and a new 8 MB block cache
        # per store instead of the loop's shared one.
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(1)
        opts.set_write_buffer_size(4 * 1024 * 1024)
        opts.set_max_write_buffer_number(2)
        # Most lookups miss (a new alert group: its key was never written). The SST files'
        # bloom filters answer those without a read, but the memtables, which hold the
        # recent writes, were searched key by key: a bloom over their keys too (2 % of the
        # write buffer, 80 KB: dozens of bits per key even for 100-byte values) nearly
        # halves a miss (0.7 µs to 0.4 µs with 20k 2.4 KB values).
        opts.set_memtable_prefix_bloom_ratio(0.02)
        opts.set_memtable_whole_key_filtering(True)
        if self._write_buffers is not None:
            opts.set_write_buffer_manager(self._write_buffers)
        table = BlockBasedOptions()
        table.set_block_cache(self._cache)
        # lookups of absent keys (a new alert group) cost no data block read
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        return Rdict(str(self.path), opts, column_families={"default": opts})

    def _remove(self, reason: str) -> None:
        WIPES.labels(self.store, reason).inc()
        if self._db is not None:
            self._db.close()
            self._db = None
        shutil.rmtree(self.path, ignore_errors=True)
        self.position = None
        self.caught_up_at = None

    def wipe(self, reason: str) -> None:
        """Delete data and position; the store stays open, empty."""
        self._remove(reason)
        self.open()

    def flush(self) -> None:
        """Make everything written so far durable (the writes skip the WAL)."""
        self._require().flush()

    def close(self) -> None:
        """Flush and release the store; the files stay for a later (warm) restore."""
        if self._db is not None:
            self._db.flush()
            self._db.close()
            self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def _require(self) -> Rdict:
        if self._db is None:
            raise StateError(f"state store {self.path} is not open")
        return self._db

    # -- data ------------------------------------------------------------------------------
    def write(
        self,
        entries: Iterable[Entry],
        position: int | None,
        *,
        caught_up_at: float | None = None,
        bulk: bool = False,
    ) -> int:
        """Apply ``entries`` and set ``position`` and ``caught_up_at`` (those given) in one
        batch; returns the entries written.

        ``bulk``: skip the WAL (restores; ``flush`` at the end makes them durable).
        """
        db = self._require()
        batch = WriteBatch(raw_mode=True)
        put, delete = batch.put, batch.delete
        n = 0
        for key, value in entries:
            n += 1
            if value is None:
                delete(_DATA + key)
            else:
                put(_DATA + key, value)
        if position is not None:
            put(_POSITION, _OFFSET.pack(position))
        if caught_up_at is not None:
            put(_CAUGHT_UP, _SECONDS.pack(caught_up_at))
        db.write(batch, self._bulk if bulk else self._logged)
        if position is not None:
            self.position = position
        if caught_up_at is not None:
            self.caught_up_at = caught_up_at
        return n

    def get(self, key: bytes) -> bytes | None:
        raw: bytes | None = self._require().get(_DATA + key)
        return raw

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every committed ``(key, value)`` whose key starts with ``prefix``, in key order."""
        it = self._require().iter()
        start = _DATA + prefix
        it.seek(start)
        while it.valid():
            raw_key: bytes = it.key()
            if not raw_key.startswith(start):
                break
            yield raw_key[1:], it.value()
            it.next()


def _load_meta(raw: bytes) -> dict[str, str]:
    try:
        loaded = json.loads(bytes(raw))
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}
