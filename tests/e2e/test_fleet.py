"""The pipeline as production runs it: Deployments of replicas on a three-broker cluster.

Every scenario runs 2 enrichers, 2 notifiers and 1 producer (``World(replicas=...)``: one pod
per replica, static group membership and transactional ids derived from the pod name, an
``emptyDir`` state directory per pod, as ``deploy/k8s/base`` sets them) against this module's
own ``stack.sh up --brokers 3`` cluster (replication factor 3, ``min.insync.replicas=2``),
under a steady load, and injects one kind of fault the fleet meets in production: rolling
updates, pods killed with Slack posts in flight, a broker down for a minute and a rolling
broker upgrade, replicas stalled past their session timeout (zombies), a schema registry
outage, Slack 429/5xx storms during a rebalance.

Each ends with the audit of ``tests/e2e/harness.py`` (the summary table's row): every input
accounted for, no duplicate Slack post, no record twice in the ``read_committed`` view of
``slack-messages`` or ``onboarding-events``, and the longest end-to-end delay of the inputs
that entered during the fault.

The cluster is the module's own (``cluster`` in ``tests/e2e/conftest.py``; set
``TEST_FLEET_STACK_DIR`` to reuse a running one while iterating).
"""

from __future__ import annotations

from pathlib import Path
from random import Random

import pytest

from tests.e2e.harness import (
    BROKERS,
    RegistryProxy,
    StreamSpec,
    World,
    out_of_sync,
)
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.fleet, pytest.mark.timeout(900)]

#: the production shape (deploy/k8s/base: enricher 2 replicas; notifier scaled to 2)
REPLICAS = {"enricher": 2, "notifier": 2, "producer": 1}
#: the services' group session timeout in these scenarios (World sets it)
SESSION_TIMEOUT_S = 6.0


