"""Where a batch goes: events, dead letters and the cursor, in one Kafka transaction.

The cursor topic is the producer's only state. A batch's events, its dead letters and the
``ProducerCursor`` that covers them are produced in one transaction, so a ``read_committed``
reader (the restarted producer included) sees all of them or none: a crash between batches
loses nothing, a crash inside one aborts it and the restart re-reads the same rows.

Start order matters: ``init_transactions`` first, which fences a previous instance with the
same ``transactional.id`` and aborts its open transaction, and only then read the cursor back.
Reading first could wait on (or, with read_uncommitted, see) the zombie's unfinished batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    Consumer,
    KafkaException,
    Producer,
)

from libs.kafka import (
    DeadLetterPublisher,
    DeliveryError,
    FatalLoopError,
    KafkaSettings,
    ProducerClient,
    TopicError,
    TransactionAbortedError,
    dlq_topic,
    read_to_end,
)
from libs.serde import (
    AvroDeserializer,
    AvroRecord,
    AvroSerializer,
    DeserializationError,
    ProducerCursor,
    RegistryError,
    SchemaRegistry,
    SerializationError,
)
from services.producer.core import BatchPlan, DeadLetter, row_to_json

log = logging.getLogger(__name__)

SERVICE = "producer"


class SinkError(Exception):
    """Root of sink errors the producer retries (with backoff, the cursor unchanged)."""


class BatchAbortedError(SinkError):
    """The batch's transaction was aborted; nothing of it is visible. Retry the batch."""


class CursorLoadError(SinkError):
    """The cursor could not be read back (broker unreachable, topic not readable in time)."""


class UnmappableRowError(ValueError):
    """The error class named in a producer dead letter's ``dlq.error.class`` header."""


class BatchSink(Protocol):
    """Durable output of one query: its cursor and its batches, atomically."""

    def start(self) -> None:
        """Prepare for writing; fences any previous instance of the same query."""
        ...

    def load_cursor(self) -> ProducerCursor | None:
        """The last committed cursor of the query, or None when it has none (or a tombstone)."""
        ...

    def write(self, plan: BatchPlan) -> None:
        """Make the whole batch visible at once, or nothing of it (``BatchAbortedError``)."""
        ...

    def close(self) -> None:
        """Release clients; an open transaction is aborted."""
        ...


