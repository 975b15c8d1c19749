"""``ProducerClient``'s transaction calls, on the in-memory producer with its calls recorded."""

from __future__ import annotations

from typing import Any

from libs.kafka import ProducerClient
from libs.kafka.memory import InMemoryBroker


class Recording:
    """An in-memory transactional producer that records the calls made to it, in order."""

    def __init__(self) -> None:
        broker = InMemoryBroker()
        broker.create_topic("out", 1)
        self._producer = broker.producer({"transactional.id": "t"})
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._producer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


def test_an_abort_flushes_what_the_transaction_produced_before_ending_it() -> None:
    """librdkafka #4849: an EndTxn sent while the first records' AddPartitionsToTxn is still
    unanswered is rejected with a fatal INVALID_TXN_STATE (a clean-clone CI run hit it in a
    test aborting right after producing). A record is acknowledged only once its partition
    is in the transaction, so the abort waits for the acknowledgements first."""
    recording = Recording()
    client = ProducerClient(recording, timeout_s=5.0, transactional=True)  # type: ignore[arg-type]
    client.init_transactions()
    client.begin()
    client.produce("out", b"k", b"v", None)
    recording.calls.clear()
    client.abort()
    assert recording.calls == ["flush", "abort_transaction"]
    assert not client.in_transaction


def test_no_transaction_open_nothing_is_called() -> None:
    recording = Recording()
    client = ProducerClient(recording, timeout_s=5.0, transactional=True)  # type: ignore[arg-type]
    client.init_transactions()
    recording.calls.clear()
    client.abort()
    assert recording.calls == []
