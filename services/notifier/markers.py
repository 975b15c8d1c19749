"""In-doubt markers: "a post of this message was started", shared by every replica in Kafka.

Why markers
-----------
Before every ``chat.postMessage`` the loop records a marker for the message (channel, attempts
so far, time of the first attempt, where the message sits in ``slack-messages``) and makes
the call only once the marker is durable; it clears the marker once the message's receipt is
acknowledged by Kafka. A marker found when a message is consumed again means a previous owner
died (or lost the partition) between starting a post and recording its outcome, so the post
is *in doubt*: the channel's history is checked for the message id (Slack message metadata)
before anything is posted again.

Why a marker, and not "check the history of every message without a receipt after a takeover":
``conversations.history`` is a Tier 3 method (about 50 calls a minute), far below what posting
at one message per second per channel needs, so history checks must be the exception. With the
marker only the few messages whose post was actually started without a recorded outcome pay for
a check; everything else is posted straight away.

Where markers live: ``KafkaInDoubtStore``
-----------------------------------------
A marker on the local disk of the replica that made the post is lost with that replica: the
replica that takes its partitions over, or the same pod restarted on an empty volume, posted
the in-flight messages a second time. So markers live in a compacted topic
(``slack-message-attempts``, ``TOPIC_SLACK_MESSAGE_ATTEMPTS``) keyed by ``message_id``:

* ``begin``: the marker (JSON) is produced by an idempotent producer with ``acks=all``, and
  ``on_durable`` (which makes the Slack call) runs from its delivery report, served on the
  loop's thread by ``poll()``. One acknowledged produce per post, a few milliseconds against
  Slack's one post per second per channel: the hot path stays cheap, and no post is made
  whose marker the next owner could miss;
* ``delete``: a tombstone, fire-and-forget, only for a marker the table holds (a skipped
  replay writes nothing). A leftover marker costs one history check, never a duplicate post;
  nothing waits for a tombstone, so those of acknowledged markers go through a second,
  batching producer (``tombstones``), not as a produce request each;
* reading: every replica follows the whole topic as a ``GlobalTable`` (its local RocksDB is a
  cache, resumed from its stored offsets and rebuilt from the topic when the volume is
  lost). Markers are few (one per post in flight, plus tombstones until compaction), so
  following all partitions costs next to nothing, and a marker may land on any partition:
  the key, not the input partition, places it;
* the gate: ``assign`` gates the partition on a snapshot of the topic's high watermarks
  (``services.notifier.gate``) and ``ready(tp)`` stays False until the table's positions
  reach them. A marker acknowledged
  before the partition moved is below that snapshot, so the new owner sees it before it
  starts any message of the partition;
* retention: tombstones keep the topic small; markers whose tombstone never came (the process
  died between the receipt's acknowledgement and the tombstone, and the message was
  committed) expire with the topic's ``retention.ms`` (``cleanup.policy=compact,delete``,
  ``NOTIFIER_MARKER_RETENTION_H``).

What it does not cover: a zombie, a replica that lost its partitions without noticing
(a network partition longer than the session timeout), can still start a post after the new
owner's snapshot; nothing without fencing the producer covers that, and the window is one
post per channel at most.

``InMemoryAttemptLog`` (unit tests) implements the same port.

The port
--------
``AttemptLog`` is the store; ``InDoubtStore`` is the store as the sink loop uses it:

* markers are scoped by the *input* partition: ``assign``/``revoke`` follow the consumer's
  rebalances, and ``ready(tp)`` is False while the markers of a newly assigned partition are
  still being read; the loop starts no message of that partition before;
* a marker must be durable *before* its post: ``begin`` takes ``on_durable`` and the loop
  makes the Slack call only from it;
* ``delete`` stays fire-and-forget.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _string
from typing import Protocol

from confluent_kafka import Message

from libs.kafka import ProducerClient
from libs.serde import DeserializationError
from libs.tables import GlobalTable
from services.notifier.core import AttemptMarker
from services.notifier.gate import PartitionGate

log = logging.getLogger(__name__)

#: an input partition: (topic, partition)
TP = tuple[str, int]


class AttemptLog(Protocol):
    """Where markers live."""

    def get(self, message_id: str) -> AttemptMarker | None:
        """The marker of ``message_id``, if a post of it was started and not settled."""
        ...

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        """Record (durably against a process kill) that a post is about to be made."""
        ...

    def delete(self, message_id: str) -> None:
        """Forget the marker once the receipt is acknowledged."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """Release the store."""
        ...


class InDoubtStore(AttemptLog, Protocol):
    """The markers as the sink loop uses them: per input partition, durable asynchronously.

    See "The port, and where it goes next" in the module docstring.
    """

    def assign(self, tps: Iterable[TP]) -> None:
        """The loop owns ``tps`` now: make their markers available (restore them)."""
        ...

    def ready(self, tp: TP) -> bool:
        """True once every marker of ``tp`` is readable with ``get``."""
        ...

    def revoke(self, tps: Iterable[TP]) -> None:
        """The loop no longer owns ``tps`` (revoked or lost)."""
        ...

    def begin(
        self,
        tp: TP,
        message_id: str,
        marker: AttemptMarker,
        on_durable: Callable[[], None],
        offset: int | None = None,
    ) -> None:
        """Record a post of the message at ``tp``/``offset`` about to be made.

        ``on_durable()`` runs once the marker would survive (this process, or this replica).
        """
        ...

    def poll(self) -> None:
        """Serve restores and acknowledgements (on the loop's thread; never blocks)."""
        ...

    def awaiting(self) -> int:
        """How many begun markers are not durable yet (their ``on_durable`` has not run)."""
        ...

    def wait_durable(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for acknowledgements, running their ``on_durable``.

        On the loop's thread, like ``poll``; returns early once an acknowledgement was served.
        """
        ...


def _encode(marker: AttemptMarker) -> bytes:
    return json.dumps(
        {
            "channel": marker.channel,
            "attempts": marker.attempts,
            "first_attempt_at": marker.first_attempt_at.isoformat(),
        }
    ).encode()


def encode_marker(
    marker: AttemptMarker,
    *,
    message_id: str,
    tp: TP,
    offset: int | None,
    started_at: datetime,
) -> bytes:
    """A marker as the attempts topic carries it (JSON; ``decode_marker`` reads it back).

    Besides what the core needs, it names the message (``message_id``, its topic, partition
    and offset in ``slack-messages``) and when this attempt started, for an operator
    reading the topic.

    The text is what ``json.dumps`` gives for that object, written out directly: one marker
    per post, and ``json.dumps`` of a dict (its encoder's generic walk over the items) cost
    five times as much on the loop's thread.
    """
    return (
        f'{{"message_id": {_string(message_id)}, "channel": {_string(marker.channel)}, '
        f'"attempts": {int(marker.attempts)}, '
        f'"first_attempt_at": {_string(marker.first_attempt_at.isoformat())}, '
        f'"started_at": {_string(started_at.isoformat())}, '
        f'"topic": {_string(tp[0])}, "partition": {int(tp[1])}, '
        f'"offset": {"null" if offset is None else int(offset)}}}'
    ).encode()


def decode_marker(raw: bytes, topic: str, partition: int, offset: int) -> AttemptMarker:
    """A marker from the attempts topic (a ``GlobalTable`` decoder: ``DeserializationError``)."""
    try:
        return _decode(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise DeserializationError(
            f"not an in-doubt marker: {exc}", topic=topic, partition=partition, offset=offset
        ) from exc


def _decode(raw: bytes) -> AttemptMarker:
    data = json.loads(raw)
    return AttemptMarker(
        channel=str(data["channel"]),
        attempts=int(data["attempts"]),
        first_attempt_at=datetime.fromisoformat(str(data["first_attempt_at"])),
    )


class InMemoryAttemptLog:
    """A dict-backed ``InDoubtStore`` for unit tests.

    ``remote=True`` behaves as a store in Kafka would: a marker becomes durable (and
    ``on_durable`` runs) only at the next ``poll()``, and an assigned partition is ``ready``
    only after a ``poll()`` (or, with ``hold_restores``, once ``restored(tp)`` is called).
    """

    def __init__(self, *, remote: bool = False, hold_restores: bool = False) -> None:
        self.markers: dict[str, AttemptMarker] = {}
        self.remote = remote
        self.hold_restores = hold_restores
        self.durable: set[str] = set()
        self._waiting: list[tuple[str, Callable[[], None]]] = []
        self._restoring: set[TP] = set()

    def assign(self, tps: Iterable[TP]) -> None:
        if self.remote:
            self._restoring.update(tps)

    def ready(self, tp: TP) -> bool:
        return tp not in self._restoring

    def restored(self, tp: TP) -> None:
        """The markers of ``tp`` are all read (remote mode)."""
        self._restoring.discard(tp)

    def revoke(self, tps: Iterable[TP]) -> None:
        self._restoring.difference_update(tps)

    def begin(
        self,
        tp: TP,
        message_id: str,
        marker: AttemptMarker,
        on_durable: Callable[[], None],
        offset: int | None = None,
    ) -> None:
        self.markers[message_id] = marker
        if not self.remote:
            self.durable.add(message_id)
            on_durable()
        else:
            self._waiting.append((message_id, on_durable))

    def poll(self) -> None:
        if not self.hold_restores:
            self._restoring.clear()
        self.wait_durable(0.0)

    def awaiting(self) -> int:
        return len(self._waiting)

    def wait_durable(self, timeout_s: float) -> None:
        waiting, self._waiting = self._waiting, []
        for message_id, on_durable in waiting:
            self.durable.add(message_id)
            on_durable()

    def get(self, message_id: str) -> AttemptMarker | None:
        return self.markers.get(message_id)

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        self.markers[message_id] = marker

    def delete(self, message_id: str) -> None:
        self.markers.pop(message_id, None)

    def __len__(self) -> int:
        return len(self.markers)

    def close(self) -> None:
        pass


class KafkaInDoubtStore:
    """Markers in a compacted topic that every replica follows (module docstring).

    ``table`` follows the attempts topic (``decode_marker``), bootstrapped by the caller;
    ``producer`` is idempotent with ``acks=all``. The store closes both.
    """

    def __init__(
        self,
        table: GlobalTable[AttemptMarker],
        producer: ProducerClient,
        *,
        tombstones: ProducerClient | None = None,
        gate_timeout_s: float = 5.0,
        table_poll_interval_s: float = 0.1,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self._producer = producer
        self._tombstones = tombstones or producer
        self._topic = table.topic
        self._gate = PartitionGate(
            table, name=table.name, timeout_s=gate_timeout_s, monotonic=monotonic
        )
        self._now = wall_clock
        self._mono = monotonic
        self._table_poll_interval_s = table_poll_interval_s
        self._last_table_poll = -table_poll_interval_s
        self._awaiting = 0
        # markers this process began and has not deleted (the latest begin of each): their
        # tombstone needs no lookup
        self._mine: dict[str, _Begun] = {}
        # Read-your-own-write: the acknowledged ones among them, answered by ``get`` before
        # the table has read them back. Kept here rather than written through to the table
        # (a store write per message); the table applies them when it reads them back.
        self._durable: dict[str, AttemptMarker] = {}
        # The table's positions as of its last read here (``delete``): behind the table's own
        # at worst (the gate's checks move them too), which only costs a lookup.
        self._positions: dict[int, int] = {}
        # Keys of this process's markers that the table had read back when they were deleted,
        # answered as absent until the table applies a later record of the key (the
        # tombstone): the hide, without a store write per message (``delete``).
        self._hidden: set[bytes] = set()
        table.on_change = self._applied

    # -- InDoubtStore ------------------------------------------------------------------------
    def assign(self, tps: Iterable[TP]) -> None:
        self._gate.close(tps)

    def ready(self, tp: TP) -> bool:
        return self._gate.is_open(tp)

    def revoke(self, tps: Iterable[TP]) -> None:
        revoked = set(tps)
        self._gate.forget(revoked)
        # What this replica knew of its markers there is the table's business again: they are
        # on the topic (acknowledged), and a new assignment reads the table up to its gate.
        # (Kept, a retried post's marker of a partition gone for good stayed here forever.)
        for message_id, begun in self._mine.items():
            if begun.tp in revoked:
                self._durable.pop(message_id, None)

    def begin(
        self,
        tp: TP,
        message_id: str,
        marker: AttemptMarker,
        on_durable: Callable[[], None],
        offset: int | None = None,
    ) -> None:
        value = encode_marker(
            marker, message_id=message_id, tp=tp, offset=offset, started_at=self._now()
        )

        begun = _Begun(tp)

        def acked(msg: Message) -> None:
            self._awaiting -= 1
            if self._mine.get(message_id) is begun:
                begun.durable = True
                # where it landed: ``delete`` knows from it whether the table has read it
                partition, offset = msg.partition(), msg.offset()
                if partition is not None and offset is not None:  # always, once acknowledged
                    begun.landed = (partition, offset)
                # A replay of the message on this replica must find it even before the table
                # has fetched it back. (Not when it was deleted while being written: its
                # tombstone follows it on the topic.)
                self._durable[message_id] = marker
            on_durable()

        self._producer.produce(self._topic, message_id.encode(), value, on_delivered=acked)
        self._mine[message_id] = begun
        self._awaiting += 1

    def poll(self) -> None:
        self._producer.poll()
        # A marker that cannot be written leaves its post unstarted for good: stop (exit 1)
        # rather than stall the channel; the restart (or the next owner) posts it.
        self._producer.check_delivery(
            "; the posts waiting for them were not made and are replayed after the restart"
        )
        if self._tombstones is not self._producer:
            self._tombstones.poll()
            # a broker refusing writes: stop as for a marker (a leftover marker itself would
            # only cost a history check)
            self._tombstones.check_delivery("; their markers stay until retention")
        self._gate.poll()
        # The table only matters for what other replicas wrote, i.e. at an assignment (the
        # gate): this process's own markers and tombstones are known already (``_durable``,
        # put_local).
        # Read on every turn, it applied one record per poll with a store write and a lag
        # update each; on an interval, a batch per write.
        now = self._mono()
        if self._gate.waiting or now - self._last_table_poll >= self._table_poll_interval_s:
            self._last_table_poll = now
            while self._table.poll(max_records=1000) >= 1000:
                pass
            self._positions = self._table.positions()

    def awaiting(self) -> int:
        return self._awaiting

    def wait_durable(self, timeout_s: float) -> None:
        # librdkafka returns from the poll as soon as it served a delivery report
        self._producer.poll(timeout_s)

    # -- AttemptLog --------------------------------------------------------------------------
    def get(self, message_id: str) -> AttemptMarker | None:
        mine = self._durable.get(message_id)
        if mine is not None:
            return mine
        if self._hidden and message_id.encode() in self._hidden:
            return None  # deleted; the table has not read the tombstone yet
        return self._table.get(message_id)

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        """Write a marker without waiting for it (``begin`` is the durable way)."""
        value = _encode(marker)
        self._producer.produce(self._topic, message_id.encode(), value)
        self._table.put_local(message_id, value)
        self._hidden.discard(message_id.encode())  # the store's answer is this one now

    def delete(self, message_id: str) -> None:
        # Its own markers need no lookup to know a tombstone is due (a lookup of a marker the
        # table holds is a store read and a JSON decode); the table is asked only about
        # markers of earlier runs or other replicas.
        begun = self._mine.pop(message_id, None)
        self._durable.pop(message_id, None)
        key = message_id.encode()
        if begun is None and (key in self._hidden or self._table.get(message_id) is None):
            return  # nothing to clear: no tombstone for every skipped replay
        # The tombstone must land after its marker. A marker this process saw acknowledged
        # is on the topic: its tombstone goes with the batching producer (a request of its
        # own per tombstone on the markers' producer, linger.ms=0, was half of that
        # producer's work). Any other one follows its marker on the markers' producer, whose
        # idempotence keeps the order within the partition.
        producer = self._tombstones if begun is not None and begun.durable else self._producer
        producer.produce(self._topic, key, None)
        # The table may have read the marker back already, and the tombstone takes a while
        # (its linger, the table's fetch and poll interval): hide the marker until then.
        if begun is not None and self._read_back(begun):
            # Every later record of the key lands after this marker, which the table has
            # applied: the next one it applies is the tombstone (or newer), and from then on
            # the table's answer is right. Until then ``get`` answers from here. (At 100
            # channels most markers are read back before their receipt, begun ahead of their
            # turn: this was a store write and its WAL append per message.)
            self._hidden.add(key)
        elif begun is None or self._table.get(message_id) is not None:
            # Whatever else the table holds, a lookup sees (a marker of an earlier attempt, run
            # or replica, or this one read back before its acknowledgement came): the next
            # record of the key the table applies may be this process's marker rather than
            # the tombstone, so the hide goes into the store, which reading the marker back
            # overwrites as it did (and the tombstone right behind it clears).
            self._table.put_local(message_id, None)

    def _applied(self, keys: list[bytes]) -> None:
        """The table applied records of ``keys`` (its ``on_change``): no longer hidden."""
        if self._hidden:
            self._hidden.difference_update(keys)

    def _read_back(self, begun: _Begun) -> bool:
        """Whether the table has applied this process's marker ``begun``.

        Its position in the marker's partition is past the marker's acknowledged offset.
        Mostly it has not by the time the receipt is acknowledged (the table is read every
        ``table_poll_interval_s``, its fetches held by the broker): then the hide changes
        nothing a lookup can see, unless the table holds another marker of the key, which the
        lookup in ``delete`` finds (a miss costs less than the store write, ~1.3 against ~3
        us). A marker without an offset yet (a fetch can return a record before its producer
        hears of the acknowledgement) is left to that lookup too.
        """
        landed = begun.landed
        return landed is not None and self._positions.get(landed[0], 0) > landed[1]

    def __len__(self) -> int:
        return self._table.record_count()

    def close(self) -> None:
        try:
            # flushes the tombstones (bounded); one lost costs a history check, not a post
            producers = [self._producer]
            if self._tombstones is not self._producer:
                producers.append(self._tombstones)
            for producer in producers:
                for problem in producer.close(10.0):
                    log.error(problem)
        finally:
            self._table.close()


@dataclass(eq=False)
class _Begun:
    """A marker this process began (for a message of ``tp``); ``durable`` once acknowledged."""

    tp: TP
    durable: bool = False
    #: (partition, offset) where the attempts topic stored it, once acknowledged
    landed: tuple[int, int] | None = None
