"""Settings every service shares, read from the environment once, at start.

Shared settings have no prefix (``KAFKA_BOOTSTRAP_SERVERS``, ``TOPIC_SLACK_MESSAGES``); each
service adds its own ``BaseSettings`` with its prefix (``ENRICHER_...``).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.kafka import KafkaSettings, SecurityProtocol, TopicSpec
from libs.serde import ConfluentSchemaRegistry


class CommonSettings(BaseSettings):
    """Kafka, schema registry, metrics and logging settings of every service."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = Field(min_length=1, description="host:port[,host:port]")
    kafka_security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SASL_SSL (Confluent Cloud), SASL_PLAINTEXT, SSL",
    )
    kafka_sasl_mechanism: str = Field(default="PLAIN", description="PLAIN, SCRAM-SHA-512, ...")
    kafka_sasl_username: str | None = Field(
        default=None, validate_default=True, description="API key with SASL"
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, validate_default=True, description="API secret"
    )
    kafka_ssl_ca_location: str | None = Field(
        default=None, description="CA bundle for TLS (system CAs when unset)"
    )
    schema_registry_url: str = Field(
        min_length=1, description="Confluent-compatible API (Apicurio: .../apis/ccompat/v7)"
    )
    schema_registry_basic_auth_user_info: SecretStr | None = Field(
        default=None, description="key:secret for the registry"
    )
    schema_registry_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "HTTP timeout of one registry request (up to 2 retries, 0.5-2 s apart, follow a "
            "failed one)"
        ),
    )
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 disables"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field(default="json", description="json or text")

    @field_validator("kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _sasl_needs_credentials(
        cls, value: str | SecretStr | None, info: ValidationInfo
    ) -> str | SecretStr | None:
        # Without them librdkafka only fails later, at the first connection, with an
        # authentication error far from the setting that causes it.
        protocol = str(info.data.get("kafka_security_protocol", ""))
        if protocol.startswith("SASL"):
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            if raw is None or not raw.strip():
                raise PydanticCustomError(
                    "sasl_credentials_missing",
                    "must be set when KAFKA_SECURITY_PROTOCOL={protocol}",
                    {"protocol": protocol},
                )
        return value

    @field_validator("schema_registry_url")
    @classmethod
    def _registry_url_is_http(cls, value: str) -> str:
        # The registry client only checks that the value starts with "http": anything else
        # fails at start with a traceback, and "http://" or "https:host" pass it and fail at
        # the first request, which the service waits on forever as "registry unavailable".
        # The client accepts a comma-separated list of URLs: each one is checked.
        urls = [u.strip() for u in value.split(",")]
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise PydanticCustomError(
                    "registry_url",
                    "must be an http(s) URL with a host, e.g. http://registry:8081 "
                    "(several: comma-separated)",
                )
            if parts.username is not None or parts.password is not None:
                # The URL is logged; credentials belong in their secret setting.
                raise PydanticCustomError(
                    "registry_url_credentials",
                    "must not hold credentials: set SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                )
        return ",".join(urls)

    @field_validator("schema_registry_basic_auth_user_info")
    @classmethod
    def _user_info_is_key_colon_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The registry client raises a bare ValueError (a traceback) on a value without ':'.
        # The message never repeats the value: it is a secret.
        if value is not None and ":" not in value.get_secret_value():
            raise PydanticCustomError("user_info_format", "must be key:secret (no ':' found)")
        return value

    def kafka(self, client_id: str) -> KafkaSettings:
        """The library model for client configs."""
        return KafkaSettings(
            bootstrap_servers=self.kafka_bootstrap_servers,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password,
            ssl_ca_location=self.kafka_ssl_ca_location,
            client_id=client_id,
        )

    def registry(self) -> ConfluentSchemaRegistry:
        """A schema registry client."""
        auth = self.schema_registry_basic_auth_user_info
        return ConfluentSchemaRegistry(
            self.schema_registry_url,
            auth.get_secret_value() if auth else None,
            timeout_s=self.schema_registry_timeout_s,
        )


class TopicSettings(BaseSettings):
    """Topic names (``TOPIC_<NAME>``) and how the project creates topics."""

    model_config = SettingsConfigDict(env_prefix="TOPIC_", extra="ignore", frozen=True)

    data_notifications_pipeline: str = "data-notifications-pipeline"
    onboarding_events: str = "onboarding-events"
    data_csdr_assignment: str = "data-csdr-assignment"
    data_slack_users: str = "data-slack-users"
    slack_messages: str = "slack-messages"
    slack_message_receipts: str = "slack-message-receipts"
    slack_message_attempts: str = Field(
        default="slack-message-attempts",
        description="compacted in-doubt markers of the notifier (posts started, outcome unknown)",
    )
    producer_cursors: str = "producer-cursors"
    dlq_redrives: str = Field(
        default="dlq-redrives",
        description="compacted ledger of re-driven dead letters (python -m services.dlq)",
    )
    partitions: int = Field(default=6, ge=1, description="partitions of topics the project creates")
    replication_factor: int = Field(
        default=3, ge=1, description="replicas of topics the project creates (local stack: 1)"
    )

    def spec(
        self, name: str, *, compacted: bool = False, partitions: int | None = None
    ) -> TopicSpec:
        """A ``TopicSpec`` for ``name`` with the configured partitions and replication."""
        return TopicSpec(
            name=name,
            partitions=partitions or self.partitions,
            replication_factor=self.replication_factor,
            compacted=compacted,
        )

    def all_specs(self) -> list[TopicSpec]:
        """Every topic of CONTRACT.md with its cleanup policy, dead-letter topics included."""
        compacted = [
            self.data_csdr_assignment,
            self.data_slack_users,
            self.slack_message_receipts,
            self.producer_cursors,
        ]
        streams = [self.data_notifications_pipeline, self.onboarding_events, self.slack_messages]
        # Every topic a service consumes has a dead-letter topic; the producer's cursor topic
        # is only read back by the producer itself, which fails loudly instead.
        consumed = streams + compacted[:3]
        return (
            [self.spec(t) for t in streams]
            + [self.spec(t, compacted=True) for t in compacted]
            + [self.spec(t + ".dlq") for t in consumed]
        )
