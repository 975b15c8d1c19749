"""End-to-end harness: producer, enricher and notifier as real processes, a stream, an audit.

What a scenario does (``World``):

1. fresh names for every topic (``TOPIC_<NAME>`` overrides), consumer group, transactional id
   and state directory, so scenarios never see each other's data on a shared broker;
2. a ``FakeSlack`` of its own with a fresh bot token, lookup tables seeded with a small
   directory of orgs and account-team owners (some without a Slack user, one without an
   owner, one whose Slack channel is gone), and an empty DuckDB warehouse;
3. the three services started as processes (``ServiceProcess``: logs captured per run,
   readiness from ``/readyz`` on its ``METRICS_PORT``, ``kill -9``, SIGTERM, restart), kept
   alive by a ``Fleet`` that does what Kubernetes would (restart a service that exits on its
   own; probe ``/healthz`` like the manifests' liveness probe and restart a wedged one) and
   records each such event: scenarios without an injected fault allow none. With
   ``replicas`` each service runs as pods of a Deployment (``enricher-1``, ``enricher-2``...:
   per-pod state directory, static group instance id and transactional id, as
   ``deploy/k8s/base`` derives them from the pod name), and the ``Fleet`` also rolls them
   (start the new pod, wait for its ``/readyz``, SIGTERM the old), replaces a killed pod by a
   new one, overlaps two pods of a single-writer service, and stalls one (SIGSTOP/SIGCONT);
   ``RegistryProxy`` puts a schema registry that answers 503 or hangs in front of them;
4. a stream (``StreamSpec``): connector status changes produced over time, onboarding rows
   whose timestamps spread over the stream (the producer sees each row once the clock passes
   it), poison records on every input topic, plus whatever faults the scenario injects;
5. the audit (``Audit``): every input has an expected outcome computed from the directory
   (the oracle): delivered (one post in the owner's DM and a DELIVERED receipt), filtered (no
   message at all), dead-lettered (its record in the right ``.dlq`` topic) or missed (a join
   miss: one post in the fallback channel saying why). An alert grouped by the enricher's
   alert lifecycle into an open alert of the same key (``update_of`` set) counts as grouped:
   its update is in the channel expected for it, with a DELIVERED receipt, and the message
   it updates is a post of its own there (never an update), delivered and saying why on a
   miss. The audit waits until every outcome
   is observed, lets the pipeline settle, stops the services gracefully, then counts: inputs,
   delivered, filtered, dead-lettered, missed, duplicate Slack posts (posts per ``message_id``
   from the Slack message metadata), duplicate records in the ``read_committed`` view of
   ``slack-messages`` and ``onboarding-events`` (the enricher's and the producer's
   exactly-once promise), lost inputs and the longest input-to-post delay of the inputs that
   entered during the fault window; it also checks that no secret
   (Slack token, registry credentials, SASL password) appears in any captured log.

Every report goes to ``SUMMARY``; ``tests/e2e/conftest.py`` prints the table at the end of
the session and writes it to ``summary_path()``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any, Literal

import duckdb
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from libs.kafka import KafkaSettings, TopicError, ensure_topics
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    ConfluentSchemaRegistry,
    ConnectorStatusChanged,
    CsdrAssignment,
    DeserializationError,
    OnboardingStarted,
    SchemaRegistry,
    SlackDeliveryReceipt,
    SlackMessage,
    SlackUser,
)
from services.common.settings import TopicSettings
from services.enricher.core import message_id
from services.enricher.pipelines.connector_provisioning_failed import NAME as CONNECTOR_PIPELINE
from services.enricher.pipelines.onboarding_started import NAME as ONBOARDING_PIPELINE
from services.producer.core import event_id as row_event_id
from services.producer.queries import ONBOARDING_STARTED
from tests.support.fake_slack import FakeSlack, StoredMessage
from tests.support.kafka import unique
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("producer", "enricher", "notifier")
#: the Kafka nodes of a ``stack.sh up --brokers 3`` cluster
BROKERS = (1, 2, 3)
FALLBACK_CHANNEL = "#e2e-fallback"
#: the Slack user id of an owner whose DM Slack refuses (``channel_not_found``)
GONE_CHANNEL = "U0E2EGONE"
#: a schema id no registry has: a Confluent-framed value nobody can decode
UNKNOWN_SCHEMA_ID = 2_000_000_000

Outcome = Literal["delivered", "filtered", "dead_lettered", "missed"]

# -- the directory the lookup tables hold ------------------------------------------------------

#: owner e-mail as the assignment has it -> (name, Slack user id or None)
OWNERS: dict[str, tuple[str, str | None]] = {
    "ana.silva@example.com": ("Ana Silva", "U0E2EANA"),
    "Bo.Chen@Example.com": ("Bo Chen", "U0E2EBO"),  # mixed case: the join lower-cases it
    "dana.kim@example.com": ("Dana Kim", "U0E2EDANA"),
    "raj.patel@example.com": ("Raj Patel", None),  # no Slack user: no_slack_user
    "gone.user@example.com": ("Gone User", GONE_CHANNEL),
}
_DM_OWNERS = ["ana.silva@example.com", "Bo.Chen@Example.com", "dana.kim@example.com"]
#: org id -> (org name, owner e-mail or None)
ORGS: dict[str, tuple[str, str | None]] = {
    **{f"org-{i:02d}": (f"Customer {i:02d}", _DM_OWNERS[i % 3]) for i in range(9)},
    "org-09": ("Customer 09", "raj.patel@example.com"),
    "org-10": ("Customer 10", "gone.user@example.com"),
    "org-11": ("Customer 11", None),  # no owner: no_owner
}
ORG_IDS = sorted(ORGS)

#: what a fallback post says for each miss reason (services/enricher/core.py)
MISS_TEXT = {"no_owner": "No account-team owner found", "no_slack_user": "No Slack user found"}


#: every channel a message can be delivered to (Slack refuses ``GONE_CHANNEL``)
DELIVERABLE_CHANNELS = [u for _, u in OWNERS.values() if u and u != GONE_CHANNEL] + [
    FALLBACK_CHANNEL
]


def route_of(
    org_id: str, orgs: Mapping[str, tuple[str, str | None]] = ORGS
) -> tuple[Outcome, str, str]:
    """(outcome, channel, reason) of a kept event of ``org_id``, from the directory."""
    _, owner = orgs[org_id]
    if owner is None:
        return "missed", FALLBACK_CHANNEL, "no_owner"
    _, user = OWNERS[owner]
    if user is None:
        return "missed", FALLBACK_CHANNEL, "no_slack_user"
    if user == GONE_CHANNEL:
        return "dead_lettered", GONE_CHANNEL, "channel_not_found"
    return "delivered", user, "dm"


# -- small utilities ---------------------------------------------------------------------------


def summary_path() -> Path:
    """Where the summary table is written (``E2E_SUMMARY_FILE`` overrides)."""
    return Path(os.environ.get("E2E_SUMMARY_FILE", Path(tempfile.gettempdir()) / "e2e-summary.txt"))


def unknown_schema_value() -> bytes:
    """Confluent wire format whose schema id is not in the registry."""
    return struct.pack(">bI", 0, UNKNOWN_SCHEMA_ID) + b"\x02\x04abc"


def client_config(bootstrap: str) -> dict[str, Any]:
    """Config of the harness's own clients (the plain listener)."""
    return {"bootstrap.servers": bootstrap}


def raw_producer(bootstrap: str, **extra: Any) -> Producer:
    """An idempotent producer for seeding and the stream."""
    return Producer(
        {
            **client_config(bootstrap),
            "enable.idempotence": True,
            "linger.ms": 5,
            "log_level": 3,
            **extra,
        }
    )


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Exit:
    """A service run that ended on its own, or that its liveness probe had killed (not a
    kill or stop of the scenario)."""

    service: str
    code: int
    after_s: float
    error: str
    by_liveness_probe: bool = False

    def describe(self) -> str:
        how = (
            "was killed by its liveness probe"
            if self.by_liveness_probe
            else f"exited {self.code} by itself"
        )
        return f"{self.service} {how} at +{self.after_s}s: {self.error[:300]}"


#: how a run of a service starts: (service name, its settings) -> (argv, process environment)
Launcher = Callable[[str, Mapping[str, str]], tuple[list[str], dict[str, str]]]


