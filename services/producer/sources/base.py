"""The warehouse port: one small Protocol, its errors, and the table and URL formats.

Formats (validated at start, so a typo is one clear line rather than a failing query):

* ``PRODUCER_WAREHOUSE``: ``duckdb://<path>`` (everything after ``duckdb://`` is the file
  path, so ``duckdb:///abs/file.duckdb`` is absolute and ``duckdb://var/file.duckdb`` relative
  to the working directory) or ``bigquery://<project>``.
* ``PRODUCER_ONBOARDING_TABLE`` and other table settings: dot-separated identifiers.
  BigQuery: ``<dataset>.<table>`` (project from the warehouse URL) or
  ``<project>.<dataset>.<table>``. DuckDB: ``<table>`` or ``<schema>.<table>``. Dataset,
  schema and table names are ``[A-Za-z_][A-Za-z0-9_]*``; project ids ``[a-z][a-z0-9-]*``.
  Sources quote the validated parts; values always travel as query parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from services.producer.core import Position, QueryDefinition, WarehouseRow

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,1023}")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{0,61}[a-z0-9]|[a-z]")


class WarehouseError(Exception):
    """Root of source errors. Every one is retried with backoff; the cursor does not move."""


class WarehouseTimeoutError(WarehouseError):
    """A query did not answer within the configured timeout."""


class WarehouseDataError(WarehouseError):
    """A row's cursor columns have the wrong type (the table does not match its contract)."""


@dataclass(frozen=True, slots=True)
class TableRef:
    """A validated, dot-separated table name, as configured."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


def parse_table(text: str, *, warehouse: str = "duckdb") -> TableRef:
    """Validate a table setting for a warehouse kind (``duckdb`` or ``bigquery``).

    Raises ``ValueError`` with a message that names the expected format.
    """
    parts = tuple(text.strip().split("."))
    if warehouse == "bigquery":
        if len(parts) not in (2, 3):
            raise ValueError(
                "BigQuery tables are <dataset>.<table> or <project>.<dataset>.<table>, "
                f"got {text!r}"
            )
        if len(parts) == 3 and not _PROJECT.fullmatch(parts[0]):
            raise ValueError(f"{parts[0]!r} is not a valid BigQuery project id")
        names = parts[-2:]
    else:
        if len(parts) not in (1, 2):
            raise ValueError(f"DuckDB tables are <table> or <schema>.<table>, got {text!r}")
        names = parts
    for name in names:
        if not _IDENT.fullmatch(name):
            raise ValueError(
                f"{name!r} in {text!r} is not a valid identifier ([A-Za-z_][A-Za-z0-9_]*)"
            )
    return TableRef(parts)


@dataclass(frozen=True, slots=True)
class DuckDBWarehouse:
    """``duckdb://<path>``."""

    path: Path

    @property
    def kind(self) -> str:
        return "duckdb"


@dataclass(frozen=True, slots=True)
class BigQueryWarehouse:
    """``bigquery://<project>``."""

    project: str

    @property
    def kind(self) -> str:
        return "bigquery"


Warehouse = DuckDBWarehouse | BigQueryWarehouse


def parse_warehouse(url: str) -> Warehouse:
    """Parse ``PRODUCER_WAREHOUSE``; raise ``ValueError`` naming the accepted forms."""
    url = url.strip()
    if url.startswith("duckdb://"):
        path = url[len("duckdb://") :]
        if not path:
            raise ValueError("duckdb:// needs a file path, e.g. duckdb:///data/warehouse.duckdb")
        return DuckDBWarehouse(Path(path))
    if url.startswith("bigquery://"):
        project = url[len("bigquery://") :].rstrip("/")
        if not _PROJECT.fullmatch(project):
            raise ValueError(f"bigquery://<project> needs a valid project id, got {project!r}")
        return BigQueryWarehouse(project)
    raise ValueError(f"expected duckdb://<path> or bigquery://<project>, got {url!r}")


class WarehouseSource(Protocol):
    """Reads a query's rows after a cursor position; the producer's only view of a warehouse.

    ``fetch`` returns at most ``limit`` rows strictly after ``after`` in ``(timestamp, key)``
    order whose timestamp is not newer than ``until``, NULL keys first within a timestamp
    (``core.render_sql`` is the normative statement). Errors are ``WarehouseError``.
    """

    def qualified_name(self, table: TableRef) -> str:
        """The table's full name, as it appears in events (``source``) and dead letters."""
        ...

    def fetch(
        self,
        query: QueryDefinition,
        table: TableRef,
        *,
        after: Position,
        until: datetime,
        limit: int,
    ) -> list[WarehouseRow]:
        """Rows of ``query`` over ``table`` after ``after``, up to ``until``, at most ``limit``."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def to_row(query: QueryDefinition, values: dict[str, object]) -> WarehouseRow:
    """Build a ``WarehouseRow`` from a row's column values, checking the cursor columns.

    A naive timestamp (DuckDB ``TIMESTAMP``) is UTC by the table contract.
    """
    ts = values.get(query.timestamp_column)
    if not isinstance(ts, datetime):
        raise WarehouseDataError(
            f"{query.timestamp_column} must be a TIMESTAMP, got {type(ts).__name__}"
        )
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    values[query.timestamp_column] = ts
    key = values.get(query.key_column)
    if key is not None and not isinstance(key, str):
        raise WarehouseDataError(f"{query.key_column} must be a STRING, got {type(key).__name__}")
    return WarehouseRow(timestamp=ts, key=key, values=values)


def to_rows(
    query: QueryDefinition, names: Sequence[str], tuples: Iterable[Sequence[object]]
) -> list[WarehouseRow]:
    """``to_row`` over result tuples whose columns are ``names``, a whole batch at once.

    The usual row (a naive TIMESTAMP, a string or NULL key) is built inline: a call and the
    checks per row were a tenth of a backfill's CPU. Anything else goes through ``to_row``.
    """
    ts_column, key_column = query.timestamp_column, query.key_column
    columns = list(names)
    if ts_column not in columns or key_column not in columns:
        return [to_row(query, dict(zip(columns, t, strict=True))) for t in tuples]
    ts_at, key_at = columns.index(ts_column), columns.index(key_column)
    rows: list[WarehouseRow] = []
    append = rows.append
    for t in tuples:
        ts, key = t[ts_at], t[key_at]
        if type(ts) is datetime and ts.tzinfo is None and (key is None or type(key) is str):
            ts = ts.replace(tzinfo=UTC)
            values = dict(zip(columns, t, strict=True))
            values[ts_column] = ts
            append(WarehouseRow(timestamp=ts, key=key, values=values))
        else:
            append(to_row(query, dict(zip(columns, t, strict=True))))
    return rows
