"""deploy/local/stack.sh without downloads: where the cache lives, progress of long steps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import STACK_SH


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("STACK_CACHE_DIR", "XDG_CACHE_HOME")}
    return subprocess.run(
        [str(STACK_SH), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def _cache_dir(**env: str) -> str:
    lines = dict(line.split("=", 1) for line in _run("paths", **env).stdout.splitlines())
    return lines["STACK_CACHE_DIR"]


def test_help_names_the_user_cache_dir_as_default() -> None:
    assert "(default ${XDG_CACHE_HOME:-$HOME/.cache}/field-alerts)" in " ".join(
        _run("--help").stdout.split()
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOME": "/home/ana"}, "/home/ana/.cache/field-alerts"),
        ({"HOME": "/home/ana", "XDG_CACHE_HOME": "/var/cache/ana/"}, "/var/cache/ana/field-alerts"),
        # the XDG spec: a relative XDG_CACHE_HOME is invalid and ignored
        ({"HOME": "/home/ana", "XDG_CACHE_HOME": "rel"}, "/home/ana/.cache/field-alerts"),
        ({"HOME": "/home/ana", "XDG_CACHE_HOME": "/x", "STACK_CACHE_DIR": "/c"}, "/c"),
    ],
    ids=["home", "xdg", "relative-xdg-ignored", "override"],
)
def test_cache_dir_resolution(env: dict[str, str], expected: str, tmp_path: Path) -> None:
    assert _cache_dir(STACK_DIR=str(tmp_path / "state"), **env) == expected
    assert not (tmp_path / "state").exists(), "paths must create nothing"


def test_long_steps_say_they_are_still_running(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    script = (
        f"source {STACK_SH}; STACK_PROGRESS_INTERVAL_S=1 "
        f"run_long 'building the thing' {tmp_path} {log} sh -c 'sleep 2.5; echo done; exit 3'"
        " || echo rc=$?"  # stack.sh sets -e
    )
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == "rc=3"
    assert "stack.sh: still building the thing (0 min elapsed)" in proc.stderr
    assert log.read_text() == "done\n"
