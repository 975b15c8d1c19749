"""The producer's pure core: cursor order, batch planning, mapping, ids, backoff."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from libs.serde import OnboardingStarted, ProducerCursor
from services.producer.core import (
    BEGINNING,
    EVENT_ID_NAMESPACE,
    BatchPlan,
    CursorOrderError,
    Position,
    RowContext,
    Unmappable,
    WarehouseRow,
    backoff_s,
    cursor_lag_s,
    event_id,
    plan_batch,
    render_sql,
    row_to_json,
    start_position,
    window_end,
)
from services.producer.queries import ONBOARDING_STARTED, QUERIES, map_onboarding_started
from services.producer.sources.base import WarehouseDataError, to_row, to_rows

T0 = datetime(2026, 11, 25, 9, 0, 0, 123456, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
SOURCE = "alerts.onboarding"


def onboarding(org_id: str | None, ts: datetime = T0, **over: object) -> WarehouseRow:
    values: dict[str, object] = {
        "org_id": org_id,
        "org_name": f"Org {org_id}",
        "plan": "enterprise",
        "cloud": "aws",
        "started_at": ts,
    }
    values.update(over)
    return WarehouseRow(timestamp=ts, key=org_id, values=values)


def cursor(ts: datetime, key: str, total: int = 0) -> ProducerCursor:
    return ProducerCursor(
        query="onboarding-started",
        last_timestamp=ts,
        last_key=key,
        updated_at=NOW,
        rows_total=total,
    )


def plan(
    rows: list[WarehouseRow], previous: ProducerCursor | None = None, limit: int = 10
) -> BatchPlan | None:
    return plan_batch(
        ONBOARDING_STARTED,
        rows,
        previous,
        after=start_position(previous),
        source=SOURCE,
        now=NOW,
        limit=limit,
    )


def test_render_sql_wraps_the_declared_select_with_the_cursor_predicate() -> None:
    assert render_sql(ONBOARDING_STARTED, "`p.alerts.onboarding`") == (
        "SELECT * FROM (\n"
        "SELECT org_id, org_name, plan, cloud, started_at FROM `p.alerts.onboarding`\n"
        ") AS cursor_rows\n"
        "WHERE started_at <= @until\n"
        "  AND (started_at > @after_ts OR (started_at = @after_ts AND org_id > @after_key))\n"
        "ORDER BY started_at, org_id NULLS FIRST\n"
        "LIMIT @limit"
    )


def test_queries_are_registered_by_name() -> None:
    assert QUERIES == {"onboarding-started": ONBOARDING_STARTED}


@pytest.mark.parametrize(
    ("stored", "start_from", "expected"),
    [
        (None, None, Position(BEGINNING, "")),
        (cursor(T0, "org-9"), None, Position(T0, "org-9")),
        (cursor(T0, "org-9"), T0 + timedelta(days=1), Position(T0, "org-9")),
        (None, T0, Position(T0 - timedelta(microseconds=1), "\U0010ffff")),
    ],
    ids=["beginning", "stored", "stored-wins-over-start", "start-from-inclusive"],
)
def test_start_position(
    stored: ProducerCursor | None, start_from: datetime | None, expected: Position
) -> None:
    assert start_position(stored, start_from) == expected


@pytest.mark.parametrize(
    ("delay_s", "expected"),
    [
        (60, NOW - timedelta(seconds=60)),
        (0, NOW),
        (0.000001, NOW - timedelta(microseconds=1)),
        (2.5, NOW - timedelta(seconds=2, microseconds=500000)),
    ],
)
def test_window_end(delay_s: float, expected: datetime) -> None:
    assert window_end(NOW, delay_s) == expected


def test_event_id_is_deterministic_and_microsecond_sensitive() -> None:
    a = event_id("onboarding-started", "org-1", T0)
    assert a == event_id("onboarding-started", "org-1", T0.astimezone(UTC))
    assert uuid.UUID(a).version == 5
    others = {
        event_id("onboarding-started", "org-2", T0),
        event_id("other-query", "org-1", T0),
        event_id("onboarding-started", "org-1", T0 + timedelta(microseconds=1)),
    }
    assert a not in others and len(others) == 3


@pytest.mark.parametrize(
    ("query", "key", "ts"),
    [
        ("onboarding-started", "org-1", T0),
        ("onboarding-started", "org-ü-日本-\U0001f600", T0 + timedelta(days=400)),
        ("q", "k\x1fwith separator", datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("q", "k", BEGINNING),
        ("q", "k", datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("q", "k", T0.astimezone(timezone(timedelta(hours=-7)))),
        ("", " ", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_event_id_is_uuid5_of_query_key_and_microseconds(
    query: str, key: str, ts: datetime
) -> None:
    # the contract the ids were first written with (uuid.uuid5); event_id hashes on its own
    micros = (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    expected = str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{query}\x1f{key}\x1f{micros}"))
    assert event_id(query, key, ts) == expected


def test_plan_batch_of_nothing_is_none() -> None:
    assert plan([]) is None


def test_plan_batch_maps_rows_and_moves_the_cursor_to_the_last_row() -> None:
    rows = [onboarding("a"), onboarding("b"), onboarding("a", T0 + timedelta(microseconds=1))]
    result = plan(rows, cursor(T0 - timedelta(seconds=1), "z", total=7))
    assert result is not None
    assert [e.key for e in result.events] == ["a", "b", "a"]
    assert [e.ordinal for e in result.events] == [7, 8, 9]
    first = result.events[0].record
    assert first == OnboardingStarted(
        event_id=event_id("onboarding-started", "a", T0),
        org_id="a",
        org_name="Org a",
        plan="enterprise",
        cloud="aws",
        started_at=T0,
        source=SOURCE,
    )
    assert result.cursor == cursor(T0 + timedelta(microseconds=1), "a", total=10)
    assert result.dead_letters == () and result.rows == 3 and not result.backlog


@pytest.mark.parametrize(("rows", "limit", "backlog"), [(3, 3, True), (2, 3, False), (1, 1, True)])
def test_a_full_batch_signals_a_backlog(rows: int, limit: int, backlog: bool) -> None:
    result = plan([onboarding(f"o{i}") for i in range(rows)], limit=limit)
    assert result is not None and result.backlog is backlog


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (onboarding(None), "org_id (the row key) is NULL or empty"),
        (onboarding("  "), "org_id (the row key) is NULL or empty"),
        (onboarding("a", org_name=None), "org_name is missing or empty (got None)"),
        (onboarding("a", plan=""), "plan is missing or empty (got '')"),
        (onboarding("a", cloud=3), "cloud must be a string or NULL (got 3)"),
    ],
    ids=["null-key", "blank-key", "no-org-name", "empty-plan", "cloud-not-string"],
)
def test_unmappable_rows_are_dead_lettered_and_passed(row: WarehouseRow, reason: str) -> None:
    later = onboarding("zz", T0 + timedelta(seconds=1))
    result = plan([row, later], cursor(T0 - timedelta(seconds=1), "", total=4))
    assert result is not None
    [letter] = result.dead_letters
    assert letter.reason == reason
    assert letter.ordinal == 4
    assert letter.key == row.key
    assert json.loads(letter.row_json)["started_at"] == T0.isoformat()
    assert [e.key for e in result.events] == ["zz"]
    assert result.cursor.last_timestamp == later.timestamp and result.cursor.rows_total == 6


def test_a_null_key_row_moves_the_cursor_before_every_key_of_its_timestamp() -> None:
    result = plan([onboarding(None)], limit=1)
    assert result is not None
    assert (result.cursor.last_timestamp, result.cursor.last_key) == (T0, "")
    # two NULL-key rows of one timestamp share a position; neither refuses the batch
    both = plan([onboarding(None), onboarding(None), onboarding("a")])
    assert both is not None and len(both.dead_letters) == 2 and both.cursor.last_key == "a"


@pytest.mark.parametrize(
    ("previous", "rows"),
    [
        (None, [onboarding("b"), onboarding("a")]),
        (None, [onboarding("a", T0 + timedelta(seconds=1)), onboarding("b")]),
        (cursor(T0, "m"), [onboarding("m")]),
        (cursor(T0, "m"), [onboarding("a")]),
    ],
    ids=["key-order", "timestamp-order", "equal-to-cursor", "before-cursor"],
)
def test_rows_out_of_cursor_order_are_refused(
    previous: ProducerCursor | None, rows: list[WarehouseRow]
) -> None:
    with pytest.raises(CursorOrderError):
        plan(rows, previous)


def test_duplicate_pairs_in_one_batch_are_tolerated() -> None:
    result = plan([onboarding("a"), onboarding("a")])
    assert result is not None
    assert result.events[0].record == result.events[1].record


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 20.0), (10_000, 20.0)],
)
def test_backoff_is_exponential_and_capped(attempt: int, expected: float) -> None:
    assert backoff_s(attempt, initial_s=0.5, max_s=20.0) == expected


def test_cursor_lag() -> None:
    assert cursor_lag_s(None, NOW) is None
    assert cursor_lag_s(cursor(NOW - timedelta(seconds=75), "a"), NOW) == 75.0


def test_row_to_json_handles_warehouse_types() -> None:
    text = row_to_json({"b": Decimal("1.50"), "a": T0, "c": b"\x01", "d": None, "e": {1}})
    assert json.loads(text) == {
        "a": T0.isoformat(),
        "b": "1.50",
        "c": "01",
        "d": None,
        "e": "{1}",
    }


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"org_id": "o", "org_name": "N", "plan": "p", "cloud": None, "started_at": T0},
            OnboardingStarted("id", "o", "N", "p", T0, SOURCE, None),
        ),
        (
            {"org_id": "o", "org_name": "N", "plan": "p", "cloud": "", "started_at": T0},
            OnboardingStarted("id", "o", "N", "p", T0, SOURCE, None),
        ),
        (
            {"org_id": "o", "org_name": "N", "plan": "p", "cloud": "gcp", "started_at": T0},
            OnboardingStarted("id", "o", "N", "p", T0, SOURCE, "gcp"),
        ),
        (
            {"org_id": "o", "org_name": "N", "plan": "p", "started_at": T0.replace(tzinfo=None)},
            Unmappable(
                f"started_at must be a timezone-aware timestamp (got {T0.replace(tzinfo=None)!r})"
            ),
        ),
        ({"org_id": "o", "plan": "p"}, Unmappable("org_name is missing or empty (got None)")),
    ],
    ids=["null-cloud", "empty-cloud", "cloud", "naive-time", "missing-column"],
)
def test_map_onboarding_started(
    values: Mapping[str, object], expected: OnboardingStarted | Unmappable
) -> None:
    assert map_onboarding_started(values, RowContext(event_id="id", source=SOURCE)) == expected


def test_to_rows_builds_what_to_row_builds_and_refuses_what_it_refuses() -> None:
    names = ("org_id", "org_name", "plan", "cloud", "started_at")
    naive = T0.replace(tzinfo=None)
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    tuples = [
        ("org-1", "A", "p", None, naive),  # the usual DuckDB row: naive UTC timestamp
        (None, "B", "p", "aws", naive),  # a NULL key
        ("org-3", "C", "p", None, plus_two),  # TIMESTAMPTZ: converted to UTC
    ]
    rows = to_rows(ONBOARDING_STARTED, names, tuples)
    expected = [one_row(names, t) for t in tuples]
    assert rows == expected
    assert [r.timestamp.tzinfo for r in rows] == [UTC, UTC, UTC]
    assert rows[2].timestamp == T0 and rows[2].values["started_at"] == T0
    with pytest.raises(WarehouseDataError, match="org_id must be a STRING"):
        to_rows(ONBOARDING_STARTED, names, [(42, "A", "p", None, naive)])
    with pytest.raises(WarehouseDataError, match="started_at must be a TIMESTAMP"):
        to_rows(ONBOARDING_STARTED, names, [("org-1", "A", "p", None, "2026-11-25")])
    with pytest.raises(WarehouseDataError, match="started_at must be a TIMESTAMP"):
        to_rows(ONBOARDING_STARTED, names[:-1], [("org-1", "A", "p", None)])


def one_row(names: tuple[str, ...], values: tuple[object, ...]) -> WarehouseRow:
    return to_row(ONBOARDING_STARTED, dict(zip(names, values, strict=True)))
