"""``tune_malloc``: the three mallopt calls on glibc, nothing elsewhere, and the setting."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.enricher import malloc
from services.enricher.settings import EnricherSettings


class FakeLibc:
    """A C library whose ``mallopt`` records its calls and answers ``answer`` (1: done)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self._answers = answers

    def mallopt(self, param: Any, value: Any) -> int:
        self.calls.append((param.value, value.value))
        return self._answers.pop(0) if self._answers else 1


def test_sets_mmap_threshold_then_trim_threshold_then_top_pad() -> None:
    libc = FakeLibc()
    said = malloc.tune_malloc(libc)
    assert libc.calls == [
        (malloc.M_MMAP_THRESHOLD, 4 << 20),
        (malloc.M_TRIM_THRESHOLD, 64 << 20),
        (malloc.M_TOP_PAD, 16 << 20),
    ]
    assert said == "malloc: trim threshold 64 MB, top pad 16 MB, mmap threshold 4 MB"


def test_a_refused_setting_is_said_and_stops_there() -> None:
    libc = FakeLibc(answers=[1, 0])
    said = malloc.tune_malloc(libc)
    assert len(libc.calls) == 2
    assert said.startswith(f"malloc: mallopt({malloc.M_TRIM_THRESHOLD}, {64 << 20}) refused")


def test_a_c_library_without_mallopt_is_left_alone() -> None:
    assert malloc.tune_malloc(object()) == "malloc: no mallopt (not glibc), defaults kept"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_the_settings() -> None:
    # in a child: the test process keeps glibc's defaults (other tests measure its heap)
    done = subprocess.run(
        [sys.executable, "-c", "from services.enricher.malloc import tune_malloc as t; print(t())"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.stdout.startswith("malloc: trim threshold 64 MB"), done


def test_the_setting_defaults_to_on_and_false_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EnricherSettings().malloc_tune is True
    monkeypatch.setenv("ENRICHER_MALLOC_TUNE", "false")
    assert EnricherSettings().malloc_tune is False
