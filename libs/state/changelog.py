"""Changelog topics of the per-partition state stores: names and what to create.

Changelog partition ``p`` of ``changelog_topic(group_id, topic)`` holds the state of input
partition ``p`` of ``topic``: records are produced to it with an explicit partition, never
through the partitioner, so the changelog must have at least as many partitions as its input
topic (``StateStores`` checks it when partitions are assigned). It is compacted: the last
value of every key (a tombstone for a deleted key) is all a restore needs.
"""

from __future__ import annotations

from collections.abc import Mapping

from libs.kafka.admin import TopicSpec


def changelog_topic(group_id: str, input_topic: str) -> str:
    """The changelog of the state kept for ``input_topic`` by the loops of ``group_id``."""
    return f"{group_id}-{input_topic}-changelog"


def changelog_specs(
    group_id: str,
    input_partitions: Mapping[str, int],
    *,
    replication_factor: int,
    config: Mapping[str, str] | None = None,
) -> list[TopicSpec]:
    """The changelog topics to create for ``input_partitions`` (input topic -> partitions).

    Compacted, with the input topic's partition count. ``config`` adds topic configs (for
    example ``min.compaction.lag.ms``); ``cleanup.policy`` stays ``compact``.
    """
    return [
        TopicSpec(
            name=changelog_topic(group_id, topic),
            partitions=partitions,
            replication_factor=replication_factor,
            compacted=True,
            config=dict(config or {}),
        )
        for topic, partitions in sorted(input_partitions.items())
    ]
