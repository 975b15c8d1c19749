"""The Avro readers and writers generated from schemas/ at build time (``compiled_avro_source``).

They run compiled only in a process using the mypyc build (``TEST_COMPILED=1``); here the
same generated source also runs as plain Python (``_source_readers``), so every suite holds it
to ``read_flat``, and the deserializer's choice between it and the run-time reader is tested
either way: a compiled reader serves only the schema it was generated from, and only writer
ids whose schema is that one.
"""

from __future__ import annotations

import json
import os
import struct
import types
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from libs.serde import (
    SCHEMA_DIR,
    AvroDeserializer,
    AvroSerializer,
    InMemorySchemaRegistry,
    SlackUser,
    avro,
)
from libs.serde.avro import (
    COMPILED_AVRO,
    _compiled_reader,
    compiled_avro_source,
    flat_layout,
    load_schema_text,
    read_flat,
    schema_fingerprint,
)
from tests.unit.test_serde import T0, _damaged, _framed_edge_records

Readers = Mapping[str, tuple[Any, Callable[..., Any]]]


def _schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(schema_dir.glob("*.avsc"))}


@cache
def _source_readers() -> Readers:
    """``READERS`` of the generated source run as Python (what mypyc compiles)."""
    readers: Readers = _source_module().READERS
    return readers


@cache
def _source_module() -> types.ModuleType:
    module = types.ModuleType(COMPILED_AVRO)
    exec(compile(compiled_avro_source(_schemas()), COMPILED_AVRO, "exec"), module.__dict__)
    return module


def _reader(readers: Readers, record_type: type[Any]) -> Callable[[bytes, int], Any]:
    text = load_schema_text(record_type.SCHEMA)
    layout = flat_layout(text)
    assert layout is not None
    read = _compiled_reader(readers, schema_fingerprint(text), layout, record_type)
    assert read is not None
    return read


def test_the_generated_source_is_deterministic_and_covers_every_flat_schema() -> None:
    schemas = _schemas()
    assert compiled_avro_source(schemas) == compiled_avro_source(dict(reversed(schemas.items())))
    flat = {schema_fingerprint(t) for t in schemas.values() if flat_layout(t) is not None}
    assert set(_source_readers()) == flat
    assert len(flat) == 6  # all but ProducerCursor (timestamp-micros)


def _compiled_readers_in_use() -> Readers:
    readers = avro._compiled_readers()
    if os.environ.get("TEST_COMPILED") == "1":
        assert readers, "TEST_COMPILED=1 but the generated readers are not in the build"
    return readers


@pytest.mark.parametrize("where", ["source", "build"])
@pytest.mark.parametrize("record", _framed_edge_records(), ids=lambda r: type(r).__name__)
def test_a_generated_reader_reads_what_read_flat_reads(where: str, record: Any) -> None:
    """Same records on good bodies; on damaged ones the same error (type and text) or the
    same record: run as Python ("source"), and compiled ("build", with TEST_COMPILED=1)."""
    readers = _source_readers() if where == "source" else _compiled_readers_in_use()
    if not readers:
        pytest.skip("this process does not use the compiled build (TEST_COMPILED=1 does)")
    record_type = type(record)
    layout = flat_layout(load_schema_text(record_type.SCHEMA))
    assert layout is not None
    read = _reader(readers, record_type)
    framed = AvroSerializer(InMemorySchemaRegistry(), record_type)("t", record)
    got = read(framed, 5)
    assert type(got) is record_type and got == record_type(**read_flat(layout, framed, 5))
    for bad in _damaged(framed):
        try:
            expected: Any = record_type(**read_flat(layout, bad, 5))
        except Exception as exc:
            expected = (type(exc), str(exc))
        try:
            got = read(bad, 5)
        except Exception as exc:
            got = (type(exc), str(exc))
        assert got == expected, bad


