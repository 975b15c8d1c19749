"""The dead-letter commands: arguments, clients from the shared settings, output.

The mechanism (selection, scanning, re-drive with its ledger) is ``libs.kafka.redrive``; this
module only builds clients from ``CommonSettings``/``TopicSettings`` and prints results.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer
from pydantic_settings import BaseSettings

from libs.kafka import KafkaSettings, ProducerClient, ensure_topics
from libs.kafka.redrive import (
    DeadLetter,
    LetterFilter,
    SelectionError,
    dlq_topic_of,
    find_letter,
    parse_offsets,
    parse_time,
    read_ledger,
    redrive,
    scan_dead_letters,
)
from libs.serde import SerdeError, decode_with_writer_schema
from services.common.cli import env_help
from services.common.settings import CommonSettings, TopicSettings
from services.common.tool import EXIT_OK, run_tool, write

log = logging.getLogger(__name__)

PROG = "python -m services.dlq"
CLIENT_ID = "dlq-tool"

_EXAMPLES = f"""\
examples:
  {PROG} list slack-messages --since 2h
  {PROG} list data-notifications-pipeline.dlq --error-class DeserializationError --json
  {PROG} show slack-messages 2:1041
  {PROG} redrive slack-messages --error-class SlackApiError --since 2026-12-02T08:00Z --dry-run
  {PROG} redrive slack-messages --partition 2 --offsets 1000-1100
  {PROG} redrive slack-messages --skip-redriven     # resume after a crash or a partial run

