"""Block Kit rendering: a ``Note`` (what a pipeline wants to say) to blocks and fallback text.

Pipelines describe an alert as data (title, summary, facts, a long detail, steps, links) and
never touch Block Kit, escaping or Slack's limits; this module does all three, so a new
pipeline cannot produce a message Slack rejects or a customer-controlled string that pings a
channel (``<!channel>`` in an org name) or breaks a link.

Slack's limits honoured here (``chat.postMessage`` answers ``invalid_blocks`` otherwise): at
most 50 blocks, section text at most 3000 characters, at most 10 section fields of 2000, header
``plain_text`` at most 150, fallback ``text`` at most 40000. Long values are cut visibly
(``… (truncated, 12,345 chars)``) instead of being rejected by Slack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_BLOCKS: Final = 50
MAX_SECTION_TEXT: Final = 3000
MAX_FIELDS: Final = 10
MAX_FIELD_TEXT: Final = 2000
MAX_HEADER_TEXT: Final = 150
MAX_URL: Final = 3000
#: The fallback text feeds notifications and screen readers: short is better than complete.
MAX_FALLBACK_TEXT: Final = 1500
#: How much of a long detail (an error message) the fallback text quotes.
FALLBACK_DETAIL_CHARS: Final = 300

# Characters that survive unencoded in a URL path or query value built from a template.
_URL_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def escape(value: str) -> str:
    """Escape Slack's mrkdwn control characters (``&``, ``<``, ``>``) in untrusted text."""
    # str.replace runs in C; '&' first so the entities added after are not escaped again
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def quote_url_value(value: str) -> str:
    """Percent-encode one value substituted into a URL template (RFC 3986 unreserved kept)."""
    out: list[str] = []
    for char in value:
        if char in _URL_SAFE:
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8"))
    return "".join(out)


def truncation_marker(total: int) -> str:
    """What replaces the cut-off tail of a long value."""
    return f"… (truncated, {total:,} chars)"


