"""Dead-letter selection and re-drive rules, on in-memory letters and a recording producer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.kafka import TransactionAbortedError, dlq_headers
from libs.kafka.redrive import (
    HEADER_REDRIVEN_FROM,
    AlreadyRedrivenError,
    DeadLetter,
    LetterFilter,
    NotRedrivableError,
    RedriveError,
    SelectionError,
    dlq_topic_of,
    parse_offsets,
    parse_time,
    plan_targets,
    redrive,
)

NOW = datetime(2026, 12, 2, 17, 0, tzinfo=UTC)
LEDGER = "dlq-redrives"


def letter(
    offset: int,
    *,
    partition: int = 0,
    source: str = "events",
    source_partition: int = 1,
    error: BaseException | None = None,
    at: datetime = NOW,
    extra_headers: Sequence[tuple[str, bytes | None]] = (),
) -> DeadLetter:
    headers = list(extra_headers) + dlq_headers(
        service="enricher",
        error=error or ValueError("bad"),
        source_topic=source,
        partition=source_partition,
        offset=100 + offset,
    )
    return DeadLetter(
        topic="events.dlq",
        partition=partition,
        offset=offset,
        timestamp_ms=int(at.timestamp() * 1000),
        key=f"k{offset}".encode(),
        value=f"v{offset}".encode(),
        headers=tuple(headers),
    )


class RecordingProducer:
    """A transactional producer twin: what was produced, per committed transaction."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.calls = log if log is not None else []
        self.open: list[dict[str, Any]] = []
        self.committed: list[list[dict[str, Any]]] = []

    def init_transactions(self) -> None:
        self.calls.append("init_transactions")

    def begin(self) -> None:
        self.calls.append("begin")
        self.open = []

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, Any]] | None = None,
        on_delivery: Any = None,
        partition: int | None = None,
    ) -> None:
        self.open.append(
            {"topic": topic, "key": key, "value": value, "headers": headers, "partition": partition}
        )

    def commit(self) -> None:
        self.calls.append("commit")
        self.committed.append(self.open)

    def records(self, topic: str) -> list[dict[str, Any]]:
        return [r for batch in self.committed for r in batch if r["topic"] == topic]


def partitions(counts: dict[str, int]) -> Any:
    return counts.get


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01T11:00:00+01:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-01T10:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),  # no offset: UTC
        ("90s", NOW - timedelta(seconds=90)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "12/01/2026", "-5m", ""])
def test_parse_time_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(SelectionError, match=r"bad time .*ISO 8601.*30m"):
        parse_time(text, now=NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42", (42, 42)), ("100-200", (100, 200)), ("100-", (100, None)), ("-200", (None, 200))],
)
def test_parse_offsets(text: str, expected: tuple[int | None, int | None]) -> None:
    assert parse_offsets(text) == expected


@pytest.mark.parametrize(
    ("text", "why"), [("a-b", "use FROM-TO"), ("-", "use FROM-TO"), ("200-100", "200 is after 100")]
)
def test_parse_offsets_rejects(text: str, why: str) -> None:
    with pytest.raises(SelectionError, match=why):
        parse_offsets(text)


def test_topic_names_accept_source_or_dlq() -> None:
    assert dlq_topic_of("slack-messages") == "slack-messages.dlq"
    assert dlq_topic_of("slack-messages.dlq") == "slack-messages.dlq"


# -- selection -------------------------------------------------------------------------------


class DecodeError(Exception):
    pass


def test_filter_by_error_class_full_or_last_part() -> None:
    x = letter(1, error=DecodeError("x"))
    assert LetterFilter(error_class="DecodeError").matches(x)
    assert LetterFilter(error_class=f"{__name__}.DecodeError").matches(x)
    assert not LetterFilter(error_class="Error").matches(x)
    assert not LetterFilter(error_class="ValueError").matches(x)


def test_filter_by_time_window_is_inclusive() -> None:
    flt = LetterFilter(since=NOW - timedelta(hours=1), until=NOW)
    assert flt.matches(letter(1, at=NOW))
    assert flt.matches(letter(2, at=NOW - timedelta(hours=1)))
    assert not flt.matches(letter(3, at=NOW + timedelta(seconds=1)))
    assert not flt.matches(letter(4, at=NOW - timedelta(hours=2)))


