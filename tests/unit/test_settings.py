"""Shared settings: env names of CONTRACT.md, one clear line for a bad setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.cli import describe_validation_error, env_help
from services.common.settings import CommonSettings, TopicSettings

ROOT = Path(__file__).resolve().parents[2]


def test_reads_contract_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "pw-123")
    monkeypatch.setenv("TOPIC_SLACK_MESSAGES", "custom-messages")
    monkeypatch.setenv("TOPIC_PARTITIONS", "12")
    common = CommonSettings()
    topics = TopicSettings()
    assert common.kafka("x").bootstrap_servers == "127.0.0.1:9092"
    assert "pw-123" not in repr(common)
    assert topics.slack_messages == "custom-messages"
    assert topics.partitions == 12
    assert topics.replication_factor == 3


def test_missing_required_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://r")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    assert describe_validation_error(info.value) == (
        "invalid settings: KAFKA_BOOTSTRAP_SERVERS is required but not set"
    )


def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPIC_PARTITIONS", "zero")
    with pytest.raises(ValidationError) as info:
        TopicSettings()
    line = describe_validation_error(info.value, "TOPIC_")
    assert line.startswith("invalid settings: TOPIC_PARTITIONS:")
    assert "'zero'" in line


def test_every_contract_topic_has_its_cleanup_policy() -> None:
    specs = {s.name: s for s in TopicSettings().all_specs()}
    compacted = {n for n, s in specs.items() if s.compacted}
    assert compacted == {
        "data-csdr-assignment",
        "data-slack-users",
        "slack-message-receipts",
        "producer-cursors",
    }
    assert "data-notifications-pipeline.dlq" in specs
    assert "onboarding-events.dlq" in specs
    assert all(s.partitions == 6 for s in specs.values())


def test_help_lists_settings_with_defaults() -> None:
    text = env_help(CommonSettings, TopicSettings)
    assert "KAFKA_BOOTSTRAP_SERVERS" in text and "required" in text
    assert "TOPIC_SLACK_MESSAGES" in text and "'slack-messages'" in text


@pytest.fixture
def required_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
        "SCHEMA_REGISTRY_TIMEOUT_S",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081")
    return monkeypatch


@pytest.mark.parametrize(
    "value",
    ["notaurl", "127.0.0.1:8081", "ftp://registry:8081", "http://", "https:registry", " "],
)
def test_registry_url_must_be_http_with_a_host(
    required_env: pytest.MonkeyPatch, value: str
) -> None:
    required_env.setenv("SCHEMA_REGISTRY_URL", value)
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    line = describe_validation_error(info.value, model=CommonSettings)
    assert line.startswith("invalid settings: SCHEMA_REGISTRY_URL: must be an http(s) URL")


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        ("https://psrc-x.confluent.cloud", "https://psrc-x.confluent.cloud"),
        ("http://r:8080/apis/ccompat/v7", "http://r:8080/apis/ccompat/v7"),
        ("http://a:8081, http://b:8081", "http://a:8081,http://b:8081"),
    ],
)
def test_registry_url_accepts_http_urls(
    required_env: pytest.MonkeyPatch, value: str, parsed: str
) -> None:
    required_env.setenv("SCHEMA_REGISTRY_URL", value)
    assert CommonSettings().schema_registry_url == parsed


def test_registry_url_with_credentials_is_refused_without_echoing_them(
    required_env: pytest.MonkeyPatch,
) -> None:
    required_env.setenv("SCHEMA_REGISTRY_URL", "https://key:s3cr3t@registry.example")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    line = describe_validation_error(info.value, model=CommonSettings)
    assert "SCHEMA_REGISTRY_URL: must not hold credentials" in line
    assert "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in line
    assert "s3cr3t" not in line and "key:" not in line


@pytest.mark.parametrize("model", [None, CommonSettings])
def test_user_info_without_colon_is_named_and_not_echoed(
    required_env: pytest.MonkeyPatch, model: type[CommonSettings] | None
) -> None:
    required_env.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "s3cr3t-no-colon")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    line = describe_validation_error(info.value, model=model)
    assert line.startswith("invalid settings: SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO: must be key:")
    assert "s3cr3t" not in line


def test_user_info_with_colon_is_accepted(required_env: pytest.MonkeyPatch) -> None:
    required_env.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "key:s3cr3t")
    common = CommonSettings()
    assert common.schema_registry_basic_auth_user_info is not None
    assert "s3cr3t" not in repr(common)


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_without_username_names_it(required_env: pytest.MonkeyPatch, protocol: str) -> None:
    required_env.setenv("KAFKA_SECURITY_PROTOCOL", protocol)
    required_env.setenv("KAFKA_SASL_PASSWORD", "pw-123")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    assert describe_validation_error(info.value, model=CommonSettings) == (
        f"invalid settings: KAFKA_SASL_USERNAME: must be set when "
        f"KAFKA_SECURITY_PROTOCOL={protocol}"
    )


@pytest.mark.parametrize("username", [None, ""])
def test_sasl_without_credentials_names_both(
    required_env: pytest.MonkeyPatch, username: str | None
) -> None:
    required_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    if username is not None:
        required_env.setenv("KAFKA_SASL_USERNAME", username)
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    line = describe_validation_error(info.value, model=CommonSettings)
    assert "KAFKA_SASL_USERNAME: must be set" in line
    assert "KAFKA_SASL_PASSWORD: must be set" in line


def test_sasl_with_credentials_and_plaintext_without_are_accepted(
    required_env: pytest.MonkeyPatch,
) -> None:
    assert CommonSettings().kafka_sasl_username is None  # PLAINTEXT needs none
    required_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    required_env.setenv("KAFKA_SASL_USERNAME", "key")
    required_env.setenv("KAFKA_SASL_PASSWORD", "pw-123")
    assert CommonSettings().kafka("x").sasl_username == "key"


def test_registry_timeout_default_is_passed_to_the_client(
    required_env: pytest.MonkeyPatch,
) -> None:
    common = CommonSettings()
    assert common.schema_registry_timeout_s == 10.0
    required_env.setenv("SCHEMA_REGISTRY_TIMEOUT_S", "2.5")
    registry = CommonSettings().registry()
    try:
        assert registry.timeout_s == 2.5
    finally:
        registry.close()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_registry_timeout_is_named(required_env: pytest.MonkeyPatch, value: str) -> None:
    required_env.setenv("SCHEMA_REGISTRY_TIMEOUT_S", value)
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    assert describe_validation_error(info.value).startswith(
        "invalid settings: SCHEMA_REGISTRY_TIMEOUT_S:"
    )


def test_model_level_error_does_not_echo_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.notifier.settings import NotifierSettings

    monkeypatch.setenv("NOTIFIER_SLACK_BOT_TOKEN", "xoxb-s3cr3t")
    monkeypatch.setenv("NOTIFIER_BACKOFF_BASE_S", "5")
    monkeypatch.setenv("NOTIFIER_BACKOFF_MAX_S", "1")
    with pytest.raises(ValidationError) as info:
        NotifierSettings()
    line = describe_validation_error(info.value, "NOTIFIER_", model=NotifierSettings)
    assert "NOTIFIER_BACKOFF_MAX_S must be >=" in line
    assert "s3cr3t" not in line


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "s3cr3t-no-colon"}, "SCHEMA_REGISTRY_BASIC_AUTH"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PASSWORD": "pw"},
            "KAFKA_SASL_USERNAME",
        ),
        ({"NOTIFIER_SLACK_API_URL": "notaurl"}, "NOTIFIER_SLACK_API_URL"),
        ({"SCHEMA_REGISTRY_URL": "notaurl"}, "SCHEMA_REGISTRY_URL"),
        ({"SCHEMA_REGISTRY_URL": "http://"}, "SCHEMA_REGISTRY_URL"),
    ],
    ids=["user-info", "sasl-username", "slack-url", "registry-url", "registry-url-no-host"],
)
def test_notifier_cli_exits_2_with_one_line(env: dict[str, str], named: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.notifier"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"notifier: invalid settings: {named}")
    assert "s3cr3t" not in line
