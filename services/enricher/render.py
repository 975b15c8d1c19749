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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Final, NamedTuple

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
_ALL_URL_SAFE: Final = re.compile("[A-Za-z0-9._~-]*")
#: each UTF-8 byte as it appears in a quoted value
_QUOTED_BYTE: Final = tuple(chr(b) if chr(b) in _URL_SAFE else f"%{b:02X}" for b in range(256))

#: rendered fragments that depend only on a pipeline's constants (labels, steps, templates),
#: so each is computed once; bounded in case a caller passes ever-new constants
_MEMO_MAX: Final = 4096
_memo: dict[tuple[str, object], str] = {}


def _memoized(kind: str, key: object, value: str) -> str:
    if len(_memo) < _MEMO_MAX:
        _memo[(kind, key)] = value
    return value


def escape(value: str) -> str:
    """Escape Slack's mrkdwn control characters (``&``, ``<``, ``>``) in untrusted text."""
    # Most values have none of the three: three scans in C beat building three copies.
    if "&" in value or "<" in value or ">" in value:
        # '&' first so the entities added after are not escaped again
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value


def quote_url_value(value: str) -> str:
    """Percent-encode one value substituted into a URL template (RFC 3986 unreserved kept)."""
    # ids usually are all safe: nothing to encode. ASCII letters and digits, with or
    # without "-", are known so without the regular expression (its call costs more).
    if value.isascii() and (
        value.isalnum() or value.replace("-", "").isalnum() or _ALL_URL_SAFE.fullmatch(value)
    ):
        return value
    return "".join([_QUOTED_BYTE[b] for b in value.encode("utf-8")])


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
        return _bare(self.template).format_map({k: escape(v) for k, v in self.values.items()})

    def render_both(self) -> tuple[str, str]:
        """``(render(), plain())``, escaping each value once."""
        return render_pair(self.template, self.values)


def render_pair(template: str, values: Mapping[str, str]) -> tuple[str, str]:
    """``Mrkdwn(template, values).render_both()`` without the ``Mrkdwn``."""
    escaped = {k: escape(v) for k, v in values.items()}
    return template.format_map(escaped), _bare(template).format_map(escaped)


def _bare(template: str) -> str:
    bare = _memo.get(("bare", template))
    if bare is None:
        bare = _memoized("bare", template, template.replace("*", "").replace("`", ""))
    return bare


class Fact(NamedTuple):
    """One labelled value in the facts grid (a section field).

    A named tuple, not a frozen dataclass: a pipeline builds five to ten per event, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs twice as much.
    """

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


_UTC_FORMAT: Final = "%Y-%m-%d %H:%M UTC"
#: (minutes since the epoch, text) of the last ``utc_minute``: events come in time order, so
#: consecutive ones mostly share their minute
_last_minute: tuple[int, str] = (-1, "")


def utc_minute(moment: datetime) -> str:
    """``moment`` in UTC to the minute, as alerts show times (``2026-11-25 09:30 UTC``)."""
    global _last_minute
    try:
        delta = moment - _EPOCH  # exact integers (a float timestamp rounds far out)
    except TypeError:  # naive: astimezone's local-time rule, uncached
        return moment.astimezone(UTC).strftime(_UTC_FORMAT)
    minute = delta.days * 1440 + delta.seconds // 60
    last = _last_minute  # one read: another thread may replace it
    if minute != last[0]:
        last = _last_minute = (minute, moment.astimezone(UTC).strftime(_UTC_FORMAT))
    return last[1]


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def header_text(title: str) -> str:
    """The header block's text of an alert titled ``title``: whitespace collapsed, never
    empty, cut to Slack's limit."""
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


def link_line(links: Sequence[Link]) -> str:
    """The links as one mrkdwn line (``<url|label> · ...``), leaving out unusable URLs."""
    parts = [part for link in links if (part := link_part(link.label, link.url))]
    return " · ".join(parts)


def link_part(label: str, url: str) -> str:
    """One link as mrkdwn, or ``""`` when the URL is not absolute http(s) or is too long."""
    if not url.startswith(("https://", "http://")) or len(url) > MAX_URL:
        return ""  # a broken or oversized link is worse than none
    # In <url|label> the URL's own & must be escaped and a | or > would end it early.
    return "<" + escape(url).replace("|", "%7C") + "|" + _link_label(label) + ">"


