"""``make demo 2>&1 | tee demo.log``, then Ctrl-C: the demo stops all it started.

The Ctrl-C kills ``tee`` too, so the demo's next line meets a pipe without a reader; its
clean-up must still stop the three services, Kafka and the registry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.stack import ROOT, STACK_SH

pytestmark = pytest.mark.e2e

DEMO = ROOT / "deploy" / "local" / "demo.py"


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (killed, not yet reaped by whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _wait_for(what: str, cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


class Demo:
    """``demo.py`` with its stdout and stderr piped into ``tee``, in its own process group."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "demo"
        self.stack_env = {**os.environ, "STACK_DIR": str(self.state / "stack")}
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TOPIC_", "ENRICHER_", "NOTIFIER_", "PRODUCER_", "KAFKA_"))
        }
        env["STACK_REGISTRY_MANAGEMENT_PORT"] = "0"
        self.log = tmp_path / "demo.log"
        self.log.touch()
        self.tee = subprocess.Popen(
            ["tee", str(self.log)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert self.tee.stdin is not None
        self.started = time.monotonic()
        # a new session stands in for the terminal's foreground process group
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO), "--state-dir", str(self.state), "--gap", "0.5"],
            stdin=subprocess.DEVNULL,
            stdout=self.tee.stdin,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        self.tee.stdin.close()  # tee holds the only read end: once it dies, writes fail
        self.pids: dict[str, int] = {}

    def output(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(f"demo exited with {self.proc.returncode}:\n{self.text()}")
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stack_pid(self, name: str) -> int | None:
        try:
            return int((self.state / "stack" / "pids" / f"{name}.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def ctrl_c(self) -> int:
        """Kill tee (the Ctrl-C reaches it first), SIGINT the demo's group; its exit code."""
        self.tee.kill()
        self.tee.wait(30)
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(180)

    def assert_all_gone(self) -> None:
        _wait_for(
            f"everything the demo started is gone: {self.pids}",
            lambda: all(_gone(p) for p in self.pids.values()),
            60,
        )
        status = subprocess.run(
            [str(STACK_SH), "status"],
            env=self.stack_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 3 and "running" not in status.stdout, status.stdout

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.tee.poll() is None:
            self.tee.kill()
            self.tee.wait()
        for name, pid in self.pids.items():
            if name.startswith("service") and not _gone(pid):
                os.killpg(pid, signal.SIGKILL)
        subprocess.run([str(STACK_SH), "down"], env=self.stack_env, check=False, timeout=120)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.mark.timeout(900)
def test_ctrl_c_with_dead_tee_stops_everything(demo: Demo) -> None:
    _wait_for("the demo's first alert", lambda: "first alert delivered" in demo.output(), 600)
    first_alert_s = time.monotonic() - demo.started
    services = _children(demo.proc.pid)
    assert len(services) == 3, f"expected the three services as children: {services}"
    demo.pids.update({f"service {p}": p for p in services})
    for name in ("kafka", "registry"):
        pid = demo.stack_pid(name)
        assert pid is not None and not _gone(pid), name
        demo.pids[name] = pid

    stopping = time.monotonic()
    rc = demo.ctrl_c()
    demo.assert_all_gone()
    print(
        f"first alert after {first_alert_s:.0f} s; "
        f"stopped {time.monotonic() - stopping:.0f} s after SIGINT"
    )
    assert rc == 0, demo.text()


@pytest.mark.timeout(600)
def test_ctrl_c_while_the_stack_starts_stops_it(demo: Demo) -> None:
    def registry_started() -> bool:
        demo.output()
        pid = demo.stack_pid("registry")
        if pid is not None:
            demo.pids["registry"] = pid
        return pid is not None

    # the registry is the first component `stack.sh up` starts; Kafka may or may not be
    _wait_for("stack.sh up to start the registry", registry_started, 300)
    rc = demo.ctrl_c()
    demo.assert_all_gone()
    assert rc == 0, demo.text()
