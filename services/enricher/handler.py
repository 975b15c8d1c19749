"""The enricher's per-event shell: decode, validate, look up, route, encode, produce, count.

This is the hot path: it runs once per consumed event, so it is kept apart from the service's
lifecycle (``app.py``) and built only from what it needs (a registry, the pipelines by topic,
two lookups), which also lets the golden corpus and the benchmark drive exactly the code the
service runs. Every decision is the core's; this module only moves bytes and counts.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message
from prometheus_client import Counter, Gauge

from libs.kafka import Emitter, InvalidRecordError, RetryLater
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    CsdrAssignment,
    DeserializationError,
    RegistryError,
    SchemaRegistry,
    SlackMessage,
    SlackUser,
    encode_key,
)
from libs.state import KeyValueState
from services.enricher.core import (
    NO_SLACK_USER,
    Alert,
    Drop,
    Lookup,
    Miss,
    Outcome,
    Pipeline,
    invalid_reason,
    process,
    route,
    slack_user_key,
)
from services.enricher.lifecycle import (
    OWNER,
    USER,
    Action,
    Decision,
    EventRef,
    Group,
    Origin,
    Park,
    ParkRequest,
    Schedule,
    decide,
    epoch_ms,
    group_key,
    is_open,
    park_prefix,
    resolve,
)

log = logging.getLogger(__name__)

EVENTS = Counter(
    "enricher_events_total",
    (
        "Events handled, by pipeline and outcome: dm, fallback (posted to the fallback"
        " channel), dropped (filtered), missed (a join miss with no fallback, or a park that"
        " expired with nothing posted), parked (waiting for a late owner), grouped (updated an"
        " open alert), resolved"
    ),
    ["pipeline", "outcome"],
)
DROPS = Counter(
    "enricher_dropped_total",
    "Events the pipeline's filter dropped, by reason",
    ["pipeline", "reason"],
)
MISSES = Counter(
    "enricher_join_misses_total",
    "Join misses by reason; action: the alert went to the fallback channel or was dropped",
    ["pipeline", "reason", "action"],
)
INVALID_EVENTS = Counter(
    "enricher_invalid_events_total", "Events dead-lettered as invalid", ["pipeline"]
)
OPEN_GROUPS = Gauge(
    "enricher_open_groups", "Open alert groups (alerts later events of their key update)"
)
PARKED_EVENTS = Gauge(
    "enricher_parked_events", "Join misses parked until their owner or Slack user arrives"
)
UPDATES = Counter(
    "enricher_alert_updates_total",
    "Updates of an open alert by a later event of its key (chat.update)",
    ["pipeline"],
)
RESOLUTIONS = Counter(
    "enricher_alert_resolutions_total", "Open alerts marked resolved", ["pipeline"]
)
PARK_HITS = Counter(
    "enricher_park_hits_total",
    "Parked events routed to their owner once the missing lookup arrived",
    ["pipeline"],
)
PARK_EXPIRIES = Counter(
    "enricher_park_expiries_total",
    "Parked events whose time ran out (the miss is final: fallback copy or dropped)",
    ["pipeline"],
)


class InvalidEventError(InvalidRecordError):
    """A decodable event that cannot be processed (empty ids); it is dead-lettered."""


# The dead-letter header ``dlq.error.class`` names this class; it kept the name it had before
# the hot path moved here, so what operators filter on does not change (app.py re-exports it).
# (setattr: mypyc compiles this module and refuses a plain assignment to a class attribute
# that is not declared ClassVar; the effect is the same)
setattr(InvalidEventError, "__module__", "services.enricher.app")  # noqa: B010


@dataclass(frozen=True)
class _Source:
    """One consumed topic: its pipeline and the decoder of its record type."""

    pipeline: Pipeline[Any]
    decode: AvroDeserializer[Any]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LifecycleConfig:
    """The alert lifecycle's settings: grouping window per pipeline, park time to live."""

    #: pipeline name -> grouping window in ms (absent or 0: no grouping)
    windows_ms: Mapping[str, int]
    #: 0: no parking
    park_ttl_ms: int


