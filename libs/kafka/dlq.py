"""Dead-letter publishing: the original bytes, plus headers that say what went wrong where."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"

HEADER_ERROR_CLASS = "dlq.error.class"
HEADER_ERROR_MESSAGE = "dlq.error.message"
HEADER_SOURCE_TOPIC = "dlq.source.topic"
HEADER_SOURCE_PARTITION = "dlq.source.partition"
HEADER_SOURCE_OFFSET = "dlq.source.offset"
HEADER_SERVICE = "dlq.service"

DEAD_LETTERS = Counter(
    "dead_letters_total", "Records sent to a dead-letter topic", ["service", "source_topic"]
)

# Enough to read the reason; a multi-megabyte traceback does not belong in a header.
_MAX_MESSAGE_BYTES = 8 * 1024

Headers = Sequence[tuple[str, bytes | str | None]]
ProduceFn = Callable[..., None]


def dlq_topic(source_topic: str) -> str:
    """The dead-letter topic of a source topic: ``<source>.dlq``."""
    return source_topic + DLQ_SUFFIX


def dlq_headers(
    *, service: str, error: BaseException, source_topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """The CONTRACT headers for one dead letter."""
    message = str(error).encode("utf-8", "replace")[:_MAX_MESSAGE_BYTES]
    return [
        (HEADER_ERROR_CLASS, f"{type(error).__module__}.{type(error).__qualname__}".encode()),
        (HEADER_ERROR_MESSAGE, message),
        (HEADER_SOURCE_TOPIC, source_topic.encode()),
        (HEADER_SOURCE_PARTITION, str(partition).encode()),
        (HEADER_SOURCE_OFFSET, str(offset).encode()),
        (HEADER_SERVICE, service.encode()),
    ]


def plain_produce(producer: Any) -> ProduceFn:
    """A ``ProduceFn`` over a non-transactional producer, for dead letters outside a loop.

    Waits for room when the local queue is full and logs dead letters the broker did not
    acknowledge (the caller flushes the producer at its checkpoints).
    """

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            log.error("dead letter not delivered", extra={"topic": msg.topic(), "error": str(err)})

    def produce(topic: str, *, key: bytes | None, value: bytes | None, headers: Any) -> None:
        while True:
            try:
                producer.produce(
                    topic, key=key, value=value, headers=list(headers or ()), on_delivery=report
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)

    return produce


class DeadLetterPublisher:
    """Produces dead letters through the caller's producer.

    Using the caller's producer matters for exactly-once: inside a transaction the dead letter
    commits or aborts together with the offsets that skip the poison record.
    """

    def __init__(self, produce: ProduceFn, service: str) -> None:
        self._produce = produce
        self._service = service

    def publish(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: BaseException,
        original_headers: Headers | None = None,
        topic: str | None = None,
    ) -> None:
        """Send the original key and value to ``<source_topic>.dlq`` (or ``topic``)."""
        headers: list[tuple[str, Any]] = list(original_headers or [])
        headers += dlq_headers(
            service=self._service,
            error=error,
            source_topic=source_topic,
            partition=partition,
            offset=offset,
        )
        target = topic or dlq_topic(source_topic)
        self._produce(target, key=key, value=value, headers=headers)
        DEAD_LETTERS.labels(self._service, source_topic).inc()
        log.warning(
            "dead-lettered record",
            extra={
                "source_topic": source_topic,
                "partition": partition,
                "offset": offset,
                "dlq_topic": target,
                "error_class": type(error).__name__,
                "error": str(error),
            },
        )

    def publish_message(self, msg: Any, error: BaseException) -> None:
        """Dead-letter a consumed ``confluent_kafka.Message`` as it was read."""
        self.publish(
            source_topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            value=msg.value(),
            error=error,
            original_headers=msg.headers(),
        )
