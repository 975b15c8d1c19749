"""GlobalTable: a RocksDB copy of a compacted topic (used by the enricher and the notifier)."""

from libs.tables.avro import avro_table, format_version
from libs.tables.errors import TableError
from libs.tables.global_table import (
    Check,
    Decoder,
    GlobalTable,
    InMemoryTable,
    TableState,
    bootstrap_all,
)
from libs.tables.store import InMemoryStore, RocksDictStore, TableStore

__all__ = [
    "Check",
    "Decoder",
    "GlobalTable",
    "InMemoryStore",
    "InMemoryTable",
    "RocksDictStore",
    "TableError",
    "TableState",
    "TableStore",
    "avro_table",
    "bootstrap_all",
    "format_version",
]
