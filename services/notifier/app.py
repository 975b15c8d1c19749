"""The notifier's composition root: Slack adapter, receipts table, markers, the sink loop.

Start order (``libs.runtime.service`` calls these hooks in this order):

1. ``topics()``: ensure the topics it uses exist (``slack-messages``, the compacted receipts
   and in-doubt attempts topics, the dead-letter topics), unless
   ``NOTIFIER_CREATE_TOPICS=false``;
2. ``prepare()``: with a token, ``auth.test``: a token Slack rejects stops the service at once
   with exit 1 (every post would fail the same way; see ``core.FATAL_ERRORS``); Slack being
   unreachable only logs a warning, the loop's retries deal with it;
3. ``bootstrap()``, once the registry answers: load the receipts table
   (``slack-message-receipts`` as a ``GlobalTable`` in ``NOTIFIER_STATE_DIR/receipts``) and the
   in-doubt markers (``slack-message-attempts``, ``NOTIFIER_STATE_DIR/in-doubt``; see
   ``services.notifier.markers``) up to the high watermarks of the start (the gate), so a
   message that already has a final receipt is never posted again and one whose post is in
   doubt is checked first;
4. ``run()``: the sink loop (``services.notifier.sink``) until SIGTERM/SIGINT; it keeps
   following both tables, so what other replicas write is seen too, and gates every
   partition assigned later on both (``services.notifier.gate``).

Without ``NOTIFIER_SLACK_BOT_TOKEN`` the Slack adapter is the dry-run one: every message is
rendered to the log and gets a ``DRY_RUN`` receipt, and no local rate limit applies.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from libs.kafka import (
    DeadLetterPublisher,
    KafkaSettings,
    ProducerClient,
    TopicSpec,
    dlq_topic,
    plain_produce,
)
from libs.runtime import StartRefusedError, seconds_since
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    SchemaRegistry,
    SlackDeliveryReceipt,
    SlackMessage,
)
from libs.tables import GlobalTable, avro_table, bootstrap_all
from services.common.settings import CommonSettings, TopicSettings
from services.notifier.core import TOKEN_ERRORS, AttemptMarker, Rejected
from services.notifier.markers import InDoubtStore, KafkaInDoubtStore, decode_marker
from services.notifier.settings import NotifierSettings
from services.notifier.sink import SinkConfig, SinkLoop, SinkStats
from services.notifier.slack import DryRunNotifier, Notifier, SlackWebNotifier

log = logging.getLogger(__name__)

SERVICE = "notifier"
#: how long the loop may go without a turn before /healthz fails (a wedged process)
LIVENESS_STALL_S = 60.0
#: how long the loop may go without a turn before /readyz fails
READINESS_STALL_S = 15.0


class NotifierService:
    """The notifier as a ``libs.runtime.Service``; ``run()`` blocks until ``stop`` is set."""

    def __init__(
        self,
        common: CommonSettings,
        topics: TopicSettings,
        settings: NotifierSettings,
        *,
        registry: SchemaRegistry,
        stop: threading.Event,
        notifier: Notifier | None = None,
    ) -> None:
        self._topics = topics
        self._settings = settings
        self._stop = stop
        self._kafka: KafkaSettings = common.kafka(SERVICE)
        self._registry = registry
        self._notifier = notifier or _build_notifier(settings)
        self._decode_message = AvroDeserializer(self._registry, SlackMessage)
        self._encode_receipt = AvroSerializer(self._registry, SlackDeliveryReceipt)
        self._receipts_topic = topics.slack_message_receipts
        self._table_dlq_producer = Producer(self._kafka.producer_config())
        self._table_dlq = DeadLetterPublisher(plain_produce(self._table_dlq_producer), SERVICE)

        self.receipts: GlobalTable[SlackDeliveryReceipt] = avro_table(
            SlackDeliveryReceipt,
            name="receipts",
            topic=self._receipts_topic,
            state_dir=Path(settings.state_dir),
            consumer_config=_table_consumer_config(self._kafka),
            registry=self._registry,
            dead_letters=self._table_dlq,
        )
        self.attempts: GlobalTable[AttemptMarker] = GlobalTable(
            name="in-doubt",
            topic=topics.slack_message_attempts,
            state_dir=Path(settings.state_dir),
            consumer_config=_table_consumer_config(self._kafka),
            decode=decode_marker,
            # Not decoded at restore (most markers read back are this process's own, a JSON
            # parse each): a marker that does not decode is answered as absent by ``get``,
            # counted and logged, as it was skipped as invalid at restore before.
            validate=False,
        )
        # linger.ms=0: every post waits for its marker's acknowledgement, nothing to batch
        marker_config = self._kafka.producer_config()
        marker_config["linger.ms"] = 0
        marker_producer = Producer(marker_config)
        tombstone_config = self._kafka.producer_config()
        tombstone_config["linger.ms"] = TOMBSTONE_LINGER_MS
        # only a failed tombstone has something to report (ProducerClient records it)
        tombstone_config["delivery.report.only.error"] = True
        self._markers = KafkaInDoubtStore(
            self.attempts,
            ProducerClient(
                marker_producer, timeout_s=settings.slack_timeout_s, transactional=False
            ),
            # Nothing waits for a tombstone: batched over TOMBSTONE_LINGER_MS, ~one request
            # for dozens (a produce request costs librdkafka's thread ~30-70 us of CPU here).
            tombstones=ProducerClient(
                Producer(tombstone_config),
                timeout_s=settings.slack_timeout_s,
                transactional=False,
            ),
        )
        self.loop: SinkLoop | None = None

    # -- adapters for the loop -------------------------------------------------------------
    def _decode(self, value: bytes | None, topic: str, partition: int, offset: int) -> SlackMessage:
        return self._decode_message(value, topic=topic, partition=partition, offset=offset)

    def _encode(self, receipt: SlackDeliveryReceipt) -> bytes:
        return self._encode_receipt(self._receipts_topic, receipt)

    def _topic_specs(self) -> list[TopicSpec]:
        t = self._topics
        return [
            t.spec(t.slack_messages),
            t.spec(t.slack_message_receipts, compacted=True),
            self._attempts_spec(),
            t.spec(dlq_topic(t.slack_messages)),
            t.spec(dlq_topic(t.slack_message_receipts)),
        ]

    def _attempts_spec(self) -> TopicSpec:
        spec = self._topics.spec(self._topics.slack_message_attempts, compacted=True)
        retention_ms = int(self._settings.marker_retention_h * 3600 * 1000)
        # Compacted (a tombstone clears a marker) and time-bounded: a marker whose tombstone
        # never came (a crash right after the receipt) expires instead of staying forever.
        spec.config.update({"cleanup.policy": "compact,delete", "retention.ms": str(retention_ms)})
        return spec

    def _sink_config(self) -> SinkConfig:
        s = self._settings
        return SinkConfig(
            topic=self._topics.slack_messages,
            receipts_topic=self._receipts_topic,
            dlq_topic=dlq_topic(self._topics.slack_messages),
            service=SERVICE,
            concurrency=s.concurrency,
            rate_per_channel_per_s=s.rate_per_channel_per_s,
            rate_burst=s.rate_burst,
            pace=not self._notifier.dry_run,
            max_buffered_per_partition=s.max_buffered_per_partition,
            poll_timeout_s=s.poll_timeout_s,
            commit_interval_s=s.commit_interval_s,
            # a stop or revoke waits for the calls in flight, which end by their timeout; an
            # in-doubt check stops paging after twice the timeout, plus its page in flight
            drain_timeout_s=s.slack_timeout_s * 3 + 5.0,
            policy=s.retry_policy(),
        )

    def _consumer_config(self) -> dict[str, Any]:
        conf = self._kafka.consumer_config(self._settings.group_id)
        conf["max.poll.interval.ms"] = self._settings.max_poll_interval_ms
        conf["session.timeout.ms"] = self._settings.session_timeout_ms
        if self._settings.group_instance_id is not None:
            # Static membership: a restart within session.timeout.ms gets its partitions back
            # without a rebalance of the whole group.
            conf["group.instance.id"] = self._settings.group_instance_id
        return conf

    # -- health ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once both tables passed the gate and while the loop turns."""
        loop_ok = self.loop is not None and seconds_since(self.loop.last_turn) < READINESS_STALL_S
        ok = self.receipts.ready() and self.attempts.ready() and loop_ok
        return ok, {
            "receipts": self.receipts.status(),
            "in_doubt": self.attempts.status(),
            "loop_running": loop_ok,
        }

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive while loading the table, and while the loop turns."""
        if self.loop is None:
            return True, {"phase": "loading receipts"}
        stalled = seconds_since(self.loop.last_turn)
        return stalled < LIVENESS_STALL_S, {"seconds_since_turn": round(stalled, 1)}

    # -- lifecycle hooks (libs.runtime.Service) ---------------------------------------------
    def config(self) -> dict[str, object]:
        """The notifier's effective settings for the start line, the token masked."""
        return {
            "input": self._topics.slack_messages,
            "receipts": self._receipts_topic,
            "in_doubt": self._topics.slack_message_attempts,
            "dead_letters": dlq_topic(self._topics.slack_messages),
            "settings": self._settings.masked(),
        }

    def topics(self) -> list[TopicSpec]:
        """Its topics, unless ``NOTIFIER_CREATE_TOPICS=false``."""
        return self._topic_specs() if self._settings.create_topics else []

    def prepare(self) -> None:
        """Refuse a token Slack rejects."""
        auth_error = self._notifier.check_auth()
        if isinstance(auth_error, Rejected) and auth_error.error in TOKEN_ERRORS:
            raise StartRefusedError(
                "Slack rejects the token (NOTIFIER_SLACK_BOT_TOKEN), not starting",
                error=auth_error.error,
            )
        if auth_error is not None:
            log.warning("Slack auth.test failed, starting anyway", extra={"error": str(auth_error)})

    def bootstrap(self) -> None:
        """The gate: both tables loaded up to the high watermarks of the start."""
        bootstrap_all([self.receipts, self.attempts], self._stop)

    def run(self) -> None:
        """The sink loop, until stopped."""
        self.loop = self._sink_loop(self._markers)
        self.loop.run()

    def _sink_loop(self, markers: InDoubtStore) -> SinkLoop:
        return SinkLoop(
            self._sink_config(),
            self._consumer_config(),
            _receipt_producer_config(self._kafka),
            notifier=self._notifier,
            table=self.receipts,
            markers=markers,
            decode=self._decode,
            encode=self._encode,
            stop=self._stop,
        )

    def close(self) -> None:
        """Close the tables and the markers' producer, flush the table's dead letters."""
        self.receipts.close()
        self._markers.close()
        self._table_dlq_producer.flush(10)

    def counts(self) -> dict[str, object]:
        """The sink loop's counts."""
        return dict(vars(self.loop.stats if self.loop is not None else SinkStats()))


