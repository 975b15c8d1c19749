"""GlobalTable: a RocksDB copy of a compacted topic, with Kafka Streams GlobalKTable semantics.

* A group-less consumer is assigned every partition; the table never joins a consumer group
  and never commits offsets to Kafka.
* Keys are the Kafka keys (UTF-8); a tombstone (null value) deletes.
* The next offset of each partition is written in the same RocksDB write batch as the data it
  covers, so the store and its position can never disagree. The batch skips the WAL: data and
  offsets live in one column family whose memtable is flushed atomically, so a crash loses
  only a suffix of both together and the restart re-reads exactly that suffix.
* Bootstrap gate: at start, snapshot every partition's high watermark and apply records until
  each partition's *position* reaches it. Positions, not end-of-partition events: compaction
  leaves holes and transaction markers occupy offsets no record is returned for; librdkafka
  moves the position past both.
* One apply function serves bootstrap and live following.
* Registry down is not the record's fault: a record whose writer schema cannot be fetched
  (the registry unreachable, 5xx) is neither applied nor dead-lettered, and the table's
  position does not move past it. Every partition is sought back to its first record not
  applied, and the table consumes nothing for ``retry_s`` before it tries again; it stays
  loading (or lagging), so readiness stays false. Only records that are really invalid
  (undecodable bytes, an unknown schema id) go to ``on_invalid``.
* Dead letters are not multiplied: with ``dead_letter_topic`` the table reads that topic at
  each bootstrap and never hands a record to ``on_invalid`` whose source coordinates
  (``dlq.source.topic/partition/offset`` headers) are already there. A rebuild, or a second
  replica loading the same topic, finds the poison already dead-lettered and skips it.
* Self-healing: a stored offset below the partition's low watermark (the records in between
  were deleted, so the copy would silently miss keys), above its high watermark (the topic was
  recreated), a store that does not open, or a changed format version wipes the store and
  rebuilds it from the topic instead of crash-looping.

Values are stored as the raw record bytes read from Kafka (Confluent-framed Avro), which keeps
the restore path free of decoding; ``get`` decodes, with a small LRU cache in front.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from libs.kafka import (
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    TopicError,
    read_to_end,
)
from libs.serde import DeserializationError
from libs.tables.errors import TableError

log = logging.getLogger(__name__)

V = TypeVar("V")

#: (value bytes, topic, partition, offset) -> decoded value; raises on invalid input
Decoder = Callable[[bytes, str, int, int], V]

_DATA = b"d"
_OFFSET = b"o"
_META = b"m:meta"
_PARTITION = struct.Struct(">I")
_NEXT_OFFSET = struct.Struct(">q")
LAYOUT_VERSION = "1"

STATE = Gauge("table_state", "1 for the table's current state", ["table", "state"])
RECORDS = Gauge("table_records", "Keys in the table (RocksDB estimate)", ["table"])
BLOCKED = Counter(
    "table_blocked_total",
    "Times applying stopped at a record whose schema could not be fetched (registry down)",
    ["table"],
)
LAG = Gauge("table_lag_records", "Records between the table's position and the end", ["table"])
LAST_UPDATE = Gauge(
    "table_last_update_timestamp_seconds", "Wall time of the last applied record", ["table"]
)
APPLIED = Counter("table_records_applied_total", "Records applied to the table", ["table"])
INVALID = Counter("table_records_invalid_total", "Records skipped as invalid", ["table"])
REBUILDS = Counter(
    "table_rebuilds_total", "Times the store was wiped and rebuilt", ["table", "reason"]
)


class TableState(StrEnum):
    """Lifecycle of a table."""

    CREATED = "created"
    LOADING = "loading"
    CAUGHT_UP = "caught_up"
    LAGGING = "lagging"


class GlobalTable(Generic[V]):
    """A full, persistent, self-healing local copy of one compacted topic."""

    def __init__(
        self,
        *,
        name: str,
        topic: str,
        state_dir: Path,
        consumer_config: dict[str, Any],
        decode: Decoder[V],
        on_invalid: Callable[[Message, Exception], None] | None = None,
        format_version: str = "1",
        validate: bool = True,
        batch_size: int = 5000,
        cache_size: int = 10_000,
        lagging_threshold: int = 1000,
        retry_s: float = 2.0,
        dead_letter_topic: str | None = None,
    ) -> None:
        self.name = name
        self.topic = topic
        self.path = Path(state_dir) / name
        self._consumer_config = {
            **consumer_config,
            # librdkafka insists on a group.id even for assign()-only consumers; this one never
            # subscribes or commits, so the group is never joined.
            "group.id": consumer_config.get("group.id") or f"global-table-{name}-nogroup",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
        self._decode = decode
        self._on_invalid = on_invalid
        self._format = {"layout": LAYOUT_VERSION, "topic": topic, "format": format_version}
        self._validate = validate
        self._batch_size = batch_size
        self._cache: OrderedDict[str, V | None] = OrderedDict()
        self._cache_size = cache_size
        self._lagging_threshold = lagging_threshold
        self._retry_s = retry_s
        self._dead_letter_topic = dead_letter_topic
        # (partition, offset) of this topic's records already in the dead-letter topic
        self._dead_lettered: set[tuple[int, int]] = set()
        # while set: applying stopped at a record the registry could not resolve; consume
        # nothing before this monotonic time
        self._blocked_until: float | None = None
        self.blocked_reason: str | None = None
        self._db: Rdict | None = None
        self._consumer: Consumer | None = None
        self._write_opts = WriteOptions()
        # a property at run time, though rocksdict's stubs declare a method
        self._write_opts.disable_wal = True  # type: ignore[method-assign,assignment]
        self._lock = threading.RLock()
        self._offsets: dict[int, int] = {}
        self._targets: dict[int, int] = {}
        self._partitions: list[int] = []
        self.state = TableState.CREATED
        self.applied_total = 0
        self.applied_since_start = 0
        self.invalid_total = 0
        self.last_update: float | None = None
        self._lag = 0
        self._set_state(TableState.CREATED)

    # -- store -----------------------------------------------------------------------------
    def open(self) -> None:
        """Open (or create) the store; wipe it when it is corrupt or of another format."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._open_db()
        except Exception as exc:  # rocksdict raises bare Exception on corruption
            log.warning(
                "table store does not open, rebuilding",
                extra={"table": self.name, "path": str(self.path), "error": str(exc)},
            )
            self._wipe("corrupt")
            db = self._open_db()
        meta = db.get(_META)
        if meta is not None and _load_meta(meta) != self._format:
            log.warning(
                "table store format changed, rebuilding",
                extra={"table": self.name, "stored": _load_meta(meta), "expected": self._format},
            )
            db.close()
            self._wipe("format")
            db = self._open_db()
            meta = None
        if meta is None:
            db.put(_META, json.dumps(self._format).encode())
        self._db = db
        self._offsets = self._load_offsets()

    def _open_db(self) -> Rdict:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(2)
        opts.set_write_buffer_size(64 * 1024 * 1024)
        opts.optimize_for_point_lookup(64)
        return Rdict(str(self.path), opts)

    def _wipe(self, reason: str) -> None:
        REBUILDS.labels(self.name, reason).inc()
        if self._db is not None:
            self._db.close()
            self._db = None
        shutil.rmtree(self.path, ignore_errors=True)
        with self._lock:
            self._cache.clear()
        self._offsets = {}

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

    # -- the gate --------------------------------------------------------------------------
    def begin_bootstrap(self, timeout_s: float = 30.0) -> None:
        """Snapshot high watermarks, heal the store if needed, and assign every partition."""
        if self._db is None:
            self.open()
        self._set_state(TableState.LOADING)
        self._dead_lettered = self._read_dead_letters(timeout_s)
        consumer = Consumer(self._consumer_config)
        try:
            meta = consumer.list_topics(self.topic, timeout=timeout_s).topics.get(self.topic)
        except KafkaException as exc:
            consumer.close()
            raise TableError(f"cannot read metadata of {self.topic}: {exc}") from exc
        if meta is None or meta.error is not None or not meta.partitions:
            consumer.close()
            raise TableError(f"topic {self.topic} of table {self.name} does not exist")
        self._partitions = sorted(meta.partitions)
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s)
            for p in self._partitions
        }
        reason = self._heal_reason(marks)
        if reason:
            log.warning(
                "table store out of range of the topic, rebuilding",
                extra={"table": self.name, "reason": reason},
            )
            self._wipe("offsets")
            self.open()
        self._targets = {p: high for p, (_, high) in marks.items()}
        starts = [
            TopicPartition(self.topic, p, self._offsets.get(p, OFFSET_BEGINNING))
            for p in self._partitions
        ]
        consumer.assign(starts)
        self._consumer = consumer
        self._lag = sum(
            max(0, high - self._offsets.get(p, low)) for p, (low, high) in marks.items()
        )
        LAG.labels(self.name).set(self._lag)
        log.info(
            "table bootstrap started",
            extra={
                "table": self.name,
                "topic": self.topic,
                "partitions": len(self._partitions),
                "records_behind": self._lag,
                "resumed": bool(self._offsets),
            },
        )

    def _heal_reason(self, marks: dict[int, tuple[int, int]]) -> str | None:
        for p, offset in self._offsets.items():
            if p not in marks:
                return f"partition {p} no longer exists"
            low, high = marks[p]
            if offset < low:
                return f"partition {p}: stored offset {offset} is below the low watermark {low}"
            if offset > high:
                return f"partition {p}: stored offset {offset} is above the high watermark {high}"
        return None

    def step_bootstrap(self) -> bool:
        """Apply one batch; return True once every partition reached its snapshot."""
        consumer = self._require_consumer()
        if self._is_blocked():
            time.sleep(0.05)  # the gate has nothing else to do; the loop has not started
            return False
        msgs = consumer.consume(self._batch_size, 0.2)
        if msgs:
            self._apply(msgs)
        pending = [p for p in self._partitions if self._offsets.get(p, 0) < self._targets[p]]
        if pending and not self._is_blocked():
            positions = consumer.position([TopicPartition(self.topic, p) for p in pending])
            for tp in positions:
                # the position moves past transaction markers and compaction holes that no
                # record was returned for; record it so a restart starts there too
                if tp.offset >= 0 and tp.offset > self._offsets.get(tp.partition, -1):
                    self._store_offset(tp.partition, tp.offset)
            pending = [p for p in pending if self._offsets.get(p, 0) < self._targets[p]]
        self._lag = sum(max(0, self._targets[p] - self._offsets.get(p, 0)) for p in pending)
        LAG.labels(self.name).set(self._lag)
        if pending:
            return False
        # The writes skip the WAL: flush once at the gate so a crash right after a long
        # restore does not throw the memtable's part of it away.
        self._require_db().flush()
        self._set_state(TableState.CAUGHT_UP)
        return True

    def bootstrap(self, stop: threading.Event, timeout_s: float | None = None) -> int:
        """The gate: returns once caught up with the start snapshot; records applied."""
        bootstrap_all([self], stop, timeout_s=timeout_s)
        return self.applied_since_start

    # -- applying --------------------------------------------------------------------------
    def _apply(self, msgs: Sequence[Message]) -> int:
        db = self._require_db()
        batch = WriteBatch(raw_mode=True)
        touched: dict[int, int] = {}
        applied = 0
        keys: list[str] = []
        # partition -> offset of its first record of this batch that is not applied
        rewind: dict[int, int] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise TableError(f"table {self.name} consumer error: {err.str()}")
                continue
            partition = int(msg.partition() or 0)
            offset = int(msg.offset() or 0)
            if rewind:
                rewind.setdefault(partition, offset)
                continue
            touched[partition] = offset + 1
            key = msg.key()
            value = msg.value()
            if key is None:
                self._invalid(msg, TableError("record without key"))
                continue
            if value is not None and self._validate:
                try:
                    self._decode(value, self.topic, partition, offset)
                except DeserializationError as exc:
                    if exc.registry_unavailable:
                        # not applied, not dead-lettered, and the position stays before it
                        del touched[partition]
                        if offset > self._offsets.get(partition, -1):
                            touched[partition] = offset
                        rewind[partition] = offset
                        self._block(exc)
                        continue
                    self._invalid(msg, exc)
                    continue
                except Exception as exc:  # whatever else the decoder raises: invalid record
                    self._invalid(msg, exc)
                    continue
            if value is None:
                batch.delete(_DATA + key)
            else:
                batch.put(_DATA + key, value)
            keys.append(key.decode("utf-8", "replace"))
            applied += 1
        for partition, next_offset in touched.items():
            batch.put(_OFFSET + _PARTITION.pack(partition), _NEXT_OFFSET.pack(next_offset))
        with self._lock:
            db.write(batch, self._write_opts)
            for k in keys:
                self._cache.pop(k, None)
        self._offsets.update(touched)
        for partition, offset in rewind.items():
            # seeking also drops what the consumer had fetched past that point
            self._require_consumer().seek(TopicPartition(self.topic, partition, offset))
        if applied:
            self.applied_total += applied
            self.applied_since_start += applied
            self.last_update = time.time()
            APPLIED.labels(self.name).inc(applied)
            LAST_UPDATE.labels(self.name).set(self.last_update)
        return applied

    def _block(self, exc: DeserializationError) -> None:
        if self._blocked_until is None:
            BLOCKED.labels(self.name).inc()
            log.warning(
                "schema registry unavailable, table paused at the record",
                extra={"table": self.name, "retry_s": self._retry_s, "error": str(exc)},
            )
        self._blocked_until = time.monotonic() + self._retry_s
        self.blocked_reason = f"schema registry unavailable: {exc.reason}"

    def _is_blocked(self) -> bool:
        if self._blocked_until is None:
            return False
        if time.monotonic() < self._blocked_until:
            return True
        # try again; a record that still cannot be resolved blocks the table anew
        self._blocked_until = None
        self.blocked_reason = None
        return False

    def _store_offset(self, partition: int, next_offset: int) -> None:
        self._require_db().put(
            _OFFSET + _PARTITION.pack(partition), _NEXT_OFFSET.pack(next_offset), self._write_opts
        )
        self._offsets[partition] = next_offset

    def _read_dead_letters(self, timeout_s: float) -> set[tuple[int, int]]:
        if self._dead_letter_topic is None:
            return set()
        found: set[tuple[int, int]] = set()
        consumer = Consumer(self._consumer_config)
        try:
            for msg in read_to_end(
                consumer, self._dead_letter_topic, timeout_s=timeout_s, missing_ok=True
            ):
                headers = dict(msg.headers() or [])
                if headers.get(HEADER_SOURCE_TOPIC) != self.topic.encode():
                    continue
                try:
                    found.add(
                        (
                            int(headers[HEADER_SOURCE_PARTITION] or b""),
                            int(headers[HEADER_SOURCE_OFFSET] or b""),
                        )
                    )
                except (KeyError, ValueError):
                    continue  # not one of ours
        except (TopicError, KafkaException) as exc:
            # Not being able to deduplicate is no reason not to load: at worst a dead letter
            # is written twice (dead letters are at-least-once).
            log.warning(
                "dead letters of the table not read; poison may be dead-lettered again",
                extra={"table": self.name, "topic": self._dead_letter_topic, "error": str(exc)},
            )
        finally:
            consumer.close()
        return found

    def _invalid(self, msg: Message, exc: Exception) -> None:
        self.invalid_total += 1
        INVALID.labels(self.name).inc()
        coordinates = (int(msg.partition() or 0), int(msg.offset() or 0))
        if coordinates in self._dead_lettered:
            log.debug(
                "invalid table record already dead-lettered",
                extra={"table": self.name, "partition": coordinates[0], "offset": coordinates[1]},
            )
        elif self._on_invalid is not None:
            self._on_invalid(msg, exc)
            self._dead_lettered.add(coordinates)
        else:
            log.warning(
                "invalid table record skipped",
                extra={
                    "table": self.name,
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "error": str(exc),
                },
            )

    # -- following -------------------------------------------------------------------------
    def poll(self, max_records: int = 1000, timeout_s: float = 0.0) -> int:
        """Apply records that arrived since the gate; return how many were applied."""
        consumer = self._require_consumer()
        if self._is_blocked():
            return 0
        msgs = consumer.consume(max_records, timeout_s)
        applied = self._apply(msgs) if msgs else 0
        self._update_lag(consumer)
        return applied

    def _update_lag(self, consumer: Consumer) -> None:
        lag = 0
        for p in self._partitions:
            # cached=True: the high watermark of the last fetch response, no broker round trip
            _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            if high >= 0:
                lag += max(0, high - self._offsets.get(p, 0))
        self._lag = lag
        LAG.labels(self.name).set(lag)
        if self.state is not TableState.LOADING:
            self._set_state(
                TableState.LAGGING if lag > self._lagging_threshold else TableState.CAUGHT_UP
            )

    def _require_consumer(self) -> Consumer:
        if self._consumer is None:
            raise TableError(f"table {self.name}: call begin_bootstrap() first")
        return self._consumer

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> V | None:
        """The current value of ``key``, decoded; ``None`` when absent or deleted."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            raw = self._require_db().get(_DATA + key.encode("utf-8"))
        value = None if raw is None else self._decode(raw, self.topic, -1, -1)
        with self._lock:
            self._cache[key] = value
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def put_local(self, key: str, value: bytes | None) -> None:
        """Write through a record this process produced itself, ahead of reading it back."""
        db = self._require_db()
        with self._lock:
            if value is None:
                db.delete(_DATA + key.encode("utf-8"), self._write_opts)
            else:
                db.put(_DATA + key.encode("utf-8"), value, self._write_opts)
            self._cache.pop(key, None)

    # -- status ----------------------------------------------------------------------------
    def ready(self) -> bool:
        """True once the gate has passed (it stays true while following)."""
        return self.state in (TableState.CAUGHT_UP, TableState.LAGGING)

    def lag(self) -> int:
        """Records between the table's position and the partitions' ends."""
        return self._lag

    def record_count(self) -> int:
        """Keys in the store (RocksDB's estimate; exact after a compaction)."""
        if self._db is None:
            return 0
        n = self._db.property_int_value("rocksdb.estimate-num-keys") or 0
        return max(0, int(n) - 1 - len(self._offsets))  # minus the meta and offset keys

    def status(self) -> dict[str, object]:
        """State, counts, lag and age of the last update, for logs and /readyz."""
        RECORDS.labels(self.name).set(self.record_count())
        age = None if self.last_update is None else round(time.time() - self.last_update, 3)
        return {
            "state": self.state.value,
            "records": self.record_count(),
            "lag": self._lag,
            "applied_since_start": self.applied_since_start,
            "invalid": self.invalid_total,
            "blocked": self.blocked_reason,
            "last_update_age_s": age,
        }

    def _set_state(self, state: TableState) -> None:
        self.state = state
        for s in TableState:
            STATE.labels(self.name, s.value).set(1 if s is state else 0)

    def close(self) -> None:
        """Flush the memtable (so a restart re-reads nothing) and release everything."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._db is not None:
            self._db.flush()
            self._db.close()
            self._db = None


def bootstrap_all(
    tables: Sequence[GlobalTable[Any]],
    stop: threading.Event,
    *,
    timeout_s: float | None = None,
    progress_every_s: float = 5.0,
) -> None:
    """Gate several tables together: returns when every one has caught up (or stop is set).

    Raises ``TableError`` when ``timeout_s`` passes first (an open transaction on a lookup
    topic holds the last stable offset back, for instance).
    """
    started = time.monotonic()
    for table in tables:
        table.begin_bootstrap()
    pending = list(tables)
    last_report = started
    while pending and not stop.is_set():
        pending = [t for t in pending if not t.step_bootstrap()]
        now = time.monotonic()
        if now - last_report >= progress_every_s:
            last_report = now
            for t in pending:
                log.info("table loading", extra={"table": t.name, **t.status()})
        if timeout_s is not None and now - started > timeout_s and pending:
            raise TableError(
                f"tables {[t.name for t in pending]} not caught up after {timeout_s:.0f}s "
                f"(lag {[t.lag() for t in pending]})"
            )
    elapsed = time.monotonic() - started
    for t in tables:
        log.info(
            "table caught up" if t.ready() else "table bootstrap interrupted",
            extra={"table": t.name, "seconds": round(elapsed, 3), **t.status()},
        )


def _load_meta(raw: bytes) -> dict[str, Any]:
    try:
        loaded = json.loads(bytes(raw))
        return loaded if isinstance(loaded, dict) else {}
    except ValueError:
        return {}


class InMemoryTable(Generic[V]):
    """A dict-backed ``Table`` for unit tests."""

    def __init__(self, values: dict[str, V] | None = None) -> None:
        self._values: dict[str, V] = dict(values or {})

    def get(self, key: str) -> V | None:
        return self._values.get(key)

    def put(self, key: str, value: V) -> None:
        self._values[key] = value

    def delete(self, key: str) -> None:
        self._values.pop(key, None)
