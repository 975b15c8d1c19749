"""Avro serde in the Confluent wire format, typed records, and the schema registry port."""

from libs.serde.avro import (
    SCHEMA_DIR,
    AvroDeserializer,
    AvroSerializer,
    decode_key,
    decode_with_writer_schema,
    encode_key,
    load_schema_text,
)
from libs.serde.errors import (
    DeserializationError,
    RegistryError,
    SchemaNotFoundError,
    SerdeError,
    SerializationError,
)
from libs.serde.records import (
    ALL_RECORDS,
    AvroRecord,
    ConnectorStatusChanged,
    CsdrAssignment,
    DeliveryStatus,
    OnboardingStarted,
    ProducerCursor,
    SlackDeliveryReceipt,
    SlackMessage,
    SlackUser,
    Status,
)
from libs.serde.registry import (
    ConfluentSchemaRegistry,
    InMemorySchemaRegistry,
    SchemaRegistry,
    topic_subject,
    wait_for_registry,
)

__all__ = [
    "ALL_RECORDS",
    "SCHEMA_DIR",
    "AvroDeserializer",
    "AvroRecord",
    "AvroSerializer",
    "ConfluentSchemaRegistry",
    "ConnectorStatusChanged",
    "CsdrAssignment",
    "DeliveryStatus",
    "DeserializationError",
    "InMemorySchemaRegistry",
    "OnboardingStarted",
    "ProducerCursor",
    "RegistryError",
    "SchemaNotFoundError",
    "SchemaRegistry",
    "SerdeError",
    "SerializationError",
    "SlackDeliveryReceipt",
    "SlackMessage",
    "SlackUser",
    "Status",
    "decode_key",
    "decode_with_writer_schema",
    "encode_key",
    "load_schema_text",
    "topic_subject",
    "wait_for_registry",
]
