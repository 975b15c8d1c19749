"""GlobalTable: a RocksDB copy of a compacted topic (used by the enricher and the notifier)."""

from libs.tables.errors import TableError
from libs.tables.global_table import (
    Decoder,
    GlobalTable,
    InMemoryTable,
    TableState,
    bootstrap_all,
)

__all__ = [
    "Decoder",
    "GlobalTable",
    "InMemoryTable",
    "TableError",
    "TableState",
    "bootstrap_all",
]
