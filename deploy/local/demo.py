"""``make demo``: the whole pipeline on embedded defaults, alerts shown as they are delivered.

What it does, in order (each step prints one progress line):

1. starts the local stack (Kafka KRaft + Apicurio Registry) with ``deploy/local/stack.sh``
   in its own state folder, on free loopback ports;
2. creates the topics and seeds the lookup tables: a few customer orgs, their account-team
   owners and those owners' Slack users (one org has no owner, one owner no Slack user, so
   the fallback channel shows up too);
3. writes a DuckDB warehouse with onboarding rows;
4. starts the producer, the enricher and the notifier as separate processes (dry-run Slack
   unless ``NOTIFIER_SLACK_BOT_TOKEN`` is set), logs in the state folder;
5. feeds a short, realistic stream of connector status changes, and a second wave of
   onboarding rows while running;
6. shows every alert as its receipt arrives — who gets it, what it says, the receipt — with
   a live count of events in, filtered, delivered and missed.

Ctrl-C (or ``--exit-after-alerts N`` / ``--timeout S``, SIGTERM, SIGHUP) stops everything it
started, also when its output is gone (``make demo | tee demo.log`` and Ctrl-C kills ``tee``
first): every line goes through ``emit``, which stops writing once a write fails, and the
stack and the services run in their own sessions, so only the demo's own clean-up stops them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TextIO

import duckdb
from confluent_kafka import Consumer, Producer

from libs.kafka import KafkaSettings, ensure_topics
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    ConfluentSchemaRegistry,
    ConnectorStatusChanged,
    CsdrAssignment,
    SlackDeliveryReceipt,
    SlackMessage,
    SlackUser,
)
from services.common.settings import TopicSettings
from services.notifier.core import render_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE = ROOT / "deploy" / "local" / ".state" / "demo"
STACK_SH = ROOT / "deploy" / "local" / "stack.sh"
FALLBACK_CHANNEL = "#field-alerts-triage"
SERVICES = ("producer", "enricher", "notifier")

BOLD, DIM, GREEN, YELLOW, RED, CYAN, RESET = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[33m", "\033[31m", "\033[36m", "\033[0m")
    if sys.stdout.isatty()
    else ("",) * 7
)

# -- sample data -----------------------------------------------------------------------------

ORGS = {
    "org-7f3a": "Northwind Traders",
    "org-1c9e": "Globex Corporation",
    "org-5d21": "Initech",
    "org-9b44": "Umbrella Health",
    "org-2e80": "Stark Logistics",
    "org-0aa1": "Wayne Analytics",
}
OWNERS = {  # org -> (email, name); org-0aa1 has no owner on purpose
    "org-7f3a": ("ana.silva@example.com", "Ana Silva"),
    "org-1c9e": ("bo.chen@example.com", "Bo Chen"),
    "org-5d21": ("ana.silva@example.com", "Ana Silva"),
    "org-9b44": ("Dana.Kim@Example.com", "Dana Kim"),  # mixed case: joined lower-cased
    "org-2e80": ("raj.patel@example.com", "Raj Patel"),  # no Slack user on purpose
}
SLACK_USERS = {
    "ana.silva@example.com": ("U02ANASILVA", "ana"),
    "bo.chen@example.com": ("U02BOCHEN", "bo"),
    "dana.kim@example.com": ("U02DANAKIM", "dana"),
}
# (org, connector, type, old, new, error)
CONNECTOR_STREAM = [
    (
        "org-7f3a",
        "orders-cdc",
        "PostgresCdcSource",
        "PROVISIONING",
        "FAILED",
        'FATAL: password authentication failed for user "cdc_reader" (host db-prod-1:5432)',
    ),
    ("org-1c9e", "clickstream-s3", "S3_SINK", "PROVISIONING", "RUNNING", None),
    ("org-5d21", "tps-reports", "MySqlCdcSource", "RUNNING", "PAUSED", None),
    (
        "org-1c9e",
        "s3-archive",
        "S3_SINK",
        "PROVISIONING",
        "FAILED",
        "Access Denied (Service: Amazon S3; Status Code: 403; Error Code: AccessDenied) "
        "writing to bucket globex-archive/topics/",
    ),
    (
        "org-9b44",
        "claims-mongo",
        "MongoDbAtlasSource",
        "RUNNING",
        "FAILED",
        "Connection reset by peer",
    ),
    (
        "org-2e80",
        "sf-leads",
        "SalesforceCdcSource",
        "PROVISIONING",
        "FAILED",
        "INVALID_LOGIN: Invalid username, password, security token; or user locked out.",
    ),
    ("org-9b44", "claims-mongo", "MongoDbAtlasSource", "FAILED", "RUNNING", None),
    (
        "org-0aa1",
        "bq-analytics",
        "BigQuerySink",
        "PROVISIONING",
        "FAILED",
        "Topic 'page_views' schema is incompatible with table analytics.page_views: field "
        "'user_agent' has type RECORD in the table and STRING in the topic",
    ),
    ("org-5d21", "tps-reports", "MySqlCdcSource", "PAUSED", "RUNNING", None),
    (
        "org-9b44",
        "eligibility-sftp",
        "SftpSource",
        "PROVISIONING",
        "FAILED",
        "Could not resolve host sftp.umbrella-health.example: Name or service not known",
    ),
]
ONBOARDING_FIRST = [
    ("org-5d21", "Initech", "STANDARD", "AWS"),
    ("org-9b44", "Umbrella Health", "ENTERPRISE", "AZURE"),
]
ONBOARDING_LATER = [("org-1c9e", "Globex Corporation", "ENTERPRISE", "GCP")]


_emit_lock = threading.Lock()


def emit(text: str, stream: TextIO | None = None) -> None:
    """Write a line to stdout (or ``stream``); never raise because the reader went away.

    When the pipe or terminal is gone (``tee`` killed by the same Ctrl-C, a closed terminal),
    the stream's descriptor is pointed at /dev/null, so that neither later lines nor the flush
    at interpreter exit fail, and the clean-up after it still runs.
    """
    out = sys.stdout if stream is None else stream
    with _emit_lock:
        try:
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError):  # BrokenPipeError, EIO of a hung-up tty, a closed file
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, out.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def log(msg: str) -> None:
    emit(f"{DIM}[demo {time.strftime('%H:%M:%S')}]{RESET} {msg}")


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _forward(lines: IO[str]) -> None:
    for line in lines:
        emit(line.rstrip("\n"), sys.stderr)


def stack(
    state: Path, *args: str, stop: threading.Event | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``stack.sh ARGS`` on the demo's state dir; its progress is forwarded through ``emit``.

    It runs in its own session, so a terminal's Ctrl-C does not cut a ``down`` short and a dead
    stdout never kills it with SIGPIPE; when ``stop`` is set meanwhile, it gets SIGTERM, on
    which ``stack.sh up`` stops what it had started.
    """
    env = {**os.environ, "STACK_DIR": str(state / "stack")}
    for name in ("STACK_KAFKA_PORT", "STACK_KAFKA_CONTROLLER_PORT", "STACK_REGISTRY_PORT"):
        env.setdefault(name, "0")
    proc = subprocess.Popen(
        [str(STACK_SH), *args],
        env=env,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    forwarder = threading.Thread(target=_forward, args=(proc.stderr,), daemon=True)
    forwarder.start()
    signalled = False
    while True:
        try:
            proc.wait(0.2)
            break
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set() and not signalled:
                proc.send_signal(signal.SIGTERM)
                signalled = True
    out = proc.stdout.read()
    forwarder.join(5)
    proc.stdout.close()
    proc.stderr.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # its own session: the group is the service and its children


@dataclass
class Services:
    state: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        for name in SERVICES:
            port = free_port()
            env = {**self.env, "METRICS_PORT": str(port)}
            with (self.state / "logs" / f"{name}.log").open("ab") as logfile:
                # in their own session: stopped by stop(), never by a signal meant for the demo
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=logfile,
                    cwd=ROOT,
                    start_new_session=True,
                )
            self.ports[name] = port

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.state / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to every service's process group, SIGKILL to those still there after 30 s."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def metric(self, service: str, name: str, **labels: str) -> float:
        """Sum of a Prometheus counter's samples matching ``labels``."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports[service]}/metrics", timeout=2
            ) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


# -- seeding ---------------------------------------------------------------------------------


def seed_lookups(
    bootstrap: str, registry: ConfluentSchemaRegistry, topics: TopicSettings, now: datetime
) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3})
    enc_owner = AvroSerializer(registry, CsdrAssignment)
    enc_user = AvroSerializer(registry, SlackUser)
    for org, (email, name) in OWNERS.items():
        record = CsdrAssignment(org, ORGS[org], email, now, name)
        p.produce(
            topics.data_csdr_assignment,
            key=org.encode(),
            value=enc_owner(topics.data_csdr_assignment, record),
        )
    for email, (uid, display) in SLACK_USERS.items():
        p.produce(
            topics.data_slack_users,
            key=email.encode(),
            value=enc_user(topics.data_slack_users, SlackUser(email, uid, now, display)),
        )
    p.flush(30)


def write_warehouse(
    path: Path, rows: list[tuple[str, str, str, str]], started_at: datetime, *, create: bool
) -> None:
    """Insert onboarding rows (``started_at`` as naive UTC, the table contract's TIMESTAMP)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            # the producer reads the file with short read-only connections; a writer needs
            # the file lock for a moment between them
            con = duckdb.connect(str(path))
            break
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        if create:
            con.execute(
                "CREATE TABLE onboarding (org_id VARCHAR, org_name VARCHAR, "
                "plan VARCHAR, cloud VARCHAR, started_at TIMESTAMP)"
            )
        for i, (org, name, plan, cloud) in enumerate(rows):
            ts = (started_at + timedelta(seconds=i)).astimezone(UTC).replace(tzinfo=None)
            con.execute(
                "INSERT INTO onboarding VALUES (?, ?, ?, ?, ?)", [org, name, plan, cloud, ts]
            )
    finally:
        con.close()


def feed_connectors(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    topic: str,
    stop: threading.Event,
    gap_s: float,
) -> int:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3})
    encode = AvroSerializer(registry, ConnectorStatusChanged)
    sent = 0
    for i, (org, name, kind, old, new, error) in enumerate(CONNECTOR_STREAM):
        if stop.wait(gap_s):
            break
        event = ConnectorStatusChanged(
            event_id=f"demo-{int(time.time())}-{i}",
            org_id=org,
            environment_id="env-" + org[4:],
            cluster_id="lkc-" + org[4:],
            connector_id=f"lcc-{i:04d}",
            connector_name=name,
            connector_type=kind,
            old_status=old,
            new_status=new,
            occurred_at=datetime.now(UTC),
            error_message=error,
        )
        p.produce(topic, key=org.encode(), value=encode(topic, event))
        p.flush(10)
        sent += 1
    return sent


