"""ProcessingLoop with per-partition state (libs.state.stores) on the in-memory twins.

The handler counts records per key in the partition's state and writes the count into each
output, so outputs and state can be checked against each other: after any sequence of
commits, aborts, restarts and rebalances, the state of a key equals the number of committed
outputs for it, and the committed outputs of a key count 1, 2, 3... without a gap or a repeat.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message

from libs.kafka import Emitter, Guarantee, LoopConfig, LoopStats, ProcessingLoop, RetryLater
from libs.kafka.memory import InMemoryBroker
from libs.state import KeyValueState
from libs.state.changelog import changelog_topic
from libs.state.errors import ChangelogTopicError
from libs.state.stores import StateStores
from tests.support.kafka import wait_until

pytestmark = pytest.mark.timeout(60)

IN, OUT, GROUP = "in", "out", "g"
CHANGELOG = changelog_topic(GROUP, IN)


def counting(msg: Message, out: Emitter) -> None:
    key = msg.key() or b""
    count = int(out.state.get(b"count/" + key) or b"0") + 1
    out.state.put(b"count/" + key, str(count).encode())
    out.produce(OUT, key, f"{key.decode()}={count}".encode())


def new_broker(changelog_partitions: int = 2) -> InMemoryBroker:
    broker = InMemoryBroker()
    for topic, partitions in ((IN, 2), (OUT, 1), (IN + ".dlq", 1)):
        broker.create_topic(topic, partitions)
    broker.create_topic(CHANGELOG, changelog_partitions)
    return broker


class StateRig:
    """One loop with state over ``in`` (2 partitions) on a shared broker, on its own thread."""

    def __init__(
        self,
        broker: InMemoryBroker,
        state_dir: Path,
        *,
        handler: Callable[[Message, Emitter], None] = counting,
        instance: str = "a",
        punctuate: Any = None,
        **config: Any,
    ) -> None:
        self.broker = broker
        self.stop = threading.Event()
        self.stores = StateStores(
            "test",
            state_dir,
            GROUP,
            {"group.id": GROUP, "enable.auto.commit": False},
            consumer_factory=broker.consumer,
            restore_batch_size=config.pop("restore_batch_size", 10_000),
        )
        defaults: dict[str, Any] = {"checkpoint_interval_s": 0.05, "poll_timeout_s": 0.02}
        self.loop = ProcessingLoop(
            LoopConfig(name="test", topics=[IN], **{**defaults, **config}),
            {"group.id": GROUP, "enable.auto.commit": False, "auto.offset.reset": "earliest"},
            {"transactional.id": f"{GROUP}-{instance}"},
            handler,
            service="test",
            stop=self.stop,
            consumer_factory=broker.consumer,
            producer_factory=broker.producer,
            state=self.stores,
            punctuate=punctuate,
        )
        self.error: BaseException | None = None
        self.stats: LoopStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.loop.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> StateRig:
        self.thread.start()
        return self

    def finish(self) -> LoopStats:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "loop did not stop"
        assert self.error is None, self.error
        assert self.stats is not None
        return self.stats


def send(broker: InMemoryBroker, records: list[tuple[bytes, int]]) -> None:
    p = broker.producer({})
    for key, partition in records:
        p.produce(IN, value=b"x", key=key, partition=partition)
    assert p.flush(1) == 0


def committed_all(broker: InMemoryBroker) -> bool:
    # a partition without records has nothing committed
    return all(
        (broker.committed_offset(GROUP, IN, p) or 0) == broker.end_offset(IN, p) for p in (0, 1)
    )


def counts(broker: InMemoryBroker) -> dict[bytes, list[int]]:
    """Committed outputs per key: the counts they carry, in order."""
    out: dict[bytes, list[int]] = defaultdict(list)
    for m in broker.records(OUT):
        key, _, count = (m.value() or b"").partition(b"=")
        out[key].append(int(count))
    return dict(out)


def assert_consistent(broker: InMemoryBroker, per_key: Mapping[bytes, int]) -> None:
    got = counts(broker)
    assert {k: len(v) for k, v in got.items()} == dict(per_key)
    for key, seq in got.items():
        assert seq == list(range(1, len(seq) + 1)), (key, seq)


def changelog_values(broker: InMemoryBroker) -> dict[tuple[int, bytes], bytes | None]:
    last: dict[tuple[int, bytes], bytes | None] = {}
    for m in broker.records(CHANGELOG):
        last[(int(m.partition() or 0), m.key() or b"")] = m.value()
    return last


def keyed(n: int, keys: int = 3) -> list[tuple[bytes, int]]:
    # key kI always on partition I % 2: state is per partition, keys stay with theirs
    return [(f"k{i % keys}".encode(), (i % keys) % 2) for i in range(n)]


@pytest.mark.parametrize("guarantee", list(Guarantee))
def test_counts_survive_restart_on_the_same_dir(tmp_path: Path, guarantee: Guarantee) -> None:
    broker = new_broker()
    rig = StateRig(broker, tmp_path, guarantee=guarantee).start()
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="first run committed")
    rig.finish()
    restored_first = rig.stores.restored_records
    assert restored_first == 0  # nothing in the changelog yet

    rig2 = StateRig(broker, tmp_path, guarantee=guarantee).start()
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="second run committed")
    rig2.finish()
    # warm: the local stores were up to date, nothing to re-read
    assert rig2.stores.restored_records == 0
    assert_consistent(broker, {b"k0": 20, b"k1": 20, b"k2": 20})
    assert changelog_values(broker)[(0, b"count/k0")] == b"20"


def test_fresh_dir_restores_everything(tmp_path: Path) -> None:
    broker = new_broker()
    rig = StateRig(broker, tmp_path / "one").start()
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="first run committed")
    rig.finish()

    rig2 = StateRig(broker, tmp_path / "two").start()
    send(broker, keyed(3))
    wait_until(lambda: committed_all(broker), message="second run committed")
    rig2.finish()
    assert rig2.stores.restored_records > 0
    assert_consistent(broker, {b"k0": 11, b"k1": 11, b"k2": 11})


def test_warm_restore_reads_only_what_is_new(tmp_path: Path) -> None:
    """Instance A runs, stops; B (another dir) writes more; A again reads only B's writes."""
    broker = new_broker()
    a = StateRig(broker, tmp_path / "a").start()
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="a committed")
    a.finish()

    b = StateRig(broker, tmp_path / "b", instance="b").start()
    send(broker, [(b"k0", 0)] * 5)
    wait_until(lambda: committed_all(broker), message="b committed")
    b.finish()

    a2 = StateRig(broker, tmp_path / "a").start()
    send(broker, [(b"k0", 0)])
    wait_until(lambda: committed_all(broker), message="a again committed")
    a2.finish()
    # one changelog record per checkpoint of B that touched k0 (last value per interval):
    # far fewer than the whole history A already has
    assert 1 <= a2.stores.restored_records <= 5
    assert_consistent(broker, {b"k0": 16, b"k1": 10, b"k2": 10})


