"""Layering rules of STYLE.md, checked on the source: pure cores, env-free libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# I/O, clocks and environment: a core gets these passed in, it never reaches for them.
CORE_FORBIDDEN = {
    "confluent_kafka",
    "rocksdict",
    "slack_sdk",
    "google",
    "duckdb",
    "fastavro",
    "requests",
    "httpx",
    "socket",
    "http",
    "urllib",
    "subprocess",
    "threading",
    "os",
    "time",
    "random",
    "prometheus_client",
    "logging",
    "libs.kafka",
    "libs.tables",
    "libs.runtime",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _forbidden(name: str, rules: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rules)


CORES = sorted(ROOT.glob("services/*/core.py")) + sorted(ROOT.glob("services/*/pipelines/*.py"))


@pytest.mark.parametrize("path", CORES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cores_import_no_io(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _forbidden(n, CORE_FORBIDDEN))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_there_are_cores_to_check() -> None:
    assert CORES, "no services/*/core.py found"


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("libs/**/*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_libs_never_import_services_or_read_env(path: Path) -> None:
    names = _imports(path)
    assert not [n for n in names if n == "services" or n.startswith("services.")]
    assert "os.environ" not in path.read_text(encoding="utf-8")
    assert "getenv" not in path.read_text(encoding="utf-8")
