"""The alert lifecycle on time and on lookup changes: the enricher's punctuator.

The loop calls it on its own thread every ``punctuate_interval_s`` with the state of every
assigned, restored input partition; what it produces and writes commits with the next
checkpoint, like the handler's outputs. It does three things, each reading only what it needs:

* lookup arrivals: the lookup tables report the keys they applied live (``note_owners`` /
  ``note_users``, called on the same thread before each poll); for each such key the parks
  waiting for it are found by prefix (``p/owner/<org id>`` or ``p/user/<e-mail>``) and routed
  again;
* a partition seen for the first time (restored at start, or moved here by a rebalance; every
  partition again after an aborted transaction, see ``resweep``) has every park checked once
  against the tables: a lookup may have arrived while nobody was watching (before this
  instance started, or on the instance that had the partition);
* expiry: the in-memory ``Schedule`` (rebuilt from the state at first sight) names what is
  due; each due record is read and checked (its ``expires_at`` decides, the entry is a hint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from libs.kafka import Emitter
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
    Pipeline,
    route,
    slack_user_key,
)
from services.enricher.handler import (
    EVENTS,
    MISSES,
    PARK_EXPIRIES,
    PARK_HITS,
    LifecycleCounts,
)
from services.enricher.lifecycle import (
    GROUP_PREFIX,
    OWNER,
    PARK_PREFIX,
    USER,
    Action,
    Decision,
    Group,
    Origin,
    Park,
    expire_group,
    expire_park,
    expires_at_of,
    group_key,
    on_park_hit,
    park_prefix,
)

log = logging.getLogger(__name__)

#: at most this many due entries per partition and punctuation (the rest wait for the next)
MAX_DUE = 1000

Partition = tuple[str, int]


@dataclass(frozen=True)
class _Source:
    pipeline: Pipeline[Any]
    decode: AvroDeserializer[Any]


class LifecyclePunctuator:
    """Routes parked events whose lookup arrived and expires groups and parks that are due."""

    def __init__(
        self,
        registry: SchemaRegistry,
        pipelines: Mapping[str, Pipeline[Any]],
        owners: Lookup[CsdrAssignment],
        users: Lookup[SlackUser],
        *,
        out_topic: str,
        counts: LifecycleCounts,
        store_origins: bool = True,
    ) -> None:
        """``store_origins``: as ``EventHandler``'s (``False``: groups as before lc6)."""
        self._store_origins = store_origins
        self._sources = {
            p.name: _Source(p, AvroDeserializer(registry, p.record_type))
            for p in pipelines.values()
        }
        self._owners = owners
        self._users = users
        self._out_topic = out_topic
        self._encode = AvroSerializer(registry, SlackMessage)
        self._counts = counts
        self._pending: set[tuple[str, str]] = set()
        self._seen: set[Partition] = set()
        self._hits = {name: PARK_HITS.labels(name) for name in self._sources}
        self._expiries = {name: PARK_EXPIRIES.labels(name) for name in self._sources}

    # -- lookup changes (GlobalTable.on_change) --------------------------------------------
    def note_owners(self, keys: Sequence[bytes]) -> None:
        """Org ids whose assignment changed: their parks are routed at the next punctuation."""
        self._pending.update((OWNER, k.decode("utf-8", "replace")) for k in keys)

    def note_users(self, keys: Sequence[bytes]) -> None:
        """E-mails whose Slack user changed."""
        self._pending.update((USER, k.decode("utf-8", "replace")) for k in keys)

    def resweep(self) -> None:
        """Treat every partition as new at the next punctuation: check all parks, recount.

        After an aborted transaction: its state writes are gone, and so may be the routing of
        parks whose lookup arrived (their keys were consumed from the pending set), and the
        gauges' deltas no longer match the state.
        """
        self._seen.clear()

    # -- the punctuation ---------------------------------------------------------------------
    def __call__(
        self, states: Mapping[Partition, KeyValueState], out: Emitter, now_s: float
    ) -> None:
        """One round: new partitions, lookup arrivals, then what is due (``now_s``: epoch s)."""
        now = int(now_s * 1000)
        current = set(states)
        self._seen &= current
        self._counts.retain(current)
        for tp in sorted(current - self._seen):
            self._first_sight(tp, states[tp], out, now)
            self._seen.add(tp)
        pending, self._pending = self._pending, set()
        for kind, key in sorted(pending):
            prefix = park_prefix(kind, key)
            for tp, state in states.items():
                for _, raw in list(state.prefix(prefix)):
                    self._route_parked(tp, state, Park.decode(raw), out, now)
        for tp, state in states.items():
            self._expire(tp, state, out, now)

    def _first_sight(self, tp: Partition, state: KeyValueState, out: Emitter, now: int) -> None:
        due = [(expires_at_of(k, raw), k) for k, raw in state.prefix(GROUP_PREFIX)]
        groups = len(due)
        parks = [Park.decode(raw) for _, raw in state.prefix(PARK_PREFIX)]
        due += [(park.expires_at, park.state_key) for park in parks]
        self._counts.recount(tp, groups, len(parks))
        self._counts.schedule.reset(tp, due)
        for park in parks:
            if park.expires_at > now:
                self._route_parked(tp, state, park, out, now)

    def _route_parked(
        self, tp: Partition, state: KeyValueState, park: Park, out: Emitter, now: int
    ) -> None:
        source = self._sources.get(park.pipeline)
        if source is None:  # a pipeline removed since: its parks can only expire
            return
        try:
            event = source.decode(park.event_bytes(), topic=park.topic, partition=tp[1], offset=0)
            owner = self._owners.get(park.org_id)
            user = (
                self._users.get(slack_user_key(owner.csdr_email))
                if owner and owner.csdr_email
                else None
            )
        except DeserializationError as exc:
            # the registry is unreachable (the event decoded once already): try again later
            log.warning("parked event not routed yet: %s", exc, extra={"event_id": park.event_id})
            self._pending.add((park.kind, park.key))
            return
        outcome = route(
            event,
            owner,
            user,
            pipeline=source.pipeline,
            now=datetime.fromtimestamp(now / 1000, UTC),
            fallback_channel=None,
            mid=park.hit_message_id(),
        )
        if isinstance(outcome, Drop):  # route never filters; kept total for the type
            return
        repark = None
        if isinstance(outcome, Miss):
            if outcome.reason == NO_SLACK_USER and owner is not None and owner.csdr_email:
                repark = (USER, slack_user_key(owner.csdr_email))
            else:
                repark = (OWNER, park.org_id)
        group = self._group(state, park)
        origin = None
        if isinstance(outcome, Alert) and self._store_origins:
            # the group that follows the DM renders it again
            origin = Origin(park.event_bytes(), outcome.owner, outcome.user)
        decision = on_park_hit(park, outcome, group=group, repark=repark, now=now, origin=origin)
        if not self._apply(tp, state, decision, out):
            self._pending.add((park.kind, park.key))
        elif decision.action is Action.HIT:
            self._hits[park.pipeline].inc()

    def _group(self, state: KeyValueState, park: Park) -> Group | None:
        if park.dedup is None:
            return None
        raw = state.get(group_key(park.pipeline, park.dedup))
        return Group.decode(raw) if raw else None

    def _expire(self, tp: Partition, state: KeyValueState, out: Emitter, now: int) -> None:
        for expires_at, state_key in self._counts.schedule.due(tp, now, MAX_DUE):
            raw = state.get(state_key)
            if raw is None or expires_at_of(state_key, raw) != expires_at:
                continue  # gone or replaced since (resolved, hit, re-opened): a stale entry
            if state_key.startswith(GROUP_PREFIX):
                self._apply(tp, state, expire_group(gkey=state_key), out)
                continue
            park = Park.decode(raw)
            self._apply(tp, state, expire_park(park, group=self._group(state, park)), out)
            log.info(
                "parked event expired: the miss is final",
                extra={"pipeline": park.pipeline, "event_id": park.event_id},
            )
            self._expiries[park.pipeline].inc()
            if park.fallback_id is None:
                # nothing was posted for it: the miss is final now, counted as before
                EVENTS.labels(park.pipeline, "missed").inc()
                MISSES.labels(park.pipeline, park.reason, "dropped").inc()

    def _apply(self, tp: Partition, state: KeyValueState, decision: Decision, out: Emitter) -> bool:
        """Produce and write ``decision``; ``False`` (nothing done) if the registry is down."""
        try:
            # every message encoded before any is produced: all of a decision, or none of it
            encoded = [
                (encode_key(m.channel), self._encode(self._out_topic, m)) for m in decision.messages
            ]
        except RegistryError as exc:
            log.warning("lifecycle output not encoded, retried later: %s", exc)
            return False
        for key, value in encoded:
            out.produce(self._out_topic, key, value)
        for key, value in decision.puts:
            state.put(key, value)
        for key in decision.deletes:
            state.delete(key)
        self._counts.add(tp, decision)
        return True
