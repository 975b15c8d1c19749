"""Enricher settings: defaults, ENRICHER_* parsing, one clear line for a bad value."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.cli import describe_validation_error
from services.enricher.settings import EnricherSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ENRICHER_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = EnricherSettings()
    assert s.group_id == "enricher"
    assert s.state_dir == Path("./state/enricher")
    assert s.fallback_channel is None
    assert s.processing_guarantee == "exactly_once"
    assert s.effective_transactional_id() == f"enricher-{socket.gethostname()}"
    assert s.link_templates == {}


def test_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICHER_GROUP_ID", "enricher-eu")
    monkeypatch.setenv("ENRICHER_STATE_DIR", "/var/lib/enricher")
    monkeypatch.setenv("ENRICHER_FALLBACK_CHANNEL", "C0FIELD")
    monkeypatch.setenv("ENRICHER_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("ENRICHER_TRANSACTIONAL_ID", "enricher-0")
    monkeypatch.setenv(
        "ENRICHER_LINK_TEMPLATES",
        json.dumps({"connector-provisioning-failed.crm": "https://crm.internal/a/{org_id}"}),
    )
    s = EnricherSettings()
    assert s.group_id == "enricher-eu"
    assert s.state_dir == Path("/var/lib/enricher")
    assert s.fallback_channel == "C0FIELD"
    assert s.processing_guarantee == "at_least_once"
    assert s.effective_transactional_id() == "enricher-0"
    assert s.link_overrides("connector-provisioning-failed") == {
        "crm": "https://crm.internal/a/{org_id}"
    }
    assert s.link_overrides("onboarding-started") == {}


def test_blank_optional_settings_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICHER_FALLBACK_CHANNEL", " ")
    monkeypatch.setenv("ENRICHER_TRANSACTIONAL_ID", "")
    s = EnricherSettings()
    assert s.fallback_channel is None
    assert s.effective_transactional_id().startswith("enricher-")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ENRICHER_PROCESSING_GUARANTEE", "exactly-twice", "ENRICHER_PROCESSING_GUARANTEE:"),
        ("ENRICHER_GROUP_ID", "", "ENRICHER_GROUP_ID:"),
        ("ENRICHER_LINK_TEMPLATES", "not json", "ENRICHER_LINK_TEMPLATES:"),
        (
            "ENRICHER_LINK_TEMPLATES",
            '{"onboarding-started.console": "https://x/{org_id}"}',
            "unknown link 'onboarding-started.console'",
        ),
        (
            "ENRICHER_LINK_TEMPLATES",
            '{"onboarding-started.crm": "https://x/{cluster_id}"}',
            "uses unknown fields ['cluster_id']",
        ),
        (
            "ENRICHER_LINK_TEMPLATES",
            '{"onboarding-started.crm": "crm://x/{org_id}"}',
            "must start with https://",
        ),
        ("ENRICHER_DEDUP_WINDOW_S", "-1", "ENRICHER_DEDUP_WINDOW_S:"),
        ("ENRICHER_PARK_TTL_S", "soon", "ENRICHER_PARK_TTL_S:"),
        ("ENRICHER_DEDUP_WINDOWS_S", '{"nope": 60}', "unknown pipeline 'nope'"),
        ("ENRICHER_DEDUP_WINDOWS_S", '{"onboarding-started": -5}', "must be >= 0"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        EnricherSettings()
    line = describe_validation_error(info.value, "ENRICHER_")
    assert line.startswith("invalid settings: ") and expected in line


def test_cli_exits_2_with_one_line_for_a_bad_setting() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.enricher"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
            "ENRICHER_PROCESSING_GUARANTEE": "maybe",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("enricher: invalid settings: ENRICHER_PROCESSING_GUARANTEE")


def test_help_lists_enricher_settings() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.enricher", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for name in (
        "ENRICHER_GROUP_ID",
        "ENRICHER_STATE_DIR",
        "ENRICHER_FALLBACK_CHANNEL",
        "ENRICHER_PROCESSING_GUARANTEE",
        "ENRICHER_TRANSACTIONAL_ID",
        "ENRICHER_LINK_TEMPLATES",
        "TOPIC_DATA_NOTIFICATIONS_PIPELINE",
        "KAFKA_BOOTSTRAP_SERVERS",
    ):
        assert name in proc.stdout


def test_group_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EnricherSettings().group_instance_id is None
    monkeypatch.setenv("ENRICHER_GROUP_INSTANCE_ID", "")
    assert EnricherSettings().group_instance_id is None
    monkeypatch.setenv("ENRICHER_GROUP_INSTANCE_ID", "enricher-7d9f-abcde")
    assert EnricherSettings().group_instance_id == "enricher-7d9f-abcde"


def test_lifecycle_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.enricher.app import lifecycle_config
    from services.enricher.pipelines import PIPELINES

    s = EnricherSettings()
    assert (s.dedup_window_s, s.park_ttl_s) == (3600.0, 3600.0)
    assert lifecycle_config(s, PIPELINES) is not None
    monkeypatch.setenv("ENRICHER_DEDUP_WINDOW_S", "600")
    monkeypatch.setenv("ENRICHER_DEDUP_WINDOWS_S", '{"onboarding-started": 0}')
    monkeypatch.setenv("ENRICHER_PARK_TTL_S", "0")
    s = EnricherSettings()
    assert s.dedup_window("connector-provisioning-failed") == 600.0
    assert s.dedup_window("onboarding-started") == 0.0
    config = lifecycle_config(s, PIPELINES)
    assert config is not None
    assert dict(config.windows_ms) == {"connector-provisioning-failed": 600_000}
    assert config.park_ttl_ms == 0
    # grouping and parking both off: no state stores at all (the loop runs as before)
    monkeypatch.setenv("ENRICHER_DEDUP_WINDOW_S", "0")
    assert lifecycle_config(EnricherSettings(), PIPELINES) is None
