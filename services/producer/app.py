"""Composition root: settings -> source, sinks, runners; ``libs.runtime`` runs the lifecycle.

One producer replica per deployment is the contract: each query's transactional id is
``<PRODUCER_TRANSACTIONAL_ID>.<query>``, stable across restarts, so a restarted instance
fences a zombie of the previous one through ``init_transactions`` (and a second replica would
fence the first: run one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from libs.kafka import TopicSpec, dlq_topic
from libs.runtime import seconds_since
from libs.serde import SchemaRegistry
from services.common.settings import CommonSettings, TopicSettings
from services.producer.core import QueryDefinition
from services.producer.queries import ONBOARDING_STARTED
from services.producer.runner import PollLoop, QueryRunner, utc_now
from services.producer.settings import ProducerSettings
from services.producer.sink import KafkaTransactionalSink
from services.producer.sources.base import (
    BigQueryWarehouse,
    DuckDBWarehouse,
    TableRef,
    WarehouseSource,
)

log = logging.getLogger(__name__)

SERVICE = "producer"


def bound_queries(
    settings: ProducerSettings, topics: TopicSettings
) -> list[tuple[QueryDefinition, TableRef, str]]:
    """Every query with its configured table and output topic."""
    return [(ONBOARDING_STARTED, settings.onboarding_table_ref(), topics.onboarding_events)]


def open_source(settings: ProducerSettings) -> WarehouseSource:
    """The source ``PRODUCER_WAREHOUSE`` names (imports only the driver it needs)."""
    warehouse = settings.parsed_warehouse()
    if isinstance(warehouse, BigQueryWarehouse):
        from services.producer.sources.bigquery_source import BigQuerySource

        return BigQuerySource(
            warehouse.project,
            api_endpoint=settings.bigquery_api_endpoint,
            timeout_s=settings.query_timeout_s,
        )
    assert isinstance(warehouse, DuckDBWarehouse)
    from services.producer.sources.duckdb_source import DuckDBSource

    return DuckDBSource(warehouse.path, timeout_s=settings.query_timeout_s)


def topic_specs(settings: ProducerSettings, topics: TopicSettings) -> list[TopicSpec]:
    """The topics the producer writes: outputs, their dead-letter topics, the cursor topic."""
    specs = [topics.spec(topics.producer_cursors, compacted=True)]
    for _, _, output in bound_queries(settings, topics):
        specs += [topics.spec(output), topics.spec(dlq_topic(output))]
    return specs


def build_runners(
    common: CommonSettings,
    topics: TopicSettings,
    settings: ProducerSettings,
    *,
    source: WarehouseSource,
    registry: SchemaRegistry,
    stop: threading.Event,
) -> list[QueryRunner]:
    """One runner (and one transactional producer) per query."""
    runners = []
    for query, table, output in bound_queries(settings, topics):
        sink = KafkaTransactionalSink(
            common.kafka(f"{SERVICE}-{query.name}"),
            registry,
            query=query.name,
            record_type=query.record_type,
            output_topic=output,
            cursor_topic=topics.producer_cursors,
            source=source.qualified_name(table),
            transactional_id=f"{settings.transactional_id}.{query.name}",
            transaction_timeout_s=settings.transaction_timeout_s,
            load_timeout_s=settings.query_timeout_s,
            reader_debug=settings.cursor_reader_debug,
        )
        runners.append(
            QueryRunner(
                query,
                table,
                source=source,
                sink=sink,
                batch_size=settings.batch_size,
                delay_s=settings.delay_s,
                start_from=settings.start_from,
                stop=stop,
            )
        )
    return runners


class ProducerService:
    """The producer as a ``libs.runtime.Service``: source and runners built at ``prepare``."""

    def __init__(
        self,
        common: CommonSettings,
        topics: TopicSettings,
        settings: ProducerSettings,
        *,
        registry: SchemaRegistry,
        stop: threading.Event,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._common = common
        self._topics = topics
        self._settings = settings
        self._registry = registry
        self._stop = stop
        self._clock = clock
        self._source: WarehouseSource | None = None
        self.runners: list[QueryRunner] = []
        self.loop: PollLoop | None = None
        s = settings
        # A loop iteration can legitimately take a query (with the client's retries), a
        # transaction and the longest wait; anything well beyond that is a stuck process.
        self._stuck_after_s = (
            2 * s.query_timeout_s
            + s.transaction_timeout_s
            + max(s.poll_interval_s, s.retry_max_s)
            + 30
        )

    def config(self) -> dict[str, object]:
        """Topics and producer settings for the start line."""
        return {
            "topics": {
                "cursors": self._topics.producer_cursors,
                "outputs": [o for _, _, o in bound_queries(self._settings, self._topics)],
            },
            "settings": self._settings.masked(),
        }

    def topics(self) -> list[TopicSpec]:
        """Outputs, their dead-letter topics and the cursor topic (``PRODUCER_CREATE_TOPICS``)."""
        return topic_specs(self._settings, self._topics) if self._settings.create_topics else []

    def prepare(self) -> None:
        """Open the warehouse and build one runner (one transactional producer) per query."""
        self._source = open_source(self._settings)
        self.runners = build_runners(
            self._common,
            self._topics,
            self._settings,
            source=self._source,
            registry=self._registry,
            stop=self._stop,
        )
        self.loop = PollLoop(
            self.runners,
            self._stop,
            poll_interval_s=self._settings.poll_interval_s,
            retry_initial_s=self._settings.retry_initial_s,
            retry_max_s=self._settings.retry_max_s,
            clock=self._clock,
        )

    def bootstrap(self) -> None:
        """Nothing: each runner loads its cursor inside the loop, retrying."""

    def run(self) -> None:
        """Poll every query until stopped."""
        assert self.loop is not None, "prepare() builds the loop"
        self.loop.run()

    def close(self) -> None:
        """Abort open transactions, close the warehouse."""
        for runner in self.runners:
            runner.close()
        if self._source is not None:
            self._source.close()

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while the loop keeps turning."""
        if self.loop is None or not self.loop.heartbeat:
            return True, {"loop_started": False}
        age = seconds_since(self.loop.heartbeat)
        return age < self._stuck_after_s, {"loop_heartbeat_age_s": round(age, 1)}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once every query's cursor is loaded."""
        ready = self.loop is not None and self.loop.ready
        return ready, {r.name: {"cursor_loaded": r.loaded} for r in self.runners}

    def counts(self) -> dict[str, object]:
        """Per query: rows, events, dead letters, batches, failures, the cursor reached."""
        return {
            r.name: {
                "rows": r.stats.rows,
                "events": r.stats.events,
                "dead_letters": r.stats.dead_letters,
                "batches": r.stats.batches,
                "failures": r.stats.failures,
                "cursor_timestamp": (r.cursor.last_timestamp.isoformat() if r.cursor else None),
            }
            for r in self.runners
        }