class LifecycleCounts:
    """Open groups and parked events per input partition (the two gauges are their sums), and
    the expiry ``Schedule``.

    The handler and the punctuator add each decision's deltas and schedule entries; the
    punctuator recounts and reschedules a partition when it first sees its state (restored,
    or moved here) and forgets revoked ones.
    """

    def __init__(self) -> None:
        self.by_partition: dict[tuple[str, int], list[int]] = {}
        self.schedule = Schedule()
        OPEN_GROUPS.set_function(lambda: sum(c[0] for c in self.by_partition.values()))
        PARKED_EVENTS.set_function(lambda: sum(c[1] for c in self.by_partition.values()))

    def add(self, tp: tuple[str, int], decision: Decision) -> None:
        """Count and schedule ``decision``'s changes against partition ``tp``."""
        if decision.schedule:
            self.schedule.add(tp, decision.schedule)
        groups, parks = decision.groups_delta, decision.parks_delta
        if groups or parks:
            counts = self.by_partition.get(tp)
            if counts is None:
                counts = self.by_partition[tp] = [0, 0]
            if groups:
                counts[0] = max(0, counts[0] + groups)
            if parks:
                counts[1] = max(0, counts[1] + parks)

    def recount(self, tp: tuple[str, int], groups: int, parks: int) -> None:
        """The counts of a partition whose state was just read in full."""
        self.by_partition[tp] = [groups, parks]

    def retain(self, tps: Collection[tuple[str, int]]) -> None:
        """Forget partitions no longer assigned."""
        for tp in [tp for tp in self.by_partition if tp not in tps]:
            del self.by_partition[tp]
        self.schedule.retain(tps)


def state_of(out: Emitter) -> KeyValueState | None:
    """The state of the record's input partition, when the loop keeps state."""
    # A loop without state stores answers RuntimeError (test emitters have no attribute).
    try:
        state: KeyValueState | None = getattr(out, "state", None)
    except RuntimeError:
        return None
    return state


def _children(metric: Counter, pipelines: Mapping[str, Pipeline[Any]]) -> dict[str, Any]:
    # labels() locks and builds a tuple per call: bind each child once
    return {p.name: metric.labels(p.name) for p in pipelines.values()}