def fleet_world(
    name: str,
    tmp: Path,
    env: dict[str, str],
    *,
    service_registry_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> World:
    return World(
        name,
        tmp,
        env,
        replicas=REPLICAS,
        service_registry_url=service_registry_url,
        extra_env=extra_env,
    )


def wait_in_sync(w: World, timeout_s: float = 180.0) -> None:
    """Every partition of the scenario's topics (and the offsets and transaction state
    topics) led and fully replicated again."""
    topics = [s.name for s in w.topics.all_specs()] + ["__consumer_offsets"]
    last: list[str] = []

    def healthy() -> bool:
        nonlocal last
        last = out_of_sync(w.bootstrap, topics)
        return not last

    w.fleet.wait_for(healthy, timeout_s, "every partition in sync")


def test_rolling_restart_of_every_deployment(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """A release: the enricher and the notifier roll as their Deployments do (a new pod
    starts, becomes ready, then the old one gets SIGTERM: two instances overlap and the group
    rebalances twice per pod); the producer's new pod starts while the old one still runs (an
    eviction overlapping its Recreate rollout), so the new pod's transactional id must fence
    the old one: one writer of the cursor and the events."""
    codes: dict[str, int] = {}
    fenced: list[str] = []
    with fleet_world("fleet-rolling", tmp_path, cluster_env) as w:
        w.start()

        def roll(service: str) -> None:
            codes.update(w.fleet.rolling_restart(service))

        def producer_overlap() -> None:
            (old,) = w.fleet.pods("producer")
            old, new = w.fleet.surge(old.name)
            w.fleet.wait_ready(new.name)
            # the old pod is fenced the next time it writes: give it the time to find out
            w.fleet.wait_for(lambda: not old.alive(), 60, f"{old.name} to be fenced")
            fenced.append(f"{old.name} exited {old.returncode}: {old.error_line()}")

        # the producer first: its old pod finds out it is fenced only when it next writes,
        # so warehouse rows must still be coming (they spread over the whole stream)
        faults = [
            (5.0, "producer: a second instance starts", producer_overlap),
            (6.0, "rolling restart enricher", lambda: roll("enricher")),
            (7.0, "rolling restart notifier", lambda: roll("notifier")),
        ]
        w.stream(StreamSpec(duration_s=45, connectors=60, rows=30), Random(101), faults)
        report = w.finish(notes=[f"old pods stopped: {codes}", *fenced])
    report.assert_ok()
    assert codes and all(c == 0 for c in codes.values()), codes
    assert fenced, "the old producer kept running next to the new one"


def test_kill9_of_one_replica_of_each_with_slack_posts_in_flight(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """``kill -9`` of one replica of each service under load. The enricher and the producer
    restart in place (the kubelet restarts the container: same pod, same state, same
    transactional id). The notifier is killed while Slack holds the answer to one of its posts
    (Slack stored it) and its pod does not come back (node lost): after its session times out
    the surviving replica or the new pod takes the partition over, and must check Slack's
    history before posting again."""
    caught: list[bool] = []
    with fleet_world("fleet-kill9", tmp_path, cluster_env) as w:
        w.start()
        enricher, producer = w.fleet.pods("enricher")[0].name, w.fleet.pods("producer")[0].name
        faults = [
            (8.0, f"kill -9 {enricher}", lambda: w.fleet.kill9(enricher)),
            (
                12.0,
                "kill -9 a notifier mid-post",
                lambda: caught.append(w.kill_notifier_mid_post(replace_pod=True, delay_s=8.0)),
            ),
            (16.0, f"kill -9 {producer}", lambda: w.fleet.kill9(producer)),
        ]
        w.stream(StreamSpec(duration_s=40, connectors=60, rows=30), Random(202), faults)
        report = w.finish()
        found = w.count_logs("notifier", "in-doubt post found in the history, not posting again")
        report.notes.append(f"notifier: {found} in-doubt posts found in the history")
    report.assert_ok()
    assert caught == [True], "no notifier was killed with a post in flight"
    assert found >= 1, "the post in flight at the kill was not checked in the history"


def test_broker_down_for_a_minute_then_a_rolling_broker_restart(
    cluster: Stack, cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """Node 2 stops (gracefully) for 60 s while the load goes on: with replication factor 3
    and ``min.insync.replicas=2`` every write still commits. Then a rolling upgrade: each
    node in turn stops and starts, the next one only once every partition is in sync again."""
    with fleet_world("fleet-brokers", tmp_path, cluster_env) as w:
        w.start()
        wait_in_sync(w)

        def outage_then_roll() -> None:
            cluster.stop_broker(2)
            w.fleet.sleep(60)
            cluster.start_broker(2)
            wait_in_sync(w)
            for node in BROKERS:
                cluster.stop_broker(node)
                cluster.start_broker(node)
                wait_in_sync(w)

        # the load goes on about as long as the fault lasts (200-270 s on the loaded 2-core box)
        faults = [(5.0, "broker 2 down for 60 s, then every broker restarted", outage_then_roll)]
        w.stream(StreamSpec(duration_s=190, connectors=150, rows=50), Random(303), faults)
        # A static member may fence itself when its coordinator moves (its retried JoinGroup
        # lands after the first) and librdkafka reports a fatal consumer error: the loops go
        # on with a new consumer (libs.kafka.consumer.replace_fenced), so any exit is a
        # problem here (they used to exit for their pod to restart).
        report = w.finish(timeout_s=240)
    report.assert_ok()


def test_stalled_replicas_resume_as_fenced_zombies(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """One enricher and one notifier are SIGSTOPped (a frozen node) for well past their
    session timeout, so the group hands their partitions to the other replicas, then
    SIGCONTed: the resumed enricher may still hold an open transaction and the resumed
    notifier messages it had consumed. Neither may add anything: no record of the zombie in
    the ``read_committed`` view, no second Slack post."""
    stall_s = SESSION_TIMEOUT_S * 2.5
    with fleet_world("fleet-zombies", tmp_path, cluster_env) as w:
        w.start()
        enricher, notifier = w.fleet.pods("enricher")[0].name, w.fleet.pods("notifier")[0].name

        def stall() -> None:
            w.fleet.pause(enricher)
            w.fleet.pause(notifier)

        def resume() -> None:
            w.fleet.resume(enricher)
            w.fleet.resume(notifier)

        faults = [
            (8.0, f"SIGSTOP {enricher} and {notifier}", stall),
            (8.0 + stall_s, f"SIGCONT {enricher} and {notifier}", resume),
        ]
        w.stream(StreamSpec(duration_s=40, connectors=60, rows=30), Random(404), faults)
        report = w.finish()
    report.assert_ok()


def test_schema_registry_outage_of_30s(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """The registry answers 503 for 15 s, then accepts requests and answers nothing for 15 s.
    Running replicas have their schemas cached and go on; one enricher and one notifier
    restarted (kill -9) at the start of the outage must wait for the registry, unready, and
    neither crash-loop nor dead-letter anything for want of it."""
    proxy = RegistryProxy(cluster_env["SCHEMA_REGISTRY_URL"])
    try:
        with fleet_world(
            "fleet-registry", tmp_path, cluster_env, service_registry_url=proxy.url
        ) as w:
            w.start()
            enricher = w.fleet.pods("enricher")[0].name
            notifier = w.fleet.pods("notifier")[0].name

            def outage() -> None:
                proxy.set_mode("503")
                w.fleet.kill9(enricher)
                w.fleet.kill9(notifier)

            faults = [
                (8.0, "registry answers 503; kill -9 an enricher and a notifier", outage),
                (23.0, "registry hangs", lambda: proxy.set_mode("hang")),
                (38.0, "registry back", lambda: proxy.set_mode("pass")),
            ]
            w.stream(StreamSpec(duration_s=50, connectors=60, rows=30), Random(505), faults)
            report = w.finish(timeout_s=240)
            report.notes.append(f"registry proxy answered {dict(proxy.answered)}")
    finally:
        proxy.close()
    report.assert_ok()
    assert proxy.answered["503"] > 0, "nobody asked the registry during the outage"


def test_slack_storms_during_a_notifier_rebalance(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """Slack answers a storm of 429s, then of 500s and 503s, while the notifier Deployment
    rolls (its partitions move twice per pod): every alert is delivered once."""
    env = {"NOTIFIER_MAX_ATTEMPTS": "12"}
    with fleet_world("fleet-slack-storms", tmp_path, cluster_env, extra_env=env) as w:
        w.start()

        def storms_and_roll() -> None:
            w.slack.rate_limit(None, retry_after_s=1, times=30)
            w.slack.server_error(None, 500, times=10)
            w.slack.server_error(None, 503, error="service_unavailable", times=10)
            w.fleet.rolling_restart("notifier")

        faults = [(5.0, "429/500/503 storms + rolling restart notifier", storms_and_roll)]
        w.stream(StreamSpec(duration_s=40, connectors=60, rows=30), Random(606), faults)
        report = w.finish(timeout_s=240)
        posts = w.slack.calls(method="chat.postMessage")
        answered = {c: sum(1 for p in posts if p.status == c) for c in (200, 429, 500, 503)}
        report.notes.append(f"Slack answered chat.postMessage {answered}")
    report.assert_ok()
    assert answered[429] >= 30 and answered[500] >= 10 and answered[503] >= 10, answered
