"""SIGTERM always ends the process within its grace period, even when the main thread is
stuck where no stop event is looked at (a client call wedged in librdkafka, say)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from libs.runtime.signals import EXIT_STOP_OVERRUN

pytestmark = pytest.mark.timeout(60)

STUCK = """
import sys, threading
from libs.runtime import install_stop_handlers
install_stop_handlers(grace_s=float(sys.argv[1]))
print("ready", flush=True)
threading.Event().wait()  # never looks at the stop event
"""


def test_a_stuck_process_exits_after_the_grace_period() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", STUCK, "1.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the process ignored SIGTERM for 30 s") from None
        elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_STOP_OVERRUN
    assert 0.9 <= elapsed < 20, elapsed
    assert b"grace period" in stderr
