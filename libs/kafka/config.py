"""librdkafka client configuration from a plain settings model.

Only this module turns settings into librdkafka property dicts, so every client of every
service gets the same security, reliability and naming defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from libs.kafka.logs import LibrdkafkaLogger

SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"]


class KafkaSettings(BaseModel):
    """Connection settings shared by every client of a service."""

    bootstrap_servers: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    client_id: str = "field-alerts"

    def client_config(self) -> dict[str, Any]:
        """Properties every client (admin, consumer, producer) needs.

        ``logger`` routes librdkafka's own log lines through Python logging (the JSON
        handler), delivered when the client is polled; see ``libs.kafka.logs``.
        """
        secrets = [self.sasl_password.get_secret_value()] if self.sasl_password else []
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
            "logger": LibrdkafkaLogger(secrets=secrets),
        }
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_username is not None:
                conf["sasl.username"] = self.sasl_username
            if self.sasl_password is not None:
                conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location and self.security_protocol.endswith("SSL"):
            conf["ssl.ca.location"] = self.ssl_ca_location
        return conf

    def consumer_config(
        self,
        group_id: str | None,
        *,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        read_committed: bool = True,
        **overrides: Any,
    ) -> dict[str, Any]:
        """A consumer that never auto-commits: offsets move only at checkpoints.

        ``group_id=None`` gives a group-less consumer for ``assign()``-only use (global tables);
        librdkafka still wants a ``group.id``-free config there, so none is set.
        """
        conf = self.client_config()
        conf.update(
            {
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": auto_offset_reset,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
                "enable.partition.eof": False,
            }
        )
        if group_id is not None:
            conf["group.id"] = group_id
            conf["partition.assignment.strategy"] = "cooperative-sticky"
        conf.update(overrides)
        return conf

    def producer_config(
        self, *, transactional_id: str | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """An idempotent producer with ``acks=all``; transactional when an id is given."""
        conf = self.client_config()
        conf.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
            }
        )
        if transactional_id is not None:
            conf["transactional.id"] = transactional_id
        conf.update(overrides)
        return conf

    def masked(self) -> dict[str, Any]:
        """The effective connection config for a start-up log line, secrets masked."""
        conf = self.client_config()
        del conf["logger"]
        if "sasl.password" in conf:
            conf["sasl.password"] = "********"
        return conf
