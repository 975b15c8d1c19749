"""The alert lifecycle against the real broker and registry: the enricher alone, its output read.

Five failures of one connector give one new message and four updates of it, a RUNNING change
a final (resolution) update, across a kill -9 whose local state is lost (restored from the
changelog); an onboarding whose owner and Slack user arrive after it goes to the owner, and
its fallback copy is updated to say so; a connector resolved before its owner arrives is not.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.serde import ConfluentSchemaRegistry, ConnectorStatusChanged, SlackMessage
from libs.state.changelog import changelog_topic
from services.enricher.core import message_id
from services.enricher.lifecycle import derived_id
from tests.integration.test_enricher import (
    CONNECTOR,
    FALLBACK,
    ONBOARDING,
    Harness,
    failure,
    onboarding,
    owner,
    slack_user,
)
from tests.support.kafka import consume_all, unique, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def h(
    bootstrap: str,
    registry: ConfluentSchemaRegistry,
    service_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[Harness]:
    yield Harness(bootstrap, registry, service_env, tmp_path)


def connector_failure(n: int, org: str) -> ConnectorStatusChanged:
    """The n-th failure of one connector (``lcc-A``), each with its own error."""
    return dataclasses.replace(
        failure(f"ev-{n}", org), connector_id="lcc-A", error_message=f"attempt {n}: auth failed"
    )


def _by_id(messages: list[SlackMessage]) -> dict[str, SlackMessage]:
    return {m.message_id: m for m in messages}


def test_five_failures_one_post_four_updates_resolved_across_a_lost_state(h: Harness) -> None:
    h.ensure_topics()
    h.owners([owner("org-1")])
    h.users([slack_user("owner-org-1@example.com", "U1")])
    env = {"ENRICHER_FALLBACK_CHANNEL": FALLBACK, "ENRICHER_TRANSACTIONAL_ID": unique("txn")}
    e = h.start(**env)
    e.wait_ready()
    h.events([connector_failure(1, "org-1"), connector_failure(2, "org-1")])
    first, second = sorted(h.wait_messages(2), key=lambda m: m.update_of or "")
    assert first.update_of is None and first.message_id == message_id(CONNECTOR, "ev-1")
    assert second.update_of == first.message_id and second.channel == "U1"
    wait_until(lambda: e.metric("enricher_open_groups") == 1, message="one open group")
    # both are committed (read_committed saw them), and so is the group in the changelog:
    # kill -9 and lose the local state, the restart restores it from the changelog
    e.kill()
    shutil.rmtree(h.tmp / "state" / "lifecycle")
    e = h.start(**env)
    try:
        e.wait_ready()
        h.events([connector_failure(n, "org-1") for n in (3, 4, 5)])
        msgs = h.wait_messages(5)
        originals = [m for m in msgs if m.update_of is None]
        assert originals == [first]  # one new message; four updates of it, in its channel
        updates = [m for m in msgs if m.update_of is not None]
        assert {m.update_of for m in updates} == {first.message_id}
        assert {m.channel for m in updates} == {"U1"}
        assert {m.message_id for m in updates} == {
            message_id(CONNECTOR, f"ev-{n}") for n in (2, 3, 4, 5)
        }
        last = _by_id(msgs)[message_id(CONNECTOR, "ev-5")]
        assert "Seen *5 times*" in last.blocks and "attempt 5: auth failed" in last.blocks

        running = dataclasses.replace(
            connector_failure(6, "org-1"),
            old_status="FAILED",
            new_status="RUNNING",
            error_message=None,
        )
        h.events([running])
        resolution = _by_id(h.wait_messages(6))[message_id(CONNECTOR, "ev-6")]
        assert resolution.update_of == first.message_id and resolution.channel == "U1"
        assert "Resolved" in resolution.blocks and "is RUNNING" in resolution.blocks
        assert "~" in resolution.blocks  # the suggested steps are struck
        wait_until(
            lambda: (
                e.metric("enricher_alert_updates_total", pipeline=CONNECTOR) == 3
                and e.metric("enricher_alert_resolutions_total", pipeline=CONNECTOR) == 1
                and e.metric("enricher_open_groups") == 0
            ),
            message="updates and the resolution counted",
        )
        # the group's records are in the compacted changelog (and deleted again: tombstones)
        changelog = changelog_topic(h.group, h.topics.data_notifications_pipeline)
        records = consume_all(h.bootstrap, changelog, timeout_s=10)
        assert any(r.key() and r.key().startswith(b"g/") and r.value() is None for r in records)
    finally:
        e.stop()


def test_owner_assigned_after_the_event_gets_the_alert(h: Harness) -> None:
    h.ensure_topics()
    e = h.start(ENRICHER_FALLBACK_CHANNEL=FALLBACK)
    try:
        e.wait_ready()
        h.events([onboarding("onb-1", "org-2")])
        [copy] = h.wait_messages(1)
        assert copy.channel == FALLBACK and copy.update_of is None
        assert copy.message_id == message_id(ONBOARDING, "onb-1")
        wait_until(lambda: e.metric("enricher_parked_events") == 1, message="parked")
        # the owner first (the Slack user still missing: the park moves to the e-mail)...
        h.owners([owner("org-2")])
        wait_until(
            lambda: e.metric("table_records_applied_total", table="csdr_assignment") >= 1,
            message="owner applied",
        )
        # ...then the Slack user: the alert goes to the owner, the copy says where it went
        h.users([slack_user("owner-org-2@example.com", "U2")])
        msgs = _by_id(h.wait_messages(3))
        dm = msgs[derived_id(ONBOARDING, "onb-1", "dm")]
        assert dm.channel == "U2" and dm.update_of is None and "Hi Jane" in dm.blocks
        rerouted = msgs[derived_id(ONBOARDING, "onb-1", "rerouted")]
        assert rerouted.update_of == copy.message_id and rerouted.channel == FALLBACK
        assert "Sent to <@U2>" in rerouted.blocks
        wait_until(
            lambda: (
                e.metric("enricher_park_hits_total", pipeline=ONBOARDING) == 1
                and e.metric("enricher_parked_events") == 0
            ),
            message="park hit counted",
        )
        # the group followed the DM: the next start of that org updates the DM
        h.events([onboarding("onb-2", "org-2")])
        update = _by_id(h.wait_messages(4))[message_id(ONBOARDING, "onb-2")]
        assert update.update_of == dm.message_id and update.channel == "U2"
    finally:
        e.stop()


def test_connector_resolved_before_its_owner_arrives_is_not_dmed(h: Harness) -> None:
    """Two connectors of an org without owner fail: both parked, fallback copies posted. One
    runs again (its copy says "Resolved"), then the owner arrives: only the other is DM'd.

    Failed before: the resolved connector's park stayed, and the owner got a DM about it with
    its copy's "Resolved" overwritten by "Sent to". Both parks wait under the org's id, so the
    one punctuation that routes the other's would route it too, in the same transaction:
    once the other's DM is committed, its absence is final.
    """
    h.ensure_topics()
    e = h.start(ENRICHER_FALLBACK_CHANNEL=FALLBACK)
    try:
        e.wait_ready()
        resolved, waiting = failure("ev-a1", "org-3"), failure("ev-b1", "org-3")
        h.events([resolved, waiting])
        copies = _by_id(h.wait_messages(2))
        copy = copies[message_id(CONNECTOR, "ev-a1")]
        assert copy.channel == FALLBACK
        wait_until(lambda: e.metric("enricher_parked_events") == 2, message="both parked")
        running = dataclasses.replace(
            resolved,
            event_id="ev-a2",
            old_status="FAILED",
            new_status="RUNNING",
            error_message=None,
        )
        h.events([running])
        done = _by_id(h.wait_messages(3))[message_id(CONNECTOR, "ev-a2")]
        assert done.update_of == copy.message_id and "Resolved" in done.blocks
        wait_until(
            lambda: (
                e.metric("enricher_alert_resolutions_total", pipeline=CONNECTOR) == 1
                and e.metric("enricher_parked_events") == 1
            ),
            message="resolved, its park gone",
        )
        # the Slack user first, then the owner: one punctuation routes the org's parks
        h.users([slack_user("owner-org-3@example.com", "U3")])
        wait_until(
            lambda: e.metric("table_records_applied_total", table="slack_users") >= 1,
            message="Slack user applied",
        )
        h.owners([owner("org-3")])
        dm = _by_id(h.wait_messages(5))[derived_id(CONNECTOR, "ev-b1", "dm")]
        assert dm.channel == "U3"
        wait_until(
            lambda: (
                e.metric("enricher_park_hits_total", pipeline=CONNECTOR) == 1
                and e.metric("enricher_parked_events") == 0
            ),
            message="the other park hit",
        )
        everything = _by_id(h.messages())
        assert derived_id(CONNECTOR, "ev-a1", "dm") not in everything
        assert not any(m.update_of == copy.message_id for m in everything.values() if m != done)
        assert len(everything) == 5  # 2 copies, the resolution, the other's DM and re-route
    finally:
        e.stop()


def test_stored_changelog_position_is_right_after_the_last_commit(h: Harness) -> None:
    """The position stored with the local state is the offset after the last changelog record.

    Failed before: the enricher's loop producer reported failed deliveries only, so the
    position never left the restore's end (every restart re-read all written since).
    """
    from confluent_kafka import Consumer, TopicPartition

    from libs.state.local import LocalStore

    h.ensure_topics()
    h.owners([owner("org-1")])
    h.users([slack_user("owner-org-1@example.com", "U1")])
    e = h.start(**{"ENRICHER_FALLBACK_CHANNEL": FALLBACK})
    try:
        e.wait_ready()
        h.events([connector_failure(n, "org-1") for n in (1, 2, 3)])
        h.wait_messages(3)
        wait_until(lambda: e.metric("enricher_open_groups") == 1, message="one open group")
    finally:
        e.stop()  # graceful: the last checkpoint commits, the stores close
    topic = h.topics.data_notifications_pipeline
    changelog = changelog_topic(h.group, topic)
    reader = Consumer({"bootstrap.servers": h.bootstrap, "group.id": unique("check")})
    try:
        ends = {
            p: reader.get_watermark_offsets(TopicPartition(changelog, p), timeout=10)[1]
            for p in range(3)
        }
    finally:
        reader.close()
    written = [p for p, end in ends.items() if end > 0]
    assert written, ends
    for p in written:
        store = LocalStore(
            h.tmp / "state" / "lifecycle" / f"{topic}-{p}", store="t", changelog=(changelog, p)
        )
        store.open()
        try:
            # the last record of the last transaction that wrote here, then its commit marker
            assert store.position == ends[p] - 1, (p, store.position, ends)
        finally:
            store.close()
