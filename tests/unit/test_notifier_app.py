"""How ``NotifierService`` configures the sink loop's clients."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from libs.kafka import KafkaSettings
from services.notifier import app


def test_the_loops_receipts_share_produce_requests_over_a_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Receipts went out a produce request or two each (the library's 5 ms linger), each
    costing librdkafka's thread more CPU than the loop's whole work on the message."""
    built: dict[str, Any] = {}

    def sink_loop(
        config: object, consumer_config: object, producer_config: Any, **_: object
    ) -> Any:
        built["producer_config"] = producer_config
        return SimpleNamespace()

    monkeypatch.setattr(app, "SinkLoop", sink_loop)
    stand_in: Any = SimpleNamespace(
        _kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        _sink_config=lambda: None,
        _consumer_config=lambda: None,
        _notifier=None,
        receipts=None,
        _decode=None,
        _encode=None,
        _stop=None,
    )
    app.NotifierService._sink_loop(stand_in, markers=None)  # type: ignore[arg-type]
    conf = built["producer_config"]
    assert conf["linger.ms"] == app.RECEIPT_LINGER_MS >= 20
    # the receipts' guarantees are the library's: idempotent, every replica acknowledges
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
