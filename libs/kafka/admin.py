"""Topic creation: idempotent, with the partitions and cleanup policy each topic needs."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined]

from libs.kafka.errors import KafkaConnectionError, TopicError, is_transient

log = logging.getLogger(__name__)

#: pause before asking again after a transient error
_RETRY_S = 0.2


@dataclass(frozen=True)
class TopicSpec:
    """What a topic must look like."""

    name: str
    partitions: int
    replication_factor: int
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)

    def topic_config(self) -> dict[str, str]:
        """The topic-level configs to create the topic with.

        With three or more replicas a write needs two of them in sync
        (``min.insync.replicas=2``): with ``acks=all`` an acknowledged record then survives the
        loss of any one broker, and a broker stopped for a rolling restart does not stop
        writes. The broker default (1) would acknowledge a record held by the leader alone.
        """
        conf = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if self.replication_factor >= 3:
            conf["min.insync.replicas"] = "2"
        conf.update(self.config)
        return conf


# librdkafka reports rejected credentials as these error codes through error_cb; without a
# callback the client only retries and the caller sees a timeout much later.
_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})


def connect_admin(client_config: dict[str, Any], *, timeout_s: float = 15.0) -> AdminClient:
    """An admin client that has reached the cluster, or a clear ``KafkaConnectionError``.

    Rejected credentials fail within seconds with an error that says so, instead of the
    timeout of whatever request came first.
    """
    auth_errors: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in _AUTH_ERRORS:
            auth_errors.append(err)

    conf: dict[str, Any] = {**client_config, "error_cb": on_error}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=1.0)
            # serves the log lines (libs.kafka.logs) of the connection attempts
            admin.poll(0)
            return admin
        except KafkaException as exc:
            admin.poll(0.1)  # serves error_cb and log lines
            if not auth_errors and time.monotonic() < deadline:
                continue
            servers = client_config.get("bootstrap.servers")
            if auth_errors:
                user = client_config.get("sasl.username")
                raise KafkaConnectionError(
                    f"Kafka authentication failed at {servers} (SASL user {user!r}, mechanism "
                    f"{client_config.get('sasl.mechanism')}): {auth_errors[0].str()}; "
                    "check the SASL username and password"
                ) from exc
            raise KafkaConnectionError(
                f"cannot reach Kafka at {servers} within {timeout_s:.0f}s: {exc}"
            ) from exc


def ensure_topics(
    client_config: dict[str, Any], specs: Iterable[TopicSpec], *, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics that do not exist; return the names created.

    An existing topic is left as it is, except that a cleanup policy different from the spec
    raises ``TopicError``: a compacted lookup topic created as ``delete`` would silently lose
    keys after retention, which no amount of consumer code can repair.
    """
    specs = list(specs)
    admin = connect_admin(client_config, timeout_s=min(timeout_s, 15.0))
    new = [
        NewTopic(
            s.name,
            num_partitions=s.partitions,
            replication_factor=s.replication_factor,
            config=s.topic_config(),
        )
        for s in specs
    ]
    created = _create_with_retry(admin, new, timeout_s) if new else []
    _check_cleanup_policies(admin, specs, timeout_s)
    admin.poll(0)  # the admin client's log lines are delivered only when it is polled
    if created:
        log.info("created topics", extra={"topics": created})
    return created


def _create_with_retry(admin: AdminClient, new: list[NewTopic], timeout_s: float) -> list[str]:
    """Create ``new`` (an existing topic is fine); the names created.

    A broker restarting answers transient errors (``NOT_CONTROLLER``, a timeout, no leader):
    the topics they concern are asked for again until ``timeout_s`` has passed. A topic whose
    first request timed out but was created meanwhile answers ``TOPIC_ALREADY_EXISTS``.
    """
    deadline = time.monotonic() + timeout_s
    created: list[str] = []
    pending = new
    while True:
        futures = admin.create_topics(
            pending, request_timeout=timeout_s, operation_timeout=timeout_s
        )
        again: set[str] = set()
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
                created.append(name)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if not is_transient(err) or time.monotonic() > deadline:
                    raise TopicError(f"cannot create topic {name}: {err.str()}") from exc
                again.add(name)
                log.info(
                    "topic not created yet, retrying",
                    extra={"topic": name, "error": f"{err.name()}: {err.str()}"},
                )
        pending = [t for t in pending if t.topic in again]
        if not pending:
            return created
        time.sleep(_RETRY_S)


def _check_cleanup_policies(admin: AdminClient, specs: list[TopicSpec], timeout_s: float) -> None:
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    if not resources:
        return
    by_name = {s.name: s for s in specs}
    for resource in resources:
        entries = _describe_with_retry(admin, resource, timeout_s)
        actual = entries["cleanup.policy"].value if "cleanup.policy" in entries else "delete"
        wanted = by_name[resource.name].topic_config()["cleanup.policy"]
        if set(actual.split(",")) != set(wanted.split(",")):
            raise TopicError(
                f"topic {resource.name} has cleanup.policy={actual}, expected {wanted}"
            )


def _describe_with_retry(
    admin: AdminClient, resource: ConfigResource, timeout_s: float
) -> dict[str, Any]:
    # A topic created a moment ago may not have reached every broker's metadata yet:
    # UNKNOWN_TOPIC_OR_PART then only means "not yet", until the deadline; so do the transient
    # errors of a broker restarting.
    deadline = time.monotonic() + timeout_s
    while True:
        fut = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
        try:
            return dict(fut.result(timeout=timeout_s))
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            retry = err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART or is_transient(err)
            if not retry or time.monotonic() > deadline:
                raise TopicError(f"cannot describe topic {resource.name}: {err.str()}") from exc
            time.sleep(_RETRY_S)


def describe_topic_config(
    client_config: dict[str, Any], topic: str, *, timeout_s: float = 30.0
) -> dict[str, str]:
    """The topic's configuration as the broker reports it, name -> value.

    A topic created a moment ago is waited for (until ``timeout_s``): the broker that answers
    may not have it in its metadata yet, most often on a multi-broker cluster.
    """
    admin = AdminClient(client_config)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = _describe_with_retry(admin, res, timeout_s)
    admin.poll(0)  # delivers its log lines
    return {name: str(entry.value) for name, entry in entries.items()}


def describe_cleanup_policy(client_config: dict[str, Any], topic: str) -> str:
    """The topic's ``cleanup.policy`` as the broker reports it."""
    return describe_topic_config(client_config, topic)["cleanup.policy"]
