"""The alert lifecycle: group, update, resolve, park, expire (pure decisions, injected time).

The decisions of ``services/enricher/lifecycle.py`` are tested table-driven; then the shells
that apply them (the handler per event, the punctuator on time and lookup changes) on
``MemoryState``, with the real Avro serde over an in-memory registry.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from prometheus_client import REGISTRY

from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    CsdrAssignment,
    InMemorySchemaRegistry,
    SlackMessage,
    SlackUser,
)
from libs.state import MemoryState
from services.enricher import lifecycle
from services.enricher.core import (
    NO_OWNER,
    NO_SLACK_USER,
    Alert,
    Miss,
    message_id,
    process,
    slack_user_key,
)
from services.enricher.handler import EventHandler, LifecycleConfig, LifecycleCounts
from services.enricher.lifecycle import (
    GROUP_PREFIX,
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
    derived_id,
    epoch_ms,
    expire_group,
    expire_park,
    expires_at_of,
    group_key,
    on_park_hit,
    park_key,
    park_prefix,
    resolve,
    status_revision,
)
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING
from services.enricher.punctuator import LifecyclePunctuator
from services.enricher.render import Detail, Revision, render_update
from tests.support.enricher_corpus import (
    FALLBACK,
    ConsumedRecord,
    DictLookup,
    ListEmitter,
    connector,
    onboarding,
    owner,
    user,
)

P = CONNECTOR.name
T = 1_800_000_000_000  # "now" of the pure tests, epoch ms
W = 3_600_000
TTL = 3_600_000
OUT = "slack-messages"


def alert(event_id: str = "ev-1", channel: str = "U0DANA", miss: str | None = None) -> Alert:
    """The route outcome of an event (the message as the core renders it)."""
    event = connector(int(event_id.split("-")[1]))
    outcome = process(
        event,
        pipeline=CONNECTOR,
        owners=DictLookup({} if miss == NO_OWNER else {"org-1": owner()}),
        users=DictLookup({} if miss else {"dana.owner@example.com": user(channel)}),
        now=datetime.fromtimestamp(T / 1000, UTC),
        fallback_channel=FALLBACK if miss else None,
    )
    assert isinstance(outcome, Alert)
    return outcome


def ref(
    event_id: str = "ev-1", dedup: str | None = "lcc-1", error: str | None = "boom"
) -> EventRef:
    return EventRef(P, event_id, "org-1", dedup, error)


def group(**changes: Any) -> Group:
    first = alert().message
    base = Group(
        first.message_id,
        first.channel,
        1,
        T - 1000,
        T - 1000,
        T + W,
        first.text,
        first.blocks,
        "boom",
    )
    return dataclasses.replace(base, **changes)


def park_request(kind: str = OWNER, key: str = "org-1") -> ParkRequest:
    return ParkRequest(kind, key, "data-notifications-pipeline", b"\x00avro", TTL)


def keys(decision: Decision) -> list[bytes]:
    return [k for k, _ in decision.puts]


# -- keys -------------------------------------------------------------------------------------
def test_schedule_pops_what_is_due_in_time_order() -> None:
    sched = Schedule()
    tp, other = ("t", 0), ("t", 1)
    sched.add(tp, [(T + 5, b"g/c"), (T, b"g/a"), (T + 1, b"p/b")])
    sched.add(other, [(T, b"g/z")])
    assert sched.due(tp, T - 1, 10) == []
    assert sched.due(tp, T + 1, 1) == [(T, b"g/a")]  # the limit holds the rest back
    assert sched.due(tp, T + 1, 10) == [(T + 1, b"p/b")]
    sched.retain([tp])
    assert sched.due(other, T + 9, 10) == [] and len(sched) == 1
    sched.reset(tp, [(T + 2, b"g/d")])
    assert sched.due(tp, T + 9, 10) == [(T + 2, b"g/d")]


def test_expires_at_is_read_from_either_record() -> None:
    g = group(expires_at=T + 7)
    p = Park(P, OWNER, "org-1", "t", "", "ev-1", "org-1", NO_OWNER, T + 9, None)
    assert expires_at_of(group_key(P, "lcc-1"), g.encode()) == T + 7
    assert expires_at_of(p.state_key, p.encode()) == T + 9


def test_park_prefix_matches_only_its_key() -> None:
    # "org-1" must not find the parks of "org-10" (hence the \x00 separator)
    assert park_key(OWNER, "org-10", P, "e").startswith(park_prefix(OWNER, "org-1")) is False
    assert park_key(OWNER, "org-1", P, "e").startswith(park_prefix(OWNER, "org-1"))
    assert park_key(USER, "org-1", P, "e").startswith(park_prefix(OWNER, "org-1")) is False


def test_records_round_trip() -> None:
    g = group(latest_error=None)
    assert Group.decode(g.encode()) == g
    p = Park(
        P, OWNER, "org-1", "t", "AA==", "ev-1", "org-1", NO_OWNER, T, "lcc-1", "m", "C", "x", "[]"
    )
    assert Park.decode(p.encode()) == p


PARKS = (
    Park(P, USER, "dänä@example.com", "t", "AA==", "ev-1", "org-1", NO_SLACK_USER, T, None),
    Park(P, OWNER, "org-1", "t", "AA==", "ev-1", "org-1", NO_OWNER, T, "lcc-1", "m", "C"),
    Park(
        P,
        OWNER,
        "org-1",
        "t",
        "AA==",
        "ev-1",
        "org-1",
        NO_OWNER,
        T,
        None,
        "m",
        "C",
        'tëxt "q"',
        "[]",
    ),
    Park(P, OWNER, "", "", "", "", "", "", -T, "", "", "", "", ""),  # empty, not absent
    Park(P, USER, "k", "t", "x", "e", "o", "r", 0, "d💥", None, None, None, '[{"t":"é\\n"}]'),
)


@pytest.mark.parametrize("park", PARKS)
def test_parks_written_as_json_by_earlier_versions_still_read(park: Park) -> None:
    """Before layout 1 a park was a compact JSON array of its fields in declaration order:
    stores and changelogs from before an upgrade read back unchanged."""
    fields = [getattr(park, f.name) for f in dataclasses.fields(park)]
    legacy = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    assert Park.decode(legacy) == park
    assert expires_at_of(park.state_key, legacy) == park.expires_at
    assert Park.decode(park.encode()) == park
    assert expires_at_of(park.state_key, park.encode()) == park.expires_at


def test_a_json_park_of_an_earlier_version_reads_back() -> None:
    # bytes as the previous version's ``Park.encode`` wrote them (its _DUMPS of the fields)
    legacy = (
        '["connector-provisioning-failed","owner","org-9","data-notifications-pipeline",'
        '"AAECAw==","ev-9","org-9","no_owner",1764000000000,"lcc-9","m-9","C0FALLBACK",'
        '"Ünïcode — \\"q\\"","[{\\"type\\":\\"header\\"}]"]'
    ).encode()
    assert Park.decode(legacy) == Park(
        "connector-provisioning-failed",
        OWNER,
        "org-9",
        "data-notifications-pipeline",
        "AAECAw==",
        "ev-9",
        "org-9",
        "no_owner",
        1764000000000,
        "lcc-9",
        "m-9",
        "C0FALLBACK",
        'Ünïcode — "q"',
        '[{"type":"header"}]',
    )
    assert Park.expires_at_of(legacy) == 1764000000000


def test_park_layout_1_is_a_header_and_every_field_in_order() -> None:
    """The layout pinned: what a later version must read (a field added to ``Park`` and not
    to ``encode`` fails here: the header counts every field)."""
    park = PARKS[2]
    names = [f.name for f in dataclasses.fields(Park)]
    strings = [getattr(park, n) for n in names if n != "expires_at"]
    head = struct.pack(
        ">Bq13i", 1, park.expires_at, *(-1 if v is None else len(v.encode()) for v in strings)
    )
    assert len(names) == 14
    assert park.encode() == head + b"".join(v.encode() for v in strings if v is not None)


def test_group_round_trips_non_ascii_and_absent_error() -> None:
    # lengths in the header are UTF-8 byte counts, not characters
    g = group(latest_error="bäd 💥")
    g = dataclasses.replace(g, channel="C-é", text="Ünïcode — ✅", blocks='[{"t":"é"}]')
    assert Group.decode(g.encode()) == g
    assert Group.decode(dataclasses.replace(g, latest_error="").encode()).latest_error == ""
    assert Group.decode(dataclasses.replace(g, latest_error=None).encode()).latest_error is None


def test_groups_written_by_the_json_header_layout_still_read() -> None:
    # stores and changelogs written before the binary header keep working after an upgrade
    legacy = '["m-1","C1",3,1000,2000,3000,"boom",7]\nÜ text[{"a":1}]'.encode()
    assert Group.decode(legacy) == Group(
        "m-1", "C1", 3, 1000, 2000, 3000, "Ü text", '[{"a":1}]', "boom"
    )
    assert expires_at_of(group_key(P, "lcc-1"), legacy) == 3000


# -- decide: the first event of a key, a later one, misses --------------------------------------
DM, FB = alert(), alert(miss=NO_OWNER)


@pytest.mark.parametrize(
    (
        "name",
        "outcome",
        "event",
        "grp",
        "window",
        "park",
        "action",
        "n_msgs",
        "put_prefixes",
        "dg",
        "dp",
    ),
    [
        ("first, dm", DM, ref(), None, W, park_request(), Action.NEW, 1, [b"g/"], 1, 0),
        ("grouping off", DM, ref(), None, 0, park_request(), Action.NEW, 1, [], 0, 0),
        ("no dedup key", DM, ref(dedup=None), None, W, None, Action.NEW, 1, [], 0, 0),
        ("open group", DM, ref("ev-2"), group(), W, None, Action.GROUPED, 1, [b"g/"], 0, 0),
        (
            "open group of a miss",
            FB,
            ref("ev-2"),
            group(),
            W,
            park_request(),
            Action.GROUPED,
            1,
            [b"g/"],
            0,
            0,
        ),
        (
            "pending group",
            DM,
            ref("ev-2"),
            group(channel=""),
            W,
            None,
            Action.GROUPED,
            0,
            [b"g/"],
            0,
            0,
        ),
        (
            "closed group",
            DM,
            ref("ev-2"),
            group(expires_at=T),
            W,
            None,
            Action.NEW,
            1,
            [b"g/"],
            0,
            0,
        ),
        ("miss, no park", Miss(NO_OWNER, "d"), ref(), None, W, None, Action.MISSED, 0, [], 0, 0),
        (
            "miss, parked",
            Miss(NO_OWNER, "d"),
            ref(),
            None,
            W,
            park_request(),
            Action.PARKED,
            0,
            [b"p/", b"g/"],
            1,
            1,
        ),
        (
            "fallback, parked",
            FB,
            ref(),
            None,
            W,
            park_request(),
            Action.PARKED,
            1,
            [b"p/", b"g/"],
            1,
            1,
        ),
        ("fallback, no park", FB, ref(), None, W, None, Action.NEW, 1, [b"g/"], 1, 0),
        (
            "miss, grouping off, parked",
            Miss(NO_OWNER, "d"),
            ref(),
            None,
            0,
            park_request(),
            Action.PARKED,
            0,
            [b"p/"],
            0,
            1,
        ),
    ],
)
def test_decide(
    name: str,
    outcome: Alert | Miss,
    event: EventRef,
    grp: Group | None,
    window: int,
    park: ParkRequest | None,
    action: Action,
    n_msgs: int,
    put_prefixes: list[bytes],
    dg: int,
    dp: int,
) -> None:
    decision = decide(outcome, event=event, group=grp, window_ms=window, park=park, now=T)
    # the handler passes the group key it read ``grp`` at: the same decision
    gkey = group_key(P, event.dedup) if event.dedup is not None else None
    given = decide(outcome, event=event, group=grp, window_ms=window, park=park, now=T, gkey=gkey)
    assert given == decision, name
    assert decision.action is action, name
    assert len(decision.messages) == n_msgs, name
    assert [k[:2] for k in keys(decision)] == put_prefixes, name
    assert (decision.groups_delta, decision.parks_delta) == (dg, dp), name
    assert not set(keys(decision)) & set(decision.deletes), name


def test_first_message_is_the_route_outcome_unchanged() -> None:
    decision = decide(DM, event=ref(), group=None, window_ms=W, park=None, now=T)
    assert decision.messages == (DM.message,)
    opened = Group.decode(dict(decision.puts)[group_key(P, "lcc-1")])
    assert opened == Group(
        DM.message.message_id, "U0DANA", 1, T, T, T + W, DM.message.text, DM.message.blocks, "boom"
    )
    assert decision.schedule == ((T + W, group_key(P, "lcc-1")),)


def test_update_points_at_the_original_in_its_channel() -> None:
    g = group(count=3, message_id="orig", channel="U0DANA")
    decision = decide(
        alert("ev-9", channel="U0OTHER"),
        event=ref("ev-9", error="new error"),
        group=g,
        window_ms=W,
        park=None,
        now=T,
    )
    [update] = decision.messages
    assert update.update_of == "orig"
    assert update.channel == "U0DANA"  # the original's channel, whatever the route said
    assert update.message_id == message_id(P, "ev-9")
    assert update.source_event_id == "ev-9"
    grown = Group.decode(decision.puts[0][1])
    assert (grown.count, grown.first_at, grown.latest_at, grown.latest_error) == (
        4,
        g.first_at,
        T,
        "new error",
    )
    assert grown.expires_at == g.expires_at  # the window runs from the first event
    assert "Seen *4 times*" in update.blocks and "new error" in update.blocks
    assert "Seen 4 times" in update.text


def test_an_event_without_error_keeps_the_latest_error() -> None:
    decision = decide(
        DM, event=ref("ev-2", error=None), group=group(), window_ms=W, park=None, now=T
    )
    assert Group.decode(decision.puts[0][1]).latest_error == "boom"


def test_closed_group_is_replaced_or_deleted() -> None:
    old = group(expires_at=T - 5)
    decision = decide(DM, event=ref("ev-2"), group=old, window_ms=W, park=None, now=T)
    assert decision.deletes == () and decision.groups_delta == 0
    assert decision.schedule == ((T + W, group_key(P, "lcc-1")),)
    assert Group.decode(dict(decision.puts)[group_key(P, "lcc-1")]).count == 1
    missed = decide(
        Miss(NO_OWNER, "d"), event=ref("ev-2"), group=old, window_ms=W, park=None, now=T
    )
    assert missed.deletes == (group_key(P, "lcc-1"),)
    assert missed.groups_delta == -1


def test_parked_fallback_copy_is_remembered() -> None:
    decision = decide(FB, event=ref(), group=None, window_ms=W, park=park_request(), now=T)
    parked = Park.decode(dict(decision.puts)[park_key(OWNER, "org-1", P, "ev-1")])
    assert parked.fallback_id == FB.message.message_id and parked.fallback_channel == FALLBACK
    assert parked.expires_at == T + TTL and parked.reason == NO_OWNER
    assert base64.b64decode(parked.value) == b"\x00avro"
    opened = Group.decode(dict(decision.puts)[group_key(P, "lcc-1")])
    assert opened.channel == FALLBACK and opened.message_id == FB.message.message_id


def test_five_failures_one_post_four_updates_then_resolved() -> None:
    state: dict[bytes, bytes] = {}
    produced: list[SlackMessage] = []
    gkey = group_key(P, "lcc-1")
    for i in range(1, 6):
        raw = state.get(gkey)
        d = decide(
            alert(f"ev-{i}"),
            event=ref(f"ev-{i}", error=f"error {i}"),
            group=Group.decode(raw) if raw else None,
            window_ms=W,
            park=None,
            now=T + i * 60_000,
        )
        state.update(d.puts)
        produced += d.messages
    first, *updates = produced
    assert first.update_of is None and len(updates) == 4
    assert {u.update_of for u in updates} == {first.message_id}
    assert len({m.message_id for m in produced}) == 5
    raw = state[gkey]
    done = resolve(
        Group.decode(raw),
        gkey=gkey,
        pipeline=P,
        event_id="ev-run",
        org_id="org-1",
        how="connector orders to s3 is RUNNING",
        now=T + 10 * 60_000,
    )
    assert done is not None and done.action is Action.RESOLVED
    [resolution] = done.messages
    assert resolution.update_of == first.message_id and resolution.channel == first.channel
    assert "Resolved" in resolution.blocks and "is RUNNING" in resolution.blocks
    assert "Seen *5 times*" in resolution.blocks
    # the latest error the updates showed stays on the resolved message
    assert "Latest error" in resolution.blocks and "error 5" in resolution.blocks
    assert done.deletes == (gkey,)


def resolve_lcc1(grp: Group | None, parks: list[Park] | None = None) -> Decision | None:
    """``resolve`` for a resolving event of connector ``lcc-1`` at ``T`` finding ``parks``."""
    return resolve(
        grp,
        gkey=group_key(P, "lcc-1"),
        pipeline=P,
        event_id="e",
        org_id="o",
        how="h",
        now=T,
        parks=parks or (),
    )


@pytest.mark.parametrize(
    ("name", "grp", "expected"),
    [
        ("no group", None, None),
        ("closed group", group(expires_at=T), None),
        ("open group", group(), (Action.RESOLVED, 1)),
        ("pending group: nothing posted to update", group(channel=""), (Action.RESOLVED, 0)),
    ],
)
def test_resolve(name: str, grp: Group | None, expected: tuple[Action, int] | None) -> None:
    d = resolve_lcc1(grp)
    assert (None if d is None else (d.action, len(d.messages))) == expected, name
    if d is not None:
        assert d.groups_delta == -1


def waiting() -> list[Park]:
    """Parks a resolving event of ``lcc-1`` (org-1) finds where its parks would wait: two of
    its key (one per kind, as a closed and a later group left them), and three of others."""
    base = Park(P, OWNER, "org-1", "t", "", "ev-1", "org-1", NO_OWNER, T + TTL, "lcc-1")
    return [
        base,
        dataclasses.replace(base, kind=USER, key="dana@x", event_id="ev-5"),
        dataclasses.replace(base, event_id="ev-2", dedup="lcc-2"),  # another connector
        dataclasses.replace(base, pipeline=ONBOARDING.name, event_id="ev-3"),
        dataclasses.replace(base, event_id="ev-4", dedup=None),  # grouping was off
    ]


def test_resolve_deletes_every_park_of_its_key() -> None:
    """Left, a park DMs the owner about a resolved problem and overwrites the copy's
    "Resolved" with its re-route note (``on_park_hit``), however late the owner arrives."""
    gkey = group_key(P, "lcc-1")
    parks = waiting()
    d = resolve_lcc1(group(), parks)
    assert d is not None and d.action is Action.RESOLVED and len(d.messages) == 1
    assert d.deletes == (gkey, parks[0].state_key, parks[1].state_key)
    assert (d.groups_delta, d.parks_delta) == (-1, -2)
    # the same park found twice (under two prefixes the shell scanned) is deleted once
    d = resolve_lcc1(group(), [parks[0], parks[0]])
    assert d is not None and d.deletes == (gkey, parks[0].state_key) and d.parks_delta == -1


@pytest.mark.parametrize(
    ("name", "grp"), [("no group", None), ("window closed", group(expires_at=T))]
)
def test_resolve_without_an_open_group_still_ends_the_parks(name: str, grp: Group | None) -> None:
    parks = waiting()
    d = resolve_lcc1(grp, parks)
    assert d is not None, name
    # nothing to update: not a resolution (the shell counts the event a drop, as before)
    assert d.action is Action.UNPARKED and d.messages == () and d.puts == ()
    assert d.deletes == (parks[0].state_key, parks[1].state_key)
    assert (d.groups_delta, d.parks_delta) == (0, -2)
    # and with no park of its key it is what it was: nothing
    others = parks[2:]
    assert resolve_lcc1(grp, others) is None


# -- parks -----------------------------------------------------------------------------------
def parked(**changes: Any) -> Park:
    base = Park(P, OWNER, "org-1", "t", "", "ev-1", "org-1", NO_OWNER, T + TTL, "lcc-1")
    return dataclasses.replace(base, **changes)


def with_copy() -> Park:
    m = FB.message
    return parked(
        fallback_id=m.message_id,
        fallback_channel=FALLBACK,
        fallback_text=m.text,
        fallback_blocks=m.blocks,
    )


def hit_alert(park: Park, channel: str = "U0DANA") -> Alert:
    a = alert(channel=channel)
    return Alert(dataclasses.replace(a.message, message_id=park.hit_message_id()))


def test_park_hit_without_copy_posts_the_events_own_id() -> None:
    p = parked()
    pending = group(channel="", text="", blocks="", message_id=message_id(P, "ev-1"))
    d = on_park_hit(p, hit_alert(p), group=pending, repark=None, now=T)
    assert d.action is Action.HIT and d.parks_delta == -1
    [dm] = d.messages
    assert dm.message_id == message_id(P, "ev-1") and dm.update_of is None
    moved = Group.decode(dict(d.puts)[group_key(P, "lcc-1")])
    assert (moved.message_id, moved.channel, moved.blocks) == (dm.message_id, "U0DANA", dm.blocks)
    assert d.deletes == (p.state_key,)


def test_park_hit_updates_the_fallback_copy_and_moves_the_group() -> None:
    p = with_copy()
    on_copy = group(message_id=p.fallback_id, channel=FALLBACK, count=3)
    d = on_park_hit(p, hit_alert(p), group=on_copy, repark=None, now=T)
    dm, rerouted, catchup = d.messages
    assert dm.message_id == derived_id(P, "ev-1", "dm") != p.fallback_id
    assert dm.channel == "U0DANA" and dm.update_of is None
    assert rerouted.update_of == p.fallback_id and rerouted.channel == FALLBACK
    assert rerouted.message_id == derived_id(P, "ev-1", "rerouted")
    assert "Sent to &lt;@U0DANA&gt;" not in rerouted.blocks and "<@U0DANA>" in rerouted.blocks
    # three events were grouped on the copy: the DM is brought up to date right away
    assert catchup.update_of == dm.message_id and catchup.channel == "U0DANA"
    assert "Seen *3 times*" in catchup.blocks
    assert len({m.message_id for m in d.messages}) == 3


def test_park_hit_leaves_an_unrelated_group_alone() -> None:
    p = with_copy()
    other = group(message_id="someone-else")
    d = on_park_hit(p, hit_alert(p), group=other, repark=None, now=T)
    assert d.puts == () and len(d.messages) == 2


@pytest.mark.parametrize(
    ("name", "park", "repark", "action"),
    [
        (
            "owner arrived, no Slack user: park under the e-mail",
            parked(),
            (USER, "dana@x"),
            Action.REPARKED,
        ),
        ("still the same key", parked(kind=USER, key="dana@x"), (USER, "dana@x"), Action.NONE),
    ],
)
def test_park_still_missing(name: str, park: Park, repark: tuple[str, str], action: Action) -> None:
    d = on_park_hit(park, Miss(NO_SLACK_USER, "d"), group=None, repark=repark, now=T)
    assert d.action is action, name
    if action is Action.REPARKED:
        moved = Park.decode(dict(d.puts)[park_key(USER, "dana@x", P, "ev-1")])
        assert moved.expires_at == park.expires_at and moved.reason == NO_SLACK_USER
        assert d.deletes == (park.state_key,)
        assert d.schedule == ((park.expires_at, moved.state_key),)


@pytest.mark.parametrize(
    ("name", "park", "grp", "deletes_group"),
    [
        ("pending group goes", parked(), group(channel="", message_id=message_id(P, "ev-1")), True),
        ("posted copy's group stays", with_copy(), group(message_id="x", channel=FALLBACK), False),
        ("no group", parked(dedup=None), None, False),
    ],
)
def test_expire_park(name: str, park: Park, grp: Group | None, deletes_group: bool) -> None:
    d = expire_park(park, group=grp)
    assert d.action is Action.EXPIRED_PARK and d.parks_delta == -1 and d.messages == ()
    assert (group_key(P, "lcc-1") in d.deletes) is deletes_group, name
    assert d.groups_delta == (-1 if deletes_group else 0)


def test_expire_group() -> None:
    g = group()
    d = expire_group(g, gkey=group_key(P, "lcc-1"))
    assert d.deletes == (group_key(P, "lcc-1"),)
    assert d.messages == () and d.groups_delta == -1


# -- rendering of updates ----------------------------------------------------------------------
def test_update_rendering_keeps_the_original_and_adds_one_status() -> None:
    original = alert().message
    text, blocks = render_update(original.text, original.blocks, Revision("*status*"))
    parsed = json.loads(blocks)
    ids = [b.get("block_id") for b in parsed]
    before = [b.get("block_id") for b in json.loads(original.blocks)]
    assert ids == [before[0], "status", *before[1:]]
    # an update of an update is rendered from the original again: still one status
    _, again = render_update(original.text, blocks, Revision("*other*"))
    assert [b.get("block_id") for b in json.loads(again)].count("status") == 1
    assert text.startswith("status\n")


def test_resolution_strikes_the_steps() -> None:
    original = alert().message
    _, blocks = render_update(original.text, original.blocks, Revision("done", strike_steps=True))
    [steps] = [b for b in json.loads(blocks) if b.get("block_id") == "steps"]
    lines = steps["text"]["text"].split("\n")
    assert lines[0].endswith("(no longer needed)")
    assert all(line.startswith("• ~") and line.endswith("~") for line in lines[1:])


def test_latest_error_replaces_the_detail_in_place() -> None:
    original = alert().message
    _, blocks = render_update(
        original.text, original.blocks, Revision("s", Detail("Latest error", "<b>new</b>"))
    )
    parsed = json.loads(blocks)
    ids = [b.get("block_id") for b in parsed]
    before = [b.get("block_id") for b in json.loads(original.blocks)]
    assert ids == [before[0], "status", *before[1:]]
    [detail] = [b for b in parsed if b.get("block_id") == "detail"]
    assert "Latest error" in detail["text"]["text"] and "&lt;b&gt;new" in detail["text"]["text"]


# -- the handler applies decisions (per event, one partition's MemoryState) ---------------------
class StateEmitter(ListEmitter):
    """A handler's emitter with the state of the record's partition."""

    def __init__(self, state: MemoryState) -> None:
        super().__init__()
        self.state = state


class ReadSpy(MemoryState):
    """A partition's state that records every key and prefix read, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        self.reads.append(key)
        return super().get(key)

    def prefix(self, prefix: bytes) -> Any:
        self.reads.append(prefix)
        yield from super().prefix(prefix)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class World:
    """A handler and punctuator over shared in-memory tables and one partition's state."""

    def __init__(
        self,
        *,
        window_s: int = 3600,
        ttl_s: int = 3600,
        fallback: str | None = FALLBACK,
        store_origins: bool = True,
    ) -> None:
        self.registry = InMemorySchemaRegistry()
        self.owners: dict[str, CsdrAssignment] = {}
        self.users: dict[str, SlackUser] = {}
        self.state = MemoryState()
        self.clock = Clock()
        self.counts = LifecycleCounts()
        pipelines = {"cn": CONNECTOR, "onb": ONBOARDING}
        self.handler = EventHandler(
            self.registry,
            pipelines,
            DictLookup(self.owners),
            DictLookup(self.users),
            out_topic=OUT,
            fallback_channel=fallback,
            clock=self.clock,
            lifecycle=LifecycleConfig(
                {CONNECTOR.name: window_s * 1000, ONBOARDING.name: window_s * 1000}, ttl_s * 1000
            ),
            counts=self.counts,
            store_origins=store_origins,
        )
        self.punctuate = LifecyclePunctuator(
            self.registry,
            pipelines,
            DictLookup(self.owners),
            DictLookup(self.users),
            out_topic=OUT,
            counts=self.counts,
            store_origins=store_origins,
        )
        self.out = StateEmitter(self.state)
        self.read = AvroDeserializer(self.registry, SlackMessage)

    def send(self, topic: str, event: Any) -> list[SlackMessage]:
        before = len(self.out.records)
        record_type = CONNECTOR.record_type if topic == "cn" else ONBOARDING.record_type
        value = AvroSerializer(self.registry, record_type)(topic, event)
        self.handler(ConsumedRecord(topic, value), self.out)  # type: ignore[arg-type]
        return self.produced(before)

    def tick(self, advance_s: float = 0.0) -> list[SlackMessage]:
        self.clock.now += timedelta(seconds=advance_s)
        before = len(self.out.records)
        self.punctuate({("cn", 0): self.state}, self.out, self.clock.now.timestamp())
        return self.produced(before)

    def produced(self, since: int) -> list[SlackMessage]:
        messages = []
        for topic, key, value in self.out.records[since:]:
            assert topic == OUT and value is not None
            message = self.read(value, topic=OUT, partition=0, offset=0)
            assert key == message.channel.encode()  # an update lands where its original did
            messages.append(message)
        return messages

    def assign(self, org: str = "org-1", slack_id: str | None = "U0DANA") -> None:
        self.owners[org] = owner(org)
        if slack_id is not None:
            self.users["dana.owner@example.com"] = user(slack_id)