def _link_label(label: str) -> str:
    done = _memo.get(("link", label))
    if done is None:
        done = _memoized("link", label, escape(label).replace("|", "¦"))
    return done


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


# Block Kit JSON is written directly: the blocks have a fixed shape, and building dicts only to
# have json.dumps walk them was the largest single cost per alert. Strings go through the same
# encoder json.dumps(ensure_ascii=False) uses, so the bytes are the same as before.
_J = encode_basestring


def _section_json(text: str, block_id: str) -> str:
    return (
        '{"type":"section","block_id":' + _J(block_id) + ',"text":{"type":"mrkdwn","text":'
        + _J(text) + "}}"
    )  # fmt: skip


def _field_label(label: str) -> str:
    done = _memo.get(("label", label))
    if done is None:
        done = _memoized("label", label, f"*{escape(label)}*\n")
    return done


def _steps_json(steps: Sequence[str]) -> str:
    key = tuple(steps)
    done = _memo.get(("steps", key))
    if done is None:
        lines = "\n".join(f"• {escape(step)}" for step in steps)
        text = _fit_rendered("*Suggested next steps*\n" + lines)
        done = _memoized("steps", key, _section_json(text, "steps"))
    return done


def render(note: Note) -> tuple[str, str]:
    """``(fallback_text(note), blocks_json(note))``, sharing the work the two have in common."""
    summary, summary_plain = note.summary.render_both()
    return render_parts(
        note.title,
        summary,
        summary_plain,
        note.facts,
        note.detail,
        note.steps,
        link_line(note.links),
        note.warning,
        note.footer,
    )


def _fact_json(label: str, code: bool) -> tuple[str, int]:
    """The JSON of a fact's field up to its value (``_J`` escapes per character, so a
    string's JSON is the concatenation of its parts'), and the value's budget."""
    key = (label, code)
    done = _fact_memo.get(key)
    if done is None:
        head = _field_label(label)
        budget = MAX_FIELD_TEXT - len(head) - (2 if code else 0)
        done = ('{"type":"mrkdwn","text":' + _J(head + ("`" if code else ""))[:-1], budget)
        if len(_fact_memo) < _MEMO_MAX:
            _fact_memo[key] = done
    return done


_fact_memo: dict[tuple[str, bool], tuple[str, int]] = {}


def render_parts(
    title: str,
    summary: str,
    summary_plain: str,
    facts: Sequence[Fact],
    detail: Detail | None,
    steps: Sequence[str],
    links: str,
    warning: str | None,
    footer: str,
) -> tuple[str, str]:
    """``render`` of a note given as its parts: the summary already rendered (mrkdwn and
    plain, values escaped) and the links as ``link_line`` gives them, so the core renders an
    alert without building a second ``Note`` per event."""
    header = header_text(title)
    blocks = [
        '{"type":"header","block_id":"title","text":{"type":"plain_text","text":'
        + _J(header) + ',"emoji":true}}'
    ]  # fmt: skip
    if warning:
        blocks.append(_section_json(fit(":warning: " + warning, MAX_SECTION_TEXT), "warning"))
    blocks.append(_section_json(_fit_rendered(summary), "summary"))
    fields: list[str] = []
    for fact in facts:
        value = fact.value
        if not value:
            continue
        if len(fields) == MAX_FIELDS:
            break
        code = fact.code
        head, budget = _fact_json(fact.label, code)
        escaped = escape(value)
        if len(escaped) > budget:  # rare: fit() cuts it visibly
            escaped = fit(value, budget)
        # the value's JSON without its opening quote (closing the text begun in ``head``)
        fields.append(head + _J(escaped)[1:-1] + '`"}' if code else head + _J(escaped)[1:] + "}")
    if fields:
        blocks.append('{"type":"section","block_id":"facts","fields":[' + ",".join(fields) + "]}")
    if detail is not None and detail.text:
        blocks.append(_section_json(_code_block(detail.label, detail.text), "detail"))
    if steps:
        blocks.append(_steps_json(steps))
    if links:
        blocks.append(_section_json(_fit_rendered(links), "links"))
    if footer:
        blocks.append(
            '{"type":"context","block_id":"footer","elements":[{"type":"mrkdwn","text":'
            + _J(fit(footer, MAX_FIELD_TEXT)) + "}]}"
        )  # fmt: skip
    blocks_json = "[" + ",".join(blocks[:MAX_BLOCKS]) + "]"

    first = f"{escape(header)} — {summary_plain}"
    text = escape(warning) + "\n" + first if warning else first
    if detail is not None and detail.text:
        text += f"\n{escape(detail.label)}: {fit(detail.text, FALLBACK_DETAIL_CHARS)}"
    text = text.strip() or "Alert"
    return _fit_rendered(text, MAX_FALLBACK_TEXT), blocks_json


