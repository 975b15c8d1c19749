"""The alert lifecycle: one Slack message per problem, not per event. Pure: no Kafka, no clock.

Given an event's route outcome (``core.route``), the state records it touches and ``now``
(epoch milliseconds), each function returns a ``Decision``: the messages to produce and the
state writes to make. The shell (``handler.py`` per event, ``punctuator.py`` on time and on
lookup-table changes) reads the records, calls one function and applies the decision; the
loop commits outputs, state writes and offsets in one transaction.

Decisions (``Action``):

===============  =========================================  ===================================
action           when                                       what
===============  =========================================  ===================================
NEW              first event of a key, routed to a DM (or    post it; open a group of its key
                 to the fallback channel, parking off)      for the window
GROUPED          a later event of an open group             update the group's message in
                                                            place (count, first/latest, error)
PARKED           first event of a key, join miss, parking    park it under the missing key;
                 on                                         post the fallback copy (if a
                                                            fallback channel is set); open the
                                                            group on that copy (or unposted)
MISSED           join miss, no fallback, parking off        nothing (counted as today)
RESOLVED         a resolving event, open group              update the message: resolved, when
                                                            and how, steps struck; close group;
                                                            delete every park of its key (the
                                                            problem ended: no DM, no re-route
                                                            note over "Resolved" later)
UNPARKED         a resolving event, no open group, parks    delete them; the event is a drop,
                 of its key waiting (the window closed)     counted as today
HIT              the missing lookup arrived                 DM the owner; update the fallback
                                                            copy to say where it went; the
                                                            group follows the DM
REPARKED         owner arrived, Slack user still missing    park under the user's e-mail
EXPIRED_PARK     the park's time ran out                    the miss is final (fallback copy
                                                            stays, or nothing): counted then
EXPIRED_GROUP    the window closed                          forget the group: the next event
                                                            posts anew
===============  =========================================  ===================================

State layout (keys are bytes; ``\\x00`` separates free-form parts so no id can forge a prefix):

* ``g/<pipeline>\\x00<dedup key>`` -> ``Group`` (a binary header, then its strings as raw UTF-8:
  the event's value bytes and the lookups its routing used, from which an update renders the
  original again; see ``Group.encode``);
* ``p/<kind>/<missing key>\\x00<pipeline>\\x00<event id>`` -> ``Park`` (a binary header, then
  its strings as raw UTF-8; earlier versions wrote compact JSON, still read); kind
  ``owner`` (key: org id) or ``user`` (key: lower-cased e-mail), so a table change finds its
  parks by prefix.

Expiry is not in the store: each record carries its ``expires_at`` and the ``Schedule`` (a
heap per partition, in memory) says what is due. Decisions name what to schedule; the
punctuator rebuilds a partition's schedule from its groups and parks when it first sees the
partition. A persisted time index would cost a second put (and a second changelog record)
for every new group; the rebuild reads the groups and parks once per assignment.
"""

from __future__ import annotations

import base64
import heapq
import json
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

from libs.serde import CsdrAssignment, SlackMessage, SlackUser
from services.enricher.core import Alert, Miss, message_id, new_message
from services.enricher.render import Detail, Revision, escape, render_update

#: ``Group`` value layout 1: version, count, first_at, latest_at, expires_at, then the UTF-8
#: lengths of the message id, channel, latest error (-1: none) and text; blocks are the rest
_GROUP_V1: Final = 1
_GROUP_HEAD: Final = struct.Struct(">BIqqqHHiI")
#: ``Group`` value layout 2 (an ``Origin`` instead of the rendered original): version, count,
#: first_at, latest_at, expires_at, the UTF-8 lengths of the message id, channel and latest
#: error (-1: none), the event's length, the owner's and the user's ``updated_at`` (epoch µs),
#: then the UTF-8 lengths of the owner's org id (-1: no owner), org name, e-mail, name (-1:
#: none) and of the user's e-mail (-1: no user), Slack id, display name (-1: none); the
#: strings follow in that order, the event's bytes after the latest error
_GROUP_V2: Final = 2
_GROUP_HEAD_V2: Final = struct.Struct(">BIqqqHHiIqq7i")
_PACK_HEAD_V2: Final = _GROUP_HEAD_V2.pack
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)

#: ``Park`` value layout 1: version, expires_at, then the UTF-8 lengths of pipeline, kind, key,
#: topic, value (the event's base64 text), event id, org id, reason, and of dedup, fallback
#: id, channel, text and blocks (-1: none); the strings follow in that order. Before it a
#: park was a compact JSON array of its fields (first byte ``[``), which ``Park.decode`` reads.
_PARK_V1: Final = 1
_PARK_HEAD: Final = struct.Struct(">Bq13i")
_PACK_PARK_HEAD: Final = _PARK_HEAD.pack

GROUP_PREFIX: Final = b"g/"
PARK_PREFIX: Final = b"p/"

#: park kinds: what the parked event waits for
OWNER: Final = "owner"
USER: Final = "user"

#: message id suffixes of the messages a parked event causes when it routes (CONTRACT: an
#: event's distinct messages get distinct, deterministic ids)
SUFFIX_DM: Final = "dm"
SUFFIX_REROUTED: Final = "rerouted"
SUFFIX_CATCHUP: Final = "catchup"


