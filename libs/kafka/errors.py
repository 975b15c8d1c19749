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


#: Errors that asking again does not cure: rejected credentials or authorization, a request
#: the cluster refuses as invalid, a client in a state it cannot leave. Everything else is
#: transient for a caller that can wait: a broker restart, a leader election or a slow
#: cluster produces many codes (no leader yet, ``OFFSET_NOT_AVAILABLE`` from a new leader
#: that does not know its high watermark yet, a refused connection, a timeout, and
#: ``_DESTROY_BROKER`` when the stopped broker leaves the metadata), and an error a restart
#: gives that a list of transient codes forgot must not stop a service.
_PERMANENT_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.ILLEGAL_SASL_STATE,
        KafkaError.UNSUPPORTED_SASL_MECHANISM,
        KafkaError.SECURITY_DISABLED,
        KafkaError._SSL,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.DELEGATION_TOKEN_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
        KafkaError._INVALID_TYPE,
        KafkaError._UNSUPPORTED_FEATURE,
        KafkaError._NOT_IMPLEMENTED,
        KafkaError.UNSUPPORTED_VERSION,
        KafkaError.INVALID_REQUEST,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_CONFIG,
        KafkaError.INVALID_PARTITIONS,
        KafkaError.POLICY_VIOLATION,
        KafkaError._STATE,
        KafkaError._DESTROY,
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)

#: The topic (or partition) is not in the metadata: "not yet" a moment after its creation, or
#: while the broker answering has not caught up with the metadata; "never" past a grace period.
MISSING_TOPIC_CODES = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


def is_fatal(err: KafkaError) -> bool:
    """True when the client is unusable: a fatal error, as the client flags it or as a consumer
    reports it.

    A fatal *consumer* error (a static member fenced by an instance with its
    ``group.instance.id``) arrives as an error event with the code ``_FATAL`` whose
    ``fatal()`` is False: the client has stopped consuming for good, so a loop that only asked
    ``fatal()`` went on polling a dead consumer forever (seen in a broker-restart e2e run).
    """
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def is_transient(err: KafkaError) -> bool:
    """True for an error that asking again later may cure (see ``_PERMANENT_CODES``).

    False for a fatal client error and the permanent codes. A missing topic is neither
    (``MISSING_TOPIC_CODES``): the caller decides how long "not yet" may last.
    """
    if is_fatal(err):
        return False
    return err.code() not in _PERMANENT_CODES and err.code() not in MISSING_TOPIC_CODES