# Compiled templates (``core.NoteTemplate``): an alert of a fixed shape is rendered once with
# placeholder characters ("holes") where its variable strings go, and kept as its fixed pieces;
# an event then only escapes its strings and joins them with the pieces. ``render_parts`` stays
# the reference: a template is checked against it when compiled, and declines (``fill``
# answers ``None``) whenever a value would make ``render_parts`` cut a block to Slack's limits.

#: hole ``i`` is ``chr(HOLE_BASE + i)``: Unicode's supplementary private use area, which
#: escaping, JSON encoding and whitespace rules all leave alone
HOLE_BASE: Final = 0xF0000
_HOLE: Final = re.compile("([\U000f0000-\U000ffffd])")
#: what JSON must escape in a string (``encode_basestring``, ``ensure_ascii=False``)
_JSON_SPECIAL: Final = re.compile(r'["\\\x00-\x1f]')
#: the same characters' UTF-8 (each one byte, which no other character's UTF-8 contains)
_JSON_SPECIAL_BYTES: Final = bytes(range(0x20)) + b'"\\'


def hole(index: int) -> str:
    """The character standing for hole ``index`` in an alert rendered to compile a template."""
    return chr(HOLE_BASE + index)


Joiner = Callable[[Sequence[str]], str]


def joiner(pieces: Sequence[str], holes: Sequence[int]) -> Joiner:
    """A function of ``h`` joining ``pieces[0], h[holes[0]], pieces[1], ...,
    pieces[-1]`` (one more piece than holes).

    Generated once per template (as ``dataclasses`` generates ``__init__``): a join of a tuple
    is a third of ``str.format``'s cost, which parses its template on every call. The source
    holds only indexes; the pieces are passed in, never part of the code.
    """
    if len(pieces) != len(holes) + 1:
        raise ValueError(f"{len(pieces)} pieces around {len(holes)} holes")
    join: Joiner = eval(_join_source("''", len(pieces), holes), {"__builtins__": {}})(*pieces)
    return join


def _join_source(empty: str, count: int, holes: Sequence[int]) -> str:
    """``lambda p0, p1, ...: lambda h: <empty>.join((p0, h[..], p1, ...))``: each piece a
    variable of the closure, which the join reads in one step (``p[i]`` takes three)."""
    terms = [f"p{i}, h[{int(number)}]" for i, number in enumerate(holes)]
    terms.append(f"p{len(holes)}")
    params = ", ".join(f"p{i}" for i in range(count))
    return f"lambda {params}: lambda h: {empty}.join(({', '.join(terms)},))"


Utf8Joiner = Callable[[Sequence[bytes]], bytes]


def utf8_joiner(pieces: Sequence[str], holes: Sequence[int]) -> Utf8Joiner:
    """``joiner(pieces, holes)`` of the holes' UTF-8, answering the joined string's: the
    pieces are encoded once, here; per call only the holes' strings have been (UTF-8 is per
    character, so a string's UTF-8 is its parts' concatenated). An alert's fixed pieces are
    most of its ~2 KB of blocks and hold non-ASCII characters (``·``, ``•``, ``…``):
    encoding them per event was most of the cost of writing the message."""
    if len(pieces) != len(holes) + 1:
        raise ValueError(f"{len(pieces)} pieces around {len(holes)} holes")
    source = _join_source("b''", len(pieces), holes)
    join: Utf8Joiner = eval(source, {"__builtins__": {}})(*[p.encode() for p in pieces])
    return join


def _joiner(rendered: str, remap: Mapping[int, int]) -> tuple[Joiner, int]:
    """The ``joiner`` of ``rendered`` (hole ``i`` where it has ``hole(i)``, or hole
    ``remap[i]``), and one more than the largest hole it takes."""
    split = _HOLE.split(rendered)  # pieces at even positions, hole characters between
    holes = [ord(found) - HOLE_BASE for found in split[1::2]]
    holes = [remap.get(number, number) for number in holes]
    return joiner(split[0::2], holes), max(holes, default=-1) + 1


