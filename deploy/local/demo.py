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
   onboarding rows while running. It tells the alert lifecycle's two stories: Northwind's
   ``orders-cdc`` fails to provision three times and then runs (one alert, updated in place
   twice, then resolved); Cyberdyne starts onboarding with no owner (its alert waits, with a
   copy in the fallback channel) and, 10 s after that copy is shown, the demo assigns the
   owner and publishes her Slack user (the alert goes to her as a DM, the copy says so);
6. shows every Slack message as its receipt arrives: a new alert in full (who gets it, what
   it says, the receipt), an update as what it is (``↻ update of alert #3 · 3rd failure``,
   ``✓ resolved``, ``→ re-routed to DM of ...``) with only the lines it changes; a live count
   of events in, filtered, alerts, updates, resolutions, re-routes and parked join misses.

``--exit-after-alerts N`` counts Slack messages shown, updates included (each is one Slack
call with its own receipt); ``SCRIPT_MESSAGES`` (14) is the whole script.

Ctrl-C (or ``--exit-after-alerts N`` / ``--timeout S``, SIGTERM, SIGHUP) stops everything it
started, also when its output is gone (``make demo | tee demo.log`` and Ctrl-C kills ``tee``
first): every line goes through ``emit``, which stops writing once a write fails, and the
stack and the services run in their own sessions, so only the demo's own clean-up stops them.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import shutil
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
from services.enricher.core import message_id
from services.enricher.lifecycle import SUFFIX_CATCHUP, SUFFIX_DM, SUFFIX_REROUTED, derived_id
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
    "org-6c02": "Cyberdyne Systems",
}
OWNERS = {  # org -> (email, name); org-0aa1 has no owner on purpose, org-6c02 gets one late
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
# The lifecycle's cast: Northwind's orders-cdc fails to provision three times (retried in
# between, each retry another status change) and then runs; the one alert it gets is updated
# for the 2nd and 3rd failure and resolved when it runs. Cyberdyne starts onboarding before
# it has an account-team owner: its alert waits (parked, a copy in the fallback channel) until
# the demo assigns Mei Tanaka, then goes to her and the fallback copy says so.
_PG_PASSWORD = 'FATAL: password authentication failed for user "cdc_reader" (host db-prod-1:5432)'
_PG_HBA = (
    'FATAL: no pg_hba.conf entry for host "10.4.0.17", user "cdc_reader", database "orders", '
    "SSL off"
)
# (org, connector, type, old, new, error); one connector id per (org, connector)
CONNECTOR_STREAM = [
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "PROVISIONING", "FAILED", _PG_PASSWORD),
    ("org-1c9e", "clickstream-s3", "S3_SINK", "PROVISIONING", "RUNNING", None),
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "FAILED", "PROVISIONING", None),
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
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "PROVISIONING", "FAILED", _PG_PASSWORD),
    (
        "org-2e80",
        "sf-leads",
        "SalesforceCdcSource",
        "PROVISIONING",
        "FAILED",
        "INVALID_LOGIN: Invalid username, password, security token; or user locked out.",
    ),
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "FAILED", "PROVISIONING", None),
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
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "PROVISIONING", "FAILED", _PG_HBA),
    ("org-5d21", "tps-reports", "MySqlCdcSource", "RUNNING", "PAUSED", None),
    (
        "org-9b44",
        "eligibility-sftp",
        "SftpSource",
        "PROVISIONING",
        "FAILED",
        "Could not resolve host sftp.umbrella-health.example: Name or service not known",
    ),
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "FAILED", "PROVISIONING", None),
    ("org-5d21", "tps-reports", "MySqlCdcSource", "PAUSED", "RUNNING", None),
    ("org-7f3a", "orders-cdc", "PostgresCdcSource", "PROVISIONING", "RUNNING", None),
]
CONNECTOR_IDS = {
    key: f"lcc-{n:04d}"
    for n, key in enumerate(dict.fromkeys((org, name) for org, name, *_ in CONNECTOR_STREAM))
}
RESOLVING = ("RUNNING", "DELETED")  # the provisioning pipeline's resolving statuses
ONBOARDING_FIRST = [
    ("org-5d21", "Initech", "STANDARD", "AWS"),
    ("org-9b44", "Umbrella Health", "ENTERPRISE", "AZURE"),
]
ONBOARDING_LATER = [
    ("org-1c9e", "Globex Corporation", "ENTERPRISE", "GCP"),
    ("org-6c02", "Cyberdyne Systems", "ENTERPRISE", "AWS"),  # no owner yet: assigned late
]
LATE_ORG = "org-6c02"
LATE_OWNER = ("mei.tanaka@example.com", "Mei Tanaka")
LATE_SLACK_USER = ("U02MEITANAKA", "mei")
#: how long the late org's alert visibly waits in the fallback channel before its owner comes
LATE_OWNER_AFTER_S = 10.0
#: the Slack messages the whole script makes: 9 alerts (5 failures, 4 onboardings: 3 of them
#: in the fallback channel, as no owner or Slack user is known), orders-cdc's 2 updates and its
#: resolution, Cyberdyne's DM to its late owner and the update of its fallback copy
SCRIPT_MESSAGES = 14


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


