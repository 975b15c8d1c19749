"""Avro in the Confluent wire format: ``0x00``, a 4-byte big-endian schema id, the Avro body.

Writers register their schema under the subject the topic name strategy gives
(``<topic>-value``) once per topic and then only pack bytes. Readers resolve the writer's
schema by id (cached) against their own schema, so a record written with an older or newer
compatible schema still decodes into the reader's typed record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Generic, cast

import fastavro
from fastavro.types import Schema as ParsedSchema

from libs.serde.errors import (
    DeserializationError,
    RegistryError,
    SchemaNotFoundError,
    SerdeError,
    SerializationError,
)
from libs.serde.records import R, slot_setters
from libs.serde.registry import SchemaRegistry, topic_subject

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
_SCHEMA_ID = struct.Struct(">I")

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


# -- a direct writer for flat records -------------------------------------------------------------
# fastavro's writer wants a dict and a stream per record; for records whose fields are all
# strings, optional strings, longs or timestamps (SlackMessage, the enricher's output, written
# once per alert) packing the bytes here is several times cheaper and gives the same bytes
# (tests/unit/test_serde.py compares the two on every such schema).

_STRING, _OPTIONAL_STRING, _LONG, _TIMESTAMP_MILLIS = range(4)
# A timestamp-millis ``n`` reads as ``_EPOCH + timedelta(0, n // 1000, n % 1000 * 1000)``:
# fastavro's ``_EPOCH + timedelta(microseconds=n * 1000)`` (not fromtimestamp: it differs
# before 1970 and far out) in exact integers, the same value and the same OverflowError,
# at half the cost of the keyword form's conversion of microseconds.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_BYTE = tuple(bytes((n,)) for n in range(128))


def _long(n: int) -> bytes:
    """An Avro ``long``: zig-zag, then a little-endian base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_kind(avro_type: Any) -> int | None:
    if avro_type in ("string", {"type": "string"}):
        return _STRING
    if avro_type in ("long", "int"):
        return _LONG
    if avro_type == ["null", "string"]:
        return _OPTIONAL_STRING
    if isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-millis":
        return _TIMESTAMP_MILLIS if avro_type.get("type") == "long" else None
    return None


def flat_layout(schema_text: str) -> tuple[tuple[str, int], ...] | None:
    """``(field, kind)`` per field when ``FlatWriter`` can write the schema, else ``None``."""
    schema = json.loads(schema_text)
    layout = []
    for f in schema.get("fields", ()):
        kind = _field_kind(f["type"])
        if kind is None:
            return None
        layout.append((str(f["name"]), kind))
    return tuple(layout)


def _millis(value: object) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError("naive datetime")  # fastavro's local-time rule applies: use it
        # fastavro's timestamp-millis arithmetic, which truncates sub-milliseconds with
        # int(microseconds / 1000): the same as // for microseconds (0 to 999999)
        delta = value - _EPOCH
        return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if type(value) is int:
        return value
    raise TypeError(f"not a timestamp: {type(value).__name__}")


def write_flat(layout: Sequence[tuple[str, int]], record: object, parts: list[bytes]) -> None:
    """Append the Avro body of ``record`` to ``parts``; ``TypeError``/``AttributeError`` when a
    value does not fit its field (the caller falls back to fastavro, which names the problem)."""
    append = parts.append
    for name, kind in layout:
        value = getattr(record, name)
        if kind == _STRING:
            data = value.encode()
        elif kind == _OPTIONAL_STRING:
            if value is None:
                append(b"\x00")
                continue
            append(b"\x02")
            data = value.encode()
        elif kind == _LONG:
            if type(value) is not int:
                raise TypeError(f"{name} is not an int")
            append(_long(value))
            continue
        else:
            append(_long(_millis(value)))
            continue
        size = len(data)
        if size < 64:
            append(_ONE_BYTE[size << 1])
        elif size < 8192:  # two varint bytes: an alert's text and blocks usually
            append(bytes(((size << 1) & 0x7F | 0x80, size >> 6)))
        else:
            append(_long(size))
        append(data)


# -- the same writer, generated per schema --------------------------------------------------------
# ``write_flat`` interprets the layout per record (a loop, a getattr and a branch per field);
# a record written once per output (the enricher's ``SlackMessage``) is cheaper as
# straight-line code generated once per layout: the same steps, in field order, with the
# same errors. A caller that already holds a string field's UTF-8 (the enricher renders
# an alert's blocks straight to bytes) passes it instead of having the writer encode it.

