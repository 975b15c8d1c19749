"""In-doubt markers: the in-memory twin, local (durable at once) and remote (durable at poll).

``KafkaInDoubtStore``, the production store, runs against a broker in
``tests/integration/test_notifier.py``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from libs.kafka import ProducerClient
from libs.kafka.memory import InMemoryBroker
from libs.tables import GlobalTable
from libs.tables.store import InMemoryStore
from services.notifier.core import AttemptMarker
from services.notifier.markers import (
    AttemptLog,
    InDoubtStore,
    InMemoryAttemptLog,
    KafkaInDoubtStore,
    decode_marker,
    encode_marker,
)

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.fixture
def markers() -> Iterator[AttemptLog]:
    log: AttemptLog = InMemoryAttemptLog()
    yield log
    log.close()


def test_put_get_delete(markers: AttemptLog) -> None:
    assert markers.get("m1") is None
    markers.put("m1", AttemptMarker("C1", 1, T0))
    markers.put("m1", AttemptMarker("C1", 2, T0))
    markers.put("m2", AttemptMarker("C2", 1, T0))
    assert markers.get("m1") == AttemptMarker("C1", 2, T0)
    assert len(markers) == 2
    markers.delete("m1")
    markers.delete("m1")
    markers.delete("never")
    assert markers.get("m1") is None
    assert len(markers) == 1


@pytest.fixture
def local_store() -> Iterator[InDoubtStore]:
    store: InDoubtStore = InMemoryAttemptLog()
    yield store
    store.close()


def test_a_local_store_is_ready_and_durable_at_once(local_store: InDoubtStore) -> None:
    tp = ("slack-messages", 0)
    local_store.assign([tp])
    assert local_store.ready(tp)
    durable: list[str] = []
    local_store.begin(tp, "m1", AttemptMarker("C1", 1, T0), lambda: durable.append("m1"))
    assert durable == ["m1"]  # before begin returned: the post may go now
    assert local_store.get("m1") == AttemptMarker("C1", 1, T0)
    local_store.revoke([tp])


def test_a_remote_store_is_durable_and_restored_only_at_poll() -> None:
    store = InMemoryAttemptLog(remote=True)
    tp = ("slack-messages", 0)
    store.assign([tp])
    assert not store.ready(tp)
    durable: list[str] = []
    store.begin(tp, "m1", AttemptMarker("C1", 1, T0), lambda: durable.append("m1"))
    assert durable == []
    store.poll()
    assert durable == ["m1"] and store.ready(tp)


# -- KafkaInDoubtStore on the in-memory broker ----------------------------------------------------


class _Rig:
    """A ``KafkaInDoubtStore`` over the in-memory broker, with a fake monotonic clock."""

    def __init__(self, tmp_path: Path, *, tombstones: bool = False) -> None:
        self.broker = InMemoryBroker()
        self.broker.create_topic(ATTEMPTS, 2)
        self.table: GlobalTable[AttemptMarker] = GlobalTable(
            name="in-doubt",
            topic=ATTEMPTS,
            state_dir=tmp_path,
            consumer_config={},
            decode=decode_marker,
            store=InMemoryStore(),
            consumer_factory=self.broker.consumer,
        )
        self.table.bootstrap(threading.Event())
        self.now = 100.0
        self.lookups: list[str] = []
        table_get = self.table.get

        def counted(key: str) -> AttemptMarker | None:
            self.lookups.append(key)
            return table_get(key)

        self.table.get = counted  # type: ignore[method-assign]
        self.writes: list[tuple[str, bool]] = []
        put_local = self.table.put_local

        def recorded(key: str, value: bytes | None) -> None:
            self.writes.append((key, value is None))
            put_local(key, value)

        self.table.put_local = recorded  # type: ignore[method-assign]
        self.markers = _Recording(self.broker.producer({}), timeout_s=5, transactional=False)
        self.tombstones = (
            _Recording(self.broker.producer({}), timeout_s=5, transactional=False)
            if tombstones
            else None
        )
        self.store = KafkaInDoubtStore(
            self.table,
            self.markers,
            tombstones=self.tombstones,
            table_poll_interval_s=0.1,
            monotonic=lambda: self.now,
        )

    def topic(self) -> list[tuple[str, bytes | None]]:
        return [(bytes(r.key() or b"").decode(), r.value()) for r in self.broker.records(ATTEMPTS)]

    def elsewhere(self, message_id: str) -> None:
        """A marker written by another replica (or an earlier run)."""
        p = self.broker.producer({})
        value = encode_marker(
            AttemptMarker("C1", 1, T0), message_id=message_id, tp=TP0, offset=7, started_at=T0
        )
        p.produce(ATTEMPTS, key=message_id.encode(), value=value)
        assert p.flush(1) == 0


class _Recording(ProducerClient):
    """A producer client that remembers the keys it was given (None values as tombstones)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.produced: list[tuple[str, bool]] = []

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, *a: Any, **k: Any
    ) -> None:
        self.produced.append((bytes(key or b"").decode(), value is None))
        super().produce(topic, key, value, *a, **k)


