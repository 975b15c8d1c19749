"""Reliability of the whole pipeline on the shared session stack: poison input, kill -9 of
every service at seeded points of a stream, Slack 429/5xx/timeout storms, the schema registry
unavailable at start, and a lookup topic of a million keys across enricher restarts.

Each scenario ends with the audit of ``tests/e2e/harness.py``: every input delivered once,
filtered, dead-lettered or missed with a reason; no duplicate Slack post; no record written
twice by the exactly-once services; no secret in any log.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random

import pytest

from libs.serde import AvroSerializer, CsdrAssignment
from tests.e2e.harness import (
    DELIVERABLE_CHANNELS,
    ORG_IDS,
    SERVICES,
    StreamSpec,
    World,
    proxy,
    raw_producer,
)
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack_env(stack: Stack) -> dict[str, str]:
    return dict(stack.env)


def test_poison_on_every_input_topic(stack_env: dict[str, str], tmp_path: Path) -> None:
    """No fault but bad input everywhere (garbage, unknown schema ids, a null value, a blank
    org id, an unmappable warehouse row): each ends in its dead-letter topic, the rest flows."""
    with World("poison", tmp_path, stack_env) as w:
        w.start()
        w.stream(StreamSpec(duration_s=12, connectors=30, rows=16), Random(1))
        report = w.finish()
    report.assert_ok()


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_kill9_of_every_service_mid_stream(
    seed: int, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Each service is killed with SIGKILL twice at seeded points of the stream and restarted
    at once; one of the notifier's kills lands while a Slack post is in flight (Slack stored
    it, the answer is held back), so the restart must find it in the history, not repost."""
    rng = Random(seed)
    spec = StreamSpec(duration_s=24, connectors=40, rows=24)
    kills = sorted(
        (round(rng.uniform(1.0, spec.duration_s - 2.0), 1), svc) for svc in SERVICES for _ in "ab"
    )
    mid_post_at = max(at for at, svc in kills if svc == "notifier")
    caught: list[bool] = []
    with World(f"kill9-seed{seed}", tmp_path, stack_env) as w:
        w.start()
        faults = [
            (at, f"kill -9 {svc}", lambda s=svc: w.fleet.kill9(s))
            for at, svc in kills
            if not (svc == "notifier" and at == mid_post_at)
        ]
        faults.append(
            (
                mid_post_at,
                "kill -9 notifier mid-post",
                lambda: caught.append(w.kill_notifier_mid_post()),
            )
        )
        w.stream(spec, rng, faults)
        report = w.finish(
            notes=["kill -9 at " + ", ".join(f"{s}@{at}s" for at, s in kills)],
        )
        found = w.count_logs("notifier", "in-doubt post found in the history, not posting again")
        report.notes.append(f"notifier: {found} in-doubt posts found in the history after a kill")
    report.assert_ok()
    assert caught == [True], "the notifier was never killed with a post in flight"
    assert found >= 1, "the post in flight at the kill was not checked in the history"


def test_slack_429_and_5xx_storms(stack_env: dict[str, str], tmp_path: Path) -> None:
    """Slack rate-limits harder than the notifier paces itself, then answers a storm of 429s,
    a storm of 500/503s, and answers slower than the client timeout after posting (in doubt):
    every alert is delivered once, none is given up."""
    env = {
        "NOTIFIER_SLACK_TIMEOUT_S": "1",
        "NOTIFIER_RATE_PER_CHANNEL_PER_S": "20",
        "NOTIFIER_RATE_BURST": "5",
        "NOTIFIER_MAX_ATTEMPTS": "12",
    }
    with World("slack-storms", tmp_path, stack_env, extra_env=env) as w:
        w.slack.enforce_rate_limit(2.0, burst=1)  # below the notifier's own pace: 429s
        w.start()

        def slow_answers() -> None:
            for channel in DELIVERABLE_CHANNELS:  # not GONE_CHANNEL: Slack refuses that one
                w.slack.slow(channel, delay_s=2.5, times=2, then_store=True)

        faults = [
            (2.0, "429 storm", lambda: w.slack.rate_limit(None, retry_after_s=1, times=25)),
            (8.0, "500 storm", lambda: w.slack.server_error(None, 500, times=8)),
            (
                9.0,
                "503 storm",
                lambda: w.slack.server_error(None, 503, error="service_unavailable", times=8),
            ),
            (14.0, "answers after the client timeout", slow_answers),
        ]
        w.stream(StreamSpec(duration_s=20, connectors=36, rows=20), Random(7), faults)
        report = w.finish(timeout_s=180)
        posts = w.slack.calls(method="chat.postMessage")
        answered = {
            code: sum(1 for c in posts if c.status == code) for code in (200, 429, 500, 503)
        }
        slow = sum(1 for c in posts if c.behaviour == "slow")
        found = w.count_logs("notifier", "in-doubt post found in the history, not posting again")
        report.notes.append(
            f"Slack answered chat.postMessage {answered}, {slow} answers held past the client "
            f"timeout; {found} in-doubt posts found in the history"
        )
    report.assert_ok()
    assert answered[429] >= 25 and answered[500] >= 8 and answered[503] >= 8, answered
    assert slow >= 1 and found >= 1, (slow, found)


