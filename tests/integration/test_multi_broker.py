"""`stack.sh up --brokers 3`: a three-node KRaft cluster that keeps taking writes with a node down.

What the fleet tests build on: topics the project creates get three replicas and
``min.insync.replicas=2``, a transactional producer keeps committing while one node is
stopped (gracefully or with SIGKILL), `start-broker` brings the node back into every ISR, and
a table's bootstrap waits out a partition leader going down.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from libs.kafka.admin import TopicSpec, describe_topic_config, ensure_topics
from libs.tables import GlobalTable, TableState
from tests.support.stack import STACK_SH, Stack, _env, start_stack

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack3"), "--brokers", "3")
    try:
        yield s
    finally:
        s.down()


def _stack_sh(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK_SH), *args],
        env=_env(stack.state_dir),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def _isr_sizes(admin: AdminClient, topic: str) -> list[int]:
    md = admin.list_topics(topic, timeout=15)
    return [len(p.isrs) for p in md.topics[topic].partitions.values()]


def _produce_committed(producer: Producer, topic: str, keys: list[str]) -> None:
    producer.begin_transaction()
    for k in keys:
        producer.produce(topic, key=k.encode(), value=k.encode())
    producer.commit_transaction(60)


def _read_committed(bootstrap: str, topic: str, expected: int) -> list[str]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while len(seen) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                seen.append(bytes(msg.key() or b"").decode())
        return seen
    finally:
        consumer.close()


def test_three_nodes_export_all_bootstrap_servers_and_three_replicas(cluster: Stack) -> None:
    assert len(cluster.bootstrap.split(",")) == 3
    assert cluster.env["TOPIC_REPLICATION_FACTOR"] == "3"
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    assert len(admin.list_topics(timeout=15).brokers) == 3
    status = _stack_sh(cluster, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert [ln.split()[0] for ln in status.stdout.splitlines()][:3] == [
        "kafka-1",
        "kafka-2",
        "kafka-3",
    ]


@pytest.mark.parametrize("how", ["graceful", "kill"])
def test_writes_go_on_with_one_node_down_and_the_node_rejoins(cluster: Stack, how: str) -> None:
    topic = f"multi-{how}-{uuid.uuid4().hex[:8]}"
    conf = {"bootstrap.servers": cluster.bootstrap}
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS, 3)])
    admin = AdminClient(conf)
    # the broker that answers may not know the topic yet: describe_topic_config waits for it
    assert describe_topic_config(conf, topic)["min.insync.replicas"] == "2"
    _wait_for("all replicas in sync", lambda: _isr_sizes(admin, topic) == [3] * PARTITIONS)

    producer = Producer(
        {
            **conf,
            "transactional.id": f"tx-{topic}",
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    producer.init_transactions(60)
    _produce_committed(producer, topic, [f"before-{i}" for i in range(50)])

    stop = ["stop-broker", "2"] + (["--kill"] if how == "kill" else [])
    stopped = _stack_sh(cluster, *stop)
    assert stopped.returncode == 0, stopped.stderr
    status = _stack_sh(cluster, "status")
    assert status.returncode == 3, "status must say the cluster is degraded"
    assert "kafka-2   stopped" in status.stdout

    # two of three replicas are enough for acks=all with min.insync.replicas=2
    _produce_committed(producer, topic, [f"during-{i}" for i in range(50)])

    started = _stack_sh(cluster, "start-broker", "2")
    assert started.returncode == 0, started.stderr
    _produce_committed(producer, topic, [f"after-{i}" for i in range(50)])
    producer.flush(30)

    seen = _read_committed(cluster.bootstrap, topic, 150)
    assert sorted(seen) == sorted(
        [f"{phase}-{i}" for phase in ("before", "during", "after") for i in range(50)]
    )
    _wait_for("node 2 back in every ISR", lambda: _isr_sizes(admin, topic) == [3] * PARTITIONS)
    assert _stack_sh(cluster, "status").returncode == 0


def test_bad_node_numbers_are_refused_with_a_clear_line(cluster: Stack) -> None:
    out = _stack_sh(cluster, "stop-broker", "4")
    assert out.returncode == 1
    assert "no Kafka node '4'" in out.stderr and "1..3" in out.stderr
    out = _stack_sh(cluster, "start-broker", "1")
    assert out.returncode == 1
    assert "already running" in out.stderr


def test_up_refuses_a_cluster_size_it_cannot_run(tmp_path: Path) -> None:
    for flags, message in [
        (["--brokers", "2"], "--brokers must be 1 or 3"),
        (["--brokers", "3", "--with-sasl"], "--with-sasl runs on the single node only"),
    ]:
        out = subprocess.run(
            [str(STACK_SH), "up", *flags],
            env=_env(tmp_path / "s"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 2
        assert message in out.stderr


def test_a_table_bootstrap_waits_out_a_broker_going_down(cluster: Stack, tmp_path: Path) -> None:
    """The leader of a table's partition is killed as the bootstrap starts: its watermarks
    cannot be read until another replica takes over. The table waits, says why, and loads
    every record once the cluster answers; it raised (and the service exited 1) before."""
    topic = f"table-{uuid.uuid4().hex[:8]}"
    conf = {"bootstrap.servers": cluster.bootstrap}
    ensure_topics(conf, [TopicSpec(topic, PARTITIONS, 3, compacted=True)])
    admin = AdminClient(conf)
    _wait_for("all replicas in sync", lambda: _isr_sizes(admin, topic) == [3] * PARTITIONS)
    producer = Producer({**conf, "enable.idempotence": True, "acks": "all"})
    for i in range(300):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    assert producer.flush(60) == 0
    leader = admin.list_topics(topic, timeout=15).topics[topic].partitions[0].leader

    table: GlobalTable[bytes] = GlobalTable(
        name="multi",
        topic=topic,
        state_dir=tmp_path,
        consumer_config=conf,
        decode=lambda value, *_: value,
        validate=False,
    )
    _stack_sh(cluster, "stop-broker", str(leader), "--kill")
    try:
        # short requests: the dead leader's watermark query times out within the outage
        table.begin_bootstrap(timeout_s=2.0)
        states = {table.state}
        deadline = time.monotonic() + 180
        while not table.step_bootstrap():
            states.add(table.state)
            assert time.monotonic() < deadline, table.status()
        assert TableState.WAITING in states, "the bootstrap never had to wait"
        assert table.ready() and table.status()["waiting"] is None
        assert sum(table.positions().values()) == 300
        assert table.get("k7") == b"v7" and table.get("k299") == b"v299"
    finally:
        table.close()
        started = _stack_sh(cluster, "start-broker", str(leader))
        assert started.returncode == 0, started.stderr
    _wait_for(f"node {leader} back in every ISR", lambda: _isr_sizes(admin, topic) == [3] * 3)
