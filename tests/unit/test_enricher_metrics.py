"""The enricher's events counter documents every outcome the code counts under it: the help
text is what an operator reads in /metrics and on the dashboard, and it once listed four
outcomes of seven."""

from __future__ import annotations

import re
from pathlib import Path

import services.enricher
from services.enricher import handler

_COUNTED = re.compile(r'(?:_count|EVENTS\.labels)\([^,()]+, "([a-z_]+)"\)')


def test_the_events_counter_help_names_every_outcome_counted() -> None:
    # the package's sources (handler.__file__ is the compiled module's under TEST_COMPILED=1)
    sources = Path(services.enricher.__file__).parent.glob("*.py")
    counted = {m for src in sources for m in _COUNTED.findall(src.read_text())}
    assert {"dm", "fallback", "dropped", "missed", "parked", "grouped", "resolved"} <= counted
    help_text = handler.EVENTS._documentation
    missing = sorted(o for o in counted if not re.search(rf"\b{o}\b", help_text))
    assert not missing, f"outcomes counted but not in the help text: {missing}"
