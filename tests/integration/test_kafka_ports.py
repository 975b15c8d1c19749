"""The Kafka port contract on the real clients, against the session broker.

The same checks run on the in-memory twins in ``tests/unit/test_kafka_memory.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from libs.kafka import KafkaSettings
from tests.support.kafka import create_topics, unique
from tests.support.kafka_contract import CHECKS, Kit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class RealKit:
    """``Kit`` on the session broker; clients are closed at the end of the test."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.kafka = KafkaSettings(bootstrap_servers=bootstrap)

    def topic(self, partitions: int = 1) -> str:
        name = unique("ports")
        create_topics(self.bootstrap, [name], partitions=partitions)
        return name

    def group(self) -> str:
        return unique("ports")

    def consumer(self, group: str, **overrides: Any) -> Consumer:
        return Consumer(self.kafka.consumer_config(group, **overrides))

    def producer(self, transactional_id: str | None = None) -> Producer:
        return Producer(self.kafka.producer_config(transactional_id=transactional_id))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(check: Callable[[Kit], None], bootstrap: str) -> None:
    check(RealKit(bootstrap))
