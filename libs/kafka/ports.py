"""What the run loops use of a Kafka consumer and producer, as small ports.

``ProcessingLoop`` and the notifier's sink loop take their clients from factories typed with
these Protocols instead of constructing ``confluent_kafka`` clients themselves, so their
checkpoint, rollback, commit and scheduling logic runs in unit tests on the in-memory twins
of ``libs.kafka.memory``. The real ``confluent_kafka.Consumer`` and ``Producer`` satisfy the
Protocols structurally (mypy checks it: the default factories are the real classes), and
one contract suite (``tests/support/kafka_contract.py``) runs against both the twins and the
real clients on a broker, so the twins stay honest.

Only the methods the loops call are here: a method added to a loop must be added to the
port, the twin and the contract suite together.

Records and partitions are ``confluent_kafka.Message`` and ``TopicPartition``: plain value
objects that the twins build too, so handlers keep their ``Message`` signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError, Message, TopicPartition

#: ``on_assign``/``on_revoke``/``on_lost``: (the consumer, the partitions)
RebalanceCallback = Callable[[Any, list[TopicPartition]], None]
DeliveryCallback = Callable[[KafkaError | None, Message], None]
HeadersArg = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None


class ConsumerPort(Protocol):
    """A group member: subscribe, fetch, flow control, positions and commits."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        """Join the group; rebalance callbacks run inside ``poll``/``consume``."""
        ...

    def poll(self, timeout: float = -1) -> Message | None:
        """One record (or an error event), or None after ``timeout`` seconds."""
        ...

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` records, waiting at most ``timeout`` for the first."""
        ...

    def assignment(self) -> list[TopicPartition]:
        """The partitions this member owns now."""
        ...

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Take ``partitions`` without joining the group (a group-less reader, a table).

        Each starts at its offset, ``OFFSET_BEGINNING`` or ``OFFSET_END``.
        """
        ...

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        """Cluster metadata (``.topics[name].partitions``/``.error``); a missing topic has
        the error ``UNKNOWN_TOPIC_OR_PART`` and no partitions."""
        ...

    def pause(self, partitions: list[TopicPartition]) -> None:
        """Stop fetching ``partitions`` (positions are kept, membership too)."""
        ...

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Fetch ``partitions`` again."""
        ...

    def seek(self, partition: TopicPartition) -> None:
        """Move the fetch position of one assigned partition; drops what was prefetched."""
        ...

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The next offset to fetch per partition (negative when not known yet)."""
        ...

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        """``(low, high)`` offsets of a partition; ``cached`` answers from the last fetch."""
        ...

    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]:
        """Commit ``offsets`` (next offset to consume) to the group, synchronously."""
        ...

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        """The group's committed offsets (negative when none)."""
        ...

    def consumer_group_metadata(self) -> Any:
        """The opaque group metadata ``send_offsets_to_transaction`` needs."""
        ...

    def close(self) -> None:
        """Leave the group (revoking what is assigned) and release the client."""
        ...


class ProducerPort(Protocol):
    """An idempotent, optionally transactional producer."""

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        callback: DeliveryCallback | None = None,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: HeadersArg = None,
    ) -> None:
        """Queue one record; ``BufferError`` when the local queue is full."""
        ...

    def poll(self, timeout: float = -1) -> int:
        """Serve delivery reports; returns how many were served."""
        ...

    def flush(self, timeout: float = -1) -> int:
        """Wait until every queued record is delivered; returns how many are still queued."""
        ...

    def init_transactions(self, timeout: float = -1) -> None:
        """Register the ``transactional.id``, fencing earlier producers with the same id."""
        ...

    def begin_transaction(self) -> None:
        """Open a transaction."""
        ...

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1
    ) -> None:
        """Make committing ``positions`` to the group part of the open transaction."""
        ...

    def commit_transaction(self, timeout: float = -1) -> None:
        """Flush and commit the open transaction (its records and offsets)."""
        ...

    def abort_transaction(self, timeout: float = -1) -> None:
        """Abort the open transaction: its records are never visible to read_committed."""
        ...


ConsumerFactory = Callable[[dict[str, Any]], ConsumerPort]
ProducerFactory = Callable[[dict[str, Any]], ProducerPort]
