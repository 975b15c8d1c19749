"""Composition root: settings -> source, sinks, runners, health server; run until stopped.

One producer replica per deployment is the contract: each query's transactional id is
``<PRODUCER_TRANSACTIONAL_ID>.<query>``, stable across restarts, so a restarted instance
fences a zombie of the previous one through ``init_transactions`` (and a second replica would
fence the first: run one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from pydantic_settings import BaseSettings

from libs.kafka import TopicSpec, dlq_topic, ensure_topics
from libs.runtime import HealthServer, install_stop_handlers
from libs.serde import SchemaRegistry, wait_for_registry
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


def run(
    common: CommonSettings,
    topics: TopicSettings,
    settings: ProducerSettings,
    stop: threading.Event,
    *,
    clock: Callable[[], datetime] = utc_now,
    registry: SchemaRegistry | None = None,
) -> int:
    """Run the producer until ``stop`` is set; 0 on a graceful stop (fatal errors raise)."""
    log.info(
        "producer starting",
        extra={
            "kafka": common.kafka(SERVICE).masked(),
            "schema_registry": common.schema_registry_url,
            "topics": {
                "cursors": topics.producer_cursors,
                "outputs": [o for _, _, o in bound_queries(settings, topics)],
            },
            "settings": settings.masked(),
            "metrics_port": common.metrics_port,
        },
    )
    if settings.create_topics:
        ensure_topics(common.kafka(SERVICE).client_config(), topic_specs(settings, topics))
    own_registry = common.registry() if registry is None else None
    registry = registry or own_registry
    assert registry is not None
    source = open_source(settings)
    runners = build_runners(common, topics, settings, source=source, registry=registry, stop=stop)
    loop = PollLoop(
        runners,
        stop,
        poll_interval_s=settings.poll_interval_s,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        clock=clock,
    )
    # A loop iteration can legitimately take a query (with the client's retries), a
    # transaction and the longest wait; anything well beyond that is a stuck process.
    stuck_after_s = (
        2 * settings.query_timeout_s
        + settings.transaction_timeout_s
        + max(settings.poll_interval_s, settings.retry_max_s)
        + 30
    )

    def liveness() -> tuple[bool, dict[str, object]]:
        age = time.monotonic() - loop.heartbeat
        return age < stuck_after_s, {"loop_heartbeat_age_s": round(age, 1)}

    def readiness() -> tuple[bool, dict[str, object]]:
        return loop.ready, {r.name: {"cursor_loaded": r.loaded} for r in runners}

    health = (
        HealthServer(common.metrics_port, liveness=liveness, readiness=readiness).start()
        if common.metrics_port
        else None
    )
    try:
        if wait_for_registry(registry, stop):
            loop.run()
    finally:
        for runner in runners:
            runner.close()
        source.close()
        if own_registry is not None:
            own_registry.close()
        if health is not None:
            health.stop()
        log.info(
            "producer stopped",
            extra={
                r.name: {
                    "rows": r.stats.rows,
                    "events": r.stats.events,
                    "dead_letters": r.stats.dead_letters,
                    "batches": r.stats.batches,
                    "failures": r.stats.failures,
                    "cursor_timestamp": (r.cursor.last_timestamp.isoformat() if r.cursor else None),
                }
                for r in runners
            },
        )
    return 0


def build_and_run(loaded: Sequence[BaseSettings]) -> int:
    """The ``run_service`` entry: typed settings in, exit code out."""
    common, topics, settings = loaded
    assert isinstance(common, CommonSettings)
    assert isinstance(topics, TopicSettings)
    assert isinstance(settings, ProducerSettings)
    return run(common, topics, settings, install_stop_handlers())