TOPIC is the dead-letter topic (slack-messages.dlq) or its source topic (slack-messages).
Re-driven records go back to dlq.source.topic, on dlq.source.partition, with the letter's key,
value and original headers plus dlq.redriven.from=<dlq topic>/<partition>/<offset>. Each
batch is one Kafka transaction that also records the letters in the ledger topic
(TOPIC_DLQ_REDRIVES): re-driving a letter twice is refused unless --force.
The producer's dead letters (warehouse rows) have no Kafka topic to go back to: refused.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List, show and re-drive dead letters of <topic>.dlq.",
        epilog=_EXAMPLES
        + "\nsettings (environment variables):\n"
        + env_help(CommonSettings, TopicSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("topic", metavar="TOPIC", help="dead-letter topic or its source topic")
        p.add_argument(
            "--timeout",
            type=float,
            default=120.0,
            metavar="S",
            help="give up when the scan takes longer (default 120)",
        )

    def filters(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("selection (all given must hold)")
        g.add_argument("--since", metavar="TIME", help="dead-lettered at or after (ISO 8601 or 2h)")
        g.add_argument("--until", metavar="TIME", help="dead-lettered at or before")
        g.add_argument("--error-class", metavar="NAME", help="dlq.error.class, full or last part")
        g.add_argument("--partition", type=int, metavar="N", help="partition of the dlq topic")
        g.add_argument(
            "--offsets",
            metavar="RANGE",
            help="inclusive: 100-200, 100-, -200, 42 (needs --partition)",
        )

    p_list = sub.add_parser(
        "list",
        help="one line per dead letter, then counts by error class",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXAMPLES,
    )
    common(p_list)
    filters(p_list)
    p_list.add_argument("--limit", type=int, metavar="N", help="stop after N letters")
    p_list.add_argument("--json", action="store_true", help="one JSON object per line")

    p_show = sub.add_parser(
        "show", help="one dead letter in full: headers, key, value (Avro decoded)"
    )
    common(p_show)
    p_show.add_argument("at", metavar="PARTITION:OFFSET", help="where the letter is in TOPIC")
    p_show.add_argument("--json", action="store_true", help="as one JSON object")

    p_redrive = sub.add_parser(
        "redrive",
        help="send selected letters back to their source topic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXAMPLES,
    )
    common(p_redrive)
    filters(p_redrive)
    p_redrive.add_argument(
        "--dry-run", action="store_true", help="show what would be re-driven; produce nothing"
    )
    once = p_redrive.add_mutually_exclusive_group()
    once.add_argument(
        "--skip-redriven", action="store_true", help="leave out letters re-driven before"
    )
    once.add_argument(
        "--force", action="store_true", help="re-drive letters even if re-driven before"
    )
    p_redrive.add_argument(
        "--batch-size", type=int, default=500, metavar="N", help="letters per transaction"
    )
    p_redrive.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.dlq``."""
    return run_tool(
        prog=PROG,
        parser=_parser(),
        settings_models=[CommonSettings, TopicSettings],
        run=_run,
        argv=argv,
        usage_errors=(SelectionError,),
    )


def _run(args: argparse.Namespace, loaded: list[BaseSettings]) -> int:
    common, topics = loaded
    assert isinstance(common, CommonSettings) and isinstance(topics, TopicSettings)
    kafka = common.kafka(CLIENT_ID)
    dlq = dlq_topic_of(args.topic)
    # librdkafka wants a group.id even for assign()-only use; this consumer never joins it
    conf = kafka.consumer_config(None)
    conf["group.id"] = f"{CLIENT_ID}-nogroup"
    consumer = Consumer(conf)
    try:
        if args.command == "list":
            return _list(args, consumer, dlq, topics)
        if args.command == "show":
            return _show(args, consumer, dlq, common)
        return _redrive(args, consumer, dlq, kafka, topics)
    finally:
        consumer.close()


def _filter(args: argparse.Namespace) -> LetterFilter:
    now = datetime.now(UTC)
    return LetterFilter(
        since=parse_time(args.since, now=now) if args.since else None,
        until=parse_time(args.until, now=now) if args.until else None,
        error_class=args.error_class,
        partition=args.partition,
        offsets=parse_offsets(args.offsets) if args.offsets else None,
    )


def _progress(topic: str) -> Callable[[int, int], None]:
    def report(scanned: int, total: int) -> None:
        log.info("scanning dead letters", extra={"topic": topic, "scanned": scanned, "of": total})

    return report


def _list(args: argparse.Namespace, consumer: Consumer, dlq: str, topics: TopicSettings) -> int:
    flt = _filter(args)
    if args.limit is not None and args.limit < 1:
        raise SelectionError(f"bad --limit {args.limit}: must be 1 or more")
    redriven = read_ledger(consumer, topics.dlq_redrives, dlq, timeout_s=args.timeout)
    by_class: Counter[str] = Counter()
    scan = scan_dead_letters(consumer, dlq, flt, timeout_s=args.timeout, progress=_progress(dlq))
    # closing(): a --limit break must end the scan (unassign) while the consumer is open
    with closing(scan) as letters:
        for letter in letters:
            by_class[letter.error_class] += 1
            _print_letter(letter, letter.coordinates in redriven, as_json=args.json)
            if args.limit is not None and sum(by_class.values()) >= args.limit:
                break
    if not args.json:
        total = sum(by_class.values())
        counts = ", ".join(f"{cls or '?'}: {n}" for cls, n in by_class.most_common())
        write(f"{total} dead letter(s) in {dlq}" + (f" ({counts})" if counts else ""))
    return EXIT_OK


def _print_letter(letter: DeadLetter, redriven: bool, *, as_json: bool) -> None:
    row = letter.summary() | {"redriven": redriven}
    if as_json:
        write(json.dumps(row, ensure_ascii=False))
        return
    write(
        f"{letter.partition}:{letter.offset}  {row['timestamp']}  "
        f"{letter.error_class.rsplit('.', 1)[-1]}  from {row['source']}"
        f"  by {letter.service}  key={row['key']}"
        + ("  [re-driven]" if redriven else "")
        + f"\n    {_one_line(letter.error_message)}"
    )


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _parse_at(text: str) -> tuple[int, int]:
    part, sep, off = text.partition(":")
    if not sep or not part.isdigit() or not off.isdigit():
        raise SelectionError(f"bad position {text!r}: use PARTITION:OFFSET, e.g. 2:1041")
    return int(part), int(off)


def _render_value(letter: DeadLetter, common: CommonSettings) -> dict[str, Any]:
    data = letter.value
    if data is None:
        return {"value": None}
    if len(data) >= 5 and data[0] == 0:
        registry = common.registry()
        try:
            schema_id, decoded = decode_with_writer_schema(registry, data)
            return {"value_format": f"avro (schema id {schema_id})", "value": decoded}
        except SerdeError as exc:
            return {"value_format": "bytes", "value_error": str(exc), "value_hex": data.hex()}
        finally:
            registry.close()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"value_format": "bytes", "value_hex": data.hex()}
    try:
        return {"value_format": "json", "value": json.loads(text)}
    except ValueError:
        return {"value_format": "text", "value": text}


def _show(args: argparse.Namespace, consumer: Consumer, dlq: str, common: CommonSettings) -> int:
    partition, offset = _parse_at(args.at)
    letter = find_letter(consumer, dlq, partition, offset, timeout_s=args.timeout)
    out: dict[str, Any] = {
        "topic": letter.topic,
        **letter.summary(),
        "headers": {
            k: (None if v is None else v.decode("utf-8", "replace")) for k, v in letter.headers
        },
        **_render_value(letter, common),
    }
    if args.json:
        write(json.dumps(out, ensure_ascii=False, default=str))
        return EXIT_OK
    for name, value in out.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, indent=2, ensure_ascii=False, default=str)
            value = value.replace("\n", "\n    ")
        write(f"{name}: {value}")
    return EXIT_OK


def _topic_partitions(consumer: Consumer, timeout_s: float) -> Callable[[str], int | None]:
    def count(topic: str) -> int | None:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        return len(meta.partitions)

    return count


def _redrive(
    args: argparse.Namespace,
    consumer: Consumer,
    dlq: str,
    kafka: KafkaSettings,
    topics: TopicSettings,
) -> int:
    if args.batch_size < 1:
        raise SelectionError(f"bad --batch-size {args.batch_size}: must be 1 or more")
    flt = _filter(args)

    def select() -> Iterator[DeadLetter]:
        return scan_dead_letters(
            consumer, dlq, flt, timeout_s=args.timeout, progress=_progress(dlq)
        )

    producer: ProducerClient | None = None
    if not args.dry_run:
        ensure_topics(kafka.client_config(), [topics.spec(topics.dlq_redrives, compacted=True)])
        producer = ProducerClient(
            # One id per dead-letter topic: a second re-drive of the same topic fences the first.
            Producer(kafka.producer_config(transactional_id=f"{CLIENT_ID}.{dlq}")),
            timeout_s=30.0,
            transactional=True,
        )
    try:
        report = redrive(
            select,
            dlq_topic=dlq,
            producer=producer,
            read_redriven=lambda: read_ledger(
                consumer, topics.dlq_redrives, dlq, timeout_s=args.timeout
            ),
            topic_partitions=_topic_partitions(consumer, args.timeout),
            ledger_topic=topics.dlq_redrives,
            dry_run=args.dry_run,
            force=args.force,
            skip_redriven=args.skip_redriven,
            batch_size=args.batch_size,
        )
    finally:
        if producer is not None:
            problems = producer.close()
            if problems:
                log.warning("producer not closed cleanly", extra={"problems": problems})
    if args.json:
        write(json.dumps(report.as_dict()))
        return EXIT_OK
    if not report.selected:
        write(f"no dead letters of {dlq} match; nothing re-driven")
        return EXIT_OK
    for coordinates, target in report.planned:
        write(f"{coordinates} -> {target.topic}/{target.partition}")
    verb = "would re-drive" if report.dry_run else "re-drove"
    targets = ", ".join(f"{t}: {n}" for t, n in sorted(report.by_target.items()))
    write(
        f"{verb} {report.redriven} of {report.selected} selected dead letter(s) of {dlq}"
        + (f" ({targets})" if targets else "")
        + (f"; {report.skipped} re-driven before, skipped" if report.skipped else "")
        + (
            f"; {len(report.already_redriven)} re-driven before, forced"
            if args.force and report.already_redriven
            else ""
        )
        + ("" if report.dry_run else f"; {report.transactions} transaction(s)")
        + (f"; {report.vanished} vanished meanwhile (retention)" if report.vanished else "")
    )
    return EXIT_OK
