"""The enricher's per-event shell: decode, validate, look up, route, encode, produce, count.

This is the hot path: it runs once per consumed event, so it is kept apart from the service's
lifecycle (``app.py``) and built only from what it needs (a registry, the pipelines by topic,
two lookups), which also lets the golden corpus and the benchmark drive exactly the code the
service runs. Every decision is the core's; this module only moves bytes and counts.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message
from prometheus_client import Counter

from libs.kafka import Emitter, InvalidRecordError, RetryLater
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    CsdrAssignment,
    DeserializationError,
    RegistryError,
    SchemaRegistry,
    SlackMessage,
    SlackUser,
    encode_key,
)
from services.enricher.core import (
    Alert,
    Drop,
    Lookup,
    Miss,
    Outcome,
    Pipeline,
    invalid_reason,
    process,
)

log = logging.getLogger(__name__)

EVENTS = Counter(
    "enricher_events_total",
    "Events handled, by pipeline and outcome (dm, fallback, dropped, missed)",
    ["pipeline", "outcome"],
)
DROPS = Counter(
    "enricher_dropped_total",
    "Events the pipeline's filter dropped, by reason",
    ["pipeline", "reason"],
)
MISSES = Counter(
    "enricher_join_misses_total",
    "Join misses by reason; action: the alert went to the fallback channel or was dropped",
    ["pipeline", "reason", "action"],
)
INVALID_EVENTS = Counter(
    "enricher_invalid_events_total", "Events dead-lettered as invalid", ["pipeline"]
)


class InvalidEventError(InvalidRecordError):
    """A decodable event that cannot be processed (empty ids); it is dead-lettered."""


# The dead-letter header ``dlq.error.class`` names this class; it kept the name it had before
# the hot path moved here, so what operators filter on does not change (app.py re-exports it).
InvalidEventError.__module__ = "services.enricher.app"


@dataclass(frozen=True)
class _Source:
    """One consumed topic: its pipeline and the decoder of its record type."""

    pipeline: Pipeline[Any]
    decode: AvroDeserializer[Any]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EventHandler:
    """Handles one consumed event (the loop's handler); ``outcomes`` tallies what became of them."""

    def __init__(
        self,
        registry: SchemaRegistry,
        pipelines: Mapping[str, Pipeline[Any]],
        owners: Lookup[CsdrAssignment],
        users: Lookup[SlackUser],
        *,
        out_topic: str,
        fallback_channel: str | None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._sources = {
            topic: _Source(pipeline, AvroDeserializer(registry, pipeline.record_type))
            for topic, pipeline in pipelines.items()
        }
        self._owners = owners
        self._users = users
        self._out_topic = out_topic
        self._fallback_channel = fallback_channel
        self._clock = clock
        self._encode = AvroSerializer(registry, SlackMessage)
        self.outcomes: Tally[tuple[str, str]] = Tally()
        self._events: dict[tuple[str, str], Any] = {}  # bound EVENTS children

    def __call__(self, msg: Message, out: Emitter) -> None:
        """Decode, validate, join and route one event; produce its message, if any."""
        topic = str(msg.topic())
        source = self._sources[topic]
        pipeline = source.pipeline
        try:
            event = source.decode(
                msg.value(),
                topic=topic,
                partition=int(msg.partition() or 0),
                offset=int(msg.offset() or 0),
            )
        except DeserializationError as exc:
            retry_if_registry_down(exc)
            raise
        problem = invalid_reason(event)
        if problem is not None:
            INVALID_EVENTS.labels(pipeline.name).inc()
            raise InvalidEventError(f"{pipeline.name}: {problem}")
        try:
            outcome = process(
                event,
                pipeline=pipeline,
                owners=self._owners,
                users=self._users,
                now=self._clock(),
                fallback_channel=self._fallback_channel,
            )
        except DeserializationError as exc:
            # Table records were validated when applied: failing to decode one now means the
            # registry is unreachable, not that this event is bad.
            raise RetryLater(f"lookup decode failed: {exc}", delay_s=5.0) from exc
        self._act(pipeline.name, event, outcome, out)

    def _act(self, pipeline: str, event: Any, outcome: Outcome, out: Emitter) -> None:
        if isinstance(outcome, Alert):
            message = outcome.message
            try:
                value = self._encode(self._out_topic, message)
            except RegistryError as exc:
                raise RetryLater(f"schema registry unavailable: {exc}", delay_s=5.0) from exc
            out.produce(self._out_topic, encode_key(message.channel), value)
            if outcome.miss is None:
                self._count(pipeline, "dm")
            else:
                self._count(pipeline, "fallback")
                MISSES.labels(pipeline, outcome.miss, "fallback").inc()
        elif isinstance(outcome, Drop):
            self._count(pipeline, "dropped")
            DROPS.labels(pipeline, outcome.reason).inc()
        elif isinstance(outcome, Miss):
            self._count(pipeline, "missed")
            MISSES.labels(pipeline, outcome.reason, "dropped").inc()
            log.info(
                "join miss, alert dropped (no fallback channel)",
                extra={
                    "pipeline": pipeline,
                    "reason": outcome.reason,
                    "org_id": event.org_id,
                    "event_id": event.event_id,
                },
            )

    def _count(self, pipeline: str, outcome: str) -> None:
        key = (pipeline, outcome)
        self.outcomes[key] += 1
        # labels() locks and builds a tuple per call: bind each child once
        child = self._events.get(key)
        if child is None:
            child = self._events[key] = EVENTS.labels(pipeline, outcome)
        child.inc()


def retry_if_registry_down(exc: DeserializationError) -> None:
    """Raise ``RetryLater`` when ``exc`` is an unreachable registry, not a bad record."""
    # An unreachable registry is not the record's fault: replay it later instead of
    # dead-lettering a valid event.
    if exc.registry_unavailable:
        raise RetryLater(f"schema registry unavailable: {exc}", delay_s=5.0) from exc