def failure(i: int, error: str = "boom") -> Any:
    return dataclasses.replace(connector(i), connector_id="lcc-1", error_message=error)


def status(i: int, new: str) -> Any:
    return dataclasses.replace(
        connector(i), connector_id="lcc-1", old_status="FAILED", new_status=new, error_message=None
    )


def test_handler_groups_five_failures_and_resolves_on_running() -> None:
    w = World()
    w.assign()
    produced = []
    for i in range(1, 6):
        w.clock.now += timedelta(minutes=1)
        produced += w.send("cn", failure(i, f"error {i}"))
    first, *updates = produced
    assert first.update_of is None and [u.update_of for u in updates] == [first.message_id] * 4
    assert "error 5" in updates[-1].blocks
    assert w.counts.by_partition[("cn", 0)] == [1, 0]
    [resolution] = w.send("cn", status(6, "RUNNING"))
    assert resolution.update_of == first.message_id and "Resolved" in resolution.blocks
    assert w.handler.outcomes[(P, "dm")] == 1 and w.handler.outcomes[(P, "grouped")] == 4
    assert w.handler.outcomes[(P, "resolved")] == 1
    assert w.counts.by_partition[("cn", 0)] == [0, 0]
    assert list(w.state.prefix(b"")) == []  # nothing left behind
    # no open group any more: a RUNNING change is what it always was, a counted drop
    assert w.send("cn", status(7, "RUNNING")) == []
    assert w.handler.outcomes[(P, "dropped")] == 1


