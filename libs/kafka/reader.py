"""Read a topic to its end: the records up to the high watermarks taken at the start.

Shared by everything that reads a (usually compacted) topic back as state: the producer's
cursor, the tables' dead letters. The end is reached by *position*, not by end-of-partition
events: transaction markers and compaction holes occupy offsets no record is returned for,
and the consumer's position moves past them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from libs.kafka.errors import TopicError


def read_to_end(
    consumer: Consumer,
    topic: str,
    *,
    timeout_s: float,
    missing_ok: bool = False,
    batch_size: int = 500,
) -> Iterator[Message]:
    """Every record of ``topic`` below the high watermarks taken now, partition by position.

    ``consumer`` is a group-less consumer this function assigns (``read_committed`` when the
    topic is written in transactions). Raises ``TopicError`` when the topic does not exist
    (unless ``missing_ok``: then nothing is read) or is not read to its end within
    ``timeout_s``. Records appended meanwhile may be yielded too.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            break
        if missing_ok:
            return
        if time.monotonic() > deadline:
            raise TopicError(f"topic {topic} is not available")
        # a topic created a moment ago may not be in every broker's metadata yet
        time.sleep(0.2)
    ends: dict[int, int] = {}
    for p in meta.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
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
            elif err.code() != KafkaError._PARTITION_EOF:
                raise TopicError(f"reading {topic}: {err.str()}")
        for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)]):
            if tp.offset >= ends[tp.partition]:
                pending.discard(tp.partition)
