"""Compiled alert templates (``NoteTemplate``, ``CompiledNotes``) against the plain renderer.

The golden corpus pins today's bytes on chosen events; these tests compare the two ways of
rendering on generated strings (mrkdwn specials, JSON specials, unicode, the hole characters
themselves, empty values, lengths on both sides of every limit), and check that the compiled
path declines exactly when ``render_parts`` would cut a block to Slack's limits.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import pytest

from libs.serde import (
    AvroSerializer,
    ConnectorStatusChanged,
    CsdrAssignment,
    InMemorySchemaRegistry,
    OnboardingStarted,
    SlackMessage,
)
from services.enricher.core import (
    _SETS_SLOTS_ONLY,
    Alert,
    Context,
    FactTemplate,
    NoteTemplate,
    Pipeline,
    _compose,
    _link_line,
    _links,
    _slot_joiner,
    new_message,
    route,
)
from services.enricher.handler import EventHandler
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING
from services.enricher.render import (
    MAX_FIELD_TEXT,
    MAX_SECTION_TEXT,
    MAX_URL,
    Note,
    escape,
    hole,
    render_pair,
)
from tests.support.enricher_corpus import ConsumedRecord, DictLookup, ListEmitter
from tests.unit.test_enricher_core import NOW, connector_event, onboarding_event, owner, user

EDGES = (
    "",
    " ",
    "acme",
    "  Acme   Corp \n",
    "<!channel> & <@U1|x> >",
    "&amp; &lt;",
    "*bold* _it_ ~st~ `code` ```fence```",
    "{org} {0} {} }{ {{ }}",
    'quote " backslash \\ \\u0041',
    "C:\\dir\\file",  # a backslash alone: JSON escapes it too
    "ctrl \x00 \x1f \t \r\n end",
    "été ☃ 日本語 🚀 e\u0301 \u05e9\u05dc\u05d5\u05dd \u2028",
    hole(0) + hole(7) + "\U000ffffd",  # the compiler's own placeholder characters
    "x",
)


def _long(rng: random.Random, around: int) -> str:
    """A string whose escaped length is near ``around`` (within a few of it, either side)."""
    unit = rng.choice(("a", "&", "<b>", 'q"', "é"))
    target = around + rng.randint(-3, 3)
    text = ""
    while len(escape(text + unit)) <= target:
        text += unit
    return text + "z" * max(0, target - len(escape(text)))


def _value(rng: random.Random) -> str:
    return rng.choice(EDGES) + (rng.choice(EDGES) if rng.random() < 0.3 else "")


def _must_decline(
    pipeline: Pipeline[Any],
    template: NoteTemplate[Any],
    values: tuple[str, ...],
    warning: str | None,
    greeting: str | None,
    event_id: str,
    mid: str,
    links: str,
) -> bool:
    """Whether ``render_parts`` cuts any block of this alert to Slack's limits."""
    note = template.note(values)
    summary = note.summary.template
    named = dict(note.summary.values)
    if greeting is not None:
        summary = ("Hi {greeting_name}, " if greeting else "Hi, ") + summary
        named["greeting_name"] = greeting
    if len(render_pair(summary, named)[0]) > MAX_SECTION_TEXT:
        return True
    for fact in note.facts:
        head = len(f"*{escape(fact.label)}*\n") + (2 if fact.code else 0)
        if fact.value and len(escape(fact.value)) > MAX_FIELD_TEXT - head:
            return True
    if note.detail is not None:
        prefix = len(f"*{escape(note.detail.label)}*\n```") + 3
        body = escape(note.detail.text.strip() or "(empty)").replace("```", "`\u200b``")
        if prefix + len(body) > MAX_SECTION_TEXT:
            return True
    footer = f"{pipeline.name} · event {event_id} · message {mid}"
    return (
        len(links) > MAX_SECTION_TEXT
        or (warning is not None and len(escape(":warning: " + warning)) > MAX_SECTION_TEXT)
        or len(escape(footer)) > MAX_FIELD_TEXT
    )


