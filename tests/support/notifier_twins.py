"""The notifier's sink loop wired to in-memory twins: Kafka, Slack, receipts table, markers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from libs.kafka.memory import InMemoryBroker
from libs.serde import DeserializationError, SlackDeliveryReceipt, SlackMessage
from services.notifier.core import RetryPolicy
from services.notifier.markers import InMemoryAttemptLog
from services.notifier.sink import SinkConfig, SinkLoop, SinkStats
from services.notifier.slack import FakeNotifier

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
TOPIC, RECEIPTS, DLQ = "slack-messages", "slack-message-receipts", "slack-messages.dlq"


def encode_message(m: SlackMessage) -> bytes:
    return json.dumps(
        {
            "message_id": m.message_id,
            "pipeline": m.pipeline,
            "channel": m.channel,
            "text": m.text,
            "blocks": m.blocks,
            "org_id": m.org_id,
            "source_event_id": m.source_event_id,
            "update_of": m.update_of,
        }
    ).encode()


def decode_message(value: bytes | None, topic: str, partition: int, offset: int) -> SlackMessage:
    try:
        data = json.loads(value or b"")
        return SlackMessage(created_at=T0, **data)
    except (ValueError, TypeError) as exc:
        raise DeserializationError(
            "not a message", topic=topic, partition=partition, offset=offset
        ) from exc


def encode_receipt(r: SlackDeliveryReceipt) -> bytes:
    return json.dumps(
        {
            "message_id": r.message_id,
            "channel": r.channel,
            "status": r.status,
            "attempts": r.attempts,
            "slack_ts": r.slack_ts,
            "error": r.error,
        }
    ).encode()


def decode_receipt(value: bytes) -> SlackDeliveryReceipt:
    return SlackDeliveryReceipt(delivered_at=T0, **json.loads(value))


class MemoryReceiptTable:
    """The receipts topic of the twin broker as a lookup table (``ReceiptTable``).

    Like a ``GlobalTable`` it has a position per partition; ``hold()`` stops it reading (a
    table behind the topic) until ``release()``.
    """

    def __init__(self, broker: InMemoryBroker) -> None:
        self._broker = broker
        self._rows: dict[str, SlackDeliveryReceipt] = {}
        self._positions: dict[int, int] = {}
        self.on_change: Callable[[list[bytes]], None] | None = None
        self._held = False
        self._lock = threading.Lock()

    def get(self, key: str) -> SlackDeliveryReceipt | None:
        with self._lock:
            return self._rows.get(key)

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False

    def poll(self, max_records: int = 1000, timeout_s: float = 0.0) -> int:
        if self._held:
            return 0
        keys: list[bytes] = []
        records = self._broker.records(RECEIPTS)
        with self._lock:
            for r in records:
                p, offset = int(r.partition() or 0), int(r.offset() or 0)
                if offset < self._positions.get(p, 0):
                    continue
                key = bytes(r.key() or b"")
                self._rows[key.decode()] = decode_receipt(bytes(r.value() or b""))
                self._positions[p] = offset + 1
                keys.append(key)
        if keys and self.on_change is not None:
            self.on_change(keys)
        applied = len(keys)
        return 0 if applied < max_records else applied

    def positions(self) -> dict[int, int]:
        with self._lock:
            return dict(self._positions)

    def high_watermarks(self, timeout_s: float = 10.0) -> dict[int, int]:
        return {
            p: self._broker.end_offset(RECEIPTS, p)
            for p in range(self._broker.partitions(RECEIPTS))
        }

    def caught_up_to(self, marks: Mapping[int, int]) -> bool:
        with self._lock:
            return all(self._positions.get(p, 0) >= mark for p, mark in marks.items())


def message(i: int, channel: str) -> SlackMessage:
    return SlackMessage(
        message_id=f"m{i}",
        pipeline="p1",
        channel=channel,
        text=f"alert {i}",
        blocks="[]",
        org_id="org-1",
        source_event_id=f"ev-{i}",
        created_at=T0,
    )


def update(i: int, of: int, channel: str, n: int = 1) -> SlackMessage:
    """The ``n``-th update ``m<of>-u<n>`` of message ``m<of>`` (``i`` numbers its event)."""
    return SlackMessage(
        message_id=f"m{of}-u{n}",
        pipeline="p1",
        channel=channel,
        text=f"alert {of}, update {n}",
        blocks="[]",
        org_id="org-1",
        source_event_id=f"ev-{i}",
        created_at=T0,
        update_of=f"m{of}",
    )


class SinkRig:
    """A ``SinkLoop`` on the twins, run on a thread of its own."""

    def __init__(self, partitions: int = 2, **config: Any) -> None:
        self.broker = InMemoryBroker()
        self.broker.create_topic(TOPIC, partitions)
        self.broker.create_topic(RECEIPTS, partitions)
        self.broker.create_topic(DLQ, 1)
        self.slack = FakeNotifier()
        self.markers = InMemoryAttemptLog()
        self.table = MemoryReceiptTable(self.broker)
        defaults: dict[str, Any] = {
            "pace": False,
            "poll_timeout_s": 0.02,
            "commit_interval_s": 0.05,
            # the settle delay of in-doubt checks is the subject of its own tests
            "policy": RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05, history_settle_s=0.05),
        }
        self.config = SinkConfig(TOPIC, RECEIPTS, DLQ, **{**defaults, **config})
        self.consumers: list[Any] = []
        self.producers: list[Any] = []
        self.loop: SinkLoop | None = None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.stats: SinkStats | None = None
        self._thread: threading.Thread | None = None

    def send(self, messages: list[SlackMessage]) -> None:
        p = self.broker.producer({})
        for m in messages:
            p.produce(TOPIC, value=encode_message(m), key=m.channel.encode())
        assert p.flush(1) == 0

    def send_receipt(self, message_id: str, channel: str, slack_ts: str) -> None:
        """A DELIVERED receipt of ``message_id`` on the receipts topic, as another replica
        (or an earlier owner of the partition) writes it."""
        receipt = SlackDeliveryReceipt(
            message_id=message_id,
            channel=channel,
            status="DELIVERED",
            attempts=1,
            slack_ts=slack_ts,
            error=None,
            delivered_at=T0,
        )
        p = self.broker.producer({})
        p.produce(RECEIPTS, key=message_id.encode(), value=encode_receipt(receipt))
        assert p.flush(1) == 0

    def send_raw(self, key: bytes, value: bytes) -> None:
        p = self.broker.producer({})
        p.produce(TOPIC, value=value, key=key)
        assert p.flush(1) == 0

    def consumer(self, config: dict[str, Any]) -> Any:
        c = self.broker.consumer(config)
        self.consumers.append(c)
        return c

    def producer(self, config: dict[str, Any]) -> Any:
        p = self.broker.producer(config)
        self.producers.append(p)
        return p

    def start(
        self, group: str = "notifier", *, instance_id: str | None = None, **config: Any
    ) -> SinkRig:
        self.stop = threading.Event()
        self.error = None
        consumer_config: dict[str, Any] = {
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
        if instance_id is not None:
            consumer_config["group.instance.id"] = instance_id
        self.loop = SinkLoop(
            replace(self.config, **config),
            consumer_config,
            {},
            notifier=self.slack,
            table=self.table,
            markers=self.markers,
            decode=decode_message,
            encode=encode_receipt,
            stop=self.stop,
            consumer_factory=self.consumer,
            producer_factory=self.producer,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self.loop is not None
        try:
            self.stats = self.loop.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float = 30.0) -> bool:
        """True when the loop thread ended within ``timeout_s``."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def finish(self, timeout_s: float = 30.0) -> SinkStats:
        self.stop.set()
        assert self.join(timeout_s), "the sink loop did not stop"
        assert self.error is None, self.error
        assert self.stats is not None
        return self.stats

    def receipts(self) -> dict[str, SlackDeliveryReceipt]:
        out: dict[str, SlackDeliveryReceipt] = {}
        for r in self.broker.records(RECEIPTS):
            out[bytes(r.key() or b"").decode()] = decode_receipt(bytes(r.value() or b""))
        return out

    def committed(self, group: str = "notifier") -> dict[int, int | None]:
        return {
            p: self.broker.committed_offset(group, TOPIC, p)
            for p in range(self.broker.partitions(TOPIC))
        }

    def all_committed(self, group: str = "notifier") -> bool:
        """Every partition with records is committed to its end."""
        committed = self.committed(group)
        return all(committed[p] == end for p, end in self.ends().items() if end)

    def ends(self) -> dict[int, int]:
        return {p: self.broker.end_offset(TOPIC, p) for p in range(self.broker.partitions(TOPIC))}
