"""The enricher as a process against the real broker and registry.

Each test runs ``python -m services.enricher`` with fresh topic names (``TOPIC_*``), a fresh
group and state directory, and its metrics/health server on a free port: the gate, tombstones,
transaction markers, compaction holes, restarts, kill -9 and dead letters.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from libs.kafka import KafkaSettings, TopicError, ensure_topics
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    ConfluentSchemaRegistry,
    ConnectorStatusChanged,
    CsdrAssignment,
    OnboardingStarted,
    SlackMessage,
    SlackUser,
)
from services.common.settings import TopicSettings
from services.enricher.core import message_id
from tests.support.kafka import consume_all, create_topics, produce, unique, wait_until
from tests.support.net import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
FALLBACK = "C0FALLBACK"
CONNECTOR = "connector-provisioning-failed"
ONBOARDING = "onboarding-started"


def owner(org: str, email: str | None = None, name: str = "Jane Doe") -> CsdrAssignment:
    return CsdrAssignment(org, f"Org {org}", email or f"owner-{org}@Example.com", T0, name)


def slack_user(email: str, slack_id: str) -> SlackUser:
    return SlackUser(email.lower(), slack_id, T0)


def failure(event_id: str, org: str, *, old: str = "PROVISIONING") -> ConnectorStatusChanged:
    return ConnectorStatusChanged(
        event_id,
        org,
        "env-1",
        "lkc-1",
        f"lcc-{event_id}",
        f"conn {event_id}",
        "S3Sink",
        old,
        "FAILED",
        T0,
        "Invalid credentials <for> bucket & region",
    )


def onboarding(event_id: str, org: str) -> OnboardingStarted:
    return OnboardingStarted(event_id, org, f"Org {org}", "Standard", T0, "onboarding", "AWS")


@dataclass
class Enricher:
    """A running ``python -m services.enricher``."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except URLError as exc:
            status = getattr(exc, "code", 0)
            body = exc.read().decode() if hasattr(exc, "read") else str(exc)
            return int(status or 0), body
        except (ConnectionError, TimeoutError) as exc:
            return 0, str(exc)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _, body = self.get("/metrics")
        total = 0.0
        for line in body.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, timeout_s: float = 90) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"enricher exited: {self.tail()}"
            return self.get("/readyz")[0] == 200

        wait_until(ready, timeout_s=timeout_s, interval_s=0.2, message="enricher ready")

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM, expect a graceful exit 0; the log lines."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.tail()
        return self.logs()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no checkpoint, no abort, no close
        self.proc.wait(timeout=30)


