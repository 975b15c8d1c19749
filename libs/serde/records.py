"""Typed records for every schema in ``schemas/``.

Each record is a frozen dataclass whose fields mirror its ``.avsc`` file one to one; the
``SCHEMA`` class attribute names that file. Timestamps are timezone-aware UTC ``datetime``
values (fastavro converts ``timestamp-millis``/``timestamp-micros`` both ways).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol, Self, TypeVar


class AvroRecord(Protocol):
    """What the serde needs of a record type: its schema file and dict conversion."""

    SCHEMA: ClassVar[str]

    def to_avro(self) -> dict[str, Any]: ...

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self: ...


R = TypeVar("R", bound=AvroRecord)


class _Record:
    """Shared dict conversion for the dataclasses below."""

    SCHEMA: ClassVar[str]

    def to_avro(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        # Unknown fields (written by a newer schema) are dropped; reading with our own schema
        # as reader schema already resolved defaults for fields the writer did not have.
        try:
            # the usual case (read with our own schema): exactly our fields, nothing to filter
            return cls(**data)
        except TypeError:
            names = _field_names(cls)
            return cls(**{k: v for k, v in data.items() if k in names})


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() rebuilds its tuple on every call: cached, it is ~10% of encoding
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        _FIELD_NAMES[cls] = names
    return names


class Status:
    """Connector statuses as they appear in ``ConnectorStatusChanged``."""

    PROVISIONING = "PROVISIONING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    DELETED = "DELETED"


class DeliveryStatus:
    """Values of ``SlackDeliveryReceipt.status``."""

    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    DRY_RUN = "DRY_RUN"


@dataclass(frozen=True, slots=True)
class ConnectorStatusChanged(_Record):
    """A managed connector changed status."""

    SCHEMA: ClassVar[str] = "connector_status_changed.avsc"

    event_id: str
    org_id: str
    environment_id: str
    cluster_id: str
    connector_id: str
    connector_name: str
    connector_type: str
    old_status: str
    new_status: str
    occurred_at: datetime
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class OnboardingStarted(_Record):
    """A customer organisation started onboarding."""

    SCHEMA: ClassVar[str] = "onboarding_started.avsc"

    event_id: str
    org_id: str
    org_name: str
    plan: str
    started_at: datetime
    source: str
    cloud: str | None = None


@dataclass(frozen=True, slots=True)
class CsdrAssignment(_Record):
    """The account-team member who owns an organisation."""

    SCHEMA: ClassVar[str] = "csdr_assignment.avsc"

    org_id: str
    org_name: str
    csdr_email: str
    updated_at: datetime
    csdr_name: str | None = None


@dataclass(frozen=True, slots=True)
class SlackUser(_Record):
    """A Slack user, found by e-mail."""

    SCHEMA: ClassVar[str] = "slack_user.avsc"

    email: str
    slack_user_id: str
    updated_at: datetime
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class SlackMessage(_Record):
    """A rendered alert for ``chat.postMessage``; ``blocks`` is a JSON array as a string."""

    SCHEMA: ClassVar[str] = "slack_message.avsc"

    message_id: str
    pipeline: str
    channel: str
    text: str
    blocks: str
    org_id: str
    source_event_id: str
    created_at: datetime
    #: the ``message_id`` of an earlier message this one updates in place; None: a new post
    update_of: str | None = None


@dataclass(frozen=True, slots=True)
class SlackDeliveryReceipt(_Record):
    """The outcome of delivering one ``SlackMessage``."""

    SCHEMA: ClassVar[str] = "slack_delivery_receipt.avsc"

    message_id: str
    channel: str
    status: str
    attempts: int
    delivered_at: datetime
    slack_ts: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProducerCursor(_Record):
    """Where a warehouse query stopped: the last ``(timestamp, key)`` it produced."""

    SCHEMA: ClassVar[str] = "producer_cursor.avsc"

    query: str
    last_timestamp: datetime
    last_key: str
    updated_at: datetime
    rows_total: int = 0


ALL_RECORDS: tuple[type[_Record], ...] = (
    ConnectorStatusChanged,
    OnboardingStarted,
    CsdrAssignment,
    SlackUser,
    SlackMessage,
    SlackDeliveryReceipt,
    ProducerCursor,
)
