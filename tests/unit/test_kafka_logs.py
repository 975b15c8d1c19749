"""librdkafka's log lines come out as JSON records of the configured handler, secrets masked.

The client tests use real clients pointed at a closed loopback port: librdkafka then logs a
connection-refused line at syslog level 3, which must arrive, on poll, as an ERROR record.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from pydantic import SecretStr

from libs.kafka import KafkaSettings
from libs.kafka.logs import LOGGER_NAME, LibrdkafkaLogger
from libs.runtime import configure_logging
from tests.support.net import free_port


@pytest.fixture
def json_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Root logging configured as the services do it (JSON), into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buf = io.StringIO()
    configure_logging("DEBUG", json_format=True, stream=buf)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buf.getvalue().splitlines()]

    try:
        yield lines
    finally:
        root.handlers[:], root.level = saved


def _poll_until(
    poll: Callable[[], object], lines: Callable[[], list[dict[str, Any]]], what: str
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        poll()
        found = [r for r in lines() if r["logger"] == LOGGER_NAME and what in r["msg"]]
        if found:
            return found
    raise AssertionError(f"no librdkafka line containing {what!r}; got {lines()}")


def _closed_port_settings(**kw: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", **kw)


def test_adapter_keeps_level_and_splits_the_line(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    adapter = LibrdkafkaLogger()
    adapter.log(
        logging.WARNING,
        "%s [%s] %s",
        "REQTMOUT",
        "rdkafka#consumer-3",
        "[thrd:localhost:9092/1]: Timed out 1 in-flight request",
    )
    (rec,) = json_lines()
    assert rec["level"] == "WARNING"
    assert rec["logger"] == LOGGER_NAME
    assert rec["msg"] == "Timed out 1 in-flight request"
    assert rec["facility"] == "REQTMOUT"
    assert rec["client"] == "rdkafka#consumer-3"
    assert rec["kafka_thread"] == "localhost:9092/1"


def test_adapter_masks_secrets_and_hides_them_from_repr(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    adapter = LibrdkafkaLogger(secrets=["hunter2-pw"])
    adapter.log(logging.ERROR, "%s [%s] %s", "SASL", "c", "login hunter2-pw failed")
    adapter.log(logging.ERROR, "odd shape %s", "hunter2-pw")
    assert [r["msg"] for r in json_lines()] == ["login ******** failed", "odd shape ********"]
    assert "hunter2-pw" not in repr(adapter)


def test_adapter_respects_the_logger_level(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    logging.getLogger(LOGGER_NAME).setLevel(logging.INFO)
    try:
        LibrdkafkaLogger().log(logging.DEBUG, "%s [%s] %s", "CONF", "c", "debug line")
        LibrdkafkaLogger().log(logging.INFO, "%s [%s] %s", "CONF", "c", "info line")
    finally:
        logging.getLogger(LOGGER_NAME).setLevel(logging.NOTSET)
    assert [r["msg"] for r in json_lines()] == ["info line"]


def test_producer_connection_refused_is_a_json_error_record(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    producer = Producer(_closed_port_settings().producer_config())
    producer.produce("t", b"v")
    found = _poll_until(lambda: producer.poll(0.1), json_lines, "Connection refused")
    # syslog level 3 (error) -> ERROR
    assert found[0]["level"] == "ERROR"
    assert found[0]["facility"] == "FAIL"
    assert found[0]["client"].startswith("field-alerts#producer-")
    producer.purge()


def test_consumer_lines_arrive_on_poll(json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    consumer = Consumer(_closed_port_settings().consumer_config("g"))
    try:
        consumer.subscribe(["t"])
        found = _poll_until(lambda: consumer.poll(0.1), json_lines, "Connection refused")
        assert found[0]["level"] == "ERROR"
    finally:
        consumer.close()


def test_admin_lines_arrive_on_poll(json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    admin = AdminClient(_closed_port_settings().client_config())
    found = _poll_until(lambda: admin.poll(0.1), json_lines, "Connection refused")
    assert "#producer-" in found[0]["client"]  # librdkafka's admin client is a producer


def test_debug_config_dump_is_debug_level_and_never_shows_the_password(
    json_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    settings = _closed_port_settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_username="api-key",
        sasl_password=SecretStr("s3cr3t-pw-value"),
    )
    producer = Producer(settings.producer_config(debug="conf,security,broker"))
    found = _poll_until(lambda: producer.poll(0.1), json_lines, "sasl.password")
    # syslog level 7 (debug) -> DEBUG
    assert found[0]["level"] == "DEBUG"
    _poll_until(lambda: producer.poll(0.1), json_lines, "Connection refused")
    everything = json.dumps(json_lines())
    assert "s3cr3t-pw-value" not in everything
    assert "sasl.password = [redacted]" in everything