class Action(StrEnum):
    """What a decision does (the metric and audit vocabulary)."""

    NEW = "new"
    GROUPED = "grouped"
    PARKED = "parked"
    MISSED = "missed"
    RESOLVED = "resolved"
    UNPARKED = "unparked"
    HIT = "hit"
    REPARKED = "reparked"
    EXPIRED_PARK = "expired_park"
    EXPIRED_GROUP = "expired_group"
    NONE = "none"


def group_key(pipeline: str, dedup: str) -> bytes:
    """The state key of the group of ``dedup`` in ``pipeline``."""
    return f"g/{pipeline}\x00{dedup}".encode()  # GROUP_PREFIX, without a second concatenation


def park_prefix(kind: str, key: str) -> bytes:
    """The prefix of every park waiting for ``key`` of ``kind`` (owner: org id; user: e-mail)."""
    return PARK_PREFIX + f"{kind}/{key}\x00".encode()


def park_key(kind: str, key: str, pipeline: str, event_id: str) -> bytes:
    """The state key of one parked event."""
    return park_prefix(kind, key) + f"{pipeline}\x00{event_id}".encode()


def _utf8(text: str | None) -> bytes:
    return b"" if text is None else text.encode()


def derived_id(pipeline: str, event_id: str, suffix: str) -> str:
    """The id of a further message ``event_id`` causes (deterministic, distinct per suffix)."""
    return message_id(pipeline, f"{event_id}#{suffix}")


def epoch_ms(when: datetime) -> int:
    """``when`` as epoch milliseconds (the state's time unit)."""
    if when.tzinfo is None:
        return int(when.timestamp() * 1000)  # local time, as ``timestamp`` reads a naive one
    # The float ``timestamp()`` computes for an aware ``when`` (its exact µs since the epoch
    # over 10**6, one correctly rounded division), without its timedelta to long conversions:
    # the same milliseconds (per event).
    return int(_micros(when) / 1_000_000 * 1000)


