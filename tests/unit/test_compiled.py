"""``use_compiled``: a build is used only when it was made from exactly the sources beside it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libs.runtime.compiled import GENERATED, MANIFEST, CompiledModules, use_compiled

ROOT = Path(__file__).resolve().parents[2]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tree(tmp_path: Path, source: str = "X = 1\n") -> tuple[Path, Path]:
    """A source tree with ``pkg_c1/mod.py`` and an empty build directory."""
    root, build = tmp_path / "src", tmp_path / "build"
    (root / "pkg_c1").mkdir(parents=True)
    (root / "pkg_c1" / "mod.py").write_text(source)
    build.mkdir()
    return root, build


def _manifest(
    build: Path,
    modules: dict[str, str],
    reason: str | None = None,
    inputs: dict[str, str] | None = None,
    generated: dict[str, str] | None = None,
) -> None:
    manifest = {"modules": modules, "inputs": inputs or {}, "reason": reason}
    if generated is not None:
        manifest["generated"] = generated
    (build / MANIFEST).write_text(json.dumps(manifest))


def test_no_build_runs_the_sources(tmp_path: Path) -> None:
    root, build = _tree(tmp_path)
    result = use_compiled(root, build)
    assert result == CompiledModules((), f"no compiled build in {build}")
    assert result.describe() == f"pure Python: no compiled build in {build}"


def test_a_build_without_a_compiler_says_why(tmp_path: Path) -> None:
    root, build = _tree(tmp_path)
    _manifest(build, {}, "no C compiler (gcc) on this machine")
    assert use_compiled(root, build).reason == "no C compiler (gcc) on this machine"


def test_a_changed_source_is_not_shadowed_by_its_older_build(tmp_path: Path) -> None:
    root, build = _tree(tmp_path, "X = 2\n")
    _manifest(build, {"pkg_c1.mod": _digest("X = 1\n")})
    finders = list(sys.meta_path)
    result = use_compiled(root, build)
    assert result.modules == ()
    assert result.reason == "pkg_c1.mod changed since it was compiled (make install)"
    assert sys.meta_path == finders


def test_a_changed_type_the_build_read_is_not_shadowed_either(tmp_path: Path) -> None:
    root, build = _tree(tmp_path)
    (root / "records.py").write_text("class R: x: int\n")
    _manifest(build, {"pkg_c1.mod": _digest("X = 1\n")}, inputs={"records.py": _digest("")})
    assert use_compiled(root, build).reason == "records.py changed since the build (make install)"


def test_a_module_already_imported_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, build = _tree(tmp_path)
    _manifest(build, {"pkg_c1.mod": _digest("X = 1\n")})
    monkeypatch.setitem(sys.modules, "pkg_c1.mod", sys.modules[__name__])
    result = use_compiled(root, build)
    assert result.reason == "pkg_c1.mod was imported before the compiled build was used"


def test_a_manifest_without_its_extension_module_is_not_used(tmp_path: Path) -> None:
    root, build = _tree(tmp_path)
    _manifest(build, {"pkg_c1.mod": _digest("X = 1\n")})
    assert use_compiled(root, build).reason == f"pkg_c1.mod has no extension module in {build}"


def test_an_unreadable_manifest_runs_the_sources(tmp_path: Path) -> None:
    root, build = _tree(tmp_path)
    (build / MANIFEST).write_text("{not json")
    result = use_compiled(root, build)
    assert result.modules == ()
    assert result.reason is not None and result.reason.startswith("unreadable")


def test_a_current_build_is_what_imports_load(tmp_path: Path) -> None:
    """A real extension module (the interpreter's ``_lsprof``, standing for a mypyc one) in the
    build, its "source" beside the sources: a fresh interpreter imports the extension."""
    import _lsprof

    extension = Path(_lsprof.__file__)
    root, build = tmp_path / "src", tmp_path / "build"
    root.mkdir()
    build.mkdir()
    (root / "_lsprof.py").write_text("SOURCE = True\n")
    shutil.copy(extension, build / extension.name)
    _manifest(build, {"_lsprof": _digest("SOURCE = True\n")})
    script = (
        "import sys; from pathlib import Path\n"
        "from libs.runtime.compiled import use_compiled\n"
        f"result = use_compiled(Path({str(root)!r}), Path({str(build)!r}))\n"
        "import _lsprof\n"
        "print(result.describe()); print(_lsprof.__file__); print(hasattr(_lsprof, 'SOURCE'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["compiled (mypyc) modules: _lsprof", str(build / extension.name), "False"]


def test_make_install_rebuilds_when_any_compiled_source_or_input_changes() -> None:
    """``make install`` rebuilds only when one of ``MYPYC_INPUTS`` is newer than the build: a
    compiled module missing from it is edited without a rebuild, and the enricher then runs
    the sources, saying ``make install`` would fix it (``libs/state`` was missing when its
    two modules were first compiled)."""
    import glob
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("mypyc_build", ROOT / "deploy/mypyc/build.py")
    assert spec is not None and spec.loader is not None
    mypyc_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mypyc_build)
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^MYPYC_INPUTS := (.*?)\)$", makefile, re.M | re.S)
    assert listed, "Makefile has no MYPYC_INPUTS"
    patterns = re.findall(r"[\w/.*-]+\.(?:py|avsc)", listed.group(1))
    covered = {Path(p) for pattern in patterns for p in glob.glob(pattern, root_dir=ROOT)}
    needed = {Path(s) for s in mypyc_build.SOURCES} | {
        Path(p) for pattern in mypyc_build.INPUTS for p in glob.glob(pattern, root_dir=ROOT)
    }
    # the generated readers' schemas and generator are inputs too
    assert {Path("libs/serde/avro.py"), Path("schemas/slack_user.avsc")} <= needed
    assert needed <= covered, f"MYPYC_INPUTS lacks {sorted(map(str, needed - covered))}"


def _generated_build(tmp_path: Path, source: str = "X = 1\n") -> tuple[Path, Path, str]:
    """A source tree and a build holding one generated module (``_lsprof``'s extension stands
    for it; its "source" in the build's ``generated/``) besides a compiled one (another copy
    stands for its extension), with an input (a schema) recorded."""
    import _lsprof

    root, build = _tree(tmp_path)
    (root / "s.avsc").write_text("{}")
    extension = Path(_lsprof.__file__)
    shutil.copy(extension, build / extension.name)
    (build / "pkg_c1").mkdir()
    shutil.copy(extension, build / "pkg_c1" / extension.name.replace("_lsprof", "mod", 1))
    (build / GENERATED).mkdir()
    (build / GENERATED / "_lsprof.py").write_text(source)
    _manifest(
        build,
        {"pkg_c1.mod": _digest("X = 1\n")},
        inputs={"s.avsc": _digest("{}")},
        generated={"_lsprof": _digest("X = 1\n")},
    )
    return root, build, extension.name


def test_a_generated_module_is_checked_against_its_source_in_the_build(tmp_path: Path) -> None:
    """The generated source edited (or another build's) makes the build unusable; unchanged,
    the check goes on (to ``_lsprof`` imported already, in this process)."""
    root, build, _ = _generated_build(tmp_path, "X = 2\n")
    reason = "_lsprof's generated source changed since the build"
    assert use_compiled(root, build).reason == reason
    (build / GENERATED / "_lsprof.py").unlink()
    assert use_compiled(root, build).reason == reason
    (build / GENERATED / "_lsprof.py").write_text("X = 1\n")
    reason = "_lsprof was imported before the compiled build was used"
    assert use_compiled(root, build).reason == reason


def test_a_changed_schema_makes_the_generated_build_unusable(tmp_path: Path) -> None:
    root, build, _ = _generated_build(tmp_path)
    (root / "s.avsc").write_text('{"type": "string"}')
    assert use_compiled(root, build).reason == "s.avsc changed since the build (make install)"


def test_a_generated_module_is_loaded_from_the_build(tmp_path: Path) -> None:
    """A fresh interpreter imports the generated module's extension from the build, and the
    start-up line names it."""
    root, build, name = _generated_build(tmp_path)
    script = (
        "from pathlib import Path\n"
        "from libs.runtime.compiled import use_compiled\n"
        f"result = use_compiled(Path({str(root)!r}), Path({str(build)!r}))\n"
        "import _lsprof\n"
        "print(result.describe()); print(_lsprof.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "compiled (mypyc) modules: pkg_c1.mod; generated: _lsprof",
        str(build / name),
    ]


def test_the_build_generates_the_readers_from_the_schemas_and_records_them() -> None:
    """``deploy/mypyc/build.py`` writes the readers' module from ``schemas/`` and records its
    source's hash in the manifest; the build ``make install`` made is of today's schemas."""
    import importlib.util

    from libs.serde.avro import COMPILED_AVRO, SCHEMA_DIR, compiled_avro_source

    spec = importlib.util.spec_from_file_location("mypyc_build", ROOT / "deploy/mypyc/build.py")
    assert spec is not None and spec.loader is not None
    mypyc_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mypyc_build)
    out = Path(mypyc_build.OUT).parent / "pytest-generated"  # under build/, removed below
    out.mkdir(parents=True, exist_ok=True)
    try:
        files = mypyc_build._generate(out)
        assert list(files) == [COMPILED_AVRO]
        schemas = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.avsc")}
        assert files[COMPILED_AVRO].read_text() == compiled_avro_source(schemas)
    finally:
        shutil.rmtree(out)
    manifest_file = ROOT / "build" / "mypyc" / "lib" / MANIFEST
    if not manifest_file.is_file():
        pytest.skip("no build here (make install)")
    manifest = json.loads(manifest_file.read_text())
    if not manifest["modules"]:
        pytest.skip(f"the build compiled nothing: {manifest['reason']}")
    assert set(manifest["generated"]) == {COMPILED_AVRO}
    assert {f"schemas/{name}" for name in schemas} <= set(manifest["inputs"])


def test_without_a_c_compiler_the_build_exits_0_and_nothing_generated_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No toolchain: the manifest says why, lists neither compiled nor generated modules, and
    the process runs the sources (the readers generated at run time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mypyc_build", ROOT / "deploy/mypyc/build.py")
    assert spec is not None and spec.loader is not None
    mypyc_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mypyc_build)
    lib = tmp_path / "lib"
    monkeypatch.setattr(mypyc_build, "LIB", lib)
    monkeypatch.setattr(mypyc_build, "MANIFEST", lib / MANIFEST)
    monkeypatch.setattr(mypyc_build, "_missing_toolchain", lambda: "no C compiler (cc)")
    assert mypyc_build.main(list(mypyc_build.SOURCES)) == 0
    manifest = json.loads((lib / MANIFEST).read_text())
    assert manifest["modules"] == {} and manifest["generated"] == {}
    assert not (lib / GENERATED).exists()
    assert use_compiled(ROOT, lib) == CompiledModules((), "no C compiler (cc)")
