"""ensure_topics' create and describe steps ride out a topic not in the metadata yet and a
broker restarting; they stop at once on what no retry cures."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource, NewTopic  # type: ignore[attr-defined]

from libs.kafka import admin as admin_module
from libs.kafka.admin import TopicSpec, _create_with_retry, _describe_with_retry
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


class _Entry:
    def __init__(self, value: str) -> None:
        self.value = value


class FlakyAdminClient(FlakyAdmin):
    """FlakyAdmin answering ConfigEntry-like values, built like ``AdminClient(conf)``."""

    made: ClassVar[list[FlakyAdminClient]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(failures=2)
        FlakyAdminClient.made.append(self)

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Any]:
        answer = super().describe_configs(resources, request_timeout)
        fut = answer[resources[0]]
        if fut.exception() is None:
            wrapped: Future[Any] = Future()
            wrapped.set_result({k: _Entry(v) for k, v in fut.result().items()})
            return {resources[0]: wrapped}
        return answer

    def poll(self, timeout: float) -> int:
        return 0


def test_a_topic_created_a_moment_ago_is_described_once_a_broker_knows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a 3-broker CI run: describe_configs right after create answered UNKNOWN_TOPIC_OR_PART
    monkeypatch.setattr(admin_module, "AdminClient", FlakyAdminClient)
    monkeypatch.setattr(admin_module, "_RETRY_S", 0.01)
    FlakyAdminClient.made.clear()
    assert admin_module.describe_cleanup_policy({}, "t") == "compact"
    assert admin_module.describe_topic_config({}, "t") == {"cleanup.policy": "compact"}
    assert [a.calls for a in FlakyAdminClient.made] == [3, 3]


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


def test_describe_retries_the_errors_of_a_broker_restart() -> None:
    admin = FlakyAdmin(failures=2, code=KafkaError.REQUEST_TIMED_OUT)
    resource = ConfigResource(ConfigResource.Type.TOPIC, "t")
    assert _describe_with_retry(admin, resource, 5.0) == {"cleanup.policy": "compact"}  # type: ignore[arg-type]
    assert admin.calls == 3


class RestartingController:
    """``create_topics`` answers as a cluster whose controller restarts: each topic's first
    ``errors`` answers, then the topic is created (or exists)."""

    def __init__(self, errors: list[int], exists: frozenset[str] = frozenset()) -> None:
        self.errors = errors
        self.exists = exists
        self.requests: list[list[str]] = []
        self._answered: dict[str, int] = {}

    def create_topics(
        self, topics: list[NewTopic], request_timeout: float, operation_timeout: float
    ) -> dict[str, Future[None]]:
        self.requests.append([t.topic for t in topics])
        out: dict[str, Future[None]] = {}
        for t in topics:
            fut: Future[None] = Future()
            n = self._answered[t.topic] = self._answered.get(t.topic, 0) + 1
            if t.topic in self.exists:
                fut.set_exception(KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS)))
            elif n <= len(self.errors):
                fut.set_exception(KafkaException(KafkaError(self.errors[n - 1])))
            else:
                fut.set_result(None)
            out[t.topic] = fut
        return out


def _new(*names: str) -> list[NewTopic]:
    return [NewTopic(n, num_partitions=1, replication_factor=3) for n in names]


def test_topic_creation_retries_the_errors_of_a_broker_restart() -> None:
    admin = RestartingController(
        [KafkaError.NOT_CONTROLLER, KafkaError.REQUEST_TIMED_OUT], exists=frozenset({"old"})
    )
    created = _create_with_retry(admin, _new("old", "a", "b"), 5.0)  # type: ignore[arg-type]
    assert sorted(created) == ["a", "b"]
    # the existing topic is asked for once, the others until they are created
    assert admin.requests == [["old", "a", "b"], ["a", "b"], ["a", "b"]]


def test_topic_creation_does_not_retry_what_no_retry_cures() -> None:
    admin = RestartingController([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(TopicError, match="cannot create topic a"):
        _create_with_retry(admin, _new("a"), 5.0)  # type: ignore[arg-type]
    assert len(admin.requests) == 1
