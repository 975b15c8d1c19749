"""The enricher shell's decision on decode failures: poison (dead letter) or retry later."""

from __future__ import annotations

import pytest

from libs.kafka import RetryLater
from libs.serde import DeserializationError, RegistryError
from services.enricher.handler import retry_if_registry_down as _retry_if_registry_down


class _HttpError(Exception):
    def __init__(self, status: int | None) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status_code = status


def _error(cause: BaseException | None) -> DeserializationError:
    exc = DeserializationError("cannot decode", topic="t", partition=0, offset=7)
    exc.__cause__ = cause
    return exc


def _registry_error(inner: BaseException) -> RegistryError:
    err = RegistryError("registry said no")
    err.__cause__ = inner
    return err


@pytest.mark.parametrize(
    ("cause", "unavailable"),
    [
        (None, False),  # corrupt bytes
        (EOFError("short read"), False),
        (_registry_error(_HttpError(404)), False),  # unknown schema id: the record's fault
        (_registry_error(_HttpError(422)), False),
        (_registry_error(_HttpError(500)), True),
        (_registry_error(_HttpError(503)), True),
        (_registry_error(_HttpError(429)), True),
        (_registry_error(_HttpError(408)), True),
        (_registry_error(_HttpError(401)), True),  # credentials rejected: not the record
        (_registry_error(_HttpError(403)), True),
        (_registry_error(ConnectionRefusedError("refused")), True),  # registry down
    ],
)
def test_registry_unavailable_vs_poison(cause: BaseException | None, unavailable: bool) -> None:
    exc = _error(cause)
    assert exc.registry_unavailable is unavailable
    if unavailable:
        with pytest.raises(RetryLater):
            _retry_if_registry_down(exc)
    else:
        _retry_if_registry_down(exc)  # returns: the caller re-raises it as poison


def test_loop_producer_reports_only_failed_deliveries_and_still_sees_them() -> None:
    """The enricher's loop producer skips success reports; a failed delivery still counts.

    No broker answers on port 1, so the record times out: its error must reach the
    ProducerClient (and so fail the checkpoint's flush) although success reports are off.
    """
    from types import SimpleNamespace
    from typing import Any

    from confluent_kafka import Producer

    from libs.kafka import DeliveryError, KafkaSettings
    from libs.kafka.producer import ProducerClient
    from services.enricher.app import Enricher
    from services.enricher.settings import EnricherSettings

    stand_in: Any = SimpleNamespace(
        _kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        _settings=EnricherSettings(group_id="g"),
        lifecycle=None,
    )
    conf = Enricher._loop_producer_config(stand_in, "enricher-test")
    assert conf["delivery.report.only.error"] is True
    conf = {k: v for k, v in conf.items() if k != "transactional.id"}
    conf.update({"message.timeout.ms": 300, "log_level": 0})
    client = ProducerClient(Producer(conf), timeout_s=30, transactional=False)
    client.produce("slack-messages", b"k", b"v")
    with pytest.raises(DeliveryError, match="slack-messages"):
        client.flush()


def test_prepare_creates_the_lifecycle_changelogs_only_when_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace
    from typing import Any

    from libs.kafka import KafkaSettings
    from libs.runtime import StartRefusedError
    from libs.state.errors import ChangelogTopicError
    from services.common.settings import TopicSettings
    from services.enricher import app
    from services.enricher.pipelines import PIPELINES
    from services.enricher.settings import EnricherSettings

    topics = TopicSettings(partitions=4, replication_factor=1)
    pipelines = {str(getattr(topics, p.source_topic_setting)): p for p in PIPELINES}
    calls: list[tuple[str, list[str], int]] = []

    def ensure(conf: Any, group: str, inputs: list[str], *, replication_factor: int) -> list[str]:
        calls.append((group, inputs, replication_factor))
        if group == "bad":
            raise ChangelogTopicError("changelog topic x has 2 partitions, fewer than the 4")
        return [f"{group}-{t}-changelog" for t in inputs]

    monkeypatch.setattr(app, "ensure_changelogs", ensure)

    def prepare(settings: EnricherSettings) -> None:
        stand_in: Any = SimpleNamespace(
            _topics=topics,
            _settings=settings,
            _pipelines=pipelines,
            _kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
            lifecycle=app.lifecycle_config(settings, PIPELINES),
        )
        app.Enricher.prepare(stand_in)

    prepare(EnricherSettings(group_id="g"))
    assert calls == [("g", list(pipelines), 1)]
    prepare(EnricherSettings(group_id="g", dedup_window_s=0, park_ttl_s=0))
    assert len(calls) == 1  # no lifecycle, no state, no changelogs
    with pytest.raises(StartRefusedError, match="fewer than the 4"):
        prepare(EnricherSettings(group_id="bad"))


