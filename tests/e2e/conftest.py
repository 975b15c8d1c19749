"""The e2e summary table (printed at the end of the session and written to a file), and the
three-broker cluster of the fleet scenarios and the soak."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import BROKERS, SUMMARY, format_summary, summary_path
from tests.support.stack import Stack, parse_exports, start_stack


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SUMMARY:
        return
    table = format_summary(SUMMARY)
    path = summary_path()
    path.write_text(table + "\n", encoding="utf-8")
    terminalreporter.section("e2e reliability summary")
    terminalreporter.write_line(table)
    terminalreporter.write_line(f"(also written to {path})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A ``stack.sh up --brokers 3`` cluster of the module's own (its nodes get stopped and
    started); ``TEST_FLEET_STACK_DIR``: the ``STACK_DIR`` of a running one to reuse."""
    reuse = os.environ.get("TEST_FLEET_STACK_DIR")
    if reuse:
        stack = Stack(Path(reuse))
        out = stack.run("env")
        assert out.returncode == 0, out.stderr
        stack.env = parse_exports(out.stdout)
        assert stack.env.get("STACK_KAFKA_BROKERS") == "3", "TEST_FLEET_STACK_DIR: not 3 nodes"
        yield stack
        return
    s = start_stack(tmp_path_factory.mktemp("fleet-stack"), "--brokers", "3")
    try:
        yield s
    finally:
        s.down()


@pytest.fixture
def cluster_env(cluster: Stack) -> dict[str, str]:
    """The cluster's settings, after starting any node a scenario that failed half-way left
    stopped (the next one must not run on a degraded cluster)."""
    for node in BROKERS:
        if f"kafka-{node}   stopped" in cluster.run("status").stdout:
            cluster.start_broker(node)
    return dict(cluster.env)