def test_partition_moves_with_its_state(tmp_path: Path) -> None:
    """A second member takes a partition over: it sees A's committed counts before the
    partition's next record, so the counts go on without a restart at 1."""
    broker = new_broker()
    a = StateRig(broker, tmp_path / "a").start()
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="a committed")
    b = StateRig(broker, tmp_path / "b", instance="b").start()
    wait_until(
        lambda: b.loop._consumer.assignment() and a.loop._consumer.assignment(),
        message="both members own a partition",
    )
    send(broker, keyed(30))
    wait_until(lambda: committed_all(broker), message="after the move committed")
    a.finish()
    b.finish()
    assert b.stores.restored_records > 0
    assert_consistent(broker, {b"k0": 20, b"k1": 20, b"k2": 20})


def test_abort_discards_state_writes(tmp_path: Path) -> None:
    """A handler that asks to retry later after writing: the write is rolled back with the
    outputs, and the replay counts from the committed value."""
    broker = new_broker()
    failed: list[bool] = []

    def flaky(msg: Message, out: Emitter) -> None:
        counting(msg, out)
        if msg.offset() == 3 and msg.partition() == 0 and not failed:
            failed.append(True)
            raise RetryLater("dependency down", delay_s=0.05)

    rig = StateRig(broker, tmp_path, handler=flaky).start()
    send(broker, [(b"k0", 0)] * 10)
    wait_until(lambda: committed_all(broker), message="committed")
    stats = rig.finish()
    assert failed and stats.aborts >= 1
    assert_consistent(broker, {b"k0": 10})


def test_transaction_abort_discards_state_writes(tmp_path: Path) -> None:
    """The commit of the transaction fails (abortable): outputs, offsets and the state's
    changelog records are all aborted, the local store does not see the writes."""
    from confluent_kafka import KafkaError

    broker = new_broker()
    rig = StateRig(broker, tmp_path)
    producer_calls: list[Any] = []
    original = rig.loop._client.producer
    producer_calls.append(original)
    original.fail(  # type: ignore[attr-defined]
        "commit_transaction",
        KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True),
    )
    rig.start()
    send(broker, [(b"k0", 0)] * 5)
    wait_until(lambda: committed_all(broker), message="committed")
    stats = rig.finish()
    assert stats.aborts >= 1
    assert_consistent(broker, {b"k0": 5})
    assert changelog_values(broker)[(0, b"count/k0")] == b"5"


def test_changelog_with_too_few_partitions_is_fatal(tmp_path: Path) -> None:
    broker = new_broker(changelog_partitions=1)
    rig = StateRig(broker, tmp_path).start()
    rig.thread.join(30)
    assert isinstance(rig.error, ChangelogTopicError)
    assert CHANGELOG in str(rig.error) and f"input topic {IN}" in str(rig.error)


