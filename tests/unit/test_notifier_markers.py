"""In-doubt markers: RocksDB and the in-memory twin behave alike; RocksDB survives a reopen."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.notifier.core import AttemptMarker
from services.notifier.markers import (
    AttemptLog,
    InDoubtStore,
    InMemoryAttemptLog,
    RocksDictAttemptLog,
)

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["rocksdict", "in_memory"])
def markers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AttemptLog]:
    log: AttemptLog = (
        RocksDictAttemptLog(tmp_path / "attempts")
        if request.param == "rocksdict"
        else InMemoryAttemptLog()
    )
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


def test_markers_survive_a_reopen(tmp_path: Path) -> None:
    first = RocksDictAttemptLog(tmp_path / "attempts")
    first.put("m1", AttemptMarker("C1", 3, T0))
    first.close()
    again = RocksDictAttemptLog(tmp_path / "attempts")
    try:
        assert again.get("m1") == AttemptMarker("C1", 3, T0)
        assert len(again) == 1
    finally:
        again.close()


def test_prune_drops_old_markers(tmp_path: Path) -> None:
    log = RocksDictAttemptLog(tmp_path / "attempts")
    try:
        log.put("old", AttemptMarker("C1", 1, T0 - timedelta(days=8)))
        log.put("new", AttemptMarker("C1", 1, T0))
        assert log.prune(T0 - timedelta(days=7)) == 1
        assert log.get("old") is None
        assert log.get("new") is not None
        assert len(log) == 1
    finally:
        log.close()


def test_a_corrupt_store_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "attempts"
    path.mkdir()
    (path / "CURRENT").write_text("garbage\n")
    log = RocksDictAttemptLog(path)
    try:
        assert len(log) == 0
        log.put("m1", AttemptMarker("C1", 1, T0))
        assert log.get("m1") is not None
    finally:
        log.close()


@pytest.fixture(params=["rocksdict", "in_memory"])
def local_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InDoubtStore]:
    store: InDoubtStore = (
        RocksDictAttemptLog(tmp_path / "attempts")
        if request.param == "rocksdict"
        else InMemoryAttemptLog()
    )
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
