"""The enricher's pure core: filter, join, route and render one event into a ``SlackMessage``.

No I/O, no clock, no globals: the time and the lookups are passed in, and every business
outcome is a return value (``Alert``, ``Drop``, ``Miss``) the shell counts and acts on.

A pipeline is declared as data (``Pipeline``): its source topic setting, record type, filter,
how the alert reads, suggested next steps and link templates. The join is the same for every
pipeline, as in the original Kafka Streams topology: ``org_id -> CsdrAssignment`` (who owns the
customer), then ``csdr_email`` (lower-cased) ``-> SlackUser`` (where to DM them).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from string import Formatter
from types import GenericAlias
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from libs.serde import CsdrAssignment, SlackMessage, SlackUser
from libs.serde.records import slot_setters
from services.enricher.render import (
    FALLBACK_DETAIL_CHARS,
    MAX_URL,
    Detail,
    Fact,
    Joiner,
    Link,
    Mrkdwn,
    Note,
    Template,
    compile_template,
    escape,
    fit,
    header_text,
    hole,
    joiner,
    link_part,
    quote_url_value,
    render_pair,
    render_parts,
)

V_co = TypeVar("V_co", covariant=True)

#: join miss reasons (Prometheus label values: a fixed, small set)
NO_OWNER: Final = "no_owner"
NO_SLACK_USER: Final = "no_slack_user"

#: length of ``message_id`` in hex characters (128 bits: collisions are not a concern)
MESSAGE_ID_HEX: Final = 32


class Lookup(Protocol[V_co]):
    """A read-only key-value view: what the core needs of a lookup table."""

    def get(self, key: str) -> V_co | None:
        """The current value of ``key``, or ``None`` when absent or deleted."""
        ...


class Event(Protocol):
    """What every source record has: an id for idempotency and the org it concerns."""

    @property
    def event_id(self) -> str: ...

    @property
    def org_id(self) -> str: ...


E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class LinkTemplate:
    """A link of a pipeline: ``name`` (for overrides), label and URL template.

    ``{placeholders}`` name fields of the pipeline's ``link_fields``; values are
    percent-encoded when substituted.
    """

    name: str
    label: str
    template: str


# Context and Alert are built per routed event and never mutated, but not frozen: a frozen
# class's __init__ sets each field through object.__setattr__ (~0.6 µs for the two per event;
# tests/perf/ENRICHER.md, "Fifth pass"). unsafe_hash keeps the hash frozen gave them.
@dataclass(unsafe_hash=True)
class Context:
    """What the joins found, handed to a pipeline's ``describe``."""

    owner: CsdrAssignment | None
    user: SlackUser | None

    def __init__(self, owner: CsdrAssignment | None, user: SlackUser | None) -> None:
        # written out: compiled, the dataclass's generated __init__ stays interpreted code
        # (mypyc compiles what is in the source), ≈ 0.1 µs more per call (one per alert)
        self.owner = owner
        self.user = user

    @property
    def org_name(self) -> str | None:
        """The customer's name as the account-team mapping knows it."""
        return self.owner.org_name if self.owner and self.owner.org_name else None


def keep_all(event: object) -> str | None:
    """The filter of a pipeline that alerts on every record."""
    return None


class FactTemplate(NamedTuple):
    """A fact of a ``NoteTemplate``: a label and the value as a template over the slots
    (``"{org} ({org_id})"``). As a ``Fact``, left out of an alert when its value is empty."""

    label: str
    value: str
    code: bool = False


#: the summary value ``route`` adds when it greets the owner
GREETING_SLOT: Final = "greeting_name"


