"""Shared settings: env names of CONTRACT.md, one clear line for a bad setting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.cli import describe_validation_error, env_help
from services.common.settings import CommonSettings, TopicSettings


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