def fit(value: str, limit: int) -> str:
    """``value`` escaped and cut to at most ``limit`` characters, visibly.

    The cut is made on the raw text, so an escape sequence is never split in half, and the
    marker names the original length so the reader knows how much is missing.
    """
    rendered = escape(value)
    if len(rendered) <= limit:
        return rendered
    marker = truncation_marker(len(value))
    if len(marker) >= limit:  # no room to say how much is missing: an ellipsis must do
        marker = "…"
    budget = max(0, limit - len(marker))
    # Each raw character escapes to 1-5 characters: shrink the raw cut until its escaped form
    # fits (a few rounds even for a 50k-character value full of '&').
    cut = min(len(value), budget)
    head = escape(value[:cut])
    while len(head) > budget:
        cut -= max(1, (len(head) - budget + 4) // 5)
        head = escape(value[:cut])
    return (head + marker)[:limit]


@dataclass(frozen=True)
class Mrkdwn:
    """A mrkdwn template whose ``{placeholders}`` are filled with escaped values.

    The template itself is trusted (written in a pipeline module) and may use ``*bold*`` and
    ```code```; only the values are escaped. ``plain()`` drops that markup for the fallback.
    """

    template: str
    values: Mapping[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """The mrkdwn text, values escaped."""
        return self.template.format_map({k: escape(v) for k, v in self.values.items()})

    def plain(self) -> str:
        """The text without markup, for the plain-text fallback (values still escaped)."""
        bare = self.template.replace("*", "").replace("`", "")
        return bare.format_map({k: escape(v) for k, v in self.values.items()})


@dataclass(frozen=True)
class Fact:
    """One labelled value in the facts grid (a section field)."""

    label: str
    value: str
    code: bool = False


@dataclass(frozen=True)
class Detail:
    """A long, untrusted text shown as a code block (an error message, a stack trace)."""

    label: str
    text: str


@dataclass(frozen=True)
class Link:
    """A resolved link: a label and an absolute URL."""

    label: str
    url: str


@dataclass(frozen=True)
class Note:
    """Everything an alert says, as data; ``blocks()`` and ``fallback_text()`` render it."""

    title: str
    summary: Mrkdwn
    facts: Sequence[Fact] = ()
    detail: Detail | None = None
    steps: Sequence[str] = ()
    links: Sequence[Link] = ()
    #: why the message is not in the owner's DM (set when it goes to the fallback channel)
    warning: str | None = None
    footer: str = ""


def _section(text: str, block_id: str) -> dict[str, object]:
    return {
        "type": "section",
        "block_id": block_id,
        "text": {"type": "mrkdwn", "text": text},
    }


def _header_text(title: str) -> str:
    title = " ".join(title.split()) or "Alert"
    if len(title) <= MAX_HEADER_TEXT:
        return title
    return title[: MAX_HEADER_TEXT - 1] + "…"


def _code_block(label: str, text: str) -> str:
    prefix = f"*{escape(label)}*\n```"
    suffix = "```"
    body = fit(text.strip() or "(empty)", MAX_SECTION_TEXT - len(prefix) - len(suffix))
    # Three backticks inside the value would close the code block early.
    body = body.replace("```", "`\u200b``")
    return (prefix + body + suffix)[:MAX_SECTION_TEXT]


def _link_line(links: Sequence[Link]) -> str:
    parts = []
    for link in links:
        if not link.url.startswith(("https://", "http://")) or len(link.url) > MAX_URL:
            continue  # a broken or oversized link is worse than none
        # In <url|label> the URL's own & must be escaped and a | or > would end it early.
        url = escape(link.url).replace("|", "%7C")
        parts.append(f"<{url}|{escape(link.label).replace('|', '¦')}>")
    return " · ".join(parts)


def blocks(note: Note) -> list[dict[str, object]]:
    """The Block Kit blocks of ``note``, within Slack's limits by construction."""
    out: list[dict[str, object]] = [
        {
            "type": "header",
            "block_id": "title",
            "text": {"type": "plain_text", "text": _header_text(note.title), "emoji": True},
        }
    ]
    if note.warning:
        out.append(_section(fit(":warning: " + note.warning, MAX_SECTION_TEXT), "warning"))
    out.append(_section(_fit_rendered(note.summary.render()), "summary"))
    facts = [f for f in note.facts if f.value][:MAX_FIELDS]
    if facts:
        fields = []
        for fact in facts:
            label = f"*{escape(fact.label)}*\n"
            budget = MAX_FIELD_TEXT - len(label) - (2 if fact.code else 0)
            value = fit(fact.value, budget)
            fields.append(
                {"type": "mrkdwn", "text": label + (f"`{value}`" if fact.code else value)}
            )
        out.append({"type": "section", "block_id": "facts", "fields": fields})
    if note.detail is not None and note.detail.text:
        out.append(_section(_code_block(note.detail.label, note.detail.text), "detail"))
    if note.steps:
        lines = "\n".join(f"• {escape(step)}" for step in note.steps)
        out.append(_section(_fit_rendered("*Suggested next steps*\n" + lines), "steps"))
    link_line = _link_line(note.links)
    if link_line:
        out.append(_section(_fit_rendered(link_line), "links"))
    if note.footer:
        out.append(
            {
                "type": "context",
                "block_id": "footer",
                "elements": [{"type": "mrkdwn", "text": fit(note.footer, MAX_FIELD_TEXT)}],
            }
        )
    return out[:MAX_BLOCKS]


def _fit_rendered(text: str, limit: int = MAX_SECTION_TEXT) -> str:
    """Cut already-escaped mrkdwn to ``limit`` characters without splitting an escape or link."""
    if len(text) <= limit:
        return text
    marker = truncation_marker(len(text))
    head = text[: limit - len(marker)]
    # do not leave half an escape sequence or link behind
    amp, lt = head.rfind("&"), head.rfind("<")
    if amp > head.rfind(";"):
        head = head[:amp]
    if lt > head.rfind(">"):
        head = head[:lt]
    return head + marker


def blocks_json(note: Note) -> str:
    """``blocks(note)`` as the compact JSON string ``SlackMessage.blocks`` carries."""
    return json.dumps(blocks(note), ensure_ascii=False, separators=(",", ":"))


def fallback_text(note: Note) -> str:
    """Plain-text fallback (notifications, screen readers): always set, never empty."""
    lines = []
    if note.warning:
        lines.append(escape(note.warning))
    lines.append(f"{escape(_header_text(note.title))} — {note.summary.plain()}")
    if note.detail is not None and note.detail.text:
        lines.append(f"{escape(note.detail.label)}: {fit(note.detail.text, FALLBACK_DETAIL_CHARS)}")
    text = "\n".join(lines).strip() or "Alert"
    return _fit_rendered(text, MAX_FALLBACK_TEXT)