ATTEMPTS = "slack-message-attempts"
TP0 = ("slack-messages", 0)


def test_kafka_store_batches_the_tombstones_of_its_acknowledged_markers(tmp_path: Path) -> None:
    """A tombstone of a marker the broker acknowledged goes through the batching producer; one
    of a marker still unacknowledged follows it on the markers' producer, so it cannot land
    before its marker (which would leave the marker on the topic)."""
    rig = _Rig(tmp_path, tombstones=True)
    assert rig.tombstones is not None
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()  # m1 acknowledged
    rig.store.begin(TP0, "m2", AttemptMarker("C1", 1, T0), lambda: None, 4)
    rig.store.delete("m1")
    rig.store.delete("m2")  # not acknowledged yet (an early marker cancelled on revoke)
    assert rig.markers.produced == [("m1", False), ("m2", False), ("m2", True)]
    assert rig.tombstones.produced == [("m1", True)]
    rig.store.poll()
    assert sorted(k for k, v in rig.topic() if v is None) == ["m1", "m2"]
    assert rig.store.get("m1") is None and rig.store.get("m2") is None


def test_kafka_store_tombstones_its_own_markers_without_a_lookup(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    durable: list[str] = []
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: durable.append("m1"), 3)
    rig.store.poll()
    assert durable == ["m1"] and rig.store.get("m1") == AttemptMarker("C1", 1, T0)
    rig.lookups.clear()
    rig.store.delete("m1")
    assert rig.lookups == []  # known as its own: no store read, no JSON decode
    assert rig.store.get("m1") is None
    rig.store.delete("m1")  # a second delete (a skipped replay) looks it up and writes nothing
    rig.store.poll()
    assert [k for k, v in rig.topic() if v is None] == ["m1"]


def test_kafka_store_clears_markers_of_earlier_runs_and_ignores_unknown_ids(
    tmp_path: Path,
) -> None:
    rig = _Rig(tmp_path)
    rig.elsewhere("m2")
    rig.now += 1.0
    rig.store.poll()
    assert rig.store.get("m2") == AttemptMarker("C1", 1, T0)
    rig.store.delete("m2")
    rig.store.delete("never")
    rig.store.poll()
    assert [k for k, v in rig.topic() if v is None] == ["m2"]
    assert rig.store.get("m2") is None


def test_kafka_store_reads_its_table_on_an_interval_and_on_every_poll_while_gated(
    tmp_path: Path,
) -> None:
    rig = _Rig(tmp_path)
    rig.store.poll()  # the first poll reads
    rig.elsewhere("m3")
    rig.store.poll()
    assert rig.store.get("m3") is None  # within the interval: not read yet
    rig.now += 0.2
    rig.store.poll()
    assert rig.store.get("m3") is not None
    # an assignment gates the partition: the table is read on every poll until it opens
    rig.store.assign([TP0])
    rig.elsewhere("m4")  # written before the snapshot: the partition waits for it
    rig.store.poll()  # takes the snapshot of the high watermarks, and reads at once
    assert rig.store.get("m4") is not None
    # the gate opens at the next poll even if no message of the partition asks (``ready``);
    # from then on the table is read on the interval again
    rig.store.poll()
    rig.elsewhere("m5")
    rig.store.poll()
    assert rig.store.get("m5") is None
    assert rig.store.ready(TP0)


