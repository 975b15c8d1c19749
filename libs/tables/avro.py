"""One constructor for a table of Avro records: format version, decoder, checks, dead letters."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

from libs.kafka import DeadLetterPublisher, dlq_topic
from libs.serde import AvroDeserializer, AvroRecord, SchemaRegistry, load_schema_text
from libs.tables.global_table import GlobalTable

R = TypeVar("R", bound=AvroRecord)


def format_version(record_type: type[AvroRecord]) -> str:
    """A digest of the reader schema: a new one wipes the store and rebuilds it."""
    return hashlib.sha256(load_schema_text(record_type.SCHEMA).encode()).hexdigest()[:16]


def avro_table(
    record_type: type[R],
    *,
    name: str,
    topic: str,
    state_dir: Path,
    consumer_config: dict[str, Any],
    registry: SchemaRegistry,
    dead_letters: DeadLetterPublisher | None = None,
    **options: Any,
) -> GlobalTable[R]:
    """A ``GlobalTable`` of ``record_type`` values, keyed by the Kafka key.

    * Restore checks each record's wire header only (magic byte, a writer schema id the
      registry knows, fetched once per id); ``get`` decodes into ``record_type``.
    * Registry policy: a registry that cannot answer pauses the table at the record (it is
      retried, never dead-lettered); a schema id the registry does not know is poison.
    * Poison goes to ``dead_letters`` (its topic: ``<topic>.dlq``), once: a rebuild skips the
      records already there. Without ``dead_letters`` poison is logged and skipped.
    * The store is tied to the reader schema: a changed schema rebuilds it.

    ``options`` go to ``GlobalTable`` (``batch_size``, ``retry_s``, ``lagging_threshold``...).
    """
    deserializer = AvroDeserializer(registry, record_type)

    def check(value: bytes, topic: str, partition: int, offset: int) -> int:
        return deserializer.check_header(value, topic=topic, partition=partition, offset=offset)

    return GlobalTable(
        name=name,
        topic=topic,
        state_dir=state_dir,
        consumer_config=consumer_config,
        decode=deserializer.decode,  # bound directly: it runs twice per alert (the lookups)
        check=check,
        header_size=5,  # magic byte + schema id
        on_invalid=None if dead_letters is None else dead_letters.publish_message,
        dead_letter_topic=None if dead_letters is None else dlq_topic(topic),
        format_version=format_version(record_type),
        **options,
    )