def _generated(pipeline: Pipeline[Any], seed: int, count: int) -> Iterator[tuple[Any, ...]]:
    compiled = pipeline.compiled
    assert compiled is not None
    slots = len(compiled.template.slots)
    rng = random.Random(seed)
    limits = (150, 1500, 1985, 1990, 1995, 2000, 2985, 2990, 3000)
    for _ in range(count):
        values = [_value(rng) for _ in range(slots)]
        kind = rng.randrange(3)
        warning = _value(rng) or "w" if kind == 0 else None
        greeting = None if kind == 0 else "" if kind == 1 else _value(rng)
        event_id = _value(rng) if rng.random() < 0.3 else f"ev-{rng.randrange(99)}"
        links = rng.choice(("", "<https://a.example/x|A> · <https://b|B>"))
        if rng.random() < 0.5:  # one string near a limit
            which = rng.randrange(slots + 4)
            if which < slots:
                values[which] = _long(rng, rng.choice(limits))
            elif which == slots and warning is not None:
                warning = _long(rng, rng.choice(limits))
            elif which == slots + 1 and greeting:
                greeting = _long(rng, rng.choice(limits))
            elif which == slots + 2:
                event_id = _long(rng, rng.choice(limits))
            else:
                links = rng.choice(("x" * 2999, "x" * 3000, "x" * 3001))
        yield tuple(values), warning, greeting, event_id, "0" * 32, links


@pytest.mark.parametrize("pipeline", [CONNECTOR, ONBOARDING], ids=lambda p: p.name)
def test_the_compiled_template_renders_what_the_renderer_renders(pipeline: Pipeline[Any]) -> None:
    compiled = pipeline.compiled
    assert compiled is not None
    template = compiled.template
    taken = declined = 0
    for values, warning, greeting, event_id, mid, links in _generated(pipeline, 14, 2000):
        plain = _compose(pipeline, template.note(values), warning, greeting, event_id, mid, links)
        fast = compiled.render(values, warning, greeting, event_id, mid, links)
        must = _must_decline(pipeline, template, values, warning, greeting, event_id, mid, links)
        assert (fast is None) == must, (values, warning, greeting, event_id, links)
        if fast is None:
            declined += 1
        else:
            taken += 1
            assert fast[:2] == plain, (values, warning, greeting, event_id, links)
            # the blocks' UTF-8 the template wrote is what encoding them gives
            assert fast[2] == plain[1].encode(), (values, warning, greeting, event_id, links)
    assert taken > 1000 and declined > 50  # both paths were exercised


@pytest.mark.parametrize("pipeline", [CONNECTOR, ONBOARDING], ids=lambda p: p.name)
def test_every_shape_compiles(pipeline: Pipeline[Any]) -> None:
    """No shape the generated inputs meet is left to the renderer for good."""
    compiled = pipeline.compiled
    assert compiled is not None
    for values, warning, greeting, event_id, mid, links in _generated(pipeline, 7, 500):
        compiled.render(values, warning, greeting, event_id, mid, links)
    shapes = compiled._shapes
    assert len(shapes) >= 6 and all(t is not None for t in shapes.values())


def _field(name: str) -> str:
    return "{" + name + "}"


def _values(event: Any, ctx: Any) -> tuple[str, ...]:
    return (event.org_id, event.error_message or "")


def _plain(pipeline: Pipeline[Any]) -> Pipeline[Any]:
    """``pipeline`` with a plain ``describe`` saying the same: rendered without templates."""
    described = pipeline.describe

    def describe(event: Any, ctx: Context) -> Note:
        return described(event, ctx)

    plain = dataclasses.replace(pipeline, describe=describe)
    assert plain.compiled is None
    return plain


def _pipeline(template: NoteTemplate[Any], **changes: Any) -> Pipeline[Any]:
    return dataclasses.replace(CONNECTOR, **{"describe": template, **changes})


def test_a_fixed_part_the_renderer_cuts_leaves_the_shape_to_the_renderer() -> None:
    """A summary whose own text is past Slack's limit: the renderer cuts it where the values
    put the cut, which no template can say; the compiled template is rejected once."""
    template = NoteTemplate[Any](
        slots=("org", "error"),
        values=_values,
        title="T {org}",
        summary="{org} " + "long words " * 300,
        facts=(FactTemplate("Org", "{org}"),),
        detail=("Error", "error"),
    )
    pipeline = _pipeline(template)
    plain = _plain(pipeline)
    assert pipeline.compiled is not None and plain.compiled is None
    for org in ("acme", "a&b" * 40, ""):
        event = dataclasses.replace(connector_event(), org_id=org or "o")
        outcome = route(event, owner(), user(), pipeline=pipeline, now=NOW, fallback_channel=None)
        expected = route(event, owner(), user(), pipeline=plain, now=NOW, fallback_channel=None)
        assert outcome == expected
    assert list(pipeline.compiled._shapes.values()) == [None]