def events_counted(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("enricher_events_total", {"pipeline": P, "outcome": outcome})
        or 0.0
    )


def test_outcomes_reach_the_events_counter_when_published() -> None:
    """The hot path counts outcomes in ``outcomes`` only; ``publish_counts`` (the loop's
    checkpoint, the service's close) adds what was counted since its last call, once."""
    w = World()
    w.assign()
    dm, grouped = events_counted("dm"), events_counted("grouped")
    for i in range(1, 4):
        w.send("cn", failure(i, f"error {i}"))
    assert (events_counted("dm"), events_counted("grouped")) == (dm, grouped)
    w.handler.publish_counts()
    assert (events_counted("dm"), events_counted("grouped")) == (dm + 1, grouped + 2)
    w.handler.publish_counts()  # nothing new: nothing added twice
    assert (events_counted("dm"), events_counted("grouped")) == (dm + 1, grouped + 2)
    w.send("cn", failure(4))
    w.handler.publish_counts()
    assert (events_counted("dm"), events_counted("grouped")) == (dm + 1, grouped + 3)
    assert w.handler.outcomes[(P, "dm")] == 1 and w.handler.outcomes[(P, "grouped")] == 3


def test_the_service_publishes_the_outcomes_at_checkpoints_and_on_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wired: the loop's checkpoint hook is the handler's ``publish_counts``, and closing the
    service publishes what a loop stopped by an error did not checkpoint."""
    import threading
    from types import SimpleNamespace

    from libs.kafka import LoopStats
    from services.enricher import app
    from services.enricher.settings import EnricherSettings

    w = World()
    w.assign()
    dm = events_counted("dm")
    w.send("cn", failure(1))
    loops: list[dict[str, Any]] = []

    class Loop:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            loops.append(kwargs)

        def run(self) -> LoopStats:
            return LoopStats()

    monkeypatch.setattr(app, "ProcessingLoop", Loop)
    flushed: list[float] = []
    stand_in: Any = SimpleNamespace(
        handle=w.handler,
        tables=(),
        lifecycle=None,
        punctuator=w.punctuate,
        _settings=EnricherSettings(group_id="g"),
        _pipelines={"cn": CONNECTOR},
        _stop=threading.Event(),
        _follow_tables=lambda: None,
        _loop_consumer_config=lambda: {},
        _loop_producer_config=lambda transactional_id: {},
        _dlq_producer=SimpleNamespace(flush=flushed.append),
    )
    app.Enricher.run(stand_in)
    [loop] = loops
    assert loop["on_checkpoint"] == w.handler.publish_counts
    assert events_counted("dm") == dm  # the fake loop never checkpointed
    app.Enricher.close(stand_in)
    assert events_counted("dm") == dm + 1 and flushed


def test_handler_with_window_zero_is_todays_behaviour() -> None:
    w = World(window_s=0, ttl_s=0)
    w.assign()
    produced = [m for i in range(1, 4) for m in w.send("cn", failure(i))]
    assert [m.update_of for m in produced] == [None] * 3
    assert w.state.data == {}
    assert w.send("cn", status(9, "RUNNING")) == []


def test_window_closes_by_expiry_then_posts_anew() -> None:
    w = World(window_s=600)
    w.assign()
    [first] = w.send("cn", failure(1))
    w.clock.now += timedelta(seconds=300)
    [update] = w.send("cn", failure(2))
    assert update.update_of == first.message_id
    assert w.tick(301) == []  # the window closed: forgotten, silently
    assert w.state.data == {} and w.counts.by_partition[("cn", 0)] == [0, 0]
    [again] = w.send("cn", failure(3))
    assert again.update_of is None


def test_owner_assigned_later_gets_the_alert_and_the_copy_says_so() -> None:
    w = World()
    [copy] = w.send("onb", onboarding(1))
    assert copy.channel == FALLBACK and copy.update_of is None
    assert w.handler.outcomes[(ONBOARDING.name, "fallback")] == 1  # counted as before
    assert w.tick(1) == []  # nothing arrived yet
    w.assign()
    w.punctuate.note_owners([b"org-1"])
    w.punctuate.note_users([b"dana.owner@example.com"])
    dm, rerouted = w.tick(1)
    assert dm.channel == "U0DANA" and dm.update_of is None and dm.message_id != copy.message_id
    assert rerouted.update_of == copy.message_id and rerouted.channel == FALLBACK
    assert w.counts.by_partition[("cn", 0)] == [1, 0]
    # the group follows the DM: a later start updates the DM, not the copy
    [update] = w.send("onb", onboarding(2))
    assert update.update_of == dm.message_id and update.channel == "U0DANA"


def test_owner_without_slack_user_reparks_under_the_email() -> None:
    w = World(fallback=None)
    assert w.send("cn", failure(1)) == []
    w.assign(slack_id=None)
    w.punctuate.note_owners([b"org-1"])
    assert w.tick(1) == []
    [(key, _)] = [(k, v) for k, v in w.state.prefix(b"p/")]
    assert key.startswith(park_prefix(USER, slack_user_key("Dana.Owner@Example.com")))
    w.users["dana.owner@example.com"] = user()
    w.punctuate.note_users([b"dana.owner@example.com"])
    [dm] = w.tick(1)
    assert dm.message_id == message_id(P, "ev-1") and dm.channel == "U0DANA"


def parks_gauge() -> float | None:
    return REGISTRY.get_sample_value("enricher_parked_events")


def owner_arrives(w: World, *, email: str = "dana.owner@example.com") -> list[SlackMessage]:
    """The owner and their Slack user arrive, and the punctuator hears of both."""
    w.owners["org-1"] = owner(email=email)
    w.users[email] = user(email=email)
    w.punctuate.note_owners([b"org-1"])
    w.punctuate.note_users([email.encode()])
    return w.tick(1)


@pytest.mark.parametrize(
    ("name", "known_owner", "fallback"),
    [
        ("no owner: parked under the org, copy posted", False, FALLBACK),
        ("owner without Slack user: parked under the e-mail, copy posted", True, FALLBACK),
        ("no owner, no fallback: parked, nothing posted", False, None),
    ],
)
def test_resolve_before_the_owner_arrives_ends_the_park(
    name: str, known_owner: bool, fallback: str | None
) -> None:
    """Failed before: the park stayed, so the owner arriving later was DM'd about a resolved
    problem and the copy's "Resolved" was overwritten by "Sent to @owner"."""
    w = World(fallback=fallback)
    if known_owner:
        w.owners["org-1"] = owner()
    posted = w.send("cn", failure(1))
    [(park, _)] = w.state.prefix(b"p/")
    kind = USER if known_owner else OWNER
    assert park.startswith(park_prefix(kind, "dana.owner@example.com" if known_owner else "org-1"))
    assert w.counts.by_partition[("cn", 0)] == [1, 1] and parks_gauge() == 1
    resolution = w.send("cn", status(2, "RUNNING"))
    if fallback is None:
        assert posted == resolution == []  # nothing posted, nothing to update
    else:
        [copy], [done] = posted, resolution
        assert copy.channel == FALLBACK
        assert done.update_of == copy.message_id and "Resolved" in done.blocks
    assert w.handler.outcomes[(P, "resolved")] == 1, name
    assert list(w.state.prefix(b"")) == []  # the group and the park are gone
    assert w.counts.by_partition[("cn", 0)] == [0, 0] and parks_gauge() == 0
    assert owner_arrives(w) == []  # no DM, no update of the fallback copy
    assert w.tick(7200) == []  # and nothing when the park's time would have run out
    assert w.handler.outcomes[(P, "dropped")] == 0


