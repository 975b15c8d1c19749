"""Start the project's real local stack (deploy/local/stack.sh) for a test session."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "deploy" / "local" / "stack.sh"


@dataclass
class Stack:
    """A running stack: its state dir and the settings it exported."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def registry_url(self) -> str:
        return self.env["SCHEMA_REGISTRY_URL"]

    def down(self) -> None:
        subprocess.run([str(STACK_SH), "down"], env=_env(self.state_dir), check=False, timeout=120)

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """``stack.sh ARGS`` against this stack (e.g. ``stop-broker 2``); never raises on a
        non-zero exit."""
        return subprocess.run(
            [str(STACK_SH), *args],
            env=_env(self.state_dir),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def stop_broker(self, node: int, *, kill: bool = False) -> None:
        """Stop Kafka node ``node`` (gracefully, or SIGKILL with ``kill``)."""
        out = self.run("stop-broker", str(node), *(["--kill"] if kill else []))
        assert out.returncode == 0, out.stderr

    def start_broker(self, node: int) -> None:
        """Start a stopped node again; returns once it is ready."""
        out = self.run("start-broker", str(node))
        assert out.returncode == 0, out.stderr


def _env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "STACK_DIR": str(state_dir),
            "STACK_KAFKA_PORT": "0",
            "STACK_KAFKA_CONTROLLER_PORT": "0",
            "STACK_REGISTRY_PORT": "0",
            "STACK_BIGQUERY_PORT": "0",
            "STACK_BIGQUERY_GRPC_PORT": "0",
            "STACK_KAFKA_SASL_PORT": "0",
        }
    )
    env.update(extra)
    return env


def parse_exports(text: str) -> dict[str, str]:
    """``export NAME=value`` lines to a dict."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            out[name] = value.strip().strip("'\"")
    return out


def start_stack(state_dir: Path, *flags: str, timeout_s: float = 600) -> Stack:
    """Run ``stack.sh up`` on free loopback ports; raise with its output if it fails."""
    proc = subprocess.run(
        [str(STACK_SH), "up", *flags],
        env=_env(state_dir),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"stack.sh up {' '.join(flags)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return Stack(state_dir, parse_exports(proc.stdout))