def assign_late_owner(
    bootstrap: str, registry: ConfluentSchemaRegistry, topics: TopicSettings
) -> None:
    """The late org gets its owner and the owner's Slack user: the enricher's parked alert
    for it can go to them now."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3})
    now = datetime.now(UTC)
    email, name = LATE_OWNER
    uid, display = LATE_SLACK_USER
    owner = CsdrAssignment(LATE_ORG, ORGS[LATE_ORG], email, now, name)
    p.produce(
        topics.data_csdr_assignment,
        key=LATE_ORG.encode(),
        value=AvroSerializer(registry, CsdrAssignment)(topics.data_csdr_assignment, owner),
    )
    user = SlackUser(email, uid, now, display)
    p.produce(
        topics.data_slack_users,
        key=email.encode(),
        value=AvroSerializer(registry, SlackUser)(topics.data_slack_users, user),
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


def event_id(run: str, i: int) -> str:
    """The id of the stream's ``i``-th event in this run (unique per run: the state is kept)."""
    return f"demo-{run}-{i}"


def feed_connectors(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    topic: str,
    stop: threading.Event,
    gap_s: float,
    run: str,
) -> int:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "log_level": 3})
    encode = AvroSerializer(registry, ConnectorStatusChanged)
    sent = 0
    for i, (org, name, kind, old, new, error) in enumerate(CONNECTOR_STREAM):
        if stop.wait(gap_s):
            break
        event = ConnectorStatusChanged(
            event_id=event_id(run, i),
            org_id=org,
            environment_id="env-" + org[4:],
            cluster_id="lkc-" + org[4:],
            connector_id=CONNECTOR_IDS[org, name],  # the lifecycle's dedup key
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


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _changed(before: list[str], after: list[str]) -> list[str]:
    """The lines of ``after`` that an update inserted or rewrote, in order.

    A detail's heading (``*Latest error*``) keeps the line under it, even when that line is
    unchanged: the same error again is still the latest one.
    """
    ops = difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes()
    picked: set[int] = set()
    for op, _, _, j1, j2 in ops:
        if op in ("insert", "replace"):
            picked.update(range(j1, j2))
            last = after[j2 - 1]
            if j2 < len(after) and last.startswith("*") and last.endswith("*"):
                picked.add(j2)
    return [after[j] for j in sorted(picked)]


#: how long a re-route's update waits for its DM to be shown first
REROUTE_WAIT_S = 5.0


@dataclass
class Viewer:
    """Shows each Slack message once its receipt is in: new alerts in full, updates as what
    they are (a further failure, a resolution, a re-route), with only the lines they change.

    What an update is follows from the lifecycle's contract, not from its text: a re-route and
    a catch-up carry ids derived from the parked event's id (``lifecycle.derived_id``), the DM
    of a parked event too; a resolution's source is a resolving status change the demo fed.
    """

    started: float
    resolving_events: set[str]
    messages: dict[str, SlackMessage] = field(default_factory=dict)
    receipts: dict[str, SlackDeliveryReceipt] = field(default_factory=dict)
    shown: list[str] = field(default_factory=list)  # message ids in the order shown
    number: dict[str, int] = field(default_factory=dict)  # new alert -> its #n
    lines: dict[str, list[str]] = field(default_factory=dict)  # alert -> what Slack shows now
    events: dict[str, int] = field(default_factory=dict)  # alert -> events it stands for
    held: dict[str, float] = field(default_factory=dict)  # re-route update -> held since
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("alerts", "updates", "resolved", "rerouted"), 0)
    )

    def names(self) -> dict[str, str]:
        users = {**SLACK_USERS, LATE_OWNER[0]: LATE_SLACK_USER}
        owners = [*OWNERS.values(), LATE_OWNER]
        return {users[e.lower()][0]: n for e, n in owners if e.lower() in users}

    def who(self, channel: str) -> str:
        if channel == FALLBACK_CHANNEL:
            return f"{FALLBACK_CHANNEL} (fallback: owner or Slack user unknown)"
        return f"DM to {self.names().get(channel, '?')} ({channel})"

    def ready(self) -> list[str]:
        """Messages with their receipt, not shown yet, in the order their receipts came.

        A re-route's update of the fallback copy comes with the DM (one decision, one
        transaction) but may be delivered first: it waits for the DM to be shown, up to
        ``REROUTE_WAIT_S``, so that the story reads in order.
        """
        now = time.monotonic()
        out = []
        for mid in self.receipts:
            if mid not in self.messages or mid in self.shown:
                continue
            msg = self.messages[mid]
            src = msg.source_event_id
            if msg.update_of is not None and mid == derived_id(msg.pipeline, src, SUFFIX_REROUTED):
                dm = derived_id(msg.pipeline, src, SUFFIX_DM)
                since = self.held.setdefault(mid, now)
                if dm not in self.shown and dm not in out and now - since < REROUTE_WAIT_S:
                    continue
            out.append(mid)
        return out

    def show(self, mid: str) -> str:
        """Show one message; what it was: alert, update, resolved or rerouted."""
        msg, receipt = self.messages[mid], self.receipts[mid]
        self.shown.append(mid)
        body = render_text(msg).splitlines()
        # the blocks as Slack shows them; the plain-text fallback before them says the same
        body = body[next((i for i, line in enumerate(body) if line.startswith("== ")), 1) :]
        source = msg.source_event_id
        if msg.update_of is None:
            kind = "alerts"
            self.number[mid] = len(self.number) + 1
            self.events[mid] = 1
            head = f"#{self.number[mid]} {msg.pipeline} → {self.who(msg.channel)}"
            if mid == derived_id(msg.pipeline, source, SUFFIX_DM):
                fallback = self._number_of(message_id(msg.pipeline, source))
                head += f"{GREEN} · owner known now: re-routed from {fallback}{RESET}"
            changed = body
        else:
            original = msg.update_of
            changed = _changed(self.lines.get(original, []), body)
            where = msg.channel if msg.channel == FALLBACK_CHANNEL else self.who(msg.channel)
            label = f"{self._number_of(original)} · {where}"
            if mid == derived_id(msg.pipeline, source, SUFFIX_REROUTED):
                kind = "rerouted"
                dm = self.messages.get(derived_id(msg.pipeline, source, SUFFIX_DM))
                target = self.names().get(dm.channel, dm.channel) if dm else "the owner"
                head = f"→ {label} · re-routed to DM of {target}"
            elif source in self.resolving_events:
                kind = "resolved"
                head = f"✓ {label} · resolved"
            else:
                kind = "updates"
                if mid != derived_id(msg.pipeline, source, SUFFIX_CATCHUP):
                    self.events[original] = self.events.get(original, 1) + 1
                what = "failure" if "failed" in msg.pipeline else "event"
                head = f"↻ update of {label} · {_ordinal(self.events[original])} {what}"
            if kind != "rerouted":  # the alert lives on in the DM, as is
                self.lines[original] = body
        self.lines.setdefault(mid, body)
        self.counts[kind] += 1
        colour = {"DELIVERED": GREEN, "DRY_RUN": CYAN}.get(receipt.status, RED)
        emit(f"\n{BOLD}┌─ {head}{RESET}")
        for line in changed:
            emit(f"│ {line}")
        detail = f"ts={receipt.slack_ts}" if receipt.slack_ts else (receipt.error or "")
        emit(
            f"└─ receipt: {colour}{receipt.status}{RESET} attempts={receipt.attempts} {detail} "
            f"{DIM}(+{time.monotonic() - self.started:.1f}s){RESET}"
        )
        return kind

    def _number_of(self, mid: str) -> str:
        return f"alert #{self.number[mid]}" if mid in self.number else f"message {mid[:12]}"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state: Path = args.state_dir.resolve()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    # the default already, made explicit: a dead pipe is an error to ignore, not a kill
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    stack(state, "down", "--purge")  # a previous demo killed hard leaves its stack behind
    # the services' local state (the enricher's open alerts and parks, the notifier's receipts)
    # belongs to the Kafka just purged: kept, a rerun would update messages this run never
    # posted (the notifier then waits for their originals) instead of posting them
    for service in ("enricher", "notifier"):
        shutil.rmtree(state / service, ignore_errors=True)
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

        run_id = str(int(time.time()))
        viewer = Viewer(
            started,
            resolving_events={
                event_id(run_id, i)
                for i, (*_, new, _error) in enumerate(CONNECTOR_STREAM)
                if new in RESOLVING
            },
        )
        feeder = threading.Thread(
            target=feed_connectors,
            args=(bootstrap, registry, topics.data_notifications_pipeline, stop, args.gap, run_id),
            daemon=True,
        )
        feeder.start()
        return watch(args, services, bootstrap, registry, topics, warehouse, stop, viewer)
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
    viewer: Viewer,
) -> int:
    started = viewer.started
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
    first_alert: float | None = None
    later_rows_written = False
    late_fallback_seen: float | None = None  # when the late org's fallback copy was shown
    late_owner_assigned = False
    status = StatusLine()
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
                    viewer.messages[sm.message_id] = sm
                else:
                    r = dec_receipt(m.value(), **where)
                    viewer.receipts[r.message_id] = r
            for mid in viewer.ready():
                if first_alert is None:
                    first_alert = time.monotonic() - started
                    log(
                        f"{BOLD}first alert delivered {first_alert:.1f}s after `make demo` "
                        f"started{RESET}"
                    )
                viewer.show(mid)
                msg = viewer.messages[mid]
                if (
                    late_fallback_seen is None
                    and msg.org_id == LATE_ORG
                    and msg.channel == FALLBACK_CHANNEL
                    and msg.update_of is None
                ):
                    late_fallback_seen = time.monotonic()
                    log(
                        f"{ORGS[LATE_ORG]} has no owner yet: its alert waits (parked); the "
                        f"demo assigns one in {LATE_OWNER_AFTER_S:.0f}s"
                    )
            if not later_rows_written and time.monotonic() - services_started > 15:
                write_warehouse(warehouse, ONBOARDING_LATER, datetime.now(UTC), create=False)
                later_rows_written = True
                names = ", ".join(name for _, name, _, _ in ONBOARDING_LATER)
                log(f"new onboarding rows committed to the warehouse ({names})")
            if (
                not late_owner_assigned
                and late_fallback_seen is not None
                and time.monotonic() - late_fallback_seen >= LATE_OWNER_AFTER_S
            ):
                assign_late_owner(bootstrap, registry, topics)
                late_owner_assigned = True
                log(
                    f"{ORGS[LATE_ORG]} assigned to {LATE_OWNER[1]} ({LATE_OWNER[0]}), "
                    f"Slack user {LATE_SLACK_USER[0]} published"
                )
            now = time.monotonic()
            if now - status.checked_at > 5:
                status.show(status_line(services, viewer), now)
            if args.exit_after_alerts and len(viewer.shown) >= args.exit_after_alerts:
                status.show(status_line(services, viewer), now, force=True)
                log(
                    f"{len(viewer.shown)} Slack messages shown; exiting as asked "
                    "(--exit-after-alerts)"
                )
                return 0
            if args.timeout and now - started > args.timeout:
                status.show(status_line(services, viewer), now, force=True)
                log(f"{RED}timeout after {args.timeout}s with {len(viewer.shown)} messages{RESET}")
                return 1 if args.exit_after_alerts else 0
        return 0
    finally:
        consumer.close()


