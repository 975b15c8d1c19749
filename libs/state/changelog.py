"""Changelog topics of the per-partition state stores: names and what to create.

Changelog partition ``p`` of ``changelog_topic(group_id, topic)`` holds the state of input
partition ``p`` of ``topic``: records are produced to it with an explicit partition, never
through the partitioner, so the changelog must have at least as many partitions as its input
topic (``StateStores`` checks it when partitions are assigned). It is compacted: the last
value of every key (a tombstone for a deleted key) is all a restore needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException

from libs.kafka.admin import TopicSpec, connect_admin, ensure_topics
from libs.state.errors import ChangelogTopicError


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


def ensure_changelogs(
    client_config: dict[str, Any],
    group_id: str,
    input_topics: Iterable[str],
    *,
    replication_factor: int,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    settle_s: float = 10.0,
) -> list[str]:
    """Create the changelog of every input topic that has none; return the names created.

    Partition counts are read from the cluster (the input topics must exist), not taken from
    a spec: an input topic created earlier with other counts keeps them. An existing
    changelog with fewer partitions than its input topic is ``ChangelogTopicError``, as a
    compacted topic that is not cleaned up (``ensure_topics``) is ``TopicError``.
    """
    topics = sorted(set(input_topics))
    wanted = _partition_counts(client_config, topics, timeout_s)
    missing = [t for t in topics if not wanted.get(t)]
    if missing:
        raise ChangelogTopicError(f"input topics {missing} do not exist: create them first")
    specs = changelog_specs(group_id, wanted, replication_factor=replication_factor, config=config)
    created = ensure_topics(client_config, specs, timeout_s=timeout_s)
    # A changelog another replica has just created may not be in the metadata of the broker
    # that answers yet (seen as "0 partitions" on a 3-broker cluster when two enrichers
    # started together): short counts are read again until ``settle_s``; only a count that
    # stays short is the operator's to fix.
    deadline = time.monotonic() + min(timeout_s, settle_s)
    delay = 0.1
    while True:
        have = _partition_counts(client_config, [s.name for s in specs], timeout_s)
        short = [
            (topic, spec.name)
            for topic, spec in zip(topics, specs, strict=True)
            if have.get(spec.name, 0) < wanted[topic]
        ]
        if not short:
            return created
        if time.monotonic() >= deadline:
            topic, name = short[0]
            raise ChangelogTopicError(
                f"changelog topic {name} has {have.get(name, 0)} partitions, fewer "
                f"than the {wanted[topic]} of its input topic {topic}: add partitions to it"
            )
        time.sleep(delay)  # a metadata refresh has nothing to wait on but time
        delay = min(delay * 2, 1.0)


def _partition_counts(
    client_config: dict[str, Any], topics: list[str], timeout_s: float
) -> dict[str, int]:
    admin = connect_admin(client_config, timeout_s=min(timeout_s, 15.0))
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ChangelogTopicError(f"cannot list topics: {exc}") from exc
    finally:
        admin.poll(0)  # delivers its log lines
    return {
        t: len(meta.topics[t].partitions)
        for t in topics
        if t in meta.topics and meta.topics[t].error is None
    }
