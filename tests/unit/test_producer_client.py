"""``ProducerClient``'s transaction calls, on the in-memory producer with its calls recorded."""

from __future__ import annotations

from typing import Any

import pytest

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


def _run_client(max_queued: int, *, record_failures: bool) -> tuple[InMemoryBroker, ProducerClient]:
    broker = InMemoryBroker()
    broker.create_topic("cl", 2)
    producer = broker.producer(
        {"transactional.id": "t", "queue.buffering.max.messages": max_queued}
    )
    client = ProducerClient(
        producer,  # type: ignore[arg-type]
        timeout_s=5.0,
        transactional=True,
        record_failures=record_failures,
    )
    client.init_transactions()
    return broker, client


@pytest.mark.parametrize("record_failures", [False, True])
@pytest.mark.parametrize("max_queued", [1, 100])
def test_produce_run_keeps_the_order_and_reports_only_the_last_record(
    max_queued: int, record_failures: bool
) -> None:
    """The changelog's checkpoint path: one call per partition's run of records, in order,
    opening the transaction; only the last record's delivery comes back, with its offset.
    A local queue of one record makes every record after the first wait for room."""
    broker, client = _run_client(max_queued, record_failures=record_failures)
    records = [(b"a", b"1"), (b"b", None), (b"a", b"3")]
    delivered: list[tuple[int | None, int | None]] = []
    client.produce_run("cl", 1, records, lambda m: delivered.append((m.partition(), m.offset())))
    assert client.in_transaction
    client.flush()
    client.commit([], None)
    assert delivered == [(1, 2)]
    assert [(m.partition(), m.key(), m.value()) for m in broker.records("cl")] == [
        (1, k, v) for k, v in records
    ]


def test_produce_run_of_nothing_opens_no_transaction() -> None:
    _, client = _run_client(100, record_failures=False)
    client.produce_run("cl", 0, [], lambda m: None)
    assert not client.in_transaction