class Harness:
    """Fresh topics, encoders and a way to start the enricher against them."""

    def __init__(
        self,
        bootstrap: str,
        registry: ConfluentSchemaRegistry,
        service_env: dict[str, str],
        tmp_path: Path,
    ) -> None:
        prefix = unique("enr")
        self.bootstrap = bootstrap
        self.topics = TopicSettings(
            data_notifications_pipeline=f"{prefix}-notif",
            onboarding_events=f"{prefix}-onb",
            data_csdr_assignment=f"{prefix}-csdr",
            data_slack_users=f"{prefix}-users",
            slack_messages=f"{prefix}-msgs",
            slack_message_receipts=f"{prefix}-receipts",
            producer_cursors=f"{prefix}-cursors",
            partitions=3,
            replication_factor=1,
        )
        self.group = unique("enricher")
        self.env = dict(service_env)
        for name, value in self.topics.model_dump().items():
            self.env[f"TOPIC_{name.upper()}"] = str(value)
        self.env["ENRICHER_GROUP_ID"] = self.group
        self.env["ENRICHER_STATE_DIR"] = str(tmp_path / "state")
        self.tmp = tmp_path
        self.registry = registry
        self._encoders: dict[type, AvroSerializer[Any]] = {}
        self.read_messages = AvroDeserializer(registry, SlackMessage)
        self.runs = 0

    def ensure_topics(self) -> None:
        conf = KafkaSettings(bootstrap_servers=self.bootstrap).client_config()

        def created() -> bool:
            try:
                ensure_topics(conf, self.topics.all_specs())
            except TopicError as exc:  # a just-created topic may not be describable yet
                assert "UNKNOWN_TOPIC" in str(exc), exc
                return False
            return True

        wait_until(created, timeout_s=30, interval_s=0.5, message="topics created")

    def encode(self, topic: str, record: Any) -> bytes:
        enc = self._encoders.get(type(record))
        if enc is None:
            enc = self._encoders[type(record)] = AvroSerializer(self.registry, type(record))
        return enc(topic, record)

    def owners(self, records: Sequence[CsdrAssignment | tuple[str, None]]) -> None:
        self._produce(self.topics.data_csdr_assignment, records, key=lambda r: r.org_id)

    def users(self, records: Sequence[SlackUser | tuple[str, None]]) -> None:
        self._produce(self.topics.data_slack_users, records, key=lambda r: r.email)

    def _produce(self, topic: str, records: Sequence[Any], key: Any) -> None:
        pairs = [
            (r[0], None) if isinstance(r, tuple) else (key(r), self.encode(topic, r))
            for r in records
        ]
        produce(self.bootstrap, topic, pairs)

    def events(self, records: Sequence[ConnectorStatusChanged | OnboardingStarted]) -> None:
        for r in records:
            topic = (
                self.topics.data_notifications_pipeline
                if isinstance(r, ConnectorStatusChanged)
                else self.topics.onboarding_events
            )
            produce(self.bootstrap, topic, [(r.org_id, self.encode(topic, r))])

    def start(self, **env: str) -> Enricher:
        self.runs += 1
        port = free_port()
        log_path = self.tmp / f"enricher-{self.runs}.log"
        full_env = {**self.env, "METRICS_PORT": str(port), **env}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.enricher"],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return Enricher(proc, port, log_path)

    def messages(self, expected: int | None = None, timeout_s: float = 30) -> list[SlackMessage]:
        msgs = consume_all(
            self.bootstrap, self.topics.slack_messages, expected=expected, timeout_s=timeout_s
        )
        out = []
        for m in msgs:
            decoded = self.read_messages(
                m.value(), topic=str(m.topic()), partition=m.partition(), offset=m.offset()
            )
            assert m.key() == decoded.channel.encode()  # keyed by channel
            out.append(decoded)
        return out

    def wait_messages(self, n: int, timeout_s: float = 60) -> list[SlackMessage]:
        found: list[SlackMessage] = []

        def enough() -> bool:
            nonlocal found
            found = self.messages(expected=n, timeout_s=5)
            return len(found) >= n

        wait_until(enough, timeout_s=timeout_s, interval_s=0.2, message=f"{n} messages")
        return found