def _micros(when: datetime) -> int:
    """``when`` as exact epoch microseconds (naive: UTC, as the Avro decoder's are not)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # The timedelta's fields, not ``// _MICROSECOND``: the same integer without converting
    # both timedeltas to Python longs (twice per new alert: owner, user). A day's 86.4e9 µs
    # as 20_000 * 4_320_000: compiled, a product is machine arithmetic only while both factors
    # are below 2**30 (here until 2116), else Python longs again.
    delta = when - _EPOCH
    return delta.days * 20_000 * 4_320_000 + delta.seconds * 1_000_000 + delta.microseconds


#: ``_when``'s strings by epoch minute: every update and resolution renders one or two (the
#: group's first and latest time, now), nearly always of a few recent minutes; cleared when full
_WHEN: Final[dict[int, str]] = {}
_WHEN_MAX: Final = 4096


def _when(ms: int) -> str:
    minute = ms // 60_000  # what the format shows: the same string for every ms of a minute
    text = _WHEN.get(minute)
    if text is None:
        if len(_WHEN) >= _WHEN_MAX:
            _WHEN.clear()
        text = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%d %H:%M UTC")
        _WHEN[minute] = text
    return text


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for its __init__'s cost: see EventRef
class Origin:
    """What renders a group's original message again: the event and the lookups it was
    routed with (``route`` of these, with the group's channel and message id, gives the
    original's text and blocks; the lookups as they were, not as they are now)."""

    #: the event's value bytes as consumed (the Avro header names the writer schema)
    event: bytes
    owner: CsdrAssignment | None
    user: SlackUser | None

    def __init__(self, event: bytes, owner: CsdrAssignment | None, user: SlackUser | None) -> None:
        # written out (the dataclass would generate it): compiled, an interpreted dataclass
        # __init__ costs ≈ 0.3 µs more per call, and one is built per new alert (see EventRef)
        self.event = event
        self.owner = owner
        self.user = user


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for its __init__'s cost: see EventRef
class Group:
    """An open alert: the message later events of its key update.

    Stored with its ``origin`` when it has one (layout 2): the original's ``text`` and
    ``blocks`` are then not stored but rendered again by the shell when an update needs them
    (``decode`` leaves them empty). Without one (groups written by earlier versions, or
    nothing posted yet) they are stored as they are (layout 1).
    """

    #: the original message (every update points here)
    message_id: str
    #: the original's channel; ``""`` while nothing is posted (first event parked, no copy)
    channel: str
    count: int
    first_at: int
    latest_at: int
    expires_at: int
    #: the original's text and blocks: updates are rendered from them
    text: str
    blocks: str
    latest_error: str | None = None
    #: what renders the original again (then ``text`` and ``blocks`` are not stored)
    origin: Origin | None = None

    def __init__(
        self,
        message_id: str,
        channel: str,
        count: int,
        first_at: int,
        latest_at: int,
        expires_at: int,
        text: str,
        blocks: str,
        latest_error: str | None = None,
        origin: Origin | None = None,
    ) -> None:
        # written out, compiled: see EventRef (one or two per update: decoded, rendered)
        self.message_id = message_id
        self.channel = channel
        self.count = count
        self.first_at = first_at
        self.latest_at = latest_at
        self.expires_at = expires_at
        self.text = text
        self.blocks = blocks
        self.latest_error = latest_error
        self.origin = origin

    def encode(self) -> bytes:
        """A fixed binary header, then the strings as raw UTF-8 (the last one unsized).

        Written for every new alert, so its cost is per output: no JSON (escaping the blocks,
        JSON inside JSON, once cost more than the rest of the lifecycle per event; a JSON
        header with the latest error cost ~1.5 µs more than ``struct``), one join. With an
        ``origin`` (layout 2) the value is the event and the lookups (~0.6 KB) instead of
        the rendered original (~2.4 KB): the RocksDB write, the changelog record and its
        compression are per new alert and scale with the size; an update pays one render.
        """
        if self.origin is not None:
            return self._encode_v2(self.origin)
        mid = self.message_id.encode()
        channel = self.channel.encode()
        error = b"" if self.latest_error is None else self.latest_error.encode()
        text = self.text.encode()
        head = _GROUP_HEAD.pack(
            _GROUP_V1,
            self.count,
            self.first_at,
            self.latest_at,
            self.expires_at,
            len(mid),
            len(channel),
            -1 if self.latest_error is None else len(error),
            len(text),
        )
        return b"".join((head, mid, channel, error, text, self.blocks.encode()))

    def _encode_v2(self, origin: Origin) -> bytes:
        return _pack_v2(
            self.message_id,
            self.channel,
            self.count,
            self.first_at,
            self.latest_at,
            self.expires_at,
            self.latest_error,
            origin,
        )

    @classmethod
    def decode(cls, raw: bytes) -> Group:
        """The inverse of ``encode``; reads the layouts before it too (stores and changelogs
        written by an earlier version: layout 1, the rendered original; before it a JSON
        header line, then text and blocks). A layout 2 value decodes with an empty ``text``
        and ``blocks``: its ``origin`` renders them."""
        first = raw[:1]
        if first == b"\x02":
            return cls._decode_v2(raw)
        if first != b"\x01":
            return cls._decode_json_header(raw)
        _, count, first_at, latest_at, expires_at, n_mid, n_channel, n_error, n_text = (
            _GROUP_HEAD.unpack_from(raw)
        )
        at = _GROUP_HEAD.size + n_mid
        error_at = at + n_channel
        text_at = error_at + max(n_error, 0)
        blocks_at = text_at + n_text
        return cls(
            raw[_GROUP_HEAD.size : at].decode(),
            raw[at:error_at].decode(),
            count,
            first_at,
            latest_at,
            expires_at,
            raw[text_at:blocks_at].decode(),
            raw[blocks_at:].decode(),
            None if n_error < 0 else raw[error_at:text_at].decode(),
        )

    @classmethod
    def _decode_v2(cls, raw: bytes) -> Group:
        (
            _,
            count,
            first_at,
            latest_at,
            expires_at,
            n_mid,
            n_channel,
            n_error,
            n_event,
            owner_at,
            user_at,
            *lengths,
        ) = _GROUP_HEAD_V2.unpack_from(raw)
        at = _GROUP_HEAD_V2.size
        # a module function returning (string, next position), not a closure over ``at``:
        # compiled, a nested function is an object with its environment in another (per update)
        mid, at = _take(raw, at, n_mid)
        channel, at = _take(raw, at, n_channel)
        error, at = _take(raw, at, n_error)
        event = raw[at : at + n_event]
        at += n_event
        n_org, n_org_name, n_email, n_name, n_user_email, n_slack_id, n_display = lengths
        owner = None
        if n_org >= 0:
            org, at = _take(raw, at, n_org)
            org_name, at = _take(raw, at, n_org_name)
            email, at = _take(raw, at, n_email)
            name, at = _take(raw, at, n_name)
            owner = CsdrAssignment(
                org or "", org_name or "", email or "", _EPOCH + owner_at * _MICROSECOND, name
            )
        user = None
        if n_user_email >= 0:
            user_email, at = _take(raw, at, n_user_email)
            slack_id, at = _take(raw, at, n_slack_id)
            display, at = _take(raw, at, n_display)
            user = SlackUser(
                user_email or "", slack_id or "", _EPOCH + user_at * _MICROSECOND, display
            )
        return cls(
            mid or "",
            channel or "",
            count,
            first_at,
            latest_at,
            expires_at,
            "",
            "",
            error,
            Origin(event, owner, user),
        )

    @classmethod
    def _decode_json_header(cls, raw: bytes) -> Group:
        head, _, body = raw.partition(b"\n")
        mid, channel, count, first_at, latest_at, expires_at, error, n = json.loads(head)
        return cls(
            mid,
            channel,
            count,
            first_at,
            latest_at,
            expires_at,
            body[:n].decode(),
            body[n:].decode(),
            error,
        )

    @staticmethod
    def expires_at_of(raw: bytes) -> int:
        """The ``expires_at`` of an encoded group, without decoding the rest."""
        if raw[:1] not in (b"\x01", b"\x02"):
            return int(json.loads(raw.partition(b"\n")[0])[5])
        # the same leading fields in layouts 1 and 2
        expires_at: int = _GROUP_HEAD.unpack_from(raw)[4]
        return expires_at


def _take(raw: bytes, at: int, n: int) -> tuple[str | None, int]:
    """The string of UTF-8 length ``n`` at ``at`` (``None`` when ``n`` < 0), and where the
    next one starts."""
    if n < 0:
        return None, at
    return raw[at : at + n].decode(), at + n


def _pack_v2(
    mid: str,
    channel: str,
    count: int,
    first_at: int,
    latest_at: int,
    expires_at: int,
    latest_error: str | None,
    origin: Origin,
) -> bytes:
    """``Group`` layout 2 from its fields (``Group.encode`` with an origin).

    A function of the fields rather than of a ``Group``: a new alert's group (every new alert
    with grouping on) is encoded straight from the decision's values, without building the
    frozen ``Group`` only to read it back (≈ 1 µs per new alert).
    """
    mid_b = mid.encode()
    channel_b = channel.encode()
    if latest_error is None:
        error, n_error = b"", -1
    else:
        error = latest_error.encode()
        n_error = len(error)
    event = origin.event
    owner = origin.owner
    user = origin.user
    # each part and length a local, the header packed from the lengths in one call and the
    # value joined in one: no tuples to build and splat (mypyc passes 18 arguments as they are)
    if owner is None:
        owner_at = 0
        n_org = n_org_name = n_email = n_name = -1
        org = org_name = email = name = b""
    else:
        org = owner.org_id.encode()
        org_name = owner.org_name.encode()
        email = owner.csdr_email.encode()
        csdr_name = owner.csdr_name
        name = b"" if csdr_name is None else csdr_name.encode()
        owner_at = _micros(owner.updated_at)
        n_org, n_org_name, n_email = len(org), len(org_name), len(email)
        n_name = -1 if csdr_name is None else len(name)
    if user is None:
        user_at = 0
        n_user_email = n_slack_id = n_display = -1
        user_email = slack_id = display = b""
    else:
        user_email = user.email.encode()
        slack_id = user.slack_user_id.encode()
        display_name = user.display_name
        display = b"" if display_name is None else display_name.encode()
        user_at = _micros(user.updated_at)
        n_user_email, n_slack_id = len(user_email), len(slack_id)
        n_display = -1 if display_name is None else len(display)
    head = _PACK_HEAD_V2(
        _GROUP_V2,
        count,
        first_at,
        latest_at,
        expires_at,
        len(mid_b),
        len(channel_b),
        n_error,
        len(event),
        owner_at,
        user_at,
        n_org,
        n_org_name,
        n_email,
        n_name,
        n_user_email,
        n_slack_id,
        n_display,
    )
    return b"".join(
        (
            head,
            mid_b,
            channel_b,
            error,
            event,
            org,
            org_name,
            email,
            name,
            user_email,
            slack_id,
            display,
        )
    )


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for its __init__'s cost: see EventRef
class Park:
    """A join miss waiting for its lookup: enough to route the event again (treated as
    immutable)."""

    pipeline: str
    kind: str
    key: str
    #: the source topic and the event's value bytes as consumed (base64): re-decoded to route
    topic: str
    value: str
    event_id: str
    org_id: str
    reason: str
    expires_at: int
    #: the group this event opened (its dedup key), if any
    dedup: str | None
    #: the fallback copy posted at event time, if any: re-routing updates it
    fallback_id: str | None = None
    fallback_channel: str | None = None
    fallback_text: str | None = None
    fallback_blocks: str | None = None

    def __init__(
        self,
        pipeline: str,
        kind: str,
        key: str,
        topic: str,
        value: str,
        event_id: str,
        org_id: str,
        reason: str,
        expires_at: int,
        dedup: str | None,
        fallback_id: str | None = None,
        fallback_channel: str | None = None,
        fallback_text: str | None = None,
        fallback_blocks: str | None = None,
    ) -> None:
        # written out, compiled: see EventRef (one per parked miss, one per park read)
        self.pipeline = pipeline
        self.kind = kind
        self.key = key
        self.topic = topic
        self.value = value
        self.event_id = event_id
        self.org_id = org_id
        self.reason = reason
        self.expires_at = expires_at
        self.dedup = dedup
        self.fallback_id = fallback_id
        self.fallback_channel = fallback_channel
        self.fallback_text = fallback_text
        self.fallback_blocks = fallback_blocks

    def encode(self) -> bytes:
        """Layout 1 (``_PARK_HEAD``): a fixed binary header, then the strings as raw UTF-8.

        Written for every parked miss: no JSON. As JSON (what versions before layout 1 wrote
        and ``decode`` still reads) the fallback copy's ~2 KB of blocks, JSON themselves, were
        escaped again and the encoder ran interpreted (≈ 9 µs of a parked miss; ≈ 1 µs so).
        """
        pipeline = self.pipeline.encode()
        kind = self.kind.encode()
        key = self.key.encode()
        topic = self.topic.encode()
        value = self.value.encode()
        event_id = self.event_id.encode()
        org_id = self.org_id.encode()
        reason = self.reason.encode()
        dedup = _utf8(self.dedup)
        fallback_id = _utf8(self.fallback_id)
        fallback_channel = _utf8(self.fallback_channel)
        fallback_text = _utf8(self.fallback_text)
        fallback_blocks = _utf8(self.fallback_blocks)
        head = _PACK_PARK_HEAD(
            _PARK_V1,
            self.expires_at,
            len(pipeline),
            len(kind),
            len(key),
            len(topic),
            len(value),
            len(event_id),
            len(org_id),
            len(reason),
            -1 if self.dedup is None else len(dedup),
            -1 if self.fallback_id is None else len(fallback_id),
            -1 if self.fallback_channel is None else len(fallback_channel),
            -1 if self.fallback_text is None else len(fallback_text),
            -1 if self.fallback_blocks is None else len(fallback_blocks),
        )
        return b"".join(
            (
                head,
                pipeline,
                kind,
                key,
                topic,
                value,
                event_id,
                org_id,
                reason,
                dedup,
                fallback_id,
                fallback_channel,
                fallback_text,
                fallback_blocks,
            )
        )

    @classmethod
    def decode(cls, raw: bytes) -> Park:
        """The inverse of ``encode``; reads the compact JSON array (every field in order)
        that versions before layout 1 wrote, in stores and changelogs from before an upgrade."""
        if raw[:1] != b"\x01":
            return cls(*json.loads(raw))
        head = _PARK_HEAD.unpack_from(raw)
        at = _PARK_HEAD.size
        strings: list[str | None] = []
        for n in head[2:]:
            if n < 0:
                strings.append(None)
            else:
                strings.append(raw[at : at + n].decode())
                at += n
        pipeline, kind, key, topic, value, event_id, org_id, reason = (
            s or ""
            for s in strings[:8]  # never None: encode writes their lengths
        )
        return cls(
            pipeline,
            kind,
            key,
            topic,
            value,
            event_id,
            org_id,
            reason,
            head[1],
            strings[8],
            strings[9],
            strings[10],
            strings[11],
            strings[12],
        )

    @staticmethod
    def expires_at_of(raw: bytes) -> int:
        """The ``expires_at`` of an encoded park, without decoding the rest."""
        if raw[:1] != b"\x01":
            return int(json.loads(raw)[8])
        expires_at: int = _PARK_HEAD.unpack_from(raw)[1]
        return expires_at

    @property
    def state_key(self) -> bytes:
        """Where this park is stored."""
        return park_key(self.kind, self.key, self.pipeline, self.event_id)

    def event_bytes(self) -> bytes:
        """The parked event's value bytes, as consumed."""
        return base64.b64decode(self.value)

    def hit_message_id(self) -> str:
        """The id of the DM this park becomes: the event's own id unless a copy used it."""
        if self.fallback_id is None:
            return message_id(self.pipeline, self.event_id)
        return derived_id(self.pipeline, self.event_id, SUFFIX_DM)


# Built once per event and never mutated, but not frozen: a frozen class's __init__ sets each
# field through object.__setattr__ (~0.07 µs a field, ~0.8 µs for EventRef and Decision per
# event; tests/perf/ENRICHER.md, "Fifth pass"). unsafe_hash keeps the hash frozen gave them.
@dataclass(slots=True, unsafe_hash=True)
class EventRef:
    """What the lifecycle needs of the event being handled (treated as immutable)."""

    pipeline: str
    event_id: str
    org_id: str
    #: the dedup key; ``None``: the pipeline does not group
    dedup: str | None = None
    #: the event's error (shown as the latest error of an update), if it has one
    error: str | None = None

    def __init__(
        self,
        pipeline: str,
        event_id: str,
        org_id: str,
        dedup: str | None = None,
        error: str | None = None,
    ) -> None:
        # Written out: the dataclass's generated __init__ is interpreted code even when this
        # module is compiled (mypyc compiles only what is in the source), ≈ 0.3 to 0.7 µs per
        # call for EventRef, Origin and Decision, each built per event.
        self.pipeline = pipeline
        self.event_id = event_id
        self.org_id = org_id
        self.dedup = dedup
        self.error = error


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for its __init__'s cost: see EventRef
class ParkRequest:
    """Where a join miss of this event would park, and for how long (treated as immutable)."""

    kind: str
    key: str
    topic: str
    value: bytes
    ttl_ms: int

    def __init__(self, kind: str, key: str, topic: str, value: bytes, ttl_ms: int) -> None:
        # written out, compiled: see EventRef (one per join miss)
        self.kind = kind
        self.key = key
        self.topic = topic
        self.value = value
        self.ttl_ms = ttl_ms


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for its __init__'s cost: see EventRef
class Decision:
    """Messages to produce and state writes to make (puts, then deletes of other keys);
    treated as immutable."""

    action: Action
    messages: tuple[SlackMessage, ...] = ()
    puts: tuple[tuple[bytes, bytes], ...] = ()
    deletes: tuple[bytes, ...] = ()
    #: (expires_at, state key) to add to the partition's expiry ``Schedule``
    schedule: tuple[tuple[int, bytes], ...] = ()
    #: change of the open-group and parked-event counts (the gauges)
    groups_delta: int = 0
    parks_delta: int = 0

    def __init__(
        self,
        action: Action,
        messages: tuple[SlackMessage, ...] = (),
        puts: tuple[tuple[bytes, bytes], ...] = (),
        deletes: tuple[bytes, ...] = (),
        schedule: tuple[tuple[int, bytes], ...] = (),
        groups_delta: int = 0,
        parks_delta: int = 0,
    ) -> None:
        # written out, compiled: see EventRef
        self.action = action
        self.messages = messages
        self.puts = puts
        self.deletes = deletes
        self.schedule = schedule
        self.groups_delta = groups_delta
        self.parks_delta = parks_delta


def is_open(group: Group | None, now: int) -> bool:
    """An open group: present and its window not closed (expiry may not have run yet)."""
    return group is not None and group.expires_at > now


def _update(
    group: Group,
    *,
    pipeline: str,
    org_id: str,
    event_id: str,
    mid: str,
    revision: Revision,
    now: int,
) -> SlackMessage:
    text, blocks = render_update(group.text, group.blocks, revision)
    return new_message(
        mid,
        pipeline,
        group.channel,  # the original's: same partition, after it in the notifier
        text,
        blocks,
        org_id,
        event_id,
        datetime.fromtimestamp(now / 1000, UTC),
        group.message_id,  # update_of
    )


def _seen(group: Group) -> str:
    if group.count == 1:
        return f"Seen once, at {_when(group.first_at)}."
    return (
        f"Seen *{group.count} times*: first at {_when(group.first_at)}, latest at "
        f"{_when(group.latest_at)}."
    )


def status_revision(group: Group) -> Revision:
    """The revision of an open group: how often, since when, the latest error."""
    detail = Detail("Latest error", group.latest_error) if group.latest_error else None
    return Revision(":repeat: " + _seen(group), detail)


def decide(
    outcome: Alert | Miss,
    *,
    event: EventRef,
    group: Group | None,
    window_ms: int,
    park: ParkRequest | None,
    now: int,
    origin: Origin | None = None,
    gkey: bytes | None = None,
) -> Decision:
    """What an event that passed its pipeline's filter becomes, given its route ``outcome``.

    ``group`` is the record at the event's group key (``None`` when absent; an open one with
    a channel must have its original's ``text`` and ``blocks``), ``window_ms`` 0 disables
    grouping and ``park`` ``None`` disables parking: with both off this is today's behaviour
    (a post, or nothing on a miss without fallback). ``origin`` (the event and the lookups
    ``outcome`` was routed with) is what a group opened on the posted message stores instead
    of its text and blocks; ``None`` stores those. ``gkey`` is ``group_key(event.pipeline,
    event.dedup)`` when the caller built it already (to read ``group``); ``None``: built here.
    """
    if event.dedup is None:
        gkey = None
    elif gkey is None:
        gkey = group_key(event.pipeline, event.dedup)
    grouping = gkey is not None and window_ms > 0
    puts: list[tuple[bytes, bytes]] = []
    schedule: list[tuple[int, bytes]] = []
    closed = False
    groups_delta = 0
    if grouping and gkey is not None and group is not None:
        if is_open(group, now):
            grown = Group(  # dataclasses.replace's result, without its interpreted loop
                group.message_id,
                group.channel,
                group.count + 1,
                group.first_at,
                now,
                group.expires_at,
                group.text,
                group.blocks,
                event.error or group.latest_error,
                group.origin,
            )
            messages: tuple[SlackMessage, ...] = ()
            if grown.channel:  # nothing to update while the first event waits unposted
                messages = (
                    _update(
                        grown,
                        pipeline=event.pipeline,
                        org_id=event.org_id,
                        event_id=event.event_id,
                        mid=message_id(event.pipeline, event.event_id),
                        revision=status_revision(grown),
                        now=now,
                    ),
                )
            return Decision(Action.GROUPED, messages, puts=((gkey, grown.encode()),))
        # closed but not yet expired by the punctuator: replaced below (or deleted)
        closed = True
        groups_delta -= 1

    message = outcome.message if isinstance(outcome, Alert) else None
    missed = message is None or (isinstance(outcome, Alert) and outcome.miss is not None)
    if not missed and message is not None:
        # Posted, nothing missing (NEW): nearly every event that is not grouped. The same
        # decision as the general path below, without its lists.
        if not grouping or gkey is None:
            return Decision(Action.NEW, (message,))
        expires_at = now + window_ms
        value = _opened(event, message, now, expires_at, origin)
        return Decision(
            Action.NEW,
            (message,),
            ((gkey, value),),
            (),
            ((expires_at, gkey),),
            groups_delta + 1,  # 0 when it replaces a closed group
        )
    action = Action.NEW if message is not None else Action.MISSED
    parks_delta = 0
    if missed and park is not None:
        reason = outcome.miss if isinstance(outcome, Alert) else outcome.reason
        parked = Park(
            pipeline=event.pipeline,
            kind=park.kind,
            key=park.key,
            topic=park.topic,
            value=base64.b64encode(park.value).decode(),
            event_id=event.event_id,
            org_id=event.org_id,
            reason=reason or "",
            expires_at=now + park.ttl_ms,
            dedup=event.dedup if grouping else None,
            fallback_id=message.message_id if message else None,
            fallback_channel=message.channel if message else None,
            fallback_text=message.text if message else None,
            fallback_blocks=message.blocks if message else None,
        )
        puts.append((parked.state_key, parked.encode()))
        schedule.append((parked.expires_at, parked.state_key))
        action = Action.PARKED
        parks_delta = 1
    if grouping and gkey is not None and action is not Action.MISSED:
        expires_at = now + window_ms
        puts.append((gkey, _opened(event, message, now, expires_at, origin)))
        schedule.append((expires_at, gkey))
        groups_delta += 1
    deletes: tuple[bytes, ...] = ()
    if gkey is not None and closed and action is Action.MISSED:
        deletes = (gkey,)  # the closed group is not replaced
    return Decision(
        action,
        (message,) if message else (),
        tuple(puts),
        deletes,
        tuple(schedule),
        groups_delta,
        parks_delta,
    )


def _opened(
    event: EventRef,
    message: SlackMessage | None,
    now: int,
    expires_at: int,
    origin: Origin | None,
) -> bytes:
    """The encoded group a first event opens: on its posted ``message`` (``None``: nothing
    posted, the event parked), stored with its ``origin`` when it has one (layout 2)."""
    if message is not None and origin is not None:
        # every new alert with grouping on: layout 2 straight from the fields, the same bytes
        # as ``Group(...).encode()`` without building the frozen ``Group``
        return _pack_v2(
            message.message_id, message.channel, 1, now, now, expires_at, event.error, origin
        )
    return Group(
        message_id=message.message_id if message else message_id(event.pipeline, event.event_id),
        channel=message.channel if message else "",
        count=1,
        first_at=now,
        latest_at=now,
        expires_at=expires_at,
        text=message.text if message else "",
        blocks=message.blocks if message else "",
        latest_error=event.error,
    ).encode()


def resolve(
    group: Group | None,
    *,
    gkey: bytes,
    pipeline: str,
    event_id: str,
    org_id: str,
    how: str,
    now: int,
    parks: Iterable[Park] = (),
) -> Decision | None:
    """A resolving event: the open group's message says so and the window closes.

    ``parks`` are the parks the shell found where this event's parks would wait (its org's
    owner, its owner's Slack user); those of ``gkey`` (same pipeline and dedup key) are deleted
    with it: the problem ended, so an owner arriving later must neither get a DM about it nor
    have the fallback copy's "Resolved" overwritten by the re-route note. The parked events are
    not counted again (neither hit nor missed). Without an open group (its window closed while
    a park still waits) the parks go all the same: ``UNPARKED``, updating nothing.

    ``None`` when there is no open group and no such park: the event is what it was before
    (dropped, counted).
    """
    ended = tuple(
        dict.fromkeys(
            p.state_key
            for p in parks
            if p.dedup is not None
            and p.pipeline == pipeline
            and group_key(p.pipeline, p.dedup) == gkey
        )
    )
    if group is None or not is_open(group, now):
        if not ended:
            return None
        return Decision(Action.UNPARKED, deletes=ended, parks_delta=-len(ended))
    messages: tuple[SlackMessage, ...] = ()
    if group.channel:
        status = f":white_check_mark: *Resolved* at {_when(now)}: {escape(how)}. {_seen(group)}"
        # The updates showed the latest error in place of the original's: the resolution
        # keeps it there (a single event's error is the original's own detail already).
        detail = (
            Detail("Latest error", group.latest_error)
            if group.count > 1 and group.latest_error
            else None
        )
        revision = Revision(status, detail, strike_steps=True)
        mid = message_id(pipeline, event_id)
        messages = (
            _update(
                group,
                pipeline=pipeline,
                org_id=org_id,
                event_id=event_id,
                mid=mid,
                revision=revision,
                now=now,
            ),
        )
    return Decision(
        Action.RESOLVED,
        messages,
        deletes=(gkey, *ended),
        groups_delta=-1,
        parks_delta=-len(ended),
    )


def on_park_hit(
    park: Park,
    outcome: Alert | Miss,
    *,
    group: Group | None,
    repark: tuple[str, str] | None,
    now: int,
    origin: Origin | None = None,
) -> Decision:
    """A lookup ``park`` waited for arrived and the event was routed again (no fallback).

    ``outcome`` is that routing, its message id ``park.hit_message_id()``. A ``Miss`` means
    another lookup is still missing: ``repark`` names it (kind, key) and the park moves there,
    keeping its deadline. An ``Alert`` is DM'd; a fallback copy is updated to say where the
    alert went, and an open group of the event moves to the DM (with an update right away when
    more events were grouped meanwhile). ``origin`` is the event and the lookups the DM was
    routed with: what the moved group stores (``None``: the DM's text and blocks).

    A park never outlives its key's resolution (``resolve`` deletes it), so a hit is about a
    problem not known to be over; one whose group's window merely closed still DMs.
    """
    old = park.state_key
    if isinstance(outcome, Miss):
        if repark is None or repark == (park.kind, park.key):
            return Decision(Action.NONE)
        moved = Park(  # dataclasses.replace's result, compiled
            park.pipeline,
            repark[0],
            repark[1],
            park.topic,
            park.value,
            park.event_id,
            park.org_id,
            outcome.reason,
            park.expires_at,
            park.dedup,
            park.fallback_id,
            park.fallback_channel,
            park.fallback_text,
            park.fallback_blocks,
        )
        return Decision(
            Action.REPARKED,
            puts=((moved.state_key, moved.encode()),),
            deletes=(old,),
            schedule=((moved.expires_at, moved.state_key),),
        )
    dm = outcome.message
    messages: list[SlackMessage] = [dm]
    puts: list[tuple[bytes, bytes]] = []
    if park.fallback_id is not None and park.fallback_channel:
        copy = Group(
            message_id=park.fallback_id,
            channel=park.fallback_channel,
            count=1,
            first_at=now,
            latest_at=now,
            expires_at=now,
            text=park.fallback_text or "",
            blocks=park.fallback_blocks or "[]",
        )
        where = (
            f":arrow_right: *Sent to <@{escape(dm.channel)}>* at {_when(now)}: the owner is "
            "known now, so the alert went to them directly."
        )
        messages.append(
            _update(
                copy,
                pipeline=park.pipeline,
                org_id=park.org_id,
                event_id=park.event_id,
                mid=derived_id(park.pipeline, park.event_id, SUFFIX_REROUTED),
                revision=Revision(where),
                now=now,
            )
        )
    planned = (park.fallback_id, message_id(park.pipeline, park.event_id))
    if park.dedup is not None and group is not None and group.message_id in planned:
        moved_group = Group(
            dm.message_id,
            dm.channel,
            group.count,
            group.first_at,
            group.latest_at,
            group.expires_at,
            dm.text,
            dm.blocks,
            group.latest_error,
            origin,  # the DM's, never the copy's
        )
        puts.append((group_key(park.pipeline, park.dedup), moved_group.encode()))
        if moved_group.count > 1:
            messages.append(
                _update(
                    moved_group,
                    pipeline=park.pipeline,
                    org_id=park.org_id,
                    event_id=park.event_id,
                    mid=derived_id(park.pipeline, park.event_id, SUFFIX_CATCHUP),
                    revision=status_revision(moved_group),
                    now=now,
                )
            )
    return Decision(Action.HIT, tuple(messages), tuple(puts), deletes=(old,), parks_delta=-1)


def expire_park(park: Park, *, group: Group | None) -> Decision:
    """The park's time ran out: the miss is final (its fallback copy, if any, stays).

    A group the park opened without posting anything goes too: there is no message to update.
    """
    deletes = [park.state_key]
    groups_delta = 0
    if (
        park.dedup is not None
        and group is not None
        and not group.channel
        and group.message_id == message_id(park.pipeline, park.event_id)
    ):
        gkey = group_key(park.pipeline, park.dedup)
        deletes.append(gkey)
        groups_delta = -1
    return Decision(
        Action.EXPIRED_PARK, deletes=tuple(deletes), groups_delta=groups_delta, parks_delta=-1
    )


def expire_group(group: Group | None = None, *, gkey: bytes) -> Decision:
    """The window closed: forget the group (the next event of its key posts anew).

    Nothing of ``group`` is read: the punctuator does not decode it (every group expires, so
    that decode would be per new alert).
    """
    return Decision(Action.EXPIRED_GROUP, deletes=(gkey,), groups_delta=-1)


class Schedule:
    """What expires when, per input partition: a heap of ``(expires_at, state key)``.

    Entries are hints: the record decides. A record deleted or replaced since (resolved, hit,
    re-opened with a later expiry) makes its entry stale, and the caller skips an entry whose
    record's ``expires_at`` differs. ``reset`` rebuilds a partition from its records.
    """

    def __init__(self) -> None:
        self._heaps: dict[tuple[str, int], list[tuple[int, bytes]]] = {}

    def add(self, tp: tuple[str, int], entries: Iterable[tuple[int, bytes]]) -> None:
        """Schedule ``entries`` of partition ``tp``."""
        heap = self._heaps.get(tp)  # not setdefault: no empty list built per call
        if heap is None:
            heap = self._heaps[tp] = []
        for entry in entries:
            heapq.heappush(heap, entry)

    def reset(self, tp: tuple[str, int], entries: Iterable[tuple[int, bytes]]) -> None:
        """Partition ``tp``'s schedule is exactly ``entries`` (read from its state)."""
        heap = list(entries)
        heapq.heapify(heap)
        self._heaps[tp] = heap

    def due(self, tp: tuple[str, int], now: int, limit: int) -> list[tuple[int, bytes]]:
        """Remove and return up to ``limit`` entries of ``tp`` expiring at or before ``now``."""
        heap = self._heaps.get(tp)
        out: list[tuple[int, bytes]] = []
        while heap and heap[0][0] <= now and len(out) < limit:
            out.append(heapq.heappop(heap))
        return out

    def retain(self, tps: Collection[tuple[str, int]]) -> None:
        """Forget partitions no longer assigned."""
        for tp in [tp for tp in self._heaps if tp not in tps]:
            del self._heaps[tp]

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps.values())


def expires_at_of(key: bytes, raw: bytes) -> int:
    """The ``expires_at`` of the group or park stored at ``key`` (for the schedule)."""
    if key.startswith(GROUP_PREFIX):
        return Group.expires_at_of(raw)
    return Park.expires_at_of(raw)
