"""Typed records for every schema in ``schemas/``.

Each record is a frozen dataclass whose fields mirror its ``.avsc`` file one to one; the
``SCHEMA`` class attribute names that file. Timestamps are timezone-aware UTC ``datetime``
values (fastavro converts ``timestamp-millis``/``timestamp-micros`` both ways).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MemberDescriptorType
from typing import Any, ClassVar, Protocol, Self, TypeVar, cast


class AvroRecord(Protocol):
    """What the serde needs of a record type: its schema file and dict conversion."""

    SCHEMA: ClassVar[str]

    def to_avro(self) -> dict[str, Any]: ...

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self: ...


R = TypeVar("R", bound=AvroRecord)
T = TypeVar("T")


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


def slot_setters(
    record_type: type[Any], names: Sequence[str]
) -> list[Callable[[Any, Any], None]] | None:
    """Each of ``names``' slot ``__set__`` when ``record_type(*values)`` (``names``' values)
    does nothing but set their slots in order, else ``None`` (call the type): a frozen
    slotted dataclass whose ``__init__`` takes exactly ``names``, positionally,
    whose ``__init__`` is the generated one, which only calls the builtin
    ``object.__setattr__`` per field (the slot's ``__set__``), no ``__post_init__``, and
    object's ``__new__``."""
    code = getattr(record_type.__dict__.get("__init__"), "__code__", None)
    params = getattr(record_type, "__dataclass_params__", None)
    if (
        params is None
        or [f.name for f in dataclasses.fields(record_type)] != list(names)
        or any(not f.init or f.kw_only for f in dataclasses.fields(record_type))
        or not params.frozen
        or code is None
        or code.co_names != ("__setattr__",)
        or code.co_freevars != ("__dataclass_builtins_object__",)
        or hasattr(record_type, "__post_init__")
        or cast(object, record_type.__new__) is not object.__new__
    ):
        return None
    setters = []
    for name in names:
        slot = record_type.__dict__.get(name)
        if not isinstance(slot, MemberDescriptorType):
            return None
        setters.append(slot.__set__)
    return setters


def positional_builder(record_type: type[T]) -> Callable[..., T]:
    """``record_type`` called with every field's value, in declaration order: for a record
    built once per event (the enricher's ``SlackMessage``), a function setting a frozen
    slotted dataclass's slots directly (what its ``__init__`` does, without an
    ``object.__setattr__`` lookup per field), or the type itself when ``__init__`` does more.

    Generated once per type; the source holds only the argument count.
    """
    if not dataclasses.is_dataclass(record_type):
        return record_type
    names = [f.name for f in dataclasses.fields(record_type)]
    setters = slot_setters(record_type, names)
    if setters is None:
        return record_type
    params = ", ".join(f"v{i}" for i in range(len(names)))
    lines = [f"def build({params}):", "    record = _new(cls)"]
    lines += [f"    _set{i}(record, v{i})" for i in range(len(names))]
    lines.append("    return record")
    scope: dict[str, Any] = {"__builtins__": {}, "_new": object.__new__, "cls": record_type}
    scope.update((f"_set{i}", setter) for i, setter in enumerate(setters))
    exec("\n".join(lines), scope)
    build: Callable[..., T] = scope["build"]
    return build


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
