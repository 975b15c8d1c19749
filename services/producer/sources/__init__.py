"""Warehouse sources behind one Protocol: BigQuery, DuckDB and an in-memory twin."""

from services.producer.sources.base import (
    BigQueryWarehouse,
    DuckDBWarehouse,
    TableRef,
    Warehouse,
    WarehouseDataError,
    WarehouseError,
    WarehouseSource,
    WarehouseTimeoutError,
    parse_table,
    parse_warehouse,
    to_row,
)
from services.producer.sources.memory_source import InMemorySource

__all__ = [
    "BigQueryWarehouse",
    "DuckDBWarehouse",
    "InMemorySource",
    "TableRef",
    "Warehouse",
    "WarehouseDataError",
    "WarehouseError",
    "WarehouseSource",
    "WarehouseTimeoutError",
    "parse_table",
    "parse_warehouse",
    "to_row",
]
