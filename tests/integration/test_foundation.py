"""The foundation against the real broker and registry: serde, topics, loop, dead letters."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, TopicPartition

from libs.kafka import KafkaSettings, describe_cleanup_policy, ensure_topics
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    ConfluentSchemaRegistry,
    ConnectorStatusChanged,
)
from services.common.settings import TopicSettings
from tests.support.kafka import consume_all, create_topics, produce, unique, wait_until
from tests.unit.test_serde import SAMPLES

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_avro_round_trip_through_registry(
    record: object, bootstrap: str, registry: ConfluentSchemaRegistry
) -> None:
    topic = unique("roundtrip")
    create_topics(bootstrap, [topic], partitions=1)
    value = AvroSerializer(registry, type(record))(topic, record)  # type: ignore[type-var]
    produce(bootstrap, topic, [("k", value)])
    [msg] = consume_all(bootstrap, topic, expected=1)
    decoded = AvroDeserializer(registry, type(record))(  # type: ignore[type-var]
        msg.value(), topic=topic, partition=0, offset=msg.offset()
    )
    assert decoded == record


def test_contract_topics_created_with_cleanup_policies(bootstrap: str) -> None:
    prefix = unique("contract")
    topics = TopicSettings(
        data_notifications_pipeline=f"{prefix}-notif",
        onboarding_events=f"{prefix}-onb",
        data_csdr_assignment=f"{prefix}-csdr",
        data_slack_users=f"{prefix}-users",
        slack_messages=f"{prefix}-msgs",
        slack_message_receipts=f"{prefix}-receipts",
        producer_cursors=f"{prefix}-cursors",
        partitions=2,
        replication_factor=1,
    )
    conf = KafkaSettings(bootstrap_servers=bootstrap).client_config()
    created = ensure_topics(conf, topics.all_specs())
    assert len(created) == len(topics.all_specs())
    assert ensure_topics(conf, topics.all_specs()) == []  # idempotent
    for name in (f"{prefix}-csdr", f"{prefix}-users", f"{prefix}-receipts", f"{prefix}-cursors"):
        assert describe_cleanup_policy(conf, name) == "compact"
    for name in (f"{prefix}-notif", f"{prefix}-msgs", f"{prefix}-notif.dlq"):
        assert describe_cleanup_policy(conf, name) == "delete"


def _event(i: int) -> ConnectorStatusChanged:
    return ConnectorStatusChanged(
        f"ev-{i}",
        f"org-{i % 7}",
        "env-1",
        "lkc-1",
        f"lcc-{i}",
        f"conn-{i}",
        "S3Sink",
        "PROVISIONING",
        "FAILED",
        T0,
    )


def _start_echo(
    bootstrap: str,
    registry_url: str,
    topic_in: str,
    topic_out: str,
    group: str,
    guarantee: str = "exactly_once",
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.echo_loop",
            bootstrap,
            registry_url,
            topic_in,
            topic_out,
            group,
            guarantee,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_poison_is_dead_lettered_and_sigterm_commits(
    guarantee: str, bootstrap: str, registry_url: str, registry: ConfluentSchemaRegistry
) -> None:
    topic_in, topic_out, group = unique("in"), unique("out"), unique("echo")
    create_topics(bootstrap, [topic_in, topic_out, topic_in + ".dlq"], partitions=2)
    encode = AvroSerializer(registry, ConnectorStatusChanged)
    records: list[tuple[str, bytes]] = [
        (f"org-{i}", encode(topic_in, _event(i))) for i in range(10)
    ]
    records.insert(4, ("org-x", b"not avro at all"))
    produce(bootstrap, topic_in, records[:6], headers=[("trace", b"t-1")])
    produce(bootstrap, topic_in, records[6:])

    proc = _start_echo(bootstrap, registry_url, topic_in, topic_out, group, guarantee)
    try:
        out = consume_all(bootstrap, topic_out, expected=10, timeout_s=60)
        assert sorted(m.key() for m in out) == sorted(
            k.encode() for k, _ in records if k != "org-x"
        )
        [dead] = consume_all(bootstrap, topic_in + ".dlq", expected=1, timeout_s=30)
        assert dead.key() == b"org-x" and dead.value() == b"not avro at all"
        headers = {k: v for k, v in dead.headers() or []}
        assert headers["dlq.error.class"] == b"libs.serde.errors.DeserializationError"
        assert b"not Confluent wire format" in headers["dlq.error.message"]
        assert headers["dlq.source.topic"] == topic_in.encode()
        assert headers["dlq.service"] == b"echo"
        assert headers["trace"] == b"t-1"  # original headers travel with the dead letter
        source_partition = int(headers["dlq.source.partition"])
        source_offset = int(headers["dlq.source.offset"])
        assert source_offset >= 0 and source_partition in (0, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "STATS consumed=11 dead_lettered=1" in stdout

    # offsets committed on the way out: the group's position is at the end of every partition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic_in, p) for p in range(2)]
        committed = c.committed(parts, timeout=10)
        ends = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        assert [tp.offset for tp in committed] == ends
    finally:
        c.close()


def test_loop_restart_resumes_from_commit(
    bootstrap: str, registry_url: str, registry: ConfluentSchemaRegistry
) -> None:
    topic_in, topic_out, group = unique("in"), unique("out"), unique("echo")
    create_topics(bootstrap, [topic_in, topic_out, topic_in + ".dlq"], partitions=1)
    encode = AvroSerializer(registry, ConnectorStatusChanged)
    produce(bootstrap, topic_in, [(f"k{i}", encode(topic_in, _event(i))) for i in range(5)])
    proc = _start_echo(bootstrap, registry_url, topic_in, topic_out, group)
    consume_all(bootstrap, topic_out, expected=5, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    produce(bootstrap, topic_in, [(f"k{i}", encode(topic_in, _event(i))) for i in range(5, 8)])
    proc = _start_echo(bootstrap, registry_url, topic_in, topic_out, group)
    try:
        wait_until(
            lambda: len(consume_all(bootstrap, topic_out, idle_s=1)) >= 8,
            timeout_s=60,
            message="8 outputs",
        )
        time.sleep(1)
        assert len(consume_all(bootstrap, topic_out, idle_s=1)) == 8  # nothing replayed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
