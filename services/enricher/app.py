"""The enricher's composition root: tables, gate, loop, metrics; the core decides everything.

Start order matters (``libs.runtime.service`` calls these hooks in this order):

1. ``topics()``: ensure every CONTRACT topic exists (dead-letter topics included);
2. ``bootstrap()``, once the registry answers: load both lookup tables up to the high
   watermarks snapshotted at start (the *gate*), so an event is never joined against a table
   that has not yet seen records written before it;
3. ``run()``: only then consume events: one ``ProcessingLoop`` over every pipeline's source
   topic, the handler dispatching by topic; before each poll the tables apply what they have
   fetched since (live following), so updates reach the next batch of events.

Alert lifecycle (``lifecycle.py``; on unless ``ENRICHER_DEDUP_WINDOW_S``, every per-pipeline
window and ``ENRICHER_PARK_TTL_S`` are 0): open groups and parked events are the loop's
per-input-partition state (``libs.state``: RocksDB under ``<state dir>/lifecycle`` with a
compacted changelog ``<group>-<input topic>-changelog``, written in the checkpoint's
transaction); the punctuator expires them and routes parked events when the tables report
the key they waited for (``GlobalTable.on_change``, set after the gate).

Invalid lookup records are dead-lettered to ``<table topic>.dlq`` by a plain producer (they are
not part of the loop's transactions: the tables keep their own offsets in RocksDB) and skipped;
a lookup record whose schema the registry cannot serve right now is not invalid: the table
waits at it (``libs.tables``), and the enricher stays not ready until the registry answers.
Invalid events are dead-lettered by the loop inside its transaction.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from libs.kafka import (
    DeadLetterPublisher,
    Guarantee,
    KafkaSettings,
    LoopConfig,
    LoopStats,
    ProcessingLoop,
    TopicSpec,
    plain_produce,
)
from libs.runtime import StartRefusedError, seconds_since
from libs.serde import (
    CsdrAssignment,
    SchemaRegistry,
    SlackUser,
)
from libs.state.changelog import ensure_changelogs
from libs.state.errors import ChangelogTopicError
from libs.state.stores import StateStores
from libs.tables import GlobalTable, avro_table, bootstrap_all
from services.common.settings import CommonSettings, TopicSettings
from services.enricher.core import Pipeline
from services.enricher.handler import (
    EventHandler,
    InvalidEventError,
    LifecycleConfig,
    LifecycleCounts,
)
from services.enricher.malloc import tune_malloc
from services.enricher.pipelines import PIPELINES
from services.enricher.punctuator import LifecyclePunctuator
from services.enricher.settings import EnricherSettings

# InvalidEventError: the dead-letter header names it as services.enricher.app.InvalidEventError
__all__ = ["Enricher", "InvalidEventError"]

log = logging.getLogger(__name__)

SERVICE = "enricher"
#: how long the loop may go without polling before /healthz fails (a wedged process)
LIVENESS_STALL_S = 60.0
#: how long the loop may go without polling before /readyz fails
READINESS_STALL_S = 15.0
#: the loop producer's linger with exactly-once (see ``_loop_producer_config``)
LOOP_LINGER_MS = 100


def lifecycle_config(
    settings: EnricherSettings, pipelines: Iterable[Pipeline[Any]]
) -> LifecycleConfig | None:
    """The alert lifecycle's settings, or ``None`` when grouping and parking are both off."""
    windows = {
        p.name: int(settings.dedup_window(p.name) * 1000)
        for p in pipelines
        if p.dedup_key is not None and settings.dedup_window(p.name) > 0
    }
    park_ttl_ms = int(settings.park_ttl_s * 1000)
    if not windows and park_ttl_ms <= 0:
        return None  # no state at all: the loop runs as it did before the lifecycle
    return LifecycleConfig(windows, park_ttl_ms)