#: Avro length prefixes of the sizes met so far (a few thousand at most: sizes past 8191
#: are not kept)
_SIZE_PREFIXES: dict[int, bytes] = {}


#: the Avro length prefix of each size below ``_PREFIXED`` (all but an alert's blocks), for the
#: generated writer to index instead of calling ``_size_prefix`` (~170 KB, once)
_PREFIXED = 4096
_PREFIX = tuple(_long(size) for size in range(_PREFIXED))


def _size_prefix(size: int) -> bytes:
    prefix = _SIZE_PREFIXES.get(size)
    if prefix is None:
        prefix = _long(size)
        if size < 8192:
            _SIZE_PREFIXES[size] = prefix
    return prefix


FlatWriter = Callable[..., bytes]


def flat_writer(layout: Sequence[tuple[str, int]], utf8: Sequence[str] = ()) -> FlatWriter:
    """``write(header, record, *utf8_values) -> bytes``: ``header`` then the Avro body of
    ``record``, the bytes ``write_flat`` writes, with the same errors (``TypeError``,
    ``AttributeError``, ``UnicodeError`` when a value does not fit its field).

    ``utf8`` names string fields (of ``layout``) whose UTF-8 the caller may pass, in that
    order, after the record: a value that is not ``None`` is written as the field's bytes (it
    must be ``record.<field>.encode()``: nothing checks it per call), ``None`` (the default:
    each may be left out) encodes the record's string as usual. Generated once per layout (as
    ``dataclasses`` generates ``__init__``); the source holds only field names checked to be
    identifiers.
    """
    kinds = dict(layout)
    for name in utf8:
        if kinds.get(name) != _STRING:
            raise ValueError(f"{name!r} is not a string field of the layout")
    # The UTF-8 parameters default to None: a caller without them (``AvroSerializer``'s
    # ``__call__``) runs the same code rather than failing over to another writer.
    lines = [f"def write(header, r{''.join(f', u{i}=None' for i in range(len(utf8)))}):"]

    def given(number: int, name: str) -> str | None:
        if name not in utf8:
            return None
        u = f"u{utf8.index(name)}"
        return f"r.{name}.encode() if {u} is None else {u}"

    lines += _write_lines(layout, given)
    scope: dict[str, Any] = {
        "__builtins__": {},
        "_long": _long,
        "_timestamp": _timestamp,
        "_size_prefix": _size_prefix,
        "_PREFIX": _PREFIX,
        "_string": _string,
        "TypeError": TypeError,
        "int": int,
        "type": type,
        "len": len,
    }
    exec("\n".join(lines), scope)
    write: FlatWriter = scope["write"]
    return write


def _write_lines(
    layout: Sequence[tuple[str, int]], given: Callable[[int, str], str | None]
) -> list[str]:
    """The body of a writer of ``layout`` (indented for a function) from ``header`` and the
    record ``r`` to the bytes returned. ``given(number, name)``: for a string field, the
    expression of its UTF-8 when the caller may pass it (evaluating ``r.<name>`` only when
    it does not), else ``None``. ``flat_writer`` runs it as it is; ``compiled_avro_source``
    puts it in a method compiled by mypyc. Names used: ``_long``, ``_timestamp``,
    ``_size_prefix``, ``_PREFIX``, ``_string``, ``TypeError``, ``int``, ``type``, ``len``."""
    lines = []
    terms = ["header"]
    for number, (name, kind) in enumerate(layout):
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a field name")
        v, d = f"v{number}", f"d{number}"
        expression = given(number, name) if kind == _STRING else None
        if expression is not None:
            lines.append(f"    {d} = {expression}")
        elif kind == _STRING:
            lines.append(f"    {d} = r.{name}.encode()")
        elif kind == _OPTIONAL_STRING:
            lines.append(f"    {v} = r.{name}")
            lines.append(f"    {d} = b'\\x00' if {v} is None else b'\\x02' + _string({v}.encode())")
            terms.append(d)
            continue
        elif kind == _LONG:
            lines.append(f"    {v} = r.{name}")
            lines.append(f"    if type({v}) is not int:")
            lines.append(f"        raise TypeError('{name} is not an int')")
            terms.append(f"_long({v})")
            continue
        else:
            terms.append(f"_timestamp(r.{name})")
            continue
        lines.append(f"    s{number} = len({d})")
        terms.append(f"_PREFIX[s{number}] if s{number} < {_PREFIXED} else _size_prefix(s{number})")
        terms.append(d)
    lines.append(f"    return b''.join(({', '.join(terms)},))")
    return lines


