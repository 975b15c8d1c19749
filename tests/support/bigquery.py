"""One BigQuery emulator (goccy/bigquery-emulator) per test session, on free loopback ports.

The emulator's memory grows with every query, so a session shares one process; each test uses
its own table. Test modules wrap ``shared_emulator`` in a session fixture of their own (a
fixture imported into several modules would otherwise be instantiated once per module):

    @pytest.fixture(scope="session")
    def emulator(tmp_path_factory):
        with shared_emulator(tmp_path_factory) as emu:
            yield emu

The binary, in this order: ``$TEST_BIGQUERY_EMULATOR_BIN``; the cache of deploy/local/stack.sh
(``$STACK_CACHE_DIR``, default ``deploy/local/.cache``, ``bin/bigquery-emulator``); otherwise
it is built into that cache from the Go module in deploy/local/bigquery-emulator exactly as
stack.sh builds it (10-15 minutes on 2 cores when the Go module cache is cold). Running the
cached binary directly avoids ``stack.sh up --with-bigquery``, which would start a second
Kafka and registry next to the session's.
``TEST_BIGQUERY_API_ENDPOINT`` (+ ``TEST_BIGQUERY_PROJECT``, ``TEST_BIGQUERY_DATASET``)
reuses an already running emulator instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "deploy" / "local" / "bigquery-emulator"


def _default_cache_dir() -> Path:
    # the same default as deploy/local/stack.sh: the user's cache dir (a relative
    # XDG_CACHE_HOME is ignored, as the XDG spec says), shared by every clone on the machine
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg.startswith("/") else Path.home() / ".cache"
    return base / "field-alerts"


DEFAULT_CACHE_DIR = _default_cache_dir()
PROJECT = "test-project"
DATASET = "alerts"
EMULATOR_PACKAGE = "github.com/goccy/bigquery-emulator/cmd/bigquery-emulator"

ONBOARDING_SCHEMA = [
    bigquery.SchemaField("org_id", "STRING"),
    bigquery.SchemaField("org_name", "STRING"),
    bigquery.SchemaField("plan", "STRING"),
    bigquery.SchemaField("cloud", "STRING"),
    bigquery.SchemaField("started_at", "TIMESTAMP"),
]


@dataclass
class BigQueryEmulator:
    """A running emulator: its endpoint, project and dataset; helpers for test tables."""

    endpoint: str
    project: str = PROJECT
    dataset: str = DATASET
    process: subprocess.Popen[bytes] | None = None
    log_file: BinaryIO | None = None
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """A google-cloud-bigquery client for the emulator (shared, anonymous)."""
        if self._client is None:
            self._client = bigquery.Client(
                project=self.project,
                client_options=ClientOptions(api_endpoint=self.endpoint),
                credentials=AnonymousCredentials(),
            )
        return self._client

    def create_table(
        self, name: str, schema: Sequence[bigquery.SchemaField] = ONBOARDING_SCHEMA
    ) -> str:
        """Create ``<dataset>.<name>`` through the API; return ``<dataset>.<name>``."""
        table = bigquery.Table(f"{self.project}.{self.dataset}.{name}", schema=list(schema))
        self.client().create_table(table)
        return f"{self.dataset}.{name}"

    def insert_rows(self, table: str, rows: Sequence[dict[str, object]]) -> None:
        """Streaming inserts (``tabledata.insertAll``), chunked; datetimes as ISO 8601."""
        full = f"{self.project}.{table}"
        for start in range(0, len(rows), 10_000):
            chunk = [
                {k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()}
                for r in rows[start : start + 10_000]
            ]
            errors = self.client().insert_rows_json(full, chunk)
            if errors:
                raise AssertionError(f"insert into {full} failed: {errors[:3]}")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def _cache_dir() -> Path:
    return Path(os.environ.get("STACK_CACHE_DIR") or DEFAULT_CACHE_DIR).resolve()


def _wanted_version() -> str | None:
    """The emulator version deploy/local/bigquery-emulator/go.mod requires."""
    go_mod = MODULE_DIR / "go.mod"
    if not go_mod.exists():
        return None
    for line in go_mod.read_text().splitlines():
        words = line.split()
        if "github.com/goccy/bigquery-emulator" in words:
            return words[words.index("github.com/goccy/bigquery-emulator") + 1]
    return None


def _cached(binary: Path, version: str | None) -> bool:
    marker = binary.with_name(binary.name + ".version")
    if not binary.exists():
        return False
    return version is None or (marker.exists() and marker.read_text().strip() == version)


def emulator_binary(build_log: Path | None = None) -> Path:
    """The emulator binary of stack.sh's cache, built there (as stack.sh does) if missing.

    The cache layout and the build are deploy/local/stack.sh's (``fetch_bigquery``): the
    binary at ``<cache>/bin/bigquery-emulator`` with a ``.version`` marker, built from a copy of
    the Go module with ``CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath``, under the cache's
    ``.lock`` so a concurrent ``stack.sh up --with-bigquery`` does not build it twice.
    """
    explicit = os.environ.get("TEST_BIGQUERY_EMULATOR_BIN")
    if explicit:
        return Path(explicit)
    cache = _cache_dir()
    binary = cache / "bin" / "bigquery-emulator"
    version = _wanted_version()
    if _cached(binary, version):
        return binary
    go = shutil.which("go")
    if go is None or version is None:
        raise RuntimeError(
            f"BigQuery emulator not found at {binary} and it cannot be built "
            f"(go on PATH: {bool(go)}, version in {MODULE_DIR}/go.mod: {version}); run "
            "`deploy/local/stack.sh up --with-bigquery` once or set TEST_BIGQUERY_EMULATOR_BIN"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached(binary, version):  # built by someone else while we waited
            return binary
        binary.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as src:
            # a copy: `-mod=mod` may rewrite go.mod/go.sum, which must not touch the repository
            for name in ("go.mod", "go.sum", "tools.go"):
                shutil.copy(MODULE_DIR / name, Path(src) / name)
            partial = binary.with_name(binary.name + ".partial")
            with open(build_log or os.devnull, "wb") as out:
                subprocess.run(
                    [go, "build", "-trimpath", "-o", str(partial), EMULATOR_PACKAGE],
                    cwd=src,
                    env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod"),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=1800,
                )
            partial.replace(binary)
            binary.with_name(binary.name + ".version").write_text(version + "\n")
    return binary


def start_emulator(log_dir: Path, *, timeout_s: float = 120.0) -> BigQueryEmulator:
    """Start the emulator on free loopback ports and wait until its REST API answers."""
    binary = emulator_binary(log_dir / "build.log")
    port, grpc_port = free_port(), free_port()
    log_path = log_dir / "bigquery-emulator.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed by BigQueryEmulator.stop
    proc = subprocess.Popen(
        [
            str(binary),
            f"--project={PROJECT}",
            f"--dataset={DATASET}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--grpc-port={grpc_port}",
            "--log-level=error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    emu = BigQueryEmulator(endpoint=f"http://127.0.0.1:{port}", process=proc, log_file=log)
    url = f"{emu.endpoint}/bigquery/v2/projects/{PROJECT}/datasets"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            emu.stop()
            raise RuntimeError(f"BigQuery emulator exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return emu
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            emu.stop()
            raise RuntimeError(f"BigQuery emulator did not answer at {url} in {timeout_s}s")
        time.sleep(0.2)


_lock = threading.Lock()
_shared: BigQueryEmulator | None = None
_users = 0


@contextlib.contextmanager
def shared_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    """The session's emulator: started by the first user, stopped when the last one leaves."""
    global _shared, _users
    with _lock:
        if _shared is None:
            endpoint = os.environ.get("TEST_BIGQUERY_API_ENDPOINT")
            if endpoint:
                _shared = BigQueryEmulator(
                    endpoint=endpoint,
                    project=os.environ.get("TEST_BIGQUERY_PROJECT", PROJECT),
                    dataset=os.environ.get("TEST_BIGQUERY_DATASET", DATASET),
                )
            else:
                _shared = start_emulator(tmp_path_factory.mktemp("bigquery"))
        _users += 1
        emu = _shared
    try:
        yield emu
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _shared is not None:
                _shared.stop()
                _shared = None