def release_freed_heap() -> bool:
    """Return the heap freed since start to the OS (``malloc_trim``); ``False`` without glibc.

    A cold table load passes millions of records through librdkafka and Python and frees them;
    glibc kept most of that in its arenas, so the process kept near the load's peak as its
    resident set for good (tests/perf/ENRICHER.md, enr10).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing kept that a trim would return
        return False
    libc.malloc_trim(0)
    return True


class Enricher:
    """The enricher as a ``libs.runtime.Service``; ``run()`` blocks until ``stop`` is set."""

    def __init__(
        self,
        common: CommonSettings,
        topics: TopicSettings,
        settings: EnricherSettings,
        *,
        registry: SchemaRegistry,
        stop: threading.Event,
    ) -> None:
        self._topics = topics
        self._settings = settings
        self._stop = stop
        self._kafka: KafkaSettings = common.kafka(SERVICE)
        self._registry = registry
        self._out_topic = topics.slack_messages
        self._pipelines: dict[str, Pipeline[Any]] = {
            str(getattr(topics, p.source_topic_setting)): p.with_link_templates(
                settings.link_overrides(p.name)
            )
            for p in PIPELINES
        }
        self._dlq_producer = Producer(self._kafka.producer_config())
        self._table_dlq = DeadLetterPublisher(plain_produce(self._dlq_producer), SERVICE)
        self.owners: GlobalTable[CsdrAssignment] = self._table(
            "csdr_assignment", topics.data_csdr_assignment, CsdrAssignment
        )
        self.users: GlobalTable[SlackUser] = self._table(
            "slack_users", topics.data_slack_users, SlackUser
        )
        self.tables = (self.owners, self.users)
        self.lifecycle = lifecycle_config(settings, self._pipelines.values())
        counts = LifecycleCounts()
        # the hot path (services/enricher/handler.py); the loop calls it once per event
        self.handle = EventHandler(
            self._registry,
            self._pipelines,
            self.owners,
            self.users,
            out_topic=self._out_topic,
            fallback_channel=settings.fallback_channel,
            lifecycle=self.lifecycle,
            counts=counts,
        )
        self.punctuator = LifecyclePunctuator(
            self._registry,
            self._pipelines,
            self.owners,
            self.users,
            out_topic=self._out_topic,
            counts=counts,
        )
        self.outcomes = self.handle.outcomes
        self.loop: ProcessingLoop | None = None
        self._aborts_seen = 0
        self._stats = LoopStats()

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
        loop = self.loop
        if loop is not None and loop.stats.aborts != self._aborts_seen:
            # an abort dropped the lifecycle's uncommitted writes (parks routed, counts)
            self._aborts_seen = loop.stats.aborts
            self.punctuator.resweep()
        for table in self.tables:
            # drain what is already fetched, so updates reach the next batch of events
            while table.poll(max_records=1000) >= 1000:
                pass
        self._dlq_producer.poll(0)

    # -- events ----------------------------------------------------------------------------
    def _loop_producer_config(self, transactional_id: str) -> dict[str, Any]:
        conf = self._kafka.producer_config(transactional_id=transactional_id)
        if self._settings.processing_guarantee == Guarantee.EXACTLY_ONCE.value:
            # Nothing of a transaction is visible before its commit, and the commit sends
            # whatever is still lingering at once (librdkafka's flush ignores linger.ms): a
            # linger shorter than the checkpoint interval only cut each partition's outputs
            # into more, smaller produce requests. With 5 ms librdkafka's broker thread spent
            # 8-18 µs per 2.4 KB output (lz4, requests, responses), with 100 ms 1-2 µs
            # (tests/perf/ENRICHER.md, "Service-side costs"); at-least-once keeps 5 ms, as its
            # outputs are visible as soon as they are acknowledged.
            conf["linger.ms"] = min(
                LOOP_LINGER_MS, int(self._settings.checkpoint_interval_s * 1000)
            )
        if self.lifecycle is None:
            # Without state the loop's producer only records failed deliveries (and the
            # checkpoint's flush or transaction commit fails on them anyway): a delivery
            # report, a Message object and a Python callback per delivered alert were pure
            # cost. With the lifecycle's state the changelog position stored with the local
            # state comes from a success report (libs.state.stores): with failures only, it
            # would never move and every restart would re-read all written since the last restore.
            conf["delivery.report.only.error"] = True
        return conf

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
        loop_ok = self.loop is not None and seconds_since(self.loop.last_poll) < READINESS_STALL_S
        ok = all(t.ready() for t in self.tables) and loop_ok
        return ok, {"tables": tables, "loop_running": loop_ok}

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while loading tables, and while the loop polls."""
        if self.loop is None:
            return True, {"phase": "loading tables"}
        stalled = seconds_since(self.loop.last_poll)
        return stalled < LIVENESS_STALL_S, {"seconds_since_poll": round(stalled, 1)}

    # -- lifecycle hooks (libs.runtime.Service) ---------------------------------------------
    def config(self) -> dict[str, object]:
        """The enricher's effective settings for the start line."""
        guarantee = Guarantee(self._settings.processing_guarantee)
        txn_id = self._settings.effective_transactional_id()
        return {
            "group_id": self._settings.group_id,
            "guarantee": guarantee.value,
            "transactional_id": txn_id if guarantee is Guarantee.EXACTLY_ONCE else None,
            "state_dir": str(self._settings.state_dir),
            "fallback_channel": self._settings.fallback_channel,
            "sources": {t: p.name for t, p in self._pipelines.items()},
            "tables": {t.name: t.topic for t in self.tables},
            "output": self._out_topic,
            "link_templates": self._settings.link_templates,
            "lifecycle": None
            if self.lifecycle is None
            else {
                "dedup_window_ms": dict(self.lifecycle.windows_ms),
                "park_ttl_ms": self.lifecycle.park_ttl_ms,
            },
        }

    def topics(self) -> list[TopicSpec]:
        """Every CONTRACT topic, dead-letter topics included."""
        return self._topics.all_specs()

    def prepare(self) -> None:
        """The lifecycle's changelogs, one partition per partition of each input topic.

        Created here, once the input topics exist: their partition counts are read from the
        cluster (an input topic created elsewhere keeps its own count).
        """
        if self.lifecycle is None:
            return
        try:
            created = ensure_changelogs(
                self._kafka.client_config(),
                self._settings.group_id,
                list(self._pipelines),
                replication_factor=self._topics.replication_factor,
            )
        except ChangelogTopicError as exc:
            raise StartRefusedError(f"lifecycle state changelog: {exc}") from exc
        if created:
            log.info("created changelog topics", extra={"topics": created})

    def bootstrap(self) -> None:
        """The gate: both tables loaded up to the high watermarks of the start."""
        bootstrap_all(self.tables, self._stop)
        self._dlq_producer.flush(10)
        # the load's records are freed: give their memory back (kept as RSS for good otherwise)
        release_freed_heap()
        if self._settings.malloc_tune:
            # only now: the load ran with glibc's defaults (its peak unchanged), the batches
            # that follow keep their heap top instead of trimming it per batch
            log.info("%s", tune_malloc())

    def run(self) -> None:
        """Consume every pipeline's source topic until stopped."""
        guarantee = Guarantee(self._settings.processing_guarantee)
        consumer_config = self._loop_consumer_config()
        state = None
        if self.lifecycle is not None:
            state = StateStores(
                "lifecycle",
                Path(self._settings.state_dir),
                self._settings.group_id,
                consumer_config,
            )
            # after the gate: the punctuator hears of live changes only (parks restored with
            # their partition are checked against the tables when it first sees them)
            self.owners.on_change = self.punctuator.note_owners
            self.users.on_change = self.punctuator.note_users
        self.loop = ProcessingLoop(
            LoopConfig(
                name=SERVICE,
                topics=list(self._pipelines),
                guarantee=guarantee,
                checkpoint_interval_s=self._settings.checkpoint_interval_s,
            ),
            consumer_config,
            self._loop_producer_config(self._settings.effective_transactional_id()),
            self.handle,
            service=SERVICE,
            stop=self._stop,
            on_idle=self._follow_tables,
            # the outcomes counted in the hot path reach enricher_events_total once per checkpoint
            on_checkpoint=self.handle.publish_counts,
            state=state,
            punctuate=self.punctuator if state is not None else None,
        )
        self._stats = self.loop.run()

    def close(self) -> None:
        """Publish the last outcomes, close the tables, flush the tables' dead letters."""
        self.handle.publish_counts()  # a loop stopped by an error has not checkpointed them
        for table in self.tables:
            table.close()
        self._dlq_producer.flush(10)

    def counts(self) -> dict[str, object]:
        """Loop counts, outcomes by pipeline, applied and invalid table records."""
        stats = self._stats
        return {
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
        }