# Where ``make install`` compiles this module with mypyc, a frozen dataclass that is also
# ``Generic`` fails to be created at import (mypyc issue 827), so ``NoteTemplate`` and
# ``Pipeline`` stay Python classes inside the compiled module; mypyc drops their ``Generic``
# base, and ``__class_getitem__`` keeps ``NoteTemplate[X](...)`` working. Neither is per event.
@mypyc_attr(native_class=False)
@dataclass(frozen=True)
class NoteTemplate(Generic[E]):
    """A pipeline's ``describe`` for alerts of a fixed shape: the title, summary, facts and
    detail as templates over named strings (``slots``), which ``values`` gives per event.

    Called, it describes the event as any ``describe`` does (a ``Note``). As a pipeline's
    ``describe`` it also lets ``route`` render the alert from a template compiled once per
    shape (greeting or miss warning, which facts are empty, detail and links or not): only the
    event's strings are escaped and filled in. Templates use slots only as plain fields
    (``{org}``: no conversion, format spec, index or attribute), so where each value lands is
    known. The title is plain text; the summary is mrkdwn (values escaped, as ``Mrkdwn``).
    """

    slots: tuple[str, ...]
    values: Callable[[E, Context], tuple[str, ...]]
    title: str
    summary: str
    facts: tuple[FactTemplate, ...] = ()
    #: ``(label, slot)``: the slot's value as the alert's detail (a code block) when not empty
    detail: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if GREETING_SLOT in self.slots or len(set(self.slots)) != len(self.slots):
            raise ValueError(f"slots must be unique and not {GREETING_SLOT!r}: {self.slots}")
        for template in (self.title, self.summary, *(fact.value for fact in self.facts)):
            _slot_fields(template, self.slots)
        if self.detail is not None and self.detail[1] not in self.slots:
            raise ValueError(f"detail slot {self.detail[1]!r} is not one of {self.slots}")

    def __class_getitem__(cls, item: object) -> GenericAlias:
        # what ``Generic`` gives a Python class (see above: compiled, it has no such base)
        return GenericAlias(cls, item)

    def __call__(self, event: E, ctx: Context) -> Note:
        return self.note(self.values(event, ctx))

    def note(self, values: Sequence[str]) -> Note:
        """The ``Note`` of the slots' ``values`` (in ``slots`` order)."""
        named = dict(zip(self.slots, values, strict=True))
        detail = None
        if self.detail is not None and named[self.detail[1]]:
            detail = Detail(self.detail[0], named[self.detail[1]])
        return Note(
            title=self.title.format_map(named),
            summary=Mrkdwn(self.summary, named),
            facts=tuple(Fact(f.label, f.value.format_map(named), f.code) for f in self.facts),
            detail=detail,
        )


def _slot_fields(template: str, slots: Sequence[str]) -> list[str]:
    """The slots ``template`` uses, in order; ``ValueError`` unless each is a plain field."""
    names = []
    for _, name, spec, conversion in Formatter().parse(template):
        if name is None:
            continue
        if name not in slots or spec or conversion:
            raise ValueError(f"{template!r}: fields must be plain slot names, one of {slots}")
        names.append(name)
    return names


def _slot_joiner(template: str, slots: Sequence[str]) -> Joiner:
    """``template.format_map`` of the slots' values (given in ``slots`` order) as a
    ``joiner``: its fields are plain slot names (``_slot_fields``), each the value itself, so
    the literal text between them is fixed and parsed here once instead of per event."""
    pieces: list[str] = []
    holes: list[int] = []
    literal_run = ""
    for literal, name, _, _ in Formatter().parse(template):
        literal_run += literal
        if name is not None:
            pieces.append(literal_run)
            holes.append(slots.index(name))
            literal_run = ""
    pieces.append(literal_run)
    return joiner(pieces, holes)


