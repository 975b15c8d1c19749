"""The headline soak (``make soak``, not part of ``make test``): a long stream through the fleet
(2 enrichers, 2 notifiers, 1 producer on the three-broker cluster) while every service has
replicas killed with ``kill -9`` at random and the brokers restart one after another; then the
same audit and summary row as every e2e scenario.

Settings (environment):

* ``SOAK_EVENTS`` (100000): connector status changes fed in (plus ``SOAK_ROWS`` warehouse
  rows, default 1 % of the events, and the poison records);
* ``SOAK_RATE`` (150): events per second, which sets the stream's length;
* ``SOAK_KEPT_SHARE`` (0.3): share of the events that become alerts (the rest are filtered,
  as most status changes are in production);
* ``SOAK_KILLS`` (20): ``kill -9`` per service, at random times and pods; one in four of them
  loses its pod (a new pod with an empty state directory replaces it), the others restart in
  place as the kubelet restarts a container;
* ``SOAK_BROKER_RESTARTS`` (3): broker restarts (nodes in turn, graceful stop then start,
  each waiting for every partition to be in sync again);
* ``SOAK_SEED`` (1): the random schedule.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from random import Random

import pytest

from tests.e2e.harness import BROKERS, SERVICES, Fault, StreamSpec, World, out_of_sync
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.soak, pytest.mark.timeout(0)]

REPLICAS = {"enricher": 2, "notifier": 2, "producer": 1}


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def test_soak(cluster: Stack, cluster_env: dict[str, str], tmp_path: Path) -> None:
    events = int(_setting("SOAK_EVENTS", 100_000))
    rate = _setting("SOAK_RATE", 150)
    kills = int(_setting("SOAK_KILLS", 20))
    broker_restarts = int(_setting("SOAK_BROKER_RESTARTS", 3))
    rows = int(_setting("SOAK_ROWS", max(1, events // 100)))
    rng = Random(int(_setting("SOAK_SEED", 1)))
    duration = max(60.0, events / rate)
    spec = StreamSpec(
        duration_s=duration,
        connectors=events,
        rows=rows,
        kept_share=_setting("SOAK_KEPT_SHARE", 0.3),
    )
    # the pipeline keeps up with the stream only if Slack does: the fake has no rate limit
    env = {"NOTIFIER_RATE_PER_CHANNEL_PER_S": "100", "NOTIFIER_RATE_BURST": "20"}
    done = {"kills": 0, "replaced": 0, "broker restarts": 0}
    with World("soak", tmp_path, cluster_env, replicas=REPLICAS, extra_env=env) as w:
        topics = [s.name for s in w.topics.all_specs()] + ["__consumer_offsets"]

        def kill(service: str, replace_pod: bool) -> None:
            victim = rng.choice(w.fleet.pods(service)).name
            if replace_pod:
                w.fleet.replace_pod(victim)
                done["replaced"] += 1
            else:
                w.fleet.kill9(victim)
            done["kills"] += 1

        # A broker restart takes ~30 s: it runs beside the kills (on a thread of its own that
        # touches no pod), one node at a time, so the kills keep their random times.
        broker_jobs: list[threading.Thread] = []
        broker_errors: list[BaseException] = []

        def restart_broker(node: int) -> None:
            for job in broker_jobs:
                while job.is_alive():
                    w.fleet.sleep(0.5)

            def run() -> None:
                try:
                    cluster.stop_broker(node)
                    cluster.start_broker(node)
                    deadline = time.monotonic() + 300
                    while out_of_sync(w.bootstrap, topics):
                        assert time.monotonic() < deadline, f"node {node}: ISR not full"
                        time.sleep(1)
                    done["broker restarts"] += 1
                except BaseException as exc:
                    broker_errors.append(exc)

            job = threading.Thread(target=run, name=f"restart-broker-{node}", daemon=True)
            job.start()
            broker_jobs.append(job)

        faults: list[Fault] = []
        for service in SERVICES:
            for i in range(kills):
                at = rng.uniform(5.0, duration - 5.0)
                replace_pod = i % 4 == 3
                faults.append(
                    (
                        at,
                        f"kill -9 {service}{' (pod lost)' if replace_pod else ''}",
                        lambda s=service, r=replace_pod: kill(s, r),
                    )
                )
        for i in range(broker_restarts):
            node = BROKERS[i % len(BROKERS)]
            at = duration * (i + 1) / (broker_restarts + 1)
            faults.append((at, f"restart broker {node}", lambda n=node: restart_broker(n)))

        w.start()
        w.stream(spec, rng, faults)
        for job in broker_jobs:
            while job.is_alive():
                w.fleet.sleep(0.5)
        assert not broker_errors, broker_errors
        # A broker restart moves group coordinators: a static member may fence itself, and
        # the loops go on with a new consumer, as in the fleet's broker-roll scenario; any
        # exit is a problem.
        report = w.finish(
            timeout_s=max(600.0, duration),
            notes=[
                f"{events} events at {rate:.0f}/s, {rows} warehouse rows; "
                f"{done['kills']} kill -9 ({kills} per service, {done['replaced']} pods lost), "
                f"{done['broker restarts']} broker restarts"
            ],
        )
    report.assert_ok()
    assert done["kills"] == kills * len(SERVICES)
    assert done["broker restarts"] == broker_restarts
