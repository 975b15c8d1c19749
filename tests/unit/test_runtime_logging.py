"""The JSON log line: one object per line, the standard fields, then the call's extras."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

from libs.runtime import configure_logging


def test_a_json_line_holds_the_extras_in_order_unescaped_and_anything_as_text() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO", json_format=True, stream=buf)
    try:
        when = datetime(2026, 12, 2, 22, 0, tzinfo=UTC)
        logging.getLogger("t.receipts").info(
            "receipt",
            extra={"message_id": "m-ü", "channel": "C1", "offset": 7, "at": when, "_private": 1},
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    [line] = buf.getvalue().splitlines()
    out = json.loads(line)
    assert list(out) == ["ts", "level", "logger", "msg", "message_id", "channel", "offset", "at"]
    assert out["level"] == "INFO" and out["logger"] == "t.receipts" and out["msg"] == "receipt"
    assert out["at"] == str(when)  # not JSON-native: its text
    assert "m-ü" in line  # ensure_ascii off: readable in any log viewer
    assert out["ts"].endswith("+00:00") and len(out["ts"]) == len("2026-12-02T22:00:00.000+00:00")