def test_kafka_store_answers_its_acknowledged_markers_without_writing_them_through(
    tmp_path: Path,
) -> None:
    """Its own markers are answered from memory until the table reads them back: no store
    write per marker; the tombstone still hides a marker the table may have read already."""
    rig = _Rig(tmp_path)
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    assert rig.store.get("m1") is None  # not acknowledged yet: not in doubt for anyone
    rig.store.poll()
    assert rig.store.get("m1") == AttemptMarker("C1", 1, T0)
    assert rig.writes == []
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 2, T0), lambda: None, 3)  # a retry
    assert rig.store.get("m1") == AttemptMarker("C1", 1, T0)  # the durable one until acked
    rig.store.poll()
    assert rig.store.get("m1") == AttemptMarker("C1", 2, T0)
    rig.now += 1.0
    rig.store.poll()  # the table reads both back
    rig.store.delete("m1")
    assert rig.writes == []  # hidden from memory until the tombstone is read
    assert rig.store.get("m1") is None


def test_kafka_store_skips_hiding_a_marker_its_table_has_not_read(tmp_path: Path) -> None:
    """The receipt usually comes before the table reads its marker back: then there is
    nothing in the table to hide, and the tombstone goes without a store write."""
    rig = _Rig(tmp_path)
    rig.store.poll()  # the table's read of this interval: the marker below is not read back
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    assert rig.store.get("m1") == AttemptMarker("C1", 1, T0)  # from memory
    rig.lookups.clear()
    rig.store.delete("m1")
    assert rig.writes == []
    assert rig.lookups == ["m1"]  # a miss (no decode) tells the table holds no marker of it
    assert rig.markers.produced == [("m1", False), ("m1", True)]
    assert rig.store.get("m1") is None
    rig.now += 1.0
    rig.store.poll()  # marker and tombstone read back together
    assert rig.store.get("m1") is None


def test_kafka_store_still_hides_a_marker_its_table_has_read(tmp_path: Path) -> None:
    """A marker the table read back before its receipt came must be hidden at once: its
    tombstone takes a while (linger, fetch, the table's interval), and a replay (or an update
    of the message) would meanwhile take it for a post in doubt."""
    rig = _Rig(tmp_path)
    rig.store.poll()
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    rig.now += 1.0
    rig.store.poll()  # the table reads the marker back
    rig.lookups.clear()
    rig.store.delete("m1")
    assert rig.lookups == []  # the table's position says it has read it: no lookup
    assert rig.store.get("m1") is None  # before the table has read the tombstone
    rig.store.delete("m1")  # a skipped replay: the tombstone is on its way, no second one
    assert [k for k, tomb in rig.markers.produced if tomb] == ["m1"]


def test_kafka_store_hides_a_marker_its_table_has_read_without_a_store_write(
    tmp_path: Path,
) -> None:
    """The hide of a marker the table has read back is answered from memory, not written
    into the store (a write and its WAL append per message at 100 channels, where most
    markers are begun ahead and read back before their receipt), and only until the table
    applies the next record of the key: then the table's answers count again."""
    rig = _Rig(tmp_path)
    rig.store.poll()
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    rig.now += 1.0
    rig.store.poll()  # the table reads the marker back
    rig.store.delete("m1")
    assert rig.writes == []
    assert rig.store.get("m1") is None
    rig.now += 1.0
    rig.store.poll()  # the table reads the tombstone
    assert rig.table.get("m1") is None and rig.store.get("m1") is None
    # a marker of the message written later (another replica's) is the table's answer
    rig.elsewhere("m1")
    rig.now += 1.0
    rig.store.poll()
    assert rig.store.get("m1") == AttemptMarker("C1", 1, T0)
    # and the tombstone and a later marker read in one batch: the later marker counts
    rig.store.begin(TP0, "m2", AttemptMarker("C1", 1, T0), lambda: None, 4)
    rig.store.poll()
    rig.now += 1.0
    rig.store.poll()
    rig.store.delete("m2")
    rig.store.poll()  # the tombstone is written (the table is not read: within the interval)
    rig.elsewhere("m2")
    assert rig.store.get("m2") is None
    rig.now += 1.0
    rig.store.poll()
    assert rig.store.get("m2") == AttemptMarker("C1", 1, T0)
    assert rig.writes == []


