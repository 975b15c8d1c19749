"""GlobalTable: a RocksDB copy of a compacted topic, with Kafka Streams GlobalKTable semantics.

* A group-less consumer is assigned every partition; the table never joins a consumer group
  and never commits offsets to Kafka.
* Keys are the Kafka keys (UTF-8); a tombstone (null value) deletes.
* The next offset of each partition is written in the same write batch as the data it covers
  (``libs.tables.store``), so the store and its position can never disagree.
* Bootstrap gate: at start, snapshot every partition's high watermark and apply records until
  each partition's *position* reaches it. Positions, not end-of-partition events: compaction
  leaves holes and transaction markers occupy offsets no record is returned for; librdkafka
  moves the position past both. ``high_watermarks()`` and ``caught_up_to()`` offer the same
  test to a caller with marks of its own (the notifier at a partition assignment).
* A cluster that cannot answer is not a reason to exit: while the watermark snapshot fails with
  a transient error (a broker restarting: ``NOT_LEADER_FOR_PARTITION``, ``LEADER_NOT_AVAILABLE``,
  ``OFFSET_NOT_AVAILABLE`` from a new leader, ``_TRANSPORT``, timeouts) the table is
  ``waiting``, logs why and asks again with backoff. Only what no retry cures (rejected
  credentials or authorization, a topic missing past a grace period) raises ``TableError``.
* One apply function serves bootstrap and live following.
* A gate at least ``bulk_load_min_records`` behind (a cold start) tells the store it loads in
  bulk (``TableStore.bulk_load``: RocksDB defers compactions to the gate's end), and every
  gate batch is consumed and applied with Python's cycle collector paused (see
  ``libs.runtime.collector``). Neither changes what is stored or when positions move.
* Restore validates the wire header only (``check``: magic byte, a schema id the registry
  knows) and stores the raw bytes; values are decoded at ``get``, once per lookup instead of
  once per record restored. A record that passed the header check but does not decode at
  ``get`` is answered as absent (``None``), counted (``table_undecodable_reads_total``,
  ``status()["undecodable_reads"]``) and logged once per key: a lookup table's bad record costs
  the join, never the service. Its coordinates are unknown at that point (the store keeps
  values, not offsets), so it is not dead-lettered; the log line names the key to fix.
* Registry down is not the record's fault: a record whose writer schema cannot be fetched
  (the registry unreachable, 5xx) is neither applied nor dead-lettered, and the table's
  position does not move past it. Every partition is sought back to its first record not
  applied, and the table consumes nothing for ``retry_s`` before it tries again; it stays
  loading (or lagging), so readiness stays false. Only records that are really invalid
  (no key, not the wire format, a schema id the registry does not know) go to ``on_invalid``.
  At ``get``, the same condition raises the decoder's ``DeserializationError`` (with
  ``registry_unavailable`` true) for the caller to retry later.
* Dead letters are not multiplied: with ``dead_letter_topic`` the table reads that topic at
  each bootstrap and never hands a record to ``on_invalid`` whose source coordinates
  (``dlq.source.topic/partition/offset`` headers) are already there. A rebuild, or a second
  replica loading the same topic, finds the poison already dead-lettered and skips it.
* Self-healing: a stored offset below the partition's low watermark (the records in between
  were deleted, so the copy would silently miss keys), above its high watermark (the topic was
  recreated), offsets read from another cluster (the metadata's cluster id differs: a purged
  and recreated cluster, whose topic may well have reached the stored offsets), a store that
  does not open, or a changed format version wipes the store and rebuilds it from the topic
  instead of crash-looping.
* Threads: the consumer side (bootstrap, ``poll``, ``caught_up_to``) and ``get`` belong to the
  service's loop thread; ``status()``, ``ready()`` and ``lag()`` may be read from another (the
  health server). No lock sits on the lookup path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import Counter, Gauge

from libs.kafka import (
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    MISSING_TOPIC_CODES,
    TopicError,
    is_fatal,
    is_transient,
    read_to_end,
)
from libs.runtime.collector import cyclic_gc_paused
from libs.serde import DeserializationError
from libs.tables.errors import TableError
from libs.tables.store import REBUILDS, Entry, RocksDictStore, TableStore

log = logging.getLogger(__name__)

V = TypeVar("V")

#: (value bytes, topic, partition, offset) -> decoded value; raises on invalid input
Decoder = Callable[[bytes, str, int, int], V]
#: (value bytes, topic, partition, offset) -> None; raises ``DeserializationError`` when the
#: record is not to be stored (the restore-time validation)
Check = Callable[[bytes, str, int, int], object]

#: backoff of the bootstrap's snapshot while the cluster cannot answer: first and longest wait
_WAIT_FIRST_S = 0.25
_WAIT_MAX_S = 5.0

#: keys whose undecodable value was already logged (bounded: the counter carries the rest)
_UNDECODABLE_LOGGED_MAX = 1000

__all__ = [
    "REBUILDS",
    "Check",
    "Decoder",
    "GlobalTable",
    "InMemoryTable",
    "TableState",
    "bootstrap_all",
]

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
UNDECODABLE = Counter(
    "table_undecodable_reads_total",
    "Lookups answered as absent because the stored value passed the restore check but does "
    "not decode",
    ["table"],
)


class TableState(StrEnum):
    """Lifecycle of a table."""

    CREATED = "created"
    #: the cluster cannot answer the bootstrap's first requests yet; retried with backoff
    WAITING = "waiting"
    LOADING = "loading"
    CAUGHT_UP = "caught_up"
    LAGGING = "lagging"


class GlobalTable(Generic[V]):
    """A full, persistent, self-healing local copy of one compacted topic.

    ``decode`` turns a stored value into what ``get`` returns. ``check`` validates a record at
    restore; without one, ``decode`` is the check (every record decoded once more at restore).
    With ``header_size``, ``check`` looks at that many leading bytes only (the Confluent wire
    header: magic byte and schema id), so a value whose header already passed is not checked
    again.
    ``avro_table()`` wires both, the format version and dead letters for an Avro record type.
    """

    def __init__(
        self,
        *,
        name: str,
        topic: str,
        state_dir: Path,
        consumer_config: dict[str, Any],
        decode: Decoder[V],
        check: Check | None = None,
        header_size: int = 0,
        on_invalid: Callable[[Message, Exception], None] | None = None,
        format_version: str = "1",
        validate: bool = True,
        batch_size: int = 2000,
        lagging_threshold: int = 1000,
        bulk_load_min_records: int = 50_000,
        retry_s: float = 2.0,
        dead_letter_topic: str | None = None,
        missing_topic_grace_s: float = 5.0,
        store: TableStore | None = None,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
    ) -> None:
        self.name = name
        self.topic = topic
        self.path = Path(state_dir) / name
        self._consumer_config = {
            # Prefetch: librdkafka queues up to 100k records (or 64 MB) per partition and, once
            # past that, waits fetch.queue.backoff.ms (1 s) before fetching again. Lookup records
            # are small, so the record count rules; 100k per partition costs ~30 MB of
            # librdkafka's per-record overhead for 3 partitions and the 1 s pauses stalled the
            # restore. A shallow queue refilled at once keeps the table busy and its memory low.
            "queued.min.messages": 10_000,
            "queued.max.messages.kbytes": 8 * 1024,
            "fetch.queue.backoff.ms": 10,
            **consumer_config,
            # librdkafka insists on a group.id even for assign()-only consumers; this one never
            # subscribes or commits, so the group is never joined.
            "group.id": consumer_config.get("group.id") or f"global-table-{name}-nogroup",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
        self._decode = decode
        # injectable so the apply logic runs in unit tests on a fake consumer
        self._new_consumer = consumer_factory
        self._check: Check | None = (check or decode) if validate else None
        self._header_size = header_size if check is not None else 0
        # headers (the first ``header_size`` bytes) of values that passed ``check``: a tuple,
        # so one ``bytes.startswith`` tests a value against all of them without slicing it
        self._valid_headers: tuple[bytes, ...] = ()
        self._on_invalid = on_invalid
        self._store: TableStore = store or RocksDictStore(
            self.path, name=name, format_info={"topic": topic, "format": format_version}
        )
        self._batch_size = batch_size
        self._lagging_threshold = lagging_threshold
        # a gate at least this far behind loads in bulk (``TableStore.bulk_load``); a shorter
        # one (a warm restart) fills about one memtable at most: no compaction to defer
        self._bulk_load_min_records = bulk_load_min_records
        self._bulk = False
        self._retry_s = retry_s
        self._dead_letter_topic = dead_letter_topic
        # a topic created a moment ago may not be in every broker's metadata yet
        self._missing_topic_grace_s = missing_topic_grace_s
        # (partition, offset) of this topic's records already in the dead-letter topic
        self._dead_lettered: set[tuple[int, int]] = set()
        # while set: applying stopped at a record the registry could not resolve; consume
        # nothing before this monotonic time
        self._blocked_until: float | None = None
        self.blocked_reason: str | None = None
        self._opened = False
        self._consumer: Consumer | None = None
        # the bootstrap's snapshot: taken (partitions assigned), or when to ask again
        self._assigned = False
        self._request_timeout_s = 30.0
        self._waiting_since = 0.0
        self._retries = 0
        self._retry_at = 0.0
        self.waiting_reason: str | None = None
        self._offsets: dict[int, int] = {}
        self._targets: dict[int, int] = {}
        self._partitions: list[int] = []
        self.state = TableState.CREATED
        self.applied_total = 0
        self.applied_since_start = 0
        self.invalid_total = 0
        self.undecodable_reads = 0
        self._undecodable_logged: set[str] = set()
        self.last_update: float | None = None
        self._lag = 0
        #: called on the applying thread with the keys of each applied batch (tombstones
        #: included); set it after the gate to hear of live changes only (e.g. the enricher's
        #: parked join misses waiting for a key)
        self.on_change: Callable[[list[bytes]], None] | None = None
        self._set_state(TableState.CREATED)

    # -- store -----------------------------------------------------------------------------
    def open(self) -> None:
        """Open (or create) the store; wipe it when it is corrupt or of another format."""
        self._store.open()
        self._opened = True
        self._offsets = self._store.offsets()

    def _wipe(self, reason: str) -> None:
        self._store.wipe(reason)
        self._offsets = self._store.offsets()

    # -- the gate --------------------------------------------------------------------------
    def begin_bootstrap(self, timeout_s: float = 30.0) -> None:
        """Start the gate: read the dead letters, snapshot the high watermarks, heal, assign.

        When the cluster cannot answer yet (a broker restarting: no leader, a new leader that
        does not know its high watermark yet, a refused connection, a timeout) the table waits
        (state ``waiting``, the reason in ``status()``) and ``step_bootstrap`` asks again with
        backoff. Only what no retry cures raises ``TableError``: rejected credentials or
        authorization, a fatal client error, a topic still missing after
        ``missing_topic_grace_s``. ``timeout_s`` bounds each broker request.
        """
        if not self._opened:
            self.open()
        self._set_state(TableState.LOADING)
        self._dead_lettered = self._read_dead_letters(timeout_s)
        self._request_timeout_s = timeout_s
        self._targets = {}
        self._waiting_since = time.monotonic()
        self._retries = 0
        self._retry_at = 0.0
        self._consumer = self._new_consumer(self._consumer_config)
        self._assigned = False
        self._try_snapshot()

    def _try_snapshot(self) -> bool:
        """Take the start snapshot and assign; False while the cluster cannot answer."""
        consumer = self._require_consumer()
        try:
            marks, cluster_id = self._watermarks(consumer, self._request_timeout_s)
        except KafkaException as exc:
            self._wait_or_raise(exc.args[0])
            return False
        stored_cluster = self._store.cluster_id()
        if cluster_id and self._offsets and stored_cluster != cluster_id:
            # Offsets of another cluster (or of before the cluster was recorded) say nothing
            # about this one's topic, even when they fall within its watermarks.
            log.warning(
                "table store of another cluster, rebuilding",
                extra={"table": self.name, "stored": stored_cluster, "cluster": cluster_id},
            )
            self._wipe("cluster")
        reason = self._heal_reason(marks)
        if reason:
            log.warning(
                "table store out of range of the topic, rebuilding",
                extra={"table": self.name, "reason": reason},
            )
            self._wipe("offsets")
        if cluster_id and self._store.cluster_id() != cluster_id:
            self._store.set_cluster_id(cluster_id)
        self._partitions = sorted(marks)
        self._targets = {p: high for p, (_, high) in marks.items()}
        starts = [
            TopicPartition(self.topic, p, self._offsets.get(p, OFFSET_BEGINNING))
            for p in self._partitions
        ]
        consumer.assign(starts)
        self._assigned = True
        if self.waiting_reason is not None:
            log.info(
                "table bootstrap resumes: the cluster answers again",
                extra={
                    "table": self.name,
                    "waited_s": round(time.monotonic() - self._waiting_since, 1),
                },
            )
            self.waiting_reason = None
            self._set_state(TableState.LOADING)
        self._lag = sum(
            max(0, high - self._offsets.get(p, low)) for p, (low, high) in marks.items()
        )
        LAG.labels(self.name).set(self._lag)
        if self._lag >= self._bulk_load_min_records and not self._bulk:
            self._bulk = True
            self._store.bulk_load(True)
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
        return True

    def _watermarks(
        self, consumer: Consumer, timeout_s: float
    ) -> tuple[dict[int, tuple[int, int]], str | None]:
        """Every partition's (low, high) watermarks and the cluster id; raises
        ``KafkaException`` as the client does.

        A missing topic is reported as ``UNKNOWN_TOPIC_OR_PART``; an answer without an offset
        (a leader that does not know it yet) as ``OFFSET_NOT_AVAILABLE``.
        """
        cluster = consumer.list_topics(self.topic, timeout=timeout_s)
        cluster_id: str | None = getattr(cluster, "cluster_id", None)
        meta = cluster.topics.get(self.topic)
        if meta is not None and meta.error is not None:
            raise KafkaException(meta.error)
        if meta is None or not meta.partitions:
            raise KafkaException(
                KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"no partitions of {self.topic}")
            )
        marks: dict[int, tuple[int, int]] = {}
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=timeout_s
            )
            if low < 0 or high < 0:
                raise KafkaException(
                    KafkaError(
                        KafkaError.OFFSET_NOT_AVAILABLE,
                        f"no watermarks for partition {p} of {self.topic} yet",
                    )
                )
            marks[p] = (low, high)
        return marks, cluster_id

    def _wait_or_raise(self, err: KafkaError) -> None:
        """Schedule the next snapshot attempt for a transient ``err``; raise for another."""
        waited = time.monotonic() - self._waiting_since
        fatal: str | None = None
        if err.code() in MISSING_TOPIC_CODES:
            if waited >= self._missing_topic_grace_s:
                fatal = f"topic {self.topic} of table {self.name} does not exist"
        elif not is_transient(err):
            fatal = f"cannot read the partitions of {self.topic} (table {self.name}): {err.str()}"
        if fatal is not None:
            self._require_consumer().close()
            self._consumer = None
            raise TableError(fatal)
        delay = min(_WAIT_MAX_S, _WAIT_FIRST_S * 2**self._retries)
        self._retries += 1
        self._retry_at = time.monotonic() + delay
        self.waiting_reason = f"{err.name()}: {err.str()}"
        self._set_state(TableState.WAITING)
        log.warning(
            "the cluster cannot answer the table bootstrap yet, retrying",
            extra={
                "table": self.name,
                "topic": self.topic,
                "error": self.waiting_reason,
                "attempt": self._retries,
                "retry_in_s": round(delay, 2),
                "waited_s": round(waited, 1),
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
        if not self._assigned:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                # the gate has nothing else to do; short naps so a stop is seen soon
                time.sleep(min(wait, 0.1))
                return False
            if not self._try_snapshot():
                return False
        if self._is_blocked():
            time.sleep(0.05)  # the gate has nothing else to do; the loop has not started
            return False
        with cyclic_gc_paused():
            msgs = consumer.consume(self._batch_size, 0.2)
            if msgs:
                self._apply(msgs)
            del msgs  # freed by reference counting before the collector may run again
        pending = self._behind(self._targets)
        self._lag = sum(max(0, self._targets[p] - self._offsets.get(p, 0)) for p in pending)
        LAG.labels(self.name).set(self._lag)
        if pending:
            return False
        # The writes skip the WAL: flush once at the gate so a crash right after a long
        # restore does not throw the memtable's part of it away.
        self._store.flush()
        if self._bulk:
            self._bulk = False
            self._store.bulk_load(False)
        self._set_state(TableState.CAUGHT_UP)
        return True

    def bootstrap(self, stop: threading.Event, timeout_s: float | None = None) -> int:
        """The gate: returns once caught up with the start snapshot; records applied."""
        bootstrap_all([self], stop, timeout_s=timeout_s)
        return self.applied_since_start

    # -- positions -------------------------------------------------------------------------
    def positions(self) -> dict[int, int]:
        """The next offset to apply of every partition (0 for one nothing was read from).

        Positions only move forward, and only past records that were applied, dead-lettered
        or skipped as invalid: a record the table waits at (registry down) is never passed.
        """
        partitions = self._partitions or sorted(self._offsets)
        return {p: self._offsets.get(p, 0) for p in partitions}

    def high_watermarks(self, timeout_s: float = 10.0) -> dict[int, int]:
        """Snapshot every partition's high watermark (one broker round trip per partition).

        Blocks at most ``timeout_s`` per partition; raises ``TableError`` when the broker
        does not answer. Pair it with ``caught_up_to()``.
        """
        consumer = self._require_consumer()
        marks: dict[int, int] = {}
        try:
            for p in self._partitions:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=timeout_s
                )
                marks[p] = high
        except KafkaException as exc:
            raise TableError(f"cannot read the high watermarks of {self.topic}: {exc}") from exc
        return marks

    def caught_up_to(self, marks: Mapping[int, int]) -> bool:
        """True once every partition's position reached its mark in ``marks``; never blocks.

        The caller keeps polling the table (``poll()``) between calls. A partition the table
        does not follow counts as caught up only for a mark of 0.
        """
        return not self._behind(marks)

    def _behind(self, marks: Mapping[int, int]) -> list[int]:
        """Partitions below their mark, after moving positions past what no record fills."""
        pending = [p for p, mark in marks.items() if self._offsets.get(p, 0) < mark]
        if pending and self._consumer is not None and not self._is_blocked():
            followed = [p for p in pending if p in self._targets]
            if followed:
                advanced: dict[int, int] = {}
                positions = self._consumer.position(
                    [TopicPartition(self.topic, p) for p in followed]
                )
                for tp in positions:
                    # the position moves past transaction markers and compaction holes that no
                    # record was returned for; store it so a restart starts there too
                    if tp.offset >= 0 and tp.offset > self._offsets.get(tp.partition, -1):
                        advanced[tp.partition] = tp.offset
                if advanced:
                    self._store.write((), advanced)
                    self._offsets.update(advanced)
            pending = [p for p in pending if self._offsets.get(p, 0) < marks[p]]
        return pending

    # -- applying --------------------------------------------------------------------------
    def _apply(self, msgs: Sequence[Message]) -> int:
        entries: list[Entry] = []
        touched: dict[int, int] = {}
        # partition -> offset of its first record of this batch that is not applied
        rewind: dict[int, int] = {}
        check, topic = self._check, self.topic
        header_size, valid_headers = self._header_size, self._valid_headers
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if is_fatal(err):
                    raise TableError(f"table {self.name} consumer error: {err.str()}")
                continue
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            if rewind:
                rewind.setdefault(partition, offset)
                continue
            touched[partition] = offset + 1
            key = msg.key()
            value = msg.value()
            if key is None:
                self._invalid(msg, TableError("record without key"))
                continue
            if (
                value is not None
                and check is not None
                and (not header_size or not value.startswith(valid_headers))
            ):
                try:
                    check(value, topic, partition, offset)
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
                except Exception as exc:  # whatever else a decoder raises: invalid record
                    self._invalid(msg, exc)
                    continue
                if header_size and len(value) >= header_size:
                    valid_headers = (*valid_headers, value[:header_size])
                    self._valid_headers = valid_headers
            entries.append((key, value))
        self._store.write(entries, touched)
        self._offsets.update(touched)
        if self.on_change is not None and entries:
            self.on_change([key for key, _ in entries])
        for partition, offset in rewind.items():
            # seeking also drops what the consumer had fetched past that point
            self._require_consumer().seek(TopicPartition(self.topic, partition, offset))
        applied = len(entries)
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

    def _read_dead_letters(self, timeout_s: float) -> set[tuple[int, int]]:
        if self._dead_letter_topic is None:
            return set()
        found: set[tuple[int, int]] = set()
        consumer = self._new_consumer(self._consumer_config)
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
        # The gauges are written only on a change: a follower polls every loop turn, and
        # five gauge writes per poll were a seventh of the notifier's loop thread at one
        # channel. Every other writer of ``_lag`` sets its gauge too, so they stay equal.
        if lag != self._lag:
            self._lag = lag
            LAG.labels(self.name).set(lag)
        if self.state is not TableState.LOADING:
            state = TableState.LAGGING if lag > self._lagging_threshold else TableState.CAUGHT_UP
            if state is not self.state:
                self._set_state(state)

    def _require_consumer(self) -> Consumer:
        if self._consumer is None:
            raise TableError(f"table {self.name}: call begin_bootstrap() first")
        return self._consumer

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> V | None:
        """The current value of ``key``, decoded; ``None`` when absent, deleted or undecodable.

        One store read and one decode, no lock and no cache: the join's keys are spread over
        the whole table, so a cache in front mostly missed. A value that does not decode is
        answered as absent and counted (see the module docstring); the decoder's
        ``DeserializationError`` for a registry that cannot answer propagates, because the
        value is fine and the caller should retry.
        """
        raw = self._store.get(key.encode("utf-8"))
        if raw is None:
            return None
        try:
            return self._decode(raw, self.topic, -1, -1)
        except DeserializationError as exc:
            if exc.registry_unavailable:
                raise
            self._undecodable(key, exc)
            return None

    def _undecodable(self, key: str, exc: DeserializationError) -> None:
        self.undecodable_reads += 1
        UNDECODABLE.labels(self.name).inc()
        if key not in self._undecodable_logged:
            if len(self._undecodable_logged) < _UNDECODABLE_LOGGED_MAX:
                self._undecodable_logged.add(key)
            log.warning(
                "table value does not decode, answered as absent",
                extra={"table": self.name, "key": key, "error": exc.reason},
            )

    def put_local(self, key: str, value: bytes | None) -> None:
        """Write through a record this process produced itself, ahead of reading it back.

        The position does not move: the record is applied again when it is read back.
        """
        self._store.write([(key.encode("utf-8"), value)], {})

    # -- status ----------------------------------------------------------------------------
    def ready(self) -> bool:
        """True once the gate has passed (it stays true while following)."""
        return self.state in (TableState.CAUGHT_UP, TableState.LAGGING)

    def lag(self) -> int:
        """Records between the table's position and the partitions' ends."""
        return self._lag

    def record_count(self) -> int:
        """Keys in the store (RocksDB's estimate; exact after a compaction)."""
        return self._store.estimate_keys()

    def status(self) -> dict[str, object]:
        """State, counts, lag and age of the last update, for logs and /readyz."""
        records = self.record_count()
        RECORDS.labels(self.name).set(records)
        age = None if self.last_update is None else round(time.time() - self.last_update, 3)
        return {
            "state": self.state.value,
            "records": records,
            "lag": self._lag,
            "applied_since_start": self.applied_since_start,
            "invalid": self.invalid_total,
            "undecodable_reads": self.undecodable_reads,
            "blocked": self.blocked_reason,
            "waiting": self.waiting_reason,
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
        if self._opened:
            self._store.close()
            self._opened = False


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
            waiting = {t.name: t.waiting_reason for t in pending if t.waiting_reason}
            raise TableError(
                f"tables {[t.name for t in pending]} not caught up after {timeout_s:.0f}s "
                f"(lag {[t.lag() for t in pending]}"
                + (f"; waiting for the cluster: {waiting})" if waiting else ")")
            )
    elapsed = time.monotonic() - started
    for t in tables:
        log.info(
            "table caught up" if t.ready() else "table bootstrap interrupted",
            extra={"table": t.name, "seconds": round(elapsed, 3), **t.status()},
        )


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
