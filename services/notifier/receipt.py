"""``python -m services.notifier receipt MESSAGE_ID``: the delivery receipt of one message.

Reads the compacted receipts topic with a plain group-less consumer (``read_to_end``), not
the notifier's RocksDB table: the command must work from any machine, without a state
directory, while the notifier runs. Receipts are keyed by ``message_id``, so every receipt of
a message is in one partition and the one with the highest offset is the current one (a
FAILED attempt can be followed by a DELIVERED one; a null value deletes).

Why a scan of every partition and not only the key's: the partition is the producer's
partitioner's choice (librdkafka's CRC32 today), which the reader would have to replicate
exactly; compaction keeps the topic at one record per message, so the full read stays cheap
and cannot miss a receipt written by another partitioner.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, Message
from pydantic_settings import BaseSettings

from libs.kafka import TopicError, read_to_end
from libs.serde import AvroDeserializer, SlackDeliveryReceipt
from services.common.cli import env_help
from services.common.settings import CommonSettings, TopicSettings
from services.common.tool import EXIT_NOT_FOUND, EXIT_OK, run_tool, say, write

log = logging.getLogger(__name__)

PROG = "python -m services.notifier receipt"
CLIENT_ID = "notifier-receipt"


@dataclass(frozen=True)
class Lookup:
    """How a search of the receipts topic ended.

    ``partition``/``offset``/``value`` are those of the newest record of the message id, or
    ``None`` when there is none; a found record with ``value`` None is a deletion.
    """

    scanned: int
    partition: int | None = None
    offset: int | None = None
    value: bytes | None = None

    @property
    def found(self) -> bool:
        return self.partition is not None


def find_latest(
    consumer: Consumer,
    topic: str,
    message_id: str,
    *,
    timeout_s: float,
    on_progress: Callable[[int], None] | None = None,
    progress_interval_s: float = 2.0,
) -> Lookup:
    """The newest record keyed ``message_id`` in ``topic``, read to its end."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        # read_to_end would wait its whole timeout for a topic that may yet appear
        raise TopicError(f"topic {topic} does not exist (check TOPIC_SLACK_MESSAGE_RECEIPTS)")
    key = message_id.encode("utf-8")
    latest: Message | None = None
    scanned = 0
    last_report = time.monotonic()
    for msg in read_to_end(consumer, topic, timeout_s=timeout_s):
        scanned += 1
        if msg.key() == key:
            latest = msg
        if on_progress and time.monotonic() - last_report >= progress_interval_s:
            on_progress(scanned)
            last_report = time.monotonic()
    if latest is None:
        return Lookup(scanned)
    return Lookup(
        scanned,
        partition=int(latest.partition() or 0),
        offset=int(latest.offset() or 0),
        value=latest.value(),
    )


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=PROG,
        description="Print the delivery receipt of one message from the receipts topic "
        "(status, channel, Slack ts, attempts, error). Exits 1 when the message has no receipt.",
        epilog="example:\n  "
        + PROG
        + " 3f9c2a...e1\n\nsettings (environment variables):\n"
        + env_help(CommonSettings, TopicSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.notifier receipt``."""
    parser = _parser()
    parser.add_argument("message_id", metavar="MESSAGE_ID", help="SlackMessage.message_id")
    parser.add_argument("--json", action="store_true", help="print the receipt as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up reading the receipts topic after S seconds (default 60)",
    )
    return run_tool(
        prog=PROG,
        parser=parser,
        settings_models=[CommonSettings, TopicSettings],
        run=_run,
        argv=argv,
    )


def _run(args: argparse.Namespace, loaded: list[BaseSettings]) -> int:
    common, topics = loaded
    assert isinstance(common, CommonSettings) and isinstance(topics, TopicSettings)
    topic = topics.slack_message_receipts
    # librdkafka wants a group.id even for assign()-only use; this consumer never joins it
    conf = common.kafka(CLIENT_ID).consumer_config(None)
    conf["group.id"] = f"{CLIENT_ID}-nogroup"
    consumer = Consumer(conf)
    try:
        found = find_latest(
            consumer,
            topic,
            args.message_id,
            timeout_s=args.timeout,
            on_progress=lambda n: log.info(
                "reading receipts", extra={"topic": topic, "scanned": n}
            ),
        )
    finally:
        consumer.close()
    if found.value is None or found.partition is None or found.offset is None:
        what = "was deleted (tombstone)" if found.found else "has no receipt"
        say(PROG, f"message {args.message_id} {what} in {topic} ({found.scanned} records read)")
        return EXIT_NOT_FOUND
    registry = common.registry()
    try:
        receipt = AvroDeserializer(registry, SlackDeliveryReceipt)(
            found.value, topic=topic, partition=found.partition, offset=found.offset
        )
    finally:
        registry.close()
    fields = {
        "message_id": receipt.message_id,
        "status": receipt.status,
        "channel": receipt.channel,
        "slack_ts": receipt.slack_ts,
        "attempts": receipt.attempts,
        "error": receipt.error,
        "delivered_at": receipt.delivered_at.isoformat(timespec="milliseconds"),
        "partition": found.partition,
        "offset": found.offset,
    }
    if args.json:
        write(json.dumps(fields))
    else:
        for name, value in fields.items():
            write(f"{name:<13}{'-' if value is None else value}")
    return EXIT_OK