@mypyc_attr(native_class=False)  # as NoteTemplate: a Generic frozen dataclass
@dataclass(frozen=True)
class Pipeline(Generic[E]):
    """One alert pipeline, declared as data; see ``services/enricher/pipelines``."""

    #: stable name: the ``pipeline`` field of messages, metrics labels, part of ``message_id``
    name: str
    #: attribute of ``TopicSettings`` naming the source topic (so ``TOPIC_<NAME>`` overrides it)
    source_topic_setting: str
    record_type: type[E]
    #: the alert without steps, links, warning and footer (the core adds those)
    describe: Callable[[E, Context], Note]
    #: ``None`` keeps the event; a string drops it and is the reason counted (a fixed set)
    keep: Callable[[E], str | None] = keep_all
    steps: Sequence[str] = ()
    links: Sequence[LinkTemplate] = ()
    #: the event fields link templates may use
    link_fields: Sequence[str] = ("org_id",)
    #: the alert lifecycle's grouping key (events of one key within the window update one
    #: message); ``None``: every event is its own message
    dedup_key: Callable[[E], str] | None = None
    #: an event the filter drops that resolves the open alert of its dedup key: returns how
    #: (shown in the resolution), or ``None`` when the event resolves nothing
    resolves: Callable[[E], str | None] | None = None
    #: the event's error, shown as the latest error when a later event updates the alert
    error: Callable[[E], str | None] | None = None
    #: the ``link_fields`` the templates actually use: only those are quoted per event
    used_link_fields: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    #: per link: its label and template, and its rendered mrkdwn when it uses no field (the
    #: same for every event: rendered once, here), else ``None``
    link_plan: tuple[tuple[str, str, str | None], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )
    #: the links' mrkdwn line as a ``joiner`` of the quoted ``used_link_fields`` and the
    #: longest the quoted values may be together with every URL within ``MAX_URL``, or ``None``
    #: (a template ``_link_format`` cannot say: ``_link_line`` renders those)
    link_format: tuple[Joiner, int] | None = dataclasses.field(
        init=False, repr=False, compare=False
    )
    #: when ``describe`` is a ``NoteTemplate``: its compiled templates (``route``'s fast path)
    compiled: CompiledNotes[E] | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        used: set[str] = set()
        plan = []
        for link in self.links:
            names = _template_names(link.template)
            used |= names
            constant = None
            if not names:
                try:
                    constant = link_part(link.label, link.template.format_map({}))
                except (KeyError, IndexError, ValueError, AttributeError):
                    constant = ""  # as resolve_links: a template that does not format is left out
            plan.append((link.label, link.template, constant))
        fields = tuple(f for f in self.link_fields if f in used)
        # frozen: set once, here
        object.__setattr__(self, "used_link_fields", fields)
        object.__setattr__(self, "link_plan", tuple(plan))
        object.__setattr__(self, "link_format", _link_format(self.link_plan, fields))
        compiled = None
        if isinstance(self.describe, NoteTemplate):
            compiled = CompiledNotes(self, self.describe)
        object.__setattr__(self, "compiled", compiled)

    def __class_getitem__(cls, item: object) -> GenericAlias:
        # as ``NoteTemplate.__class_getitem__`` (mypyc drops the ``Generic`` base)
        return GenericAlias(cls, item)

    def with_link_templates(self, overrides: Mapping[str, str]) -> Pipeline[E]:
        """A copy whose links use ``overrides[<link name>]`` as template where given."""
        links = tuple(
            dataclasses.replace(link, template=overrides.get(link.name, link.template))
            for link in self.links
        )
        return dataclasses.replace(self, links=links)


def _template_names(template: str) -> set[str]:
    """The mapping keys ``template.format_map`` looks up (nested format specs included)."""
    names: set[str] = set()
    try:
        parsed = list(Formatter().parse(template))
    except ValueError:
        return names  # it cannot format anyway: resolve_links leaves it out
    for _, name, spec, _ in parsed:
        if name:
            names.add(name.split(".", 1)[0].split("[", 1)[0])  # "a.b" and "a[0]" look up "a"
        if spec:
            names |= _template_names(spec)
    return names


def template_problem(template: str, fields: Sequence[str]) -> str | None:
    """Why ``template`` cannot be a link template over ``fields``, or ``None`` if it can."""
    if not template.startswith(("https://", "http://")):
        return "must start with https:// or http://"
    try:
        names = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"is not a valid template: {exc}"
    unknown = sorted(n for n in names if n not in fields)
    if unknown:
        return f"uses unknown fields {unknown}; available: {sorted(fields)}"
    return None


