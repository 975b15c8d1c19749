"""Per-partition state stores with a compacted changelog, restored before a partition is used.

``StateStores`` is what ``ProcessingLoop`` drives (``libs.kafka.loop``); handlers only see the
``KeyValueState`` of the partition of the record they handle (``Emitter.state``).

Unit of state: one input partition ``(topic, p)``. Its changelog is partition ``p`` of
``changelog_topic(group_id, topic)`` (compacted; see ``libs.state.changelog``).

Checkpoint order, and why a kill -9 never leaves uncommitted state on disk:

1. writes of the interval live in an in-memory overlay per partition (reads see them);
2. before the offsets are committed, the overlay's last value per key (a tombstone for a
   delete) is produced to the changelog, with an explicit partition: inside the transaction
   that carries the outputs and the consumed offsets (exactly-once), or before the producer
   flush and the offset commit (at-least-once);
3. only after the commit succeeded is the overlay written to the local RocksDB, in one write
   batch with the partition's changelog position (the next changelog offset to read, taken
   from the delivery report of the partition's last changelog record of the checkpoint: the
   loop's producer must report successes, i.e. not ``delivery.report.only.error``). An
   aborted transaction drops the overlay.

So the local store only ever holds committed state plus the changelog position that state
corresponds to: after a crash it is at most behind (the WAL is off; RocksDB loses a suffix of
data and position together), never ahead, and a restore from the stored position to the end
of the changelog brings it exactly to the committed state. Changelog records are full values,
so re-reading records already applied converges to the same state.

At-least-once mode: a crash after the changelog records were acknowledged but before the
offsets were committed replays the interval on top of state that already saw it; handlers of
an at-least-once loop must be idempotent for their state too (as for their outputs).

Restore, on the loop thread: partitions are paused when assigned (``assigned``, from the
rebalance callback, which does no I/O), then ``restore()`` slices read each changelog partition
under ``read_committed`` from the local position (from the start when there is no local store,
the position is below the low watermark or above the end, i.e. the topic was recreated, the
store was written against another cluster (its metadata's cluster id differs: a purged and
recreated cluster, whose new changelog may well have reached the stored position), the
store is corrupt, or it was last caught up more than ``max_offline_s`` ago, so compaction may
have dropped tombstones it never read: wipe and rebuild) up to the log end taken when the
restore began. Positions,
not end-of-partition events, decide when a partition is done: transaction markers and
compaction holes make offsets sparse. The end is the ``read_uncommitted`` high watermark, so an
open transaction (a fenced zombie's, until the coordinator aborts it) is waited for, not
skipped; a restore whose position does not move for ``restore_stall_timeout_s`` stops the
loop. The loop keeps polling its group consumer between slices, so the member stays in the
group however long the restore takes. Only then is the partition resumed: a record of a
partition whose state is not restored is never handled.

Revoke: the loop's checkpoint runs first, then the partition's store is closed with its files
kept, so a later assignment restores only what is new (warm restore). Lost: the overlay is
dropped, nothing is committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge
from rocksdict import Cache, WriteBufferManager

from libs.kafka.errors import is_fatal, is_transient
from libs.state import KeyValueState
from libs.state.changelog import changelog_topic
from libs.state.errors import ChangelogTopicError, RestoreStalledError, StateError
from libs.state.local import LocalStore
from libs.state.partition import PartitionState

log = logging.getLogger(__name__)

TP = tuple[str, int]

RESTORED = Counter(
    "state_restore_records_total", "Changelog records applied by state restores", ["store"]
)
RESTORE_SECONDS = Gauge(
    "state_restore_seconds", "Duration of the last partition restore", ["store"]
)
RESTORING = Gauge(
    "state_partitions_restoring", "Assigned partitions whose state is being restored", ["store"]
)

#: how a partition's changelog records are produced: (topic, partition, records in order,
#: on_last_delivered); the producer must keep their order (idempotent) and report the last
#: record's successful delivery to ``on_last_delivered`` (no ``delivery.report.only.error``:
#: that would leave every position where it was). ``ProducerClient.produce_run``.
ChangelogProduce = Callable[
    [str, int, Sequence[tuple[bytes, bytes | None]], Callable[[Message], None]], None
]


class RestoreConsumer(Protocol):
    """What the restore uses of a group-less consumer (``confluent_kafka.Consumer``)."""

    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None: ...

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...

    def close(self) -> None: ...


RestoreConsumerFactory = Callable[[dict[str, Any]], RestoreConsumer]


@dataclass
class _Restore:
    """One partition being restored."""

    state: PartitionState
    changelog: TopicPartition
    #: the changelog end (read_uncommitted high watermark) when the restore began
    target: int
    #: wall-clock time the target was read: the store is caught up as of then once done
    marked_at: float
    started: float
    #: monotonic time the position last moved
    progressed: float
    position: int
    records: int = 0
    logged: float = 0.0


class _NotYet(Exception):  # noqa: N818 - a signal, not a failure
    """A partition's restore cannot start yet for a reason a later turn may cure."""


