"""Schema registry port with a Confluent-API adapter and an in-memory twin.

The adapter speaks the Confluent Schema Registry REST API, which Confluent Schema Registry
serves natively and Apicurio Registry serves under ``/apis/ccompat/v7``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Protocol

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from libs.serde.errors import RegistryAuthError, RegistryError

log = logging.getLogger(__name__)


class SchemaRegistry(Protocol):
    """The few registry calls the serde and the compatibility gate need."""

    def register(self, subject: str, schema: str) -> int:
        """Register ``schema`` (Avro JSON) under ``subject``; return its global id."""
        ...

    def schema_by_id(self, schema_id: int) -> str:
        """Return the Avro JSON of the schema with this global id."""
        ...

    def is_compatible(self, subject: str, schema: str) -> tuple[bool, list[str]]:
        """Check ``schema`` against the subject's versions under its compatibility level."""
        ...

    def set_compatibility(self, subject: str, level: str) -> None:
        """Set the subject's compatibility level (e.g. ``BACKWARD_TRANSITIVE``)."""
        ...

    def check(self) -> None:
        """Return when the registry answers; ``RegistryError`` when it does not."""
        ...


def wait_for_registry(
    registry: SchemaRegistry,
    stop: threading.Event,
    *,
    initial_s: float = 1.0,
    max_s: float = 10.0,
) -> bool:
    """Block until the registry answers (True) or ``stop`` is set (False), with backoff.

    Services call it at start, after their health server is up and before anything needs a
    schema: a registry that is down at start means waiting, not ready, rather than exiting.
    Rejected credentials are not something time repairs: ``RegistryAuthError`` propagates at
    once instead of being waited on.
    """
    delay = initial_s
    attempt = 0
    while not stop.is_set():
        try:
            registry.check()
            if attempt:
                log.info("schema registry answers again", extra={"attempts": attempt + 1})
            return True
        except RegistryAuthError:
            raise
        except RegistryError as exc:
            attempt += 1
            log.warning(
                "schema registry unavailable at start, waiting",
                extra={"error": str(exc), "attempt": attempt, "retry_in_s": delay},
            )
        stop.wait(delay)
        delay = min(max_s, delay * 2)
    return False


def topic_subject(topic: str, *, is_key: bool = False) -> str:
    """The topic name strategy: ``<topic>-value`` (or ``-key``)."""
    return f"{topic}-{'key' if is_key else 'value'}"


class ConfluentSchemaRegistry:
    """``SchemaRegistry`` over confluent-kafka's REST client (Confluent or Apicurio ccompat)."""

    #: retries after a failed request (transport error or HTTP 408/429/5xx)
    MAX_RETRIES = 2
    #: full-jitter backoff between them: up to 0.5 s, then up to 1 s (capped at 2 s)
    RETRIES_WAIT_MS = 500
    RETRIES_MAX_WAIT_MS = 2000

    def __init__(
        self, url: str, basic_auth_user_info: str | None = None, *, timeout_s: float = 10.0
    ) -> None:
        """``timeout_s`` bounds each HTTP phase (connect, read, write) of one request.

        The client's own defaults have no timeout at all (httpx then waits forever on a registry
        that accepts and never answers) and 3 retries up to 20 s apart. Here one call takes at
        most about ``(MAX_RETRIES + 1) * timeout_s`` plus 1.5 s of backoff before it raises
        ``RegistryError``.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        conf: dict[str, object] = {
            "url": url,
            "timeout": timeout_s,
            "max.retries": self.MAX_RETRIES,
            "retries.wait.ms": self.RETRIES_WAIT_MS,
            "retries.max.wait.ms": self.RETRIES_MAX_WAIT_MS,
        }
        if basic_auth_user_info:
            conf["basic.auth.user.info"] = basic_auth_user_info
        self._client = SchemaRegistryClient(conf)
        self.url = url
        self.timeout_s = timeout_s

    def register(self, subject: str, schema: str) -> int:
        try:
            return int(self._client.register_schema(subject, Schema(schema, "AVRO")))
        except (SchemaRegistryError, OSError, ValueError) as exc:
            raise RegistryError(f"registering {subject} at {self.url} failed: {exc}") from exc
        except Exception as exc:  # httpx transport errors have no common public base here
            raise RegistryError(f"schema registry at {self.url} unreachable: {exc}") from exc

    def schema_by_id(self, schema_id: int) -> str:
        try:
            return str(self._client.get_schema(schema_id).schema_str)
        except SchemaRegistryError as exc:
            raise RegistryError(f"schema id {schema_id} not found at {self.url}: {exc}") from exc
        except Exception as exc:
            raise RegistryError(f"schema registry at {self.url} unreachable: {exc}") from exc

    def is_compatible(self, subject: str, schema: str) -> tuple[bool, list[str]]:
        try:
            result = self._client.test_compatibility(subject, Schema(schema, "AVRO"), verbose=True)
        except SchemaRegistryError as exc:
            raise RegistryError(f"compatibility check of {subject} failed: {exc}") from exc
        except Exception as exc:
            raise RegistryError(f"schema registry at {self.url} unreachable: {exc}") from exc
        if isinstance(result, bool):
            return result, []
        # verbose=True answers {"is_compatible": bool, "messages": [...]} on newer clients
        ok = bool(getattr(result, "is_compatible", result))
        messages = list(getattr(result, "messages", []) or [])
        return ok, [str(m) for m in messages]

    def set_compatibility(self, subject: str, level: str) -> None:
        try:
            self._client.set_compatibility(subject_name=subject, level=level)
        except Exception as exc:
            raise RegistryError(f"setting compatibility of {subject} failed: {exc}") from exc

    def check(self) -> None:
        try:
            self._client.get_subjects()
        except SchemaRegistryError as exc:
            if exc.http_status_code in (401, 403):
                raise RegistryAuthError(
                    f"schema registry at {self.url} rejects the credentials: "
                    f"HTTP {exc.http_status_code} {exc.error_message}"
                ) from exc
            raise RegistryError(f"schema registry at {self.url} answers {exc}") from exc
        except Exception as exc:
            raise RegistryError(f"schema registry at {self.url} unreachable: {exc}") from exc

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


class InMemorySchemaRegistry:
    """An honest in-memory ``SchemaRegistry`` for unit tests: ids are global, schemas dedupe.

    Compatibility is not evaluated here (the real registry is the judge); every check passes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, str] = {}
        self._subjects: dict[str, list[int]] = {}
        self._levels: dict[str, str] = {}

    def register(self, subject: str, schema: str) -> int:
        canonical = json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))
        with self._lock:
            schema_id = self._ids.get(canonical)
            if schema_id is None:
                schema_id = len(self._ids) + 1
                self._ids[canonical] = schema_id
                self._schemas[schema_id] = schema
            versions = self._subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def schema_by_id(self, schema_id: int) -> str:
        with self._lock:
            try:
                return self._schemas[schema_id]
            except KeyError:
                raise RegistryError(f"schema id {schema_id} not found") from None

    def is_compatible(self, subject: str, schema: str) -> tuple[bool, list[str]]:
        return True, []

    def set_compatibility(self, subject: str, level: str) -> None:
        with self._lock:
            self._levels[subject] = level

    def check(self) -> None:
        pass

    def subjects(self) -> dict[str, list[int]]:
        """Subjects and their schema ids, in registration order."""
        with self._lock:
            return {s: list(v) for s, v in self._subjects.items()}