def _block_texts(blocks_json: str) -> list[tuple[str, int]] | None:
    """Each text of rendered blocks with the limit ``render_parts`` holds it to, or ``None``
    for blocks it does not write."""
    texts: list[tuple[str, int]] = []
    for block in json.loads(blocks_json):
        kind = block.get("type")
        if kind == "header":
            continue  # the title alone, which header_text cuts before it is filled in
        if kind == "section" and "text" in block:
            texts.append((block["text"]["text"], MAX_SECTION_TEXT))
        elif kind == "section" and "fields" in block:
            texts.extend((f["text"], MAX_FIELD_TEXT) for f in block["fields"])
        elif kind == "context":
            texts.extend((e["text"], MAX_FIELD_TEXT) for e in block["elements"])
        else:
            return None
    return texts


@dataclass(frozen=True)
class Template:
    """An alert's ``(text, blocks)`` as their fixed pieces and holes (``compile_template``).

    ``fill`` takes the holes' final strings (mrkdwn-escaped where ``render_parts`` escapes;
    JSON encoding is ``fill``'s). ``limits`` holds, per block text with holes, the room its
    fixed characters leave under Slack's limit and how often each hole occurs in it.
    """

    text: Joiner
    blocks: Joiner
    #: ``blocks`` as UTF-8 (``utf8_joiner``): what the message's Avro carries
    blocks_utf8: Utf8Joiner
    limits: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    #: holes whose lengths add up to at most this fit every block text (``limits``' shortcut)
    slack: int
    #: the blocks use holes ``0 .. block_holes - 1`` (the others are the text's own)
    block_holes: int

    def fill(self, holes: Sequence[str]) -> tuple[str, str, bytes | None] | None:
        """``(text, blocks, blocks.encode())`` with the holes filled, or ``None`` when a block
        text would exceed its limit (``render_parts`` would cut it: the caller renders it
        instead). The UTF-8 is ``None`` when a string has none (a lone surrogate): the
        encoder then meets ``blocks`` itself and fails on it as it always did."""
        in_blocks = holes[: self.block_holes]
        size = 0
        for one in in_blocks:
            size += len(one)
        if size > self.slack:
            for room, counts in self.limits:
                if sum([len(holes[i]) * n for i, n in counts]) > room:
                    return None
        # the fallback text as render_parts finishes it (the holes may start or end with space)
        text = _fit_rendered(self.text(holes).strip() or "Alert", MAX_FALLBACK_TEXT)
        try:
            utf8 = [h.encode() for h in in_blocks]
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 (the encoder meets it)
            if _JSON_SPECIAL.search("".join(in_blocks)) is not None:
                in_blocks = [_J(h)[1:-1] for h in in_blocks]
            return text, self.blocks(in_blocks), None
        # Mostly the strings are their own JSON. Checked on their UTF-8, which holds each of
        # JSON's specials (ASCII) as itself and nowhere else: deleting bytes is one C loop,
        # cheaper than a regular expression over the ~600 characters.
        raw = b"".join(utf8)
        if len(raw.translate(None, _JSON_SPECIAL_BYTES)) != len(raw):
            utf8 = [_J(h)[1:-1].encode() for h in in_blocks]
        # The blocks are their UTF-8 decoded (every string had one): one pass of the decoder
        # costs about half of joining the strings, which widens each ASCII hole to the two
        # bytes a character of the pieces takes (they hold "•").
        blocks_utf8 = self.blocks_utf8(utf8)
        return text, blocks_utf8.decode(), blocks_utf8


