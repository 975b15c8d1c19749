"""The notifier's settings: CONTRACT names and defaults, dry-run, masking, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.cli import describe_validation_error
from services.notifier.core import RetryPolicy
from services.notifier.settings import NotifierSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NOTIFIER_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = NotifierSettings()
    assert s.group_id == "notifier"
    assert s.state_dir == Path("state/notifier")
    assert s.slack_api_url == "https://slack.com/api/"
    assert s.rate_per_channel_per_s == 1.0
    assert s.dry_run is True
    assert s.retry_policy() == RetryPolicy(8, 1.0, 60.0, 60.0, 20.0)


def test_history_check_settings_go_into_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_HISTORY_MARGIN_S", "5")
    monkeypatch.setenv("NOTIFIER_HISTORY_SETTLE_S", "7.5")
    policy = NotifierSettings().retry_policy()
    assert (policy.history_margin_s, policy.history_settle_s) == (5.0, 7.5)
    monkeypatch.setenv("NOTIFIER_HISTORY_SETTLE_S", "-1")
    with pytest.raises(ValidationError) as info:
        NotifierSettings()
    assert "NOTIFIER_HISTORY_SETTLE_S" in describe_validation_error(info.value, "NOTIFIER_")


def test_update_wait_goes_into_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NotifierSettings().retry_policy().update_wait_s == 900.0
    monkeypatch.setenv("NOTIFIER_UPDATE_WAIT_S", "120")
    assert NotifierSettings().retry_policy().update_wait_s == 120.0
    monkeypatch.setenv("NOTIFIER_UPDATE_WAIT_S", "0")
    with pytest.raises(ValidationError) as info:
        NotifierSettings()
    assert "NOTIFIER_UPDATE_WAIT_S" in describe_validation_error(info.value, "NOTIFIER_")


def test_token_means_live_and_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_SLACK_BOT_TOKEN", "xoxb-secret-123")
    monkeypatch.setenv("NOTIFIER_SLACK_API_URL", "http://127.0.0.1:9/api/")
    monkeypatch.setenv("NOTIFIER_RATE_PER_CHANNEL_PER_S", "2.5")
    s = NotifierSettings()
    assert s.dry_run is False
    assert s.rate_per_channel_per_s == 2.5
    assert "xoxb-secret-123" not in repr(s)
    assert "xoxb-secret-123" not in str(s.masked())
    assert s.masked()["slack_bot_token"] == "********"
    assert s.masked()["dry_run"] is False


def test_empty_token_is_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_SLACK_BOT_TOKEN", "")
    assert NotifierSettings().dry_run is True


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("NOTIFIER_CONCURRENCY", "0", "NOTIFIER_CONCURRENCY"),
        ("NOTIFIER_RATE_PER_CHANNEL_PER_S", "fast", "NOTIFIER_RATE_PER_CHANNEL_PER_S"),
        ("NOTIFIER_SLACK_TIMEOUT_S", "-1", "NOTIFIER_SLACK_TIMEOUT_S"),
        ("NOTIFIER_BACKOFF_MAX_S", "0.5", "NOTIFIER_BACKOFF_MAX_S"),
    ],
)
def test_invalid_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        NotifierSettings()
    assert named in describe_validation_error(info.value, "NOTIFIER_")


@pytest.mark.parametrize(
    "value", ["notaurl", "slack.com/api/", "ftp://slack.com/api/", "https://", "http:///api/"]
)
def test_slack_api_url_must_be_http_with_a_host(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NOTIFIER_SLACK_API_URL", value)
    with pytest.raises(ValidationError) as info:
        NotifierSettings()
    line = describe_validation_error(info.value, "NOTIFIER_")
    assert line.startswith("invalid settings: NOTIFIER_SLACK_API_URL: ")
    assert "http(s) URL with a host" in line


@pytest.mark.parametrize("value", ["http://127.0.0.1:8099/api/", "https://slack.com/api/"])
def test_slack_api_url_accepts_http_urls(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFIER_SLACK_API_URL", value)
    assert NotifierSettings().slack_api_url == value


def test_group_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NotifierSettings().group_instance_id is None
    monkeypatch.setenv("NOTIFIER_GROUP_INSTANCE_ID", " ")
    assert NotifierSettings().group_instance_id is None
    monkeypatch.setenv("NOTIFIER_GROUP_INSTANCE_ID", "notifier-7d9f-abcde")
    assert NotifierSettings().group_instance_id == "notifier-7d9f-abcde"