def test_position_beyond_the_end_wipes_the_store(tmp_path: Path) -> None:
    """The changelog was recreated (empty): the stored position is past its end, so the local
    store is wiped instead of serving state the changelog no longer has."""
    broker = new_broker()
    rig = StateRig(broker, tmp_path).start()
    send(broker, keyed(6))
    wait_until(lambda: committed_all(broker), message="committed")
    rig.finish()

    fresh = new_broker()  # topics recreated: empty changelog, no committed offsets
    rig2 = StateRig(fresh, tmp_path).start()
    send(fresh, [(b"k0", 0)])
    wait_until(lambda: committed_all(fresh), message="committed on the new cluster")
    rig2.finish()
    assert counts(fresh) == {b"k0": [1]}


def test_punctuator_sees_restored_states_and_commits_with_the_checkpoint(tmp_path: Path) -> None:
    broker = new_broker()
    seen: list[set[tuple[str, int]]] = []

    def punctuate(
        states: Mapping[tuple[str, int], KeyValueState], out: Emitter, now: float
    ) -> None:
        seen.append(set(states))
        for (_, p), st in states.items():
            if st.get(b"ticked") is None:
                st.put(b"ticked", str(int(now)).encode())
                out.produce(OUT, b"tick", f"tick={p}".encode())

    rig = StateRig(broker, tmp_path, punctuate=punctuate, punctuate_interval_s=0.01).start()
    wait_until(
        lambda: len(changelog_values(broker)) == 2, message="both partitions' ticks committed"
    )
    rig.finish()
    assert {(IN, 0), (IN, 1)} in seen
    assert sorted(m.value() for m in broker.records(OUT)) == [b"tick=0", b"tick=1"]
    # the transaction carried the partitions' positions although no record was handled:
    # offsets are what fences a zombie member's transaction (KIP-447)
    assert [broker.committed_offset(GROUP, IN, p) for p in (0, 1)] == [0, 0]


def test_records_fetched_before_the_restore_ends_wait_for_it(tmp_path: Path) -> None:
    """librdkafka may deliver records of a partition paused in on_assign (a fetch already
    under way); the loop must not hand them over before the state is restored: it seeks
    back and hands them over afterwards, with the restored state."""
    broker = new_broker()
    first = StateRig(broker, tmp_path / "a").start()
    send(broker, [(b"k0", 0)] * 5)
    wait_until(lambda: committed_all(broker), message="first committed")
    first.finish()

    send(broker, [(b"k0", 0)] * 3)
    rig = StateRig(broker, tmp_path / "b", restore_batch_size=1)
    consumer: Any = rig.loop._consumer
    # pausing does nothing: records flow while the state restores (the rebalance callback
    # gets the consumer itself, so the method is replaced on it)
    consumer.pause = lambda partitions: None
    rig.stores._slice_s = 0.0  # one changelog record per loop turn: the restore takes turns
    rig.start()
    wait_until(lambda: committed_all(broker), message="second committed")
    rig.finish()
    assert rig.stores.restored_records >= 1
    assert_consistent(broker, {b"k0": 8})


def test_emitter_state_needs_a_loop_with_state(tmp_path: Path) -> None:
    broker = new_broker()
    errors: list[str] = []

    def handler(msg: Message, out: Emitter) -> None:
        try:
            out.state.get(b"x")
        except RuntimeError as exc:
            errors.append(str(exc))

    stop = threading.Event()
    loop = ProcessingLoop(
        LoopConfig(name="test", topics=[IN], poll_timeout_s=0.02),
        {"group.id": GROUP, "enable.auto.commit": False, "auto.offset.reset": "earliest"},
        {"transactional.id": "t"},
        handler,
        service="test",
        stop=stop,
        consumer_factory=broker.consumer,
        producer_factory=broker.producer,
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    send(broker, [(b"k0", 0)])
    wait_until(lambda: errors, message="handler ran")
    stop.set()
    thread.join(30)
    assert "keeps no state" in errors[0]


def test_a_replaced_producer_restores_the_state_again(tmp_path: Path) -> None:
    """commit_transaction hangs: the loop replaces the producer (fencing the wedged one,
    whose transaction may or may not have committed) and restores every partition's state
    from the changelog again before handling more records."""
    broker = new_broker()
    rig = StateRig(broker, tmp_path, transaction_timeout_s=0.2)
    send(broker, [(b"k0", 0)] * 3 + [(b"k1", 1)] * 3)
    wedged: Any = rig.loop._client.producer
    release = wedged.hang("commit_transaction")
    rig.start()
    try:
        wait_until(lambda: rig.loop.stats.aborts >= 1, timeout_s=30, message="replaced")
    finally:
        release.set()
    send(broker, [(b"k0", 0)] * 2)
    wait_until(lambda: committed_all(broker), message="committed")
    rig.finish()
    assert_consistent(broker, {b"k0": 5, b"k1": 3})
    assert changelog_values(broker)[(0, b"count/k0")] == b"5"
