"""On a stack of our own (``stack.sh up --with-sasl``): the services over the SASL_SSL/PLAIN
listener with credentials from their settings, a wrong password failing fast and clearly, and
the broker killed and restarted in the middle of a stream.

The stack is this module's alone because its broker is stopped and started again; its SASL
password is random for the session so that a grep of every captured log for it means
something. The harness's own clients (seeding, reading back) use the plain listener.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random

import pytest

from tests.e2e.harness import (
    SERVICES,
    SUMMARY,
    Exit,
    Report,
    ServiceProcess,
    StreamSpec,
    World,
    kafka_reachable,
)
from tests.support.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SASL_USER = "e2e-alerts"


@dataclass
class OwnStack:
    """This module's stack, its broker and its SASL password."""

    stack: Stack
    broker: Broker
    password: str

    @property
    def env(self) -> dict[str, str]:
        return self.stack.env


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    password = f"sasl-{uuid.uuid4().hex}"
    saved = {k: os.environ.get(k) for k in ("STACK_SASL_USERNAME", "STACK_SASL_PASSWORD")}
    # start_stack passes the environment on to stack.sh; these two are read by --with-sasl
    os.environ.update({"STACK_SASL_USERNAME": SASL_USER, "STACK_SASL_PASSWORD": password})
    try:
        stack = start_stack(tmp_path_factory.mktemp("sasl-stack"), "--with-sasl")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    broker = Broker(stack)
    try:
        yield OwnStack(stack, broker, password)
    finally:
        stack.down()
        broker.reap()


