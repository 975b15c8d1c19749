"""Avro in the Confluent wire format: ``0x00``, a 4-byte big-endian schema id, the Avro body.

Writers register their schema under the subject the topic name strategy gives
(``<topic>-value``) once per topic and then only pack bytes. Readers resolve the writer's
schema by id (cached) against their own schema, so a record written with an older or newer
compatible schema still decodes into the reader's typed record.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Generic

import fastavro
from fastavro.types import Schema as ParsedSchema

from libs.serde.errors import (
    DeserializationError,
    RegistryError,
    SchemaNotFoundError,
    SerializationError,
)
from libs.serde.records import R
from libs.serde.registry import SchemaRegistry, topic_subject

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

SubjectNameStrategy = Callable[[str], str]


@cache
def load_schema_text(file_name: str, schema_dir: Path = SCHEMA_DIR) -> str:
    """Read one ``.avsc`` file of ``schemas/`` as text (validated as Avro)."""
    path = schema_dir / file_name
    try:
        text = path.read_text(encoding="utf-8")
        fastavro.parse_schema(json.loads(text))
    except FileNotFoundError:
        raise SchemaNotFoundError(f"schema file {path} does not exist") from None
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaNotFoundError(f"schema file {path} is not valid Avro: {exc}") from exc
    return text


def _parse(text: str) -> ParsedSchema:
    return fastavro.parse_schema(json.loads(text))


class AvroSerializer(Generic[R]):
    """Encodes records of one type for any topic, registering the schema per subject once."""

    def __init__(
        self,
        registry: SchemaRegistry,
        record_type: type[R],
        *,
        subject_name_strategy: SubjectNameStrategy = topic_subject,
        schema_dir: Path = SCHEMA_DIR,
    ) -> None:
        self._registry = registry
        self._record_type = record_type
        self._strategy = subject_name_strategy
        self._schema_text = load_schema_text(record_type.SCHEMA, schema_dir)
        self._schema = _parse(self._schema_text)
        self._headers: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _header(self, topic: str) -> bytes:
        header = self._headers.get(topic)
        if header is None:
            with self._lock:
                subject = self._strategy(topic)
                schema_id = self._registry.register(subject, self._schema_text)
                header = _HEADER.pack(MAGIC_BYTE, schema_id)
                self._headers[topic] = header
        return header

    def __call__(self, topic: str, record: R) -> bytes:
        """Encode ``record`` for ``topic``."""
        header = self._header(topic)
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, self._schema, record.to_avro())
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise SerializationError(
                f"cannot encode {type(record).__name__} for {topic}: {exc}"
            ) from exc
        return buf.getvalue()


class AvroDeserializer(Generic[R]):
    """Decodes Confluent-framed Avro into records of one type, resolving writer schemas by id."""

    def __init__(
        self,
        registry: SchemaRegistry,
        record_type: type[R],
        *,
        schema_dir: Path = SCHEMA_DIR,
    ) -> None:
        self._registry = registry
        self._record_type = record_type
        self._reader_text = load_schema_text(record_type.SCHEMA, schema_dir)
        self._reader = _parse(self._reader_text)
        self._reader_canonical = _canonical(self._reader_text)
        # schema id -> (writer schema, reader schema or None when identical to the writer's)
        self._writers: dict[int, tuple[ParsedSchema, ParsedSchema | None]] = {}
        self._lock = threading.Lock()

    def _writer(self, schema_id: int) -> tuple[ParsedSchema, ParsedSchema | None]:
        found = self._writers.get(schema_id)
        if found is None:
            with self._lock:
                text = self._registry.schema_by_id(schema_id)
                writer = _parse(text)
                same = _canonical(text) == self._reader_canonical
                # Skipping resolution when writer == reader is what makes decoding fast.
                found = (writer, None if same else self._reader)
                self._writers[schema_id] = found
        return found

    def check_header(self, data: bytes | None, *, topic: str, partition: int, offset: int) -> int:
        """Validate the wire header of ``data`` without decoding its payload; return the id.

        Checks the magic byte and that the registry knows the writer schema id (fetched once and
        cached, so decoding these bytes later needs no registry call). Raises
        ``DeserializationError`` as decoding would, ``registry_unavailable`` included.
        """
        if data is None or len(data) < 5 or data[0] != MAGIC_BYTE:
            raise DeserializationError(
                "not Confluent wire format (missing magic byte 0 and schema id)",
                topic=topic,
                partition=partition,
                offset=offset,
            )
        _, schema_id = _HEADER.unpack_from(data)
        if schema_id in self._writers:
            return int(schema_id)
        try:
            self._writer(schema_id)
        except RegistryError as exc:
            raise DeserializationError(
                f"writer schema {schema_id} unavailable: {exc}",
                topic=topic,
                partition=partition,
                offset=offset,
            ) from exc
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise DeserializationError(
                f"writer schema {schema_id} is not valid Avro: {exc}",
                topic=topic,
                partition=partition,
                offset=offset,
            ) from exc
        return int(schema_id)

    def __call__(self, data: bytes | None, *, topic: str, partition: int, offset: int) -> R:
        """Decode one Kafka value; raise ``DeserializationError`` naming where it came from."""
        if data is None:
            raise DeserializationError(
                "null value where a record was expected",
                topic=topic,
                partition=partition,
                offset=offset,
            )
        if len(data) < 5 or data[0] != MAGIC_BYTE:
            raise DeserializationError(
                "not Confluent wire format (missing magic byte 0 and schema id)",
                topic=topic,
                partition=partition,
                offset=offset,
            )
        _, schema_id = _HEADER.unpack_from(data)
        try:
            writer, reader = self._writer(schema_id)
        except RegistryError as exc:
            raise DeserializationError(
                f"writer schema {schema_id} unavailable: {exc}",
                topic=topic,
                partition=partition,
                offset=offset,
            ) from exc
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise DeserializationError(
                f"writer schema {schema_id} is not valid Avro: {exc}",
                topic=topic,
                partition=partition,
                offset=offset,
            ) from exc
        try:
            payload: Any = fastavro.schemaless_reader(io.BytesIO(data[5:]), writer, reader)
            return self._record_type.from_avro(payload)
        except Exception as exc:  # fastavro raises a wide range of errors on corrupt input
            raise DeserializationError(
                f"cannot decode {self._record_type.__name__} with schema {schema_id}: "
                f"{type(exc).__name__}: {exc}",
                topic=topic,
                partition=partition,
                offset=offset,
            ) from exc


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def encode_key(key: str) -> bytes:
    """Keys are plain UTF-8 strings."""
    return key.encode("utf-8")


def decode_key(data: bytes | None, *, topic: str, partition: int, offset: int) -> str:
    """Decode a UTF-8 key; a missing or non-UTF-8 key raises ``DeserializationError``."""
    if data is None:
        raise DeserializationError(
            "record has no key", topic=topic, partition=partition, offset=offset
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeserializationError(
            f"key is not UTF-8: {exc}", topic=topic, partition=partition, offset=offset
        ) from exc