class StateStores:
    """The local stores of one loop's partitions, their restores and their changelog writes.

    ``name`` labels metrics and names the directory (``state_dir / name``); ``group_id`` is
    the loop's consumer group (it names the changelog topics); ``consumer_config`` is the
    loop's consumer config, from which the restore consumers are derived (group-less,
    ``read_committed``). ``consumer_factory`` builds them (the in-memory twin in unit tests).
    ``write_buffer_mb`` and ``block_cache_mb`` bound the memtables and the block cache of all
    partitions' stores together.
    """

    def __init__(
        self,
        name: str,
        state_dir: Path,
        group_id: str,
        consumer_config: dict[str, Any],
        *,
        consumer_factory: RestoreConsumerFactory = Consumer,
        restore_batch_size: int = 10_000,
        restore_slice_s: float = 0.2,
        restore_stall_timeout_s: float = 120.0,
        max_offline_s: float = 12 * 3600.0,
        timeout_s: float = 30.0,
        write_buffer_mb: int = 16,
        block_cache_mb: int = 16,
    ) -> None:
        self.name = name
        self.path = Path(state_dir) / name
        self.group_id = group_id
        base = {
            k: v
            for k, v in consumer_config.items()
            # never a group member: no static membership, no assignment strategy
            if k not in ("group.instance.id", "partition.assignment.strategy", "on_commit")
        }
        self._consumer_config: dict[str, Any] = {
            # shallow prefetch refilled at once: librdkafka's default 1 s fetch backoff after
            # a full queue stalls a bulk restore (see libs.tables.global_table)
            "queued.min.messages": 10_000,
            "queued.max.messages.kbytes": 8 * 1024,
            "fetch.queue.backoff.ms": 10,
            **base,
            # librdkafka wants a group.id even for assign()-only consumers; never joined
            "group.id": f"{group_id}-state-restore",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
        self._factory = consumer_factory
        self._batch = restore_batch_size
        self._slice_s = restore_slice_s
        self._stall_s = restore_stall_timeout_s
        self._max_offline_s = max_offline_s
        self._timeout_s = timeout_s
        # one memory budget for every partition's store, however many the loop owns
        self._cache = Cache(block_cache_mb * 1024 * 1024)
        self._write_buffers = WriteBufferManager(write_buffer_mb * 1024 * 1024, False)
        self._restore_consumer: RestoreConsumer | None = None
        self._marks_consumer: RestoreConsumer | None = None
        #: assigned partitions, waiting for their restore to start
        self._pending: list[TP] = []
        # partitions whose restore could not start yet (a broker restart), since when
        self._not_yet_since: dict[TP, float] = {}
        #: restores in progress, by changelog partition
        self._active: dict[TP, tuple[TP, _Restore]] = {}
        self._ready: dict[TP, PartitionState] = {}
        #: next changelog offset per input partition, from this checkpoint's delivery reports
        self._delivered: dict[TP, int] = {}
        #: input topic -> its partition count, once checked against its changelog
        self._checked: dict[str, int] = {}
        #: the cluster's id, from the changelog metadata (None until read, or not given)
        self._cluster_id: str | None = None
        self.restored_records = 0

    # -- what the loop asks ----------------------------------------------------------------
    @property
    def restoring(self) -> bool:
        """Some assigned partition is not restored yet."""
        return bool(self._pending or self._active)

    def is_ready(self, tp: TP) -> bool:
        """The partition's state is restored: its records may be handled."""
        return tp in self._ready

    def restoring_partitions(self) -> list[TP]:
        """Assigned partitions whose state is not restored yet."""
        # copies first: status() calls this from the health server's thread
        return [*list(self._pending), *(tp for tp, _ in list(self._active.values()))]

    def state(self, tp: TP) -> KeyValueState:
        """The state of a restored partition."""
        st = self._ready.get(tp)
        if st is None:
            raise StateError(f"the state of {tp[0]}[{tp[1]}] is not restored")
        return st

    def states(self) -> Mapping[TP, KeyValueState]:
        """Every assigned and restored partition's state."""
        return dict(self._ready)

    def status(self) -> dict[str, object]:
        """For the health body: partitions restored and restoring, records restored.

        Read from the health server's thread: a snapshot of plain values, no lock needed.
        """
        return {
            "partitions": sorted(f"{t}[{p}]" for t, p in list(self._ready)),
            "restoring": sorted(f"{t}[{p}]" for t, p in self.restoring_partitions()),
            "restored_records": self.restored_records,
        }

    @property
    def dirty(self) -> bool:
        """Some partition has writes the next checkpoint must commit."""
        return any(st.dirty for st in self._ready.values())

    def dirty_partitions(self) -> list[TP]:
        """The partitions with writes the next checkpoint must commit."""
        return [tp for tp, st in self._ready.items() if st.dirty]

    # -- rebalances (called from the consumer's callbacks: no I/O here) ----------------------
    def assigned(self, partitions: Iterable[TP]) -> None:
        """Partitions to restore before their first record is handled (the loop pauses them)."""
        for tp in partitions:
            if tp not in self._ready and tp not in self._pending:
                self._pending.append(tp)
        RESTORING.labels(self.name).set(len(self.restoring_partitions()))

    def revoked(self, partitions: Iterable[TP]) -> None:
        """After the revoke's checkpoint: close the stores, keep their files (warm restore)."""
        self._release(partitions, committed=True)

    def lost(self, partitions: Iterable[TP]) -> None:
        """Drop what was not committed and close the stores."""
        self._release(partitions, committed=False)

    def _release(self, partitions: Iterable[TP], *, committed: bool) -> None:
        gone = set(partitions)
        self._pending = [tp for tp in self._pending if tp not in gone]
        for cl, (tp, restore) in list(self._active.items()):
            if tp in gone:
                del self._active[cl]
                self._unassign([restore.changelog])
                restore.state.local.close()
        for tp in gone:
            st = self._ready.pop(tp, None)
            self._delivered.pop(tp, None)
            if st is None:
                continue
            if st.dirty and committed:
                # the revoke's checkpoint failed (rolled back): these writes were not committed
                log.warning(
                    "dropping uncommitted state of a revoked partition",
                    extra={"store": self.name, "partition": f"{tp[0]}[{tp[1]}]"},
                )
            st.discard()
            st.local.close()
        RESTORING.labels(self.name).set(len(self.restoring_partitions()))

    def invalidate(self) -> list[TP]:
        """Drop every overlay and restore every partition again (returns them, to pause).

        For a transaction whose outcome is unknown (a wedged producer replaced): it may have
        committed, so the changelog may be ahead of the local stores.
        """
        again = list(self._ready)
        for tp in again:
            st = self._ready.pop(tp)
            st.discard()
            st.local.close()
        self._delivered.clear()
        self.assigned(again)
        return again

    # -- checkpoint ------------------------------------------------------------------------
    def write_changelog(self, produce: ChangelogProduce) -> int:
        """Produce every overlay to its changelog partition; returns the records produced."""
        n = 0
        for tp, st in self._ready.items():
            if not st.dirty:
                continue
            entries = st.entries()
            # Only the partition's last record reports its offset: the producer keeps a
            # partition's records in order (idempotent, as transactions require), so its
            # offset + 1 is the position after all of them. One Python callback per partition
            # per checkpoint instead of one per record, and one call for the whole run.
            produce(changelog_topic(self.group_id, tp[0]), tp[1], entries, self._on_delivered(tp))
            n += len(entries)
        return n

    def _on_delivered(self, tp: TP) -> Callable[[Message], None]:
        def delivered(msg: Message) -> None:
            offset = msg.offset()
            if offset is not None and offset + 1 > self._delivered.get(tp, -1):
                self._delivered[tp] = offset + 1

        return delivered

    def commit(self) -> None:
        """The checkpoint committed: write every overlay locally with its new position."""
        for tp, st in self._ready.items():
            if st.dirty:
                # A missing delivery report keeps the old position: re-reading records whose
                # values are already applied converges to the same state.
                st.commit(self._delivered.get(tp))
        self._delivered.clear()

    def abort(self) -> None:
        """The checkpoint's transaction aborted (or the interval rolled back): drop overlays."""
        for st in self._ready.values():
            st.discard()
        self._delivered.clear()

    # -- restore ---------------------------------------------------------------------------
    def restore(self) -> list[TP]:
        """One slice of restore work (at most ``restore_slice_s``); the partitions now ready."""
        done: list[TP] = []
        if self._not_yet_since:  # forget partitions revoked meanwhile
            self._not_yet_since = {
                tp: t for tp, t in self._not_yet_since.items() if tp in self._pending
            }
        while self._pending:
            tp = self._pending[0]
            try:
                ready = self._start(tp)
            except _NotYet as exc:
                # A broker restart (leader moving, offsets not available yet): ask again on the
                # next turn, the partition staying paused, up to the stall timeout.
                since = self._not_yet_since.setdefault(tp, time.monotonic())
                if time.monotonic() - since > self._stall_s:
                    raise StateError(str(exc)) from exc
                log.warning(
                    "changelog not readable yet, retrying",
                    extra={"store": self.name, "partition": f"{tp[0]}[{tp[1]}]", "error": str(exc)},
                )
                break
            self._pending.pop(0)
            self._not_yet_since.pop(tp, None)
            if ready:
                done.append(tp)
        deadline = time.monotonic() + self._slice_s
        while self._active:
            consumer = self._require_consumer()
            remaining = deadline - time.monotonic()
            msgs = consumer.consume(self._batch, max(0.0, min(0.05, remaining)))
            if msgs:
                self._apply(msgs)
            done.extend(self._finished())
            if not msgs or time.monotonic() >= deadline:
                break
        self._check_stalls()
        RESTORING.labels(self.name).set(len(self.restoring_partitions()))
        return done

    def _require_consumer(self) -> RestoreConsumer:
        if self._restore_consumer is None:
            self._restore_consumer = self._factory(
                {**self._consumer_config, "isolation.level": "read_committed"}
            )
        return self._restore_consumer

    def _marks(self) -> RestoreConsumer:
        # The restore target is the log end as a read_uncommitted reader sees it: an open
        # transaction is waited for rather than skipped, as it may still commit.
        if self._marks_consumer is None:
            self._marks_consumer = self._factory(
                {**self._consumer_config, "isolation.level": "read_uncommitted"}
            )
        return self._marks_consumer

    def _check_changelog(self, topic: str) -> None:
        if topic in self._checked:
            return
        cl = changelog_topic(self.group_id, topic)
        consumer = self._marks()
        try:
            metas = {
                name: consumer.list_topics(name, timeout=self._timeout_s) for name in (topic, cl)
            }
        except KafkaException as exc:
            raise ChangelogTopicError(f"cannot read the metadata of {topic}, {cl}: {exc}") from exc
        counts = {name: _partition_count(meta, name) for name, meta in metas.items()}
        self._cluster_id = getattr(metas[cl], "cluster_id", None) or self._cluster_id
        if counts[cl] < counts[topic]:
            raise ChangelogTopicError(
                f"changelog topic {cl} has {counts[cl]} partitions, fewer than the "
                f"{counts[topic]} of its input topic {topic}: create it with "
                f"changelog_specs() before the loop starts"
            )
        self._checked[topic] = counts[topic]

    def _start(self, tp: TP) -> bool:
        """Open the partition's store and start its restore; True when nothing is to read."""
        self._check_changelog(tp[0])
        cl = TopicPartition(changelog_topic(self.group_id, tp[0]), tp[1])
        local = LocalStore(
            self.path / f"{tp[0]}-{tp[1]}",
            store=self.name,
            changelog=(cl.topic, cl.partition),
            cluster_id=self._cluster_id,
            cache=self._cache,
            write_buffers=self._write_buffers,
        )
        local.open()
        marked_at = time.time()
        try:
            low, high = self._marks().get_watermark_offsets(cl, timeout=self._timeout_s)
        except KafkaException as exc:
            local.close()
            what = f"cannot read the watermarks of {cl.topic}[{cl.partition}]: {exc.args[0].str()}"
            if is_transient(exc.args[0]):
                raise _NotYet(what) from exc
            raise StateError(what) from exc
        stored = local.position
        if stored is not None and not low <= stored <= high:
            log.warning(
                "state store position out of the changelog's range, rebuilding",
                extra={
                    "store": self.name,
                    "partition": f"{tp[0]}[{tp[1]}]",
                    "stored": stored,
                    "low": low,
                    "high": high,
                },
            )
            local.wipe("below low watermark" if stored < low else "beyond the end")
            stored = None
        elif stored is not None and (
            local.caught_up_at is None or marked_at - local.caught_up_at > self._max_offline_s
        ):
            # Compaction drops a tombstone once it is older than the changelog's
            # delete.retention.ms (24 h by default): a store that fell behind for longer may
            # have missed deletes it can no longer read, and would keep the deleted keys.
            log.warning(
                "state store too old to catch up safely, rebuilding",
                extra={
                    "store": self.name,
                    "partition": f"{tp[0]}[{tp[1]}]",
                    "caught_up_at": local.caught_up_at,
                    "max_offline_s": self._max_offline_s,
                },
            )
            local.wipe("stale")
            stored = None
        if stored is None:
            # A cold restore reads as one consumer from now on: if it is interrupted (a
            # revoke) and resumed, the resumed part must still fall within the tombstone
            # retention counted from here.
            local.write((), None, caught_up_at=marked_at, bulk=True)
        st = PartitionState(local)
        now = time.monotonic()
        start = low if stored is None else stored
        log.info(
            "restoring state",
            extra={
                "store": self.name,
                "partition": f"{tp[0]}[{tp[1]}]",
                "changelog": f"{cl.topic}[{cl.partition}]",
                "from": start,
                "to": high,
                "warm": stored is not None,
            },
        )
        restore = _Restore(st, cl, high, marked_at, now, now, start)
        if start >= high:
            self._finish(tp, restore)
            return True
        cl.offset = OFFSET_BEGINNING if stored is None else stored
        self._require_consumer().incremental_assign([cl])
        self._active[(cl.topic, cl.partition)] = (tp, restore)
        return False

    def _apply(self, msgs: list[Message]) -> None:
        batches: dict[TP, list[tuple[bytes, bytes | None]]] = {}
        last: dict[TP, int] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if is_fatal(err):
                    raise StateError(f"restore consumer error: {err.str()}")
                log.warning(
                    "restore consumer error", extra={"store": self.name, "error": err.str()}
                )
                continue
            cl = (str(msg.topic()), int(msg.partition() or 0))
            key = msg.key()
            last[cl] = int(msg.offset() or 0) + 1
            if key is not None:
                batches.setdefault(cl, []).append((key, msg.value()))
        now = time.monotonic()
        for cl, position in last.items():
            active = self._active.get(cl)
            if active is None:
                continue  # unassigned in the meantime
            restore = active[1]
            n = restore.state.local.write(batches.get(cl, ()), position, bulk=True)
            restore.records += n
            restore.position = position
            restore.progressed = now
            self.restored_records += n
            RESTORED.labels(self.name).inc(n)

    def _finished(self) -> list[TP]:
        consumer = self._require_consumer()
        done: list[TP] = []
        now = time.monotonic()
        for tp in consumer.position([r.changelog for _, r in self._active.values()]):
            cl = (tp.topic, tp.partition)
            entry = self._active.get(cl)
            if entry is None:
                continue
            restore = entry[1]
            # the position moves past markers and compaction holes that no record filled
            if tp.offset > restore.position:
                restore.position = tp.offset
                restore.progressed = now
            if restore.position >= restore.target:
                del self._active[cl]
                self._unassign([restore.changelog])
                self._finish(entry[0], restore)
                done.append(entry[0])
        return done

    def _finish(self, tp: TP, restore: _Restore) -> None:
        local = restore.state.local
        # caught up with everything the changelog had when the target was read
        local.write((), max(restore.position, local.position or 0), caught_up_at=restore.marked_at)
        # restore writes skip the WAL: flush once so a crash right after a restore keeps it
        local.flush()
        self._ready[tp] = restore.state
        elapsed = time.monotonic() - restore.started
        RESTORE_SECONDS.labels(self.name).set(elapsed)
        log.info(
            "state restored",
            extra={
                "store": self.name,
                "partition": f"{tp[0]}[{tp[1]}]",
                "records": restore.records,
                "position": restore.position,
                "seconds": round(elapsed, 3),
            },
        )

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for tp, restore in self._active.values():
            if now - restore.logged >= 10.0:
                restore.logged = now
                if now - restore.started >= 10.0:
                    log.info(
                        "restoring state",
                        extra={
                            "store": self.name,
                            "partition": f"{tp[0]}[{tp[1]}]",
                            "position": restore.position,
                            "target": restore.target,
                            "records": restore.records,
                        },
                    )
            if now - restore.progressed > self._stall_s:
                raise RestoreStalledError(
                    f"restore of {tp[0]}[{tp[1]}] from {restore.changelog.topic}"
                    f"[{restore.changelog.partition}] stuck at offset {restore.position} (end "
                    f"{restore.target}) for {self._stall_s:.0f}s: an open transaction that "
                    "does not end, or an unreachable broker"
                )

    def _unassign(self, partitions: list[TopicPartition]) -> None:
        if self._restore_consumer is not None:
            self._restore_consumer.incremental_unassign(
                [TopicPartition(p.topic, p.partition) for p in partitions]
            )

    def close(self) -> None:
        """Close every store (files kept) and the restore consumers."""
        for st in self._ready.values():
            st.discard()
            st.local.close()
        self._ready.clear()
        for _, restore in self._active.values():
            restore.state.local.close()
        self._active.clear()
        self._pending.clear()
        for consumer in (self._restore_consumer, self._marks_consumer):
            if consumer is not None:
                try:
                    consumer.close()
                except (KafkaException, RuntimeError) as exc:
                    log.warning("restore consumer close failed", extra={"error": str(exc)})
        self._restore_consumer = self._marks_consumer = None
        RESTORING.labels(self.name).set(0)


def _partition_count(meta: Any, topic: str) -> int:
    tmeta = meta.topics.get(topic)
    if tmeta is None or tmeta.error is not None:
        return 0
    return len(tmeta.partitions)
