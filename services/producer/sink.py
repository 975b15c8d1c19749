"""Where a batch goes: events, dead letters and the cursor, in one Kafka transaction.

The cursor topic is the producer's only state. A batch's events, its dead letters and the
``ProducerCursor`` that covers them are produced in one transaction, so a ``read_committed``
reader (the restarted producer included) sees all of them or none: a crash between batches
loses nothing, a crash inside one aborts it and the restart re-reads the same rows.

Start order matters: ``init_transactions`` first, which fences a previous instance with the
same ``transactional.id`` and aborts its open transaction, and only then read the cursor back.
Reading first could wait on (or, with read_uncommitted, see) the zombie's unfinished batch.
The read itself (``CursorReader``) waits for transactions still open on the cursor topic and
reads the record it found again before trusting it: a restart once loaded the cursor of the
aborted batch, and 25 rows were never produced.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
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
    is_transient,
    read_to_end,
)
from libs.kafka.logs import LOGGER_NAME, LibrdkafkaLogger
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


#: how many of its key's latest records a cursor load keeps, should the newest fail its check
_CANDIDATES = 16


def _reader_debug_logger() -> logging.Logger:
    logger = logging.getLogger(f"{LOGGER_NAME}.cursor-reader")
    logger.setLevel(logging.DEBUG)
    return logger


class CursorReader:
    """Reads a query's last committed cursor record back, and makes sure it is committed.

    A restart once loaded the cursor of the transaction the killed instance had left open,
    which ``init_transactions`` had aborted: the rows of that batch were skipped, never
    produced. The abort markers were in the log before the read began, so a ``read_committed``
    fetch should have skipped that record; why it did not is not known (see the kill test in
    ``tests/integration/test_producer_process.py``, which logs the reader's fetches). So:

    1. the end of the read is taken after ``init_transactions`` (``start``) and once every
       transaction open on the topic at that moment has completed (``read_to_end``'s
       ``settle_with``): no abort of the fenced instance is still being written;
    2. the whole topic is read ``read_committed``, keeping the last records of our key;
    3. the newest is read again, alone, by a fresh ``read_committed`` consumer fetching from
       its offset: the broker lists the aborted transactions of that fetch anew and the client
       filters them anew. A record it skips is not committed: it is logged as an error and the
       record before it is checked the same way.

    ``new_consumer(read_committed)`` makes a group-less consumer with ``enable.partition.eof``.
    """

    def __init__(
        self,
        new_consumer: Callable[[bool], Consumer],
        topic: str,
        key: bytes,
        *,
        timeout_s: float,
    ) -> None:
        self._new_consumer = new_consumer
        self._topic = topic
        self._key = key
        self._timeout_s = timeout_s

    def read(self) -> Message | None:
        """The last committed record of the key (a tombstone included), None without one.

        Raises ``TopicError`` (or ``KafkaException``) when the topic cannot be read in time.
        """
        deadline = time.monotonic() + self._timeout_s
        candidates, older = self._candidates(deadline)
        while candidates:
            msg = candidates.pop()
            if self._committed(msg, deadline):
                return msg
            log.error(
                "a read_committed read returned a record that is not committed: skipped",
                extra={
                    "topic": self._topic,
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "key": self._key.decode(errors="replace"),
                },
            )
        if older:
            # the key has older records, not kept: guessing which one is committed would skip
            # or repeat rows
            raise TopicError(
                f"{self._topic}: none of the last {_CANDIDATES} records of "
                f"{self._key.decode(errors='replace')} could be confirmed as committed"
            )
        return None

    def _candidates(self, deadline: float) -> tuple[list[Message], bool]:
        """The key's last records, oldest first, and whether older ones were dropped."""
        committed, uncommitted = self._new_consumer(True), self._new_consumer(False)
        try:
            kept: deque[Message] = deque(maxlen=_CANDIDATES)
            seen = 0
            for msg in read_to_end(
                committed,
                self._topic,
                timeout_s=max(1.0, deadline - time.monotonic()),
                settle_with=uncommitted,
            ):
                if msg.key() == self._key:
                    kept.append(msg)
                    seen += 1
            return list(kept), seen > len(kept)
        finally:
            committed.close()
            uncommitted.close()

    def _committed(self, msg: Message, deadline: float) -> bool:
        """Whether a fresh ``read_committed`` fetch from ``msg``'s offset returns it."""
        partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
        consumer = self._new_consumer(True)
        try:
            consumer.assign([TopicPartition(self._topic, partition, offset)])
            while True:
                for m in consumer.consume(_CANDIDATES, 0.2):
                    err = m.error()
                    if err is None:
                        # the first record at or past the offset: the record itself, or the
                        # next one when the fetch skipped it
                        return m.offset() == offset
                    if err.code() != KafkaError._PARTITION_EOF and not is_transient(err):
                        raise TopicError(f"reading {self._topic} [{partition}]: {err.str()}")
                # markers and skipped records move the position without a record returned
                (position,) = consumer.position([TopicPartition(self._topic, partition)])
                if position.offset > offset:
                    return False
                if time.monotonic() > deadline:
                    raise TopicError(
                        f"{self._topic} [{partition}]: offset {offset} not read again in time"
                    )
        finally:
            consumer.close()


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
        reader_debug: str = "",
    ) -> None:
        self.query = query
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic(output_topic)
        self.cursor_topic = cursor_topic
        self.source = source
        self._kafka = kafka
        self._load_timeout_s = load_timeout_s
        self._reader_debug = reader_debug
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
        """The last committed value of our key in the compacted cursor topic (``CursorReader``)."""
        reader = CursorReader(
            self._new_consumer,
            self.cursor_topic,
            self.query.encode(),
            timeout_s=self._load_timeout_s,
        )
        try:
            msg = reader.read()
        except KafkaException as exc:
            raise CursorLoadError(f"reading {self.cursor_topic} failed: {exc}") from exc
        except TopicError as exc:
            raise CursorLoadError(str(exc)) from exc
        return None if msg is None else self._decode(msg)

    def _new_consumer(self, read_committed: bool) -> Consumer:
        conf = self._kafka.consumer_config(None, read_committed=read_committed)
        # the client insists on a group.id even for assign()-only use; this consumer never
        # subscribes or commits, so the group is never joined
        conf["group.id"] = f"{self.query}-cursor-reader-nogroup"
        conf["enable.partition.eof"] = True
        if self._reader_debug:
            # What a fetch returned and skipped (aborted message sets, abort markers), should
            # a restart ever load a cursor that was not committed again; DEBUG lines, so they
            # go to a logger of their own that lets them through at any LOG_LEVEL.
            conf["debug"] = self._reader_debug
            password = self._kafka.sasl_password
            conf["logger"] = LibrdkafkaLogger(
                _reader_debug_logger(),
                secrets=[password.get_secret_value()] if password else [],
            )
        return Consumer(conf)

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