def test_resolve_after_the_window_closed_ends_the_waiting_park() -> None:
    """The window closed (the group expired) while the park still waits: the resolve has no
    message to update and counts as the drop it always was, but the park goes too."""
    w = World(window_s=600, ttl_s=3600)
    [copy] = w.send("cn", failure(1))
    assert w.tick(601) == [] and w.counts.by_partition[("cn", 0)] == [0, 1]
    assert w.send("cn", status(2, "RUNNING")) == []
    assert w.handler.outcomes[(P, "dropped")] == 1 and w.handler.outcomes[(P, "resolved")] == 0
    assert w.state.data == {} and w.counts.by_partition[("cn", 0)] == [0, 0]
    assert parks_gauge() == 0
    assert owner_arrives(w) == []
    assert copy.channel == FALLBACK


def test_resolve_finds_the_park_under_the_email_it_was_parked_with() -> None:
    """The owner's e-mail changed after the event parked under it: the group's origin (the
    owner the fallback copy was routed with) still names the e-mail."""
    w = World()
    w.owners["org-1"] = owner()  # no Slack user: parked under dana.owner@example.com
    [copy] = w.send("cn", failure(1))
    w.owners["org-1"] = owner(email="sam.new@example.com")  # reassigned, not seen by a park
    [done] = w.send("cn", status(2, "RUNNING"))
    assert done.update_of == copy.message_id
    assert list(w.state.prefix(b"p/")) == [] and parks_gauge() == 0
    w.users["sam.new@example.com"] = user("U0SAM", "sam.new@example.com")
    w.users["dana.owner@example.com"] = user()
    w.punctuate.note_users([b"dana.owner@example.com", b"sam.new@example.com"])
    assert w.tick(1) == []


