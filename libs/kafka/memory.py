"""In-memory twins of the Kafka ports: a broker with partitioned logs, groups and transactions.

For unit tests of the loops (``ProcessingLoop``, the notifier's sink). They keep the parts of
Kafka's semantics the loops depend on, and ``tests/support/kafka_contract.py`` checks them
against the real client on a real broker:

* a log per partition whose offsets also count transaction markers, as Kafka's do, so
  offsets are sparse after a transaction and a loop cannot get away with counting records;
* consumer groups: members subscribe, partitions are spread over the members round-robin,
  and membership changes are applied incrementally (cooperative-sticky style) inside the
  member's next ``poll``/``consume``, where ``on_revoke``/``on_assign`` run; ``lose()`` makes
  a member's partitions lost (``on_lost``) as a session timeout would; ``assign`` takes
  partitions outside any group (a table's reader), ``list_topics`` answers metadata;
* fetch positions start at the group's committed offset, else at ``auto.offset.reset``;
  ``pause``/``resume``/``seek``/``position`` act on the member's own assignment;
* ``read_committed`` consumers stop at the first record of an open transaction (the last
  stable offset) and skip aborted records; ``read_uncommitted`` ones see everything; the
  high watermark a consumer is told (``get_watermark_offsets``) follows its isolation level
  too: the last stable offset under ``read_committed``, the log end otherwise, as Kafka's
  ``ListOffsets`` does;
* ``delete_records`` raises a partition's low watermark (retention, ``DeleteRecords``); a fetch
  position below it moves up to it;
* group-less consumers: ``assign``/``incremental_assign``/``incremental_unassign`` take
  partitions with explicit offsets (``OFFSET_BEGINNING``/``OFFSET_END`` too), as a restore
  consumer does; ``list_topics`` answers partition counts and the broker's ``cluster_id``
  (a new ``InMemoryBroker`` is a new cluster, as a purged one is);
* producers deliver on ``poll``/``flush`` (delivery reports run there, as librdkafka's do);
  ``init_transactions`` fences an earlier producer with the same ``transactional.id`` and
  aborts its open transaction; ``send_offsets_to_transaction`` offsets are committed with the
  transaction and dropped by an abort.

Faults are injected per method: ``fail(name, error)`` makes the next call raise
``KafkaException(error)``; ``hang(name)`` makes calls block until the returned event is set
(a wedged librdkafka call); ``fail_delivery(topic, error)`` fails the next delivery to
``topic``, and so the commit of its transaction (abortable, as librdkafka's).

Not modelled: replication, compaction, retention, timestamps, record batches, prefetching.
Keyed records go to ``crc32(key) % partitions``, not Kafka's murmur2: a test must not
depend on which partition a key lands on (name the partition when it matters). The twins
never sleep on their own; ``poll``/``consume`` wait (on a condition, for at most their
timeout) only when nothing is fetchable.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    ClusterMetadata,
    PartitionMetadata,
    TopicMetadata,
)

from libs.kafka.ports import DeliveryCallback, HeadersArg, RebalanceCallback

TP = tuple[str, int]

#: ``TopicPartition.offset`` when nothing is committed / the position is not known
OFFSET_INVALID = -1001


@dataclass
class _Txn:
    state: Literal["open", "committed", "aborted"] = "open"


@dataclass
class _Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None
    txn: _Txn | None
    #: a transaction marker: takes an offset, never delivered
    control: bool = False


@dataclass(frozen=True)
class GroupMetadata:
    """What ``consumer_group_metadata()`` returns: the group, opaque to callers."""

    group_id: str


@dataclass
class _Group:
    members: list[InMemoryConsumer] = field(default_factory=list)
    offsets: dict[TP, int] = field(default_factory=dict)


class _Faults:
    """Per-method injected failures and hangs."""

    def __init__(self) -> None:
        self._fail: dict[str, deque[KafkaError]] = {}
        self._hang: dict[str, threading.Event] = {}

    def fail(self, method: str, error: KafkaError, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` raise ``KafkaException(error)``."""
        self._fail.setdefault(method, deque()).extend([error] * times)

    def hang(self, method: str) -> threading.Event:
        """Calls of ``method`` block until the returned event is set (a wedged client)."""
        event = self._hang[method] = threading.Event()
        return event

    def _fault(self, method: str) -> None:
        event = self._hang.get(method)
        if event is not None:
            event.wait()
        queued = self._fail.get(method)
        if queued:
            raise KafkaException(queued.popleft())


