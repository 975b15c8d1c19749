"""The state store pieces on their own: overlay over RocksDB, the local store's healing, and
the restore from a changelog on the in-memory broker (positions, low watermark, recreated
topics, open transactions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from rocksdict import Cache

from libs.kafka.memory import InMemoryBroker
from libs.state import KeyValueState, MemoryState
from libs.state.changelog import changelog_specs, changelog_topic
from libs.state.errors import RestoreStalledError, StateError
from libs.state.local import LocalStore
from libs.state.partition import PartitionState
from libs.state.stores import StateStores

pytestmark = pytest.mark.timeout(60)

IN, GROUP = "in", "g"
CHANGELOG = changelog_topic(GROUP, IN)


def local(path: Path, partition: int = 0) -> LocalStore:
    store = LocalStore(path, store="t", changelog=(CHANGELOG, partition))
    store.open()
    return store


# -- overlay over the committed store -----------------------------------------------------------
def test_reads_see_writes_and_deletes(tmp_path: Path) -> None:
    st = PartitionState(local(tmp_path / "s"))
    st.local.write([(b"a", b"1"), (b"b", b"2")], 10)
    st.put(b"a", b"one")
    st.delete(b"b")
    st.put(b"c", b"3")
    assert (st.get(b"a"), st.get(b"b"), st.get(b"c"), st.get(b"d")) == (b"one", None, b"3", None)
    assert st.dirty and sorted(st.entries()) == [(b"a", b"one"), (b"b", None), (b"c", b"3")]


def test_prefix_merges_overlay_and_store_in_key_order(tmp_path: Path) -> None:
    st = PartitionState(local(tmp_path / "s"))
    st.local.write(
        [(b"p/1", b"s1"), (b"p/3", b"s3"), (b"p/5", b"s5"), (b"q/1", b"x"), (b"o/9", b"x")], 1
    )
    st.put(b"p/2", b"o2")  # between committed keys
    st.put(b"p/3", b"o3")  # overrides a committed key
    st.delete(b"p/5")  # hides a committed key
    st.put(b"p/9", b"o9")  # after every committed key
    st.delete(b"p/7")  # deleting an absent key shows nothing
    assert list(st.prefix(b"p/")) == [(b"p/1", b"s1"), (b"p/2", b"o2"), (b"p/3", b"o3"),
                                      (b"p/9", b"o9")]  # fmt: skip
    assert list(st.prefix(b"z")) == []


def test_prefix_behaves_like_the_memory_twin(tmp_path: Path) -> None:
    """The same operations on both implementations give the same answers (the contract)."""
    twin = MemoryState()
    st = PartitionState(local(tmp_path / "s"))
    ops: list[tuple[str, bytes, bytes]] = [
        ("put", b"k/1", b"a"), ("put", b"k/2", b"b"), ("commit", b"", b""),
        ("delete", b"k/1", b""), ("put", b"k/0", b"c"), ("put", b"k/2", b"d"),
        ("commit", b"", b""), ("put", b"k/3", b"e"), ("delete", b"k/0", b""),
    ]  # fmt: skip
    states: list[KeyValueState] = [twin, st]
    for op, key, value in ops:
        if op == "commit":
            st.commit(None)
            continue
        for s in states:
            if op == "put":
                s.put(key, value)
            else:
                s.delete(key)
    assert list(st.prefix(b"k/")) == list(twin.prefix(b"k/"))
    # writing while iterating is allowed (the overlay is a snapshot)
    for key, _ in st.prefix(b"k/"):
        st.delete(key)
    assert list(st.prefix(b"k/")) == []


def test_commit_persists_and_discard_drops(tmp_path: Path) -> None:
    path = tmp_path / "s"
    st = PartitionState(local(path))
    st.put(b"a", b"1")
    st.commit(7)
    st.put(b"b", b"2")
    st.discard()
    st.local.close()
    reopened = local(path)
    assert reopened.position == 7
    assert (reopened.get(b"a"), reopened.get(b"b")) == (b"1", None)


def test_corrupt_store_is_wiped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = local(path)
    store.write([(b"a", b"1")], 3)
    store.close()
    for f in path.glob("CURRENT"):
        f.write_text("garbage\n")
    reopened = local(path)
    assert reopened.position is None and reopened.get(b"a") is None


def test_store_of_another_changelog_is_wiped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = local(path, partition=0)
    store.write([(b"a", b"1")], 3)
    store.close()
    other = local(path, partition=1)
    assert other.position is None and other.get(b"a") is None


def test_a_reopened_store_keeps_the_shared_cache_and_its_bloom_filter(tmp_path: Path) -> None:
    # most state lookups miss (a new alert group): the filters must answer them after a
    # restart or a revoke too, and every partition's store must read through the loop's cache
    cache = Cache(4 * 1024 * 1024)
    path = tmp_path / "s"
    for _ in range(2):  # created, then reopened
        store = LocalStore(path, store="t", changelog=(CHANGELOG, 0), cache=cache)
        store.open()
        store.write([(f"k{j:05d}".encode(), b"v" * 100) for j in range(0, 20_000, 2)], 7)
        store.close()
    store = LocalStore(path, store="t", changelog=(CHANGELOG, 0), cache=cache)
    store.open()
    db = store._require()
    assert db.property_int_value("rocksdb.block-cache-capacity") == 4 * 1024 * 1024
    before = db.property_int_value("rocksdb.block-cache-usage") or 0
    assert cache.get_usage() == before  # the same cache
    # 1,000 absent keys in two files: only the filters' false positives (~1 %) read a 4 KB
    # data block; without filters each lookup reads one of each file (~2 MB in all)
    assert all(store.get(f"k{j:05d}".encode()) is None for j in range(1, 20_000, 20))
    assert (db.property_int_value("rocksdb.block-cache-usage") or 0) - before < 100 * 4096
    store.close()


def test_changelog_specs() -> None:
    specs = changelog_specs("grp", {"b": 6, "a": 3}, replication_factor=3)
    assert [(s.name, s.partitions, s.compacted) for s in specs] == [
        ("grp-a-changelog", 3, True),
        ("grp-b-changelog", 6, True),
    ]
    assert specs[0].topic_config()["cleanup.policy"] == "compact"


# -- restore from the changelog ----------------------------------------------------------------
def broker_with_changelog(records: list[tuple[int, bytes, bytes | None]]) -> InMemoryBroker:
    broker = InMemoryBroker()
    broker.create_topic(IN, 2)
    broker.create_topic(CHANGELOG, 2)
    p = broker.producer({"transactional.id": "writer"})
    p.init_transactions()
    p.begin_transaction()
    for partition, key, value in records:
        p.produce(CHANGELOG, value=value, key=key, partition=partition)
    p.commit_transaction()
    return broker


def stores(broker: InMemoryBroker, path: Path, **kwargs: object) -> StateStores:
    return StateStores(
        "t",
        path,
        GROUP,
        {"group.id": GROUP, "enable.auto.commit": False},
        consumer_factory=broker.consumer,
        **kwargs,  # type: ignore[arg-type]
    )


def restore_all(s: StateStores, turns: int = 100) -> int:
    for turn in range(1, turns + 1):
        s.restore()
        if not s.restoring:
            return turn
    raise AssertionError("restore did not finish")


def test_restore_spans_turns_and_applies_tombstones(tmp_path: Path) -> None:
    records: list[tuple[int, bytes, bytes | None]] = [
        (0, f"k{i}".encode(), str(i).encode()) for i in range(50)
    ]
    records += [(0, b"k3", None), (0, b"k4", b"four"), (1, b"other", b"x")]
    broker = broker_with_changelog(records)
    s = stores(broker, tmp_path, restore_batch_size=7, restore_slice_s=0.0)
    s.assigned([(IN, 0)])
    assert not s.is_ready((IN, 0))
    with pytest.raises(StateError):
        s.state((IN, 0))
    turns = restore_all(s)
    st = s.state((IN, 0))
    assert (st.get(b"k3"), st.get(b"k4"), st.get(b"k9"), st.get(b"other")) == (
        None,
        b"four",
        b"9",
        None,  # partition 1's state stays with partition 1
    )
    assert s.restored_records == 52 and turns > 52 // 7  # a slice per turn
    s.close()


def test_restore_below_the_low_watermark_rebuilds(tmp_path: Path) -> None:
    broker = broker_with_changelog([(0, b"a", b"1"), (0, b"b", b"2")])
    s = stores(broker, tmp_path)
    s.assigned([(IN, 0)])
    restore_all(s)
    s.close()
    # more writes, then retention deletes the records the stored position points at
    p = broker.producer({})
    p.produce(CHANGELOG, value=b"3", key=b"c", partition=0)
    p.produce(CHANGELOG, value=b"4", key=b"d", partition=0)
    p.flush()
    stored = broker.end_offset(CHANGELOG, 0) - 2  # where the first store stopped
    broker.delete_records(CHANGELOG, 0, stored + 1)
    s2 = stores(broker, tmp_path)
    s2.assigned([(IN, 0)])
    restore_all(s2)
    st = s2.state((IN, 0))
    # wiped, then rebuilt from what is left: a, b and c are gone with the deleted records
    assert (st.get(b"a"), st.get(b"c"), st.get(b"d")) == (None, None, b"4")
    s2.close()


def test_restore_waits_for_an_open_transaction(tmp_path: Path) -> None:
    """A zombie's open transaction holds the last stable offset: the restore must not finish
    below it (it may still commit), and finishes once the transaction ends."""
    broker = broker_with_changelog([(0, b"a", b"1")])
    zombie = broker.producer({"transactional.id": "zombie"})
    zombie.init_transactions()
    zombie.begin_transaction()
    zombie.produce(CHANGELOG, value=b"2", key=b"a", partition=0)
    zombie.flush()
    s = stores(broker, tmp_path, restore_slice_s=0.01)
    s.assigned([(IN, 0)])
    for _ in range(5):
        s.restore()
    assert s.restoring
    zombie.commit_transaction()
    restore_all(s)
    assert s.state((IN, 0)).get(b"a") == b"2"
    s.close()


def test_restore_stuck_on_an_open_transaction_stops(tmp_path: Path) -> None:
    broker = broker_with_changelog([(0, b"a", b"1")])
    zombie = broker.producer({"transactional.id": "zombie"})
    zombie.init_transactions()
    zombie.begin_transaction()
    zombie.produce(CHANGELOG, value=b"2", key=b"a", partition=0)
    zombie.flush()
    s = stores(broker, tmp_path, restore_slice_s=0.01, restore_stall_timeout_s=0.2)
    s.assigned([(IN, 0)])
    with pytest.raises(RestoreStalledError, match="stuck at offset"):
        for _ in range(1000):
            s.restore()
    s.close()


def test_revoked_partition_reopens_warm(tmp_path: Path) -> None:
    broker = broker_with_changelog([(0, b"a", b"1")])
    s = stores(broker, tmp_path)
    s.assigned([(IN, 0)])
    restore_all(s)
    assert s.restored_records == 1
    s.revoked([(IN, 0)])
    assert s.states() == {}
    s.assigned([(IN, 0)])
    restore_all(s)
    assert s.restored_records == 1  # nothing new to read
    assert s.state((IN, 0)).get(b"a") == b"1"
    s.close()


def test_changelog_positions_come_from_delivery_reports(tmp_path: Path) -> None:
    broker = broker_with_changelog([])
    s = stores(broker, tmp_path)
    s.assigned([(IN, 1)])
    restore_all(s)
    st = s.state((IN, 1))
    st.put(b"a", b"1")
    st.delete(b"b")
    producer = broker.producer({})

    runs: list[int] = []

    def produce(
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes | None]],
        on_last: Callable[[Message], None],
    ) -> None:
        def report(err: object, msg: Message) -> None:
            assert err is None
            on_last(msg)

        runs.append(len(records))
        for i, (key, value) in enumerate(records):
            last = i == len(records) - 1
            producer.produce(
                topic,
                value=value,
                key=key,
                partition=partition,
                on_delivery=report if last else None,
            )

    assert s.write_changelog(produce) == 2
    # one run per partition per checkpoint, whose last record reports the position
    assert runs == [2]
    producer.flush()
    s.commit()
    assert not s.dirty
    assert s.state((IN, 1)).get(b"a") == b"1"
    end = broker.end_offset(CHANGELOG, 1)
    s.close()
    assert local(tmp_path / "t" / f"{IN}-1", partition=1).position == end


def test_restore_metrics(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"store": "metrics"}) or 0.0

    broker = broker_with_changelog([(0, b"a", b"1"), (0, b"b", b"2"), (1, b"c", b"3")])
    s = StateStores(
        "metrics",
        tmp_path,
        GROUP,
        {"group.id": GROUP, "enable.auto.commit": False},
        consumer_factory=broker.consumer,
    )
    before = sample("state_restore_records_total")
    s.assigned([(IN, 0), (IN, 1)])
    assert sample("state_partitions_restoring") == 2
    restore_all(s)
    assert sample("state_restore_records_total") - before == 3
    assert sample("state_partitions_restoring") == 0
    assert sample("state_restore_seconds") > 0
    assert s.status() == {"partitions": ["in[0]", "in[1]"], "restoring": [], "restored_records": 3}
    s.close()


def test_a_store_in_use_is_not_wiped(tmp_path: Path) -> None:
    """A second opener (a replica sharing the state dir) must not take the lock error for
    corruption and delete the live store under the first."""
    path = tmp_path / "s"
    first = local(path)
    first.write([(b"a", b"1")], 3)
    with pytest.raises(StateError, match="in use"):
        local(path)
    assert first.get(b"a") == b"1"
    first.close()
    assert local(path).get(b"a") == b"1"


def test_revoked_mid_restore_resumes_where_it_stopped(tmp_path: Path) -> None:
    broker = broker_with_changelog([(0, f"k{i}".encode(), b"v") for i in range(20)])
    s = stores(broker, tmp_path, restore_batch_size=5, restore_slice_s=0.0)
    s.assigned([(IN, 0)])
    s.restore()
    s.restore()
    assert s.restoring and 0 < s.restored_records < 20
    s.revoked([(IN, 0)])
    assert not s.restoring
    partial = s.restored_records
    s.assigned([(IN, 0)])
    restore_all(s)
    # the partial restore was kept (flushed at close): only the rest is read
    assert s.restored_records == 20
    assert partial > 0 and s.state((IN, 0)).get(b"k19") == b"v"
    s.close()


def test_a_store_behind_for_too_long_is_rebuilt(tmp_path: Path) -> None:
    """Compaction drops tombstones after delete.retention.ms: a store that has not been
    caught up for longer than ``max_offline_s`` might miss deletes, so it is rebuilt."""
    broker = broker_with_changelog([(0, b"a", b"1"), (0, b"b", b"2")])
    s = stores(broker, tmp_path)
    s.assigned([(IN, 0)])
    restore_all(s)
    s.close()
    warm = stores(broker, tmp_path)
    warm.assigned([(IN, 0)])
    restore_all(warm)
    warm.close()
    assert warm.restored_records == 0
    stale = stores(broker, tmp_path, max_offline_s=0.0)
    stale.assigned([(IN, 0)])
    restore_all(stale)
    assert stale.restored_records == 2
    assert stale.state((IN, 0)).get(b"b") == b"2"
    stale.close()


def test_a_store_of_a_vanished_cluster_is_rebuilt(tmp_path: Path) -> None:
    # The state dir outlives a purged cluster: the new cluster's changelog has as many records
    # as the stored position, so the position check alone cannot tell the logs apart.
    old = broker_with_changelog([(0, b"open-group", b"old"), (0, b"other", b"old")])
    s = stores(old, tmp_path)
    s.assigned([(IN, 0)])
    restore_all(s)
    assert s.state((IN, 0)).get(b"open-group") == b"old"
    s.close()
    new = broker_with_changelog([(0, b"k1", b"new"), (0, b"k2", b"new"), (0, b"k3", b"new")])
    assert new.end_offset(CHANGELOG, 0) >= old.end_offset(CHANGELOG, 0)
    s2 = stores(new, tmp_path)
    s2.assigned([(IN, 0)])
    restore_all(s2)
    st = s2.state((IN, 0))
    assert (st.get(b"open-group"), st.get(b"other"), st.get(b"k1")) == (None, None, b"new")
    assert s2.restored_records == 3  # rebuilt from the new changelog's start
    s2.close()


def test_a_restore_rides_out_a_broker_restart(tmp_path: Path) -> None:
    """The changelog's watermarks cannot be read while its leader moves (a rolling broker
    restart): the restore waits and starts on a later turn instead of stopping the service
    (an enricher exited 1 in the fleet broker-restart e2e)."""
    broker = broker_with_changelog([(0, b"a", b"1")])
    made: list[Any] = []

    def factory(config: dict[str, Any]) -> Any:
        consumer = broker.consumer(config)
        if config.get("isolation.level") == "read_uncommitted":
            consumer.fail(
                "get_watermark_offsets", KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), times=2
            )
        made.append(consumer)
        return consumer

    s = StateStores(
        "t",
        tmp_path,
        GROUP,
        {"group.id": GROUP, "enable.auto.commit": False},
        consumer_factory=factory,
    )
    s.assigned([(IN, 0)])
    s.restore()
    assert s.restoring  # not started yet, not failed
    restore_all(s)
    assert s.state((IN, 0)).get(b"a") == b"1"
    s.close()


def test_a_restore_that_cannot_start_for_good_stops(tmp_path: Path) -> None:
    broker = broker_with_changelog([(0, b"a", b"1")])

    def factory(config: dict[str, Any]) -> Any:
        consumer = broker.consumer(config)
        consumer.fail(
            "get_watermark_offsets", KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), times=9
        )
        return consumer

    s = StateStores(
        "t",
        tmp_path,
        GROUP,
        {"group.id": GROUP, "enable.auto.commit": False},
        consumer_factory=factory,
    )
    s.assigned([(IN, 0)])
    with pytest.raises(StateError, match="cannot read the watermarks"):
        s.restore()
    s.close()