def test_a_marker_put_after_a_hidden_delete_is_answered(tmp_path: Path) -> None:
    """``put`` writes its marker into the store: a hide left from memory does not cover it."""
    rig = _Rig(tmp_path)
    rig.store.poll()
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    rig.now += 1.0
    rig.store.poll()  # the table reads the marker back
    rig.store.delete("m1")
    rig.store.put("m1", AttemptMarker("C1", 5, T0))
    assert rig.store.get("m1") == AttemptMarker("C1", 5, T0)


def test_kafka_store_hides_an_earlier_marker_of_the_message_its_table_holds(
    tmp_path: Path,
) -> None:
    """The table may hold an earlier marker of the message (an earlier attempt, run or
    replica) while it has not read this one: the lookup finds it and it is hidden."""
    rig = _Rig(tmp_path)
    rig.store.poll()
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    rig.now += 1.0
    rig.store.poll()  # the table reads the first attempt's marker back
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 2, T0), lambda: None, 3)  # a retry
    rig.store.poll()  # acknowledged, not read back (within the interval)
    rig.store.delete("m1")
    assert rig.writes == [("m1", True)]
    assert rig.store.get("m1") is None
    # one another replica wrote after this process's own: read with it (the position says)
    rig.store.begin(TP0, "m2", AttemptMarker("C1", 1, T0), lambda: None, 4)
    rig.store.poll()
    rig.elsewhere("m2")
    rig.now += 1.0
    rig.store.poll()
    rig.store.delete("m2")
    assert rig.writes == [("m1", True)]  # m2 hidden from memory: the tombstone is next
    assert rig.store.get("m2") is None


def test_kafka_store_leaves_the_markers_of_a_revoked_partition_to_its_table(
    tmp_path: Path,
) -> None:
    """Once the partition is revoked, its markers are answered by the table (what every
    replica reads), not from this replica's memory."""
    rig = _Rig(tmp_path)
    rig.store.begin(TP0, "m1", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.begin(("slack-messages", 1), "m2", AttemptMarker("C1", 1, T0), lambda: None, 3)
    rig.store.poll()
    rig.store.revoke([TP0])
    rig.lookups.clear()
    assert rig.store.get("m1") == AttemptMarker("C1", 1, T0)  # read back by the table
    assert rig.store.get("m2") == AttemptMarker("C1", 1, T0)
    assert rig.lookups == ["m1"]


@pytest.mark.parametrize(
    ("message_id", "channel", "tp", "offset"),
    [
        ("m1", "C1", ("slack-messages", 0), 7),
        ('quote " and \\ back', "U\u00e9\u2603\U0001f600", ("t\n", 12), None),
        ("", "C\t1", ("slack-messages", 2), 0),
    ],
)
def test_a_marker_is_the_json_text_of_its_fields(
    message_id: str, channel: str, tp: tuple[str, int], offset: int | None
) -> None:
    """The marker written out directly is exactly ``json.dumps`` of its fields (what it was
    before: operators and other replicas read the same bytes)."""
    first = datetime(2026, 11, 25, 9, 0, 0, 123456, tzinfo=UTC)
    started = datetime(2026, 11, 25, 9, 0, 1, tzinfo=UTC)
    raw = encode_marker(
        AttemptMarker(channel, 3, first),
        message_id=message_id,
        tp=tp,
        offset=offset,
        started_at=started,
    )
    assert (
        raw
        == json.dumps(
            {
                "message_id": message_id,
                "channel": channel,
                "attempts": 3,
                "first_attempt_at": first.isoformat(),
                "started_at": started.isoformat(),
                "topic": tp[0],
                "partition": tp[1],
                "offset": offset,
            }
        ).encode()
    )
    assert decode_marker(raw, "t", 0, 0) == AttemptMarker(channel, 3, first)
