"""The Kafka sink's cursor load on the in-memory broker: what it reads back after a restart.

The sink builds its clients with ``confluent_kafka``'s ``Producer`` and ``Consumer``; here
both are the in-memory twin's (``libs.kafka.memory``), patched in where the sink looks them up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.kafka import KafkaSettings
from libs.kafka.memory import InMemoryBroker, InMemoryConsumer
from libs.serde import InMemorySchemaRegistry, OnboardingStarted, ProducerCursor
from services.producer import sink as sink_module
from services.producer.core import BatchPlan
from services.producer.sink import CursorLoadError, KafkaTransactionalSink

QUERY = "onboarding-started"
CURSORS = "cursors"
EVENTS = "onboarding"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def cursor(rows: int) -> ProducerCursor:
    return ProducerCursor(
        query=QUERY,
        last_timestamp=T0 + timedelta(seconds=rows),
        last_key=f"org-{rows:05d}",
        updated_at=T0,
        rows_total=rows,
    )


class Clients:
    """The twin's clients, made where the sink makes confluent-kafka's.

    ``faulty_reads``: how many of the next ``read_committed`` consumers are made
    ``read_uncommitted`` instead, that is return the records of aborted transactions: the
    symptom of the kill -9 test's data loss, a restart reading back the cursor record of the
    transaction ``init_transactions`` had just aborted.
    """

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker
        self.faulty_reads = 0
        self.made: list[InMemoryConsumer] = []
        self.configs: list[dict[str, Any]] = []
        self.wrap: Callable[[InMemoryConsumer], Any] = lambda c: c

    def producer(self, config: dict[str, Any]) -> Any:
        return self.broker.producer(config)

    def consumer(self, config: dict[str, Any]) -> Any:
        self.configs.append(config)
        config = dict(config)
        if config.get("isolation.level") == "read_committed" and self.faulty_reads:
            self.faulty_reads -= 1
            config["isolation.level"] = "read_uncommitted"
        consumer = self.broker.consumer(config)
        self.made.append(consumer)
        return self.wrap(consumer)


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> Clients:
    broker = InMemoryBroker()
    broker.create_topic(CURSORS, 1)
    broker.create_topic(EVENTS, 3)
    broker.create_topic(f"{EVENTS}.dlq", 3)
    made = Clients(broker)
    monkeypatch.setattr(sink_module, "Producer", made.producer)
    monkeypatch.setattr(sink_module, "Consumer", made.consumer)
    return made


@pytest.fixture
def registry() -> InMemorySchemaRegistry:
    return InMemorySchemaRegistry()


@pytest.fixture
def new_sink(registry: InMemorySchemaRegistry) -> Iterator[Callable[..., KafkaTransactionalSink]]:
    sinks: list[KafkaTransactionalSink] = []

    def make(
        txn_id: str = "producer.onboarding", load_timeout_s: float = 10, reader_debug: str = ""
    ) -> KafkaTransactionalSink:
        sink = KafkaTransactionalSink(
            KafkaSettings(bootstrap_servers="memory:9092"),
            registry,
            query=QUERY,
            record_type=OnboardingStarted,
            output_topic=EVENTS,
            cursor_topic=CURSORS,
            source="memory.onboarding",
            transactional_id=txn_id,
            transaction_timeout_s=5,
            load_timeout_s=load_timeout_s,
            reader_debug=reader_debug,
        )
        sinks.append(sink)
        return sink

    yield make
    for s in sinks:
        s.close()


def plan(rows: int) -> BatchPlan:
    return BatchPlan(events=(), dead_letters=(), cursor=cursor(rows), rows=25, backlog=False)


def killed_mid_batch(sink: KafkaTransactionalSink, rows: int) -> None:
    """The batch's cursor record is in the log, its transaction open: then the process dies."""
    sink._client.begin()
    sink._produce(CURSORS, key=QUERY.encode(), value=sink._encode_cursor(CURSORS, cursor(rows)))
    sink._client.producer.flush(5)


