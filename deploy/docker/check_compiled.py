"""Fail the image build unless the mypyc build is complete and loads (the Dockerfile's
``compiled`` stage runs it after ``deploy/mypyc/build.py``, from the build's root).

``build.py`` exits 0 having compiled nothing when it finds no C compiler or no Python headers,
by design: ``make install`` must work on any machine. An image is a release artifact, so a
build that compiled nothing, or one the enricher would refuse, must not become one. This loads
the build exactly as ``services/enricher/__main__.py`` does (``use_compiled``, the manifest's
SHA-256s against the sources beside it) and imports every module from it, the Avro module
generated from ``schemas/`` included.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
from pathlib import Path

ROOT = Path.cwd()
LIB = ROOT / "build" / "mypyc" / "lib"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from libs.runtime.compiled import MANIFEST, use_compiled

    manifest = json.loads((LIB / MANIFEST).read_text())
    listed = tuple(sorted(manifest.get("modules") or {}))
    if not listed:
        print(f"mypyc compiled nothing: {manifest.get('reason')}", file=sys.stderr)
        return 1
    generated = tuple(sorted(manifest.get("generated") or {}))
    if not generated:
        print("the build generated no Avro module (are schemas/ in the stage?)", file=sys.stderr)
        return 1
    used = use_compiled(ROOT, LIB)
    if used.modules != listed or used.generated != generated:
        print(f"the compiled build is not usable: {used.describe()}", file=sys.stderr)
        return 1
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for name in used.modules + used.generated:
        file = importlib.import_module(name).__file__ or ""
        if not file.endswith(suffixes):
            print(f"{name} was imported from {file}, not from the build", file=sys.stderr)
            return 1
    print(f"hot path: {used.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
