"""ensure_topics' describe step tolerates a topic that is not in the metadata yet."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

from libs.kafka.admin import TopicSpec, _describe_with_retry
from libs.kafka.errors import TopicError


class FlakyAdmin:
    """Answers UNKNOWN_TOPIC_OR_PART ``failures`` times, then the config."""

    def __init__(self, failures: int, code: int = KafkaError.UNKNOWN_TOPIC_OR_PART) -> None:
        self.failures = failures
        self.code = code
        self.calls = 0

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Any]:
        self.calls += 1
        fut: Future[Any] = Future()
        if self.calls <= self.failures:
            fut.set_exception(KafkaException(KafkaError(self.code)))
        else:
            fut.set_result({"cleanup.policy": "compact"})
        return {resources[0]: fut}


def test_just_created_topic_is_described_after_retries() -> None:
    admin = FlakyAdmin(failures=2)
    resource = ConfigResource(ConfigResource.Type.TOPIC, "t")
    assert _describe_with_retry(admin, resource, 5.0) == {"cleanup.policy": "compact"}  # type: ignore[arg-type]
    assert admin.calls == 3


def test_other_errors_are_not_retried() -> None:
    admin = FlakyAdmin(failures=5, code=KafkaError.TOPIC_AUTHORIZATION_FAILED)
    resource = ConfigResource(ConfigResource.Type.TOPIC, "t")
    with pytest.raises(TopicError, match="cannot describe topic t"):
        _describe_with_retry(admin, resource, 5.0)  # type: ignore[arg-type]
    assert admin.calls == 1


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [(1, None), (2, None), (3, "2"), (5, "2")],
)
def test_replicated_topics_need_two_in_sync_replicas(replicas: int, expected: str | None) -> None:
    conf = TopicSpec("t", partitions=3, replication_factor=replicas).topic_config()
    assert conf.get("min.insync.replicas") == expected
    assert conf["cleanup.policy"] == "delete"


def test_an_explicit_min_insync_replicas_wins() -> None:
    spec = TopicSpec("t", 3, 3, compacted=True, config={"min.insync.replicas": "3"})
    assert spec.topic_config() == {"cleanup.policy": "compact", "min.insync.replicas": "3"}