def test_filter_by_partition_and_offset_range() -> None:
    flt = LetterFilter(partition=0, offsets=(5, 7))
    assert [o for o in range(10) if flt.matches(letter(o))] == [5, 6, 7]
    assert not flt.matches(letter(6, partition=1))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"offsets": (1, 2)}, "needs a partition"),
        ({"partition": -1}, "bad partition -1"),
        ({"since": NOW, "until": NOW - timedelta(seconds=1)}, "is after --until"),
    ],
)
def test_filter_rejects_contradictions(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(SelectionError, match=why):
        LetterFilter(**kwargs)


# -- re-drive --------------------------------------------------------------------------------


def test_redriven_record_keeps_key_value_and_original_headers_on_its_partition() -> None:
    x = letter(3, partition=2, source_partition=4, extra_headers=[("trace", b"t-1")])
    producer = RecordingProducer()
    report = redrive(
        lambda: [x],
        dlq_topic="events.dlq",
        producer=producer,
        read_redriven=set,
        topic_partitions=partitions({"events": 6}),
        ledger_topic=LEDGER,
    )
    assert report.redriven == 1 and report.transactions == 1
    (out,) = producer.records("events")
    assert (out["key"], out["value"], out["partition"]) == (b"k3", b"v3", 4)
    # the failure's dlq.* headers describe the dead letter, not the record: they stay behind
    assert out["headers"] == [("trace", b"t-1"), (HEADER_REDRIVEN_FROM, b"events.dlq/2/3")]
    (entry,) = producer.records(LEDGER)
    assert entry["key"] == b"events.dlq/2/3"
    assert json.loads(entry["value"]) | {"redriven_at": None} == {
        "dlq_topic": "events.dlq",
        "partition": 2,
        "offset": 3,
        "target_topic": "events",
        "target_partition": 4,
        "redriven_at": None,
        "forced": False,
    }


def test_an_earlier_redrive_header_is_replaced_not_stacked() -> None:
    x = letter(9, extra_headers=[(HEADER_REDRIVEN_FROM, b"events.dlq/0/1")])
    assert x.redriven_from == "events.dlq/0/1"
    assert x.redrive_headers() == [(HEADER_REDRIVEN_FROM, b"events.dlq/0/9")]


def test_each_batch_is_one_transaction_with_its_ledger_entries() -> None:
    producer = RecordingProducer()
    report = redrive(
        lambda: [letter(o) for o in range(5)],
        dlq_topic="events.dlq",
        producer=producer,
        read_redriven=set,
        topic_partitions=partitions({"events": 3}),
        ledger_topic=LEDGER,
        batch_size=2,
    )
    assert report.transactions == 3 and report.redriven == 5
    assert [len(batch) for batch in producer.committed] == [4, 4, 2]  # records + ledger entries
    for batch in producer.committed:
        sent = [r["headers"][-1][1] for r in batch if r["topic"] == "events"]
        recorded = [r["key"] for r in batch if r["topic"] == LEDGER]
        assert sent == recorded


def test_ledger_is_read_after_fencing_earlier_redrives() -> None:
    calls: list[str] = []
    producer = RecordingProducer(calls)

    def read() -> set[str]:
        calls.append("read_ledger")
        return set()

    redrive(
        lambda: [letter(1)],
        dlq_topic="events.dlq",
        producer=producer,
        read_redriven=read,
        topic_partitions=partitions({"events": 3}),
        ledger_topic=LEDGER,
    )
    assert calls[:2] == ["init_transactions", "read_ledger"]


def test_second_redrive_is_refused_before_anything_is_produced() -> None:
    producer = RecordingProducer()
    with pytest.raises(AlreadyRedrivenError, match=r"1 letter\(s\): events.dlq/0/1 .*--force"):
        redrive(
            lambda: [letter(1), letter(2)],
            dlq_topic="events.dlq",
            producer=producer,
            read_redriven=lambda: {"events.dlq/0/1"},
            topic_partitions=partitions({"events": 3}),
            ledger_topic=LEDGER,
        )
    assert producer.committed == []


def test_skip_redriven_sends_only_the_others_and_force_sends_all() -> None:
    done = {"events.dlq/0/1"}
    skipping = RecordingProducer()
    report = redrive(
        lambda: [letter(1), letter(2)],
        dlq_topic="events.dlq",
        producer=skipping,
        read_redriven=lambda: done,
        topic_partitions=partitions({"events": 3}),
        ledger_topic=LEDGER,
        skip_redriven=True,
    )
    assert (report.redriven, report.skipped) == (1, 1)
    assert [r["key"] for r in skipping.records("events")] == [b"k2"]

    forcing = RecordingProducer()
    report = redrive(
        lambda: [letter(1), letter(2)],
        dlq_topic="events.dlq",
        producer=forcing,
        read_redriven=lambda: done,
        topic_partitions=partitions({"events": 3}),
        ledger_topic=LEDGER,
        force=True,
    )
    assert report.redriven == 2
    assert [json.loads(r["value"])["forced"] for r in forcing.records(LEDGER)] == [True, False]


def test_dry_run_produces_nothing_and_reports_the_plan() -> None:
    report = redrive(
        lambda: [letter(1), letter(2, source="other", source_partition=0)],
        dlq_topic="events.dlq",
        producer=None,
        read_redriven=set,
        topic_partitions=partitions({"events": 3, "other": 1}),
        ledger_topic=LEDGER,
        dry_run=True,
    )
    assert report.dry_run and report.redriven == 2
    assert report.by_target == {"events": 1, "other": 1}
    assert [(c, t.topic, t.partition) for c, t in report.planned] == [
        ("events.dlq/0/1", "events", 1),
        ("events.dlq/0/2", "other", 0),
    ]


def test_warehouse_rows_are_refused_naming_the_table() -> None:
    row = letter(4, source="onboarding", source_partition=-1)
    with pytest.raises(NotRedrivableError, match=r"warehouse rows of table 'onboarding'.*0/4"):
        plan_targets([letter(1), row], partitions({"events": 3}))


@pytest.mark.parametrize(
    ("counts", "why"),
    [({}, "source topic 'events' does not exist"), ({"events": 1}, "partition 1 no longer")],
)
def test_letters_without_a_target_are_refused(counts: dict[str, int], why: str) -> None:
    with pytest.raises(NotRedrivableError, match=why):
        plan_targets([letter(1)], partitions(counts))


def test_letter_without_source_headers_is_refused() -> None:
    bare = DeadLetter("events.dlq", 0, 7, None, b"k", b"v", ())
    with pytest.raises(NotRedrivableError, match=r"no dlq.source.topic.*events.dlq/0/7"):
        plan_targets([bare], partitions({"events": 3}))


def test_force_and_skip_contradict() -> None:
    with pytest.raises(SelectionError, match="pick one"):
        redrive(
            lambda: [letter(1)],
            dlq_topic="events.dlq",
            producer=None,
            read_redriven=set,
            topic_partitions=partitions({"events": 3}),
            ledger_topic=LEDGER,
            dry_run=True,
            force=True,
            skip_redriven=True,
        )


def test_a_failed_batch_reports_what_was_committed_and_how_to_resume() -> None:
    class FailingSecondCommit(RecordingProducer):
        def commit(self) -> None:
            if len(self.committed) == 1:
                raise TransactionAbortedError("commit_transaction failed, aborted: broker gone")
            super().commit()

    producer = FailingSecondCommit()
    with pytest.raises(
        RedriveError, match=r"after 2 of 5 letters \(1 transactions.*--skip-redriven"
    ):
        redrive(
            lambda: [letter(o) for o in range(5)],
            dlq_topic="events.dlq",
            producer=producer,
            read_redriven=set,
            topic_partitions=partitions({"events": 3}),
            ledger_topic=LEDGER,
            batch_size=2,
        )
    assert len(producer.records("events")) == 2


def test_letters_that_arrive_between_the_passes_wait_and_vanished_ones_are_counted() -> None:
    passes = iter([[letter(1), letter(2), letter(3)], [letter(2), letter(3), letter(4)]])
    producer = RecordingProducer()
    report = redrive(
        lambda: next(passes),
        dlq_topic="events.dlq",
        producer=producer,
        read_redriven=set,
        topic_partitions=partitions({"events": 3}),
        ledger_topic=LEDGER,
    )
    # 1 was deleted by retention after planning; 4 was not checked against the ledger
    assert [r["key"] for r in producer.records("events")] == [b"k2", b"k3"]
    assert (report.selected, report.redriven, report.vanished) == (3, 2, 1)


def test_nothing_selected_touches_no_producer() -> None:
    calls: list[str] = []
    report = redrive(
        list,
        dlq_topic="events.dlq",
        producer=RecordingProducer(calls),
        read_redriven=set,
        topic_partitions=partitions({}),
        ledger_topic=LEDGER,
    )
    assert (report.selected, report.redriven, calls) == (0, 0, [])