def local_launcher(name: str, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``python -m services.<name>`` with this interpreter, from the source tree."""
    return [sys.executable, "-m", f"services.{name}"], dict(env)


class ServiceProcess:
    """One pod of a service (``python -m services.<service>``, or what ``launcher`` makes of
    it, e.g. a container run) across its runs (container restarts); a log file per run.
    ``name`` is the pod's name (the service's name when it runs as a single instance)."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log_dir: Path,
        launcher: Launcher = local_launcher,
        *,
        service: str | None = None,
    ) -> None:
        self.name = name
        self.service = service or name
        self.metrics_port = free_port()
        self.env = {**env, "METRICS_PORT": str(self.metrics_port)}
        self.log_dir = log_dir
        self.launcher = launcher
        self.log_files: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        #: True while the harness wants the process down (killed, stopping, stopped)
        self.held_down = True
        #: True between ``pause()`` (SIGSTOP) and ``resume()`` (SIGCONT)
        self.paused = False

    # -- running -----------------------------------------------------------------------------
    def start(self, **overrides: str) -> None:
        """Start a new run (the previous one must have ended)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{self.name}-{len(self.log_files) + 1}.log"
        self.log_files.append(path)
        argv, env = self.launcher(self.service, {**self.env, **overrides})
        with path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.held_down = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill9(self) -> None:
        """``kill -9``: no handler runs, nothing is flushed."""
        self.held_down = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process stalls as on a frozen node (no heartbeat, no poll)."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: the stalled process runs on, believing it still owns what it owned."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def terminate(self, timeout_s: float = 60.0, *, signalled: bool = False) -> int:
        """SIGTERM (once: a second one forces the default action) and wait; SIGKILL after
        ``timeout_s``. Returns the exit code."""
        self.held_down = True
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            if self.paused:  # a stopped process handles SIGTERM only once it runs again
                self.resume()
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(30)
                return -int(signal.SIGKILL)
        return int(self.proc.returncode)

    # -- observing ---------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2
            ) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def healthy(self) -> tuple[bool, str]:
        """The liveness probe: False only for an answer that says unhealthy (a process that
        is not listening yet is starting, not dead)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=3
            ) as resp:
                return int(resp.status) == 200, ""
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:200]}"
        except (OSError, urllib.error.URLError):
            return True, ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def log_text(self, run: int = -1) -> str:
        if not self.log_files:
            return ""
        path = self.log_files[run]
        return path.read_text(errors="replace") if path.exists() else ""

    def log_records(self, run: int = -1) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text(run).splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def error_line(self, run: int = -1) -> str:
        """The last ERROR/CRITICAL log line of a run (message and exception), else its tail.

        librdkafka's own lines (logger ``librdkafka``, e.g. a refused connection) are not the
        service's verdict on why it stopped: they are skipped.
        """
        for rec in reversed(self.log_records(run)):
            if rec.get("logger") == "librdkafka":
                continue
            if rec.get("level") in ("ERROR", "CRITICAL"):
                exc = str(rec.get("exc", "")).strip().splitlines()
                return f"{rec.get('msg')} | {exc[-1] if exc else rec.get('error', '')}"
        return self.log_text(run)[-300:].strip()

    def tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


#: the liveness probe of deploy/k8s/base/*.yaml: every 10 s, restart after 3 failures in a row
LIVENESS_PERIOD_S = 10.0
LIVENESS_FAILURES = 3


class Fleet:
    """The pods of a scenario, supervised the way Kubernetes would: a run that ends by
    itself is recorded and, with ``restart_on_exit``, restarted after ``restart_delay_s`` (a
    container restart: same pod, same name and state directory); a run whose ``/healthz``
    answers unhealthy ``LIVENESS_FAILURES`` times in a row (probed every ``LIVENESS_PERIOD_S``)
    is recorded, killed and restarted.

    With ``make_pod`` (a new, unstarted pod of a service) it also does what a Deployment does
    with its pods: a rolling update (``maxSurge: 1``, ``maxUnavailable: 0``), a pod deleted
    and replaced by a new one (new name, empty state directory), and a surge where the new
    pod starts while the old one still runs. ``services`` holds the live pods by name;
    ``retired`` the ones a rollout or a replacement removed (their logs stay readable)."""

    def __init__(
        self,
        services: Mapping[str, ServiceProcess],
        *,
        restart_on_exit: bool = True,
        restart_delay_s: float = 1.0,
        make_pod: Callable[[str], ServiceProcess] | None = None,
    ) -> None:
        self.services = dict(services)
        self.retired: list[ServiceProcess] = []
        self.restart_on_exit = restart_on_exit
        self.restart_delay_s = restart_delay_s
        self.make_pod = make_pod
        self.exits: list[Exit] = []
        #: exit codes of retired pods' last runs when they were stopped (pod name -> code)
        self.retired_codes: dict[str, int] = {}
        self._restart_at: dict[str, float] = {}
        self._next_probe: dict[str, float] = {}
        self._probe_failures: dict[str, list[str]] = {}
        self.t0 = time.monotonic()

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    def pods(self, service: str) -> list[ServiceProcess]:
        """The live pods of ``service``, oldest first."""
        return [p for p in self.services.values() if p.service == service]

    def every_pod(self, service: str | None = None) -> list[ServiceProcess]:
        """Every pod the scenario ran (retired ones included), of ``service`` or of all."""
        pods = [*self.retired, *self.services.values()]
        return [p for p in pods if service is None or p.service == service]

    # -- what a Deployment does with its pods ------------------------------------------------
    def add_pod(self, service: str) -> ServiceProcess:
        """Schedule and start a new pod of ``service``."""
        assert self.make_pod is not None, "this fleet cannot create pods"
        pod = self.make_pod(service)
        self.services[pod.name] = pod
        pod.start()
        return pod

    def retire(self, pod: ServiceProcess, timeout_s: float = 60.0) -> int:
        """Delete a pod: SIGTERM (SIGKILL after ``timeout_s``); returns its last exit code."""
        code = pod.terminate(timeout_s)
        self._forget(pod)
        self.retired_codes[pod.name] = code
        return code

    def _forget(self, pod: ServiceProcess) -> None:
        self.services.pop(pod.name, None)
        self._restart_at.pop(pod.name, None)
        self._probe_failures.pop(pod.name, None)
        self.retired.append(pod)

    def rolling_restart(self, service: str, ready_timeout_s: float = 180.0) -> dict[str, int]:
        """A rollout as Kubernetes does it with ``maxSurge: 1, maxUnavailable: 0``: for each
        old pod, start a new one, wait for its ``/readyz``, then SIGTERM the old one. Returns
        the old pods' exit codes."""
        codes = {}
        for old in self.pods(service):
            new = self.add_pod(service)
            self.wait_ready(new.name, timeout_s=ready_timeout_s)
            codes[old.name] = self.retire(old)
        return codes

    def replace_pod(self, name: str) -> ServiceProcess:
        """``kill -9`` a pod that does not come back (node lost, ``delete --force``); the
        Deployment schedules a new pod with a new name and an empty state directory."""
        old = self.services[name]
        old.kill9()
        self._forget(old)
        self.retired_codes[old.name] = -int(signal.SIGKILL)
        return self.add_pod(old.service)

    def surge(self, name: str) -> tuple[ServiceProcess, ServiceProcess]:
        """A second pod of the same service starts while ``name`` still runs (an eviction or
        a rollout overlapping a single-writer service); the old pod is being deleted, so the
        supervisor no longer restarts it, but it runs until it exits by itself or the
        scenario ends it (``terminate``). Returns (old, new)."""
        old = self.services[name]
        self._forget(old)
        new = self.add_pod(old.service)
        return old, new

    def pause(self, name: str) -> None:
        self.services[name].pause()

    def resume(self, name: str) -> None:
        self.services[name].resume()

    def start(self, *names: str) -> None:
        for name in names or tuple(self.services):
            self.services[name].start()

    def tick(self) -> None:
        now = time.monotonic()
        for name, svc in self.services.items():
            if svc.held_down or svc.proc is None:
                continue
            code = svc.proc.poll()
            if code is None:
                if not svc.paused:  # a stalled node answers no probe; the scenario ends it
                    self._probe(name, svc, now)
                continue
            if name not in self._restart_at:
                self.exits.append(Exit(name, code, round(now - self.t0, 1), svc.error_line()))
                self._restart_at[name] = now + self.restart_delay_s
            if self.restart_on_exit and now >= self._restart_at[name]:
                del self._restart_at[name]
                svc.start()

    def _probe(self, name: str, svc: ServiceProcess, now: float) -> None:
        if now < self._next_probe.get(name, 0.0):
            return
        self._next_probe[name] = now + LIVENESS_PERIOD_S
        healthy, detail = svc.healthy()
        failures = self._probe_failures.setdefault(name, [])
        if healthy:
            failures.clear()
            return
        failures.append(detail)
        if len(failures) < LIVENESS_FAILURES:
            return
        failures.clear()
        svc.kill9()
        self.exits.append(Exit(name, -9, round(now - self.t0, 1), detail, by_liveness_probe=True))
        if self.restart_on_exit:
            svc.start()

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def wait_for(self, predicate: Callable[[], object], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.tick()
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {n} (run {len(s.log_files)}):\n{s.tail(1500)}"
                    for n, s in self.services.items()
                )
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tails}")
            time.sleep(0.2)

    def wait_ready(self, *names: str, timeout_s: float = 120.0) -> None:
        wanted = [self.services[n] for n in names or tuple(self.services)]
        self.wait_for(
            lambda: all(s.ready() for s in wanted),
            timeout_s,
            "readiness of " + ", ".join(s.name for s in wanted),
        )

    def kill9(self, name: str, *, restart: bool = True) -> None:
        svc = self.services[name]
        svc.kill9()
        self._restart_at.pop(name, None)
        if restart:
            svc.start()

    def stop_all(self, timeout_s: float = 60.0) -> dict[str, int]:
        """SIGTERM every running pod (in parallel) and wait; exit codes by pod."""
        self._restart_at.clear()
        running = [s for s in self.services.values() if s.alive()]
        for svc in running:
            svc.held_down = True
            assert svc.proc is not None
            svc.proc.send_signal(signal.SIGTERM)
        return {s.name: s.terminate(timeout_s, signalled=True) for s in running}

    def kill_all(self) -> None:
        for svc in self.every_pod():
            svc.kill9()