class StatusLine:
    """The counters' line, shown when it changed, else once a minute as a sign of life.

    Repeated every few seconds, an unchanged line would scroll the alerts off the screen
    (and fill a ``tee``'d log with copies of itself) while the demo waits for Ctrl-C.
    """

    HEARTBEAT_S = 60.0

    def __init__(self) -> None:
        self.checked_at = float("-inf")
        self._shown: str | None = None
        self._shown_at = float("-inf")

    def show(self, text: str, now: float, *, force: bool = False) -> bool:
        """Emit ``text`` if it differs from the last one shown, ``force`` or a minute passed."""
        self.checked_at = now
        if not force and text == self._shown and now - self._shown_at < self.HEARTBEAT_S:
            return False
        self._shown, self._shown_at = text, now
        emit(text)
        return True


def status_line(services: Services, viewer: Viewer) -> str:
    events_in = services.metric("enricher", "enricher_events_total")
    filtered = services.metric("enricher", "enricher_dropped_total")
    parked = services.metric("enricher", "enricher_parked_events")
    missed = services.metric("enricher", "enricher_join_misses_total")
    failed = sum(1 for r in viewer.receipts.values() if r.status == "FAILED")
    c = viewer.counts
    return (
        f"{YELLOW}── events in {events_in:.0f} · filtered {filtered:.0f} · alerts "
        f"{c['alerts']} · updates {c['updates']} · resolved {c['resolved']} · re-routed "
        f"{c['rerouted']} · failed {failed} · waiting for owner/Slack user {parked:.0f} · "
        f"join misses {missed:.0f}{RESET}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--exit-after-alerts",
        type=int,
        default=0,
        help="stop once this many Slack messages were shown: new alerts and updates (a "
        f"further failure, a resolution, a re-route) count one each; {SCRIPT_MESSAGES} is "
        "the whole script (0: run until Ctrl-C)",
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