class InMemoryBroker:
    """Topics, groups and transactional ids shared by the twins built from it."""

    def __init__(self) -> None:
        # Reentrant: a delivery report or rebalance callback may call back into the broker.
        self.cond = threading.Condition(threading.RLock())
        self._logs: dict[TP, list[_Record]] = {}
        #: first offset still in the log per partition (``delete_records`` raises it)
        self._low: dict[TP, int] = {}
        self._partitions: dict[str, int] = {}
        self._groups: dict[str, _Group] = {}
        self._txn_owner: dict[str, InMemoryProducer] = {}
        #: what a real cluster's metadata carries: unique per cluster
        self.cluster_id = uuid.uuid4().hex

    # -- administration and inspection ---------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create ``name`` with ``partitions`` empty partitions (idempotent)."""
        with self.cond:
            if name in self._partitions:
                return
            self._partitions[name] = partitions
            for p in range(partitions):
                self._logs[(name, p)] = []
            for group in self._groups.values():
                for member in group.members:
                    member._rebalance_due = True

    def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (0: no such topic)."""
        with self.cond:
            return self._partitions.get(topic, 0)

    def end_offset(self, topic: str, partition: int) -> int:
        """The high watermark: one past the last offset (markers included)."""
        with self.cond:
            return len(self._logs[(topic, partition)])

    def stable_offset(self, topic: str, partition: int) -> int:
        """The last stable offset: the first record of an open transaction, else the end."""
        with self.cond:
            log = self._logs[(topic, partition)]
            for offset in range(self._low.get((topic, partition), 0), len(log)):
                txn = log[offset].txn
                if txn is not None and txn.state == "open":
                    return offset
            return len(log)

    def low_offset(self, topic: str, partition: int) -> int:
        """The low watermark: the first offset still in the log."""
        with self.cond:
            return self._low.get((topic, partition), 0)

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Delete every record below ``before`` (the low watermark moves there)."""
        with self.cond:
            tp = (topic, partition)
            self._low[tp] = max(self._low.get(tp, 0), min(before, len(self._logs[tp])))

    def records(self, topic: str, *, committed_only: bool = True) -> list[Message]:
        """Every visible record of ``topic``, partition by partition, for assertions."""
        out: list[Message] = []
        with self.cond:
            for p in range(self._partitions.get(topic, 0)):
                for offset, rec in enumerate(self._logs[(topic, p)]):
                    if rec.control or (rec.txn is not None and rec.txn.state == "aborted"):
                        continue
                    if committed_only and rec.txn is not None and rec.txn.state == "open":
                        continue
                    out.append(_message(topic, p, offset, rec))
        return out

    def committed_offset(self, group: str, topic: str, partition: int) -> int | None:
        """The group's committed offset of a partition, None when none."""
        with self.cond:
            g = self._groups.get(group)
            return None if g is None else g.offsets.get((topic, partition))

    def consumer(self, config: dict[str, Any]) -> InMemoryConsumer:
        """A consumer factory (``ConsumerFactory``) bound to this broker."""
        return InMemoryConsumer(self, config)

    def producer(self, config: dict[str, Any]) -> InMemoryProducer:
        """A producer factory (``ProducerFactory``) bound to this broker."""
        return InMemoryProducer(self, config)

    # -- used by the twins (broker lock held) --------------------------------------------------
    def _append(self, tp: TP, rec: _Record) -> int:
        log = self._logs.get(tp)
        if log is None:
            raise KafkaException(
                KafkaError(KafkaError._UNKNOWN_PARTITION, f"unknown partition {tp}")
            )
        log.append(rec)
        self.cond.notify_all()
        return len(log) - 1

    def _group(self, group_id: str) -> _Group:
        return self._groups.setdefault(group_id, _Group())

    def _membership_changed(self, group: _Group) -> None:
        for member in group.members:
            member._rebalance_due = True
        self.cond.notify_all()

    def _owned_by_others(self, member: InMemoryConsumer) -> set[TP]:
        group = self._groups[member.group_id]
        return set().union(*(m._assigned for m in group.members if m is not member and not m._lost))

    def _released(self, group_id: str) -> None:
        """A member gave partitions up: members waiting for them look again."""
        for member in self._group(group_id).members:
            if member._awaiting_release:
                member._awaiting_release = False
                member._rebalance_due = True
        self.cond.notify_all()

    def _target(self, member: InMemoryConsumer) -> set[TP]:
        """Round-robin over the group's members, in the order they joined."""
        group = self._groups[member.group_id]
        tps = sorted(
            (t, p)
            for t in sorted(set().union(*(m._topics for m in group.members)))
            for p in range(self._partitions.get(t, 0))
        )
        interested = [m for m in group.members if m._topics]
        out: set[TP] = set()
        for i, tp in enumerate(tps):
            candidates = [m for m in interested if tp[0] in m._topics]
            if candidates and candidates[i % len(candidates)] is member:
                out.add(tp)
        return out


