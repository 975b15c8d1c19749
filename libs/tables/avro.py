"""One constructor for a table of Avro records: format version, decoder, checks, dead letters.

A lookup decodes the stored value (restore only checks its header), twice per enriched alert.
``AvroDeserializer.decode`` reads a flat value field by field in a loop over its layout into a
dict and builds the record from keywords; ``ValueReader`` is the same reading written out once
per record type (one generated function, no loop, no dict, positional construction) for
values whose writer schema is the reader's. Whatever it does not read (another writer schema,
a corrupt body, a first sight of a schema id) goes to ``AvroDeserializer.decode``, so values
and errors are the deserializer's (tests/unit/test_tables.py compares both on edge values and
damaged bodies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from libs.kafka import DeadLetterPublisher, dlq_topic
from libs.serde import (
    AvroDeserializer,
    AvroRecord,
    RegistryError,
    SchemaRegistry,
    load_schema_text,
)
from libs.serde.avro import flat_layout
from libs.tables.global_table import GlobalTable

R = TypeVar("R", bound=AvroRecord)

_SCHEMA_ID = struct.Struct(">I")
# field kinds of ``libs.serde.avro.flat_layout``
_STRING, _OPTIONAL_STRING, _LONG, _TIMESTAMP_MILLIS = range(4)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# One field of a generated reader: ``{v}`` the variable the value goes to. A zig-zag varint
# first (a length, a long or a timestamp's milliseconds; one byte for short strings), as
# ``libs.serde.avro.read_flat`` reads it; anything out of range raises and the caller falls
# back to the deserializer.
_VARINT = """\
    n = data[pos]
    pos += 1
    if n & 0x80:
        n &= 0x7F
        shift = 7
        while True:
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
    n = (n >> 1) ^ -(n & 1)
"""
_STRING_BODY = """\
    end = pos + n
    if n < 0 or end > size:
        raise EOFError
    {v} = data[pos:end].decode("utf-8")
    pos = end
"""


def _reader_source(kinds: list[int], order: list[int]) -> str:
    """The reader of fields of ``kinds`` (in the schema's order), building the record from
    them positionally in the record's field ``order`` (indexes into ``kinds``)."""
    lines = ["def read(data):", "    size = len(data)", "    pos = 5"]
    for i, kind in enumerate(kinds):
        v = f"f{i}"
        if kind == _OPTIONAL_STRING:
            lines.append(
                "    branch = data[pos]\n"
                "    pos += 1\n"
                "    if branch == 0:\n"
                f"        {v} = None\n"
                "    elif branch != 2:\n"
                "        raise ValueError\n"
                "    else:"
            )
            body = _VARINT + _STRING_BODY.format(v=v)
            lines.append("\n".join("    " + line for line in body.splitlines()))
            continue
        lines.append(_VARINT.rstrip("\n"))
        if kind == _STRING:
            lines.append(_STRING_BODY.format(v=v).rstrip("\n"))
        elif kind == _LONG:
            lines.append(f"    {v} = n")
        else:  # fastavro's arithmetic, as read_flat's
            lines.append(f"    {v} = _EPOCH + _timedelta(microseconds=n * 1000)")
    lines.append(f"    return _record({', '.join(f'f{i}' for i in order)})")
    return "\n".join(lines) + "\n"


def value_reader(record_type: type[R]) -> Callable[[bytes], R] | None:
    """A function reading a framed value of ``record_type`` written with its own schema.

    ``None`` when the schema is not flat (``flat_layout``) or the record's fields are not the
    schema's. The function raises (``IndexError``, ``EOFError``, ``ValueError``,
    ``UnicodeDecodeError``) on a body it cannot read; it does not look at the header.
    """
    layout = flat_layout(load_schema_text(record_type.SCHEMA))
    if layout is None or not dataclasses.is_dataclass(record_type):
        return None
    names = [name for name, _ in layout]
    fields = [f.name for f in dataclasses.fields(record_type)]
    if sorted(fields) != sorted(names):
        return None
    namespace: dict[str, Any] = {
        "_record": record_type,
        "_EPOCH": _EPOCH,
        "_timedelta": timedelta,
    }
    source = _reader_source([kind for _, kind in layout], [names.index(f) for f in fields])
    exec(source, namespace)
    reader: Callable[[bytes], R] = namespace["read"]
    return reader


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


class ValueReader:
    """A table's ``Decoder``: ``AvroDeserializer.decode``, with values of the reader's own
    writer schema read by ``value_reader`` (module docstring)."""

    def __init__(
        self,
        deserializer: AvroDeserializer[Any],
        registry: SchemaRegistry,
        record_type: type[AvroRecord],
    ) -> None:
        self._decode = deserializer.decode
        self._registry = registry
        self._read = value_reader(record_type)
        self._reader_canonical = _canonical(load_schema_text(record_type.SCHEMA))
        #: wire headers (magic byte + schema id) whose values ``_read`` reads
        self._direct: dict[bytes, Callable[[bytes], Any]] = {}
        #: headers already looked at
        self._seen: set[bytes] = set()

    def __call__(self, data: bytes, topic: str, partition: int, offset: int) -> Any:
        read = self._direct.get(data[:5])
        if read is not None:
            try:
                return read(data)
            except Exception:  # a damaged body: the deserializer raises its own error for it
                pass
        value = self._decode(data, topic, partition, offset)
        if self._read is not None and data[:5] not in self._seen:
            self._learn(data[:5])
        return value

    def _learn(self, header: bytes) -> None:
        """Read values of ``header`` directly from now on if its writer schema is ours."""
        # Asked once per header whatever the answer: a registry that fails now must not cost
        # every later lookup a request (those values keep the deserializer's path).
        self._seen.add(header)
        (schema_id,) = _SCHEMA_ID.unpack_from(header, 1)
        try:
            # the deserializer fetched it a moment ago: the registry client has it cached
            text = self._registry.schema_by_id(schema_id)
        except RegistryError:
            return
        if self._read is not None and _canonical(text) == self._reader_canonical:
            self._direct[header] = self._read


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
        decode=ValueReader(deserializer, registry, record_type),
        check=check,
        header_size=5,  # magic byte + schema id
        on_invalid=None if dead_letters is None else dead_letters.publish_message,
        dead_letter_topic=None if dead_letters is None else dlq_topic(topic),
        format_version=format_version(record_type),
        **options,
    )
