"""Metric names in PromQL and in Prometheus exposition text, for the "every metric the rules
and the dashboard use is exported" check (tests/unit/test_observability.py, screenshot.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

#: series Prometheus makes itself for every scrape target, exported by no service
PROMETHEUS_OWN = {"up"}

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}

#: the series names a scrape returns per metric type, by suffix
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
    "untyped": ("",),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not labels, functions or keywords)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    # grouping labels: by (...), on (...), group_left (...)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        after = text[match.end() :].lstrip()
        if after.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function call or an operator
        names.add(match.group())
    return names


def exported_series_names(exposition: str) -> set[str]:
    """Every series name a scrape of this exposition text can return, suffixes included.

    Read from the ``# TYPE`` lines, which list a labelled metric even before its first
    sample: a counter nobody incremented yet is still exported.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def rules(path: Path) -> list[dict[str, Any]]:
    """Every rule of a Prometheus rule file."""
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a Grafana dashboard, the ones inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def used_metric_names(rules_path: Path, dashboard_path: Path) -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard panel titles)."""
    used: dict[str, set[str]] = {}
    for rule in rules(rules_path):
        where = f"alert {rule['alert']}" if "alert" in rule else f"record {rule['record']}"
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    for panel in panels(json.loads(dashboard_path.read_text())):
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return used
