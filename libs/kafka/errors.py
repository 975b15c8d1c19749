"""The Kafka library's exceptions (one root, specific subclasses) and which of the client's
errors are transient."""

from __future__ import annotations

from confluent_kafka import KafkaError


class KafkaLibError(Exception):
    """Root of every error raised by ``libs.kafka``."""


class KafkaConnectionError(KafkaLibError):
    """The cluster could not be reached, or it rejected the credentials."""


class TopicError(KafkaLibError):
    """A topic could not be created or does not look as it must."""


class DeliveryError(KafkaLibError):
    """A produced record was not acknowledged by the broker."""


class FatalLoopError(KafkaLibError):
    """The run loop cannot continue (fenced producer, fatal client error); restart the process."""


class ClientCallTimeoutError(FatalLoopError):
    """A blocking client call did not return within the bound the runtime gives it.

    The client is wedged: it must not be used again, and the process exits non-zero.
    """


class InvalidRecordError(KafkaLibError):
    """A record that decodes but cannot be processed (an empty id, say): it is poison.

    Poison is dead-lettered; any other exception of a handler stops the loop (fail closed).
    """


#: Errors a broker restart, a leader election or a slow cluster produces, which the same request
#: made again a little later cures: no leader yet, a new leader that does not know its high
#: watermark yet (``OFFSET_NOT_AVAILABLE``, KIP-207), a connection refused or reset, a timeout.
#: librdkafka flags few of them ``retriable()`` (a watermark query's never), hence the list.
_TRANSIENT_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._RESOLVE,
        KafkaError._WAIT_COORD,
        KafkaError._NODE_UPDATE,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._RETRY,
        KafkaError._IN_PROGRESS,
        KafkaError._PREV_IN_PROGRESS,
        KafkaError._WAIT_CACHE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.NOT_CONTROLLER,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.THROTTLING_QUOTA_EXCEEDED,
    }
)

#: The topic (or partition) is not in the metadata: "not yet" a moment after its creation, or
#: while the broker answering has not caught up with the metadata; "never" past a grace period.
MISSING_TOPIC_CODES = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


def is_transient(err: KafkaError) -> bool:
    """True for an error that asking again later cures (see ``_TRANSIENT_CODES``).

    Everything else is permanent for the caller: rejected credentials or authorization, an
    invalid request, a fatal client error. A missing topic is neither (``MISSING_TOPIC_CODES``):
    the caller decides how long "not yet" may last.
    """
    if err.fatal():
        return False
    return err.code() in _TRANSIENT_CODES or (
        err.retriable() and err.code() not in MISSING_TOPIC_CODES
    )
