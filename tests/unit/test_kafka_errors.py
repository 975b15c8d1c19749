"""Which client errors a caller that can wait retries (``libs.kafka.is_transient``)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from libs.kafka import MISSING_TOPIC_CODES, is_transient


@pytest.mark.parametrize(
    "code",
    [
        # what a broker restart gives a metadata or watermark request (seen on the 3-node stack)
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._DESTROY_BROKER,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_CONTROLLER,
        # a replicated topic created while one of three brokers is down
        KafkaError.INVALID_REPLICATION_FACTOR,
    ],
)
def test_the_errors_of_a_broker_restart_are_transient(code: int) -> None:
    assert is_transient(KafkaError(code))


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.INVALID_CONFIG,
        KafkaError._INVALID_ARG,
        KafkaError.PRODUCER_FENCED,
        *MISSING_TOPIC_CODES,  # the caller's grace period decides
    ],
)
def test_what_no_retry_cures_is_not(code: int) -> None:
    assert not is_transient(KafkaError(code))


def test_a_fatal_client_error_is_not_transient() -> None:
    assert not is_transient(KafkaError(KafkaError._TIMED_OUT, fatal=True))