def test_park_whose_window_closed_unresolved_still_goes_to_the_owner() -> None:
    """The reverse order, kept: the group expired on its own (never resolved), so the owner
    arriving while the park waits gets the alert and the copy says where it went."""
    w = World(window_s=600, ttl_s=3600)
    [copy] = w.send("cn", failure(1))
    assert w.tick(601) == [] and w.counts.by_partition[("cn", 0)] == [0, 1]
    dm, rerouted = owner_arrives(w)
    assert dm.channel == "U0DANA" and dm.update_of is None
    assert rerouted.update_of == copy.message_id and "Sent to" in rerouted.blocks
    assert w.counts.by_partition[("cn", 0)] == [0, 0]


SCANS = [park_prefix(OWNER, "org-1"), park_prefix(USER, "dana.owner@example.com")]


@pytest.mark.parametrize(
    ("name", "window_s", "ttl_s", "failed_first", "scans"),
    [
        ("parking off", 3600, 0, True, []),
        ("a connector that never failed: no group, so no park", 3600, 3600, False, []),
        ("its group is there: so may a park be", 3600, 3600, True, SCANS),
        ("parks outlive their groups: always", 600, 3600, False, SCANS),
    ],
)
def test_resolving_reads_parks_only_where_one_may_wait(
    name: str, window_s: int, ttl_s: int, failed_first: bool, scans: list[bytes]
) -> None:
    spy = ReadSpy()
    reads = spy.reads
    w = World(window_s=window_s, ttl_s=ttl_s)
    w.assign()
    w.state = w.out.state = spy
    if failed_first:
        w.send("cn", failure(1))
    reads.clear()
    w.send("cn", dataclasses.replace(status(2, "PAUSED"), old_status="RUNNING"))
    assert reads == []  # not a resolving event: the store is not touched
    w.send("cn", status(3, "RUNNING"))
    assert reads == [group_key(P, "lcc-1"), *scans], name