class _Counting:
    """``READERS`` whose readers count their reads."""

    def __init__(self, readers: Readers) -> None:
        self.reads = 0
        self.readers = {key: (layout, self._wrap(cls)) for key, (layout, cls) in readers.items()}

    def _wrap(self, cls: Callable[..., Any]) -> Callable[..., Any]:
        counting = self

        def make(record_type: type, setters: list[Any]) -> Any:
            inner = cls(record_type, setters)

            class Reader:
                def read(self, data: bytes, pos: int) -> Any:
                    counting.reads += 1
                    return inner.read(data, pos)

            return Reader()

        return make


def _with_added_field() -> dict[str, Any]:
    newer = json.loads(load_schema_text(SlackUser.SCHEMA))
    newer["fields"].append({"name": "team", "type": ["null", "string"], "default": None})
    return dict(newer)


def test_the_deserializer_reads_its_own_schema_compiled_and_any_other_writer_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's schema the reader was generated for: the compiled reader. A writer schema
    with an added field (a newer producer): fastavro's resolution, as today, the same
    record as a reader without compiled readers decodes."""
    import io

    import fastavro

    counting = _Counting(_source_readers())
    monkeypatch.setattr(avro, "_compiled_readers", lambda: counting.readers)
    registry = InMemorySchemaRegistry()
    decode = AvroDeserializer(registry, SlackUser)
    user = SlackUser("ana@example.com", "U1", T0, "Ana")
    framed = AvroSerializer(registry, SlackUser)("users", user)
    assert decode(framed, topic="users", partition=0, offset=0) == user
    assert decode(framed, topic="users", partition=0, offset=1) == user
    assert counting.reads == 1  # the first sight of an id takes the general path

    newer = _with_added_field()
    newer_id = registry.register("users-value", json.dumps(newer))
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, newer_id))
    values = {**user.to_avro(), "team": "sales"}
    fastavro.schemaless_writer(buf, fastavro.parse_schema(newer), values)
    for offset in range(3):
        assert decode(buf.getvalue(), topic="users", partition=0, offset=offset) == user
    assert counting.reads == 1
    monkeypatch.setattr(avro, "_compiled_readers", dict)
    plain = AvroDeserializer(registry, SlackUser)
    assert plain(buf.getvalue(), topic="users", partition=0, offset=0) == user
    assert plain(framed, topic="users", partition=0, offset=0) == user


def test_a_reader_schema_other_than_the_generated_one_keeps_the_run_time_reader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A schema edited after the build (here: a field added to the reader's own schema, which
    the build's manifest would refuse too) is not the one the reader was generated for: the
    reader generated at run time reads it, and the compiled one is never called."""
    counting = _Counting(_source_readers())
    monkeypatch.setattr(avro, "_compiled_readers", lambda: counting.readers)
    (tmp_path / SlackUser.SCHEMA).write_text(json.dumps(_with_added_field()))
    layout = flat_layout((tmp_path / SlackUser.SCHEMA).read_text())
    assert layout is not None
    fingerprint = schema_fingerprint((tmp_path / SlackUser.SCHEMA).read_text())
    assert _compiled_reader(counting.readers, fingerprint, layout, SlackUser) is None
    # the same layout under another schema's fingerprint: not served either
    own = load_schema_text(SlackUser.SCHEMA)
    own_layout = flat_layout(own)
    assert own_layout is not None
    other = {fingerprint: counting.readers[schema_fingerprint(own)]}
    assert _compiled_reader(other, schema_fingerprint(own), own_layout, SlackUser) is None

    registry = InMemorySchemaRegistry()
    decode = AvroDeserializer(registry, SlackUser)  # the repository's schema
    user = SlackUser("a", "U1", T0, None)
    framed = AvroSerializer(registry, SlackUser)("users", user)
    for offset in range(2):
        assert decode(framed, topic="users", partition=0, offset=offset) == user
    assert counting.reads == 1
    monkeypatch.setattr(avro, "_compiled_readers", lambda: other)
    decode = AvroDeserializer(registry, SlackUser)
    for offset in range(2):
        assert decode(framed, topic="users", partition=0, offset=offset) == user
    assert counting.reads == 1