#: (milliseconds, their Avro long) of the last timestamp ``_timestamp`` wrote: an output's
#: ``created_at`` is when it was handled, which consecutive outputs share to the millisecond
_last_timestamp: tuple[int, bytes] = (0, _long(0))


def _timestamp(value: object) -> bytes:
    """``_long(_millis(value))``, the varint kept for the next value of the same millisecond."""
    global _last_timestamp
    millis = _millis(value)
    last = _last_timestamp  # one read: another thread may replace it
    if millis != last[0]:
        last = _last_timestamp = (millis, _long(millis))
    return last[1]


def _string(data: bytes) -> bytes:
    return _size_prefix(len(data)) + data


# -- a direct reader for the same records ----------------------------------------------------------
# Every consumed event and every table lookup decodes one flat record (the lookups two per
# alert); for those, fastavro's per-call set-up costs more than the work. When the writer's
# schema is the reader's (no resolution) the fields are read here, with the values fastavro
# gives (tests/unit/test_serde.py decodes the same bytes both ways); anything else is fastavro's.


def read_flat(layout: Sequence[tuple[str, int]], data: bytes, pos: int) -> dict[str, Any]:
    """The fields of the Avro body at ``data[pos:]`` by name; raises on truncated or invalid
    input (``IndexError``, ``EOFError``, ``ValueError``, ``UnicodeDecodeError``), like fastavro,
    which also ignores bytes after the record."""
    out: dict[str, Any] = {}
    size = len(data)
    for name, kind in layout:
        if kind == _OPTIONAL_STRING:
            branch = data[pos]  # union index 0 (null) or 1 (string), zig-zag encoded
            pos += 1
            if branch == 0:
                out[name] = None
                continue
            if branch != 2:
                raise ValueError(f"{name}: union index {branch} out of range")
        # a zig-zag varint: a length, a long or the milliseconds of a timestamp
        n = data[pos]
        pos += 1
        if n & 0x80:  # more than one byte (short strings' lengths take one)
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
        if kind <= _OPTIONAL_STRING:  # the common case first
            end = pos + n
            if n < 0 or end > size:
                raise EOFError(f"{name}: {n} bytes of string past the end of the record")
            out[name] = data[pos:end].decode("utf-8")
            pos = end
        elif kind == _LONG:
            out[name] = n
        else:
            out[name] = _EPOCH + timedelta(0, n // 1000, n % 1000 * 1000)
    return out


# -- the same reader, generated per schema ---------------------------------------------------------
# As the writer: ``read_flat``'s steps in straight-line code, and the record built from
# positional arguments instead of a dict of keyword arguments (an event of eleven fields
# is read per consumed record).

FlatReader = Callable[[bytes, int], Any]


def _bad_branch(name: str, branch: int) -> ValueError:
    return ValueError(f"{name}: union index {branch} out of range")


def _past_end(name: str, n: int) -> EOFError:
    return EOFError(f"{name}: {n} bytes of string past the end of the record")


def _varint_lines(indent: str, unrolled: int) -> list[str]:
    """Source reading the rest of a varint into ``n`` (its first byte, continuation bit set,
    read): ``unrolled - 1`` more bytes as nested steps, then a loop for any further ones."""
    lines = [f"{indent}n &= 0x7F"]
    for number in range(1, unrolled):
        lines += [
            f"{indent}byte = data[pos]",
            f"{indent}pos += 1",
            f"{indent}n |= (byte & 0x7F) << {7 * number}",
            f"{indent}if byte & 0x80:",
        ]
        indent += "    "
    return [
        *lines,
        f"{indent}shift = {7 * unrolled}",
        f"{indent}while True:",
        f"{indent}    byte = data[pos]",
        f"{indent}    pos += 1",
        f"{indent}    n |= (byte & 0x7F) << shift",
        f"{indent}    if not byte & 0x80:",
        f"{indent}        break",
        f"{indent}    shift += 7",
    ]


def flat_reader(
    layout: Sequence[tuple[str, int]],
    build: Callable[..., Any],
    arguments: Sequence[str],
    setters: Sequence[Callable[[Any, Any], None]] | None = None,
) -> FlatReader:
    """``read(data, pos)``: ``build(*values)`` of the Avro body at ``data[pos:]``, the values
    ``read_flat`` reads passed in the order of the field names ``arguments`` (the record
    type's fields, which may be ordered differently from the schema's), with ``read_flat``'s
    errors on truncated or invalid input. ``arguments`` must name each field once.

    With ``setters`` (one per argument: its slot's ``__set__``), the record is
    ``build.__new__(build)`` with each value set through its slot instead: what a slotted
    dataclass's ``__init__`` does (``slot_setters`` says when), without its
    ``object.__setattr__`` lookup per field.

    Generated once per layout; the source holds only field names checked to be identifiers.
    """
    fields = [name for name, _ in layout]
    if sorted(arguments) != sorted(fields) or len(set(fields)) != len(fields):
        raise ValueError(f"arguments {arguments} are not the fields {fields}")
    if setters is not None and len(setters) != len(arguments):
        raise ValueError(f"{len(setters)} setters for {len(arguments)} arguments")
    lines = ["def read(data, pos):", *_read_lines(layout)]
    names = [f"v{number}" for number in range(len(layout))]
    ordered = [names[fields.index(name)] for name in arguments]
    if setters is None:
        lines.append(f"    return build({', '.join(ordered)})")
    else:
        lines.append("    record = _new(build)")
        lines += [f"    _set{i}(record, {v})" for i, v in enumerate(ordered)]
        lines.append("    return record")
    scope: dict[str, Any] = {
        "__builtins__": {},
        "_EPOCH": _EPOCH,
        "_timedelta": timedelta,
        "build": build,
        "_new": object.__new__,
        "_bad_branch": _bad_branch,
        "_past_end": _past_end,
        "len": len,
        **{f"_set{i}": setter for i, setter in enumerate(setters or ())},
    }
    exec("\n".join(lines), scope)
    read: FlatReader = scope["read"]
    return read


def _read_lines(layout: Sequence[tuple[str, int]]) -> list[str]:
    """The body of a reader of ``layout`` (indented for a function): from ``data`` and
    ``pos`` to the values ``v0``, ``v1``, ... of the layout's fields, in its order.
    ``flat_reader`` runs it as it is; ``compiled_avro_source`` puts it in a method
    compiled by mypyc. Names used: ``len``, ``_EPOCH``, ``_timedelta``, ``_bad_branch``
    and ``_past_end``."""
    lines = ["    size = len(data)"]
    for number, (name, kind) in enumerate(layout):
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a field name")
        v = f"v{number}"
        indent = "    "
        if kind == _OPTIONAL_STRING:
            lines += [
                "    branch = data[pos]",
                "    pos += 1",
                "    if branch == 0:",
                f"        {v} = None",
                "    else:",
                "        if branch != 2:",
                f"            raise _bad_branch({name!r}, branch)",
            ]
            indent = "        "
        if kind <= _OPTIONAL_STRING:
            # the usual string first: a length below 64 is one even byte (zig-zag), n >> 1
            lines += [
                f"{indent}n = data[pos]",
                f"{indent}if not n & 0x81:",
                f"{indent}    end = pos + 1 + (n >> 1)",
                f"{indent}    if end > size:",
                f"{indent}        raise _past_end({name!r}, n >> 1)",
                f"{indent}    {v} = data[pos + 1:end].decode('utf-8')",
                f"{indent}    pos = end",
                f"{indent}else:",
            ]
            indent += "    "
            lines.append(f"{indent}pos += 1")
        else:
            lines += [f"{indent}n = data[pos]", f"{indent}pos += 1"]
        # the varint's continuation bytes read inline (a timestamp has six, a long string
        # two): a helper's call per field cost more than the loop; a number's first seven
        # bytes unrolled (the shifts constant), as a timestamp of this century takes six
        lines.append(f"{indent}if n & 0x80:")
        lines += _varint_lines(indent + "    ", 7 if kind > _OPTIONAL_STRING else 1)
        lines.append(f"{indent}n = (n >> 1) ^ -(n & 1)")
        if kind <= _OPTIONAL_STRING:
            lines += [
                f"{indent}end = pos + n",
                f"{indent}if n < 0 or end > size:",
                f"{indent}    raise _past_end({name!r}, n)",
                f"{indent}{v} = data[pos:end].decode('utf-8')",
                f"{indent}pos = end",
            ]
        elif kind == _LONG:
            lines.append(f"{indent}{v} = n")
        else:
            lines.append(f"{indent}{v} = _EPOCH + _timedelta(0, n // 1000, n % 1000 * 1000)")
    return lines


# -- the same reader, generated from schemas/ at build time and compiled ---------------------------
# mypyc cannot compile ``exec``'d code: ``deploy/mypyc/build.py`` writes the readers of every
# flat schema in schemas/ as one module (``compiled_avro_source``: ``_read_lines`` in typed
# methods) and compiles it with the hot path. A process that uses the build
# (``libs.runtime.compiled``, which refuses a build whose schemas, this generator or the
# generated source changed) imports it; every other process does not find it and reads
# with ``flat_reader``. Each reader is keyed by the fingerprint of the schema it was generated
# from and serves only a deserializer whose own schema has that fingerprint, and only for
# writer ids whose schema is that one (``_flat_ids``): any other writer schema is fastavro's.

#: the module ``compiled_avro_source`` writes (top-level: its source is in the build, not
#: beside the sources), importable only when the process uses the build
COMPILED_AVRO = "field_alerts_avro"


def schema_fingerprint(text: str) -> str:
    """The SHA-256 of a schema's canonical JSON (``_canonical``): what a compiled reader was
    generated for."""
    return hashlib.sha256(_canonical(text).encode()).hexdigest()


def _class_name(file_name: str) -> str:
    stem = Path(file_name).stem
    if not stem.isidentifier():
        raise ValueError(f"{file_name!r} does not name a reader")
    return "".join(part.capitalize() for part in stem.split("_")) + "Reader"


def compiled_avro_source(schemas: Mapping[str, str]) -> str:
    """The module ``COMPILED_AVRO``: per flat schema of ``schemas`` (file name -> text), a
    class whose ``read(data, pos)`` is ``flat_reader``'s, building the record through the
    slot setters it is constructed with (one per field, in the schema's order), and
    ``READERS``: fingerprint -> (layout, class). Deterministic: the same schemas and this
    generator give the same text (the build's manifest records its hash)."""
    out = [
        '"""Avro readers and writers generated from schemas/ by libs/serde/avro.py."""',
        "",
        "from collections.abc import Callable",
        "from datetime import UTC, datetime, timedelta",
        "from typing import Any, Final",
        "",
        "import libs.serde.avro as _avro",
        "",
        "_ONE_BYTE: Final = _avro._ONE_BYTE",
        "_PREFIX: Final = _avro._PREFIX",
        "_SIZE_PREFIXES: Final[dict[int, bytes]] = {}",
        "_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)",
        "#: _avro._timestamp's last (milliseconds, varint): one item, replaced whole",
        "_LAST: Final[list[tuple[int, bytes]]] = [(0, _ONE_BYTE[0])]  # _long(0)",
        "_timedelta: Final = timedelta",
        "_new: Final[Callable[[type], object]] = object.__new__",
        "Setter = Callable[[object, object], None]",
        "Layout = tuple[tuple[str, int], ...]",
        "",
        "",
        # _avro's varint helpers written out here, so that they are compiled with the
        # writers (imported, they stayed interpreted: ``_long`` was most of a timestamp's cost)
        "def _long(n: int) -> bytes:  # _avro._long",
        "    n = (n << 1) ^ (n >> 63)",
        "    if n < 0x80:",
        "        return _ONE_BYTE[n]",
        "    # the bytes _avro._long appends, gathered in one int (machine words up to 7 bytes)",
        "    out = 0",
        "    size = 0",
        "    while n > 0x7F:",
        "        out |= ((n & 0x7F) | 0x80) << (8 * size)",
        "        size += 1",
        "        n >>= 7",
        "    out |= n << (8 * size)",
        '    return out.to_bytes(size + 1, "little")',
        "",
        "",
        # these two as written above (their names resolve to the generated module's own)
        *inspect.getsource(_size_prefix).splitlines(),
        "",
        "",
        *inspect.getsource(_string).splitlines(),
        "",
        "",
        "def _bad_branch(name: str, branch: int) -> ValueError:",
        '    return ValueError(f"{name}: union index {branch} out of range")',
        "",
        "",
        "def _past_end(name: str, n: int) -> EOFError:",
        '    return EOFError(f"{name}: {n} bytes of string past the end of the record")',
        "",
        "",
        "def _millis(value: object) -> int:  # _avro._millis",
        "    if isinstance(value, datetime):",
        "        if value.tzinfo is None:",
        '            raise TypeError("naive datetime")',
        "        delta = value - _EPOCH",
        "        return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000",
        "    if type(value) is int:",
        "        return value",
        '    raise TypeError(f"not a timestamp: {type(value).__name__}")',
        "",
        "",
        "def _timestamp(value: object) -> bytes:  # _avro._timestamp",
        "    millis = _millis(value)",
        "    last = _LAST[0]",
        "    if millis != last[0]:",
        "        last = (millis, _long(millis))",
        "        _LAST[0] = last",
        "    return last[1]",
    ]
    entries, writers = [], []
    for file_name, text in sorted(schemas.items()):
        layout = flat_layout(text)
        if layout is None:
            continue
        cls = _class_name(file_name)
        setters = [f"s{number}" for number in range(len(layout))]
        types = {_STRING: "str", _OPTIONAL_STRING: "str | None", _LONG: "int"}
        out += [
            "",
            "",
            f"class {cls}:",
            f'    """{file_name}: {", ".join(name for name, _ in layout)}."""',
            "",
            "    def __init__(self, cls: type, setters: list[Setter]) -> None:",
            "        self.cls = cls",
            *(f"        self.{s}: Setter = setters[{i}]" for i, s in enumerate(setters)),
            "",
            "    def read(self, data: bytes, pos: int) -> object:",
            *(
                f"        v{number}: {types.get(kind, 'datetime')}"
                for number, (_, kind) in enumerate(layout)
            ),
            *("    " + line for line in _read_lines(layout)),
            "        record = _new(self.cls)",
            *(f"        self.{s}(record, v{i})" for i, s in enumerate(setters)),
            "        return record",
        ]
        entries.append(f"    {schema_fingerprint(text)!r}: ({layout!r}, {cls}),")
        writer = cls.removesuffix("Reader") + "Writer"
        declared = {_STRING: "bytes", _OPTIONAL_STRING: "bytes", _LONG: "int"}

        def given(number: int, name: str) -> str:
            return f"u0 if u0 is not None and self.utf8 == {number} else r.{name}.encode()"

        out += [
            "",
            "",
            f"class {writer}:",
            f'    """{file_name}: {", ".join(name for name, _ in layout)}."""',
            "",
            "    def __init__(self, utf8: int) -> None:",
            "        self.utf8 = utf8",
            "",
            "    def write(self, header: bytes, r: Any, u0: bytes | None = None) -> bytes:",
            *(
                f"        d{number}: {declared[kind]}"
                for number, (_, kind) in enumerate(layout)
                if kind in (_STRING, _OPTIONAL_STRING)
            ),
            *("    " + line for line in _write_lines(layout, given)),
        ]
        writers.append(f"    {schema_fingerprint(text)!r}: ({layout!r}, {writer}),")
    out += [
        "",
        "",
        "READERS: Final[dict[str, tuple[Layout, Callable[[type, list[Setter]], object]]]] = {",
        *entries,
        "}",
        "WRITERS: Final[dict[str, tuple[Layout, Callable[[int], object]]]] = {",
        *writers,
        "}",
        "",
    ]
    return "\n".join(out)


@cache
def _compiled_module() -> Any:
    """The compiled module when this process uses the build, else ``None``."""
    try:
        return importlib.import_module(COMPILED_AVRO)
    except ImportError:
        return None


def _compiled_readers() -> Mapping[str, tuple[Any, Callable[..., Any]]]:
    """``READERS`` of the compiled module when this process uses the build, else empty."""
    readers: Mapping[str, tuple[Any, Callable[..., Any]]] = getattr(
        _compiled_module(), "READERS", {}
    )
    return readers


def _compiled_writers() -> Mapping[str, tuple[Any, Callable[..., Any]]]:
    """``WRITERS`` of the compiled module when this process uses the build, else empty."""
    writers: Mapping[str, tuple[Any, Callable[..., Any]]] = getattr(
        _compiled_module(), "WRITERS", {}
    )
    return writers


def _compiled_writer(
    writers: Mapping[str, tuple[Any, Callable[..., Any]]],
    fingerprint: str,
    layout: Sequence[tuple[str, int]],
    utf8: Sequence[str],
) -> FlatWriter | None:
    """The ``write`` of ``writers``' writer generated for the schema of ``fingerprint``
    (whose layout must be ``layout``): ``flat_writer(layout, utf8)``'s, for at most one
    ``utf8`` field; ``None`` when there is none."""
    found = writers.get(fingerprint)
    if found is None or tuple(found[0]) != tuple(layout) or len(utf8) > 1:
        return None
    names = [name for name, _ in layout]
    index = names.index(utf8[0]) if utf8 else -1
    write: FlatWriter = found[1](index).write
    return write


def _compiled_reader(
    readers: Mapping[str, tuple[Any, Callable[..., Any]]],
    fingerprint: str,
    layout: Sequence[tuple[str, int]],
    record_type: type[Any],
) -> FlatReader | None:
    """The ``read`` of ``readers``' reader generated for the schema of ``fingerprint`` (whose
    layout must be ``layout``), building ``record_type`` through its slots; ``None`` when
    there is none or ``record_type`` is not built by setting its slots alone."""
    found = readers.get(fingerprint)
    if found is None or tuple(found[0]) != tuple(layout):
        return None
    if not dataclasses.is_dataclass(record_type):
        return None
    names = [f.name for f in dataclasses.fields(record_type)]
    setters = slot_setters(record_type, names)
    if setters is None or sorted(names) != sorted(name for name, _ in layout):
        return None
    by_name = dict(zip(names, setters, strict=True))
    read: FlatReader = found[1](record_type, [by_name[name] for name, _ in layout]).read
    return read


class AvroSerializer(Generic[R]):
    """Encodes records of one type for any topic, registering the schema per subject once."""

    def __init__(
        self,
        registry: SchemaRegistry,
        record_type: type[R],
        *,
        subject_name_strategy: SubjectNameStrategy = topic_subject,
        schema_dir: Path = SCHEMA_DIR,
        utf8_fields: Sequence[str] = (),
    ) -> None:
        self._registry = registry
        self._record_type = record_type
        self._strategy = subject_name_strategy
        self._schema_text = load_schema_text(record_type.SCHEMA, schema_dir)
        self._schema = _parse(self._schema_text)
        self._flat = flat_layout(self._schema_text)
        #: the writer of ``__call__`` and ``encode`` (``utf8_fields`` may come as UTF-8);
        #: ``None``: not a flat record
        self._writer = None if self._flat is None else flat_writer(self._flat, utf8_fields)
        if self._flat is not None:  # the same writer compiled, when this process has it
            compiled = _compiled_writer(
                _compiled_writers(), schema_fingerprint(self._schema_text), self._flat, utf8_fields
            )
            self._writer = compiled or self._writer
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
        """Encode ``record`` for ``topic``.

        A flat record takes the generated writer (``flat_writer``), as ``encode`` does: one
        writer per layout, whichever way it is called (``write_flat`` stays as the reference
        the tests hold it to).
        """
        return self.encode(topic, record)

    def encode(self, topic: str, record: R, *utf8: bytes | None) -> bytes:
        """``self(topic, record)``, given the UTF-8 of the ``utf8_fields`` (in their order;
        ``None`` or left out: encode the record's string) when the caller has it already.
        Each must be the field's ``str.encode()``: the bytes are ``self(topic, record)``'s."""
        header = self._header(topic)
        if self._writer is not None:
            try:
                return self._writer(header, record, *utf8)
            except (TypeError, AttributeError, UnicodeError):
                pass  # fastavro below raises the error it always did, or encodes it its way
        return self._fastavro(topic, header, record)

    def _fastavro(self, topic: str, header: bytes, record: R) -> bytes:
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
        self._flat = flat_layout(self._reader_text)
        # schema id -> (writer schema, reader schema or None when identical to the writer's)
        self._writers: dict[int, tuple[ParsedSchema, ParsedSchema | None]] = {}
        # schema id -> read_flat's layout, for the ids whose writer schema is the reader's
        self._flat_ids: dict[int, tuple[tuple[str, int], ...]] = {}
        #: the layout's generated reader, when the record type is a dataclass whose
        #: ``__init__`` takes exactly the schema's fields: compiled when the process uses
        #: a build generated from this schema (``_compiled_reader``), else ``flat_reader``'s
        self._read_flat = _generated_reader(
            self._flat, record_type, schema_fingerprint(self._reader_text)
        )
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
                if same and self._flat is not None:
                    self._flat_ids[schema_id] = self._flat
                self._writers[schema_id] = found
        return found

    def _schemas(
        self, data: bytes | None, *, topic: str, partition: int, offset: int
    ) -> tuple[int, ParsedSchema, ParsedSchema | None]:
        """The schema id in ``data``'s wire header with its (writer, reader) schemas."""
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
        return int(schema_id), writer, reader

    def check_header(self, data: bytes | None, *, topic: str, partition: int, offset: int) -> int:
        """Validate the wire header of ``data`` without decoding its payload; return the id.

        Checks the magic byte and that the registry knows the writer schema id (fetched once and
        cached, so decoding these bytes later needs no registry call). Raises
        ``DeserializationError`` as decoding would, ``registry_unavailable`` included.
        """
        schema_id, _, _ = self._schemas(data, topic=topic, partition=partition, offset=offset)
        return schema_id

    def __call__(self, data: bytes | None, *, topic: str, partition: int, offset: int) -> R:
        """Decode one Kafka value; raise ``DeserializationError`` naming where it came from."""
        return self.decode(data, topic, partition, offset)

    def decode(self, data: bytes | None, topic: str, partition: int, offset: int) -> R:
        """``self(data, topic=..., partition=..., offset=...)`` with positional arguments: the
        shape of a table's decoder, so hot callers (a table lookup, the enricher's events)
        call it without a keyword-adapting wrapper in between."""
        # The usual case first: a known id whose writer schema is ours and flat. Anything
        # else (first sight of an id, no or a bad header, resolution) takes the general path.
        if data is not None and len(data) >= 5 and data[0] == MAGIC_BYTE:
            layout = self._flat_ids.get(_SCHEMA_ID.unpack_from(data, 1)[0])
            if layout is not None:
                read = self._read_flat
                try:
                    if read is not None:
                        record: R = read(data, 5)
                        return record
                    return self._record_type(**read_flat(layout, data, 5))
                except Exception as exc:  # truncated or corrupt body: as fastavro's errors
                    raise self._undecodable(data, exc, topic, partition, offset) from exc
        _, writer, reader = self._schemas(data, topic=topic, partition=partition, offset=offset)
        try:
            # _schemas refused None; BytesIO shares the bytes, seeking past the header copies none
            stream = io.BytesIO(cast(bytes, data))
            stream.seek(5)
            payload: Any = fastavro.schemaless_reader(stream, writer, reader)
            return self._record_type.from_avro(payload)
        except Exception as exc:  # fastavro raises a wide range of errors on corrupt input
            raise self._undecodable(cast(bytes, data), exc, topic, partition, offset) from exc

    def _undecodable(
        self, data: bytes, exc: Exception, topic: str, partition: int, offset: int
    ) -> DeserializationError:
        (schema_id,) = _SCHEMA_ID.unpack_from(data, 1)
        return DeserializationError(
            f"cannot decode {self._record_type.__name__} with schema {schema_id}: "
            f"{type(exc).__name__}: {exc}",
            topic=topic,
            partition=partition,
            offset=offset,
        )


def _generated_reader(
    layout: Sequence[tuple[str, int]] | None,
    record_type: type[Any],
    fingerprint: str | None = None,
) -> FlatReader | None:
    """``flat_reader`` of ``layout`` building ``record_type`` positionally, or ``None`` when
    its ``__init__`` is not known to take exactly the layout's fields. With the
    ``fingerprint`` of the schema ``layout`` is of, the compiled reader generated for that
    schema at build time (``_compiled_reader``) when the process has one."""
    if layout is None or not dataclasses.is_dataclass(record_type):
        return None
    if fingerprint is not None:
        compiled = _compiled_reader(_compiled_readers(), fingerprint, layout, record_type)
        if compiled is not None:
            return compiled
    fields = dataclasses.fields(record_type)
    if any(not f.init or f.kw_only for f in fields):
        return None
    names = [f.name for f in fields]
    if sorted(names) != sorted(name for name, _ in layout):
        return None
    return flat_reader(layout, record_type, names, slot_setters(record_type, names))


def decode_with_writer_schema(registry: SchemaRegistry, data: bytes) -> tuple[int, Any]:
    """Decode Confluent-framed Avro with its writer's schema alone, into plain Python values.

    For tools that show a record of any type (a dead letter); services decode into typed
    records with ``AvroDeserializer``. Returns the schema id and the value; raises
    ``SerdeError`` when ``data`` is not framed Avro, its schema is unavailable, or the body
    does not decode.
    """
    if len(data) < 5 or data[0] != MAGIC_BYTE:
        raise SerdeError("not Confluent wire format (missing magic byte 0 and schema id)")
    _, schema_id = _HEADER.unpack_from(data)
    try:
        writer = _parse(registry.schema_by_id(schema_id))
        return schema_id, fastavro.schemaless_reader(io.BytesIO(data[5:]), writer, None)
    except Exception as exc:  # registry errors, invalid schema, corrupt body: all "cannot decode"
        raise SerdeError(
            f"cannot decode with writer schema {schema_id}: {type(exc).__name__}: {exc}"
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
