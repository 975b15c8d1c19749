"""The Avro readers generated from schemas/ at build time (``compiled_readers_source``).

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
    COMPILED_READERS,
    _compiled_reader,
    compiled_readers_source,
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
    module = types.ModuleType(COMPILED_READERS)
    exec(compile(compiled_readers_source(_schemas()), COMPILED_READERS, "exec"), module.__dict__)
    readers: Readers = module.READERS
    return readers


def _reader(readers: Readers, record_type: type[Any]) -> Callable[[bytes, int], Any]:
    text = load_schema_text(record_type.SCHEMA)
    layout = flat_layout(text)
    assert layout is not None
    read = _compiled_reader(readers, schema_fingerprint(text), layout, record_type)
    assert read is not None
    return read


def test_the_generated_source_is_deterministic_and_covers_every_flat_schema() -> None:
    schemas = _schemas()
    assert compiled_readers_source(schemas) == compiled_readers_source(
        dict(reversed(schemas.items()))
    )
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