@dataclass(unsafe_hash=True)  # not frozen, for its __init__'s cost: see Context
class Alert:
    """Produce ``message``; ``miss`` names the join miss when it goes to the fallback channel."""

    message: SlackMessage
    miss: str | None = None
    #: the lookups ``route`` rendered ``message`` from (``None``: absent): with the event, what
    #: renders it again (the alert lifecycle keeps these instead of the rendered message)
    owner: CsdrAssignment | None = dataclasses.field(default=None, compare=False, repr=False)
    user: SlackUser | None = dataclasses.field(default=None, compare=False, repr=False)
    #: ``message.blocks.encode()`` when the compiled template wrote it (``None``: not
    #: written): the shell's encoder takes it instead of encoding the ~2 KB again
    blocks_utf8: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def __init__(
        self,
        message: SlackMessage,
        miss: str | None = None,
        owner: CsdrAssignment | None = None,
        user: SlackUser | None = None,
        blocks_utf8: bytes | None = None,
    ) -> None:
        # written out, compiled: see Context (one per alert)
        self.message = message
        self.miss = miss
        self.owner = owner
        self.user = user
        self.blocks_utf8 = blocks_utf8


@dataclass(frozen=True)
class Drop:
    """The pipeline's filter rejected the event: not an alert (counted by ``reason``)."""

    reason: str


@dataclass(frozen=True)
class Miss:
    """A join miss with no fallback channel: nothing is produced (counted by ``reason``)."""

    reason: str
    detail: str


Outcome = Alert | Drop | Miss


def message_id(pipeline: str, event_id: str) -> str:
    """Deterministic id: the same event through the same pipeline always gives the same id.

    Downstream (the notifier's receipts table) uses it to recognise a replayed message, so it
    must not depend on time, offsets or the channel it ends up in.
    """
    # sha256 of "<pipeline>\x00<event_id>" in UTF-8, continued from a copy of the state
    # after the pipeline's prefix: the same digest, without hashing the prefix per event
    prefix = _ID_PREFIXES.get(pipeline)
    if prefix is None:
        prefix = hashlib.sha256(f"{pipeline}\x00".encode())
        if len(_ID_PREFIXES) < _ID_PREFIXES_MAX:
            _ID_PREFIXES[pipeline] = prefix
    digest = prefix.copy()
    digest.update(event_id.encode())
    return digest.hexdigest()[:MESSAGE_ID_HEX]


#: a cache, not state: the hash of each pipeline name's prefix (a few pipelines; bounded in
#: case a caller passes ever-new names), copied, never updated, once stored
_ID_PREFIXES_MAX: Final = 256
_ID_PREFIXES: Final[dict[str, hashlib._Hash]] = {}


def slack_user_key(email: str) -> str:
    """The ``data-slack-users`` key of an e-mail address (keys are lower-case)."""
    return email.strip().lower()


def invalid_reason(event: Event) -> str | None:
    """Why an event cannot be processed at all (it goes to the dead-letter topic), or ``None``."""
    if not event.event_id.strip():
        return "event_id is empty"
    if not event.org_id.strip():
        return "org_id is empty"
    return None


def resolve_links(pipeline: Pipeline[E], event: E) -> list[Link]:
    """The pipeline's links for ``event``; a template that does not format is left out."""
    values = {
        name: quote_url_value(str(getattr(event, name, "") or ""))
        for name in pipeline.used_link_fields
    }
    links = []
    for link in pipeline.links:
        try:
            url = link.template.format_map(values)
        except (KeyError, IndexError, ValueError, AttributeError):
            continue  # validated at start; an unexpected template must not sink the alert
        links.append(Link(link.label, url))
    return links


