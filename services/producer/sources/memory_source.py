"""An in-memory warehouse: the honest twin of the SQL sources for unit tests.

It does not run SQL: a table's rows stand for what the query's base ``SELECT`` returns, and
``fetch`` applies the cursor predicate, ``NULLS FIRST`` ordering and limit with SQL's NULL
semantics (a comparison with NULL is never true). The contract suite runs the same cases
against this twin, DuckDB and the BigQuery emulator.
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import UTC, datetime

from services.producer.core import Position, QueryDefinition, WarehouseRow
from services.producer.sources.base import TableRef, WarehouseError, WarehouseSource, to_row


class InMemorySource:
    """``WarehouseSource`` over Python lists; scriptable failures for retry tests."""

    def __init__(self, tables: dict[str, list[dict[str, object]]] | None = None) -> None:
        self._tables: dict[str, list[dict[str, object]]] = {
            name: [dict(r) for r in rows] for name, rows in (tables or {}).items()
        }
        self._failures: deque[WarehouseError] = deque()
        self._lock = threading.Lock()
        self.fetches = 0
        self.closed = False

    def create_table(self, name: str) -> None:
        """An empty table (a fetch from a table that does not exist fails, as in SQL)."""
        with self._lock:
            self._tables.setdefault(name, [])

    def insert(self, name: str, rows: list[dict[str, object]]) -> None:
        """Append rows to a table (created on first use)."""
        with self._lock:
            self._tables.setdefault(name, []).extend(dict(r) for r in rows)

    def fail_next(self, *errors: WarehouseError) -> None:
        """Make the next fetches raise these errors, one per fetch."""
        with self._lock:
            self._failures.extend(errors)

    def qualified_name(self, table: TableRef) -> str:
        return str(table)

    def fetch(
        self,
        query: QueryDefinition,
        table: TableRef,
        *,
        after: Position,
        until: datetime,
        limit: int,
    ) -> list[WarehouseRow]:
        with self._lock:
            self.fetches += 1
            if self._failures:
                raise self._failures.popleft()
            rows = self._tables.get(str(table))
            if rows is None:
                raise WarehouseError(f"table {table} does not exist")
            snapshot = [dict(r) for r in rows]
        ts_col, key_col = query.timestamp_column, query.key_column
        selected: list[dict[str, object]] = []
        for raw in snapshot:
            values: dict[str, object] = {c: raw.get(c) for c in query.columns}
            ts = values.get(ts_col)
            key = values.get(key_col)
            if not isinstance(ts, datetime):
                continue  # NULL timestamp: no comparison is true
            ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
            if ts > until:
                continue
            after_key = isinstance(key, str) and key > after.key
            if ts > after.timestamp or (ts == after.timestamp and after_key):
                selected.append(values)
        selected.sort(key=lambda v: _order(v, ts_col, key_col))
        return [to_row(query, v) for v in selected[:limit]]

    def close(self) -> None:
        self.closed = True


def _order(values: dict[str, object], ts_col: str, key_col: str) -> tuple[datetime, bool, str]:
    ts = values[ts_col]
    assert isinstance(ts, datetime)
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    key = values.get(key_col)
    # NULLS FIRST: False sorts before True
    return (ts, key is not None, key if isinstance(key, str) else "")


_: type[WarehouseSource] = InMemorySource