# -- the viewer ------------------------------------------------------------------------------


def show_alert(msg: SlackMessage, receipt: SlackDeliveryReceipt, started: float) -> None:
    colour = {"DELIVERED": GREEN, "DRY_RUN": CYAN}.get(receipt.status, RED)
    who = msg.channel
    if msg.channel == FALLBACK_CHANNEL:
        who = f"{FALLBACK_CHANNEL} (fallback: owner or Slack user unknown)"
    else:
        names = {
            SLACK_USERS[e.lower()][0]: n for e, n in OWNERS.values() if e.lower() in SLACK_USERS
        }
        who = f"DM to {names.get(msg.channel, '?')} ({msg.channel})"
    # an update (the enricher's alert lifecycle) replaces an earlier message in place
    update = f" · update of {msg.update_of}" if msg.update_of else ""
    emit(f"\n{BOLD}┌─ {msg.pipeline} → {who}{update}{RESET}")
    lines = render_text(msg).splitlines()
    # the blocks as Slack shows them; the plain-text fallback before them says the same
    start = next((i for i, line in enumerate(lines) if line.startswith("== ")), 1)
    for line in lines[start:]:
        emit(f"│ {line}")
    detail = f"ts={receipt.slack_ts}" if receipt.slack_ts else (receipt.error or "")
    emit(
        f"└─ receipt: {colour}{receipt.status}{RESET} attempts={receipt.attempts} {detail} "
        f"{DIM}(+{time.monotonic() - started:.1f}s){RESET}"
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state: Path = args.state_dir.resolve()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    # the default already, made explicit: a dead pipe is an error to ignore, not a kill
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    stack(state, "down", "--purge")  # a previous demo killed hard leaves its stack behind
    (state / "logs").mkdir(parents=True, exist_ok=True)
    services = Services(state, env={})
    try:
        log("starting Kafka (KRaft) and Apicurio Registry (first run downloads them)...")
        up = stack(state, "up", stop=stop)
        if stop.is_set():
            return 0
        if up.returncode != 0:
            log(f"{RED}stack failed to start; see {state / 'stack' / 'logs'}{RESET}")
            return 1
        env = dict(os.environ)
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                k, _, v = line[7:].partition("=")
                env[k] = v
        bootstrap, registry_url = env["KAFKA_BOOTSTRAP_SERVERS"], env["SCHEMA_REGISTRY_URL"]
        log(
            f"stack up in {time.monotonic() - started:.0f}s: kafka {bootstrap}, "
            f"registry {registry_url}"
        )
        topics = TopicSettings(partitions=3, replication_factor=1)
        ensure_topics(
            KafkaSettings(bootstrap_servers=bootstrap).client_config(), topics.all_specs()
        )
        registry = ConfluentSchemaRegistry(registry_url)
        now = datetime.now(UTC)
        seed_lookups(bootstrap, registry, topics, now)
        log(f"seeded {len(OWNERS)} account-team assignments and {len(SLACK_USERS)} Slack users")
        warehouse = state / "warehouse.duckdb"
        warehouse.unlink(missing_ok=True)
        write_warehouse(warehouse, ONBOARDING_FIRST, now - timedelta(minutes=2), create=True)
        log(f"warehouse {shown(warehouse)}: {len(ONBOARDING_FIRST)} onboarding rows")

        token = env.get("NOTIFIER_SLACK_BOT_TOKEN")
        services.env = {
            **env,
            "TOPIC_PARTITIONS": "3",
            "LOG_FORMAT": "json",
            "PRODUCER_WAREHOUSE": f"duckdb:///{warehouse}",
            "PRODUCER_DELAY_S": "5",
            "PRODUCER_POLL_INTERVAL_S": "2",
            "ENRICHER_STATE_DIR": str(state / "enricher"),
            "ENRICHER_FALLBACK_CHANNEL": env.get("ENRICHER_FALLBACK_CHANNEL", FALLBACK_CHANNEL),
            "NOTIFIER_STATE_DIR": str(state / "notifier"),
        }
        if stop.is_set():
            return 0
        services.start()
        mode = "posting to Slack" if token else "dry-run Slack"
        log(f"started producer, enricher, notifier ({mode}); logs in {shown(state / 'logs')}/")

        feeder = threading.Thread(
            target=feed_connectors,
            args=(bootstrap, registry, topics.data_notifications_pipeline, stop, args.gap),
            daemon=True,
        )
        feeder.start()
        return watch(args, services, bootstrap, registry, topics, warehouse, stop, started)
    finally:
        # whatever happened above, and even with stdout gone: stop all that was started
        stop.set()
        log("stopping services and the stack...")
        try:
            services.stop()
        finally:
            down = stack(state, "down")
            if down.returncode == 0:
                log("stopped; nothing left running")
            else:
                log(f"{RED}stack.sh down failed ({down.returncode}); see {state / 'stack'}{RESET}")


def watch(
    args: argparse.Namespace,
    services: Services,
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    topics: TopicSettings,
    warehouse: Path,
    stop: threading.Event,
    started: float,
) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-viewer-{os.getpid()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topics.slack_messages, topics.slack_message_receipts])
    dec_msg = AvroDeserializer(registry, SlackMessage)
    dec_receipt = AvroDeserializer(registry, SlackDeliveryReceipt)
    messages: dict[str, SlackMessage] = {}
    receipts: dict[str, SlackDeliveryReceipt] = {}
    shown: set[str] = set()
    first_alert: float | None = None
    later_rows_written = False
    last_status = 0.0
    services_started = time.monotonic()
    try:
        while not stop.is_set():
            services.check()
            for m in consumer.consume(100, 0.3):
                if m.error() is not None or m.value() is None:
                    continue
                where = {
                    "topic": str(m.topic()),
                    "partition": int(m.partition() or 0),
                    "offset": int(m.offset() or 0),
                }
                if m.topic() == topics.slack_messages:
                    sm = dec_msg(m.value(), **where)
                    messages[sm.message_id] = sm
                else:
                    r = dec_receipt(m.value(), **where)
                    receipts[r.message_id] = r
            for mid in sorted(set(messages) & set(receipts) - shown):
                shown.add(mid)
                if first_alert is None:
                    first_alert = time.monotonic() - started
                    log(
                        f"{BOLD}first alert delivered {first_alert:.1f}s after `make demo` "
                        f"started{RESET}"
                    )
                show_alert(messages[mid], receipts[mid], started)
            if not later_rows_written and time.monotonic() - services_started > 15:
                write_warehouse(warehouse, ONBOARDING_LATER, datetime.now(UTC), create=False)
                later_rows_written = True
                log(f"new onboarding row committed to the warehouse ({ONBOARDING_LATER[0][1]})")
            now = time.monotonic()
            if now - last_status > 5:
                last_status = now
                status_line(services, receipts)
            if args.exit_after_alerts and len(shown) >= args.exit_after_alerts:
                status_line(services, receipts)
                log(f"{len(shown)} alerts shown; exiting as asked (--exit-after-alerts)")
                return 0
            if args.timeout and now - started > args.timeout:
                log(f"{RED}timeout after {args.timeout}s with {len(shown)} alerts{RESET}")
                return 1 if args.exit_after_alerts else 0
        return 0
    finally:
        consumer.close()


def status_line(services: Services, receipts: dict[str, SlackDeliveryReceipt]) -> None:
    events_in = services.metric("enricher", "enricher_events_total")
    filtered = services.metric("enricher", "enricher_dropped_total")
    missed = services.metric("enricher", "enricher_join_misses_total")
    delivered = sum(1 for r in receipts.values() if r.status in ("DELIVERED", "DRY_RUN"))
    failed = sum(1 for r in receipts.values() if r.status == "FAILED")
    emit(
        f"{YELLOW}── events in {events_in:.0f} · filtered {filtered:.0f} · delivered "
        f"{delivered} · failed {failed} · missed (owner/Slack user unknown) "
        f"{missed:.0f}{RESET}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--exit-after-alerts",
        type=int,
        default=0,
        help="stop once this many alerts were shown (0: run until Ctrl-C)",
    )
    parser.add_argument("--timeout", type=float, default=0, help="stop after this many seconds")
    parser.add_argument(
        "--gap", type=float, default=1.5, help="seconds between connector status changes fed"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE,
        help=f"stack state, logs, service state (default {shown(DEFAULT_STATE)})",
    )
    args = parser.parse_args()
    try:
        return run(args)
    except RuntimeError as exc:
        log(f"{RED}{exc}{RESET}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
