"""Pure logic of the warehouse producer: cursor order, batch planning, row mapping, ids.

The gap-free cursor
-------------------
A query reads its rows in ``(timestamp, key)`` order and remembers the last pair it produced
(a ``ProducerCursor``). The next poll asks for rows *strictly after* that pair::

    started_at > @after_ts OR (started_at = @after_ts AND org_id > @after_key)

so rows sharing one timestamp that a batch boundary (or a crash) splits are neither skipped
nor read twice: the key breaks the tie. The timestamp keeps the warehouse's microsecond
precision end to end (``ProducerCursor.last_timestamp`` is ``timestamp-micros``), so rows one
microsecond apart never collapse into the same millisecond.

Rows newer than ``now - delay`` are left for a later poll (``window_end``): a row committed a
little after its timestamp (a long transaction, a slow loader) is still ahead of the cursor
when it becomes visible, instead of behind it. The delay also absorbs clock skew between the
producer's host and whatever stamps the rows.

Known limits (conscious, documented trade-offs of the timestamp+key approach):

* A row whose commit becomes visible more than ``delay`` after its own timestamp is missed for
  good: by then the cursor has moved past its ``(timestamp, key)``. The same holds for a row
  inserted later with an older timestamp (a backfill into the past). Choose ``delay`` longer
  than the slowest load into the table. Such rows can only be re-produced by resetting the
  cursor (a tombstone for the query's key in the cursor topic restarts the query from
  ``start_from``, replaying every row since then with the same event ids).
* ``(timestamp, key)`` must be unique: two rows with the same pair become two events with the
  same event id, or, when a batch boundary separates them, the second is skipped. The key
  column is compared as a string.
* A row whose timestamp is NULL never satisfies the predicate and is never read; a row whose
  key is NULL sorts first within its timestamp (``NULLS FIRST``), is dead-lettered, and moves
  the cursor to ``(timestamp, "")`` so every keyed row of that timestamp still follows.

Event ids are deterministic (query name, row key and timestamp), so a replay after a cursor
reset is recognisable downstream.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from libs.serde.records import AvroRecord, ProducerCursor

#: Where a query without a stored cursor starts: before any timestamp a warehouse can hold.
BEGINNING = datetime(1, 1, 1, tzinfo=UTC)

#: Namespace of the uuid5 event ids; changing it changes every id, so it never changes.
EVENT_ID_NAMESPACE = uuid.UUID("5b0c6f7e-1d0a-4f53-9f38-2f1c8e6c9a10")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# uuid5 is SHA-1 over the namespace's bytes and the name: hashing the namespace once and
# copying that state per row, then formatting the digest directly, gives the ids
# ``uuid.uuid5`` gives (tests/unit/test_producer_core.py compares them) at a fifth of its
# cost, which was the largest single item of a backfill's CPU per row.
_EVENT_ID_PREFIX = hashlib.sha1(EVENT_ID_NAMESPACE.bytes, usedforsecurity=False)

#: Query parameters every rendered query uses (``@name``; each source binds them its own way).
PARAM_UNTIL = "until"
PARAM_AFTER_TS = "after_ts"
PARAM_AFTER_KEY = "after_key"
PARAM_LIMIT = "limit"


class CursorOrderError(Exception):
    """A source returned rows out of ``(timestamp, key)`` order or not after the cursor.

    A programming error of the source, not a data problem: producing such a batch could skip
    or duplicate rows, so the batch is refused.
    """


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A point in a query's ``(timestamp, key)`` order; ``""`` sorts before every key."""

    timestamp: datetime
    key: str


@dataclass(frozen=True, slots=True)
class WarehouseRow:
    """One row as a source returns it.

    ``timestamp`` and ``key`` are the values of the query's cursor columns (timestamp always
    timezone-aware UTC, key ``None`` when the column is NULL); ``values`` holds every selected
    column by name, cursor columns included.
    """

    timestamp: datetime
    key: str | None
    values: Mapping[str, object]

    @property
    def position(self) -> Position:
        """Where the row sits in cursor order (a NULL key sorts first, like ``""``)."""
        return Position(self.timestamp, self.key or "")


