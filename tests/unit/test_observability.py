"""deploy/observability: the alert rules pass promtool and their unit tests, the dashboard is
sane, and every metric the rules and the dashboard read is one a service exports.

promtool ships with Debian's ``prometheus`` package. When it is missing the session fixture
installs it (as root, with apt-get); only when that is impossible do the two promtool tests
skip, saying why. The other checks never need it.

"Exported" means: what the services' own modules register in the Prometheus registry, read
back from the exposition text ``/metrics`` serves (``generate_latest``), so the suffixes
(``_total``, ``_bucket``) are exactly what a scrape sees. The screenshot run
(``make dashboard-screenshot``) checks the same against the running services.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

from deploy.observability.promnames import (
    PROMETHEUS_OWN,
    exported_series_names,
    metric_names,
    panels,
    rules,
    used_metric_names,
)

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
RULES = OBS / "alerts.yml"
RULE_TESTS = OBS / "alerts.test.yml"
DASHBOARD = OBS / "dashboard.json"

# -- promtool ----------------------------------------------------------------------------------


def _install_promtool() -> str | None:
    """Why promtool cannot be had, or None once it is on the PATH."""
    if shutil.which("promtool"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "promtool is not installed and installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    for cmd in (install, ["apt-get", "update"], install):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if cmd is install and proc.returncode == 0 and shutil.which("promtool"):
            return None
    return f"apt-get install prometheus failed: {proc.stderr.strip()[-500:]}"


@pytest.fixture(scope="session")
def promtool() -> str:
    reason = _install_promtool()
    if reason is not None:
        pytest.skip(reason)
    path = shutil.which("promtool")
    assert path is not None
    return path


@pytest.mark.timeout(1200)
def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.timeout(1200)
def test_rule_unit_tests_pass(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=OBS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for r in rules(RULES) if "alert" in r}
    assert alerts, "no alerts in alerts.yml"
    assert alerts - fires == set(), "alerts never seen firing in alerts.test.yml"
    assert alerts - quiet == set(), "alerts never checked quiet in alerts.test.yml"


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in rules(RULES):
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- dashboard ---------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def test_dashboard_datasource_is_a_template_variable() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_dashboard_panel_has_a_query_on_the_templated_datasource() -> None:
    doc = _dashboard()
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels(doc) if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{where} has an empty query"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{where} is wider than the grid"


# -- metric names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job=~"field-alerts.*"} == 0', {"up"}),
        (
            "sum by (pipeline) (rate(a_total[15m])) / sum by (pipeline) "
            '(rate(b_total{outcome!="dropped"}[$__rate_interval])) > 0.2',
            {"a_total", "b_total"},
        ),
        (
            "x > 0 and on (job, instance, table) (time() - y_seconds) > 600",
            {"x", "y_seconds"},
        ),
        ('histogram_quantile(0.9, sum without (le) (rate(h_bucket{a="b"}[5m])))', {"h_bucket"}),
        ("max_over_time(g[1h:1m]) offset 5m unless bool_gauge", {"g", "bool_gauge"}),
    ],
)
def test_metric_names_are_parsed_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def services_exposition() -> str:
    """What the three services' /metrics would list, from the modules that register it."""
    import services.enricher.app
    import services.notifier.app
    import services.producer.app  # noqa: F401

    return generate_latest(REGISTRY).decode()


def test_every_metric_used_is_exported_by_a_service() -> None:
    exported = exported_series_names(services_exposition()) | PROMETHEUS_OWN
    used = used_metric_names(RULES, DASHBOARD)
    # the things an on-call needs, each read by at least one rule or panel
    for needed in (
        "loop_heartbeat_timestamp_seconds",
        "table_lag_records",
        "table_last_update_timestamp_seconds",
        "dead_letters_total",
        "enricher_join_misses_total",
        "notifier_slack_calls_total",
        "notifier_receipts_behind_messages",
        "producer_cursor_lag_seconds",
    ):
        assert needed in used, f"{needed} is used by no rule or panel"
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, f"metrics no service exports: {missing}"


def test_exported_names_carry_the_scrape_suffixes() -> None:
    names = exported_series_names(
        "# TYPE a_total counter\n# TYPE g gauge\n# TYPE h histogram\n# TYPE s summary\n"
    )
    assert {"a_total", "a_created", "g", "h_bucket", "h_count", "h_sum", "s", "s_sum"} <= names
    assert "a_total_total" not in names and "h" not in names


def test_a_metric_no_service_exports_is_caught(tmp_path: Path) -> None:
    """A counter without its _total suffix (what the service code calls it) is not exported."""
    doc = _dashboard()
    graphs = [p for p in panels(doc) if p["type"] != "row"]
    graphs[0]["targets"][0]["expr"] = "sum(rate(enricher_events[5m]))"
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(doc))
    exported = exported_series_names(services_exposition()) | PROMETHEUS_OWN
    used = used_metric_names(RULES, broken)
    assert {name for name in used if name not in exported} == {"enricher_events"}