def test_a_cursor_a_fetch_returned_from_an_aborted_transaction_is_not_loaded(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    first = new_sink()
    first.start()
    first.write(plan(25))
    first.write(plan(50))
    killed_mid_batch(first, 75)

    restarted = new_sink()
    restarted.start()  # fences `first`: its open transaction, cursor 75 included, is aborted
    assert [m.value() for m in clients.broker.records(CURSORS)][-1] is not None
    # the read of the whole topic returns the aborted record, as it once did with Kafka
    clients.faulty_reads = 1
    loaded = restarted.load_cursor()
    assert loaded is not None
    assert loaded.rows_total == 50  # not 75: rows 51..75 were never committed


def test_a_committed_cursor_is_loaded_as_it_is(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    first = new_sink()
    first.start()
    first.write(plan(25))
    restarted = new_sink()
    restarted.start()
    loaded = restarted.load_cursor()
    assert loaded is not None and loaded.rows_total == 25
    assert restarted.load_cursor() == loaded


def test_no_committed_cursor_at_all_is_none_even_when_a_fetch_returns_an_aborted_one(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    first = new_sink()
    first.start()
    killed_mid_batch(first, 25)
    restarted = new_sink()
    restarted.start()
    clients.faulty_reads = 1
    assert restarted.load_cursor() is None


class CountingWatermarks:
    """A consumer that counts ``get_watermark_offsets`` calls and signals after ``after``."""

    def __init__(self, consumer: InMemoryConsumer, calls: list[int], waiting: threading.Event):
        self._consumer = consumer
        self._calls = calls
        self._waiting = waiting

    def get_watermark_offsets(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        self._calls.append(1)
        if len(self._calls) > 6:  # well past the first look: the read is waiting
            self._waiting.set()
        return self._consumer.get_watermark_offsets(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def test_the_load_waits_until_a_transaction_open_when_it_starts_has_completed(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    """Another client's transaction open on the cursor partition (here: a cursor record of
    the same key from another transactional id, the shape of an abort still being written)
    is waited out; what it ends with is what is read."""
    first = new_sink()
    first.start()
    first.write(plan(25))
    other = clients.broker.producer({"transactional.id": "someone-else"})
    other.init_transactions()
    other.begin_transaction()
    other.produce(CURSORS, key=QUERY, value=first._encode_cursor(CURSORS, cursor(50)))
    other.flush(1)

    calls: list[int] = []
    waiting = threading.Event()
    clients.wrap = lambda c: CountingWatermarks(c, calls, waiting)
    committed: list[bool] = []

    def commit_once_the_load_waits() -> None:
        assert waiting.wait(10)
        committed.append(True)
        other.commit_transaction()

    helper = threading.Thread(target=commit_once_the_load_waits)
    helper.start()
    restarted = new_sink()
    restarted.start()
    loaded = restarted.load_cursor()
    helper.join(10)
    assert committed == [True]
    assert loaded is not None and loaded.rows_total == 50


def test_a_transaction_that_stays_open_fails_the_load_in_bounded_time_naming_the_partition(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    first = new_sink()
    first.start()
    first.write(plan(25))
    other = clients.broker.producer({"transactional.id": "someone-else"})
    other.init_transactions()
    other.begin_transaction()
    other.produce(CURSORS, key="another-query", value=b"x")
    other.flush(1)

    restarted = new_sink(load_timeout_s=1)
    restarted.start()
    with pytest.raises(CursorLoadError, match=rf"{CURSORS} \[0\].*did not complete"):
        restarted.load_cursor()
    # once it completes, the load goes through (the poll loop retries it with backoff)
    other.abort_transaction()
    loaded = restarted.load_cursor()
    assert loaded is not None and loaded.rows_total == 25


def test_the_reader_debug_setting_logs_the_cursor_reader_s_fetches_at_any_level(
    clients: Clients, new_sink: Callable[..., KafkaTransactionalSink]
) -> None:
    restarted = new_sink(reader_debug="fetch,msg,eos")
    restarted.start()
    assert restarted.load_cursor() is None
    assert clients.configs
    for config in clients.configs:
        assert config["debug"] == "fetch,msg,eos"
        logger = config["logger"]._logger
        assert logger.name == "librdkafka.cursor-reader"
        assert logger.isEnabledFor(logging.DEBUG)  # whatever LOG_LEVEL the root has
    plain = new_sink(txn_id="another")
    clients.configs.clear()
    plain.start()
    plain.load_cursor()
    assert clients.configs and all("debug" not in c for c in clients.configs)