def test_a_record_type_not_built_by_its_slots_alone_gets_no_compiled_reader() -> None:
    import dataclasses
    from datetime import datetime

    @dataclasses.dataclass(frozen=True, slots=True)
    class Lowered:
        email: str
        slack_user_id: str
        updated_at: datetime
        display_name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "email", self.email.lower())

    text = load_schema_text(SlackUser.SCHEMA)
    layout = flat_layout(text)
    assert layout is not None
    readers = _source_readers()
    assert _compiled_reader(readers, schema_fingerprint(text), layout, Lowered) is None
    assert _compiled_reader(readers, schema_fingerprint(text), layout, dict) is None


def test_the_enricher_reads_compiled_when_it_uses_the_build() -> None:
    """With the build (TEST_COMPILED=1) a deserializer of each of the enricher's inputs reads
    with the compiled reader (a method of a mypyc class), else with the run-time one."""
    from libs.serde import ConnectorStatusChanged, CsdrAssignment, OnboardingStarted

    compiled = bool(_compiled_readers_in_use())
    for record_type in (ConnectorStatusChanged, OnboardingStarted, CsdrAssignment, SlackUser):
        read = AvroDeserializer(InMemorySchemaRegistry(), record_type)._read_flat
        assert read is not None
        assert (type(read).__name__ == "builtin_function_or_method") is compiled, read


def _writers(where: str) -> Readers:
    writers: Readers = _source_module().WRITERS if where == "source" else avro._compiled_writers()
    if where == "build" and os.environ.get("TEST_COMPILED") == "1":
        assert writers, "TEST_COMPILED=1 but the generated writers are not in the build"
    if not writers:
        pytest.skip("this process does not use the compiled build (TEST_COMPILED=1 does)")
    return writers


def _outcome(write: Callable[..., bytes], *args: Any) -> Any:
    try:
        return write(*args)
    except Exception as exc:
        return (type(exc), str(exc))


