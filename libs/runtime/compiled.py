"""Modules compiled ahead of time (mypyc, by ``make install``) preferred over their source.

The source stays the truth: a build is used only when every module in it was compiled from
exactly the source beside it (the build's manifest records each source's SHA-256), and only
for modules not imported yet. Otherwise the process runs the source and says why, so a
developer's edit is never shadowed by an older compiled copy and no process runs a mix.
The build is a directory (``build/mypyc/lib``, written by ``deploy/mypyc/build.py``): the
extension modules under their package paths, mypyc's shared library at its top, and
``compiled.json``; it is never written next to the sources.

A build may also hold modules generated at build time (the Avro readers of ``schemas/``):
top-level modules whose source is in the build (``generated/``), not in the source tree.
Each is used only when its source is the one recorded and the inputs it was generated from
(the schemas, its generator) are unchanged, and only with the rest of the build.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: the build's manifest: ``{"modules": {name: source sha256}, "generated": {name: sha256 of
#: its source in GENERATED}, "inputs": {path: sha256} (other sources the compiled code was
#: type-checked against or generated from), "reason": why no module}``
MANIFEST = "compiled.json"

#: where a build keeps the source of the modules it generated (relative to the build)
GENERATED = "generated"


@dataclass(frozen=True)
class CompiledModules:
    """What ``use_compiled`` decided: the compiled modules in use, or why none is."""

    modules: tuple[str, ...]
    #: why the source runs (``None`` when ``modules`` are compiled)
    reason: str | None = None
    #: the modules generated at build time in use (with ``modules`` only)
    generated: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.modules:
            line = "compiled (mypyc) modules: " + ", ".join(self.modules)
            if self.generated:
                line += "; generated: " + ", ".join(self.generated)
            return line
        return f"pure Python: {self.reason}"


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the build's extension modules by full name, before the source tree is searched."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extension(directory: Path, stem: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = directory / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _unimported_extension(name: str, build: Path) -> Path | str:
    """The extension module of ``name`` (dotted, under its package path) in ``build``, or why
    it cannot be used: ``name`` was imported already (from its source), or it has none."""
    if name in sys.modules:
        return f"{name} was imported before the compiled build was used"
    parts = name.split(".")
    file = _extension(build.joinpath(*parts[:-1]), parts[-1])
    if file is None:
        return f"{name} has no extension module in {build}"
    return file


def use_compiled(root: Path, build: Path) -> CompiledModules:
    """Make the modules compiled into ``build`` the ones imported, when the build is of the
    sources under ``root`` and none of them is imported yet; else change nothing.

    Call it before anything imports those modules (a service's ``__main__``).
    """
    try:
        manifest = json.loads((build / MANIFEST).read_text())
    except FileNotFoundError:
        return CompiledModules((), f"no compiled build in {build}")
    except (OSError, ValueError) as exc:
        return CompiledModules((), f"unreadable {build / MANIFEST}: {exc}")
    digests: dict[str, str] = manifest.get("modules") or {}
    if not digests:
        return CompiledModules((), str(manifest.get("reason") or "the build compiled nothing"))
    inputs: dict[str, str] = manifest.get("inputs") or {}
    for relative, digest in sorted(inputs.items()):
        try:
            current = _sha256(root / relative)
        except OSError:
            current = None
        if current != digest:
            return CompiledModules((), f"{relative} changed since the build (make install)")
    files: dict[str, Path] = {}
    for name, digest in sorted(digests.items()):
        parts = name.split(".")
        source = root.joinpath(*parts[:-1], parts[-1] + ".py")
        try:
            current = _sha256(source)
        except OSError:
            return CompiledModules((), f"{source} is missing")
        if current != digest:
            return CompiledModules((), f"{name} changed since it was compiled (make install)")
        found = _unimported_extension(name, build)
        if isinstance(found, str):
            return CompiledModules((), found)
        files[name] = found
    generated: dict[str, str] = manifest.get("generated") or {}
    for name, digest in sorted(generated.items()):
        try:
            current = _sha256(build / GENERATED / f"{name}.py")
        except OSError:
            current = None
        if current != digest:
            return CompiledModules((), f"{name}'s generated source changed since the build")
        found = _unimported_extension(name, build)
        if isinstance(found, str):
            return CompiledModules((), found)
        files[name] = found
    # mypyc's shared library (one per build): a top-level module the extensions import
    for shared in sorted(build.glob("*__mypyc.*")):
        files[shared.name.split(".", 1)[0]] = shared
    sys.meta_path.insert(0, _CompiledFinder(files))
    return CompiledModules(tuple(sorted(digests)), generated=tuple(sorted(generated)))
