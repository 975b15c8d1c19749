"""Compile the enricher's hot path with mypyc into ``build/mypyc/lib`` (run by ``make install``).

    .venv/bin/python deploy/mypyc/build.py [MODULE.py...]     # default: SOURCES

The sources stay the truth and what runs without a build: ``libs.runtime.compiled`` uses the
extension modules only when each was compiled from the source beside it (``compiled.json``
records their SHA-256). One more module is generated here, from ``schemas/``, and compiled with
them: the Avro readers and writers of ``libs.serde.avro.compiled_avro_source``; its source is
kept in the build (``generated/``), never beside the sources, and the manifest records its SHA-256
with those of the schemas and of ``libs/serde`` (its generator). Without a C compiler or
Python's headers this writes a manifest saying so (the enricher then logs "pure Python" at
start) and exits 0, so ``make install`` works on any machine. The output never goes next to
the sources: a stale ``.so`` there would shadow an edited ``.py`` for every import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "mypyc"
LIB = OUT / "lib"
MANIFEST = LIB / "compiled.json"

#: what is compiled: the enricher's pure-Python hot path (the handler's dispatch, route,
#: render, the pipelines' values, the lifecycle's decide, the state's per-event get and put
#: and its checkpoint write). Not libs/serde: its readers and writers are generated at run
#: time; the readers are also generated here, from the schemas, as one more module compiled
#: with these (``_generate``). (The Makefile
#: rebuilds when one of its MYPYC_INPUTS changes: every source and input here must be among
#: them.) A compiled module's globals are bound at build time:
#: tests reach other behaviour through constructor arguments (``EventHandler``'s
#: ``store_origins``, ``clock``), never by patching these modules.
SOURCES = (
    "services/enricher/handler.py",
    "services/enricher/render.py",
    "services/enricher/core.py",
    "services/enricher/lifecycle.py",
    "services/enricher/pipelines/connector_provisioning_failed.py",
    "services/enricher/pipelines/onboarding_started.py",
    "libs/state/partition.py",
    "libs/state/local.py",
)

# setuptools' build_ext as mypyc's own command line runs it, but into OUT instead of in place
SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify

setup(
    name="field-alerts-compiled",
    ext_modules=mypycify(sys.argv[3:], opt_level="3", target_dir=sys.argv[1] + "/c"),
    script_args=["build_ext", "--build-lib", sys.argv[2], "--build-temp", sys.argv[1] + "/temp"],
)
"""


def _module(path: str) -> str:
    return ".".join(Path(path).with_suffix("").parts)


def _missing_toolchain() -> str | None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) on this machine"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h)"
    return None


#: what the compiled code was type-checked against besides itself: the records it reads
#: (mypyc checks their fields' types at run time; a changed field must mean a rebuild); and
#: what the generated module is generated from: the schemas and its generator in libs/serde
INPUTS = ("libs/serde/*.py", "schemas/*.avsc")

#: the generated module's source, inside the build (``libs.runtime.compiled.GENERATED``)
GENERATED = LIB / "generated"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(directory: Path) -> dict[str, Path]:
    """The Avro module generated from ``schemas/`` into ``directory``: {module: file}
    (none when there is no schema)."""
    sys.path.insert(0, str(ROOT))
    from libs.serde.avro import COMPILED_AVRO, SCHEMA_DIR, compiled_avro_source

    schemas = {p.name: p.read_text(encoding="utf-8") for p in sorted(SCHEMA_DIR.glob("*.avsc"))}
    if not schemas:
        return {}
    file = directory / f"{COMPILED_AVRO}.py"
    file.write_text(compiled_avro_source(schemas))
    return {COMPILED_AVRO: file}


def _write(
    modules: dict[str, str],
    reason: str | None,
    inputs: dict[str, str],
    generated: dict[str, str] | None = None,
) -> None:
    LIB.mkdir(parents=True, exist_ok=True)
    manifest = {
        "modules": modules,
        "generated": generated or {},
        "inputs": inputs,
        "reason": reason,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def main(sources: list[str]) -> int:
    if LIB.exists():
        shutil.rmtree(LIB)  # never a mix of two builds
    reason = _missing_toolchain()
    if reason is not None:
        print(f"mypyc: {reason}: the enricher runs pure Python")
        _write({}, reason, {})
        return 0
    digests = {_module(s): _sha256(ROOT / s) for s in sources}
    inputs = {
        str(p.relative_to(ROOT)): _sha256(p)
        for pattern in INPUTS
        for p in sorted(ROOT.glob(pattern))
    }
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tmp-", dir=OUT) as tmp:
        script = Path(tmp) / "setup.py"
        script.write_text(SETUP)
        staging = Path(tmp) / "lib"
        (Path(tmp) / "generated").mkdir()
        generated = _generate(Path(tmp) / "generated")
        run = subprocess.run(
            [
                sys.executable,
                str(script),
                tmp,
                str(staging),
                *sources,
                *map(str, generated.values()),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            # no manifest: every `make install` tries again, and fails, until it is fixed
            print("mypyc: the build failed (above)", file=sys.stderr)
            return 1
        # the sources may have changed while mypyc ran: record what it read only if unchanged
        for source in sources:
            if _sha256(ROOT / source) != digests[_module(source)]:
                print(f"mypyc: {source} changed during the build: run it again", file=sys.stderr)
                return 1
        if any(_sha256(ROOT / p) != digest for p, digest in inputs.items()):
            print(
                f"mypyc: {' or '.join(INPUTS)} changed during the build: run it again",
                file=sys.stderr,
            )
            return 1
        shutil.copytree(staging, LIB)
        GENERATED.mkdir()
        for file in generated.values():
            shutil.copy(file, GENERATED / file.name)
        sources_generated = {name: _sha256(file) for name, file in generated.items()}
    _write(digests, None, inputs, sources_generated)
    count = len(sources) + len(generated)
    print(f"mypyc: compiled {count} modules in {time.monotonic() - started:.0f} s: {LIB}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(SOURCES)))