class KafkaTransactionalSink:
    """``BatchSink`` over one transactional producer per query."""

    def __init__(
        self,
        kafka: KafkaSettings,
        registry: SchemaRegistry,
        *,
        query: str,
        record_type: type[AvroRecord],
        output_topic: str,
        cursor_topic: str,
        source: str,
        transactional_id: str,
        transaction_timeout_s: float = 60.0,
        load_timeout_s: float = 60.0,
    ) -> None:
        self.query = query
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic(output_topic)
        self.cursor_topic = cursor_topic
        self.source = source
        self._kafka = kafka
        self._load_timeout_s = load_timeout_s
        self._encode = AvroSerializer(registry, record_type)
        self._encode_cursor = AvroSerializer(registry, ProducerCursor)
        self._decode_cursor = AvroDeserializer(registry, ProducerCursor)
        self._client = ProducerClient(
            Producer(
                kafka.producer_config(
                    transactional_id=transactional_id,
                    **{
                        "transaction.timeout.ms": int(transaction_timeout_s * 1000),
                        # Only failures are recorded, and commit_transaction fails on them
                        # anyway: a report, a Message object and a Python callback per
                        # delivered row were pure cost.
                        "delivery.report.only.error": True,
                    },
                )
            ),
            timeout_s=transaction_timeout_s,
            transactional=True,
        )
        self._dlq = DeadLetterPublisher(self._produce, SERVICE)

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._client.init_transactions()
        except FatalLoopError as exc:
            cause = exc.__cause__
            if isinstance(cause, KafkaException) and not cause.args[0].fatal():
                # the broker is unreachable or busy: retried with backoff by the poll loop
                raise CursorLoadError(str(exc)) from exc
            raise

    def load_cursor(self) -> ProducerCursor | None:
        """Read the whole compacted cursor topic to its end; the last value of our key wins.

        The end is each partition's high watermark taken after ``start`` fenced the previous
        instance, reached by position (transaction markers occupy offsets no record is
        returned for; the position moves past them).
        """
        conf = self._kafka.consumer_config(None, read_committed=True)
        # the client insists on a group.id even for assign()-only use; this consumer never
        # subscribes or commits, so the group is never joined
        conf["group.id"] = f"{self.query}-cursor-reader-nogroup"
        conf["enable.partition.eof"] = True
        consumer = Consumer(conf)
        try:
            return self._read_cursor(consumer)
        except KafkaException as exc:
            raise CursorLoadError(f"reading {self.cursor_topic} failed: {exc}") from exc
        finally:
            consumer.close()

    def _read_cursor(self, consumer: Consumer) -> ProducerCursor | None:
        key = self.query.encode()
        found: ProducerCursor | None = None
        try:
            for msg in read_to_end(consumer, self.cursor_topic, timeout_s=self._load_timeout_s):
                if msg.key() == key:
                    found = self._decode(msg)
        except TopicError as exc:
            raise CursorLoadError(str(exc)) from exc
        return found

    def _decode(self, msg: Any) -> ProducerCursor | None:
        value = msg.value()
        if value is None:
            return None  # a tombstone resets the query to its start
        try:
            return self._decode_cursor(
                value,
                topic=self.cursor_topic,
                partition=int(msg.partition() or 0),
                offset=int(msg.offset() or 0),
            )
        except DeserializationError as exc:
            # Guessing a position would skip or repeat rows; an operator decides (for
            # instance by producing a tombstone for the key, which restarts the query).
            raise FatalLoopError(f"unreadable cursor for {self.query}: {exc}") from exc

    # -- batches ---------------------------------------------------------------------------
    def _produce(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self._client.produce(topic, key, value, headers)

    def _encode_batch(
        self, plan: BatchPlan
    ) -> tuple[list[tuple[bytes, bytes]], list[DeadLetter], bytes]:
        events: list[tuple[bytes, bytes]] = []
        dead = list(plan.dead_letters)
        try:
            for event in plan.events:
                try:
                    value = self._encode(self.output_topic, event.record)
                except SerializationError as exc:
                    # A record the mapper accepted but Avro refuses is still just a bad row.
                    dead.append(
                        DeadLetter(
                            key=event.key,
                            row_json=row_to_json(event.record.to_avro()),
                            reason=str(exc),
                            ordinal=event.ordinal,
                        )
                    )
                    continue
                events.append((event.key.encode(), value))
            cursor = self._encode_cursor(self.cursor_topic, plan.cursor)
        except RegistryError as exc:
            raise BatchAbortedError(f"schema registry unavailable: {exc}") from exc
        return events, dead, cursor

    def write(self, plan: BatchPlan) -> None:
        # Encoding happens before the transaction opens: registry calls stay outside it.
        events, dead, cursor = self._encode_batch(plan)
        try:
            self._client.begin()
            for key, value in events:
                self._produce(self.output_topic, key=key, value=value)
            for letter in dead:
                self._dlq.publish(
                    source_topic=self.source,
                    partition=-1,
                    offset=letter.ordinal,
                    key=letter.key.encode() if letter.key is not None else None,
                    value=letter.row_json.encode(),
                    error=UnmappableRowError(letter.reason),
                    topic=self.dlq_topic,
                )
            self._produce(self.cursor_topic, key=self.query.encode(), value=cursor)
            self._client.commit()
        except TransactionAbortedError as exc:
            raise BatchAbortedError(str(exc)) from exc
        except DeliveryError as exc:
            self._client.abort()
            raise BatchAbortedError(f"transaction aborted: {exc}") from exc
        except KafkaException as exc:  # from produce(): the transaction cannot go on
            if exc.args[0].fatal():
                raise FatalLoopError(f"transaction failed: {exc.args[0].str()}") from exc
            self._client.abort()
            raise BatchAbortedError(f"transaction aborted: {exc.args[0].str()}") from exc

    def close(self) -> None:
        for problem in self._client.close():
            log.error(problem, extra={"query": self.query})


@dataclass
class InMemoryBatchSink:
    """``BatchSink`` twin: keeps what was committed; scriptable failures for retry tests."""

    cursor: ProducerCursor | None = None
    events: list[tuple[str, AvroRecord]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    batches: int = 0
    started: bool = False
    closed: bool = False
    failures: list[SinkError] = field(default_factory=list)
    load_failures: list[SinkError] = field(default_factory=list)

    def start(self) -> None:
        self.started = True

    def load_cursor(self) -> ProducerCursor | None:
        if self.load_failures:
            raise self.load_failures.pop(0)
        return self.cursor

    def write(self, plan: BatchPlan) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.events.extend((e.key, e.record) for e in plan.events)
        self.dead_letters.extend(plan.dead_letters)
        self.cursor = plan.cursor
        self.batches += 1

    def close(self) -> None:
        self.closed = True


_kafka_sink: type[BatchSink] = KafkaTransactionalSink
_memory_sink: type[BatchSink] = InMemoryBatchSink
