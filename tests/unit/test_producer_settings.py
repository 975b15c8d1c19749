"""Producer settings: formats of the warehouse URL and table names, one clear line on error."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.cli import describe_validation_error
from services.producer.settings import ProducerSettings
from services.producer.sources import (
    BigQueryWarehouse,
    DuckDBWarehouse,
    TableRef,
    parse_table,
    parse_warehouse,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PRODUCER_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("duckdb:///data/w.duckdb", DuckDBWarehouse(Path("/data/w.duckdb"))),
        ("duckdb://var/w.duckdb", DuckDBWarehouse(Path("var/w.duckdb"))),
        ("bigquery://my-project-1", BigQueryWarehouse("my-project-1")),
        ("bigquery://p1/", BigQueryWarehouse("p1")),
    ],
)
def test_parse_warehouse(url: str, expected: object) -> None:
    assert parse_warehouse(url) == expected


@pytest.mark.parametrize(
    "url", ["duckdb://", "bigquery://", "bigquery://Bad_Project", "postgres://x", "w.duckdb"]
)
def test_parse_warehouse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_warehouse(url)


@pytest.mark.parametrize(
    ("text", "kind", "parts"),
    [
        ("onboarding", "duckdb", ("onboarding",)),
        ("main.onboarding", "duckdb", ("main", "onboarding")),
        ("alerts.onboarding", "bigquery", ("alerts", "onboarding")),
        ("my-proj.alerts.onboarding_v2", "bigquery", ("my-proj", "alerts", "onboarding_v2")),
    ],
)
def test_parse_table(text: str, kind: str, parts: tuple[str, ...]) -> None:
    assert parse_table(text, warehouse=kind) == TableRef(parts)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("onboarding", "bigquery"),
        ("a.b.c", "duckdb"),
        ("a.b.c.d", "bigquery"),
        ("alerts.onboarding; DROP TABLE x", "bigquery"),
        ('onboarding"', "duckdb"),
        ("alerts.`onboarding`", "bigquery"),
        ("Bad_Project.alerts.t", "bigquery"),
        ("1table", "duckdb"),
        ("", "duckdb"),
    ],
)
def test_parse_table_rejects_anything_but_identifiers(text: str, kind: str) -> None:
    with pytest.raises(ValueError):
        parse_table(text, warehouse=kind)


def test_defaults() -> None:
    s = ProducerSettings()
    assert s.parsed_warehouse() == DuckDBWarehouse(Path("var/warehouse.duckdb"))
    assert s.onboarding_table_ref() == TableRef(("onboarding",))
    assert (s.delay_s, s.batch_size, s.poll_interval_s) == (60.0, 1000, 10.0)
    assert s.start_from is None


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCER_WAREHOUSE", "bigquery://proj")
    monkeypatch.setenv("PRODUCER_BIGQUERY_API_ENDPOINT", "http://127.0.0.1:9050")
    monkeypatch.setenv("PRODUCER_ONBOARDING_TABLE", "alerts.onboarding")
    monkeypatch.setenv("PRODUCER_DELAY_S", "2.5")
    monkeypatch.setenv("PRODUCER_START_FROM", "2026-01-01T00:00:00")
    s = ProducerSettings()
    assert s.parsed_warehouse() == BigQueryWarehouse("proj")
    assert s.bigquery_api_endpoint == "http://127.0.0.1:9050"
    assert s.onboarding_table_ref() == TableRef(("alerts", "onboarding"))
    assert s.delay_s == 2.5
    assert s.start_from == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"PRODUCER_WAREHOUSE": "bigquery://proj"},
            "invalid settings: PRODUCER_ONBOARDING_TABLE: Value error, BigQuery tables are "
            "<dataset>.<table> or <project>.<dataset>.<table>, got 'onboarding' "
            "(got 'onboarding')",
        ),
        (
            {"PRODUCER_BATCH_SIZE": "0"},
            "invalid settings: PRODUCER_BATCH_SIZE: Input should be greater than or equal to 1 "
            "(got '0')",
        ),
    ],
)
def test_invalid_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as info:
        ProducerSettings()
    assert describe_validation_error(info.value, "PRODUCER_") == line


def test_cli_help_and_missing_settings() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    helped = subprocess.run(
        [sys.executable, "-m", "services.producer", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0
    for name in ("PRODUCER_WAREHOUSE", "PRODUCER_DELAY_S", "PRODUCER_ONBOARDING_TABLE"):
        assert name in helped.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "services.producer"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "producer: invalid settings: KAFKA_BOOTSTRAP_SERVERS is required but not set; "
        "SCHEMA_REGISTRY_URL is required but not set"
    ]
