"""The schema compatibility gate: every schema in ``schemas/`` against its earlier versions.

Earlier versions come from git history. For each schema the gate replays its history into a
scratch subject of the registry (compatibility NONE while replaying, so history is taken as
it was), sets the level under test (``BACKWARD_TRANSITIVE`` by default) and asks the
registry's compatibility API whether the working-tree version may follow. It also enforces
CONTRACT.md's own rule that the registry's BACKWARD levels allow: a field, once published,
is never removed or renamed.

Run: ``python -m libs.serde.compat --registry-url URL [--level LEVEL] [--schemas DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from libs.serde.avro import SCHEMA_DIR
from libs.serde.errors import RegistryError
from libs.serde.registry import ConfluentSchemaRegistry, SchemaRegistry

log = logging.getLogger(__name__)

LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)


@dataclass(frozen=True)
class GateResult:
    """The verdict for one schema file."""

    schema: str
    versions_checked: int
    ok: bool
    reason: str = ""


def history(path: Path) -> list[str]:
    """Distinct committed versions of ``path``, oldest first (empty outside git)."""
    repo = path.parent
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=repo,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        rel = path.resolve().relative_to(Path(top).resolve()).as_posix()
        revs = subprocess.run(
            ["git", "log", "--format=%H", "--reverse", "--", rel],
            cwd=top,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return []
    versions: list[str] = []
    for rev in revs:
        shown = subprocess.run(
            ["git", "show", f"{rev}:{rel}"],
            cwd=top,
            capture_output=True,
            text=True,
        )
        if shown.returncode != 0:  # deleted in that commit
            continue
        if not versions or _canonical(versions[-1]) != _canonical(shown.stdout):
            versions.append(shown.stdout)
    return versions


def _canonical(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return text


def removed_fields(old: str, new: str) -> list[str]:
    """Top-level fields of ``old`` missing from ``new`` (aliases count as kept)."""
    old_fields = {f["name"] for f in json.loads(old).get("fields", [])}
    kept: set[str] = set()
    for f in json.loads(new).get("fields", []):
        kept.add(f["name"])
        kept.update(f.get("aliases", []))
    return sorted(old_fields - kept)


def check_schema(
    registry: SchemaRegistry,
    name: str,
    versions: Sequence[str],
    current: str,
    *,
    level: str = "BACKWARD_TRANSITIVE",
    run_id: str | None = None,
) -> GateResult:
    """Check ``current`` against ``versions`` (oldest first) under ``level``."""
    earlier = [v for v in versions if _canonical(v) != _canonical(current)]
    if not earlier:
        return GateResult(name, 0, True, "no earlier version")
    for old in earlier:
        gone = removed_fields(old, current)
        if gone:
            return GateResult(
                name,
                len(earlier),
                False,
                f"field(s) {', '.join(gone)} removed; CONTRACT.md allows adding fields only",
            )
    subject = f"compat-gate-{run_id or uuid.uuid4().hex[:8]}-{name}"
    registry.set_compatibility(subject, "NONE")
    for old in earlier:
        registry.register(subject, old)
    registry.set_compatibility(subject, level)
    ok, messages = registry.is_compatible(subject, current)
    if ok:
        return GateResult(name, len(earlier), True)
    detail = "; ".join(messages) or f"not {level} compatible with its earlier versions"
    return GateResult(name, len(earlier), False, detail)


def run_gate(
    registry: SchemaRegistry,
    schema_dir: Path = SCHEMA_DIR,
    *,
    level: str = "BACKWARD_TRANSITIVE",
) -> list[GateResult]:
    """Check every ``.avsc`` of ``schema_dir``; one result per file."""
    run_id = uuid.uuid4().hex[:8]
    results = []
    for path in sorted(schema_dir.glob("*.avsc")):
        current = path.read_text(encoding="utf-8")
        results.append(
            check_schema(registry, path.stem, history(path), current, level=level, run_id=run_id)
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints one line per schema, exits 1 when any is incompatible."""
    parser = argparse.ArgumentParser(
        prog="python -m libs.serde.compat",
        description="Check every schema against its earlier versions (from git history) "
        "through the schema registry's compatibility API.",
    )
    parser.add_argument(
        "--registry-url",
        required=True,
        help="Confluent-compatible API, e.g. http://127.0.0.1:8081/apis/ccompat/v7",
    )
    parser.add_argument("--level", default="BACKWARD_TRANSITIVE", choices=LEVELS)
    parser.add_argument("--schemas", type=Path, default=SCHEMA_DIR, help="schema directory")
    args = parser.parse_args(argv)
    registry = ConfluentSchemaRegistry(args.registry_url)
    try:
        results = run_gate(registry, args.schemas, level=args.level)
    except RegistryError as exc:
        print(f"schema gate: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    failed = [r for r in results if not r.ok]
    for r in results:
        verdict = "ok" if r.ok else "INCOMPATIBLE"
        reason = f": {r.reason}" if r.reason else ""
        print(f"{verdict:<12} {r.schema} ({r.versions_checked} earlier){reason}")  # noqa: T201
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