@pytest.fixture
def h(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    service_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[Harness]:
    harness = Harness(bootstrap, registry, service_env, tmp_path)
    yield harness


def _caught_up(logs: list[dict[str, Any]]) -> dict[str, int]:
    return {
        str(line["table"]): int(line["applied_since_start"])
        for line in logs
        if line.get("msg") == "table caught up"
    }


def _by_event(messages: Sequence[SlackMessage]) -> dict[str, SlackMessage]:
    return {m.source_event_id: m for m in messages}


def test_gate_transactions_and_tombstones(h: Harness) -> None:
    """Lookups written before the start (in transactions) are joined; tombstones reroute."""
    h.ensure_topics()
    # owners written transactionally: commit markers in the log, and one aborted owner
    tx = Producer({"bootstrap.servers": h.bootstrap, "transactional.id": unique("tx")})
    tx.init_transactions()
    for org in ("org-1", "org-2", "org-3"):
        tx.begin_transaction()
        topic = h.topics.data_csdr_assignment
        tx.produce(topic, key=org.encode(), value=h.encode(topic, owner(org)))
        tx.commit_transaction()
    tx.begin_transaction()
    tx.produce(
        h.topics.data_csdr_assignment,
        key=b"org-9",
        value=h.encode(h.topics.data_csdr_assignment, owner("org-9")),
    )
    # written, then aborted (an abort racing the first AddPartitionsToTxn is fatal:
    # librdkafka #4849)
    assert tx.flush(30) == 0
    tx.abort_transaction()
    h.users([slack_user(f"owner-org-{i}@example.com", f"U{i}") for i in (1, 2, 3, 9)])
    produce(h.bootstrap, h.topics.data_slack_users, [("bad@example.com", b"not avro")])

    e = h.start(ENRICHER_FALLBACK_CHANNEL=FALLBACK)
    try:
        e.wait_ready()
        h.events([failure("ev-1", "org-1"), onboarding("onb-9", "org-9")])
        msgs = _by_event(h.wait_messages(2))
        assert msgs["ev-1"].channel == "U1"  # joined at once: the gate loaded the owner
        assert msgs["ev-1"].pipeline == CONNECTOR
        assert msgs["ev-1"].message_id == message_id(CONNECTOR, "ev-1")
        assert "Hi Jane, *Org org-1* (`org-1`)" in msgs["ev-1"].blocks
        assert "&lt;for&gt; bucket &amp; region" in msgs["ev-1"].blocks
        # the aborted owner record never became visible
        assert msgs["onb-9"].channel == FALLBACK
        assert "No account-team owner found for org org-9" in msgs["onb-9"].text

        # tombstone on the users table: the next alert for org-2 goes to the fallback channel
        before = e.metric("table_records_applied_total", table="slack_users")
        h.users([("owner-org-2@example.com", None)])
        wait_until(
            lambda: e.metric("table_records_applied_total", table="slack_users") > before,
            message="user tombstone applied",
        )
        h.events([failure("ev-2", "org-2")])
        # tombstone on the owners table: the next alert for org-3 too
        before = e.metric("table_records_applied_total", table="csdr_assignment")
        h.owners([("org-3", None)])
        wait_until(
            lambda: e.metric("table_records_applied_total", table="csdr_assignment") > before,
            message="owner tombstone applied",
        )
        h.events([onboarding("onb-3", "org-3")])
        msgs = _by_event(h.wait_messages(4))
        assert msgs["ev-2"].channel == FALLBACK
        assert "No Slack user found for owner-org-2@example.com" in msgs["ev-2"].text
        assert msgs["onb-3"].channel == FALLBACK
        assert "No account-team owner found for org org-3" in msgs["onb-3"].text
        assert len(h.messages()) == 4  # nothing else, in particular no stale DM

        assert e.metric("enricher_join_misses_total", reason="no_owner", action="fallback") == 2
        assert e.metric("enricher_join_misses_total", reason="no_slack_user") == 1
        assert e.metric("table_records_invalid_total", table="slack_users") == 1
        [dead] = consume_all(h.bootstrap, h.topics.data_slack_users + ".dlq", expected=1)
        assert dead.key() == b"bad@example.com" and dead.value() == b"not avro"
        headers = dict(dead.headers() or [])
        assert headers["dlq.source.topic"] == h.topics.data_slack_users.encode()
        assert headers["dlq.service"] == b"enricher"
    finally:
        logs = e.stop()
    assert _caught_up(logs) == {"csdr_assignment": 3, "slack_users": 4}


def _offsets(bootstrap: str, topic: str) -> list[int]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("peek"),
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = [m for m in c.consume(1000, 0.5) if m.error() is None]
            seen += [int(m.offset() or 0) for m in got]
            pos = c.position([TopicPartition(topic, 0)])[0].offset
            if pos >= high:
                break
        return seen
    finally:
        c.close()


def test_compaction_holes_and_restart_reads_only_new_records(h: Harness) -> None:
    """A compacted lookup topic with offset holes passes the gate; a restart resumes."""
    # one partition, segments rolled every 100 ms, cleaned as soon as anything is dirty
    create_topics(
        h.bootstrap,
        [h.topics.data_csdr_assignment],
        partitions=1,
        compacted=True,
        # delete.retention.ms stays at its default: a tombstone must outlive any downtime of
        # a table reader, or the reader never learns about the delete
        config={"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"},
    )
    h.ensure_topics()
    for version in range(5):
        h.owners([owner(f"org-{i}", f"v{version}-owner-{i}@example.com") for i in range(20)])
    h.users([slack_user(f"v4-owner-{i}@example.com", f"U{i}") for i in range(20)])

    def compacted() -> bool:
        # every append after segment.ms rolls the segment the cleaner may then compact
        h.owners([owner("org-roll", "roll@example.com")])
        return 0 not in _offsets(h.bootstrap, h.topics.data_csdr_assignment)

    wait_until(compacted, timeout_s=120, interval_s=1.0, message="log cleaner compacted")
    offsets = _offsets(h.bootstrap, h.topics.data_csdr_assignment)
    assert len(offsets) < offsets[-1] + 1  # holes: fewer records than offsets

    e = h.start()
    try:
        e.wait_ready(timeout_s=60)
        h.events([failure("ev-1", "org-7")])
        [msg] = h.wait_messages(1)
        assert msg.channel == "U7"  # the latest owner version, after compaction
    finally:
        first = _caught_up(e.stop())
    # 20 orgs and the roll key, at least; the cleaner may have removed more since the peek
    assert 21 <= first["csdr_assignment"] <= len(offsets)
    assert first["slack_users"] == 20

    # while stopped: 4 owner changes and 2 users; the restart applies exactly those
    h.owners([owner(f"org-new-{i}", f"new-{i}@example.com") for i in range(3)] + [("org-1", None)])
    h.users([slack_user("new-0@example.com", "UNEW0"), slack_user("new-1@example.com", "UNEW1")])
    e = h.start()
    try:
        e.wait_ready(timeout_s=60)
        h.events([onboarding("onb-new", "org-new-0")])
        msgs = _by_event(h.wait_messages(2))
        assert msgs["onb-new"].channel == "UNEW0"
    finally:
        second = _caught_up(e.stop())
    assert second == {"csdr_assignment": 4, "slack_users": 2}


def test_kill_9_mid_stream_then_restart_is_exactly_once(h: Harness) -> None:
    """read_committed output holds every expected message exactly once after a kill -9."""
    h.ensure_topics()
    h.owners([owner(f"org-{i}") for i in range(10)])
    h.users([slack_user(f"owner-org-{i}@example.com", f"U{i}") for i in range(0, 10, 2)])
    total = 3000
    events: list[ConnectorStatusChanged | OnboardingStarted] = []
    for i in range(total):
        if i % 3 == 0:
            events.append(onboarding(f"onb-{i}", f"org-{i % 13}"))
        else:
            old = "RUNNING" if i % 10 == 1 else "PROVISIONING"
            events.append(failure(f"ev-{i}", f"org-{i % 13}", old=old))
    expected = {
        message_id(ONBOARDING if isinstance(ev, OnboardingStarted) else CONNECTOR, ev.event_id)
        for ev in events
        if isinstance(ev, OnboardingStarted) or ev.old_status == "PROVISIONING"
    }
    # a steady stream while the enricher runs, so the kill lands mid-stream
    p = Producer({"bootstrap.servers": h.bootstrap, "linger.ms": 5, "enable.idempotence": True})
    done = threading.Event()

    def stream() -> None:
        for i, ev in enumerate(events):
            topic = (
                h.topics.onboarding_events
                if isinstance(ev, OnboardingStarted)
                else h.topics.data_notifications_pipeline
            )
            p.produce(topic, key=ev.org_id.encode(), value=h.encode(topic, ev))
            if i % 100 == 99:
                p.flush(10)
                time.sleep(0.1)  # pacing the source stream, not waiting for a result
        p.flush(30)
        done.set()

    env = {
        "ENRICHER_FALLBACK_CHANNEL": FALLBACK,
        "ENRICHER_TRANSACTIONAL_ID": unique("txn"),
        # the killed member holds its partitions until its session expires
        "ENRICHER_SESSION_TIMEOUT_MS": "6000",
    }
    e = h.start(**env)
    e.wait_ready()
    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    wait_until(
        lambda: (
            e.metric("loop_records_produced_total") >= 300
            and e.metric("loop_checkpoints_total") >= 1
        ),
        timeout_s=60,
        message="committed output before the kill",
    )
    e.kill()
    assert not done.is_set(), "the stream ended before the kill: not mid-stream"
    e = h.start(**env)
    try:
        writer.join(timeout=120)
        assert done.is_set()
        msgs = h.wait_messages(len(expected), timeout_s=120)
        ids = [m.message_id for m in msgs]
        assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates"
        assert set(ids) == expected
    finally:
        logs = e.stop()
    [stopped] = [line for line in logs if line.get("msg") == "enricher stopped"]
    # the restart resumed from the killed instance's last commit, not from the beginning
    assert 0 < stopped["consumed"] < total


def test_poison_event_is_dead_lettered_and_the_next_is_processed(h: Harness) -> None:
    """Undecodable and invalid events land in the DLQ with headers (at-least-once mode)."""
    h.ensure_topics()
    h.owners([owner("org-1")])
    h.users([slack_user("owner-org-1@example.com", "U1")])
    topic = h.topics.data_notifications_pipeline
    invalid = failure("ev-invalid", "")
    produce(
        h.bootstrap,
        topic,
        [
            ("org-1", b"\x00\x00\x00\x00\x01garbage"),
            ("org-1", b"\x00\x7f\xff\xff\xf0unknown schema id"),  # registry answers 404
            ("org-1", h.encode(topic, invalid)),
        ],
        headers=[("traceparent", b"00-abc-def-01")],
    )
    h.events(
        [
            failure("ev-ok", "org-1"),
            failure("ev-running", "org-1", old="RUNNING"),  # filtered out
            # no owner, no fallback channel: parked until its owner arrives (or its time runs
            # out: then it is dropped and counted as a miss)
            failure("ev-nobody", "org-404"),
        ]
    )
    e = h.start(ENRICHER_PROCESSING_GUARANTEE="at_least_once")
    try:
        e.wait_ready()
        [msg] = h.wait_messages(1)
        assert msg.source_event_id == "ev-ok" and msg.channel == "U1"
        dead = consume_all(h.bootstrap, topic + ".dlq", expected=3)
        assert len(dead) == 3
        by_value = {d.value(): dict(d.headers() or []) for d in dead}
        headers = by_value[b"\x00\x00\x00\x00\x01garbage"]
        assert headers["dlq.error.class"] == b"libs.serde.errors.DeserializationError"
        assert b"cannot decode" in headers["dlq.error.message"]
        assert headers["traceparent"] == b"00-abc-def-01"  # original headers kept
        assert headers["dlq.source.topic"] == topic.encode()
        assert headers["dlq.service"] == b"enricher"
        assert int(headers["dlq.source.offset"]) >= 0
        assert headers["dlq.source.partition"] in (b"0", b"1", b"2")
        assert all(d.key() == b"org-1" for d in dead)
        unknown = by_value[b"\x00\x7f\xff\xff\xf0unknown schema id"]
        assert b"not found" in unknown["dlq.error.message"]  # poison, not "retry later"
        invalid_headers = by_value[h.encode(topic, invalid)]
        assert invalid_headers["dlq.error.class"] == b"services.enricher.app.InvalidEventError"
        assert b"org_id is empty" in invalid_headers["dlq.error.message"]
        wait_until(
            lambda: (
                e.metric("enricher_dropped_total", reason="not_from_provisioning") == 1
                and e.metric("enricher_parked_events") == 1
            ),
            message="drop and park counted",
        )
    finally:
        logs = e.stop()
    [stopped] = [line for line in logs if line.get("msg") == "enricher stopped"]
    assert stopped["consumed"] == 6 and stopped["dead_lettered"] == 3
    assert stopped["outcomes"] == {
        f"{CONNECTOR}/dm": 1,
        f"{CONNECTOR}/dropped": 1,
        f"{CONNECTOR}/parked": 1,
    }
    # offsets committed on the way out
    c = Consumer({"bootstrap.servers": h.bootstrap, "group.id": h.group})
    try:
        parts = [TopicPartition(topic, p) for p in range(3)]
        committed = [tp.offset for tp in c.committed(parts, timeout=10)]
        ends = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
        assert [max(o, 0) for o in committed] == ends
    finally:
        c.close()
