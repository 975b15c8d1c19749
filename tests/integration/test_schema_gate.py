"""The schema compatibility gate, against the real registry's compatibility API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from libs.serde import SCHEMA_DIR, ConfluentSchemaRegistry
from libs.serde.compat import run_gate

pytestmark = pytest.mark.integration

BASE: dict[str, Any] = {
    "type": "record",
    "name": "Thing",
    "namespace": "test",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "count", "type": "int"},
    ],
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def schema_repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "thing.avsc").write_text(json.dumps(BASE))
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "v1")
    return tmp_path


def _change(repo: Path, fields: list[dict[str, Any]], commit: bool = False) -> None:
    (repo / "schemas" / "thing.avsc").write_text(json.dumps({**BASE, "fields": fields}))
    if commit:
        _git(repo, "commit", "-qam", "change")


def test_repository_schemas_pass(registry: ConfluentSchemaRegistry) -> None:
    results = run_gate(registry, SCHEMA_DIR)
    assert len(results) == len(list(SCHEMA_DIR.glob("*.avsc")))
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_optional_field_added_passes(schema_repo: Path, registry: ConfluentSchemaRegistry) -> None:
    _change(
        schema_repo,
        [*BASE["fields"], {"name": "note", "type": ["null", "string"], "default": None}],
    )
    [result] = run_gate(registry, schema_repo / "schemas")
    assert result.ok and result.versions_checked == 1


def test_required_field_added_fails(schema_repo: Path, registry: ConfluentSchemaRegistry) -> None:
    _change(schema_repo, [*BASE["fields"], {"name": "note", "type": "string"}])
    [result] = run_gate(registry, schema_repo / "schemas")
    assert not result.ok
    assert result.schema == "thing"


def test_type_changed_fails(schema_repo: Path, registry: ConfluentSchemaRegistry) -> None:
    _change(schema_repo, [BASE["fields"][0], {"name": "count", "type": "string"}])
    [result] = run_gate(registry, schema_repo / "schemas")
    assert not result.ok
    assert "BACKWARD_TRANSITIVE" in result.reason or result.reason


def test_field_removed_without_default_fails(
    schema_repo: Path, registry: ConfluentSchemaRegistry
) -> None:
    _change(schema_repo, [BASE["fields"][0]])
    [result] = run_gate(registry, schema_repo / "schemas")
    assert not result.ok
    assert "count" in result.reason and "removed" in result.reason


def test_transitive_checks_every_earlier_version(
    schema_repo: Path, registry: ConfluentSchemaRegistry
) -> None:
    # v2 makes count a long (int -> long promotes: backward compatible with v1)
    _change(schema_repo, [BASE["fields"][0], {"name": "count", "type": "long"}], commit=True)
    # v3 makes it a float: readable from v2 (long -> float) and v1 (int -> float)
    _change(schema_repo, [BASE["fields"][0], {"name": "count", "type": "float"}])
    [ok] = run_gate(registry, schema_repo / "schemas")
    assert ok.ok and ok.versions_checked == 2
    # an int again can read neither the long nor the float versions
    _change(schema_repo, [BASE["fields"][0], {"name": "count", "type": "int"}], commit=True)
    _change(
        schema_repo,
        [
            BASE["fields"][0],
            {"name": "count", "type": "int"},
            {"name": "x", "type": ["null", "int"], "default": None},
        ],
    )
    [bad] = run_gate(registry, schema_repo / "schemas")
    assert not bad.ok


def test_cli_names_subject_and_reason(schema_repo: Path, registry_url: str) -> None:
    _change(schema_repo, [BASE["fields"][0]])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "libs.serde.compat",
            "--registry-url",
            registry_url,
            "--schemas",
            str(schema_repo / "schemas"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1
    assert "INCOMPATIBLE" in proc.stdout and "thing" in proc.stdout and "count" in proc.stdout