# -- a TCP proxy: a dependency that can vanish and come back on the same address --------------


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``down()`` refuses connections (and cuts
    the open ones) until ``up()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        t.start()
        self._threads.append(t)

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self._threads:
            t.join(5)
        self._threads = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # both directions end together; close() is idempotent, the other pump's is a no-op
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


# -- an HTTP proxy in front of the schema registry: healthy, answering 503, or hanging ---------


RegistryMode = Literal["pass", "503", "hang"]


class RegistryProxy:
    """Forwards HTTP requests to ``target_url``'s host. ``mode`` "503" answers every request
    HTTP 503 at once (an overloaded or restarting registry behind a load balancer); "hang"
    reads the request and answers nothing until the mode changes (a registry that accepts
    connections and stalls: the client's own timeout must end the call); "pass" forwards."""

    def __init__(self, target_url: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        parts = urlsplit(target_url)
        assert parts.hostname and parts.port
        self._target = (parts.hostname, parts.port)
        self._mode: RegistryMode = "pass"
        self._changed = threading.Condition()
        self._closing = False
        #: requests answered per mode (hung requests count when they are released)
        self.answered: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, headers, payload, mode = proxy._answer(
                    self.command, self.path, dict(self.headers.items()), body
                )
                # counted before the answer goes out, so a client holding its answer can rely
                # on the count including it
                with proxy._changed:
                    proxy.answered[mode] += 1
                try:
                    self.send_response(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    return  # the client gave up waiting (its timeout against "hang")

            def do_GET(self) -> None:
                self._any()

            def do_POST(self) -> None:
                self._any()

            def do_PUT(self) -> None:
                self._any()

            def do_DELETE(self) -> None:
                self._any()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        port = self._server.server_address[1]
        #: the registry URL through the proxy
        self.url = parts._replace(netloc=f"127.0.0.1:{port}").geturl()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def set_mode(self, mode: RegistryMode) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _answer(
        self, verb: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes, str]:
        import http.client

        with self._changed:
            mode = self._mode
            while mode == "hang" and not self._closing:
                self._changed.wait(1.0)
                mode = self._mode
        if mode == "503" or self._closing:
            err = b'{"error_code": 50301, "message": "registry unavailable (e2e fault)"}'
            return 503, [("Content-Type", "application/json")], err, "503"
        conn = http.client.HTTPConnection(*self._target, timeout=30)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            conn.request(verb, path, body=body, headers=fwd)
            resp = conn.getresponse()
            payload = resp.read()
            keep = [
                (k, v)
                for k, v in resp.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            ]
            return resp.status, keep, payload, "pass"
        except OSError as exc:
            return 502, [], str(exc).encode(), "pass"
        finally:
            conn.close()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()


# -- reading topics back -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    """A record as read back."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


class Follower:
    """Reads topics from their beginning (``read_committed``) and keeps every record."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        self.records: dict[str, list[Rec]] = {}
        self._consumer = Consumer(
            {
                **client_config(bootstrap),
                "group.id": unique("e2e-follower"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "log_level": 3,
            }
        )
        parts = []
        for topic in topics:
            self.records[topic] = []
            parts += [TopicPartition(topic, p, -2) for p in self._partitions(topic)]
        self._consumer.assign(parts)

    def _partitions(self, topic: str, timeout_s: float = 30.0) -> list[int]:
        # a topic created a moment ago may not be in the metadata with its partitions yet
        deadline = time.monotonic() + timeout_s
        while True:
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            assert time.monotonic() < deadline, f"topic {topic} has no partitions"
            time.sleep(0.2)

    def poll(self, max_s: float = 1.0) -> None:
        """Read whatever is available (at most ``max_s`` of reading)."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            msgs = self._consumer.consume(1000, 0.05)
            if not msgs:
                return
            for m in msgs:
                if m.error() is not None:
                    continue
                topic = str(m.topic())
                headers = {k: (v or b"") for k, v in (m.headers() or [])}
                self.records[topic].append(
                    Rec(
                        topic,
                        int(m.partition() or 0),
                        int(m.offset() or 0),
                        m.key(),
                        m.value(),
                        headers,
                    )
                )

    def close(self) -> None:
        self._consumer.close()


# -- topics ------------------------------------------------------------------------------------


def scenario_topics(tag: str, replication_factor: int = 1) -> TopicSettings:
    """Every CONTRACT topic under a fresh name."""
    return TopicSettings(
        data_notifications_pipeline=f"{tag}.data-notifications-pipeline",
        onboarding_events=f"{tag}.onboarding-events",
        data_csdr_assignment=f"{tag}.data-csdr-assignment",
        data_slack_users=f"{tag}.data-slack-users",
        slack_messages=f"{tag}.slack-messages",
        slack_message_receipts=f"{tag}.slack-message-receipts",
        producer_cursors=f"{tag}.producer-cursors",
        partitions=3,
        replication_factor=replication_factor,
    )


def topic_env(topics: TopicSettings) -> dict[str, str]:
    names = topics.model_dump(exclude={"partitions", "replication_factor"})
    env = {f"TOPIC_{k.upper()}": str(v) for k, v in names.items()}
    env["TOPIC_PARTITIONS"] = str(topics.partitions)
    env["TOPIC_REPLICATION_FACTOR"] = str(topics.replication_factor)
    return env


def create_all_topics(bootstrap: str, topics: TopicSettings, attempts: int = 10) -> None:
    """Create every topic of a scenario (and its dead-letter topics)."""
    config = KafkaSettings(bootstrap_servers=bootstrap).client_config()
    for attempt in range(1, attempts + 1):
        try:
            ensure_topics(config, topics.all_specs())
            return
        except TopicError as exc:
            # describing a topic right after creating it may answer UNKNOWN_TOPIC_OR_PART
            if attempt == attempts or "UNKNOWN_TOPIC" not in str(exc):
                raise
            time.sleep(0.5)


# -- expectations and the audit ----------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One input and the outcome the directory predicts for it."""

    input: str
    outcome: Outcome
    reason: str = ""
    event_id: str | None = None
    message_id: str | None = None
    channel: str | None = None
    #: dead letters: the topic and the key the record has there
    dlq_topic: str | None = None
    dlq_key: bytes | None = None
    #: when the input entered the pipeline (epoch seconds): produced, or a warehouse row's
    #: timestamp (the producer may read it from then on)
    entered_at: float | None = None


@dataclass
class Report:
    """One row of the summary table, plus what went wrong."""

    scenario: str
    inputs: int = 0
    delivered: int = 0
    #: delivered or missed inputs the enricher grouped into an earlier alert (an update of it)
    grouped: int = 0
    filtered: int = 0
    dead_lettered: int = 0
    missed: int = 0
    #: Slack posts beyond the first per message id
    duplicates: int = 0
    #: records beyond the first per message id (slack-messages) or event id
    #: (onboarding-events) in the ``read_committed`` view: the exactly-once promises
    dup_messages: int = 0
    lost: int = 0
    #: longest input -> Slack post delay of the inputs that entered during the fault window
    #: (of every input when the scenario injected no fault); None: nothing was posted
    max_delay_s: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def assert_ok(self) -> None:
        assert not self.problems, f"{self.scenario}: " + "\n".join(self.problems[:30])
        assert self.lost == 0 and self.duplicates == 0 and self.dup_messages == 0, self


SUMMARY: list[Report] = []

COLUMNS = (
    "scenario",
    "inputs",
    "delivered",
    "grouped",
    "filtered",
    "dead-lettered",
    "missed",
    "dup-posts",
    "dup-rc-msgs",
    "lost",
    "max-delay-s",
    "seconds",
)


def format_summary(reports: Sequence[Report]) -> str:
    """The summary table (plain text), with each scenario's notes below it."""
    rows = [
        [
            r.scenario,
            str(r.inputs),
            str(r.delivered),
            str(r.grouped),
            str(r.filtered),
            str(r.dead_lettered),
            str(r.missed),
            str(r.duplicates),
            str(r.dup_messages),
            str(r.lost),
            "-" if r.max_delay_s is None else f"{r.max_delay_s:.1f}",
            f"{r.seconds:.0f}",
        ]
        for r in reports
    ]
    delays = [r.max_delay_s for r in reports if r.max_delay_s is not None]
    totals = [
        "TOTAL",
        *(
            str(sum(getattr(r, f) for r in reports))
            for f in ("inputs", "delivered", "grouped", "filtered", "dead_lettered", "missed")
        ),
        str(sum(r.duplicates for r in reports)),
        str(sum(r.dup_messages for r in reports)),
        str(sum(r.lost for r in reports)),
        f"{max(delays):.1f}" if delays else "-",
        f"{sum(r.seconds for r in reports):.0f}",
    ]
    widths = [max(len(c), *(len(row[i]) for row in [*rows, totals])) for i, c in enumerate(COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [line(["-" * w for w in widths]), line(totals)]
    noted = [r for r in reports if r.notes or r.problems]
    if noted:
        out.append("")
        for r in noted:
            for n in r.notes:
                out.append(f"{r.scenario}: {n}")
            for p in r.problems[:10]:
                out.append(f"{r.scenario}: PROBLEM {p}")
    return "\n".join(out)


@dataclass
class Observed:
    """What the pipeline did, as seen in Slack and on the topics."""

    posts: dict[str, list[StoredMessage]]
    receipts: dict[str, list[str]]
    messages: Counter[str]
    message_events: dict[str, str]
    dlq_keys: dict[str, Counter[bytes | None]]
    dlq_message_ids: Counter[str]
    onboarding_event_ids: Counter[str]
    unparsed_posts: int
    #: message id -> (the message it updates, its channel), for updates in slack-messages
    updates: dict[str, tuple[str, str]] = field(default_factory=dict)

    def duplicates(self) -> int:
        return sum(len(p) - 1 for p in self.posts.values() if len(p) > 1)


class Audit:
    """Expected outcomes, and what the pipeline did with them."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.expects: list[Expect] = []
        reg = registry
        self._dec_message = AvroDeserializer(reg, SlackMessage)
        self._dec_receipt = AvroDeserializer(reg, SlackDeliveryReceipt)
        self._dec_onboarding = AvroDeserializer(reg, OnboardingStarted)

    def add(self, expect: Expect) -> None:
        self.expects.append(expect)

    # -- observing ---------------------------------------------------------------------------
    def observe(self, w: World) -> Observed:
        w.follower.poll(2.0)
        t = w.topics
        posts: dict[str, list[StoredMessage]] = {}
        unparsed = 0
        for p in w.slack.posts():
            # the id it was posted with: an update (chat.update) replaces a post's metadata
            posted = p.posted_metadata if p.posted_metadata is not None else p.metadata
            payload = (posted or {}).get("event_payload") or {}
            mid = payload.get("message_id") if isinstance(payload, dict) else None
            if not isinstance(mid, str):
                unparsed += 1
                continue
            posts.setdefault(mid, []).append(p)
        receipts: dict[str, list[str]] = {}
        for r in w.follower.records[t.slack_message_receipts]:
            if r.value is None:
                continue
            rec = self._dec_receipt(r.value, topic=r.topic, partition=r.partition, offset=r.offset)
            receipts.setdefault(rec.message_id, []).append(rec.status)
        messages: Counter[str] = Counter()
        message_events: dict[str, str] = {}
        updates: dict[str, tuple[str, str]] = {}
        for r in w.follower.records[t.slack_messages]:
            try:
                m = self._dec_message(
                    r.value, topic=r.topic, partition=r.partition, offset=r.offset
                )
            except DeserializationError:
                continue  # the poison we put there ourselves
            messages[m.message_id] += 1
            message_events[m.message_id] = m.source_event_id
            if m.update_of is not None:
                updates[m.message_id] = (m.update_of, m.channel)
        dlq_keys: dict[str, Counter[bytes | None]] = {}
        dlq_mids: Counter[str] = Counter()
        for topic in w.dlq_topics:
            dlq_keys[topic] = Counter(r.key for r in w.follower.records[topic])
        for r in w.follower.records[t.slack_messages + ".dlq"]:
            try:
                m = self._dec_message(
                    r.value, topic=r.topic, partition=r.partition, offset=r.offset
                )
            except DeserializationError:
                continue
            dlq_mids[m.message_id] += 1
        onboarding: Counter[str] = Counter()
        for r in w.follower.records[t.onboarding_events]:
            try:
                ev = self._dec_onboarding(
                    r.value, topic=r.topic, partition=r.partition, offset=r.offset
                )
            except DeserializationError:
                continue
            onboarding[ev.event_id] += 1
        return Observed(
            posts,
            receipts,
            messages,
            message_events,
            dlq_keys,
            dlq_mids,
            onboarding,
            unparsed,
            updates,
        )

    def problem(self, e: Expect, obs: Observed) -> str | None:
        """Why ``e`` is not (yet) accounted for, or None."""
        if e.outcome in ("delivered", "missed"):
            assert e.message_id is not None
            if e.message_id in obs.updates:
                return self._grouped_problem(e, obs)
            posts = obs.posts.get(e.message_id, [])
            if not posts:
                return f"{e.input}: no Slack post of message {e.message_id} ({e.reason})"
            channels = {p.channel for p in posts}
            if channels != {e.channel}:
                return f"{e.input}: posted to {sorted(channels)}, expected {e.channel}"
            if e.outcome == "missed" and MISS_TEXT[e.reason] not in posts[0].text:
                return f"{e.input}: fallback post does not say why ({e.reason})"
            if "DELIVERED" not in obs.receipts.get(e.message_id, []):
                return f"{e.input}: no DELIVERED receipt for {e.message_id}"
            return None
        if e.outcome == "filtered":
            if e.event_id in obs.message_events.values():
                return f"{e.input}: filtered event {e.event_id} produced a message"
            return None
        # dead-lettered
        assert e.dlq_topic is not None
        if e.message_id is not None:  # a message Slack refused: FAILED receipt + dead letter
            if obs.dlq_message_ids[e.message_id] < 1:
                return f"{e.input}: message {e.message_id} not in {e.dlq_topic}"
            if "FAILED" not in obs.receipts.get(e.message_id, []):
                return f"{e.input}: no FAILED receipt for {e.message_id}"
            if obs.posts.get(e.message_id):
                return f"{e.input}: refused message {e.message_id} is in Slack"
            return None
        if obs.dlq_keys[e.dlq_topic][e.dlq_key] < 1:
            return f"{e.input}: key {e.dlq_key!r} not in {e.dlq_topic}"
        return None

    def _grouped_problem(self, e: Expect, obs: Observed) -> str | None:
        """Why an input grouped into an earlier alert (an update of it) is not accounted for."""
        assert e.message_id is not None
        original, channel = obs.updates[e.message_id]
        if channel != e.channel:
            return f"{e.input}: update {e.message_id} went to {channel}, expected {e.channel}"
        if original in obs.updates:
            return f"{e.input}: update {e.message_id} points at another update {original}"
        posts = obs.posts.get(original, [])
        if not posts:
            return f"{e.input}: grouped into {original}, which is not in Slack"
        channels = {p.channel for p in posts}
        if channels != {e.channel}:
            return f"{e.input}: grouped into {original} posted to {sorted(channels)}"
        if e.outcome == "missed" and MISS_TEXT[e.reason] not in posts[0].text:
            return f"{e.input}: fallback post {original} does not say why ({e.reason})"
        if "DELIVERED" not in obs.receipts.get(original, []):
            return f"{e.input}: no DELIVERED receipt for {original}"
        if "DELIVERED" not in obs.receipts.get(e.message_id, []):
            return f"{e.input}: no DELIVERED receipt for update {e.message_id}"
        return None

    def max_delay(self, obs: Observed, window: tuple[float, float] | None) -> float | None:
        """Longest time from an input's entry to its (first) Slack post, over the inputs that
        entered within ``window`` (all when None)."""
        delays = []
        for e in self.expects:
            if e.entered_at is None or e.message_id is None:
                continue
            if window is not None and not window[0] <= e.entered_at <= window[1]:
                continue
            posts = obs.posts.get(e.message_id)
            if posts:
                delays.append(min(p.posted_at for p in posts) - e.entered_at)
        return max(delays) if delays else None

    def pending(self, obs: Observed) -> list[str]:
        return [p for e in self.expects if (p := self.problem(e, obs)) is not None]

    # -- the verdict -------------------------------------------------------------------------
    def report(self, obs: Observed, name: str, window: tuple[float, float] | None = None) -> Report:
        """The verdict; ``window`` (epoch seconds) is the fault window whose inputs' delays
        count for ``max_delay_s`` (every input's when None)."""
        r = Report(name, inputs=len(self.expects))
        for e in self.expects:
            p = self.problem(e, obs)
            if p is None and e.message_id is not None and e.message_id in obs.updates:
                r.grouped += 1
            elif p is None:
                setattr(r, e.outcome, getattr(r, e.outcome) + 1)
            else:
                r.lost += 1
                r.problems.append("lost: " + p)
        r.duplicates = obs.duplicates()
        r.dup_messages = sum(n - 1 for n in obs.messages.values() if n > 1) + sum(
            n - 1 for n in obs.onboarding_event_ids.values() if n > 1
        )
        r.max_delay_s = self.max_delay(obs, window)
        for mid, ps in obs.posts.items():
            if len(ps) > 1:
                r.problems.append(f"duplicate: message {mid} posted {len(ps)} times")
        expected_mids = {e.message_id for e in self.expects if e.message_id}
        unexpected = sorted(set(obs.posts) - expected_mids)
        if unexpected:
            r.problems.append(f"{len(unexpected)} posts of unexpected messages: {unexpected[:5]}")
        if obs.unparsed_posts:
            r.problems.append(f"{obs.unparsed_posts} posts without a message id in metadata")
        dup_msgs = {m: n for m, n in obs.messages.items() if n > 1}
        if dup_msgs:
            r.problems.append(
                f"enricher exactly-once broken: {len(dup_msgs)} message ids written more than "
                f"once to slack-messages (read_committed): {list(dup_msgs.items())[:5]}"
            )
        dup_events = {m: n for m, n in obs.onboarding_event_ids.items() if n > 1}
        if dup_events:
            r.problems.append(
                f"producer exactly-once broken: {len(dup_events)} event ids written more than "
                f"once to onboarding-events: {list(dup_events.items())[:5]}"
            )
        extra_dlq = sum(
            n - 1
            for e in self.expects
            if e.outcome == "dead_lettered" and e.message_id is None and e.dlq_topic
            for n in [obs.dlq_keys[e.dlq_topic][e.dlq_key]]
            if n > 1
        ) + sum(n - 1 for n in obs.dlq_message_ids.values() if n > 1)
        if extra_dlq:
            r.notes.append(f"{extra_dlq} extra dead-letter copies (dead letters are at-least-once)")
        return r


# -- the stream --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """How much input, over how long."""

    duration_s: float = 20.0
    connectors: int = 36
    rows: int = 24
    poison: bool = True
    #: share of connector events the pipeline keeps (None: 3 in 5); the rest are filtered
    kept_share: float | None = None


@dataclass(order=True)
class Action:
    at_s: float
    label: str = field(compare=False)
    run: Callable[[], None] = field(compare=False)


Fault = tuple[float, str, Callable[[], None]]


class _Feeder(threading.Thread):
    """Runs input actions at their times (seconds after ``start``) on a thread of its own;
    an exception ends it and is kept in ``error`` for the caller to raise."""

    def __init__(self, actions: Sequence[Action], start: float, log: Callable[[str], None]) -> None:
        super().__init__(name="e2e-feeder", daemon=True)
        self._actions = actions
        self._start = start
        self._log = log
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for action in self._actions:
                wait = self._start + action.at_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._log(f"t={time.monotonic() - self._start:5.1f}s {action.label}")
                action.run()
        except BaseException as exc:
            self.error = exc


#: a warehouse row: org_id, org_name, plan, cloud, started_at
Row = tuple[str, str, str, str | None, datetime]


class World:
    """One scenario's topics, fake Slack, seeded lookups, warehouse, services and audit."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        stack_env: Mapping[str, str],
        *,
        service_registry_url: str | None = None,
        kafka_env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
        restart_on_exit: bool = True,
        launcher: Launcher = local_launcher,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        self.name = name
        #: pods per service as Deployments run them (None: one process per service, named
        #: after it, with dynamic group membership, as the single-instance scenarios run)
        self.replicas = dict(replicas) if replicas is not None else None
        self._pod_seq: Counter[str] = Counter()
        #: epoch seconds of the first fault's start and the last fault's end
        self.fault_window: tuple[float, float] | None = None
        self.tmp = tmp
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.tag = unique(f"e2e-{name}")
        self.bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
        self.registry_url = stack_env["SCHEMA_REGISTRY_URL"]
        self.topics = scenario_topics(self.tag, int(stack_env.get("TOPIC_REPLICATION_FACTOR", "1")))
        self.dlq_topics = [
            f"{t}.dlq"
            for t in (
                self.topics.data_notifications_pipeline,
                self.topics.onboarding_events,
                self.topics.data_csdr_assignment,
                self.topics.data_slack_users,
                self.topics.slack_messages,
            )
        ]
        self.token = f"xoxb-e2e-{unique('token')}"
        registry_secret = unique("registry-secret")
        self.registry_user_info = f"e2e-user:{registry_secret}"
        self.secrets = [
            self.token,
            registry_secret,
            base64.b64encode(self.registry_user_info.encode()).decode(),
            *secrets,
        ]
        self._cleanup = contextlib.ExitStack()
        try:
            self._setup(
                stack_env, service_registry_url, kafka_env, extra_env, restart_on_exit, launcher
            )
        except BaseException:
            self._cleanup.close()
            raise

    def _setup(
        self,
        stack_env: Mapping[str, str],
        service_registry_url: str | None,
        kafka_env: Mapping[str, str] | None,
        extra_env: Mapping[str, str] | None,
        restart_on_exit: bool,
        launcher: Launcher,
    ) -> None:
        tmp = self.tmp
        self._launcher = launcher
        self.slack = FakeSlack(token=self.token).start()
        self._cleanup.callback(self.slack.stop)
        self.slack.slack_error(GONE_CHANNEL, "channel_not_found", times=None)
        self.test_registry = ConfluentSchemaRegistry(self.registry_url)
        self._cleanup.callback(self.test_registry.close)
        create_all_topics(self.bootstrap, self.topics)
        self.follower = Follower(
            self.bootstrap,
            [
                self.topics.slack_messages,
                self.topics.slack_message_receipts,
                self.topics.onboarding_events,
                *self.dlq_topics,
            ],
        )
        self._cleanup.callback(self.follower.close)
        self.producer = raw_producer(self.bootstrap)
        self._cleanup.callback(self.producer.flush, 10)
        self.warehouse = tmp / "warehouse.duckdb"
        self.audit = Audit(self.test_registry)
        self.orgs = dict(ORGS)
        self.rows: list[Row] = []
        self._seq = 0
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("TOPIC_", "ENRICHER_", "NOTIFIER_", "PRODUCER_", "KAFKA_", "SCHEMA_REGISTRY_")
            )
        }
        env.update(stack_env)
        env.update(topic_env(self.topics))
        env.update(
            {
                "SCHEMA_REGISTRY_URL": service_registry_url or self.registry_url,
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": self.registry_user_info,
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                # producer: every row once the clock passes its timestamp, small transactions
                "PRODUCER_WAREHOUSE": f"duckdb:///{self.warehouse}",
                "PRODUCER_DELAY_S": "0",
                "PRODUCER_POLL_INTERVAL_S": "0.5",
                "PRODUCER_BATCH_SIZE": "4",
                "PRODUCER_RETRY_INITIAL_S": "0.5",
                "PRODUCER_RETRY_MAX_S": "2",
                "PRODUCER_TRANSACTIONAL_ID": f"{self.tag}-producer",
                # enricher
                "ENRICHER_GROUP_ID": f"{self.tag}-enricher",
                "ENRICHER_FALLBACK_CHANNEL": FALLBACK_CHANNEL,
                "ENRICHER_SESSION_TIMEOUT_MS": "6000",
                # notifier
                "NOTIFIER_GROUP_ID": f"{self.tag}-notifier",
                "NOTIFIER_SLACK_BOT_TOKEN": self.token,
                "NOTIFIER_SLACK_TIMEOUT_S": "5",
                "NOTIFIER_RATE_PER_CHANNEL_PER_S": "5",
                "NOTIFIER_RATE_BURST": "2",
                "NOTIFIER_BACKOFF_BASE_S": "0.2",
                "NOTIFIER_BACKOFF_MAX_S": "2",
                "NOTIFIER_MAX_ATTEMPTS": "10",
                "NOTIFIER_COMMIT_INTERVAL_S": "0.5",
                "NOTIFIER_SESSION_TIMEOUT_MS": "6000",
            }
        )
        env.update(kafka_env or {})
        env.update(extra_env or {})
        #: what the scenario set explicitly wins over the per-pod defaults
        self._overridden = {*(kafka_env or {}), *(extra_env or {})}
        self.env = env
        if self.replicas is None:
            pods = {s: self._pod(s, s) for s in SERVICES}
        else:
            pods = {}
            for s in SERVICES:
                for _ in range(self.replicas.get(s, 1)):
                    pod = self._new_pod(s)
                    pods[pod.name] = pod
        self.fleet = Fleet(
            pods,
            restart_on_exit=restart_on_exit,
            make_pod=self._new_pod if self.replicas is not None else None,
        )
        self._cleanup.callback(self.fleet.kill_all)
        self.seed_lookups()

    def _new_pod(self, service: str) -> ServiceProcess:
        """A new pod of a Deployment: a fresh name, hence a fresh state directory (an
        ``emptyDir``), group instance id and transactional id, as the manifests derive them
        from the pod name."""
        self._pod_seq[service] += 1
        return self._pod(service, f"{service}-{self._pod_seq[service]}")

    def _pod(self, service: str, pod: str) -> ServiceProcess:
        env = {
            "ENRICHER_STATE_DIR": str(self.tmp / "state" / pod),
            # the default <group>-<hostname>, with the pod name as the host name
            "ENRICHER_TRANSACTIONAL_ID": f"{self.tag}-{pod}",
            "NOTIFIER_STATE_DIR": str(self.tmp / "state" / pod),
            # the pod's own URL of the fake Slack: a call in flight names its caller
            "NOTIFIER_SLACK_API_URL": self.slack.client_url(pod),
        }
        if self.replicas is not None:
            # static membership, as deploy/k8s/base sets it (the pod name)
            env["ENRICHER_GROUP_INSTANCE_ID"] = pod
            env["NOTIFIER_GROUP_INSTANCE_ID"] = pod
        env = {k: v for k, v in env.items() if k not in self._overridden}
        return ServiceProcess(
            pod, {**self.env, **env}, self.tmp / "logs", self._launcher, service=service
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs, stop the fake Slack, close the clients (reverse order)."""
        self._cleanup.close()

    def start(self, *names: str, wait: bool = True) -> None:
        self.fleet.start(*names)
        if wait:
            self.fleet.wait_ready(*names)

    # -- seeding -----------------------------------------------------------------------------
    def seed_lookups(self) -> None:
        now = datetime.now(UTC)
        enc_owner = AvroSerializer(self.test_registry, CsdrAssignment)
        enc_user = AvroSerializer(self.test_registry, SlackUser)
        t = self.topics
        for org_id, (org_name, owner) in ORGS.items():
            if owner is None:
                continue
            name, _ = OWNERS[owner]
            rec = CsdrAssignment(org_id, org_name, owner, now, name)
            self._produce(
                t.data_csdr_assignment, org_id.encode(), enc_owner(t.data_csdr_assignment, rec)
            )
        for email, (name, user) in OWNERS.items():
            if user is None:
                continue
            rec_u = SlackUser(email.lower(), user, now, name.split()[0].lower())
            self._produce(
                t.data_slack_users, email.lower().encode(), enc_user(t.data_slack_users, rec_u)
            )
        self.flush()

    def assign_owner(self, org_id: str, org_name: str, email: str, name: str) -> None:
        """Publish ``email`` as the account-team owner of ``org_id`` (a late assignment: the
        org's events may already be parked for it)."""
        enc = AvroSerializer(self.test_registry, CsdrAssignment)
        topic = self.topics.data_csdr_assignment
        rec = CsdrAssignment(org_id, org_name, email, datetime.now(UTC), name)
        self._produce(topic, org_id.encode(), enc(topic, rec))
        self.flush()

    def add_slack_user(self, email: str, user: str, handle: str) -> None:
        """Publish the Slack user of ``email`` (its DM channel is ``user``)."""
        enc = AvroSerializer(self.test_registry, SlackUser)
        topic = self.topics.data_slack_users
        rec = SlackUser(email.lower(), user, datetime.now(UTC), handle)
        self._produce(topic, email.lower().encode(), enc(topic, rec))
        self.flush()

    def _produce(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value)
                return
            except BufferError:
                self.producer.poll(0.05)

    def flush(self) -> None:
        # long enough to ride out a broker restart
        assert self.producer.flush(120) == 0, "records not acknowledged"

    def write_warehouse(self, rows: Sequence[Row]) -> None:
        """(Re)write the warehouse file with every row so far and ``rows``, atomically (the
        producer polls it; its cursor is past the old rows)."""
        self.rows.extend(rows)
        rows = self.rows
        tmp = self.warehouse.with_suffix(".building")
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        try:
            con.execute(
                "CREATE TABLE onboarding (org_id VARCHAR, org_name VARCHAR, plan VARCHAR, "
                "cloud VARCHAR, started_at TIMESTAMP)"
            )
            con.executemany(
                "INSERT INTO onboarding VALUES (?, ?, ?, ?, ?)",
                [(o, n, p, c, ts.astimezone(UTC).replace(tzinfo=None)) for o, n, p, c, ts in rows],
            )
        finally:
            con.close()
        os.replace(tmp, self.warehouse)

    # -- inputs and their expectations -------------------------------------------------------
    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def connector_event(self, org_id: str, kind: str) -> tuple[ConnectorStatusChanged, Expect]:
        """A status change of ``kind`` (kept | not_from_provisioning | not_failed)."""
        i = self._next()
        old, new = {
            "kept": ("PROVISIONING", "FAILED"),
            "not_from_provisioning": ("RUNNING", "PAUSED"),
            "not_failed": ("PROVISIONING", "RUNNING"),
        }[kind]
        eid = f"{self.tag}-cn-{i}"
        event = ConnectorStatusChanged(
            event_id=eid,
            org_id=org_id,
            environment_id=f"env-{i}",
            cluster_id=f"lkc-{i}",
            connector_id=f"lcc-{i}",
            connector_name=f"connector-{i}",
            connector_type="PostgresCdcSource",
            old_status=old,
            new_status=new,
            occurred_at=datetime.now(UTC),
            error_message="FATAL: password authentication failed" if kind == "kept" else None,
        )
        label = f"connector event {eid} ({org_id}, {old}->{new})"
        if kind != "kept":
            return event, Expect(label, "filtered", kind, event_id=eid)
        return event, self._expect_kept(label, CONNECTOR_PIPELINE, eid, org_id)

    def _expect_kept(self, label: str, pipeline: str, eid: str, org_id: str) -> Expect:
        outcome, channel, reason = route_of(org_id, self.orgs)
        mid = message_id(pipeline, eid)
        if outcome == "dead_lettered":
            return Expect(
                label,
                outcome,
                reason,
                event_id=eid,
                message_id=mid,
                channel=channel,
                dlq_topic=self.topics.slack_messages + ".dlq",
            )
        return Expect(label, outcome, reason, event_id=eid, message_id=mid, channel=channel)

    def produce_connectors(self, events: Sequence[tuple[ConnectorStatusChanged, Expect]]) -> None:
        enc = AvroSerializer(self.test_registry, ConnectorStatusChanged)
        topic = self.topics.data_notifications_pipeline
        for event, expect in events:
            self._produce(topic, event.org_id.encode(), enc(topic, event))
            self.audit.add(replace(expect, entered_at=time.time()))
        self.flush()

    def onboarding_rows(
        self, rng: Random, count: int, t0: datetime, duration_s: float
    ) -> list[Row]:
        """Rows whose timestamps spread over the stream, and their expectations."""
        rows = []
        for _ in range(count):
            i = self._next()
            org_id = rng.choice(ORG_IDS)
            ts = t0 + timedelta(microseconds=rng.randrange(int(duration_s * 1e6)) + i)
            rows.append((org_id, ORGS[org_id][0], "ENTERPRISE", rng.choice(["AWS", None]), ts))
            eid = row_event_id(ONBOARDING_STARTED.name, org_id, ts.astimezone(UTC))
            label = f"warehouse row {org_id}@{ts.isoformat()}"
            expect = self._expect_kept(label, ONBOARDING_PIPELINE, eid, org_id)
            self.audit.add(replace(expect, entered_at=ts.timestamp()))
        return rows

    def bad_row(self, t0: datetime) -> Row:
        """A row the producer cannot map (empty org_name): dead-lettered by the producer."""
        org_id = f"org-badrow-{self._next()}"
        self.audit.add(
            Expect(
                f"warehouse row {org_id} without org_name",
                "dead_lettered",
                "unmappable row",
                dlq_topic=self.topics.onboarding_events + ".dlq",
                dlq_key=org_id.encode(),
            )
        )
        return (org_id, "", "FREE", None, t0)

    def poison_records(self) -> list[tuple[str, bytes, bytes | None, str]]:
        """(topic, key, value, why) for every input topic: garbage, unknown schema id..."""
        t = self.topics
        n = self._next()
        enc = AvroSerializer(self.test_registry, ConnectorStatusChanged)
        blank = ConnectorStatusChanged(
            event_id=f"{self.tag}-blank-{n}",
            org_id="  ",
            environment_id="env",
            cluster_id="lkc",
            connector_id="lcc",
            connector_name="c",
            connector_type="S3_SINK",
            old_status="PROVISIONING",
            new_status="FAILED",
            occurred_at=datetime.now(UTC),
        )
        garbage = b"this is not avro at all"
        return [
            (t.data_notifications_pipeline, f"poison-cn-garbage-{n}".encode(), garbage, "garbage"),
            (
                t.data_notifications_pipeline,
                f"poison-cn-unknown-schema-{n}".encode(),
                unknown_schema_value(),
                "unknown schema id",
            ),
            (
                t.data_notifications_pipeline,
                f"poison-cn-blank-org-{n}".encode(),
                enc(t.data_notifications_pipeline, blank),
                "blank org_id",
            ),
            (t.onboarding_events, f"poison-ob-garbage-{n}".encode(), b'{"json": 1}', "garbage"),
            (t.onboarding_events, f"poison-ob-null-{n}".encode(), None, "null value"),
            (t.data_csdr_assignment, f"poison-org-garbage-{n}".encode(), garbage, "garbage"),
            (
                t.data_csdr_assignment,
                f"poison-org-unknown-schema-{n}".encode(),
                unknown_schema_value(),
                "unknown schema id",
            ),
            (t.data_slack_users, f"poison-{n}@garbage.example".encode(), garbage, "garbage"),
            (
                t.data_slack_users,
                f"poison-{n}@unknown-schema.example".encode(),
                unknown_schema_value(),
                "unknown schema id",
            ),
            (t.slack_messages, f"poison-channel-garbage-{n}".encode(), garbage, "garbage"),
            (
                t.slack_messages,
                f"poison-channel-unknown-schema-{n}".encode(),
                unknown_schema_value(),
                "unknown schema id",
            ),
        ]

    def produce_poison(self, records: Sequence[tuple[str, bytes, bytes | None, str]]) -> None:
        for topic, key, value, why in records:
            self._produce(topic, key, value)
            self.audit.add(
                Expect(
                    f"poison {why} on {topic}",
                    "dead_lettered",
                    why,
                    dlq_topic=topic + ".dlq",
                    dlq_key=key,
                )
            )
        self.flush()

    def slack_message(self, channel: str, text: str) -> tuple[SlackMessage, Expect]:
        """A message produced straight to slack-messages (as another enricher would)."""
        i = self._next()
        mid = message_id("e2e-direct", f"{self.tag}-{i}")
        msg = SlackMessage(
            message_id=mid,
            pipeline="e2e-direct",
            channel=channel,
            text=text,
            blocks=json.dumps([{"type": "section", "text": {"type": "mrkdwn", "text": text}}]),
            org_id="org-00",
            source_event_id=f"{self.tag}-direct-{i}",
            created_at=datetime.now(UTC),
        )
        return msg, Expect(
            f"slack message {mid} to {channel}",
            "delivered",
            "direct",
            message_id=mid,
            channel=channel,
        )

    def produce_slack_messages(self, items: Sequence[tuple[SlackMessage, Expect]]) -> None:
        enc = AvroSerializer(self.test_registry, SlackMessage)
        topic = self.topics.slack_messages
        for msg, expect in items:
            self._produce(topic, msg.channel.encode(), enc(topic, msg))
            self.audit.add(replace(expect, entered_at=time.time()))
        self.flush()

    # -- running a stream --------------------------------------------------------------------
    def stream(self, spec: StreamSpec, rng: Random, faults: Sequence[Fault] = ()) -> None:
        """Feed ``spec`` over ``spec.duration_s`` while running ``faults`` at their times
        (each ``(seconds from the start, label, callable)``, run on this thread in order).

        The input is fed from a thread of its own, so the load stays steady while a fault
        takes its time (a rolling restart waits for readiness, a broker restart for the ISR);
        the fault window (``fault_window``) runs from the first fault's start to the last
        one's end."""
        t0 = datetime.now(UTC)
        rows = self.onboarding_rows(rng, spec.rows, t0, spec.duration_s)
        if spec.poison:
            rows.append(self.bad_row(t0 + timedelta(seconds=spec.duration_s / 2)))
        self.write_warehouse(rows)
        actions: list[Action] = []
        kinds = ["kept", "kept", "not_from_provisioning", "kept", "not_failed"]
        batches = max(1, int(spec.duration_s))

        def kind() -> str:
            if spec.kept_share is None:
                return rng.choice(kinds)
            if rng.random() < spec.kept_share:
                return "kept"
            return rng.choice(["not_from_provisioning", "not_failed"])

        events = [self.connector_event(rng.choice(ORG_IDS), kind()) for _ in range(spec.connectors)]
        for b in range(batches):
            chunk = events[b::batches]
            if chunk:
                actions.append(
                    Action(
                        b * spec.duration_s / batches,
                        "connectors",
                        lambda c=chunk: self.produce_connectors(c),
                    )
                )
        if spec.poison:
            poison = self.poison_records()
            half = len(poison) // 2
            actions.append(
                Action(spec.duration_s * 0.3, "poison", lambda: self.produce_poison(poison[:half]))
            )
            actions.append(
                Action(spec.duration_s * 0.7, "poison", lambda: self.produce_poison(poison[half:]))
            )
        start = time.monotonic()
        feeder = _Feeder(sorted(actions), start, self.log)
        feeder.start()
        for action in sorted(Action(at, label, run) for at, label, run in faults):
            wait = start + action.at_s - time.monotonic()
            if wait > 0:
                self.fleet.sleep(wait)
            self.log(f"t={time.monotonic() - start:5.1f}s {action.label}")
            began = time.time()
            action.run()
            self.log(f"t={time.monotonic() - start:5.1f}s {action.label}: done")
            self.widen_fault_window(began, time.time())
        rest = start + spec.duration_s - time.monotonic()
        if rest > 0:
            self.fleet.sleep(rest)
        while feeder.is_alive():  # keep supervising while the last input is acknowledged
            self.fleet.sleep(0.2)
        feeder.join()
        if feeder.error is not None:
            raise feeder.error

    def widen_fault_window(self, began: float, ended: float) -> None:
        """Count ``[began, ended]`` (epoch seconds) as time under a fault."""
        if self.fault_window is not None:
            began = min(began, self.fault_window[0])
            ended = max(ended, self.fault_window[1])
        self.fault_window = (began, ended)

    def kill_notifier_mid_post(
        self, wait_s: float = 20.0, *, replace_pod: bool = False, delay_s: float = 6.0
    ) -> bool:
        """Hold Slack's next answer per channel (the post is stored at once) and ``kill -9``
        a notifier pod while it waits for one: whoever takes the partition next finds the
        post in doubt. With ``replace_pod`` the pod does not come back (a new pod with an
        empty state directory replaces it), else it restarts in place. True when a post was
        caught in flight (else some notifier is killed after ``wait_s`` anyway)."""
        pods = {p.name for p in self.fleet.pods("notifier")}
        for channel in DELIVERABLE_CHANNELS:
            # per channel, not for every channel: Slack must keep refusing GONE_CHANNEL
            self.slack.slow(channel, delay_s=delay_s, times=1, then_store=True)
        deadline = time.monotonic() + wait_s
        victim = None
        while victim is None and time.monotonic() < deadline:
            self.fleet.tick()
            held = [c.client for c in self.slack.held() if c.method == "chat.postMessage"]
            victim = next((c for c in held if c in pods), None)
            time.sleep(0.02)
        caught = victim is not None
        victim = victim or sorted(pods)[0]
        if replace_pod:
            new = self.fleet.replace_pod(victim).name
            how = f"replaced by {new}"
        else:
            self.fleet.kill9(victim)
            how = "restarted in place"
        self.log(f"{victim} killed {'mid-post' if caught else 'with no post in flight'}, {how}")
        return caught

    def count_logs(self, service: str, msg: str) -> int:
        """Log lines of every run of every pod of ``service`` whose message is ``msg``."""
        return sum(
            1
            for svc in self.fleet.every_pod(service)
            for i in range(len(svc.log_files))
            for r in svc.log_records(i)
            if r.get("msg") == msg
        )

    def log(self, text: str) -> None:
        """A line of the scenario's timeline (``+seconds`` since the world was set up)."""
        with (self.tmp / "timeline.log").open("a") as f:
            f.write(f"+{time.time() - self.started_wall:6.1f}s {text}\n")

    # -- the verdict -------------------------------------------------------------------------
    def finish(
        self,
        *,
        timeout_s: float = 150.0,
        settle_s: float = 4.0,
        allow_exits: bool = False,
        notes: Iterable[str] = (),
    ) -> Report:
        """Wait for every outcome, settle, stop gracefully, audit, grep logs for secrets."""
        last: list[str] = []
        next_check = 0.0

        def done() -> bool:
            # an observation decodes everything read so far: with a large stream (the soak)
            # it costs seconds, so it runs at most a third of the time
            nonlocal last, next_check
            if time.monotonic() < next_check:
                return False
            began = time.monotonic()
            last = self.audit.pending(self.audit.observe(self))
            next_check = time.monotonic() + 2 * (time.monotonic() - began)
            return not last

        # on a timeout the report below names what is missing
        with contextlib.suppress(AssertionError):
            self.fleet.wait_for(done, timeout_s, "every input to be accounted for")
        self.fleet.sleep(settle_s)
        codes = self.fleet.stop_all()
        # a pod left running by a surge is being deleted: it gets its SIGTERM now
        leftovers = {p.name: p.terminate() for p in self.fleet.retired if p.alive()}
        obs = self.audit.observe(self)
        report = self.audit.report(obs, self.name, self.fault_window)
        report.seconds = time.monotonic() - self.started
        report.notes.extend(notes)
        for name, code in {**codes, **leftovers}.items():
            if code != 0:
                report.problems.append(f"{name} exited {code} on SIGTERM (expected 0)")
        for ex in self.fleet.exits:
            if allow_exits:
                report.notes.append("restarted: " + ex.describe())
            else:
                report.problems.append(ex.describe())
        report.problems.extend(self.secret_leaks())
        report.notes.extend(self.who_posted_twice(obs))
        SUMMARY.append(report)
        return report

    def who_posted_twice(self, obs: Observed) -> list[str]:
        """For each message posted more than once: which pod posted it when (the evidence a
        duplicate needs), from the fake Slack's calls."""
        out = []
        calls = [
            c
            for c in self.slack.calls(method="chat.postMessage")
            if c.status == 200 or c.behaviour == "slow"
        ]
        for mid, posts in obs.posts.items():
            if len(posts) < 2:
                continue
            by = [
                f"{c.client} at +{c.at - self.started_wall:.1f}s"
                + (" (answer held back)" if c.behaviour == "slow" else "")
                for c in calls
                if mid in json.dumps(c.params.get("metadata"))
            ]
            out.append(f"message {mid} posted by " + ", ".join(by))
        return out

    def secret_leaks(self, extra: Iterable[ServiceProcess] = ()) -> list[str]:
        leaks = []
        for svc in [*self.fleet.every_pod(), *extra]:
            for path in svc.log_files:
                text = path.read_text(errors="replace") if path.exists() else ""
                for secret in self.secrets:
                    if secret and secret in text:
                        leaks.append(f"secret {secret[:4]}… appears in {path.name}")
        return leaks


@contextlib.contextmanager
def proxy(target_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A ``TcpProxy`` in front of an HTTP URL; yields it and the URL through it (down)."""
    from urllib.parse import urlsplit

    parts = urlsplit(target_url)
    assert parts.hostname and parts.port
    p = TcpProxy(parts.hostname, parts.port)
    url = parts._replace(netloc=f"127.0.0.1:{p.port}").geturl()
    try:
        yield p, url
    finally:
        p.down()


def out_of_sync(bootstrap: str, topics: Iterable[str]) -> list[str]:
    """``topic-partition`` of every partition whose ISR is not all of its replicas (or that
    has no leader); empty when the cluster is healthy for ``topics``."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    admin = AdminClient({**client_config(bootstrap), "log_level": 0})
    md = admin.list_topics(timeout=15)
    lagging = []
    for name in topics:
        meta = md.topics.get(name)
        if meta is None or meta.error is not None:
            lagging.append(f"{name} (no metadata)")
            continue
        for p in meta.partitions.values():
            if p.leader < 0 or sorted(p.isrs) != sorted(p.replicas):
                lagging.append(f"{name}-{p.id}")
    return lagging


def kafka_reachable(bootstrap: str, timeout_s: float = 5.0) -> bool:
    c = Consumer({**client_config(bootstrap), "group.id": unique("probe"), "log_level": 0})
    try:
        c.list_topics(timeout=timeout_s)
        return True
    except KafkaException:
        return False
    finally:
        c.close()