def test_loop_producer_reports_successes_when_the_lifecycle_keeps_state() -> None:
    """With state, the changelog position after a commit comes from a success report.

    With failure reports only, the position stored with the local state never moved past the
    restore's end: every restart re-read all written since (libs.state.stores).
    """
    from types import SimpleNamespace
    from typing import Any

    from libs.kafka import KafkaSettings
    from services.enricher.app import Enricher
    from services.enricher.handler import LifecycleConfig
    from services.enricher.settings import EnricherSettings

    stand_in: Any = SimpleNamespace(
        _kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        _settings=EnricherSettings(group_id="g"),
        lifecycle=LifecycleConfig({"connector": 60_000}, 0),
    )
    conf = Enricher._loop_producer_config(stand_in, "enricher-test")
    assert not conf.get("delivery.report.only.error")


@pytest.mark.parametrize(
    ("guarantee", "interval_s", "linger_ms"),
    [
        ("exactly_once", 0.5, 100),  # invisible until the commit, which sends at once
        ("exactly_once", 0.05, 50),  # never longer than a checkpoint interval
        ("at_least_once", 0.5, 5),  # visible once acknowledged: the shared default
    ],
)
def test_loop_producer_lingers_only_within_a_transaction(
    guarantee: str, interval_s: float, linger_ms: int
) -> None:
    """With exactly-once the outputs wait for the commit anyway: batch them for longer."""
    from types import SimpleNamespace
    from typing import Any

    from libs.kafka import KafkaSettings
    from services.enricher.app import Enricher
    from services.enricher.settings import EnricherSettings

    stand_in: Any = SimpleNamespace(
        _kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
        _settings=EnricherSettings(
            group_id="g", processing_guarantee=guarantee, checkpoint_interval_s=interval_s
        ),
        lifecycle=None,
    )
    conf = Enricher._loop_producer_config(stand_in, "enricher-test")
    assert conf["linger.ms"] == linger_ms


def _rss_kb() -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_release_freed_heap_returns_what_glibc_kept_to_the_os() -> None:
    """What a cold table load leaves: many small C allocations freed, a few kept between them
    (librdkafka's and Python's buffers), so glibc cannot shrink its heap by itself and the
    process kept the load's peak as its resident set (1M keys: 278-288 MB after the throughput
    phase; 164 MB with the trim, tests/perf/ENRICHER.md enr10)."""
    import ctypes

    from services.enricher.app import release_freed_heap

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc: nothing to trim")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4000) for _ in range(20_000)]  # 80 MB below the mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 4000)  # resident
    kept = blocks[::100]  # one in a hundred survives: the heap's top cannot be cut off
    for i, b in enumerate(blocks):
        if i % 100:
            libc.free(b)
    freed_kb = 4000 * (len(blocks) - len(kept)) // 1024
    before = _rss_kb()
    assert release_freed_heap() is True
    after = _rss_kb()
    for b in kept:
        libc.free(b)
    assert before - after > freed_kb // 2, (before, after, freed_kb)


@pytest.mark.parametrize("tune", [True, False])
def test_bootstrap_releases_the_freed_heap_after_the_gate_then_tunes_malloc(
    monkeypatch: pytest.MonkeyPatch, tune: bool
) -> None:
    """The cold load runs with glibc's defaults (its peak as it was); the heap's trim and top
    pad are set after the trim, unless ``ENRICHER_MALLOC_TUNE`` is off."""
    from types import SimpleNamespace
    from typing import Any

    from services.enricher import app

    calls: list[str] = []
    monkeypatch.setattr(app, "bootstrap_all", lambda tables, stop: calls.append("gate"))
    monkeypatch.setattr(app, "release_freed_heap", lambda: bool(calls.append("trim")))
    monkeypatch.setattr(app, "tune_malloc", lambda: str(calls.append("tune")))
    dlq: Any = SimpleNamespace(flush=lambda timeout: calls.append("dlq flush"))
    settings = SimpleNamespace(malloc_tune=tune)
    stand_in: Any = SimpleNamespace(tables=(), _stop=None, _dlq_producer=dlq, _settings=settings)
    app.Enricher.bootstrap(stand_in)
    assert calls == ["gate", "dlq flush", "trim"] + (["tune"] if tune else [])