def _link_format(
    plan: Sequence[tuple[str, str, str | None]], fields: tuple[str, ...]
) -> tuple[Joiner, int] | None:
    """``Pipeline.link_format`` of a ``link_plan`` over ``fields``.

    A quoted value holds only unreserved characters and ``%``, which neither ``escape`` nor
    ``link_part``'s ``|`` rule changes, so a link's mrkdwn is its template's fixed parts
    escaped once with the quoted values in between; only the URL's length depends on them.
    """
    pieces, slack = [""], MAX_URL
    holes: list[int] = []
    for label, template, constant in plan:
        separator = " · " if pieces != [""] or holes else ""
        if constant is not None:
            if constant:
                pieces[-1] += separator + constant
            continue
        parsed = list(Formatter().parse(template))  # parsed before: _template_names
        if not parsed[0][0].startswith(("https://", "http://")):
            return None  # a field in the scheme: link_part decides per event
        pieces[-1] += separator + "<"
        fixed, counts = 0, dict.fromkeys(fields, 0)
        for literal, name, spec, conversion in parsed:
            pieces[-1] += escape(literal).replace("|", "%7C")
            fixed += len(literal)
            if name is None:
                continue
            if name not in fields or spec or conversion:
                return None  # not a plain field: format_map's own rules (or errors) apply
            holes.append(fields.index(name))
            pieces.append("")
            counts[name] += 1
        pieces[-1] += "|" + escape(label).replace("|", "¦") + ">"
        slack = min(slack, (MAX_URL - fixed) // max(1, *counts.values()))
    return joiner(pieces, holes), slack


def _links(pipeline: Pipeline[E], event: E) -> str:
    """``_link_line(pipeline, event)``, from the pipeline's ``link_format`` when it has one."""
    link_format = pipeline.link_format
    if link_format is None:
        return _link_line(pipeline, event)
    quoted = [
        quote_url_value(str(getattr(event, name, "") or "")) for name in pipeline.used_link_fields
    ]
    if sum(map(len, quoted)) > link_format[1]:  # a URL may be too long: link_part decides
        return _link_line(pipeline, event)
    return link_format[0](quoted)


def _link_line(pipeline: Pipeline[E], event: E) -> str:
    """``link_line(resolve_links(pipeline, event))``, rendering only what depends on ``event``."""
    values = {
        name: quote_url_value(str(getattr(event, name, "") or ""))
        for name in pipeline.used_link_fields
    }
    parts = []
    for label, template, constant in pipeline.link_plan:
        if constant is None:
            try:
                constant = link_part(label, template.format_map(values))
            except (KeyError, IndexError, ValueError, AttributeError):
                continue  # validated at start; an unexpected template must not sink the alert
        if constant:
            parts.append(constant)
    return " · ".join(parts)


def _miss(owner: CsdrAssignment | None, user: SlackUser | None) -> str | None:
    if owner is None:
        return NO_OWNER
    if user is None or not user.slack_user_id.strip():
        return NO_SLACK_USER
    return None


def _miss_warning(reason: str, event: Event, owner: CsdrAssignment | None) -> str:
    if reason == NO_OWNER or owner is None:
        return (
            f"No account-team owner found for org {event.org_id}, so this alert came here "
            "instead of a DM. Assign an owner to route the next one directly."
        )
    who = owner.csdr_name or owner.csdr_email
    return (
        f"No Slack user found for {slack_user_key(owner.csdr_email)} ({who}, owner of org "
        f"{event.org_id}), so this alert came here instead of a DM."
    )


def _greeting_name(owner: CsdrAssignment) -> str:
    """The owner's first name, as the DM greets them (``""``: no name to greet)."""
    first = (owner.csdr_name or "").split()
    return first[0] if first else ""


def _compose(
    pipeline: Pipeline[E],
    note: Note,
    warning: str | None,
    greeting: str | None,
    event_id: str,
    mid: str,
    links: str,
) -> tuple[str, str]:
    """``(text, blocks)`` of the described ``note`` with the pipeline's steps, the ``links``
    (``link_line``'s mrkdwn), a miss ``warning``, the owner's ``greeting`` (``None``: none;
    ``""``: a nameless "Hi, ") and the footer; ``render(Note(...))`` from its parts."""
    summary = note.summary
    if greeting is not None:
        greet = "Hi {" + GREETING_SLOT + "}, " if greeting else "Hi, "
        summary = Mrkdwn(greet + summary.template, {**summary.values, GREETING_SLOT: greeting})
    return render_parts(
        note.title,
        *render_pair(summary.template, summary.values),
        note.facts,
        note.detail,
        pipeline.steps,
        links,
        warning,
        f"{pipeline.name} · event {event_id} · message {mid}",
    )


# Holes of a compiled alert (``render.hole``), then one per slot, then the two the fallback
# text shows differently from the blocks.
_H_TITLE, _H_DETAIL, _H_WARNING, _H_LINKS, _H_GREETING, _H_EVENT, _H_MID = range(7)
_FIXED_HOLES: Final = 7
#: a shape's greeting: a miss (warning instead), "Hi, ", "Hi <name>, "
_MISSED, _NAMELESS, _NAMED = range(3)
_UNSEEN: Final = object()


class CompiledNotes(Generic[E]):
    """The alerts of a pipeline whose ``describe`` is a ``NoteTemplate``, as compiled
    templates: one per shape, compiled when the shape is first met.

    A shape is what changes the blocks' layout rather than their strings: the greeting (or
    the miss warning), whether the detail and the links are there, which facts that may be
    empty are. Each template is checked once against ``render_parts`` on sample strings and
    is not used if it differs (``render`` then answers ``None`` for that shape, as it does
    for an event whose strings would make ``render_parts`` cut a block to Slack's limits).

    The templates are a cache: output is the same with or without them. At most 12 shapes
    per combination of empty facts (3 greetings x detail x links), a few KB each; compiling
    one is a render and a check (well under a millisecond), once per process.
    """

    def __init__(self, pipeline: Pipeline[E], template: NoteTemplate[E]) -> None:
        self._pipeline = pipeline
        self.template = template
        slots = template.slots
        self._title = _slot_joiner(template.title, slots)
        self._detail = None if template.detail is None else slots.index(template.detail[1])
        # facts that are empty when all their slots are (no fixed text): one bit each
        maybe_empty = []
        for number, fact in enumerate(template.facts):
            parsed = list(Formatter().parse(fact.value))
            if not any(literal for literal, _, _, _ in parsed):
                used = _slot_fields(fact.value, slots)
                maybe_empty.append((1 << number, tuple(slots.index(n) for n in used)))
        self._maybe_empty = tuple(maybe_empty)
        self._shapes: dict[int, Template | None] = {}

    def render(
        self,
        values: tuple[str, ...],
        warning: str | None,
        greeting: str | None,
        event_id: str,
        mid: str,
        links: str,
    ) -> tuple[str, str, bytes | None] | None:
        """``_compose`` of ``template.note(values)`` from the shape's template with the
        blocks' UTF-8 (``Template.fill``), or ``None`` when the template cannot say it (the
        caller composes it)."""
        joined = "".join(values)
        if "&" in joined or "<" in joined or ">" in joined:
            escaped: Sequence[str] = [escape(v) for v in values]
        else:
            escaped = values
        mask = 0
        if "" in values:
            for bit, used in self._maybe_empty:
                if not any([values[i] for i in used]):
                    mask |= bit
        detail = "" if self._detail is None else values[self._detail]
        kind = _MISSED if greeting is None else _NAMED if greeting else _NAMELESS
        shape = ((mask * 3 + kind) << 2) | (2 if detail else 0) | (1 if links else 0)
        template = self._shapes.get(shape, _UNSEEN)
        if template is _UNSEEN:
            template = self._compile(values, warning, greeting, detail, links)
            self._shapes[shape] = template
        if template is None:
            return None
        assert isinstance(template, Template)
        return self._fill(
            template, values, escaped, warning, greeting, event_id, mid, detail, links
        )

    def _fill(
        self,
        template: Template,
        values: Sequence[str],
        escaped: Sequence[str],
        warning: str | None,
        greeting: str | None,
        event_id: str,
        mid: str,
        detail: str,
        links: str,
    ) -> tuple[str, str, bytes | None] | None:
        header = header_text(self._title(values))
        if detail:  # as render's code block and fallback text show it
            stripped = detail.strip()
            body = escape(stripped) if stripped else "(empty)"
            if "```" in body:  # three backticks would close the code block early
                body = body.replace("```", "`\u200b``")
            short = fit(detail, FALLBACK_DETAIL_CHARS)
        else:
            body = short = ""
        return template.fill(
            (
                header,
                body,
                escape(warning) if warning else "",
                links,
                escape(greeting) if greeting else "",
                escape(event_id),
                escape(mid),
                *escaped,
                escape(header),
                short,
            )
        )

    def _compile(
        self,
        values: Sequence[str],
        warning: str | None,
        greeting: str | None,
        detail: str,
        links: str,
    ) -> Template | None:
        """The template of the shape of this event (``values`` and the rest say which)."""
        note_template, pipeline = self.template, self._pipeline
        count = len(note_template.slots)
        holes = [hole(i) for i in range(_FIXED_HOLES + count)]
        named = dict(zip(note_template.slots, holes[_FIXED_HOLES:], strict=True))
        note = note_template.note(holes[_FIXED_HOLES:])
        real = dict(zip(note_template.slots, values, strict=True))
        facts = tuple(  # the shape's empty facts empty, the others their holes
            fact if declared.value.format_map(real) else fact._replace(value="")
            for fact, declared in zip(note.facts, note_template.facts, strict=True)
        )
        declared_detail = note_template.detail
        rendered = _compose(
            pipeline,
            Note(
                title=holes[_H_TITLE],
                summary=Mrkdwn(note_template.summary, named),
                facts=facts,
                detail=Detail(declared_detail[0], holes[_H_DETAIL])
                if declared_detail and detail
                else None,
            ),
            holes[_H_WARNING] if warning else None,
            None if greeting is None else holes[_H_GREETING] if greeting else "",
            holes[_H_EVENT],
            holes[_H_MID],
            holes[_H_LINKS] if links else "",
        )
        compiled = compile_template(
            *rendered,
            {_H_TITLE: _FIXED_HOLES + count, _H_DETAIL: _FIXED_HOLES + count + 1},
        )
        if compiled is None:
            return None
        # Checked against the renderer on this shape with strings of its own (markup, escapes,
        # JSON specials): a fixed part render_parts cut, say, would not fill the same.
        probe = [_probe(i, v) for i, v in enumerate(values)]
        probe_warning = _probe(-1, warning) if warning else None
        probe_greeting = None if greeting is None else _probe(-2, greeting)
        probe_links = _probe(-3, links)
        expected = _compose(
            pipeline,
            note_template.note(probe),
            probe_warning,
            probe_greeting,
            "event <&>",
            "mid",
            probe_links,
        )
        escaped = [escape(v) for v in probe]
        detail = "" if self._detail is None else probe[self._detail]
        filled = self._fill(
            compiled, probe, escaped, probe_warning, probe_greeting, "event <&>", "mid",
            detail, probe_links,
        )  # fmt: skip
        if filled is None or filled[:2] != expected:
            return None
        # the UTF-8 is the blocks' (what the output's Avro would have encoded)
        return compiled if filled[2] == filled[1].encode() else None


def _probe(number: int, value: str) -> str:
    """A sample string standing for ``value`` (empty when it is): markup, escapes, a quote
    and a backslash for JSON, a line break, multi-byte UTF-8."""
    return f' p{number} <&> "q\\" ``` *b*\n é→🚀' if value else ""


#: ``SlackMessage``'s fields, in declaration order
_MESSAGE_FIELDS: Final = (
    "message_id",
    "pipeline",
    "channel",
    "text",
    "blocks",
    "org_id",
    "source_event_id",
    "created_at",
    "update_of",
)
#: ``SlackMessage(*values)`` only sets its slots in order (``slot_setters`` checks how its
#: ``__init__`` was made): ``new_message`` may set them itself
_SETS_SLOTS_ONLY: Final = slot_setters(SlackMessage, _MESSAGE_FIELDS) is not None


def new_message(
    mid: str,
    pipeline: str,
    channel: str,
    text: str,
    blocks: str,
    org_id: str,
    event_id: str,
    created_at: datetime,
    update_of: str | None,
) -> SlackMessage:
    """``SlackMessage(*fields)`` (one per routed event).

    Compiled, ``object.__setattr__`` of a literal name is CPython's generic attribute setter
    (mypyc's ``CPyObject_GenericSetAttr``): the slot's own setter, no frozen check, no
    argument tuple. It was an ``exec``'d function (``positional_builder``) calling each slot's
    ``__set__``, interpreted code called from the compiled path (≈ 0.3 µs more per message).
    """
    if not _SETS_SLOTS_ONLY:
        return SlackMessage(
            mid, pipeline, channel, text, blocks, org_id, event_id, created_at, update_of
        )
    message = object.__new__(SlackMessage)
    object.__setattr__(message, "message_id", mid)
    object.__setattr__(message, "pipeline", pipeline)
    object.__setattr__(message, "channel", channel)
    object.__setattr__(message, "text", text)
    object.__setattr__(message, "blocks", blocks)
    object.__setattr__(message, "org_id", org_id)
    object.__setattr__(message, "source_event_id", event_id)
    object.__setattr__(message, "created_at", created_at)
    object.__setattr__(message, "update_of", update_of)
    return message


def route(
    event: E,
    owner: CsdrAssignment | None,
    user: SlackUser | None,
    *,
    pipeline: Pipeline[E],
    now: datetime,
    fallback_channel: str | None,
    mid: str | None = None,
) -> Outcome:
    """Decide what ``event``, which passed the pipeline's filter, becomes given the joins.

    Owner and Slack user found: an ``Alert`` DM'd to the owner (the channel is the Slack user
    id). A miss: an ``Alert`` to ``fallback_channel`` whose text says why, or a ``Miss``
    (nothing produced) when there is no fallback channel. ``process`` filters first. ``mid``
    replaces the message id (a parked event re-routed after its fallback copy was posted).
    """
    miss = _miss(owner, user)
    if miss is not None and not fallback_channel:
        return Miss(miss, _miss_warning(miss, event, owner))
    if mid is None:
        mid = message_id(pipeline.name, event.event_id)
    warning: str | None = None
    greeting: str | None = None
    if miss is not None and fallback_channel:
        channel = fallback_channel
        warning = _miss_warning(miss, event, owner)
    elif owner is not None and user is not None:
        channel = user.slack_user_id.strip()
        greeting = _greeting_name(owner)
    else:  # unreachable: _miss returns a reason whenever owner or user is missing
        return Miss(miss or NO_OWNER, _miss_warning(miss or NO_OWNER, event, owner))
    ctx = Context(owner, user)
    links = _links(pipeline, event)
    compiled = pipeline.compiled
    utf8: bytes | None = None
    if compiled is not None:
        values = compiled.template.values(event, ctx)
        filled = compiled.render(values, warning, greeting, event.event_id, mid, links)
        if filled is not None:
            text, blocks, utf8 = filled
        else:  # a value at Slack's limits, or a shape no template says
            note = compiled.template.note(values)
            text, blocks = _compose(pipeline, note, warning, greeting, event.event_id, mid, links)
    else:
        note = pipeline.describe(event, ctx)
        if miss is None:
            warning = note.warning
        text, blocks = _compose(pipeline, note, warning, greeting, event.event_id, mid, links)
    # SlackMessage's fields in order: message_id, pipeline, channel, text, blocks, org_id,
    # source_event_id, created_at, update_of
    message = new_message(
        mid, pipeline.name, channel, text, blocks, event.org_id, event.event_id, now, None
    )
    return Alert(message, miss, owner, user, utf8)


def process(
    event: E,
    *,
    pipeline: Pipeline[E],
    owners: Lookup[CsdrAssignment],
    users: Lookup[SlackUser],
    now: datetime,
    fallback_channel: str | None,
) -> Outcome:
    """Filter, look up (owner by org id, then Slack user by the owner's e-mail) and ``route``.

    The filter runs first so a dropped event costs no lookup.
    """
    dropped = pipeline.keep(event)
    if dropped is not None:
        return Drop(dropped)
    owner = owners.get(event.org_id)
    user = users.get(slack_user_key(owner.csdr_email)) if owner and owner.csdr_email else None
    return route(event, owner, user, pipeline=pipeline, now=now, fallback_channel=fallback_channel)
