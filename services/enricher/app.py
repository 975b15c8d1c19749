"""The enricher's composition root: tables, gate, loop, metrics; the core decides everything.

Start order matters:

1. ensure every CONTRACT topic exists (dead-letter topics included);
2. load both lookup tables up to the high watermarks snapshotted at start (the *gate*), so an
   event is never joined against a table that has not yet seen records written before it;
3. only then consume events: one ``ProcessingLoop`` over every pipeline's source topic, the
   handler dispatching by topic; before each poll the tables apply what they have fetched
   since (live following), so updates reach the next batch of events.

Invalid lookup records are dead-lettered to ``<table topic>.dlq`` by a plain producer (they are
not part of the loop's transactions: the tables keep their own offsets in RocksDB) and skipped;
a lookup record whose schema the registry cannot serve right now is not invalid: the table
waits at it (``libs.tables``), and the enricher stays not ready until the registry answers.
Invalid events are dead-lettered by the loop inside its transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Message, Producer
from prometheus_client import Counter
from pydantic_settings import BaseSettings

from libs.kafka import (
    DeadLetterPublisher,
    Emitter,
    Guarantee,
    InvalidRecordError,
    KafkaSettings,
    LoopConfig,
    ProcessingLoop,
    RetryLater,
    ensure_topics,
    plain_produce,
)
from libs.runtime import HealthServer, install_stop_handlers
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
    wait_for_registry,
)
from libs.tables import GlobalTable, avro_table, bootstrap_all
from services.common.settings import CommonSettings, TopicSettings
from services.enricher.core import Alert, Drop, Miss, Outcome, Pipeline, invalid_reason, process
from services.enricher.pipelines import PIPELINES
from services.enricher.settings import EnricherSettings

log = logging.getLogger(__name__)

SERVICE = "enricher"
#: how long the loop may go without polling before /healthz fails (a wedged process)
LIVENESS_STALL_S = 60.0
#: how long the loop may go without polling before /readyz fails
READINESS_STALL_S = 15.0

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


@dataclass(frozen=True)
class _Source:
    """One consumed topic: its pipeline and the decoder of its record type."""

    pipeline: Pipeline[Any]
    decode: AvroDeserializer[Any]


class Enricher:
    """The running service; ``run()`` blocks until ``stop`` is set."""

    def __init__(
        self,
        common: CommonSettings,
        topics: TopicSettings,
        settings: EnricherSettings,
        *,
        stop: threading.Event,
        registry: SchemaRegistry | None = None,
    ) -> None:
        self._common = common
        self._topics = topics
        self._settings = settings
        self._stop = stop
        self._kafka: KafkaSettings = common.kafka(SERVICE)
        self._registry = registry or common.registry()
        self._encode = AvroSerializer(self._registry, SlackMessage)
        self._out_topic = topics.slack_messages
        self._sources: dict[str, _Source] = {}
        for pipeline in PIPELINES:
            topic = str(getattr(topics, pipeline.source_topic_setting))
            configured = pipeline.with_link_templates(settings.link_overrides(pipeline.name))
            self._sources[topic] = _Source(
                configured, AvroDeserializer(self._registry, pipeline.record_type)
            )
        self._dlq_producer = Producer(self._kafka.producer_config())
        self._table_dlq = DeadLetterPublisher(plain_produce(self._dlq_producer), SERVICE)
        self.owners: GlobalTable[CsdrAssignment] = self._table(
            "csdr_assignment", topics.data_csdr_assignment, CsdrAssignment
        )
        self.users: GlobalTable[SlackUser] = self._table(
            "slack_users", topics.data_slack_users, SlackUser
        )
        self.tables = (self.owners, self.users)
        self.outcomes: Tally[tuple[str, str]] = Tally()
        self.loop: ProcessingLoop | None = None

    # -- tables ----------------------------------------------------------------------------
    def _table(self, name: str, topic: str, record_type: type[Any]) -> GlobalTable[Any]:
        return avro_table(
            record_type,
            name=name,
            topic=topic,
            state_dir=Path(self._settings.state_dir),
            consumer_config=self._kafka.consumer_config(None),
            registry=self._registry,
            dead_letters=self._table_dlq,
        )

    def _follow_tables(self) -> None:
        """Apply whatever the tables fetched since the last call (the loop's ``on_idle``)."""
        for table in self.tables:
            # drain what is already fetched, so updates reach the next batch of events
            while table.poll(max_records=1000) >= 1000:
                pass
        self._dlq_producer.poll(0)

    # -- events ----------------------------------------------------------------------------
    def handle(self, msg: Message, out: Emitter) -> None:
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
            _retry_if_registry_down(exc)
            raise
        problem = invalid_reason(event)
        if problem is not None:
            INVALID_EVENTS.labels(pipeline.name).inc()
            raise InvalidEventError(f"{pipeline.name}: {problem}")
        try:
            outcome = process(
                event,
                pipeline=pipeline,
                owners=self.owners,
                users=self.users,
                now=datetime.now(UTC),
                fallback_channel=self._settings.fallback_channel,
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
        self.outcomes[(pipeline, outcome)] += 1
        EVENTS.labels(pipeline, outcome).inc()

    def _loop_consumer_config(self) -> dict[str, Any]:
        conf = self._kafka.consumer_config(self._settings.group_id)
        conf["session.timeout.ms"] = self._settings.session_timeout_ms
        if self._settings.group_instance_id is not None:
            # Static membership: a restart within session.timeout.ms gets its partitions back
            # without a rebalance of the whole group (and without restoring their state).
            conf["group.instance.id"] = self._settings.group_instance_id
        return conf

    # -- health ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once every table passed the gate and while the loop keeps polling."""
        tables = {t.name: t.status() for t in self.tables}
        loop_ok = self.loop is not None and _since(self.loop.last_poll) < READINESS_STALL_S
        ok = all(t.ready() for t in self.tables) and loop_ok
        return ok, {"tables": tables, "loop_running": loop_ok}

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while loading tables, and while the loop polls."""
        if self.loop is None:
            return True, {"phase": "loading tables"}
        stalled = _since(self.loop.last_poll)
        return stalled < LIVENESS_STALL_S, {"seconds_since_poll": round(stalled, 1)}

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Ensure topics, pass the gate, run the loop until stopped; the exit code."""
        guarantee = Guarantee(self._settings.processing_guarantee)
        txn_id = self._settings.effective_transactional_id()
        log.info(
            "enricher starting",
            extra={
                "kafka": self._kafka.masked(),
                "schema_registry_url": self._common.schema_registry_url,
                "group_id": self._settings.group_id,
                "guarantee": guarantee.value,
                "transactional_id": txn_id if guarantee is Guarantee.EXACTLY_ONCE else None,
                "state_dir": str(self._settings.state_dir),
                "fallback_channel": self._settings.fallback_channel,
                "sources": {t: s.pipeline.name for t, s in self._sources.items()},
                "tables": {t.name: t.topic for t in self.tables},
                "output": self._out_topic,
                "link_templates": self._settings.link_templates,
                "metrics_port": self._common.metrics_port,
            },
        )
        ensure_topics(self._kafka.client_config(), self._topics.all_specs())
        health = None
        if self._common.metrics_port:
            health = HealthServer(
                self._common.metrics_port, liveness=self.liveness, readiness=self.readiness
            ).start()
        started = time.monotonic()
        try:
            if not wait_for_registry(self._registry, self._stop):
                log.info("stopped while waiting for the schema registry")
                return 0
            bootstrap_all(self.tables, self._stop)
            self._dlq_producer.flush(10)
            if self._stop.is_set():
                log.info("stopped while loading tables")
                return 0
            self.loop = ProcessingLoop(
                LoopConfig(
                    name=SERVICE,
                    topics=list(self._sources),
                    guarantee=guarantee,
                    checkpoint_interval_s=self._settings.checkpoint_interval_s,
                ),
                self._loop_consumer_config(),
                self._kafka.producer_config(transactional_id=txn_id),
                self.handle,
                service=SERVICE,
                stop=self._stop,
                on_idle=self._follow_tables,
            )
            stats = self.loop.run()
        finally:
            for table in self.tables:
                table.close()
            self._dlq_producer.flush(10)
            if health is not None:
                health.stop()
        log.info(
            "enricher stopped",
            extra={
                "seconds": round(time.monotonic() - started, 1),
                "consumed": stats.consumed,
                "produced": stats.produced,
                "dead_lettered": stats.dead_lettered,
                "checkpoints": stats.checkpoints,
                "aborts": stats.aborts,
                "outcomes": {f"{p}/{o}": n for (p, o), n in sorted(self.outcomes.items())},
                "tables": {
                    t.name: {"applied": t.applied_total, "invalid": t.invalid_total}
                    for t in self.tables
                },
            },
        )
        return 0


def _retry_if_registry_down(exc: DeserializationError) -> None:
    # An unreachable registry is not the record's fault: replay it later instead of
    # dead-lettering a valid event.
    if exc.registry_unavailable:
        raise RetryLater(f"schema registry unavailable: {exc}", delay_s=5.0) from exc


def _since(monotonic_ts: float) -> float:
    return time.monotonic() - monotonic_ts


def build_and_run(settings: list[BaseSettings]) -> int:
    """``run_service`` entry point: settings in, exit code out."""
    common, topics, enricher = settings
    assert isinstance(common, CommonSettings)
    assert isinstance(topics, TopicSettings)
    assert isinstance(enricher, EnricherSettings)
    stop = install_stop_handlers()
    return Enricher(common, topics, enricher, stop=stop).run()
