"""One contract suite for every warehouse source: in-memory twin, DuckDB, BigQuery emulator.

The harnesses here (a table to insert into and a source over it) are shared with the
producer's scenario tests, so each scenario runs against each real warehouse.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import duckdb
import pytest

from services.producer.core import BEGINNING, Position
from services.producer.queries import ONBOARDING_STARTED
from services.producer.sources import (
    InMemorySource,
    TableRef,
    WarehouseError,
    WarehouseSource,
    parse_table,
)
from services.producer.sources.bigquery_source import BigQuerySource
from services.producer.sources.duckdb_source import DuckDBSource
from tests.support.bigquery import BigQueryEmulator, shared_emulator

T0 = datetime(2026, 11, 20, 9, 0, 0, 500000, tzinfo=UTC)
FAR = datetime(2100, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
START = Position(BEGINNING, "")

Row = dict[str, object]


def onboarding_row(org_id: str | None, ts: datetime, **over: object) -> Row:
    values: Row = {
        "org_id": org_id,
        "org_name": f"Org {org_id}",
        "plan": "enterprise",
        "cloud": None,
        "started_at": ts,
    }
    values.update(over)
    return values


class WarehouseHarness(Protocol):
    """A fresh onboarding table in one warehouse, and how the producer reaches it."""

    kind: str
    table: str

    def insert(self, rows: Sequence[Row]) -> None: ...

    def source(self) -> WarehouseSource: ...

    def env(self) -> dict[str, str]: ...

    def table_ref(self) -> TableRef: ...


class MemoryHarness:
    kind = "memory"

    def __init__(self) -> None:
        self.table = "onboarding"
        self._source = InMemorySource()
        self._source.create_table(self.table)

    def insert(self, rows: Sequence[Row]) -> None:
        self._source.insert(self.table, list(rows))

    def source(self) -> WarehouseSource:
        return self._source

    def env(self) -> dict[str, str]:
        raise NotImplementedError("the in-memory source exists only inside the test process")

    def table_ref(self) -> TableRef:
        return parse_table(self.table)


class DuckDBHarness:
    kind = "duckdb"

    def __init__(self, path: Path, table: str = "onboarding") -> None:
        self.path = path
        self.table = table
        with self._write() as conn:
            conn.execute(
                f"CREATE TABLE {table} (org_id VARCHAR, org_name VARCHAR, plan VARCHAR, "
                "cloud VARCHAR, started_at TIMESTAMP)"
            )

    def _write(self) -> duckdb.DuckDBPyConnection:
        # a polling producer may hold the file read-only for a moment: retry the lock
        deadline = time.monotonic() + 30
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def insert(self, rows: Sequence[Row]) -> None:
        cols = ("org_id", "org_name", "plan", "cloud", "started_at")
        data = [
            [
                v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) else v
                for v in (r.get(c) for c in cols)
            ]
            for r in rows
        ]
        columns = [list(col) for col in zip(*data, strict=True)] if data else [[]] * 5
        # one statement over column lists: executemany is row by row and takes minutes at 100k
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO {self.table} SELECT UNNEST($1::VARCHAR[]), UNNEST($2::VARCHAR[]), "
                "UNNEST($3::VARCHAR[]), UNNEST($4::VARCHAR[]), UNNEST($5::TIMESTAMP[])",
                columns,
            )

    def source(self) -> WarehouseSource:
        return DuckDBSource(self.path, timeout_s=30)

    def env(self) -> dict[str, str]:
        return {
            "PRODUCER_WAREHOUSE": f"duckdb://{self.path}",
            "PRODUCER_ONBOARDING_TABLE": self.table,
        }

    def table_ref(self) -> TableRef:
        return parse_table(self.table)


class BigQueryHarness:
    kind = "bigquery"

    def __init__(self, emulator: BigQueryEmulator) -> None:
        self.emulator = emulator
        self.table = emulator.create_table(f"onboarding_{uuid.uuid4().hex[:10]}")

    def insert(self, rows: Sequence[Row]) -> None:
        self.emulator.insert_rows(self.table, rows)

    def source(self) -> WarehouseSource:
        return BigQuerySource(
            self.emulator.project, api_endpoint=self.emulator.endpoint, timeout_s=60
        )

    def env(self) -> dict[str, str]:
        return {
            "PRODUCER_WAREHOUSE": f"bigquery://{self.emulator.project}",
            "PRODUCER_BIGQUERY_API_ENDPOINT": self.emulator.endpoint,
            "PRODUCER_ONBOARDING_TABLE": self.table,
        }

    def table_ref(self) -> TableRef:
        return parse_table(self.table, warehouse="bigquery")


def make_harness(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> WarehouseHarness:
    """A harness of one kind; the emulator is started only for ``bigquery``."""
    if kind == "memory":
        return MemoryHarness()
    if kind == "duckdb":
        return DuckDBHarness(tmp_path / "warehouse.duckdb")
    return BigQueryHarness(request.getfixturevalue("emulator"))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    with shared_emulator(tmp_path_factory) as emu:
        yield emu


KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("duckdb", id="duckdb"),
    pytest.param("bigquery", id="bigquery", marks=pytest.mark.bigquery),
]


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WarehouseHarness]:
    yield make_harness(request.param, request, tmp_path)


def fetch(
    harness: WarehouseHarness,
    after: Position = START,
    until: datetime = FAR,
    limit: int = 100,
) -> list[tuple[datetime, str | None]]:
    source = harness.source()
    try:
        rows = source.fetch(
            ONBOARDING_STARTED, harness.table_ref(), after=after, until=until, limit=limit
        )
    finally:
        source.close()
    return [(r.timestamp, r.key) for r in rows]


def test_empty_table_gives_no_rows(harness: WarehouseHarness) -> None:
    assert fetch(harness) == []


def test_rows_come_in_timestamp_key_order_nulls_first_up_to_the_limit(
    harness: WarehouseHarness,
) -> None:
    harness.insert(
        [
            onboarding_row("b", T0),
            onboarding_row("c", T0 - US),
            onboarding_row(None, T0),
            onboarding_row("a", T0),
            onboarding_row("a", T0 + US),
        ]
    )
    assert fetch(harness) == [(T0 - US, "c"), (T0, None), (T0, "a"), (T0, "b"), (T0 + US, "a")]
    assert fetch(harness, limit=2) == [(T0 - US, "c"), (T0, None)]


def test_rows_strictly_after_the_cursor_break_ties_by_key(harness: WarehouseHarness) -> None:
    harness.insert([onboarding_row(k, T0) for k in ("a", "b", "c")] + [onboarding_row(None, T0)])
    harness.insert([onboarding_row("a", T0 + US), onboarding_row("z", T0 - US)])
    assert fetch(harness, Position(T0, "a")) == [(T0, "b"), (T0, "c"), (T0 + US, "a")]
    # after a NULL-key row the cursor is (T0, ""): every keyed row of T0 follows, not the NULL
    assert fetch(harness, Position(T0, "")) == [(T0, "a"), (T0, "b"), (T0, "c"), (T0 + US, "a")]
    assert fetch(harness, Position(T0, "c")) == [(T0 + US, "a")]


def test_until_bounds_the_window_inclusively(harness: WarehouseHarness) -> None:
    harness.insert([onboarding_row("a", T0), onboarding_row("b", T0 + US)])
    assert fetch(harness, until=T0) == [(T0, "a")]
    assert fetch(harness, until=T0 - US) == []


def test_microseconds_survive_the_round_trip(harness: WarehouseHarness) -> None:
    stamps = [T0, T0 + US, T0 + 999 * US, T0 + 1000 * US]
    harness.insert([onboarding_row(f"o{i}", ts) for i, ts in enumerate(stamps)])
    got = fetch(harness, Position(T0 + US, "o1"))
    assert got == [(T0 + 999 * US, "o2"), (T0 + 1000 * US, "o3")]
    assert all(ts.tzinfo is not None and ts.utcoffset() == timedelta(0) for ts, _ in got)


def test_values_are_bound_as_parameters_never_spliced(harness: WarehouseHarness) -> None:
    keys = ["o'1", 'o"2', "o\\3", "x' OR '1'='1", "Z", "a", "ö"]
    harness.insert([onboarding_row(k, T0, cloud="gcp") for k in keys])
    assert [k for _, k in fetch(harness)] == sorted(keys)
    assert [k for _, k in fetch(harness, Position(T0, "x' OR '1'='1"))] == ["ö"]


def test_every_column_is_returned(harness: WarehouseHarness) -> None:
    harness.insert([onboarding_row("a", T0, cloud="aws"), onboarding_row("b", T0)])
    source = harness.source()
    try:
        rows = source.fetch(
            ONBOARDING_STARTED,
            harness.table_ref(),
            after=START,
            until=FAR,
            limit=5,
        )
    finally:
        source.close()
    assert [dict(r.values) for r in rows] == [
        {
            "org_id": "a",
            "org_name": "Org a",
            "plan": "enterprise",
            "cloud": "aws",
            "started_at": T0,
        },
        {"org_id": "b", "org_name": "Org b", "plan": "enterprise", "cloud": None, "started_at": T0},
    ]
    assert source.qualified_name(harness.table_ref()).endswith(harness.table)


def test_a_missing_table_is_a_warehouse_error(
    harness: WarehouseHarness,
) -> None:
    ref = TableRef((*harness.table_ref().parts[:-1], "no_such_table"))
    source = harness.source()
    try:
        with pytest.raises(WarehouseError):
            source.fetch(ONBOARDING_STARTED, ref, after=START, until=FAR, limit=5)
    finally:
        source.close()


def test_an_unreachable_warehouse_is_a_warehouse_error(tmp_path: Path) -> None:
    sources: list[WarehouseSource] = [
        DuckDBSource(tmp_path / "missing.duckdb"),
        BigQuerySource("p1", api_endpoint="http://127.0.0.1:9", timeout_s=1),
    ]
    for source in sources:
        with pytest.raises(WarehouseError):
            source.fetch(
                ONBOARDING_STARTED,
                TableRef(("alerts", "onboarding")),
                after=START,
                until=FAR,
                limit=5,
            )
        source.close()


def test_duckdb_releases_the_file_once_caught_up(tmp_path: Path) -> None:
    harness = DuckDBHarness(tmp_path / "w.duckdb")
    harness.insert([onboarding_row(f"o{i}", T0) for i in range(3)])
    source = DuckDBSource(harness.path)
    after = START
    first = source.fetch(ONBOARDING_STARTED, harness.table_ref(), after=after, until=FAR, limit=2)
    # a full batch keeps the file open for the next one: a writer has to wait
    with pytest.raises(duckdb.Error):
        duckdb.connect(str(harness.path)).close()
    rest = source.fetch(
        ONBOARDING_STARTED, harness.table_ref(), after=first[-1].position, until=FAR, limit=2
    )
    assert [r.key for r in first + rest] == ["o0", "o1", "o2"]
    harness.insert([onboarding_row("o3", T0)])  # the partial batch released the file
    source.close()
