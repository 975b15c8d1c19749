"""The serde library's exceptions: one root, specific subclasses."""

from __future__ import annotations


class SerdeError(Exception):
    """Root of every error raised by ``libs.serde``."""


class SchemaNotFoundError(SerdeError):
    """A schema file is missing from ``schemas/`` or is not valid Avro."""


class RegistryError(SerdeError):
    """The schema registry could not be reached or refused a request."""


class RegistryAuthError(RegistryError):
    """The schema registry rejected the client's credentials (HTTP 401 or 403).

    Unlike an unreachable registry, waiting does not help: the configuration must change.
    """


class SerializationError(SerdeError):
    """A record could not be encoded with its schema."""


class DeserializationError(SerdeError):
    """Bytes read from Kafka could not be decoded.

    Always names where the bytes came from, so a dead-letter record or a log line can point
    an operator at the exact record.
    """

    def __init__(self, reason: str, *, topic: str, partition: int, offset: int) -> None:
        super().__init__(f"{reason} (topic={topic} partition={partition} offset={offset})")
        self.reason = reason
        self.topic = topic
        self.partition = partition
        self.offset = offset

    @property
    def registry_unavailable(self) -> bool:
        """True when the registry could not answer, so the bytes are not to blame.

        A schema id the registry answers 4xx for (404: unknown id) is the record's fault, a
        poison record; unreachable, 5xx, 408 or 429 mean "try again later", and so do 401 and
        403: credentials the registry rejects (rotated, revoked) say nothing about the record,
        and dead-lettering every valid record until they are fixed would lose them all.
        """
        cause = self.__cause__
        if not isinstance(cause, RegistryError):
            return False
        status = getattr(cause.__cause__, "http_status_code", None)
        not_the_record = (401, 403, 408, 429)
        return not (
            isinstance(status, int) and 400 <= status < 500 and status not in not_the_record
        )