def test_hole_characters_in_a_pipelines_own_text_leave_the_shape_to_the_renderer() -> None:
    template = NoteTemplate[Any](
        slots=("org", "error"),
        values=_values,
        title="T {org}",
        summary="{org} said " + hole(2) + hole(7),
        facts=(FactTemplate("Org " + hole(8), "{org}"),),
    )
    pipeline = _pipeline(template, steps=("step " + hole(0),))
    plain = _plain(pipeline)
    event = connector_event()
    outcome = route(event, owner(), user(), pipeline=pipeline, now=NOW, fallback_channel="C1")
    expected = route(event, owner(), user(), pipeline=plain, now=NOW, fallback_channel="C1")
    assert outcome == expected
    assert pipeline.compiled is not None
    assert list(pipeline.compiled._shapes.values()) == [None]


@pytest.mark.parametrize(
    "summary",
    ["{org!r}", "{org:>9}", "{0}", "{}", "{unknown}", "{org.upper}", "{org[0]}"],
)
def test_a_template_field_must_be_a_plain_slot(summary: str) -> None:
    with pytest.raises(ValueError, match="plain slot names"):
        NoteTemplate[Any](slots=("org", "error"), values=_values, title="T", summary=summary)


@pytest.mark.parametrize("slots", [("org", "org"), ("org", "greeting_name")])
def test_slots_are_unique_and_leave_the_greeting_to_route(slots: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="slots must be unique"):
        NoteTemplate[Any](slots=slots, values=_values, title="T", summary="{org}")


def test_a_detail_names_a_slot() -> None:
    with pytest.raises(ValueError, match="detail slot"):
        NoteTemplate[Any](
            slots=("org",), values=_values, title="T", summary="{org}", detail=("E", "error")
        )


def test_routing_through_templates_and_through_the_renderer_gives_the_same_alerts() -> None:
    """``route`` end to end (joins, misses, greeting, links) on events of edge strings."""
    rng = random.Random(3)
    pipelines = [(p, _plain(p)) for p in (CONNECTOR, ONBOARDING)]
    for n in range(600):
        compiled, plain = pipelines[n % 2]
        if n % 2 == 0:
            event: Any = dataclasses.replace(
                connector_event(),
                org_id=_value(rng) or "o",
                connector_name=_value(rng),
                connector_type=_value(rng),
                cluster_id=_value(rng),
                error_message=rng.choice((None, "", _value(rng))),
            )
        else:
            event = dataclasses.replace(
                onboarding_event(),
                org_id=_value(rng) or "o",
                org_name=_value(rng),
                cloud=rng.choice((None, "", _value(rng))),
                plan=_value(rng),
            )
        who = dataclasses.replace(
            owner(org_id=event.org_id),
            org_name=_value(rng),
            csdr_name=rng.choice((None, "", " ", _value(rng))),
        )
        slack = rng.choice((user(), None))
        fallback = rng.choice(("C0FALLBACK", None))
        got = route(event, who, slack, pipeline=compiled, now=NOW, fallback_channel=fallback)
        want = route(event, who, slack, pipeline=plain, now=NOW, fallback_channel=fallback)
        assert got == want


LINK_TEMPLATES = {
    "console": "https://c.example/e/{environment_id}/x/{connector_name}?a=1&b=|{{lit}}",
    "crm": "https://crm.example.com/a/{org_id}/{org_id}",
    "docs": "https://docs.example.com/a&b|c",
}