def compile_template(
    text: str, blocks_json: str, text_holes: Mapping[int, int] | None = None
) -> Template | None:
    """The ``Template`` of ``render_parts``' output for an alert whose variable strings were
    holes (``hole(i)``), or ``None`` when the blocks are not ones ``render_parts`` writes.

    ``text_holes`` maps a hole to another one in the fallback text, for a string the text
    shows differently (the title escaped, the detail shortened). The caller checks the result
    against ``render_parts`` on sample values: a fixed part cut to a limit, say, would differ.
    """
    texts = _block_texts(blocks_json)
    if texts is None:
        return None
    limits = []
    slack = MAX_FALLBACK_TEXT * 1000  # no block text with holes: any length fits
    for block_text, limit in texts:
        counts: dict[int, int] = {}
        for found in _HOLE.findall(block_text):
            counts[ord(found) - HOLE_BASE] = counts.get(ord(found) - HOLE_BASE, 0) + 1
        if not counts:
            continue
        room = limit - (len(block_text) - sum(counts.values()))
        limits.append((room, tuple(sorted(counts.items()))))
        slack = min(slack, room // max(counts.values()))
    join_blocks, block_holes = _joiner(blocks_json, {})
    join_text, _ = _joiner(text, text_holes or {})
    split = _HOLE.split(blocks_json)
    join_utf8 = utf8_joiner(split[0::2], [ord(found) - HOLE_BASE for found in split[1::2]])
    return Template(join_text, join_blocks, join_utf8, tuple(limits), slack, block_holes)


def blocks(note: Note) -> list[dict[str, object]]:
    """The Block Kit blocks of ``note``, within Slack's limits by construction."""
    parsed: list[dict[str, object]] = json.loads(blocks_json(note))
    return parsed


def blocks_json(note: Note) -> str:
    """The blocks of ``note`` as the compact JSON string ``SlackMessage.blocks`` carries."""
    return render(note)[1]


def fallback_text(note: Note) -> str:
    """Plain-text fallback (notifications, screen readers): always set, never empty."""
    return render(note)[0]


@dataclass(frozen=True)
class Revision:
    """How an update changes an alert already posted (``render_update``).

    ``status`` is trusted mrkdwn written by the lifecycle (values escaped by the caller);
    ``detail`` replaces the alert's detail block (the latest error); ``strike_steps`` marks
    the suggested steps as no longer needed (a resolution).
    """

    status: str
    detail: Detail | None = None
    strike_steps: bool = False


def _struck_steps(text: str) -> str:
    lines = text.split("\n")
    head = lines[0] + " (no longer needed)" if lines else ""
    struck = [f"• ~{line[2:]}~" if line.startswith("• ") else line for line in lines[1:]]
    return _fit_rendered("\n".join([head, *struck]))


def render_update(text: str, blocks_json: str, revision: Revision) -> tuple[str, str]:
    """``(text, blocks)`` of an update of the alert whose original ``text`` and blocks are given.

    Updates are rendered from the original every time (never from an earlier update), so the
    Slack message always shows the original alert plus the one current status: a status
    section under the title (and the miss warning, if any), the latest detail, struck steps.
    Only updates pay for parsing the blocks; a first message never comes here.
    """
    parsed: list[dict[str, object]] = json.loads(blocks_json)
    status_block: dict[str, object] = {
        "type": "section",
        "block_id": "status",
        "text": {"type": "mrkdwn", "text": _fit_rendered(revision.status)},
    }
    out: list[dict[str, object]] = []
    for block in parsed:
        block_id = block.get("block_id")
        if block_id == "status":
            continue
        if block_id == "detail" and revision.detail is not None:
            continue  # replaced below, where the original had it
        if block_id == "summary":
            out.append(status_block)
        if block_id == "steps" and revision.strike_steps:
            inner = block.get("text")
            steps_text = str(inner.get("text", "")) if isinstance(inner, dict) else ""
            block = {**block, "text": {"type": "mrkdwn", "text": _struck_steps(steps_text)}}
        if block_id in ("steps", "links", "footer") and revision.detail is not None:
            out.append(_detail_block(revision.detail))
            revision = Revision(revision.status, None, revision.strike_steps)
        out.append(block)
    if revision.detail is not None:  # the original had no steps, links or footer
        out.append(_detail_block(revision.detail))
    if status_block not in out:
        out.insert(min(1, len(out)), status_block)
    status_plain = revision.status.replace("*", "").replace("~", "")
    new_text = _fit_rendered(status_plain + "\n" + text, MAX_FALLBACK_TEXT)
    return new_text, json.dumps(out[:MAX_BLOCKS], ensure_ascii=False, separators=(",", ":"))


def _detail_block(detail: Detail) -> dict[str, object]:
    return {
        "type": "section",
        "block_id": "detail",
        "text": {"type": "mrkdwn", "text": _code_block(detail.label, detail.text)},
    }
