"""deploy/docker/image.sh: its interface and how it picks an engine (no build here: that is
tests/image, which needs Docker or buildah)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SH = ROOT / "deploy" / "docker" / "image.sh"
BASH = shutil.which("bash") or "/bin/bash"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(IMAGE_SH), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def bare_path(tmp_path: Path) -> str:
    """A PATH with the few tools image.sh needs before it looks for an engine, and no engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("build", "base", "tools", "engine", "env", "IMAGE_PYTHON_BASE"):
        assert word in proc.stdout


def test_unknown_command_fails_naming_it() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 1
    assert "unknown command 'frobnicate'" in proc.stderr


def test_a_bad_engine_setting_is_refused() -> None:
    proc = run("engine", env={**os.environ, "IMAGE_ENGINE": "podman"})
    assert proc.returncode == 1
    assert "IMAGE_ENGINE must be docker or buildah, not 'podman'" in proc.stderr


def test_without_any_engine_it_says_what_to_install(tmp_path: Path) -> None:
    env = {"PATH": bare_path(tmp_path), "HOME": str(tmp_path)}
    proc = run("engine", env=env)
    assert proc.returncode == 3  # tests/image skips on 3 only
    assert "neither docker nor buildah is installed" in proc.stderr
    assert "apt-get install buildah" in proc.stderr


def test_tools_never_fails_and_says_why_the_image_tests_would_skip(tmp_path: Path) -> None:
    """`make test` runs `image.sh tools` first: without an engine and without a way to
    install one it must not stop the suite, only say why tests/image will skip."""
    env = {"PATH": bare_path(tmp_path), "HOME": str(tmp_path)}
    proc = run("tools", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the image tests will skip" in proc.stderr
