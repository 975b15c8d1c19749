"""Kafka plumbing: client config, topics, the run loop with checkpoints, dead letters."""

from libs.kafka.acks import AckTicket, OffsetTracker
from libs.kafka.admin import (
    TopicSpec,
    connect_admin,
    describe_cleanup_policy,
    describe_topic_config,
    ensure_topics,
)
from libs.kafka.bounded import call_bounded
from libs.kafka.config import KafkaSettings, SecurityProtocol
from libs.kafka.consumer import CommitFailedError, ConsumerClient
from libs.kafka.dlq import (
    DLQ_SUFFIX,
    HEADER_ERROR_CLASS,
    HEADER_ERROR_MESSAGE,
    HEADER_SERVICE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    DeadLetterPublisher,
    dlq_headers,
    dlq_topic,
    plain_produce,
)
from libs.kafka.errors import (
    MISSING_TOPIC_CODES,
    ClientCallTimeoutError,
    DeliveryError,
    FatalLoopError,
    InvalidRecordError,
    KafkaConnectionError,
    KafkaLibError,
    TopicError,
    is_fatal,
    is_transient,
)
from libs.kafka.loop import (
    Emitter,
    Guarantee,
    Handler,
    LoopConfig,
    LoopStats,
    ProcessingLoop,
    Punctuator,
    RetryLater,
)
from libs.kafka.producer import ProducerClient, TransactionAbortedError
from libs.kafka.reader import read_to_end

__all__ = [
    "DLQ_SUFFIX",
    "HEADER_ERROR_CLASS",
    "HEADER_ERROR_MESSAGE",
    "HEADER_SERVICE",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "MISSING_TOPIC_CODES",
    "AckTicket",
    "ClientCallTimeoutError",
    "CommitFailedError",
    "ConsumerClient",
    "DeadLetterPublisher",
    "DeliveryError",
    "Emitter",
    "FatalLoopError",
    "Guarantee",
    "Handler",
    "InvalidRecordError",
    "KafkaConnectionError",
    "KafkaLibError",
    "KafkaSettings",
    "LoopConfig",
    "LoopStats",
    "OffsetTracker",
    "ProcessingLoop",
    "ProducerClient",
    "Punctuator",
    "RetryLater",
    "SecurityProtocol",
    "TopicError",
    "TopicSpec",
    "TransactionAbortedError",
    "call_bounded",
    "connect_admin",
    "describe_cleanup_policy",
    "describe_topic_config",
    "dlq_headers",
    "dlq_topic",
    "ensure_topics",
    "is_fatal",
    "is_transient",
    "plain_produce",
    "read_to_end",
]
