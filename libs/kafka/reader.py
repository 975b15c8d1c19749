"""Read a topic to its end: the records up to the high watermarks taken at the start.

Shared by everything that reads a (usually compacted) topic back as state: the producer's
cursor, the tables' dead letters. The end is reached by *position*, not by end-of-partition
events: transaction markers and compaction holes occupy offsets no record is returned for,
and the consumer's position moves past them.

With ``settle_with`` (a ``read_uncommitted`` consumer) the end of each partition is taken only
once every transaction that had records in it when the read began has completed: the
``read_committed`` end (last stable offset) has reached the high watermark seen at the start.
A transaction still being aborted (the fenced instance's, whose abort markers the coordinator
writes after ``init_transactions`` fenced it) is then settled before anything is read; a
transaction other clients open later does not hold the read up.

A broker restarting while the topic is read is waited out within the deadline: metadata and
watermark requests that fail with a transient error (``libs.kafka.errors.is_transient``: no
leader yet, a connection refused, a timeout) are asked again, and the consumer's transient
error events are skipped (librdkafka reconnects and fetches again by itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from libs.kafka.errors import MISSING_TOPIC_CODES, TopicError, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

#: pause between two attempts of a request that failed with a transient error
_RETRY_S = 0.2


def read_to_end(
    consumer: Consumer,
    topic: str,
    *,
    timeout_s: float,
    missing_ok: bool = False,
    batch_size: int = 500,
    settle_with: Consumer | None = None,
) -> Iterator[Message]:
    """Every record of ``topic`` below the high watermarks taken now, partition by position.

    ``consumer`` is a group-less consumer this function assigns (``read_committed`` when the
    topic is written in transactions). Raises ``TopicError`` when the topic does not exist
    (unless ``missing_ok``: then nothing is read) or is not read to its end within
    ``timeout_s``. Records appended meanwhile may be yielded too. ``settle_with``: see the
    module docstring; a transaction that stays open past the deadline raises ``TopicError``
    naming the partition (a bounded wait: another client's open transaction never wedges the
    read).
    """
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        # every request gets what is left of the deadline (at least a second to answer)
        return max(1.0, deadline - time.monotonic())

    while True:
        meta = _retrying(
            lambda: consumer.list_topics(topic, timeout=remaining()).topics.get(topic),
            deadline,
            topic,
        )
        error: KafkaError | None = None if meta is None else meta.error
        if meta is not None and error is None and meta.partitions:
            break
        if error is not None and error.code() not in MISSING_TOPIC_CODES:
            if not is_transient(error):
                raise TopicError(f"cannot read the metadata of {topic}: {error.str()}")
        elif missing_ok:
            return
        if time.monotonic() > deadline:
            raise TopicError(f"topic {topic} is not available")
        # a topic created a moment ago may not be in every broker's metadata yet
        time.sleep(_RETRY_S)

    def watermarks(partition: int, client: Consumer = consumer) -> Callable[[], tuple[int, int]]:
        tp = TopicPartition(topic, partition)
        return lambda: client.get_watermark_offsets(tp, timeout=remaining())

    ends: dict[int, int] = {}
    for p in meta.partitions:
        low, high = _retrying(watermarks(p), deadline, topic)
        if settle_with is not None:
            high = _settled_end(watermarks(p), watermarks(p, settle_with), deadline, topic, p)
        if high > low:
            ends[p] = high
    if not ends:
        return
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    pending = set(ends)
    while pending:
        if time.monotonic() > deadline:
            raise TopicError(
                f"{topic} not read to its end within {timeout_s:.0f}s "
                f"(partitions {sorted(pending)} pending)"
            )
        for msg in consumer.consume(batch_size, 0.2):
            err = msg.error()
            if err is None:
                yield msg
            elif err.code() != KafkaError._PARTITION_EOF and not is_transient(err):
                raise TopicError(f"reading {topic}: {err.str()}")
        for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)]):
            if tp.offset >= ends[tp.partition]:
                pending.discard(tp.partition)


def _settled_end(
    stable: Callable[[], tuple[int, int]],
    log_end: Callable[[], tuple[int, int]],
    deadline: float,
    topic: str,
    partition: int,
) -> int:
    """The last stable offset once it has reached the high watermark taken now.

    A last stable offset below the high watermark is the first offset of a transaction still
    open (or whose commit or abort markers are not written yet); waited out until ``deadline``.
    """
    _, target = _retrying(log_end, deadline, topic)
    while True:
        _, lso = _retrying(stable, deadline, topic)
        if lso >= target:
            return lso
        if time.monotonic() > deadline:
            raise TopicError(
                f"{topic} [{partition}]: a transaction open at offset {lso} did not complete "
                f"in time (last stable offset {lso} < high watermark {target})"
            )
        time.sleep(_RETRY_S)


def _retrying(request: Callable[[], T], deadline: float, topic: str) -> T:
    """``request()``, made again while it fails with a transient error and time is left."""
    while True:
        try:
            return request()
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not is_transient(err) or time.monotonic() > deadline:
                raise
            log.info(
                "reading a topic to its end: the cluster cannot answer yet, retrying",
                extra={"topic": topic, "error": f"{err.name()}: {err.str()}"},
            )
            time.sleep(_RETRY_S)
