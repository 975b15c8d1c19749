"""Client configs: reliability defaults, security settings, secrets masked."""

from __future__ import annotations

from pydantic import SecretStr

from libs.kafka import KafkaSettings, TopicSpec, dlq_headers


def test_consumer_never_autocommits_and_reads_committed() -> None:
    conf = KafkaSettings(bootstrap_servers="b:9092").consumer_config("g")
    assert conf["enable.auto.commit"] is False
    assert conf["isolation.level"] == "read_committed"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["auto.offset.reset"] == "earliest"


def test_group_less_consumer_has_no_group() -> None:
    conf = KafkaSettings(bootstrap_servers="b:9092").consumer_config(None)
    assert "group.id" not in conf


def test_producer_is_idempotent_with_acks_all() -> None:
    conf = KafkaSettings(bootstrap_servers="b:9092").producer_config(transactional_id="t-1")
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["transactional.id"] == "t-1"


def test_sasl_ssl_config_and_masking() -> None:
    s = KafkaSettings(
        bootstrap_servers="pkc:9092",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="KEY",
        sasl_password=SecretStr("s3cr3t-value"),
    )
    conf = s.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.username"] == "KEY"
    assert conf["sasl.password"] == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(s)
    assert "s3cr3t-value" not in str(s.masked())


def test_topic_spec_cleanup_policy() -> None:
    assert TopicSpec("a", 6, 3, compacted=True).topic_config()["cleanup.policy"] == "compact"
    assert TopicSpec("b", 6, 3).topic_config()["cleanup.policy"] == "delete"


def test_dlq_headers_are_the_contract_headers() -> None:
    headers = dict(
        dlq_headers(
            service="enricher", error=ValueError("bad"), source_topic="t", partition=2, offset=17
        )
    )
    assert headers == {
        "dlq.error.class": b"builtins.ValueError",
        "dlq.error.message": b"bad",
        "dlq.source.topic": b"t",
        "dlq.source.partition": b"2",
        "dlq.source.offset": b"17",
        "dlq.service": b"enricher",
    }
