"""In-doubt markers: the in-memory twin, local (durable at once) and remote (durable at poll).

``KafkaInDoubtStore``, the production store, runs against a broker in
``tests/integration/test_notifier.py``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from services.notifier.core import AttemptMarker
from services.notifier.markers import (
    AttemptLog,
    InDoubtStore,
    InMemoryAttemptLog,
)

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.fixture
def markers() -> Iterator[AttemptLog]:
    log: AttemptLog = InMemoryAttemptLog()
    yield log
    log.close()


def test_put_get_delete(markers: AttemptLog) -> None:
    assert markers.get("m1") is None
    markers.put("m1", AttemptMarker("C1", 1, T0))
    markers.put("m1", AttemptMarker("C1", 2, T0))
    markers.put("m2", AttemptMarker("C2", 1, T0))
    assert markers.get("m1") == AttemptMarker("C1", 2, T0)
    assert len(markers) == 2
    markers.delete("m1")
    markers.delete("m1")
    markers.delete("never")
    assert markers.get("m1") is None
    assert len(markers) == 1


@pytest.fixture
def local_store() -> Iterator[InDoubtStore]:
    store: InDoubtStore = InMemoryAttemptLog()
    yield store
    store.close()


def test_a_local_store_is_ready_and_durable_at_once(local_store: InDoubtStore) -> None:
    tp = ("slack-messages", 0)
    local_store.assign([tp])
    assert local_store.ready(tp)
    durable: list[str] = []
    local_store.begin(tp, "m1", AttemptMarker("C1", 1, T0), lambda: durable.append("m1"))
    assert durable == ["m1"]  # before begin returned: the post may go now
    assert local_store.get("m1") == AttemptMarker("C1", 1, T0)
    local_store.revoke([tp])


def test_a_remote_store_is_durable_and_restored_only_at_poll() -> None:
    store = InMemoryAttemptLog(remote=True)
    tp = ("slack-messages", 0)
    store.assign([tp])
    assert not store.ready(tp)
    durable: list[str] = []
    store.begin(tp, "m1", AttemptMarker("C1", 1, T0), lambda: durable.append("m1"))
    assert durable == []
    store.poll()
    assert durable == ["m1"] and store.ready(tp)
