"""DuckDB source: the embedded warehouse for local runs, the demo and tests.

The same statement as BigQuery (``core.render_sql``) with ``$name`` parameters. The file is
opened read-only and only while there is work: the connection stays open across the batches
of a backlog and is closed as soon as a fetch returns a partial batch, so another process (the
demo's seeder, a test) can open the file for writing between polls. DuckDB allows one writing
process per file: while a writer holds it, opening fails and the poll is retried with backoff,
like any other warehouse error. A query running longer than ``timeout_s`` is interrupted.

``TIMESTAMP`` columns are naive in DuckDB and UTC by the table contract; ``TIMESTAMPTZ``
works too (the session time zone is set to UTC).
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from services.producer.core import (
    PARAM_AFTER_KEY,
    PARAM_AFTER_TS,
    PARAM_LIMIT,
    PARAM_UNTIL,
    Position,
    QueryDefinition,
    WarehouseRow,
    render_sql,
)
from services.producer.sources.base import (
    TableRef,
    WarehouseError,
    WarehouseSource,
    WarehouseTimeoutError,
    to_rows,
)

log = logging.getLogger(__name__)

_PARAM = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)")


def duckdb_sql(query: QueryDefinition, table: TableRef) -> str:
    """The statement for DuckDB: quoted table, ``$name`` parameters."""
    quoted = ".".join(f'"{part}"' for part in table.parts)
    return _PARAM.sub(r"$\1", render_sql(query, quoted))


def _naive_utc(ts: datetime) -> datetime:
    # DuckDB binds an aware datetime through the session zone; naive UTC is unambiguous.
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


class DuckDBSource:
    """``WarehouseSource`` over a DuckDB file."""

    def __init__(self, path: Path, *, timeout_s: float = 60.0) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._conn: Any = None

    def qualified_name(self, table: TableRef) -> str:
        return str(table)

    def _connect(self) -> Any:
        if self._conn is None:
            if not self.path.exists():
                raise WarehouseError(f"DuckDB file {self.path} does not exist")
            try:
                conn = duckdb.connect(str(self.path), read_only=True)
                conn.execute("SET TimeZone = 'UTC'")
            except duckdb.Error as exc:
                raise WarehouseError(f"cannot open DuckDB file {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def fetch(
        self,
        query: QueryDefinition,
        table: TableRef,
        *,
        after: Position,
        until: datetime,
        limit: int,
    ) -> list[WarehouseRow]:
        conn = self._connect()
        params = {
            PARAM_UNTIL: _naive_utc(until),
            PARAM_AFTER_TS: _naive_utc(after.timestamp),
            PARAM_AFTER_KEY: after.key,
            PARAM_LIMIT: limit,
        }
        timed_out = threading.Event()

        def interrupt() -> None:
            timed_out.set()
            conn.interrupt()

        timer = threading.Timer(self._timeout_s, interrupt)
        timer.daemon = True
        timer.start()
        try:
            cur = conn.execute(duckdb_sql(query, table), params)
            names = [d[0] for d in cur.description]
            raw = cur.fetchall()
        except duckdb.Error as exc:
            self.close()
            if timed_out.is_set():
                raise WarehouseTimeoutError(
                    f"DuckDB query {query.name} took longer than {self._timeout_s}s"
                ) from exc
            raise WarehouseError(f"DuckDB query {query.name} failed: {exc}") from exc
        finally:
            timer.cancel()
        rows = to_rows(query, names, raw)
        if len(rows) < limit:
            # caught up: let writers have the file until the next poll
            self.close()
        return rows

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except duckdb.Error:
                log.warning("closing DuckDB connection failed", exc_info=True)
            self._conn = None


_: type[WarehouseSource] = DuckDBSource