def sasl_env(own: OwnStack, password: str | None = None) -> dict[str, str]:
    """The services' Kafka settings for the SASL_SSL listener."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": own.env["STACK_KAFKA_SASL_BOOTSTRAP"],
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": SASL_USER,
        "KAFKA_SASL_PASSWORD": password or own.password,
        "KAFKA_SSL_CA_LOCATION": own.env["STACK_KAFKA_SSL_CA_LOCATION"],
    }


class Broker:
    """The Kafka process of a stack of our own: killed, then started again in place with the
    command line, working directory and log it had (``stack.sh`` has no single-component
    restart, and ``down``/``up`` would also restart the registry, whose in-memory storage
    would give every schema a new id). The pid file is rewritten so ``stack.sh down`` stops
    the new process."""

    def __init__(self, stack: Stack) -> None:
        self.pid_file = stack.state_dir / "pids" / "kafka.pid"
        self.log = stack.state_dir / "logs" / "kafka.log"
        self.bootstrap = stack.bootstrap
        self.children: list[subprocess.Popen[bytes]] = []
        self._cmd: list[bytes] = []
        self._cwd = ""

    def pid(self) -> int:
        return int(self.pid_file.read_text().split()[0])

    def started_count(self) -> int:
        return self.log.read_text(errors="replace").count("Kafka Server started")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        pid = self.pid()
        self._cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        self._cwd = os.readlink(f"/proc/{pid}/cwd")
        os.killpg(pid, sig)  # stack.sh's launcher makes the broker a process group leader
        for child in self.children:
            if child.pid == pid:
                child.wait(60)
        deadline = time.monotonic() + 60
        while _running(pid):
            assert time.monotonic() < deadline, f"broker {pid} did not stop"
            time.sleep(0.1)

    def start(self) -> None:
        assert self._cmd, "kill() first"
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                self._cmd,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append(proc)
        lstart = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.pid_file.write_text(f"{proc.pid}\n{lstart}\n")

    def wait_ready(self, started_before: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.started_count() > started_before and kafka_reachable(self.bootstrap, 2)):
            assert time.monotonic() < deadline, f"broker not back after {timeout_s}s"
            time.sleep(0.2)

    def reap(self) -> None:
        for child in self.children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_services_over_sasl_ssl(own: OwnStack, tmp_path: Path) -> None:
    """The three services talk to Kafka only through the SASL_SSL listener, with the
    credentials and CA from their settings; the pipeline keeps its promise there too."""
    password = own.password
    with World(
        "sasl-ssl",
        tmp_path,
        own.env,
        kafka_env=sasl_env(own),
        secrets=[password],
    ) as w:
        w.start()
        w.stream(StreamSpec(duration_s=10, connectors=24, rows=10), Random(21))
        report = w.finish()
        started = {
            svc: next(
                r["kafka"]
                for r in w.fleet[svc].log_records(0)
                if str(r.get("msg", "")).endswith("starting") and "kafka" in r
            )
            for svc in SERVICES
        }
    report.assert_ok()
    for svc, kafka in started.items():
        assert kafka["security.protocol"] == "SASL_SSL", (svc, kafka)
        assert kafka["bootstrap.servers"] == own.env["STACK_KAFKA_SASL_BOOTSTRAP"]
        assert kafka["sasl.password"] == "********", (svc, kafka)


@dataclass
class WrongPasswordRun:
    """The three services started once with a wrong SASL password, and how each ended."""

    exits: dict[str, tuple[int | None, float]]
    #: the service's own (structured) log line naming the authentication failure, if any
    own_lines: dict[str, str | None]
    #: any captured line naming it (librdkafka writes its own, unstructured, to stderr)
    any_lines: dict[str, str | None]
    leaks: list[str]
    report: Report


WRONG_PASSWORD_LIMIT_S = 90.0


@pytest.fixture(scope="module")
def wrong_password_run(own: OwnStack, tmp_path_factory: pytest.TempPathFactory) -> WrongPasswordRun:
    wrong = f"wrong-{uuid.uuid4().hex}"
    with World(
        "sasl-wrong-password",
        tmp_path_factory.mktemp("wrong-password"),
        own.env,
        kafka_env=sasl_env(own, password=wrong),
        secrets=[own.password, wrong],
        restart_on_exit=False,
    ) as w:
        started = time.monotonic()
        w.fleet.start()
        exits: dict[str, tuple[int | None, float]] = {}
        while len(exits) < len(SERVICES) and time.monotonic() - started < WRONG_PASSWORD_LIMIT_S:
            for svc in SERVICES:
                code = w.fleet[svc].returncode
                if svc not in exits and code is not None:
                    exits[svc] = (code, time.monotonic() - started)
            time.sleep(0.1)
        for svc in SERVICES:
            exits.setdefault(svc, (None, WRONG_PASSWORD_LIMIT_S))
        own_lines = {s: _auth_line(w.fleet[s], structured=True) for s in SERVICES}
        any_lines = {s: _auth_line(w.fleet[s], structured=False) for s in SERVICES}
        report = Report("sasl-wrong-password", seconds=time.monotonic() - started)
        for svc in SERVICES:
            code, after = exits[svc]
            line = own_lines[svc] or f"(only librdkafka's) {any_lines[svc] or '-'}"
            report.notes.append(f"{svc}: exit {code} after {after:.1f}s; {line[:150]}")
        run = WrongPasswordRun(exits, own_lines, any_lines, w.secret_leaks(), report)
        report.problems += run.leaks
        SUMMARY.append(report)
        return run


def test_wrong_password_exits_nonzero_in_bounded_time(wrong_password_run: WrongPasswordRun) -> None:
    """Each service given a wrong SASL password exits non-zero within a bounded time, the
    captured output names the authentication failure, and neither password is logged."""
    run = wrong_password_run
    assert not run.leaks, run.leaks
    for svc, (code, _) in run.exits.items():
        assert code is not None, f"{svc} still running after {WRONG_PASSWORD_LIMIT_S:.0f}s"
        assert code != 0, f"{svc} exited 0 with a wrong password"
        assert run.any_lines[svc], f"{svc}: nothing in its output names the authentication failure"


def test_wrong_password_fails_fast_with_its_own_clear_error(
    wrong_password_run: WrongPasswordRun,
) -> None:
    """What an operator needs: the service stops within seconds and its own (JSON) error line
    says the Kafka credentials were rejected."""
    for svc, (_, after) in wrong_password_run.exits.items():
        assert after <= 15.0, f"{svc} took {after:.0f}s to give up"
        assert wrong_password_run.own_lines[svc], f"{svc}: its error line does not say why"


def _auth_line(svc: ServiceProcess, *, structured: bool) -> str | None:
    if structured:
        for rec in svc.log_records():
            # the service's own line: librdkafka's (now JSON too) must not stand in for it
            if rec.get("level") not in ("ERROR", "CRITICAL") or rec.get("logger") == "librdkafka":
                continue
            text = f"{rec.get('msg', '')} {rec.get('error', '')} {rec.get('exc', '')}"
            if "authentication" in text.lower():
                return " ".join(text.split())
        return None
    for line in svc.log_text().splitlines():
        if "authentication" in line.lower():
            return line.strip()
    return None


@dataclass
class BrokerRestartRun:
    report: Report
    exits: list[Exit]


@pytest.fixture(scope="module")
def broker_restart_run(own: OwnStack, tmp_path_factory: pytest.TempPathFactory) -> BrokerRestartRun:
    """SIGKILL of the Kafka broker a quarter into a stream over SASL_SSL, 8 s down, started
    again; the services are supervised as Kubernetes would (restart on exit, liveness probe)."""
    broker = own.broker
    outage = {"down_s": 8.0, "back_after_s": 0.0}
    errors: list[BaseException] = []

    with World(
        "broker-restart",
        tmp_path_factory.mktemp("broker-restart"),
        own.env,
        kafka_env=sasl_env(own),
        secrets=[own.password],
    ) as w:
        w.start()

        def restart_broker() -> None:
            try:
                before = broker.started_count()
                broker.kill(signal.SIGKILL)
                time.sleep(outage["down_s"])
                t = time.monotonic()
                broker.start()
                broker.wait_ready(before)
                outage["back_after_s"] = time.monotonic() - t
            except BaseException as exc:
                errors.append(exc)
                raise

        # in a thread: the stream goes on (and blocks on its acks) while the broker is away
        restarter = threading.Thread(target=restart_broker, daemon=True)
        spec = StreamSpec(duration_s=30, connectors=40, rows=20)
        w.stream(spec, Random(99), [(8.0, "kill -9 of the Kafka broker", restarter.start)])
        restarter.join(180)
        assert not restarter.is_alive() and not errors, errors
        report = w.finish(
            timeout_s=300,
            allow_exits=True,
            notes=[
                f"broker down {outage['down_s']:.0f}s, answering again "
                f"{outage['back_after_s']:.1f}s after its start"
            ],
        )
        return BrokerRestartRun(report, list(w.fleet.exits))


def test_broker_killed_and_restarted_mid_stream(broker_restart_run: BrokerRestartRun) -> None:
    """Every service rides the broker restart out or is restarted (on exit or by its liveness
    probe), and the audit still holds: nothing lost, nothing posted twice."""
    broker_restart_run.report.assert_ok()


def test_broker_restart_needs_no_service_restart(broker_restart_run: BrokerRestartRun) -> None:
    """The services ride out a broker restart by themselves: none exits or wedges. (After a
    broker restart librdkafka can block in send_offsets_to_transaction far past its timeout,
    #5456/#5511: the enricher's loop bounds the call and replaces the producer in place.)"""
    assert not broker_restart_run.exits, [e.describe() for e in broker_restart_run.exits]
