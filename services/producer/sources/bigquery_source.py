"""BigQuery source through google-cloud-bigquery, with query parameters only.

Values travel as ``ScalarQueryParameter`` (TIMESTAMP at microsecond precision, STRING, INT64);
the only text spliced into the statement is the table name, validated as identifiers by
``parse_table`` and back-quoted. ``api_endpoint`` points the client at the emulator (with
anonymous credentials); without it the client uses Application Default Credentials.

Queries go through ``jobs.query`` (``query_and_wait``). The client's own retries are bounded
by the query timeout and job retries are off: the producer's loop owns retrying, with backoff
and without moving the cursor. For large tables, partition or cluster the table on the
timestamp column so the cursor predicate prunes what is scanned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

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
    to_row,
)


def make_client(project: str, api_endpoint: str | None = None) -> Any:
    """A BigQuery client; anonymous against a custom endpoint (the emulator)."""
    if api_endpoint:
        return bigquery.Client(
            project=project,
            client_options=ClientOptions(api_endpoint=api_endpoint),
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )
    return bigquery.Client(project=project)


class BigQuerySource:
    """``WarehouseSource`` over BigQuery (or the emulator)."""

    def __init__(
        self,
        project: str,
        *,
        api_endpoint: str | None = None,
        timeout_s: float = 60.0,
        client: Any = None,
    ) -> None:
        self.project = project
        self._timeout_s = timeout_s
        self._client = client if client is not None else make_client(project, api_endpoint)

    def qualified_name(self, table: TableRef) -> str:
        parts = table.parts if len(table.parts) == 3 else (self.project, *table.parts)
        return ".".join(parts)

    def sql(self, query: QueryDefinition, table: TableRef) -> str:
        """The statement for BigQuery: back-quoted table, ``@name`` parameters."""
        return render_sql(query, f"`{self.qualified_name(table)}`")

    def fetch(
        self,
        query: QueryDefinition,
        table: TableRef,
        *,
        after: Position,
        until: datetime,
        limit: int,
    ) -> list[WarehouseRow]:
        config = bigquery.QueryJobConfig(
            query_parameters=[
                bigquery.ScalarQueryParameter(PARAM_UNTIL, "TIMESTAMP", until),
                bigquery.ScalarQueryParameter(PARAM_AFTER_TS, "TIMESTAMP", after.timestamp),
                bigquery.ScalarQueryParameter(PARAM_AFTER_KEY, "STRING", after.key),
                bigquery.ScalarQueryParameter(PARAM_LIMIT, "INT64", limit),
            ]
        )
        timeout = self._timeout_s
        try:
            result = self._client.query_and_wait(
                self.sql(query, table),
                job_config=config,
                api_timeout=timeout,
                wait_timeout=timeout,
                retry=bigquery.DEFAULT_RETRY.with_timeout(timeout),
                job_retry=None,
            )
            raw = [dict(row.items()) for row in result]
        except (gexc.RetryError, gexc.DeadlineExceeded, TimeoutError) as exc:
            raise WarehouseTimeoutError(
                f"BigQuery query {query.name} did not answer within {timeout}s: {exc}"
            ) from exc
        except Exception as exc:
            # google-api-core, google-auth, requests and urllib3 errors share no base class
            # that excludes programming errors; every one of them means "retry later" here.
            raise WarehouseError(f"BigQuery query {query.name} failed: {exc}") from exc
        return [to_row(query, values) for values in raw]

    def close(self) -> None:
        self._client.close()


_: type[WarehouseSource] = BigQuerySource