def test_registry_unavailable_at_start(stack_env: dict[str, str], tmp_path: Path) -> None:
    """The services start while the schema registry refuses connections, with work waiting
    for each of them (lookup records included). Every one keeps running, says in its log why
    it waits and answers not-ready on /readyz; none exits. Once the registry is back every one
    becomes ready and nothing is lost (a lookup record is never dead-lettered for want of the
    registry)."""
    with (
        proxy(stack_env["SCHEMA_REGISTRY_URL"]) as (registry, url),
        World("registry-down", tmp_path, stack_env, service_registry_url=url) as w,
    ):
        w.fleet.restart_delay_s = 3.0  # a crash loop's back-off
        rng = Random(5)
        now = datetime.now(UTC)
        w.write_warehouse(w.onboarding_rows(rng, 6, now - timedelta(seconds=30), 20))
        w.produce_connectors([w.connector_event(org, "kept") for org in ORG_IDS[:6]])
        w.produce_slack_messages([w.slack_message("U0E2EBO", "sent while the registry is down")])
        w.start(wait=False)
        outage_s = 20.0
        w.fleet.sleep(outage_s)
        behaviour = {}
        for svc in SERVICES:
            proc = w.fleet[svc]
            exits = [e.describe() for e in w.fleet.exits if e.service == svc]
            assert not exits, f"{svc} exited while the registry was down: {exits}"
            assert proc.alive(), proc.tail()
            assert not proc.ready(), f"{svc} reports ready while the registry is down"
            waits = [
                r
                for r in proc.log_records()
                if r.get("level") == "WARNING" and "registry" in str(r).lower()
            ]
            assert waits, f"{svc} waits without saying why:\n{proc.tail()}"
            behaviour[svc] = f"waits, not ready: {waits[0].get('msg')}"
        registry.up()
        recovered = time.monotonic()
        w.fleet.wait_ready(timeout_s=120)
        ready_s = time.monotonic() - recovered
        w.stream(StreamSpec(duration_s=8, connectors=12, rows=6), rng)
        report = w.finish(
            notes=[f"{svc}: {b}" for svc, b in behaviour.items()]
            + [f"all ready {ready_s:.1f}s after the registry came back"],
        )
    report.assert_ok()


@pytest.mark.timeout(900)
def test_lookup_topic_of_a_million_keys_is_not_reread(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """``data-csdr-assignment`` holds 1M keys. After a graceful restart the enricher applies
    only the records written while it was down; after a kill -9 it re-reads only what it had
    not flushed (measured, reported). Alerts for the new and the old keys route correctly."""
    n_keys, n_new = 1_000_000, 2_000
    with World("lookup-1m", tmp_path, stack_env) as w:
        topic = w.topics.data_csdr_assignment
        enc = AvroSerializer(w.test_registry, CsdrAssignment)
        now = datetime.now(UTC)
        owners = ["ana.silva@example.com", "Bo.Chen@Example.com", "dana.kim@example.com"]
        values = [enc(topic, CsdrAssignment("org-bulk", "Bulk Customer", o, now)) for o in owners]
        bulk = raw_producer(
            w.bootstrap,
            **{
                "linger.ms": 50,
                "batch.size": 1_000_000,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 500_000,
            },
        )
        started = time.monotonic()
        for i in range(n_keys):
            while True:
                try:
                    bulk.produce(topic, key=b"org-bulk-%07d" % i, value=values[i % 3])
                    break
                except BufferError:
                    bulk.poll(0.01)
        assert bulk.flush(300) == 0
        produce_s = time.monotonic() - started
        for i in (0, 1, 2, n_keys - 1):
            w.orgs[f"org-bulk-{i:07d}"] = ("Bulk Customer", owners[i % 3])

        enricher = w.fleet["enricher"]
        started = time.monotonic()
        w.fleet.start()
        w.fleet.wait_ready(timeout_s=600)
        cold_s = time.monotonic() - started
        cold = enricher.metric("table_records_applied_total", table="csdr_assignment")
        assert cold >= n_keys

        # kill -9 right after the gate: what was not flushed yet is read again
        enricher.kill9()
        started = time.monotonic()
        enricher.start()
        w.fleet.wait_ready("enricher", timeout_s=600)
        after_kill = enricher.metric("table_records_applied_total", table="csdr_assignment")
        after_kill_s = time.monotonic() - started

        # a graceful restart with new keys written while it is down
        assert enricher.terminate() == 0
        for i in range(n_new):
            key = f"org-new-{i:05d}"
            bulk.produce(topic, key=key.encode(), value=values[i % 3])
            if i < 3:
                w.orgs[key] = ("Bulk Customer", owners[i % 3])
        assert bulk.flush(60) == 0
        started = time.monotonic()
        enricher.start()
        w.fleet.wait_ready("enricher", timeout_s=300)
        warm_s = time.monotonic() - started
        warm = enricher.metric("table_records_applied_total", table="csdr_assignment")
        resumed = [r for r in enricher.log_records() if r.get("msg") == "table bootstrap started"]

        events = [
            w.connector_event(org, "kept")
            for org in (
                "org-bulk-0000000",
                "org-bulk-0000001",
                f"org-bulk-{n_keys - 1:07d}",
                "org-new-00000",
                "org-new-00001",
                "org-new-00002",
            )
        ]
        w.produce_connectors(events)
        w.stream(StreamSpec(duration_s=6, connectors=10, rows=4), Random(3))
        report = w.finish(
            notes=[
                f"produced {n_keys:,} keys in {produce_s:.0f}s; cold gate {cold_s:.0f}s "
                f"({cold:,.0f} applied)",
                f"after kill -9 right after the gate: re-applied {after_kill:,.0f} records "
                f"(ready in {after_kill_s:.1f}s)",
                f"after SIGTERM + {n_new} new records: applied {warm:,.0f} (ready in "
                f"{warm_s:.1f}s)",
            ]
        )
    report.assert_ok()
    assert all(r.get("resumed") for r in resumed if r.get("table") == "csdr_assignment")
    assert n_new <= warm <= n_new + 100, f"applied {warm} records at the warm start"
