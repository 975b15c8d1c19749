"""The container image (deploy/docker/Dockerfile), built and run as the manifests run it.

The module's fixture builds the image with ``deploy/docker/image.sh build`` (what ``make image``
runs; a no-op rebuild from the layer cache when nothing changed) unless ``IMAGE_TEST_BUILT=1``
says ``make image`` just did. Every container runs as the manifest's ``runAsUser`` with a
read-only root filesystem, only the manifest's volumes and the host's network (see
``tests/support/image.py``). Without Docker or buildah (or without root for buildah) the
module skips saying so; ``make test`` installs buildah first where it can.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from random import Random

import pytest

from tests.e2e.harness import SERVICES, StreamSpec, World
from tests.support.image import (
    Image,
    ImageUnavailableError,
    PodSpec,
    pod_spec,
    run_image_sh,
    settings_only,
)
from tests.support.stack import Stack

# The first build on a machine makes the Debian base and downloads every wheel.
pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    try:
        img = Image.from_env()
    except ImageUnavailableError as exc:
        pytest.skip(f"no container engine to build and run the image: {exc}")
    if os.environ.get("IMAGE_TEST_BUILT") != "1":
        started = time.monotonic()
        proc = run_image_sh("build", timeout_s=1700)
        assert proc.returncode == 0, f"image.sh build failed:\n{proc.stderr[-6000:]}"
        print(f"image.sh build: {time.monotonic() - started:.0f} s")
    assert img.exists(), f"{img.name} is not in {img.engine}'s storage after the build"
    print(f"{img.name}: {img.size()} ({img.engine})")
    try:
        yield img
    finally:
        img.close()


def volumes(spec: PodSpec, base: Path) -> dict[str, Path]:
    """A fresh host directory for each of the manifest's volumes."""
    return {p: base / f"{spec.service}{p.replace('/', '-')}" for p in spec.mount_paths}


def run_once(
    image: Image,
    spec: PodSpec,
    args: list[str],
    base: Path,
    entrypoint: str | None = None,
    timeout_s: float = 300,
) -> str:
    """Run ``args`` after the entrypoint in a new container of ``spec``; its stdout."""
    argv, env = image.run_argv(spec, args, {}, volumes(spec, base), entrypoint)
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_service_help_from_the_image(image: Image, service: str, tmp_path: Path) -> None:
    out = run_once(image, pod_spec(service), [f"services.{service}", "--help"], tmp_path)
    assert out.startswith("usage:"), out[:500]
    assert f"services.{service}" in out or service in out.split("\n", 1)[0], out[:500]


def test_container_is_non_root_with_a_read_only_root(image: Image, tmp_path: Path) -> None:
    """What every pod gets: the manifest's user, nothing writable but its volumes; and the
    image's own USER is that same user (a plain `docker run` is non-root too)."""
    spec = pod_spec("enricher")
    assert spec.read_only_root and spec.run_as_user != 0
    assert image.config()["User"] == f"{spec.run_as_user}:{spec.run_as_group}"
    probe = (
        "import os, sys\n"
        "print('uid', os.getuid(), os.getgid())\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n"
        "        open(os.path.join(d, 'probe'), 'w').close()\n"
        "        print('writable', d)\n"
        "    except OSError as e:\n"
        "        print('refused', d, e.errno)\n"
    )
    dirs = ["/app", "/opt/venv", "/var/lib/producer", "/var/tmp", "/", *spec.mount_paths]
    out = run_once(image, spec, ["-c", probe, *dirs], tmp_path, entrypoint="python").split("\n")
    assert out[0] == f"uid {spec.run_as_user} {spec.run_as_group}", out
    writable = {line.split()[1] for line in out if line.startswith("writable")}
    assert writable == set(spec.mount_paths), out


#: what services/enricher/__main__.py logs at start when it runs the image's mypyc build
COMPILED_LINE = "hot path: compiled (mypyc) modules: "


