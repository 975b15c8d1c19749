"""The producer's own settings (``PRODUCER_...``); shared ones live in services.common."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.producer.sources.base import (
    TableRef,
    Warehouse,
    parse_table,
    parse_warehouse,
)


class ProducerSettings(BaseSettings):
    """Which warehouse to poll, how often, and how the cursor and transactions behave."""

    model_config = SettingsConfigDict(env_prefix="PRODUCER_", extra="ignore", frozen=True)

    warehouse: str = Field(
        default="duckdb://var/warehouse.duckdb",
        description="duckdb://<path> (relative, or duckdb:///abs/path) or bigquery://<project>",
    )
    bigquery_api_endpoint: str | None = Field(
        default=None,
        description="BigQuery API base URL (the emulator); anonymous credentials when set",
    )
    onboarding_table: str = Field(
        default="onboarding",
        description="DuckDB: <table> or <schema>.<table>; BigQuery: <dataset>.<table> "
        "or <project>.<dataset>.<table>",
    )
    poll_interval_s: float = Field(
        default=10.0, gt=0, description="wait between polls of a caught-up query"
    )
    delay_s: float = Field(
        default=60.0,
        ge=0,
        description="rows younger than this wait for a later poll; rows committed later "
        "than this after their timestamp are missed",
    )
    batch_size: int = Field(default=1000, ge=1, le=100_000, description="rows per transaction")
    query_timeout_s: float = Field(default=60.0, gt=0, description="one warehouse query")
    retry_initial_s: float = Field(default=1.0, gt=0, description="first retry wait")
    retry_max_s: float = Field(default=60.0, gt=0, description="cap of the retry wait")
    transactional_id: str = Field(
        default="field-alerts-producer",
        min_length=1,
        description="prefix of the per-query transactional.id (<prefix>.<query>); one "
        "replica per prefix",
    )
    start_from: datetime | None = Field(
        default=None,
        description="where a query without a stored cursor starts (ISO 8601, UTC if no "
        "zone); unset: the beginning of the table",
    )
    create_topics: bool = Field(
        default=True, description="create the output, dead-letter and cursor topics at start"
    )
    transaction_timeout_s: float = Field(
        default=60.0, gt=0, description="Kafka transaction.timeout.ms, in seconds"
    )
    cursor_reader_debug: str = Field(
        default="",
        description="librdkafka debug contexts of the cursor reader at start (e.g. "
        "fetch,msg,eos: its fetches and the aborted records they skip), logged at any "
        "LOG_LEVEL; empty: off",
    )

    @field_validator("warehouse")
    @classmethod
    def _check_warehouse(cls, value: str) -> str:
        parse_warehouse(value)
        return value

    @field_validator("onboarding_table")
    @classmethod
    def _check_table(cls, value: str, info: ValidationInfo) -> str:
        warehouse = info.data.get("warehouse")
        kind = parse_warehouse(warehouse).kind if isinstance(warehouse, str) else "duckdb"
        parse_table(value, warehouse=kind)
        return value

    @field_validator("start_from")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def parsed_warehouse(self) -> Warehouse:
        """``warehouse`` parsed (validated at load)."""
        return parse_warehouse(self.warehouse)

    def onboarding_table_ref(self) -> TableRef:
        """``onboarding_table`` parsed for the configured warehouse."""
        return parse_table(self.onboarding_table, warehouse=self.parsed_warehouse().kind)

    def masked(self) -> dict[str, object]:
        """The effective settings for the start log line (nothing here is secret)."""
        return self.model_dump(mode="json")