def test_park_expires_and_the_miss_becomes_final() -> None:
    w = World(fallback=None, ttl_s=60)
    labels = {"pipeline": P, "reason": NO_OWNER, "action": "dropped"}
    dropped = REGISTRY.get_sample_value("enricher_join_misses_total", labels) or 0.0
    expired = REGISTRY.get_sample_value("enricher_park_expiries_total", {"pipeline": P}) or 0.0
    assert w.send("cn", failure(1)) == []
    assert w.handler.outcomes[(P, "parked")] == 1
    assert w.counts.by_partition[("cn", 0)] == [1, 1]
    assert w.tick(59) == [] and w.state.data != {}
    assert (REGISTRY.get_sample_value("enricher_join_misses_total", labels) or 0.0) == dropped
    assert w.tick(2) == []
    assert REGISTRY.get_sample_value("enricher_join_misses_total", labels) == dropped + 1
    assert REGISTRY.get_sample_value("enricher_park_expiries_total", {"pipeline": P}) == expired + 1
    # the park and the group it opened without posting are gone; the window entry too
    assert w.state.data == {}
    assert w.counts.by_partition[("cn", 0)] == [0, 0]
    # an owner arriving afterwards finds nothing to route
    w.assign()
    w.punctuate.note_owners([b"org-1"])
    assert w.tick(1) == []


def test_first_sight_routes_parks_whose_lookup_arrived_unseen() -> None:
    w = World()
    [copy] = w.send("onb", onboarding(1))
    w.tick(1)
    w.assign()  # arrived, but nobody told this punctuator (e.g. another instance had it)
    fresh = LifecyclePunctuator(
        w.registry,
        {"onb": ONBOARDING},
        DictLookup(w.owners),
        DictLookup(w.users),
        out_topic=OUT,
        counts=LifecycleCounts(),
    )
    before = len(w.out.records)
    fresh({("onb", 0): w.state}, w.out, w.clock.now.timestamp())
    dm, rerouted = w.produced(before)
    assert dm.channel == "U0DANA" and rerouted.update_of == copy.message_id


def test_expiry_reads_only_what_is_due() -> None:
    spy = ReadSpy()
    reads = spy.reads
    w = World(window_s=60)
    w.assign()
    w.state = w.out.state = spy
    w.send("cn", failure(1))  # due in 60 s
    w.clock.now += timedelta(seconds=50)
    for n in range(2, 52):  # 50 more connectors, due in 110 s
        w.send("cn", dataclasses.replace(failure(n), connector_id=f"lcc-later-{n}"))
    reads.clear()  # the handler's one get per event
    w.tick()  # first sight: the groups and parks are read once, to count and schedule
    assert reads == [b"g/", b"p/"]
    reads.clear()
    w.tick(1)
    assert reads == []  # nothing due: the store is not touched
    w.tick(10)
    assert reads == [group_key(P, "lcc-1")]  # only the due group is read
    assert w.counts.by_partition[("cn", 0)] == [50, 0]


def test_a_loop_without_state_means_todays_behaviour() -> None:
    class Stateless(ListEmitter):
        @property
        def state(self) -> MemoryState:
            raise RuntimeError("this loop keeps no state")

    w = World()
    w.assign()
    w.out = Stateless()  # type: ignore[assignment]
    produced = [m for i in range(1, 3) for m in w.send("cn", failure(i))]
    assert [m.update_of for m in produced] == [None, None]


def test_resweep_after_an_abort_routes_a_park_whose_hit_was_rolled_back() -> None:
    w = World()
    w.send("onb", onboarding(1))
    w.tick(1)
    committed = dict(w.state.data)
    w.assign()
    w.punctuate.note_owners([b"org-1"])
    assert len(w.tick(1)) == 2  # DM and re-route update... in a transaction that aborts:
    w.state.data = committed  # its writes are gone, and the key it heard of was consumed
    assert w.tick(1) == []
    w.punctuate.resweep()  # what the app does when the loop counts an abort
    dm, rerouted = w.tick(1)
    assert dm.channel == "U0DANA" and rerouted.channel == FALLBACK
    assert w.counts.by_partition[("cn", 0)] == [1, 0]


# -- the group stores what renders its original again (layout 2), not the rendering -------------
def test_group_with_origin_round_trips_and_is_smaller() -> None:
    event = b"\x00\x00\x00\x00\x07" + "ävro bytes".encode()
    named = dataclasses.replace(owner(), csdr_name="Dänä Owner")
    variants = [
        Origin(event, named, dataclasses.replace(user(), display_name="Dana 💥")),
        Origin(event, dataclasses.replace(owner(), csdr_name=None), None),  # no Slack user
        Origin(b"", None, None),  # no owner
    ]
    for origin in variants:
        g = group(latest_error="bäd", origin=origin)
        raw = g.encode()
        assert raw[:1] == b"\x02"
        back = Group.decode(raw)
        # the rendered original is not stored: the origin renders it again
        assert back == dataclasses.replace(g, text="", blocks="")
        assert expires_at_of(group_key(P, "lcc-1"), raw) == g.expires_at
    assert Group.decode(group(latest_error=None, origin=variants[0]).encode()).latest_error is None
    assert len(group(origin=variants[0]).encode()) < len(group().encode()) / 3


