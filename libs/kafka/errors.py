"""The Kafka library's exceptions: one root, specific subclasses."""

from __future__ import annotations


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
