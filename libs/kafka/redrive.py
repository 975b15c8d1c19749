"""Dead-letter inspection and re-drive: read ``<topic>.dlq``, send letters back to their source.

Selecting letters
-----------------
``scan_dead_letters`` reads one dead-letter topic between offsets it computes up front (the
selection's start from ``--since`` via ``offsets_for_times`` and from an offset range, the end
from the high watermarks taken at the start), so a scan is bounded in records and in time,
and reports progress against a known total.

Re-driving, and refusing to do it twice
---------------------------------------
The selection is read twice: the first pass keeps coordinates and targets only and refuses
before anything is produced; the second streams the letters into transactions, so memory is
bounded by a batch however many letters a mass failure dead-lettered.

A re-driven record is the dead letter's key and value, its original headers minus every
``dlq.*`` header, plus ``dlq.redriven.from: <dlq topic>/<partition>/<offset>``, produced to
``dlq.source.topic`` on partition ``dlq.source.partition`` (where the record was: its key's
partition whichever partitioner first wrote it).

Which letters were re-driven is recorded in a compacted ledger topic (one record per letter,
keyed by those coordinates), written in the *same Kafka transaction* as the re-driven records.
Why a ledger and not a scan of the source topic for the header:

* the commit is atomic: a crash leaves either the records and their ledger entries or
  neither, so a rerun after a crash knows exactly what went through;
* the ledger holds only re-driven letters, while the source topic may hold millions of
  records: a check stays cheap however big the source is;
* retention deletes the source's old records, and with them the evidence a scan relies on:
  a scan would silently allow a second re-drive of letters re-driven longer ago than the
  source's retention; the compacted ledger forgets nothing.

The transactional id is per dead-letter topic, and the ledger is read *after*
``init_transactions``: a concurrent or crashed re-drive of the same topic is fenced and its
open transaction aborted before the ledger is read, so two re-drives cannot both see a letter
as new. The producer is idempotent with ``acks=all`` (implied by transactions).

Warehouse rows dead-lettered by the producer name a table in ``dlq.source.topic`` and carry
partition ``-1``: they were never Kafka records, cannot be re-driven, and are refused.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from libs.kafka.dlq import (
    DLQ_SUFFIX,
    HEADER_ERROR_CLASS,
    HEADER_ERROR_MESSAGE,
    HEADER_SERVICE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
)
from libs.kafka.errors import KafkaLibError, TopicError
from libs.kafka.reader import read_to_end

log = logging.getLogger(__name__)

#: header of a re-driven record: the coordinates of the dead letter it came from
HEADER_REDRIVEN_FROM = "dlq.redriven.from"

_DLQ_HEADER_PREFIX = "dlq."


class RedriveError(KafkaLibError):
    """A dead-letter command cannot run as asked; the message says why and what to change."""


class SelectionError(RedriveError):
    """Bad input: a time, an offset range, a partition or a topic that does not exist."""


class NotRedrivableError(RedriveError):
    """Selected letters have no Kafka topic to go back to (warehouse rows, missing headers)."""


class AlreadyRedrivenError(RedriveError):
    """Selected letters were re-driven before; a second re-drive needs ``force``."""


# -- input parsing (pure) ----------------------------------------------------------------------

_AGE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, *, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it has no offset) or an age before ``now`` (``30m``, ``2h``).

    Raises ``SelectionError`` naming the text and the accepted forms.
    """
    raw = text.strip()
    age = _AGE.match(raw)
    if age:
        return now - timedelta(**{_UNITS[age[2]]: int(age[1])})
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise SelectionError(
            f"bad time {text!r}: use ISO 8601 (2026-12-02, 2026-12-02T17:00:00Z, "
            "2026-12-02T18:00+01:00) or an age: 90s, 30m, 2h, 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_offsets(text: str) -> tuple[int | None, int | None]:
    """An inclusive offset range: ``42``, ``100-200``, ``100-`` (to the end), ``-200``."""
    raw = text.strip()
    m = re.fullmatch(r"(\d*)\s*-\s*(\d*)", raw)
    if re.fullmatch(r"\d+", raw):
        return int(raw), int(raw)
    if not m or (not m[1] and not m[2]):
        raise SelectionError(
            f"bad offset range {text!r}: use FROM-TO (inclusive), FROM-, -TO or one offset"
        )
    low, high = (int(m[1]) if m[1] else None), (int(m[2]) if m[2] else None)
    if low is not None and high is not None and low > high:
        raise SelectionError(f"bad offset range {text!r}: {low} is after {high}")
    return low, high


def dlq_topic_of(name: str) -> str:
    """Accept a dead-letter topic or its source topic; return the dead-letter topic."""
    return name if name.endswith(DLQ_SUFFIX) else name + DLQ_SUFFIX


# -- dead letters (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic, with its CONTRACT headers decoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @classmethod
    def from_message(cls, msg: Message) -> DeadLetter:
        """From a consumed ``confluent_kafka.Message``."""
        ts_type, ts = msg.timestamp()
        raw = msg.headers() or []
        # consumed messages carry a list (duplicates kept); the dict form is for producing
        items = list(raw.items()) if isinstance(raw, dict) else raw
        return cls(
            topic=str(msg.topic()),
            partition=int(msg.partition() or 0),
            offset=int(msg.offset() or 0),
            timestamp_ms=ts if ts_type != 0 else None,  # 0: TIMESTAMP_NOT_AVAILABLE
            key=msg.key(),
            value=msg.value(),
            headers=tuple((str(k), _as_bytes(v)) for k, v in items),
        )

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` as text (the publisher appends its own last)."""
        found: str | None = None
        for k, v in self.headers:
            if k == name:
                found = None if v is None else v.decode("utf-8", "replace")
        return found

    @property
    def coordinates(self) -> str:
        """``<topic>/<partition>/<offset>``: the ledger key and the re-drive header value."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def error_class(self) -> str:
        return self.header(HEADER_ERROR_CLASS) or ""

    @property
    def error_message(self) -> str:
        return self.header(HEADER_ERROR_MESSAGE) or ""

    @property
    def source_topic(self) -> str | None:
        return self.header(HEADER_SOURCE_TOPIC)

    @property
    def source_partition(self) -> int | None:
        return _int_or_none(self.header(HEADER_SOURCE_PARTITION))

    @property
    def source_offset(self) -> int | None:
        return _int_or_none(self.header(HEADER_SOURCE_OFFSET))

    @property
    def service(self) -> str | None:
        return self.header(HEADER_SERVICE)

    @property
    def redriven_from(self) -> str | None:
        """Set when this letter failed again after an earlier re-drive."""
        return self.header(HEADER_REDRIVEN_FROM)

    def redrive_headers(self) -> list[tuple[str, bytes | None]]:
        """The original headers without the ``dlq.*`` ones, plus where the record comes from."""
        kept = [(k, v) for k, v in self.headers if not k.startswith(_DLQ_HEADER_PREFIX)]
        return [*kept, (HEADER_REDRIVEN_FROM, self.coordinates.encode())]

    def summary(self) -> dict[str, Any]:
        """The fields an operator reads first, JSON-ready."""
        return {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": _iso(self.timestamp_ms),
            "error_class": self.error_class,
            "error": self.error_message,
            "source": f"{self.source_topic}/{self.source_partition}/{self.source_offset}",
            "service": self.service,
            "redriven_from": self.redriven_from,
            "key": _text_preview(self.key),
        }


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _text_preview(data: bytes | None, limit: int = 80) -> str | None:
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data[: limit // 2].hex() + ("..." if len(data) > limit // 2 else "")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class LetterFilter:
    """Which letters a command works on; every criterion given must hold.

    ``error_class`` matches the full class name or its last part (``DeserializationError``
    matches ``libs.serde.errors.DeserializationError``). Offsets are inclusive and belong to
    ``partition``, which they require.
    """

    since: datetime | None = None
    until: datetime | None = None
    error_class: str | None = None
    partition: int | None = None
    offsets: tuple[int | None, int | None] | None = None

    def __post_init__(self) -> None:
        if self.offsets is not None and self.partition is None:
            raise SelectionError("an offset range needs a partition: offsets are per partition")
        if self.partition is not None and self.partition < 0:
            raise SelectionError(f"bad partition {self.partition}: partitions start at 0")
        if self.since and self.until and self.since > self.until:
            raise SelectionError(
                f"--since {self.since.isoformat()} is after --until {self.until.isoformat()}"
            )

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected."""
        if self.partition is not None and letter.partition != self.partition:
            return False
        if self.offsets is not None:
            low, high = self.offsets
            if (low is not None and letter.offset < low) or (
                high is not None and letter.offset > high
            ):
                return False
        if self.since or self.until:
            if letter.timestamp_ms is None:
                return False
            at = datetime.fromtimestamp(letter.timestamp_ms / 1000, UTC)
            if (self.since and at < self.since) or (self.until and at > self.until):
                return False
        if self.error_class:
            cls = letter.error_class
            if cls != self.error_class and cls.rsplit(".", 1)[-1] != self.error_class:
                return False
        return True


# -- scanning ----------------------------------------------------------------------------------

#: called with (records scanned, records in the selected offset ranges)
Progress = Callable[[int, int], None]


def _ranges(
    consumer: Consumer, topic: str, flt: LetterFilter, timeout_s: float
) -> dict[int, tuple[int, int]]:
    """Per partition, the ``[start, end)`` offsets the filter can match, from the watermarks."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise SelectionError(f"topic {topic} does not exist")
    partitions = sorted(meta.partitions)
    if flt.partition is not None and flt.partition not in meta.partitions:
        raise SelectionError(
            f"partition {flt.partition} does not exist in {topic} "
            f"(partitions 0-{len(partitions) - 1})"
        )
    if flt.partition is not None:
        partitions = [flt.partition]
    ranges: dict[int, tuple[int, int]] = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
        start, end = low, high
        if flt.offsets is not None:
            first, last = flt.offsets
            if (first is not None and first >= high) or (last is not None and last < low):
                raise SelectionError(
                    f"offset range {_range_text(flt.offsets)} is outside partition {p} of "
                    f"{topic}, which holds offsets {low}-{high - 1}"
                    if high > low
                    else f"offset range {_range_text(flt.offsets)}: partition {p} of {topic} "
                    "is empty"
                )
            start = max(start, first or 0)
            end = min(end, high if last is None else last + 1)
        ranges[p] = (start, end)
    if flt.since is not None:
        ms = int(flt.since.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in ranges], timeout=timeout_s
        )
        for tp in found:
            start, end = ranges[tp.partition]
            # -1: no record at or after that time in this partition
            at = end if tp.offset < 0 else tp.offset
            ranges[tp.partition] = (max(start, at), end)
    return {p: r for p, r in ranges.items() if r[1] > r[0]}


def _range_text(offsets: tuple[int | None, int | None]) -> str:
    low, high = offsets
    return f"{'' if low is None else low}-{'' if high is None else high}"


def scan_dead_letters(
    consumer: Consumer,
    topic: str,
    flt: LetterFilter,
    *,
    timeout_s: float,
    progress: Progress | None = None,
    progress_interval_s: float = 2.0,
) -> Generator[DeadLetter, None, None]:
    """The letters of ``topic`` that ``flt`` selects, up to the high watermarks of the start.

    ``consumer`` is a group-less ``read_committed`` consumer this function assigns. Raises
    ``SelectionError`` for a missing topic or partition and an offset range outside the
    partition, and ``TopicError`` when the selection is not read within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    ranges = _ranges(consumer, topic, flt, timeout_s)
    total = sum(end - start for start, end in ranges.values())
    if not ranges:
        if progress:
            progress(0, 0)
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in ranges.items()])
    pending = set(ranges)
    scanned = 0
    last_report = time.monotonic()
    try:
        while pending:
            if time.monotonic() > deadline:
                raise TopicError(
                    f"{topic} not read within {timeout_s:.0f}s ({scanned} of {total} records "
                    f"scanned, partitions {sorted(pending)} pending); raise --timeout"
                )
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise TopicError(f"reading {topic}: {err.str()}")
                p, offset = msg.partition(), msg.offset()
                if p not in pending or offset is None or offset >= ranges[p][1]:
                    continue
                scanned += 1
                letter = DeadLetter.from_message(msg)
                if flt.matches(letter):
                    yield letter
            done = [
                tp.partition
                for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)])
                if tp.offset >= ranges[tp.partition][1]
            ]
            if done:
                pending.difference_update(done)
                consumer.incremental_unassign([TopicPartition(topic, p) for p in done])
            if progress and time.monotonic() - last_report >= progress_interval_s:
                progress(scanned, total)
                last_report = time.monotonic()
    finally:
        consumer.unassign()
    if progress:
        progress(scanned, total)


def find_letter(
    consumer: Consumer, topic: str, partition: int, offset: int, *, timeout_s: float
) -> DeadLetter:
    """The letter at ``partition``/``offset`` of ``topic``; ``SelectionError`` when none is."""
    flt = LetterFilter(partition=partition, offsets=(offset, offset))
    with closing(scan_dead_letters(consumer, topic, flt, timeout_s=timeout_s)) as letters:
        for letter in letters:
            return letter
    raise SelectionError(
        f"no dead letter at {topic}/{partition}/{offset} (a transaction marker or compacted)"
    )


# -- re-driving --------------------------------------------------------------------------------


def read_ledger(
    consumer: Consumer, ledger_topic: str, dlq_topic: str, *, timeout_s: float
) -> set[str]:
    """Coordinates of the letters of ``dlq_topic`` that were re-driven (missing ledger: none)."""
    prefix = (dlq_topic + "/").encode()
    done: set[str] = set()
    for msg in read_to_end(consumer, ledger_topic, timeout_s=timeout_s, missing_ok=True):
        key = msg.key()
        if isinstance(key, bytes) and key.startswith(prefix):
            if msg.value() is None:
                done.discard(key.decode())
            else:
                done.add(key.decode())
    return done


def _redrive_batch(
    producer: TransactionalProducer,
    batch: Sequence[DeadLetter],
    targets: dict[str, Target],
    done: set[str],
    ledger_topic: str,
    at: datetime,
) -> None:
    """One transaction: the batch's records and their ledger entries, committed together."""
    producer.begin()
    stamp = at.isoformat(timespec="milliseconds")
    for letter in batch:
        target = targets[letter.coordinates]
        producer.produce(
            target.topic,
            key=letter.key,
            value=letter.value,
            headers=letter.redrive_headers(),
            partition=target.partition,
        )
        entry = {
            "dlq_topic": letter.topic,
            "partition": letter.partition,
            "offset": letter.offset,
            "target_topic": target.topic,
            "target_partition": target.partition,
            "redriven_at": stamp,
            "forced": letter.coordinates in done,
        }
        producer.produce(
            ledger_topic, key=letter.coordinates.encode(), value=json.dumps(entry).encode()
        )
    producer.commit()


class TransactionalProducer(Protocol):
    """What a re-drive needs of a producer; ``libs.kafka.ProducerClient`` is the real one."""

    def init_transactions(self) -> None: ...

    def begin(self) -> None: ...

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, Any]] | None = None,
        on_acked: Any = None,
        partition: int | None = None,
    ) -> None: ...

    def commit(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """Where one letter goes back to."""

    topic: str
    partition: int


def plan_targets(
    letters: Iterable[DeadLetter], topic_partitions: Callable[[str], int | None]
) -> dict[str, Target]:
    """The target of every letter, by coordinates; ``NotRedrivableError`` for any that has none.

    ``topic_partitions`` gives a topic's partition count, ``None`` when it does not exist.
    """
    targets: dict[str, Target] = {}
    problems: dict[str, list[str]] = {}
    counts: dict[str, int | None] = {}
    for letter in letters:
        source, partition = letter.source_topic, letter.source_partition
        if not source or partition is None:
            problems.setdefault("no dlq.source.topic/dlq.source.partition header", []).append(
                letter.coordinates
            )
            continue
        if partition < 0:
            problems.setdefault(
                f"warehouse rows of table {source!r} dead-lettered by the producer "
                "(never Kafka records: fix the rows in the warehouse instead)",
                [],
            ).append(letter.coordinates)
            continue
        if source not in counts:
            counts[source] = topic_partitions(source)
        count = counts[source]
        if count is None:
            problems.setdefault(f"source topic {source!r} does not exist", []).append(
                letter.coordinates
            )
            continue
        if partition >= count:
            problems.setdefault(
                f"source partition {partition} no longer exists in {source!r} ({count} partitions)",
                [],
            ).append(letter.coordinates)
            continue
        targets[letter.coordinates] = Target(source, partition)
    if problems:
        lines = [f"{why}: {_some(where)}" for why, where in problems.items()]
        raise NotRedrivableError(
            "cannot re-drive "
            + "; ".join(lines)
            + ". Narrow the selection (--error-class, --partition/--offsets, --since/--until)"
        )
    return targets


def _some(items: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} letter(s): " + ", ".join(items[:shown]) + more


@dataclass
class RedriveReport:
    """What a re-drive did (or, dry, would do)."""

    dlq_topic: str
    selected: int = 0
    redriven: int = 0
    already_redriven: list[str] = field(default_factory=list)
    skipped: int = 0
    transactions: int = 0
    by_target: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    #: planned letters no longer found when sending (deleted by retention meanwhile)
    vanished: int = 0
    #: in a dry run, the coordinates of each letter that would go and where it would go
    planned: list[tuple[str, Target]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dlq_topic": self.dlq_topic,
            "dry_run": self.dry_run,
            "selected": self.selected,
            "redriven": self.redriven,
            "already_redriven": len(self.already_redriven),
            "skipped_already_redriven": self.skipped,
            "transactions": self.transactions,
            "vanished": self.vanished,
            "by_target": self.by_target,
        }


def redrive(
    select: Callable[[], Iterable[DeadLetter]],
    *,
    dlq_topic: str,
    producer: TransactionalProducer | None,
    read_redriven: Callable[[], set[str]],
    topic_partitions: Callable[[str], int | None],
    ledger_topic: str,
    dry_run: bool = False,
    force: bool = False,
    skip_redriven: bool = False,
    batch_size: int = 500,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    progress_interval_s: float = 2.0,
) -> RedriveReport:
    """Send the selected letters back to their source topics, each batch in one transaction
    with its ledger entries; see the module docstring for the refusal rules.

    ``select`` reads the selection afresh at each call. It is called twice: the first pass
    keeps only coordinates and targets, to refuse before anything is produced; the second
    streams the letters into batches. Memory stays bounded by a batch, not by the dead-letter
    topic (a mass failure can dead-letter millions of records). Letters that appear between
    the passes are left for the next run; letters that vanish (retention) are counted.

    ``producer`` is a transactional producer (``ProducerClient``) whose ``transactional.id``
    is unique to ``dlq_topic`` (unused, and may be ``None``, in a dry run). ``read_redriven``
    reads the ledger; it is called after ``init_transactions`` so that earlier re-drives are
    settled. Raises ``NotRedrivableError`` and ``AlreadyRedrivenError`` before anything is
    produced.
    """
    if force and skip_redriven:
        raise SelectionError("--force and --skip-redriven contradict each other; pick one")
    if batch_size < 1:
        raise SelectionError(f"bad batch size {batch_size}: must be 1 or more")
    targets = plan_targets(select(), topic_partitions)  # dict order: the selection's order
    report = RedriveReport(dlq_topic=dlq_topic, selected=len(targets), dry_run=dry_run)
    if not targets:
        return report
    if not dry_run:
        if producer is None:
            raise ValueError("a producer is needed unless dry_run")
        producer.init_transactions()
    done = read_redriven()
    report.already_redriven = [c for c in targets if c in done]
    if report.already_redriven and not force:
        if not skip_redriven:
            raise AlreadyRedrivenError(
                f"{_some(report.already_redriven)} of {dlq_topic} were re-driven before "
                "(see the dlq.redriven.from header on the source topic); --skip-redriven "
                "re-drives only the others, --force re-drives them again"
            )
        targets = {c: t for c, t in targets.items() if c not in done}
        report.skipped = len(report.already_redriven)
    for target in targets.values():
        report.by_target[target.topic] = report.by_target.get(target.topic, 0) + 1
    if dry_run:
        report.redriven = len(targets)
        report.planned = list(targets.items())
        return report
    assert producer is not None
    _send(
        select, targets, producer, done, ledger_topic, batch_size, now, report, progress_interval_s
    )
    return report


def _send(
    select: Callable[[], Iterable[DeadLetter]],
    targets: dict[str, Target],
    producer: TransactionalProducer,
    done: set[str],
    ledger_topic: str,
    batch_size: int,
    now: Callable[[], datetime],
    report: RedriveReport,
    progress_interval_s: float,
) -> None:
    """The second pass: stream the planned letters into transactions of ``batch_size``."""
    seen: set[str] = set()
    last_report = time.monotonic()

    def flush(batch: list[DeadLetter]) -> None:
        nonlocal last_report
        _redrive_batch(producer, batch, targets, done, ledger_topic, now())
        report.transactions += 1
        report.redriven += len(batch)
        if time.monotonic() - last_report >= progress_interval_s:
            last_report = time.monotonic()
            log.info(
                "re-driving dead letters",
                extra={"dlq_topic": report.dlq_topic, "done": report.redriven, "of": len(targets)},
            )

    try:
        batch: list[DeadLetter] = []
        for letter in select():
            coordinates = letter.coordinates
            if coordinates not in targets or coordinates in seen:
                continue
            seen.add(coordinates)
            batch.append(letter)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    except KafkaLibError as exc:
        # Committed batches stay re-driven (and in the ledger); the failed one is aborted.
        raise RedriveError(
            f"re-drive of {report.dlq_topic} stopped after {report.redriven} of {len(targets)} "
            f"letters ({report.transactions} transactions committed): {exc}; rerun with "
            "--skip-redriven to send the rest"
        ) from exc
    report.vanished = len(targets) - len(seen)
    if report.vanished:
        log.warning(
            "dead letters vanished between planning and sending (retention?)",
            extra={"dlq_topic": report.dlq_topic, "vanished": report.vanished},
        )
