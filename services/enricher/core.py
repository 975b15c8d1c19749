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
from typing import Final, Generic, Protocol, TypeVar

from libs.serde import CsdrAssignment, SlackMessage, SlackUser
from services.enricher.render import (
    Link,
    Mrkdwn,
    Note,
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


@dataclass(frozen=True)
class Context:
    """What the joins found, handed to a pipeline's ``describe``."""

    owner: CsdrAssignment | None
    user: SlackUser | None

    @property
    def org_name(self) -> str | None:
        """The customer's name as the account-team mapping knows it."""
        return self.owner.org_name if self.owner and self.owner.org_name else None


def keep_all(event: object) -> str | None:
    """The filter of a pipeline that alerts on every record."""
    return None


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


@dataclass(frozen=True)
class Alert:
    """Produce ``message``; ``miss`` names the join miss when it goes to the fallback channel."""

    message: SlackMessage
    miss: str | None = None
    #: the lookups ``route`` rendered ``message`` from (``None``: absent): with the event, what
    #: renders it again (the alert lifecycle keeps these instead of the rendered message)
    owner: CsdrAssignment | None = dataclasses.field(default=None, compare=False, repr=False)
    user: SlackUser | None = dataclasses.field(default=None, compare=False, repr=False)


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
    digest = hashlib.sha256(f"{pipeline}\x00{event_id}".encode()).hexdigest()
    return digest[:MESSAGE_ID_HEX]


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


def _greeting(summary: Mrkdwn, owner: CsdrAssignment) -> Mrkdwn:
    first = (owner.csdr_name or "").split()
    name = first[0] if first else ""
    greet = "Hi {greeting_name}, " if name else "Hi, "
    return Mrkdwn(greet + summary.template, {**summary.values, "greeting_name": name})


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
    described = pipeline.describe(event, Context(owner, user))
    summary, warning = described.summary, described.warning
    if miss is not None and fallback_channel:
        channel = fallback_channel
        warning = _miss_warning(miss, event, owner)
    elif owner is not None and user is not None:
        channel = user.slack_user_id.strip()
        summary = _greeting(summary, owner)
    else:  # unreachable: _miss returns a reason whenever owner or user is missing
        return Miss(miss or NO_OWNER, _miss_warning(miss or NO_OWNER, event, owner))
    # render(Note(...)) of the described note with the pipeline's steps, links and footer,
    # from its parts: no second Note, no Link objects per event (both showed in profiles)
    text, blocks = render_parts(
        described.title,
        *render_pair(summary.template, summary.values),
        described.facts,
        described.detail,
        pipeline.steps,
        _link_line(pipeline, event),
        warning,
        f"{pipeline.name} · event {event.event_id} · message {mid}",
    )
    message = SlackMessage(
        message_id=mid,
        pipeline=pipeline.name,
        channel=channel,
        text=text,
        blocks=blocks,
        org_id=event.org_id,
        source_event_id=event.event_id,
        created_at=now,
    )
    return Alert(message, miss, owner, user)


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