@dataclass(frozen=True, slots=True)
class RowContext:
    """What a row mapper gets besides the row: its event id and the source's name."""

    event_id: str
    source: str


@dataclass(frozen=True, slots=True)
class Unmappable:
    """A row that cannot become a record, and why (the dead letter's error message)."""

    reason: str


RowMapper = Callable[[Mapping[str, object], RowContext], AvroRecord | Unmappable]


@dataclass(frozen=True, slots=True)
class QueryDefinition:
    """Everything about one warehouse query, declared in one place.

    ``sql`` is the base ``SELECT`` over ``{table}`` (the configured table, validated and
    quoted by the source); ``render_sql`` wraps it with the cursor predicate, the ordering and
    the limit built from ``timestamp_column`` and ``key_column``, so the cursor can never
    disagree with the SQL. ``columns`` are the names the base SELECT returns. The SQL holds no
    ``@`` except in parameters: DuckDB's binding rewrites ``@name`` to ``$name``.
    """

    name: str
    sql: str
    columns: tuple[str, ...]
    timestamp_column: str
    key_column: str
    record_type: type[AvroRecord]
    map_row: RowMapper


@dataclass(frozen=True, slots=True)
class Event:
    """One record to produce, keyed by the row key; ``ordinal`` as in ``DeadLetter``."""

    key: str
    record: AvroRecord
    ordinal: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row that could not be mapped: JSON of the row, the reason and its ordinal.

    ``ordinal`` is the row's 0-based position among every row the query has read since its
    cursor began (``rows_total`` before it); it stands in for the Kafka offset in the
    ``dlq.source.offset`` header, with ``dlq.source.partition`` -1.
    """

    key: str | None
    row_json: str
    reason: str
    ordinal: int


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What one batch produces, atomically: events, dead letters and the new cursor."""

    events: tuple[Event, ...]
    dead_letters: tuple[DeadLetter, ...]
    cursor: ProducerCursor
    rows: int
    #: the batch was full, so more rows may be waiting: poll again without waiting
    backlog: bool


def render_sql(query: QueryDefinition, table: str) -> str:
    """The full statement for ``query`` over an already quoted ``table``, with ``@`` params.

    Rows strictly after ``(@after_ts, @after_key)`` and not newer than ``@until``, in cursor
    order, at most ``@limit`` of them. ``NULLS FIRST`` is explicit because BigQuery and DuckDB
    disagree on the default, and a NULL-key row must sort before the keyed rows of its
    timestamp (see the module docstring).
    """
    ts, key = query.timestamp_column, query.key_column
    base = query.sql.format(table=table).strip()
    return (
        f"SELECT * FROM (\n{base}\n) AS cursor_rows\n"
        f"WHERE {ts} <= @{PARAM_UNTIL}\n"
        f"  AND ({ts} > @{PARAM_AFTER_TS}"
        f" OR ({ts} = @{PARAM_AFTER_TS} AND {key} > @{PARAM_AFTER_KEY}))\n"
        f"ORDER BY {ts}, {key} NULLS FIRST\n"
        f"LIMIT @{PARAM_LIMIT}"
    )


def start_position(cursor: ProducerCursor | None, start_from: datetime | None = None) -> Position:
    """Where the next poll starts: after the stored cursor, or before ``start_from``.

    ``start_from`` (a query without a cursor) is inclusive: the position is just before it.
    """
    if cursor is not None:
        return Position(cursor.last_timestamp, cursor.last_key)
    if start_from is None:
        return Position(BEGINNING, "")
    # one microsecond earlier with the smallest key: rows at exactly start_from are included
    return Position(start_from - timedelta(microseconds=1), "\U0010ffff")


def window_end(now: datetime, delay_s: float) -> datetime:
    """The newest timestamp a poll at ``now`` may read: ``now - delay``, to the microsecond."""
    return now - timedelta(microseconds=round(delay_s * 1_000_000))