def test_hot_path_is_compiled_and_no_compiler_ships(image: Image, tmp_path: Path) -> None:
    """The enricher's hot path from the image's mypyc build, loaded as the enricher loads it
    (the build's SHA-256s against /app's sources) as the pod's user on the read-only root, every
    compiled module imported from it, the Avro module generated from schemas/ included; and the
    runtime stage carries no C compiler."""
    spec = pod_spec("enricher")
    probe = (
        "import importlib, shutil\n"
        "from pathlib import Path\n"
        "import services.enricher.__main__ as main\n"
        "print(main.COMPILED.describe())\n"
        "print('modules', len(main.COMPILED.modules))\n"
        "print('generated', *main.COMPILED.generated)\n"
        "for name in main.COMPILED.modules + main.COMPILED.generated:\n"
        "    print('file', name, importlib.import_module(name).__file__)\n"
        "print('compilers', [c for c in ('cc', 'gcc', 'c99') if shutil.which(c)])\n"
    )
    out = run_once(image, spec, ["-c", probe], tmp_path, entrypoint="python").splitlines()
    assert out[0].startswith(COMPILED_LINE.removeprefix("hot path: ")), out
    count = int(out[1].split()[1])
    # the Avro module generated from schemas/ is compiled in the image too (its stage has them)
    assert out[2] == "generated field_alerts_avro", out
    files = [line.split() for line in out if line.startswith("file ")]
    assert count > 0 and len(files) == count + 1, out
    for _, name, file in files:
        assert file.startswith("/app/build/mypyc/lib/") and file.endswith(".so"), (name, file)
    assert out[-1] == "compilers []", out


#: the warehouse file the producer polls, in its /tmp volume
WAREHOUSE = "warehouse.duckdb"


@pytest.fixture
def stack_env(stack: Stack) -> dict[str, str]:
    return dict(stack.env)


def test_alert_from_event_to_receipt(
    image: Image, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """The three services from the image against the local stack and a fake Slack: connector
    events and warehouse rows become Slack posts and receipts, poison ends in the dead-letter
    topics, every service stops cleanly on SIGTERM (the e2e audit of tests/e2e/harness.py);
    and the enricher says at start that it runs the image's compiled hot path."""
    specs = {s: pod_spec(s) for s in SERVICES}
    vol_root = tmp_path / "volumes"

    def launcher(name: str, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        spec = specs[name]
        settings = settings_only(env)
        vols = volumes(spec, vol_root)
        # The state directories are the manifests' volumes at the image's default paths.
        settings.pop(f"{name.upper()}_STATE_DIR", None)
        if name == "producer":
            # The DuckDB warehouse stands in for BigQuery: the scenario (re)writes the file
            # in the producer's /tmp volume (below), which the producer sees as /tmp.
            settings["PRODUCER_WAREHOUSE"] = f"duckdb:////tmp/{WAREHOUSE}"
        return image.run_argv(spec, [f"services.{name}"], settings, vols)

    (tmp_path / "world").mkdir()
    with World("image", tmp_path / "world", stack_env, launcher=launcher) as w:
        producer_tmp = volumes(specs["producer"], vol_root)["/tmp"]
        producer_tmp.mkdir(parents=True)
        w.warehouse = producer_tmp / WAREHOUSE
        w.start()
        # which hot path runs: the enricher's first line once its logging is configured
        enricher = w.fleet["enricher"]

        def hot_path() -> list[str]:
            msgs = (str(r.get("msg", "")) for r in enricher.log_records())
            return [m for m in msgs if m.startswith("hot path: ")]

        w.fleet.wait_for(hot_path, 60, "the enricher's 'hot path: ...' log line")
        assert hot_path()[0].startswith(COMPILED_LINE), hot_path()
        w.stream(StreamSpec(duration_s=8, connectors=10, rows=4), Random(7))
        report = w.finish()
    report.assert_ok()
    assert report.delivered > 0, report