def _bad_messages() -> list[Any]:
    from datetime import datetime

    from libs.serde import SlackMessage

    naive = datetime(2026, 1, 1, 12, 0)
    return [
        SlackMessage("m", "p", None, "t", "[]", "o", "e", T0),  # type: ignore[arg-type]
        SlackMessage("m", "p", 3, "t", "[]", "o", "e", T0),  # type: ignore[arg-type]
        SlackMessage("m", "p", "\ud800", "t", "[]", "o", "e", T0),
        SlackMessage("m", "p", "c", "t", "[]", "o", "e", naive),
        SlackMessage("m", "p", "c", "t", "[]", "o", "e", 1_700_000_000_000),  # type: ignore[arg-type]
        SlackMessage("m", "p", "c", "t", "[]", "o", "e", "now"),  # type: ignore[arg-type]
        SlackMessage("m", "p", "c", "t", "[]", "o", "e", T0, 5),  # type: ignore[arg-type]
        SlackMessage("m", "p", "c", "t", None, "o", "e", T0),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("where", ["source", "build"])
@pytest.mark.parametrize(
    "record",
    [r for r in _framed_edge_records() + _bad_messages()],
    ids=lambda r: type(r).__name__,
)
def test_a_generated_writer_writes_what_the_run_time_writer_writes(where: str, record: Any) -> None:
    """The same bytes, or the same error (type and text), as ``flat_writer``'s; with and
    without a string's UTF-8 given (the enricher's blocks), and that UTF-8 left out."""
    from libs.serde.avro import _compiled_writer, flat_writer

    writers = _writers(where)
    text = load_schema_text(type(record).SCHEMA)
    layout = flat_layout(text)
    assert layout is not None
    fingerprint = schema_fingerprint(text)
    plain = _compiled_writer(writers, fingerprint, layout, ())
    assert plain is not None
    expected = _outcome(flat_writer(layout), b"head", record)
    assert _outcome(plain, b"head", record) == expected
    strings = [n for n, k in layout if k == 0]
    for name in strings[:1] + strings[-1:]:
        given = _compiled_writer(writers, fingerprint, layout, (name,))
        assert given is not None
        reference = flat_writer(layout, (name,))
        value = getattr(record, name)
        utf8 = value.encode() if isinstance(value, str) and value != "\ud800" else b"[x]"
        for args in ((), (None,), (utf8,)):
            want = _outcome(reference, b"head", record, *args)
            assert _outcome(given, b"head", record, *args) == want, (name, args)
    assert _compiled_writer(writers, fingerprint, layout, strings[:2]) is None


def test_the_serializer_writes_compiled_only_for_the_schema_it_was_generated_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from libs.serde import SlackMessage

    calls: list[int] = []

    def counting(writers: Readers) -> Readers:
        def wrap(cls: Callable[..., Any]) -> Callable[..., Any]:
            def make(utf8: int) -> Any:
                inner = cls(utf8)

                class Writer:
                    def write(self, *args: Any) -> bytes:
                        calls.append(utf8)
                        out: bytes = inner.write(*args)
                        return out

                return Writer()

            return make

        return {key: (layout, wrap(cls)) for key, (layout, cls) in writers.items()}

    monkeypatch.setattr(avro, "_compiled_writers", lambda: counting(_source_module().WRITERS))
    message = SlackMessage("m", "p", "c", "t", "[1]", "o", "e", T0)
    reference = AvroSerializer(InMemorySchemaRegistry(), SlackMessage)("t", message)
    encode = AvroSerializer(InMemorySchemaRegistry(), SlackMessage, utf8_fields=("blocks",))
    assert encode.encode("t", message, b"[1]") == encode("t", message) == reference
    assert calls == [-1, 4, 4]  # the plain reference's, then the blocks' (field 4) twice

    newer = json.loads(load_schema_text(SlackMessage.SCHEMA))
    newer["fields"].append({"name": "thread", "type": ["null", "string"], "default": None})
    (tmp_path / SlackMessage.SCHEMA).write_text(json.dumps(newer))
    calls.clear()
    other = AvroSerializer(InMemorySchemaRegistry(), SlackMessage, schema_dir=tmp_path)
    # written the run-time way (the record has no `thread`: fastavro writes its default)
    assert other("t", message)[5:] == reference[5:] + b"\x00"
    assert calls == []


@pytest.mark.parametrize("where", ["source", "build"])
def test_the_generated_varint_helpers_write_what_the_run_time_ones_write(where: str) -> None:
    """``_long``, ``_size_prefix`` and ``_string`` are written out in the generated module (so
    that they are compiled with its writers): the same bytes as ``libs.serde.avro``'s."""
    module = _source_module() if where == "source" else avro._compiled_module()
    if module is None:
        pytest.skip("this process does not use the compiled build (TEST_COMPILED=1 does)")
    edges = [0, 1, -1, 63, 64, -64, -65, 127, 128, 8191, 8192, 2**31, -(2**31), 2**62, -(2**62)]
    edges += [2**63 - 1, -(2**63), 1_764_000_000_000, -1_764_000_000_000]
    for n in edges + [n * 7919 for n in range(-3000, 3000)]:
        assert module._long(n) == avro._long(n), n
    for size in [*range(0, 300), 4095, 4096, 8191, 8192, 8193, 100_000, 2**40]:
        assert module._size_prefix(size) == avro._size_prefix(size), size
        assert module._size_prefix(size) == avro._size_prefix(size), size  # cached the same
    for data in (b"", b"x", "é→🚀".encode(), b"\x00" * 5000):
        assert module._string(data) == avro._string(data)