def event_id(query: str, key: str, timestamp: datetime) -> str:
    """A deterministic id for the event of one row: uuid5 of query, key and timestamp (µs).

    The same string as ``str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{query}\\x1f{key}\\x1f{µs}"))``.
    """
    delta = timestamp - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    sha = _EVENT_ID_PREFIX.copy()
    sha.update(f"{query}\x1f{key}\x1f{micros}".encode())
    digest = bytearray(sha.digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def plan_batch(
    query: QueryDefinition,
    rows: Sequence[WarehouseRow],
    previous: ProducerCursor | None,
    *,
    after: Position,
    source: str,
    now: datetime,
    limit: int,
) -> BatchPlan | None:
    """Map one batch of rows (in cursor order, after ``after``) to events and dead letters.

    Returns ``None`` for an empty batch (nothing to write, the cursor stays). The new cursor
    is the last row's position, dead-lettered rows included: a row that cannot be mapped is
    reported once and never blocks the rows behind it. ``now`` stamps the cursor's
    ``updated_at``; ``limit`` is the batch size the rows were fetched with.
    """
    if not rows:
        return None
    events: list[Event] = []
    dead: list[DeadLetter] = []
    total = previous.rows_total if previous is not None else 0
    # Positions as plain (timestamp, key) tuples: the same order as ``Position``'s, at a
    # tenth of the cost of building and comparing a dataclass per row.
    start = (after.timestamp, after.key)
    last = start
    name, map_row = query.name, query.map_row
    for i, row in enumerate(rows):
        key = row.key
        pos = (row.timestamp, key or "")
        # Only a source ignoring the predicate or the ordering trips this. Equal positions
        # within a batch are tolerated: a NULL-key row sorts as "" and the table may hold a
        # duplicate (timestamp, key) pair, and refusing those would wedge the query for good.
        if pos < last or (i == 0 and pos == start and key):
            raise CursorOrderError(
                f"query {name}: row {Position(*pos)} is not after {Position(*last)}; the "
                "source must return rows strictly after the cursor in (timestamp, key) order"
            )
        last = pos
        ordinal = total + i
        if key is None or not key.strip():
            dead.append(
                _dead_letter(row, f"{query.key_column} (the row key) is NULL or empty", ordinal)
            )
            continue
        ctx = RowContext(event_id=event_id(name, key, row.timestamp), source=source)
        outcome = map_row(row.values, ctx)
        if isinstance(outcome, Unmappable):
            dead.append(_dead_letter(row, outcome.reason, ordinal))
        else:
            events.append(Event(key=key, record=outcome, ordinal=ordinal))
    cursor = ProducerCursor(
        query=name,
        last_timestamp=last[0],
        last_key=last[1],
        updated_at=now,
        rows_total=total + len(rows),
    )
    return BatchPlan(
        events=tuple(events),
        dead_letters=tuple(dead),
        cursor=cursor,
        rows=len(rows),
        backlog=len(rows) >= limit,
    )


def cursor_lag_s(cursor: ProducerCursor | None, now: datetime) -> float | None:
    """Seconds between the cursor's timestamp and ``now`` (None before the first batch).

    When the query is caught up this hovers around ``delay + poll interval``; a growing lag
    means the producer falls behind (or the table has no new rows).
    """
    if cursor is None:
        return None
    return (now - cursor.last_timestamp).total_seconds()


def backoff_s(attempt: int, *, initial_s: float, max_s: float) -> float:
    """Capped exponential backoff: ``initial * 2**(attempt-1)``, at most ``max_s``.

    ``attempt`` counts consecutive failures from 1. No jitter: there is one producer replica
    per deployment, so there is no herd to spread.
    """
    if attempt <= 0:
        return 0.0
    exponent = min(attempt - 1, 62)  # keeps 2**exponent finite for any attempt count
    return min(max_s, initial_s * math.pow(2.0, exponent))


def row_to_json(values: Mapping[str, object]) -> str:
    """JSON of a row for its dead letter; timestamps as ISO 8601, anything else as text."""
    return json.dumps(dict(values), default=_json_default, ensure_ascii=False, sort_keys=True)


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def _dead_letter(row: WarehouseRow, reason: str, ordinal: int) -> DeadLetter:
    return DeadLetter(key=row.key, row_json=row_to_json(row.values), reason=reason, ordinal=ordinal)