#: how long a marker's tombstone may wait to share a produce request with others
TOMBSTONE_LINGER_MS = 50
#: how long a receipt (or a dead letter) may wait to share a produce request with others
RECEIPT_LINGER_MS = 50
#: how long the broker may hold a fetch of the tables' consumers to fill it (see below)
TABLE_FETCH_WAIT_MS = 50


def _receipt_producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The sink loop's producer (receipts, dead letters): requests batched over a linger.

    Nothing on the loop waits for a receipt's acknowledgement but the offset commit and its
    marker's tombstone: the channel's next message finds the receipt in ``OwnReceipts``, and a
    revoke or stop flushes (a flush sends at once, whatever the linger). With the library's
    5 ms a receipt was a produce request of its own or nearly (a probe at 600 a second here:
    47-90 us of librdkafka's CPU per record, 3-23 us at 20-50 ms); over
    ``RECEIPT_LINGER_MS`` they share requests (tests/perf/NOTIFIER.md). The price is a
    window that much longer in which a ``kill -9`` leaves a post whose receipt was not sent:
    in doubt, so checked in the history by the next owner (one check each, never a second
    post), a few more per crash at Slack's pace of a post per second per channel.
    """
    conf = kafka.producer_config()
    conf["linger.ms"] = RECEIPT_LINGER_MS
    return conf


def _table_consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The consumer of the receipts and markers tables: fetches batched by the broker.

    Most of what the tables read back is this process's own writes, known locally already
    (``put_local``, the markers' own read-your-own-write); with librdkafka's defaults
    (``fetch.min.bytes=1``) each table issued a fetch per record or two as they arrived,
    hundreds a second per table at full speed, each a round trip's worth of CPU in the client
    and the broker. Held until a batch fills or
    ``TABLE_FETCH_WAIT_MS`` passes, the fetches come at most ~20 a second when the topic is
    busy; what other replicas wrote (and a partition's gate, which waits for the table to
    reach a snapshot of the high watermarks) is at most that much later.
    """
    conf = kafka.consumer_config(None)
    conf["fetch.min.bytes"] = 256 * 1024
    conf["fetch.wait.max.ms"] = TABLE_FETCH_WAIT_MS
    return conf


def _build_notifier(settings: NotifierSettings) -> Notifier:
    if settings.slack_bot_token is None:
        return DryRunNotifier()
    return SlackWebNotifier(
        settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        timeout_s=settings.slack_timeout_s,
        keep_alive_s=settings.slack_keep_alive_s,
        history_limit=settings.history_limit,
        history_max_pages=settings.history_max_pages,
    )