def v1_value(g: Group) -> bytes:
    """A group as the previous version wrote it (layout 1: the rendered original), written here
    from the layout itself rather than by ``Group.encode``."""
    mid, channel, text = g.message_id.encode(), g.channel.encode(), g.text.encode()
    error = (g.latest_error or "").encode()
    head = struct.pack(
        ">BIqqqHHiI",
        1,
        g.count,
        g.first_at,
        g.latest_at,
        g.expires_at,
        len(mid),
        len(channel),
        -1 if g.latest_error is None else len(error),
        len(text),
    )
    return head + mid + channel + error + text + g.blocks.encode()


def scenario_dm(w: World) -> list[SlackMessage]:
    w.assign()
    out = []
    for i in range(1, 4):
        w.clock.now += timedelta(minutes=1)
        out += w.send("cn", failure(i, f"error <{i}>"))
    return out + w.send("cn", status(4, "RUNNING"))


def scenario_fallback_copy(w: World) -> list[SlackMessage]:
    # parking off: the fallback copy is the alert, and later events update it
    w.owners["org-1"] = owner()  # an owner without a Slack user: the copy's warning names them
    out = w.send("cn", failure(1))
    w.clock.now += timedelta(minutes=2)
    return out + w.send("cn", failure(2, "again")) + w.send("cn", status(3, "DELETED"))


def scenario_parked_copy_then_hit(w: World) -> list[SlackMessage]:
    out = w.send("onb", onboarding(1))
    w.clock.now += timedelta(minutes=1)
    out += w.send("onb", onboarding(2))  # updates the copy
    w.assign()
    w.punctuate.note_owners([b"org-1"])
    out += w.tick(1)  # the DM, the copy's re-route note, the DM's catch-up update
    w.clock.now += timedelta(minutes=1)
    return out + w.send("onb", onboarding(3))  # the group followed the DM: it updates the DM


@pytest.mark.parametrize(
    ("scenario", "world"),
    [
        (scenario_dm, {}),
        (scenario_fallback_copy, {"ttl_s": 0}),
        (scenario_parked_copy_then_hit, {}),
    ],
)
def test_updates_render_exactly_as_from_the_stored_rendering(
    scenario: Any, world: dict[str, Any]
) -> None:
    layouts: list[bytes] = []

    class Spy(MemoryState):
        def put(self, key: bytes, value: bytes) -> None:
            if key.startswith(b"g/"):
                layouts.append(value[:1])
            super().put(key, value)

    def run(w: World) -> list[SlackMessage]:
        w.state = w.out.state = Spy()
        messages: list[SlackMessage] = scenario(w)
        return messages

    now = run(World(**world))
    assert b"\x02" in layouts
    # the previous version: groups store the rendered original (layout 1), not the origin
    layouts.clear()
    then = run(World(**world, store_origins=False))
    assert b"\x02" not in layouts and b"\x01" in layouts  # the previous version's values
    assert now == then  # every message, updates included, byte for byte
    assert sum(1 for m in now if m.update_of) >= 2


def test_open_groups_are_stored_with_their_origin() -> None:
    w = World()
    w.assign()
    [first] = w.send("cn", failure(1))
    raw = w.state.get(group_key(P, "lcc-1"))
    assert raw is not None and raw[:1] == b"\x02" and len(raw) < len(first.blocks)
    stored = Group.decode(raw)
    assert stored.origin is not None and stored.origin.owner == owner()
    assert stored.origin.user == user()


def test_a_group_written_by_the_previous_version_is_read_and_updated() -> None:
    w = World()
    w.assign()
    [first] = w.send("cn", failure(1))
    gkey = group_key(P, "lcc-1")
    current = Group.decode(w.state.data[gkey])
    old = dataclasses.replace(current, text=first.text, blocks=first.blocks, origin=None)
    w.state.put(gkey, v1_value(old))  # as the previous version left it in the store
    w.clock.now += timedelta(minutes=1)
    [update] = w.send("cn", failure(2, "second"))
    grown = dataclasses.replace(
        old, count=2, latest_at=epoch_ms(w.clock.now), latest_error="second"
    )
    expected = render_update(first.text, first.blocks, status_revision(grown))
    assert (update.text, update.blocks) == expected and update.update_of == first.message_id
    # updated in place, still the rendered original (no origin to render it from): layout 1
    assert Group.decode(w.state.data[gkey]) == grown
    [resolution] = w.send("cn", status(3, "RUNNING"))
    assert resolution.update_of == first.message_id and "Resolved" in resolution.blocks
    assert gkey not in w.state.data


def test_an_origin_that_no_longer_decodes_posts_anew_instead_of_a_blank_update() -> None:
    w = World()
    w.assign()
    assert len(w.send("cn", failure(1))) == 1
    gkey = group_key(P, "lcc-1")
    stored = Group.decode(w.state.data[gkey])
    assert stored.origin is not None
    broken = dataclasses.replace(stored.origin, event=stored.origin.event[:5] + b"\xff")
    w.state.put(gkey, dataclasses.replace(stored, origin=broken).encode())
    [again] = w.send("cn", failure(2))
    assert again.update_of is None and again.message_id == message_id(P, "ev-2")
    assert w.counts.by_partition[("cn", 0)] == [1, 0]  # the new group replaced the old one
    assert Group.decode(w.state.data[gkey]).message_id == again.message_id


def test_an_update_after_a_link_template_change_shows_the_new_rendering_in_place() -> None:
    # ENRICHER_LINK_TEMPLATES changed by a deploy while the alert is open: the update renders
    # the original as it renders now, and still replaces the same message (nothing reposted)
    w = World()
    w.assign()
    [first] = w.send("cn", failure(1))
    assert "crm.example.com" in first.blocks
    w.handler = EventHandler(
        w.registry,
        {"cn": CONNECTOR.with_link_templates({"crm": "https://crm.new.example/{org_id}"})},
        DictLookup(w.owners),
        DictLookup(w.users),
        out_topic=OUT,
        fallback_channel=FALLBACK,
        clock=w.clock,
        lifecycle=LifecycleConfig({CONNECTOR.name: 3_600_000}, 3_600_000),
        counts=w.counts,
    )
    w.clock.now += timedelta(minutes=1)
    [update] = w.send("cn", failure(2))
    assert update.update_of == first.message_id and update.channel == first.channel
    assert "crm.new.example" in update.blocks and "crm.example.com" not in update.blocks
    assert w.counts.by_partition[("cn", 0)] == [1, 0]


