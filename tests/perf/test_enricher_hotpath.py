"""The enricher's per-event hot path in-process: CPU per event without Kafka, and its profile.

``EventHandler`` (decode, validate, look up, route and render, encode, produce, count) runs
over pre-encoded events against dict lookups and an emitter that only collects, so the figure
is the service's own Python cost per event, free of broker and scheduling noise; the Kafka
benchmark (``test_enricher_perf.py``) adds the client, loop and table costs. The event mix is
that benchmark's: half connector failures with a long error, half onboardings, ~2% of orgs
unknown (fallback channel). ``BENCH_PROFILE=1`` also prints the top of a cProfile (sorted by
``BENCH_SORT``, default ``tottime``).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import random
import statistics
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import pytest

from libs.serde import (
    AvroSerializer,
    ConnectorStatusChanged,
    CsdrAssignment,
    InMemorySchemaRegistry,
    OnboardingStarted,
    SlackUser,
)
from services.enricher.core import Alert, route, slack_user_key
from services.enricher.handler import EventHandler, LifecycleConfig
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING
from tests.support.enricher_corpus import ConsumedRecord, DictLookup, ListEmitter

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
KEYS = 100_000
EVENTS = int(os.environ.get("BENCH_HOTPATH_EVENTS", "20000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ERROR = "org.apache.kafka.connect.errors.ConnectException: " + "Access denied to bucket. " * 8
NOTIF, ONB = "data-notifications-pipeline", "onboarding-events"


class HotPathInputs(NamedTuple):
    """The hot-path benches' tables and events (shared with the lifecycle's bench)."""

    registry: InMemorySchemaRegistry
    owners: DictLookup[CsdrAssignment]
    users: DictLookup[SlackUser]
    records: list[ConsumedRecord]


def hot_path_inputs() -> HotPathInputs:
    """``KEYS`` owners and users, and ``EVENTS`` events: half failures, half onboardings,
    2 % of them for orgs without an owner."""
    registry = InMemorySchemaRegistry()
    owners = DictLookup(
        {
            f"org-{i}": CsdrAssignment(
                f"org-{i}", f"Org {i}", f"Owner-{i}@Example.com", T0, f"Owner {i}"
            )
            for i in range(KEYS)
        }
    )
    users = DictLookup(
        {
            f"owner-{i}@example.com": SlackUser(f"owner-{i}@example.com", f"U{i:07d}", T0)
            for i in range(KEYS)
        }
    )
    enc_failure = AvroSerializer(registry, ConnectorStatusChanged)
    enc_onboarding = AvroSerializer(registry, OnboardingStarted)
    rng = random.Random(42)
    records = []
    for seq in range(EVENTS):
        org = f"org-{rng.randrange(int(KEYS * 1.02))}"
        event: Any
        if seq % 2:
            event = ConnectorStatusChanged(
                f"ev-{seq}", org, "env-1", "lkc-1", f"lcc-{seq}", f"conn-{seq}", "S3Sink",
                "PROVISIONING", "FAILED", T0, ERROR,
            )  # fmt: skip
            records.append(ConsumedRecord(NOTIF, enc_failure(NOTIF, event)))
        else:
            event = OnboardingStarted(
                f"onb-{seq}", org, f"Org {org}", "Standard", T0, "onboarding", "AWS"
            )
            records.append(ConsumedRecord(ONB, enc_onboarding(ONB, event)))
    return HotPathInputs(registry, owners, users, records)


def hot_path_handler(
    inputs: HotPathInputs, lifecycle: LifecycleConfig | None = None
) -> EventHandler:
    """The service's handler over ``inputs``' tables (with ``lifecycle``: grouping on)."""
    return EventHandler(
        inputs.registry,
        {NOTIF: CONNECTOR, ONB: ONBOARDING},
        inputs.owners,
        inputs.users,
        out_topic="slack-messages",
        fallback_channel="C0FALLBACK",
        lifecycle=lifecycle,
    )


def _setup() -> tuple[EventHandler, list[ConsumedRecord], ListEmitter]:
    inputs = hot_path_inputs()
    return hot_path_handler(inputs), inputs.records, ListEmitter()


def _run(handler: EventHandler, records: list[ConsumedRecord], out: ListEmitter) -> float:
    """CPU microseconds per event over one pass."""
    out.records.clear()
    started = time.process_time()
    for record in records:
        handler(record, out)  # type: ignore[arg-type]
    spent = time.process_time() - started
    assert len(out.records) == len(records)  # every event of the mix is an alert
    return spent / len(records) * 1e6


@pytest.mark.perf
def test_enricher_hot_path() -> None:
    handler, records, out = _setup()
    _run(handler, records[:1000], out)  # warm caches (schemas, metric children)
    figures = [_run(handler, records, out) for _ in range(RUNS)]
    print(
        f"\nenricher hot path in-process ({EVENTS} events, medians of {RUNS}): "
        f"{statistics.median(figures):.1f} µs CPU per event "
        f"(runs: {', '.join(f'{f:.1f}' for f in figures)})"
    )
    if os.environ.get("BENCH_PROFILE"):
        profile = cProfile.Profile()
        profile.enable()
        _run(handler, records, out)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(
            os.environ.get("BENCH_SORT", "tottime")
        ).print_stats(25)
        print(text.getvalue())


def _min_us(call: Any, number: int = 20_000, repeat: int = 7) -> float:
    """CPU microseconds per call of ``call()``: the minimum of ``repeat`` timings (the least
    disturbed by other processes on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(number):
            call()
        best = min(best, time.process_time() - started)
    return best / number * 1e6


def _whole(handler: EventHandler, record: ConsumedRecord, out: ListEmitter) -> None:
    handler(record, out)  # type: ignore[arg-type]
    out.records.clear()


def _routed(
    handler: EventHandler,
    pipeline: Any,
    event: Any,
    owner: CsdrAssignment,
    user: SlackUser | None,
    out: ListEmitter,
) -> None:
    alert = route(event, owner, user, pipeline=pipeline, now=T0, fallback_channel="C0")
    assert isinstance(alert, Alert)
    handler._produce(alert.message, out, alert.blocks_utf8)  # type: ignore[arg-type]
    out.records.clear()


@pytest.mark.perf
def test_enricher_hot_path_pieces() -> None:
    """One event of each kind, repeated: the handler, the event's decode, and ``route`` with
    the message's encode; far less sensitive to the machine's load than the mix above, so
    two commits compare on a busy machine (a change of ~1 µs shows)."""
    handler, records, out = _setup()
    _run(handler, records[:1000], out)
    failure = next(r for r in records if r.topic() == NOTIF)
    onboarding = next(r for r in records if r.topic() == ONB)
    inputs = hot_path_inputs()
    lines = []
    for record, pipeline in ((failure, CONNECTOR), (onboarding, ONBOARDING)):
        decode = handler._sources[record.topic()].decode.decode
        event = decode(record.value(), record.topic(), 0, 0)
        owner = inputs.owners.get(event.org_id)
        assert owner is not None
        user = inputs.users.get(slack_user_key(owner.csdr_email))
        lines.append(
            f"{pipeline.name}: handler {_min_us(partial(_whole, handler, record, out)):.2f}, "
            f"decode {_min_us(partial(decode, record.value(), 't', 0, 0)):.2f}, route + encode "
            f"{_min_us(partial(_routed, handler, pipeline, event, owner, user, out)):.2f} µs CPU"
        )
    print("\nenricher hot path, one event repeated (min of 7 x 20k):\n" + "\n".join(lines))