class EventHandler:
    """Handles one consumed event (the loop's handler); ``outcomes`` tallies what became of them."""

    def __init__(
        self,
        registry: SchemaRegistry,
        pipelines: Mapping[str, Pipeline[Any]],
        owners: Lookup[CsdrAssignment],
        users: Lookup[SlackUser],
        *,
        out_topic: str,
        fallback_channel: str | None,
        clock: Callable[[], datetime] = _utc_now,
        lifecycle: LifecycleConfig | None = None,
        counts: LifecycleCounts | None = None,
        store_origins: bool = True,
    ) -> None:
        """``store_origins=False`` stores an open group's rendered original instead of its
        ``Origin`` (layout 1, as before lc6): how the previous version's groups are written
        for the tests that hold the two layouts to render the same updates."""
        self._store_origins = store_origins
        self._sources = {
            topic: _Source(pipeline, AvroDeserializer(registry, pipeline.record_type))
            for topic, pipeline in pipelines.items()
        }
        self._owners = owners
        self._users = users
        self._out_topic = out_topic
        self._fallback_channel = fallback_channel
        self._clock = clock
        # an alert's blocks may come as the UTF-8 its template wrote (Alert.blocks_utf8)
        self._encode = AvroSerializer(registry, SlackMessage, utf8_fields=("blocks",))
        self.outcomes: Tally[tuple[str, str]] = Tally()
        #: ``outcomes`` as last added to ``enricher_events_total`` (``publish_counts``)
        self._published: dict[tuple[str, str], int] = {}
        self._lifecycle = lifecycle
        self.counts = counts or LifecycleCounts()
        self._updates = _children(UPDATES, pipelines)
        self._resolutions = _children(RESOLUTIONS, pipelines)

    def __call__(self, msg: Message, out: Emitter) -> None:
        """Decode, validate, join and route one event; produce its message, if any."""
        topic = str(msg.topic())
        source = self._sources[topic]
        pipeline = source.pipeline
        try:
            event = source.decode.decode(
                msg.value(), topic, int(msg.partition() or 0), int(msg.offset() or 0)
            )
        except DeserializationError as exc:
            retry_if_registry_down(exc)
            raise
        problem = invalid_reason(event)
        if problem is not None:
            INVALID_EVENTS.labels(pipeline.name).inc()
            raise InvalidEventError(f"{pipeline.name}: {problem}")
        now = self._clock()
        try:
            outcome = process(
                event,
                pipeline=pipeline,
                owners=self._owners,
                users=self._users,
                now=now,
                fallback_channel=self._fallback_channel,
            )
        except DeserializationError as exc:
            # Table records were validated when applied: failing to decode one now means the
            # registry is unreachable, not that this event is bad.
            raise RetryLater(f"lookup decode failed: {exc}", delay_s=5.0) from exc
        lifecycle = self._lifecycle
        state = state_of(out) if lifecycle is not None else None
        if lifecycle is None or state is None:
            self._act(pipeline.name, event, outcome, out)
        else:
            self._lifecycle_act(msg, source, event, outcome, out, state, lifecycle, now)

    # -- the alert lifecycle (services/enricher/lifecycle.py decides) ------------------------
    def _lifecycle_act(
        self,
        msg: Message,
        source: _Source,
        event: Any,
        outcome: Outcome,
        out: Emitter,
        state: KeyValueState,
        lifecycle: LifecycleConfig,
        now_dt: datetime,
    ) -> None:
        pipeline = source.pipeline
        name = pipeline.name
        now = epoch_ms(now_dt)
        tp = (str(msg.topic()), int(msg.partition() or 0))
        window = lifecycle.windows_ms.get(name, 0)
        dedup_of = pipeline.dedup_key
        dedup = dedup_of(event) if dedup_of is not None and window > 0 else None
        if isinstance(outcome, Drop):
            how = pipeline.resolves(event) if pipeline.resolves and dedup is not None else None
            resolved = None
            parks: Sequence[Park] = ()
            if how is not None and dedup is not None:
                gkey = group_key(name, dedup)
                raw = state.get(gkey)
                stored = Group.decode(raw) if raw else None
                ttl = lifecycle.park_ttl_ms
                if ttl > 0 and (raw is not None or ttl > window):
                    # The parks of its key end with the problem. A park opens its key's group,
                    # which outlives it when the window is at least the park's time (as by
                    # default): no group, no park, so the resolving events of connectors that
                    # never failed (most) scan nothing. A scan costs O(this interval's writes).
                    parks = self._parks_of(state, event.org_id, stored)
                resolved = resolve(
                    self._original(stored, source, tp, now_dt) if stored is not None else None,
                    gkey=gkey,
                    pipeline=name,
                    event_id=event.event_id,
                    org_id=event.org_id,
                    how=how,
                    now=now,
                    parks=parks,
                )
            if resolved is not None:
                self._apply(resolved, tp, out, state)
                if resolved.parks_delta:
                    self._log_unparked(parks, resolved, event.event_id)
            if resolved is None or resolved.action is not Action.RESOLVED:
                # resolves no open alert: a drop, counted as always (its parks, if any, went)
                self._act(name, event, outcome, out)
                return
            self._count(name, "resolved")
            self._resolutions[name].inc()
            return
        group = None
        group_at: bytes | None = None
        if dedup is not None:
            group_at = group_key(name, dedup)  # built once: decide takes it
            raw = state.get(group_at)
            if raw:
                group = self._original(Group.decode(raw), source, tp, now_dt)
        alert: Alert | None
        if isinstance(outcome, Alert):
            alert, miss = outcome, outcome.miss
        else:
            alert, miss = None, outcome.reason
        value = msg.value() or b""
        park = None
        if miss is not None and lifecycle.park_ttl_ms > 0:
            kind, key = self._missing(miss, event.org_id)
            park = ParkRequest(kind, key, tp[0], bytes(value), lifecycle.park_ttl_ms)
        error_of = pipeline.error
        ref = EventRef(
            name, event.event_id, event.org_id, dedup, error_of(event) if error_of else None
        )
        origin = None
        if dedup is not None and alert is not None and self._store_origins:
            # what renders the message again if a later event updates it (stored instead of it)
            origin = Origin(bytes(value), alert.owner, alert.user)
        decision = decide(
            outcome,
            event=ref,
            group=group,
            window_ms=window,
            park=park,
            now=now,
            origin=origin,
            gkey=group_at,
        )
        action = decision.action
        if (
            action is Action.NEW
            or action is Action.MISSED
            or (action is Action.PARKED and decision.messages)
        ):
            # what it was before the lifecycle, produced and counted the same way (a parked
            # miss's fallback copy is posted now: that miss is counted now, as before)
            self._apply(decision, tp, out, state, produce=False)
            self._act(name, event, outcome, out)
            return
        self._apply(decision, tp, out, state)
        if action is Action.GROUPED:
            self._count(name, "grouped")
            if decision.messages:
                self._updates[name].inc()
        else:  # PARKED, nothing posted: counted as missed if its time runs out (punctuator)
            self._count(name, "parked")

    def _original(
        self, group: Group, source: _Source, tp: tuple[str, int], now_dt: datetime
    ) -> Group:
        """``group`` with its original's text and blocks when an update may need them.

        A group stored with its ``Origin`` (the event and the lookups it was routed with) has
        them rendered again: the same ``route``, message id and channel as the original, so
        the same text and blocks as long as the pipeline's code and link templates are the
        same (after a change, an update shows the new rendering of the original). Only open
        groups with a posted message are rendered: nothing else reads the text.
        """
        origin = group.origin
        if origin is None or not group.channel or not is_open(group, epoch_ms(now_dt)):
            return group
        try:
            event = source.decode.decode(origin.event, tp[0], tp[1], 0)
        except DeserializationError as exc:
            retry_if_registry_down(exc)  # a registry outage: the event is replayed later
            event = None
            log.warning("alert group's original not decodable: %s", exc)
        outcome = None
        if event is not None:
            outcome = route(
                event,
                origin.owner,
                origin.user,
                pipeline=source.pipeline,
                now=now_dt,
                fallback_channel=group.channel,  # a fallback copy's channel; unused by a DM
                mid=group.message_id,
            )
        if not isinstance(outcome, Alert):
            # Not renderable (an event the reader schema no longer reads; a channel given, so
            # route always alerts): the group is treated as closed, so this event posts anew
            # instead of overwriting the original with an update that lost its content.
            return _with(group, group.text, group.blocks, epoch_ms(now_dt))
        message = outcome.message
        return _with(group, message.text, message.blocks, group.expires_at)

    def _parks_of(self, state: KeyValueState, org_id: str, group: Group | None) -> list[Park]:
        """The parks a resolving event of ``org_id`` may end: those waiting for the org's owner
        and for the owner's Slack user (``resolve`` keeps those of its key).

        A user park waits under the e-mail the owner had when it parked (``_missing``): the
        owners table's e-mail now, and the one the group's message was routed with if it
        differs (an e-mail changed since a fallback copy was posted). A park moved to an
        e-mail that changed since, with no group naming it, is not found: it can still DM.
        """
        try:
            owner = self._owners.get(org_id)
        except DeserializationError as exc:
            raise RetryLater(f"lookup decode failed: {exc}", delay_s=5.0) from exc
        prefixes = [park_prefix(OWNER, org_id)]
        for known in (owner, group.origin.owner if group and group.origin else None):
            if known is not None and known.csdr_email:
                prefix = park_prefix(USER, slack_user_key(known.csdr_email))
                if prefix not in prefixes:
                    prefixes.append(prefix)
        return [Park.decode(raw) for prefix in prefixes for _, raw in state.prefix(prefix)]

    @staticmethod
    def _log_unparked(parks: Sequence[Park], decision: Decision, resolved_by: str) -> None:
        ended = set(decision.deletes)
        for park in parks:
            if park.state_key in ended:
                log.info(
                    "parked event resolved before its lookup arrived: not routed",
                    extra={
                        "pipeline": park.pipeline,
                        "event_id": park.event_id,
                        "resolved_by": resolved_by,
                    },
                )

    def _missing(self, reason: str, org_id: str) -> tuple[str, str]:
        """(park kind, key) of a join miss: the org's owner, or the owner's Slack user."""
        if reason == NO_SLACK_USER:
            owner = self._owners.get(org_id)
            if owner is not None and owner.csdr_email:
                return USER, slack_user_key(owner.csdr_email)
        return OWNER, org_id

    def _apply(
        self,
        decision: Decision,
        tp: tuple[str, int],
        out: Emitter,
        state: KeyValueState,
        *,
        produce: bool = True,
    ) -> None:
        if produce:
            for message in decision.messages:
                self._produce(message, out)
        if decision.puts:
            put = state.put
            for key, value in decision.puts:
                put(key, value)
        if decision.deletes:
            delete = state.delete
            for key in decision.deletes:
                delete(key)
        self.counts.add(tp, decision)

    def _produce(
        self, message: SlackMessage, out: Emitter, blocks_utf8: bytes | None = None
    ) -> None:
        try:
            value = self._encode.encode(self._out_topic, message, blocks_utf8)
        except RegistryError as exc:
            raise RetryLater(f"schema registry unavailable: {exc}", delay_s=5.0) from exc
        # keyed by channel: an update lands in its original's partition, after it
        out.produce(self._out_topic, encode_key(message.channel), value)

    def _act(self, pipeline: str, event: Any, outcome: Outcome, out: Emitter) -> None:
        if isinstance(outcome, Alert):
            self._produce(outcome.message, out, outcome.blocks_utf8)
            if outcome.miss is None:
                self._count(pipeline, "dm")
            else:
                self._count(pipeline, "fallback")
                MISSES.labels(pipeline, outcome.miss, "fallback").inc()
        elif isinstance(outcome, Drop):
            self._count(pipeline, "dropped")
            DROPS.labels(pipeline, outcome.reason).inc()
        elif isinstance(outcome, Miss):
            self._count(pipeline, "missed")
            MISSES.labels(pipeline, outcome.reason, "dropped").inc()
            log.info(
                "join miss, alert dropped (no fallback channel)",
                extra={
                    "pipeline": pipeline,
                    "reason": outcome.reason,
                    "org_id": event.org_id,
                    "event_id": event.event_id,
                },
            )

    def _count(self, pipeline: str, outcome: str) -> None:
        # published to EVENTS by publish_counts: a counter's inc() takes a lock per call
        self.outcomes[pipeline, outcome] += 1

    def publish_counts(self) -> None:
        """Add the outcomes counted since the last call to ``enricher_events_total``.

        The service calls it after every checkpoint of its loop (one rolled back leaves its
        counts to the next) and on close, so the counter lags the handler by about a checkpoint
        interval. An event counts once it is handled, also when its interval is rolled back and
        replayed (as when it was counted per event).
        """
        published = self._published
        for key, total in self.outcomes.items():
            added = total - published.get(key, 0)
            if added:
                EVENTS.labels(*key).inc(added)
                published[key] = total


def _with(group: Group, text: str, blocks: str, expires_at: int) -> Group:
    """``dataclasses.replace(group, text=text, blocks=blocks, expires_at=expires_at)``,
    compiled (the function is an interpreted loop over the fields; one per update)."""
    return Group(
        group.message_id,
        group.channel,
        group.count,
        group.first_at,
        group.latest_at,
        expires_at,
        text,
        blocks,
        group.latest_error,
        group.origin,
    )


def retry_if_registry_down(exc: DeserializationError) -> None:
    """Raise ``RetryLater`` when ``exc`` is an unreachable registry, not a bad record."""
    # An unreachable registry is not the record's fault: replay it later instead of
    # dead-lettering a valid event.
    if exc.registry_unavailable:
        raise RetryLater(f"schema registry unavailable: {exc}", delay_s=5.0) from exc
