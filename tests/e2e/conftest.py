"""The e2e summary table: printed at the end of the session and written to a file."""

from __future__ import annotations

import pytest

from tests.e2e.harness import SUMMARY, format_summary, summary_path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SUMMARY:
        return
    table = format_summary(SUMMARY)
    path = summary_path()
    path.write_text(table + "\n", encoding="utf-8")
    terminalreporter.section("e2e reliability summary")
    terminalreporter.write_line(table)
    terminalreporter.write_line(f"(also written to {path})")