@pytest.mark.parametrize("overrides", [{}, LINK_TEMPLATES], ids=["default", "overrides"])
def test_links_from_the_link_format_are_the_link_line(overrides: dict[str, str]) -> None:
    pipeline = CONNECTOR.with_link_templates(overrides)
    assert pipeline.link_format is not None
    rng = random.Random(5)
    for _ in range(400):
        event = dataclasses.replace(
            connector_event(),
            org_id=rng.choice(EDGES) or "o",
            environment_id=rng.choice((*EDGES, "e" * (MAX_URL // 2), "é" * 700)),
            connector_name=rng.choice((*EDGES, "n" * (MAX_URL - 60), "n" * (MAX_URL - 20))),
        )
        assert _links(pipeline, event) == _link_line(pipeline, event)


def test_a_template_the_link_format_cannot_say_is_left_to_the_link_line() -> None:
    for template in ("{org_id}://x", "https://x/{org_id!r}", "https://x/{org_id:>4}"):
        pipeline = CONNECTOR.with_link_templates({"crm": template})
        assert pipeline.link_format is None
        event = connector_event()
        assert _links(pipeline, event) == _link_line(pipeline, event)


def test_the_handlers_message_bytes_are_the_general_encoders() -> None:
    """The shell writes an alert's blocks from the UTF-8 its template wrote: on events of
    edge strings (markup, JSON specials, multi-byte and astral characters, values at Slack's
    limits, so the renderer's fallback path too) the produced bytes are the general
    encoder's for the message the plain renderer routes."""
    registry = InMemorySchemaRegistry()
    topics = {"failures": CONNECTOR, "onboardings": ONBOARDING}
    encoders = {
        "failures": AvroSerializer(registry, ConnectorStatusChanged),
        "onboardings": AvroSerializer(registry, OnboardingStarted),
    }
    reference = AvroSerializer(registry, SlackMessage)
    rng = random.Random(11)
    owners: dict[str, CsdrAssignment] = {}
    events: list[tuple[str, Any]] = []
    limits = (150, 300, 1500, 1985, 1995, 2000, 2985, 2995, 3000)
    for n in range(600):
        big = _long(rng, rng.choice(limits)) if rng.random() < 0.4 else _value(rng)
        if n % 2 == 0:
            event: Any = dataclasses.replace(
                connector_event(n),
                org_id=f"org-{n} {_value(rng)}",
                connector_name=rng.choice((big, _value(rng))),
                connector_type=_value(rng),
                error_message=rng.choice((None, "", big)),
            )
        else:
            event = dataclasses.replace(
                onboarding_event(n), org_id=f"org-{n}", org_name=big, cloud=_value(rng)
            )
        if n % 7:
            owners[event.org_id] = dataclasses.replace(
                owner(org_id=event.org_id), org_name=_value(rng), csdr_name=_value(rng) or None
            )
        events.append(("failures" if n % 2 == 0 else "onboardings", event))
    users = DictLookup({"jane.doe@example.com": user()})
    handler = EventHandler(
        registry,
        topics,
        DictLookup(owners),
        users,
        out_topic="out",
        fallback_channel="C0FALLBACK",
        clock=lambda: NOW,
    )
    out = ListEmitter()
    direct = 0
    for topic, event in events:
        handler(ConsumedRecord(topic, encoders[topic](topic, event)), out)  # type: ignore[arg-type]
        plain = route(
            event,
            owners.get(event.org_id),
            user() if event.org_id in owners else None,
            pipeline=_plain(topics[topic]),
            now=NOW,
            fallback_channel="C0FALLBACK",
        )
        assert isinstance(plain, Alert)
        assert out.records[-1][2] == reference("out", plain.message), event
        fast = route(
            event,
            owners.get(event.org_id),
            user() if event.org_id in owners else None,
            pipeline=topics[topic],
            now=NOW,
            fallback_channel="C0FALLBACK",
        )
        assert isinstance(fast, Alert)
        if fast.blocks_utf8 is not None:
            direct += 1
            assert fast.blocks_utf8 == plain.message.blocks.encode()
    assert len(out.records) == len(events)
    assert 300 < direct < len(events)  # the direct bytes and the renderer's fallback both ran


@pytest.mark.parametrize("extra", ["", ' "q" \\ \n'], ids=["plain", "json-specials"])
def test_a_string_without_utf8_is_rendered_and_left_to_the_encoder(extra: str) -> None:
    """A lone surrogate (never decoded from Avro, but a caller may route anything): the
    template renders what the renderer renders and writes no UTF-8, so the encoder meets
    the string itself and refuses it as it always did."""
    compiled = CONNECTOR.compiled
    assert compiled is not None
    values = ["acme"] * len(compiled.template.slots)
    values[3] = "bad \ud800 name" + extra
    filled = compiled.render(tuple(values), None, "Ann", "ev-1", "0" * 32, "")
    plain = _compose(CONNECTOR, compiled.template.note(values), None, "Ann", "ev-1", "0" * 32, "")
    assert filled is not None
    assert filled[:2] == plain and filled[2] is None


@pytest.mark.parametrize(
    "template",
    ["{a}", "x", "", "Failed: {a}", "{a}{b} {{literal}} {a}", "}}{{{b}}}{{", "é→🚀 {b} end"],
)
def test_a_title_joiner_formats_as_format_map(template: str) -> None:
    values = ("<one>", " two {x} ")
    named = dict(zip(("a", "b"), values, strict=True))
    assert _slot_joiner(template, ("a", "b"))(values) == template.format_map(named)


def test_a_message_is_built_as_its_type_builds_it() -> None:
    """``route``'s ``SlackMessage``, set slot by slot (compiled: the generic setter), is the
    one ``SlackMessage(...)`` makes, and the direct path is the one in use."""
    fields = ("m", "p", "C1", "t", "[]", "org-1", "ev-1", NOW, None)
    assert _SETS_SLOTS_ONLY
    built = new_message(*fields)
    assert type(built) is SlackMessage
    assert built == SlackMessage(*fields)
    assert new_message(*fields[:8], "m-0") == SlackMessage(*fields[:8], "m-0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.text = "changed"  # type: ignore[misc]
