"""Operator commands against the real broker and registry, run as the processes operators run.

``python -m services.dlq`` (list, show, re-drive with its ledger) and
``python -m services.notifier receipt``. Every test gets fresh topics and a fresh ledger topic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer

from libs.kafka import DeadLetterPublisher, KafkaSettings, plain_produce
from libs.kafka.redrive import HEADER_REDRIVEN_FROM, LetterFilter, scan_dead_letters
from libs.serde import (
    AvroSerializer,
    ConfluentSchemaRegistry,
    DeserializationError,
    SlackDeliveryReceipt,
    SlackMessage,
)
from services.dlq.cli import CLIENT_ID
from tests.support.kafka import consume_all, create_topics, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def run(env: dict[str, str], *args: str, timeout_s: float = 180) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "TOPIC_DLQ_REDRIVES": unique("ledger"), "LOG_FORMAT": "json"}


class DeadLetters:
    """A source topic and its dead-letter topic, filled through the real publisher."""

    def __init__(self, bootstrap: str, partitions: int = 3) -> None:
        self.bootstrap = bootstrap
        self.source = unique("events")
        self.dlq = self.source + ".dlq"
        create_topics(bootstrap, [self.source, self.dlq], partitions=partitions)
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self.publisher = DeadLetterPublisher(plain_produce(self.producer), "enricher")

    def add(
        self,
        n: int,
        *,
        error: BaseException,
        source_partition: int = 0,
        source_topic: str | None = None,
        value: bytes | None = None,
    ) -> None:
        for i in range(n):
            self.publisher.publish(
                source_topic=source_topic or self.source,
                partition=source_partition,
                offset=1000 + i,
                key=f"key-{i}".encode(),
                value=value if value is not None else f"value-{i}".encode(),
                error=error,
                original_headers=[("trace-id", f"t-{i}".encode())],
                # as the producer does: its letters name a table, not the topic they go to
                topic=self.dlq,
            )
        assert self.producer.flush(30) == 0


def _bad_avro() -> DeserializationError:
    return DeserializationError("truncated", topic="t", partition=0, offset=0)


def test_redrive_sends_letters_back_once_and_refuses_a_second_time(
    bootstrap: str, env: dict[str, str]
) -> None:
    letters = DeadLetters(bootstrap)
    letters.add(4, error=_bad_avro(), source_partition=2)
    letters.add(2, error=ValueError("other"), source_partition=0)

    dry = run(env, "services.dlq", "redrive", letters.source, "--dry-run")
    assert dry.code == 0, dry.err
    assert f"would re-drive 6 of 6 selected dead letter(s) of {letters.dlq}" in dry.out
    # one line per letter, with its target
    assert sum(line.endswith(f" -> {letters.source}/2") for line in dry.out.splitlines()) == 4
    assert consume_all(bootstrap, letters.source, idle_s=1.0) == []

    first = run(
        env, "services.dlq", "redrive", letters.dlq, "--error-class", "DeserializationError"
    )
    assert first.code == 0, first.err
    assert "re-drove 4 of 4" in first.out
    back = consume_all(bootstrap, letters.source, expected=4)
    assert len(back) == 4
    assert {m.partition() for m in back} == {2}  # the partition the records came from
    assert sorted(m.key() for m in back) == [f"key-{i}".encode() for i in range(4)]
    for m in back:
        headers = dict(m.headers() or [])
        assert headers["trace-id"] == m.key().replace(b"key-", b"t-")  # type: ignore[union-attr]
        assert headers[HEADER_REDRIVEN_FROM].startswith(f"{letters.dlq}/".encode())
        assert not any(k.startswith("dlq.") and k != HEADER_REDRIVEN_FROM for k in headers)
    ledger = consume_all(bootstrap, env["TOPIC_DLQ_REDRIVES"], expected=4)
    assert {m.key() for m in ledger} == {
        dict(m.headers() or [])[HEADER_REDRIVEN_FROM] for m in back
    }

    again = run(env, "services.dlq", "redrive", letters.source)
    assert again.code == 1
    assert "4 letter(s)" in again.err and "were re-driven before" in again.err
    assert "--force" in again.err

    rest = run(env, "services.dlq", "redrive", letters.source, "--skip-redriven")
    assert rest.code == 0, rest.err
    assert "re-drove 2 of 6" in rest.out and "4 re-driven before, skipped" in rest.out
    assert len(consume_all(bootstrap, letters.source, expected=6)) == 6

    forced = run(env, "services.dlq", "redrive", letters.source, "--partition", "0", "--force")
    assert forced.code == 0, forced.err
    dlq_p0 = len(consume_all(bootstrap, letters.dlq, idle_s=1.0))
    assert dlq_p0 == 6
    total = consume_all(bootstrap, letters.source, idle_s=2.0)
    assert len(total) > 6  # forced letters went again

    listed = run(env, "services.dlq", "list", letters.source, "--json")
    assert listed.code == 0, listed.err
    rows = listed.json_lines()
    assert len(rows) == 6 and all(r["redriven"] for r in rows)


def test_a_crashed_redrive_is_fenced_and_its_letters_go_exactly_once(
    bootstrap: str, env: dict[str, str]
) -> None:
    """A re-drive stuck or killed mid-transaction left records and ledger entries uncommitted:
    they are invisible and count for nothing, the next run fences the old one (same
    transactional id), and the old one can no longer commit its copies."""
    letters = DeadLetters(bootstrap, partitions=1)
    letters.add(3, error=ValueError("x"))
    create_topics(bootstrap, [env["TOPIC_DLQ_REDRIVES"]], partitions=1, compacted=True)
    crashed = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"{CLIENT_ID}.{letters.dlq}",
            "transaction.timeout.ms": 300_000,  # only fencing can end it within the test
        }
    )
    crashed.init_transactions(30)
    crashed.begin_transaction()
    for offset in range(3):
        coordinates = f"{letters.dlq}/0/{offset}".encode()
        crashed.produce(
            letters.source, key=b"k", value=b"v", headers=[(HEADER_REDRIVEN_FROM, coordinates)]
        )
        crashed.produce(env["TOPIC_DLQ_REDRIVES"], key=coordinates, value=b"{}")
    assert crashed.flush(30) == 0  # in the log, never committed: the process "died" here

    result = run(env, "services.dlq", "redrive", letters.source, "--timeout", "60")
    assert result.code == 0, result.err
    assert "re-drove 3 of 3" in result.out
    with pytest.raises(KafkaException, match=r"(?i)fenced"):
        crashed.commit_transaction(30)
    back = consume_all(bootstrap, letters.source, expected=3)
    assert sorted(m.key() for m in back) == [b"key-0", b"key-1", b"key-2"]


def test_selection_by_time_and_offsets(bootstrap: str, env: dict[str, str]) -> None:
    letters = DeadLetters(bootstrap, partitions=1)
    letters.add(5, error=ValueError("x"))
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    none = run(env, "services.dlq", "redrive", letters.source, "--since", future, "--dry-run")
    assert none.code == 0, none.err
    assert "nothing re-driven" in none.out

    recent = run(env, "services.dlq", "list", letters.source, "--since", "10m", "--json")
    assert len(recent.json_lines()) == 5

    early = run(env, "services.dlq", "list", letters.source, "--until", "1h", "--json")
    assert early.json_lines() == []

    some = run(
        env, "services.dlq", "list", letters.source, "--partition", "0", "--offsets", "1-3",
        "--json",
    )  # fmt: skip
    assert [r["offset"] for r in some.json_lines()] == [1, 2, 3]

    moved = run(
        env, "services.dlq", "redrive", letters.source, "--partition", "0", "--offsets", "3-"
    )
    assert moved.code == 0, moved.err
    assert "re-drove 2 of 2" in moved.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "{missing}"], "topic {missing}.dlq does not exist"),
        (["list", "{source}", "--since", "last tuesday"], "bad time 'last tuesday'"),
        (["list", "{source}", "--partition", "0", "--offsets", "9-2"], "9 is after 2"),
        (["list", "{source}", "--partition", "0", "--offsets", "50-60"], "outside partition 0"),
        (["list", "{source}", "--partition", "7"], "partition 7 does not exist"),
        (["show", "{source}", "zero"], "bad position 'zero'"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    bootstrap: str, env: dict[str, str], args: list[str], message: str
) -> None:
    letters = DeadLetters(bootstrap, partitions=1)
    letters.add(3, error=ValueError("x"))
    names = {"source": letters.source, "missing": unique("missing")}
    result = run(env, "services.dlq", *(a.format(**names) for a in args))
    assert result.code == 2
    assert message.format(**names) in result.err
    assert "Traceback" not in result.err


def test_warehouse_rows_of_the_producer_are_refused(bootstrap: str, env: dict[str, str]) -> None:
    letters = DeadLetters(bootstrap, partitions=1)
    letters.add(2, error=ValueError("unmappable row"), source_partition=-1, source_topic="onb")
    result = run(env, "services.dlq", "redrive", letters.source)
    assert result.code == 1
    assert "warehouse rows of table 'onb'" in result.err
    assert consume_all(bootstrap, letters.source, idle_s=1.0) == []


def test_show_decodes_an_avro_value(
    bootstrap: str, env: dict[str, str], registry: ConfluentSchemaRegistry
) -> None:
    letters = DeadLetters(bootstrap, partitions=1)
    message = SlackMessage(
        message_id="m-1",
        pipeline="onboarding-started",
        channel="U1",
        text="hello",
        blocks="[]",
        org_id="org-1",
        source_event_id="e-1",
        created_at=datetime(2026, 12, 2, tzinfo=UTC),
    )
    value = AvroSerializer(registry, SlackMessage)(letters.source, message)
    letters.add(1, error=ValueError("channel_not_found"), value=value)
    result = run(env, "services.dlq", "show", letters.source, "0:0", "--json")
    assert result.code == 0, result.err
    (shown,) = result.json_lines()
    assert shown["value_format"].startswith("avro (schema id")
    assert shown["value"]["message_id"] == "m-1"
    assert shown["headers"]["dlq.error.message"] == "channel_not_found"
    assert shown["source"] == f"{letters.source}/0/1000"


def test_scan_reports_progress_against_the_selection(bootstrap: str) -> None:
    letters = DeadLetters(bootstrap, partitions=2)
    letters.add(30, error=ValueError("x"))
    conf = KafkaSettings(bootstrap_servers=bootstrap).consumer_config(None)
    conf["group.id"] = "progress-nogroup"
    consumer = Consumer(conf)
    seen: list[tuple[int, int]] = []
    try:
        found = list(
            scan_dead_letters(
                consumer,
                letters.dlq,
                LetterFilter(error_class="ValueError"),
                timeout_s=60,
                progress=lambda n, total: seen.append((n, total)),
                progress_interval_s=0.0,
            )
        )
    finally:
        consumer.close()
    assert len(found) == 30
    assert seen[-1] == (30, 30)
    assert all(n <= total for n, total in seen)


# -- receipts ----------------------------------------------------------------------------------


def _receipt(message_id: str, status: str, attempts: int, error: str | None = None) -> Any:
    return SlackDeliveryReceipt(
        message_id=message_id,
        channel="U42",
        status=status,
        attempts=attempts,
        delivered_at=datetime(2026, 12, 2, 17, 0, tzinfo=UTC),
        slack_ts="1764694800.000100" if status == "DELIVERED" else None,
        error=error,
    )


def test_receipt_prints_the_latest_receipt_of_a_message(
    bootstrap: str, env: dict[str, str], registry: ConfluentSchemaRegistry
) -> None:
    topic = unique("receipts")
    create_topics(bootstrap, [topic], compacted=True)
    encode = AvroSerializer(registry, SlackDeliveryReceipt)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for r in [
        _receipt("m-1", "FAILED", 3, "ratelimited"),
        _receipt("m-2", "DRY_RUN", 1),
        _receipt("m-1", "DELIVERED", 4),
    ]:
        producer.produce(topic, key=r.message_id.encode(), value=encode(topic, r))
    producer.produce(topic, key=b"m-3", value=encode(topic, _receipt("m-3", "DELIVERED", 1)))
    producer.produce(topic, key=b"m-3", value=None)  # deleted
    assert producer.flush(30) == 0
    env = {**env, "TOPIC_SLACK_MESSAGE_RECEIPTS": topic}

    text = run(env, "services.notifier", "receipt", "m-1")
    assert text.code == 0, text.err
    lines = dict(line.split(None, 1) for line in text.out.splitlines())
    assert lines["status"] == "DELIVERED"
    assert lines["channel"] == "U42"
    assert lines["attempts"] == "4"
    assert lines["slack_ts"] == "1764694800.000100"
    assert lines["error"] == "-"

    as_json = run(env, "services.notifier", "receipt", "m-2", "--json")
    assert as_json.code == 0, as_json.err
    (row,) = as_json.json_lines()
    assert (row["status"], row["attempts"], row["slack_ts"]) == ("DRY_RUN", 1, None)

    missing = run(env, "services.notifier", "receipt", "m-404")
    assert missing.code == 1
    assert f"message m-404 has no receipt in {topic}" in missing.err
    assert missing.out == ""

    deleted = run(env, "services.notifier", "receipt", "m-3")
    assert deleted.code == 1
    assert "was deleted" in deleted.err


def test_receipt_of_a_missing_topic_fails_fast(env: dict[str, str]) -> None:
    topic = unique("no-receipts")
    started = time.monotonic()
    result = run(
        {**env, "TOPIC_SLACK_MESSAGE_RECEIPTS": topic}, "services.notifier", "receipt", "m"
    )
    assert result.code == 1
    assert f"topic {topic} does not exist" in result.err
    assert time.monotonic() - started < 30  # not the 60 s read timeout


def test_receipt_without_settings_names_the_missing_one(env: dict[str, str]) -> None:
    bare = {k: v for k, v in env.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    result = run(bare, "services.notifier", "receipt", "m-1")
    assert result.code == 2
    assert "KAFKA_BOOTSTRAP_SERVERS is required" in result.err


def test_help_of_the_commands(env: dict[str, str]) -> None:
    dlq = run(env, "services.dlq", "--help")
    assert dlq.code == 0
    for word in ("list", "show", "redrive", "TOPIC_DLQ_REDRIVES", "--skip-redriven"):
        assert word in dlq.out
    redrive = run(env, "services.dlq", "redrive", "--help")
    for word in ("--dry-run", "--force", "--since", "--error-class", "--offsets"):
        assert word in redrive.out
    receipt = run(env, "services.notifier", "receipt", "--help")
    assert receipt.code == 0 and "MESSAGE_ID" in receipt.out
    notifier = run(env, "services.notifier", "--help")
    assert "receipt MESSAGE_ID" in notifier.out


def test_tool_log_lines_of_librdkafka_are_json(env: dict[str, str]) -> None:
    closed = {**env, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    started = time.monotonic()
    result = run(closed, "services.dlq", "list", "anything", "--timeout", "3")
    assert result.code != 0
    assert time.monotonic() - started < 60  # bounded wait, whatever the broker does
    rdkafka = [
        json.loads(line)
        for line in result.err.splitlines()
        if line.startswith("{") and '"logger": "librdkafka"' in line
    ]
    assert rdkafka and rdkafka[0]["level"] == "ERROR" and rdkafka[0]["facility"] == "FAIL"