# -- a new alert's group, encoded straight from the decision's fields (branch lc6) ------------
def v2_value(
    mid: str,
    channel: str,
    count: int,
    first_at: int,
    latest_at: int,
    expires_at: int,
    error: str | None,
    origin: Origin,
) -> bytes:
    """Layout 2 written from its description (``lifecycle._GROUP_HEAD_V2``'s comment), not by
    ``Group.encode``: what every reader of a stored group expects, byte for byte."""

    def utf8(s: str | None) -> bytes:
        return b"" if s is None else s.encode()

    def n(s: str | None) -> int:
        return -1 if s is None else len(s.encode())

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    o, u = origin.owner, origin.user
    owner_at = 0 if o is None else (o.updated_at - epoch) // timedelta(microseconds=1)
    user_at = 0 if u is None else (u.updated_at - epoch) // timedelta(microseconds=1)
    head = struct.pack(
        ">BIqqqHHiIqq7i",
        2,
        count,
        first_at,
        latest_at,
        expires_at,
        n(mid),
        n(channel),
        n(error),
        len(origin.event),
        owner_at,
        user_at,
        *((-1, -1, -1, -1) if o is None else (n(o.org_id), n(o.org_name), n(o.csdr_email))),
        *(() if o is None else (n(o.csdr_name),)),
        *((-1, -1, -1) if u is None else (n(u.email), n(u.slack_user_id), n(u.display_name))),
    )
    strings = [mid, channel, error]
    tail = b"".join(utf8(s) for s in strings) + origin.event
    if o is not None:
        tail += b"".join(utf8(s) for s in (o.org_id, o.org_name, o.csdr_email, o.csdr_name))
    if u is not None:
        tail += b"".join(utf8(s) for s in (u.email, u.slack_user_id, u.display_name))
    return head + tail


def origins() -> list[Origin]:
    event = b"\x00\x00\x00\x00\x07" + "ävro bytes".encode()
    return [
        Origin(
            event,
            dataclasses.replace(owner(), csdr_name="Dänä Owner"),
            dataclasses.replace(user(), display_name="Dana 💥"),
        ),
        Origin(event, dataclasses.replace(owner(), csdr_name=None), None),
        Origin(event, owner(), dataclasses.replace(user(), display_name=None)),
        Origin(b"", None, None),
    ]


@pytest.mark.parametrize("error", [None, "", "bäd ✗ error"])
def test_layout_2_is_the_documented_bytes(error: str | None) -> None:
    for origin in origins():
        g = group(latest_error=error, origin=origin, channel="C0FALLBÄCK")
        assert g.encode() == v2_value(
            g.message_id,
            g.channel,
            g.count,
            g.first_at,
            g.latest_at,
            g.expires_at,
            error,
            origin,
        )


@pytest.mark.parametrize("error", [None, "bäd ✗ error"])
def test_a_new_alerts_group_is_layout_2_of_its_fields(error: str | None) -> None:
    """The NEW decision writes the group ``Group(...).encode()`` would, with the same puts,
    schedule and counts as every other opening: with no group, and replacing a closed one."""
    a = alert()
    gkey = group_key(P, "lcc-1")
    for origin in origins():
        for stored, delta in ((None, 1), (group(expires_at=T - 1), 0)):
            d = decide(
                a,
                event=ref(error=error),
                group=stored,
                window_ms=W,
                park=None,
                now=T,
                origin=origin,
            )
            value = v2_value(a.message.message_id, a.message.channel, 1, T, T, T + W, error, origin)
            assert d == Decision(
                Action.NEW, (a.message,), ((gkey, value),), (), ((T + W, gkey),), delta, 0
            )
            opened = Group(
                a.message.message_id, a.message.channel, 1, T, T, T + W, "", "", error, origin
            )
            assert value == opened.encode()
            assert Group.decode(value) == opened


def test_a_new_alert_without_grouping_or_origin() -> None:
    a = alert()
    assert decide(a, event=ref(dedup=None), group=None, window_ms=W, park=None, now=T) == (
        Decision(Action.NEW, (a.message,))
    )
    assert decide(a, event=ref(), group=None, window_ms=0, park=None, now=T) == (
        Decision(Action.NEW, (a.message,))
    )
    # no origin (what earlier callers pass): the rendered original, layout 1
    d = decide(a, event=ref(), group=None, window_ms=W, park=None, now=T)
    ((_, value),) = d.puts
    assert value[:1] == b"\x01"
    assert Group.decode(value) == Group(
        a.message.message_id,
        a.message.channel,
        1,
        T,
        T,
        T + W,
        a.message.text,
        a.message.blocks,
        "boom",
    )


def test_counts_add_clamps_and_creates_partitions_on_change_only() -> None:
    counts = LifecycleCounts()
    counts.add(("t", 0), Decision(Action.NEW, ()))
    assert counts.by_partition == {}
    counts.add(("t", 0), Decision(Action.EXPIRED_PARK, parks_delta=-1))
    assert counts.by_partition[("t", 0)] == [0, 0]
    counts.add(("t", 0), Decision(Action.NEW, groups_delta=1))
    counts.add(("t", 0), Decision(Action.PARKED, groups_delta=1, parks_delta=1))
    counts.add(("t", 0), Decision(Action.EXPIRED_PARK, groups_delta=-1, parks_delta=-1))
    assert counts.by_partition[("t", 0)] == [1, 0]


def test_when_shows_the_minute_of_any_epoch_ms() -> None:
    """``_when`` keeps its strings by minute: the same text as formatting each time, at minute
    boundaries, before 1970, and after its cache was filled and cleared."""

    def formatted(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")

    edges = [T, T - 1, 0, -1, -60_000, -60_001, 59_999, 60_000, 1_795_597_259_999]
    many = [T + i * 60_000 + i % 60_000 for i in range(5000)]  # more minutes than it keeps
    for ms in edges + many + edges:
        assert lifecycle._when(ms) == formatted(ms), ms


@pytest.mark.parametrize(
    "updated_at",
    [
        datetime(2026, 11, 25, 9, 0, 3, 123_456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1901, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 11, 25, 10, 0, 3, 7, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_layout_2_stores_exact_microseconds(updated_at: datetime) -> None:
    """The lookups' ``updated_at`` as exact epoch microseconds (also before 1970, in another
    zone), and a naive one as UTC, as the Avro decoder's: what layout 2 documents."""
    o = dataclasses.replace(owner(), updated_at=updated_at)
    u = dataclasses.replace(user(), updated_at=updated_at)
    origin = Origin(b"\x00avro", o, u)
    g = group(origin=origin)
    expected = v2_value(
        g.message_id, g.channel, g.count, g.first_at, g.latest_at, g.expires_at, "boom", origin
    )
    assert g.encode() == expected
    naive = updated_at.astimezone(UTC).replace(tzinfo=None)
    as_naive = Origin(
        origin.event,
        dataclasses.replace(o, updated_at=naive),
        dataclasses.replace(u, updated_at=naive),
    )
    assert group(origin=as_naive).encode() == expected
    decoded = Group.decode(expected).origin
    assert decoded is not None and decoded.owner is not None and decoded.user is not None
    assert decoded.owner.updated_at == updated_at
    assert decoded.user.updated_at == updated_at


def test_epoch_ms_is_the_timestamps_milliseconds() -> None:
    """``epoch_ms`` of an aware time is ``int(timestamp() * 1000)`` to the millisecond (the
    float's rounding included), before 1970 and in other zones; a naive time is read as
    ``timestamp`` reads it (local time)."""
    rng = random.Random(7)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    times = [datetime(1970, 1, 1, tzinfo=UTC), datetime(1969, 12, 31, 23, 59, 59, 999_500)]
    times += [datetime.fromtimestamp(T / 1000 + i / 1000, UTC) for i in range(2000)]
    times += [
        datetime.fromtimestamp(rng.uniform(-3e9, 5e9), rng.choice(zones)).replace(
            microsecond=rng.randrange(1_000_000)
        )
        for _ in range(5000)
    ]
    for when in times:
        assert epoch_ms(when) == int(when.timestamp() * 1000), when


def test_group_keys_are_the_stored_layout_under_the_group_prefix() -> None:
    """``group_key`` spells the prefix out (one f-string per event): it must stay
    ``GROUP_PREFIX`` (which the punctuator and the changelog's readers go by) and the key
    layout the state already holds."""
    assert group_key("connector-provisioning-failed", "lcc-1") == (
        b"g/connector-provisioning-failed\x00lcc-1"
    )
    assert group_key("p", "é").startswith(GROUP_PREFIX)
    assert group_key("p", "é") == GROUP_PREFIX + "p\x00é".encode()