#: how a fenced static member's consumer reports it (not ``fatal()``: see ``errors.is_fatal``)
_FENCED = KafkaError(
    KafkaError._FATAL,
    "Fatal error: Broker: Static consumer fenced by other consumer with same group.instance.id",
)


def _message(topic: str, partition: int, offset: int, rec: _Record) -> Message:
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=rec.key,
        value=rec.value,
        headers=list(rec.headers) if rec.headers is not None else None,
        error=None,
    )


class InMemoryConsumer(_Faults):
    """A group member of an ``InMemoryBroker`` (see the module docstring for semantics)."""

    def __init__(self, broker: InMemoryBroker, config: dict[str, Any]) -> None:
        super().__init__()
        if "group.id" not in config:
            raise ValueError("the in-memory consumer needs a group.id")
        if config.get("enable.auto.commit", True) not in (False, "false"):
            raise ValueError("the in-memory consumer does not auto-commit: set it to False")
        self._broker = broker
        self.group_id = str(config["group.id"])
        self._reset = str(config.get("auto.offset.reset", "latest"))
        self._read_committed = config.get("isolation.level", "read_committed") == ("read_committed")
        self._topics: set[str] = set()
        self._assigned: set[TP] = set()
        self._positions: dict[TP, int] = {}
        self._paused: set[TP] = set()
        self._rebalance_due = False
        #: a partition of our target is still owned by the member that is to revoke it
        self._awaiting_release = False
        self._lost = False
        self._closed = False
        #: fenced (``fence``): the next consume reports a fatal error, commits fail for good
        self._fenced = False
        self._fatal_reported = False
        self._rr = 0
        #: assigned with ``assign``: never a group member, never rebalanced
        self._manual = False
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._on_lost: RebalanceCallback | None = None

    # -- group membership ----------------------------------------------------------------------
    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        self._fault("subscribe")
        self._check_open()
        with self._broker.cond:
            self._topics = set(topics)
            self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
            group = self._broker._group(self.group_id)
            if self not in group.members:
                group.members.append(self)
            self._broker._membership_changed(group)

    def lose(self) -> None:
        """Lose the assignment, as a member whose session timed out does (``on_lost``)."""
        with self._broker.cond:
            group = self._broker._group(self.group_id)
            if self in group.members:
                group.members.remove(self)
            self._lost = True
            self._rebalance_due = True
            self._broker._membership_changed(group)

    def fence(self) -> None:
        """Fence this member for good, as librdkafka does a static member whose instance id
        joined again under a new member id: its partitions are lost (``on_lost``), the next
        consume returns one error with the code ``_FATAL``, and every commit fails."""
        self.lose()
        self._fenced = True

    def rejoin(self) -> None:
        """Join again after ``lose()``."""
        with self._broker.cond:
            group = self._broker._group(self.group_id)
            self._lost = False
            if self not in group.members:
                group.members.append(self)
            self._broker._membership_changed(group)

    def _rebalance(self) -> None:
        """Apply a pending membership change; callbacks run without the broker lock."""
        with self._broker.cond:
            if not self._rebalance_due:
                return
            self._rebalance_due = False
            target = set() if self._lost else self._broker._target(self)
            gone = self._assigned - target
            # Cooperative: a partition moves only once its previous owner has revoked it.
            owned = self._broker._owned_by_others(self)
            added = target - self._assigned - owned
            if (target - self._assigned) & owned:
                self._rebalance_due = True
                self._awaiting_release = True
            lost = self._lost
        if gone:
            parts = _tps(gone)
            callback = self._on_lost if lost else self._on_revoke
            if callback is not None:
                callback(self, parts)
            with self._broker.cond:
                self._assigned -= gone
                self._paused -= gone
                for tp in gone:
                    self._positions.pop(tp, None)
                self._broker._released(self.group_id)
        if added:
            with self._broker.cond:
                self._assigned |= added
            if self._on_assign is not None:
                self._on_assign(self, _tps(added))

    def assignment(self) -> list[TopicPartition]:
        with self._broker.cond:
            return _tps(self._assigned)

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Own exactly ``partitions`` outside any group, from their given offsets."""
        self._fault("assign")
        with self._broker.cond:
            self._assigned.clear()
            self._positions.clear()
            self._paused.clear()
        self.incremental_assign(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """Add ``partitions`` (group-less), each from its offset."""
        self._check_open()
        with self._broker.cond:
            if self._topics:
                raise KafkaException(KafkaError(KafkaError._STATE, "assign after subscribe"))
            self._manual = True
            for p in partitions:
                tp = (p.topic, p.partition)
                if tp not in self._broker._logs:
                    raise KafkaException(
                        KafkaError(KafkaError._UNKNOWN_PARTITION, f"unknown partition {tp}")
                    )
                self._assigned.add(tp)
                if p.offset == OFFSET_BEGINNING:
                    self._positions[tp] = self._broker._low.get(tp, 0)
                elif p.offset == OFFSET_END:
                    self._positions[tp] = len(self._broker._logs[tp])
                elif p.offset >= 0:
                    self._positions[tp] = p.offset
                else:
                    self._positions.pop(tp, None)
            self._broker.cond.notify_all()

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        """Drop ``partitions`` from a group-less assignment."""
        with self._broker.cond:
            for p in partitions:
                tp = (p.topic, p.partition)
                self._assigned.discard(tp)
                self._paused.discard(tp)
                self._positions.pop(tp, None)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata:
        """Metadata of ``topic`` (or every topic): partition counts and the cluster id; a
        missing topic carries ``UNKNOWN_TOPIC_OR_PART``, as a broker that does not auto-create
        topics answers."""
        self._fault("list_topics")
        meta = ClusterMetadata()
        meta.cluster_id = self._broker.cluster_id  # type: ignore[assignment]
        with self._broker.cond:
            names = [topic] if topic is not None else sorted(self._broker._partitions)
            for name in names:
                tmeta = TopicMetadata()
                tmeta.topic = name
                count = self._broker._partitions.get(name)
                if count is None:
                    tmeta.error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
                    count = 0
                for p in range(count):
                    pmeta = PartitionMetadata()
                    pmeta.id, pmeta.leader, pmeta.replicas, pmeta.isrs = p, 0, [0], [0]
                    tmeta.partitions[p] = pmeta
                meta.topics[name] = tmeta
        return meta

    # -- fetching ------------------------------------------------------------------------------
    def poll(self, timeout: float = -1) -> Message | None:
        msgs = self.consume(1, timeout)
        return msgs[0] if msgs else None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        self._fault("consume")
        self._check_open()
        deadline = time.monotonic() + (timeout if timeout >= 0 else 1e9)
        while True:
            self._rebalance()
            if self._fenced:
                if self._fatal_reported:
                    return []
                self._fatal_reported = True
                return [Message(topic="", error=_FENCED)]
            with self._broker.cond:
                out = self._fetch(num_messages)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if not self._rebalance_due or self._awaiting_release:
                    self._broker.cond.wait(remaining)

    def _fetch(self, limit: int) -> list[Message]:
        out: list[Message] = []
        tps = sorted(self._assigned - self._paused)
        if not tps:
            return out
        self._rr = (self._rr + 1) % len(tps)
        for tp in tps[self._rr :] + tps[: self._rr]:
            # records below the low watermark are gone: a fetch there resumes at the first kept
            position = max(self._position(tp), self._broker._low.get(tp, 0))
            log = self._broker._logs[tp]
            while len(out) < limit and position < len(log):
                rec = log[position]
                if self._read_committed and rec.txn is not None and rec.txn.state == "open":
                    break  # the last stable offset: nothing past it is readable yet
                position += 1
                if rec.control or (
                    self._read_committed and rec.txn is not None and rec.txn.state == "aborted"
                ):
                    continue
                out.append(_message(tp[0], tp[1], position - 1, rec))
            self._positions[tp] = position
        return out

    def _position(self, tp: TP) -> int:
        position = self._positions.get(tp)
        if position is None:
            committed = self._broker._group(self.group_id).offsets.get(tp)
            if committed is not None:
                position = committed
            elif self._reset == "earliest":
                position = self._broker._low.get(tp, 0)
            else:
                position = len(self._broker._logs[tp])
            self._positions[tp] = position
        return position

    # -- flow control and positions ------------------------------------------------------------
    def pause(self, partitions: list[TopicPartition]) -> None:
        with self._broker.cond:
            self._paused |= {(p.topic, p.partition) for p in partitions} & self._assigned

    def resume(self, partitions: list[TopicPartition]) -> None:
        with self._broker.cond:
            self._paused -= {(p.topic, p.partition) for p in partitions}
            self._broker.cond.notify_all()

    def seek(self, partition: TopicPartition) -> None:
        self._fault("seek")
        tp = (partition.topic, partition.partition)
        with self._broker.cond:
            if tp not in self._assigned:
                raise KafkaException(
                    KafkaError(KafkaError._STATE, f"seek on an unassigned partition {tp}")
                )
            self._positions[tp] = partition.offset

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        with self._broker.cond:
            return [
                TopicPartition(
                    p.topic,
                    p.partition,
                    self._positions.get((p.topic, p.partition), OFFSET_INVALID),
                )
                for p in partitions
            ]

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        if not cached:  # a cached answer involves no broker, so nothing to fail
            self._fault("get_watermark_offsets")
        topic, p = partition.topic, partition.partition
        high = (
            self._broker.stable_offset(topic, p)
            if self._read_committed
            else self._broker.end_offset(topic, p)
        )
        return self._broker.low_offset(topic, p), high

    # -- commits -------------------------------------------------------------------------------
    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]:
        self._fault("commit")
        self._check_open()
        if self._fenced:
            raise KafkaException(_FENCED)
        with self._broker.cond:
            group = self._broker._group(self.group_id)
            if self not in group.members:
                # The group no longer knows this member (a session timeout, say).
                raise KafkaException(
                    KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "commit by a member not in the group")
                )
            for p in offsets:
                group.offsets[(p.topic, p.partition)] = p.offset
            return [TopicPartition(p.topic, p.partition, p.offset) for p in offsets]

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        self._fault("committed")
        with self._broker.cond:
            offsets = self._broker._group(self.group_id).offsets
            return [
                TopicPartition(
                    p.topic, p.partition, offsets.get((p.topic, p.partition), OFFSET_INVALID)
                )
                for p in partitions
            ]

    def consumer_group_metadata(self) -> GroupMetadata:
        return GroupMetadata(self.group_id)

    def close(self) -> None:
        self._fault("close")
        if self._closed:
            return
        with self._broker.cond:
            assigned = _tps(self._assigned)
        # As librdkafka does on close: the assignment is revoked through the callback.
        if assigned and self._on_revoke is not None and not self._lost:
            self._on_revoke(self, assigned)
        with self._broker.cond:
            group = self._broker._group(self.group_id)
            if self in group.members:
                group.members.remove(self)
            self._assigned.clear()
            self._closed = True
            self._broker._membership_changed(group)
            self._broker._released(self.group_id)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Consumer closed")


@dataclass
class _Queued:
    topic: str
    partition: int
    record: _Record
    on_delivery: DeliveryCallback | None


class InMemoryProducer(_Faults):
    """An idempotent producer of an ``InMemoryBroker``, transactional with an id."""

    def __init__(self, broker: InMemoryBroker, config: dict[str, Any]) -> None:
        super().__init__()
        self._broker = broker
        self.transactional_id: str | None = config.get("transactional.id")
        self._max_queued = int(config.get("queue.buffering.max.messages", 100_000))
        self._queue: deque[_Queued] = deque()
        self._reports: deque[tuple[DeliveryCallback, KafkaError | None, Message]] = deque()
        self._delivery_failures: dict[str, deque[KafkaError]] = {}
        self._initialized = False
        self._fenced = False
        self._txn: _Txn | None = None
        self._txn_tps: set[TP] = set()
        self._txn_offsets: dict[str, dict[TP, int]] = {}
        #: the first failed delivery of the open transaction: its commit fails (abortable)
        self._txn_failure: KafkaError | None = None
        self._rr = 0

    def fail_delivery(self, topic: str, error: KafkaError, times: int = 1) -> None:
        """The next ``times`` deliveries to ``topic`` fail with ``error``."""
        self._delivery_failures.setdefault(topic, deque()).extend([error] * times)

    # -- producing -----------------------------------------------------------------------------
    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        callback: DeliveryCallback | None = None,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: HeadersArg = None,
    ) -> None:
        self._fault("produce")
        self._check_not_fenced()
        if self.transactional_id is not None and self._txn is None:
            raise KafkaException(KafkaError(KafkaError._STATE, "produce outside a transaction"))
        with self._broker.cond:
            count = self._broker._partitions.get(topic)
            if count is None:
                raise KafkaException(
                    KafkaError(KafkaError._UNKNOWN_TOPIC, f"unknown topic {topic}")
                )
            if len(self._queue) >= self._max_queued:
                raise BufferError("Local: Queue full")
            kb = _bytes(key)
            if partition < 0:
                if kb is not None:
                    partition = zlib.crc32(kb) % count
                else:
                    self._rr += 1
                    partition = self._rr % count
            hdrs = list(headers.items()) if isinstance(headers, dict) else headers
            rec = _Record(
                kb,
                _bytes(value),
                [(k, _bytes(v)) for k, v in hdrs] if hdrs else None,
                self._txn,
            )
            self._queue.append(_Queued(topic, partition, rec, on_delivery or callback))
            if self._txn is not None:
                self._txn_tps.add((topic, partition))

    def _deliver(self) -> None:
        """Hand every queued record to the broker; reports wait for ``poll``/``flush``."""
        with self._broker.cond:
            while self._queue:
                q = self._queue.popleft()
                failures = self._delivery_failures.get(q.topic)
                err = failures.popleft() if failures else None
                if err is None:
                    offset = self._broker._append((q.topic, q.partition), q.record)
                    msg = _message(q.topic, q.partition, offset, q.record)
                else:
                    msg = Message(topic=q.topic, partition=q.partition, value=q.record.value)
                    if q.record.txn is not None and self._txn_failure is None:
                        self._txn_failure = err
                if q.on_delivery is not None:
                    self._reports.append((q.on_delivery, err, msg))

    def _serve(self) -> int:
        served = 0
        while self._reports:
            cb, err, msg = self._reports.popleft()
            cb(err, msg)
            served += 1
        return served

    def poll(self, timeout: float = -1) -> int:
        self._fault("poll")
        self._deliver()
        return self._serve()

    def flush(self, timeout: float = -1) -> int:
        self._fault("flush")
        self._deliver()
        self._serve()
        return len(self._queue)

    # -- transactions --------------------------------------------------------------------------
    def init_transactions(self, timeout: float = -1) -> None:
        self._fault("init_transactions")
        if self.transactional_id is None:
            raise KafkaException(KafkaError(KafkaError._NOT_CONFIGURED, "no transactional.id"))
        with self._broker.cond:
            previous = self._broker._txn_owner.get(self.transactional_id)
            if previous is not None and previous is not self:
                # The coordinator bumps the epoch: the old producer is fenced and its
                # transaction aborted.
                previous._fenced = True
                if previous._txn is not None:
                    previous._end_txn("aborted")
            self._broker._txn_owner[self.transactional_id] = self
            self._initialized = True

    def begin_transaction(self) -> None:
        self._fault("begin_transaction")
        self._check_not_fenced()
        if not self._initialized:
            raise KafkaException(KafkaError(KafkaError._STATE, "init_transactions not called"))
        if self._txn is not None:
            raise KafkaException(KafkaError(KafkaError._STATE, "a transaction is open"))
        self._txn = _Txn()
        self._txn_tps = set()
        self._txn_offsets = {}

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1
    ) -> None:
        self._fault("send_offsets_to_transaction")
        self._check_not_fenced()
        if self._txn is None:
            raise KafkaException(KafkaError(KafkaError._STATE, "no open transaction"))
        if not isinstance(group_metadata, GroupMetadata):
            raise TypeError("group_metadata must come from consumer_group_metadata()")
        offsets = self._txn_offsets.setdefault(group_metadata.group_id, {})
        for p in positions:
            offsets[(p.topic, p.partition)] = p.offset

    def commit_transaction(self, timeout: float = -1) -> None:
        self._fault("commit_transaction")
        self._check_not_fenced()
        if self._txn is None:
            raise KafkaException(KafkaError(KafkaError._STATE, "no open transaction"))
        self._deliver()
        self._serve()
        failure = self._txn_failure
        if failure is not None:
            # as librdkafka: a record of the transaction that failed makes it abortable
            raise KafkaException(
                KafkaError(
                    failure.code(),
                    f"failed to produce a record of the transaction: {failure.str()}",
                    txn_requires_abort=True,
                )
            )
        self._end_txn("committed")

    def abort_transaction(self, timeout: float = -1) -> None:
        self._fault("abort_transaction")
        self._check_not_fenced()
        if self._txn is None:
            return
        # Queued records never reach the log; their reports say so, as librdkafka's purge does.
        with self._broker.cond:
            while self._queue:
                q = self._queue.popleft()
                if q.on_delivery is not None:
                    purged = KafkaError(KafkaError._PURGE_QUEUE, "purged by abort")
                    msg = Message(topic=q.topic, partition=q.partition, value=q.record.value)
                    self._reports.append((q.on_delivery, purged, msg))
        self._serve()
        self._end_txn("aborted")

    def _end_txn(self, state: Literal["committed", "aborted"]) -> None:
        with self._broker.cond:
            assert self._txn is not None
            self._txn.state = state
            for tp in sorted(self._txn_tps):
                # The transaction marker takes an offset of its own.
                self._broker._append(tp, _Record(None, None, None, self._txn, control=True))
            if state == "committed":
                for group_id, offsets in self._txn_offsets.items():
                    self._broker._group(group_id).offsets.update(offsets)
            self._txn = None
            self._txn_tps = set()
            self._txn_offsets = {}
            self._txn_failure = None
            self._broker.cond.notify_all()

    def _check_not_fenced(self) -> None:
        if self._fenced:
            raise KafkaException(
                KafkaError(
                    KafkaError._FENCED, "fenced by a newer producer with this id", fatal=True
                )
            )


def _tps(tps: set[TP]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t, p in sorted(tps)]


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
