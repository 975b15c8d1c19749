"""Static group membership: the group consumers carry group.instance.id only when it is set.

The config methods read only the Kafka and service settings, so they are called on a stand-in
instance: no broker, producer or RocksDB table is built.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from libs.kafka import KafkaSettings
from services.enricher.app import Enricher
from services.enricher.settings import EnricherSettings
from services.notifier.app import NotifierService
from services.notifier.settings import NotifierSettings

KAFKA = KafkaSettings(bootstrap_servers="127.0.0.1:1", client_id="test")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("ENRICHER_", "NOTIFIER_")):
            monkeypatch.delenv(name)


def _enricher_conf(settings: EnricherSettings) -> dict[str, Any]:
    app: Any = SimpleNamespace(_kafka=KAFKA, _settings=settings)
    return Enricher._loop_consumer_config(app)


def _notifier_conf(settings: NotifierSettings) -> dict[str, Any]:
    app: Any = SimpleNamespace(_kafka=KAFKA, _settings=settings)
    return NotifierService._consumer_config(app)


def test_enricher_dynamic_membership_by_default() -> None:
    conf = _enricher_conf(EnricherSettings())
    assert conf["group.id"] == "enricher"
    assert "group.instance.id" not in conf


def test_enricher_static_membership_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICHER_GROUP_INSTANCE_ID", "enricher-abc12")
    conf = _enricher_conf(EnricherSettings())
    assert conf["group.instance.id"] == "enricher-abc12"
    assert conf["session.timeout.ms"] == 45_000


def test_notifier_dynamic_membership_by_default() -> None:
    conf = _notifier_conf(NotifierSettings())
    assert conf["group.id"] == "notifier"
    assert "group.instance.id" not in conf


def test_notifier_static_membership_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_GROUP_INSTANCE_ID", "notifier-abc12")
    conf = _notifier_conf(NotifierSettings())
    assert conf["group.instance.id"] == "notifier-abc12"
    assert conf["max.poll.interval.ms"] == 300_000
