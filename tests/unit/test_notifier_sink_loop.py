"""The notifier's sink loop on the in-memory twins: deliveries, commits, rebalances, faults."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import KafkaError
from prometheus_client import REGISTRY

from libs.kafka import ClientCallTimeoutError, DeliveryError
from libs.kafka.redrive import HEADER_REDRIVEN_FROM
from libs.serde import SlackDeliveryReceipt
from services.notifier import core
from services.notifier.core import (
    AttemptMarker,
    Posted,
    PostOutcome,
    PostRequest,
    Rejected,
    RetryPolicy,
    Unavailable,
)
from services.notifier.markers import InMemoryAttemptLog
from services.notifier.slack import STORE_LATE, STORE_THEN_TIMEOUT, SlackWebNotifier
from tests.support.fake_slack import FakeSlack
from tests.support.kafka import wait_until
from tests.support.notifier_twins import (
    DLQ,
    RECEIPTS,
    TOPIC,
    MemoryReceiptTable,
    SinkRig,
    message,
    update,
)

pytestmark = pytest.mark.timeout(60)


def test_every_message_gets_a_receipt_and_the_offsets_are_committed() -> None:
    rig = SinkRig().start()
    msgs = [message(i, f"C{i % 3}") for i in range(12)]
    rig.send(msgs)
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert {r.status for r in rig.receipts().values()} == {"DELIVERED"}
    assert set(rig.receipts()) == {m.message_id for m in msgs}
    assert stats.delivered == 12 and stats.posts == 12
    # posts stay in order per channel
    for ch in ("C0", "C1", "C2"):
        ids = [p.request.metadata["event_payload"] for p in rig.slack.posts_to(ch)]
        assert [i["message_id"] for i in ids] == [  # type: ignore[index]
            m.message_id for m in msgs if m.channel == ch
        ]
    assert len(rig.markers) == 0


def test_a_replay_in_a_new_group_posts_nothing() -> None:
    rig = SinkRig().start()
    rig.send([message(i, "C1") for i in range(5)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    rig.start(group="replay")
    wait_until(lambda: rig.all_committed("replay"), timeout_s=20, message="replay committed")
    stats = rig.finish()
    assert stats.skipped == 5 and stats.posts == 0
    assert len(rig.slack.posts) == 5


def test_a_permanent_error_gives_a_failed_receipt_and_a_dead_letter() -> None:
    rig = SinkRig()
    rig.slack.script("C404", Rejected("channel_not_found"))
    rig.start()
    rig.send([message(1, "C404"), message(2, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    assert rig.receipts()["m1"].status == "FAILED"
    assert rig.receipts()["m2"].status == "DELIVERED"
    [dead] = rig.broker.records(DLQ)
    headers = dict(dead.headers() or [])
    assert headers["dlq.error.class"] == b"services.notifier.sink.SlackDeliveryError"


def test_a_redriven_dead_letter_is_posted_and_a_second_redrive_is_skipped() -> None:
    """A FAILED message re-driven by an operator (``dlq.redriven.from``) is tried again
    despite its FAILED receipt; once DELIVERED, a forced second re-drive posts nothing."""
    rig = SinkRig(partitions=1)
    rig.slack.script("C1", Rejected("channel_not_found"))
    rig.start()
    rig.send([message(1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    assert rig.receipts()["m1"].status == "FAILED"
    assert rig.slack.posts == []
    p = rig.broker.producer({})
    [letter] = rig.broker.records(DLQ)
    for _ in range(2):  # the re-drive, then a forced second one
        p.produce(
            TOPIC,
            value=letter.value(),
            key=b"C1",
            headers=[(HEADER_REDRIVEN_FROM, f"{DLQ}/0/0".encode())],
        )
    assert p.flush(1) == 0
    wait_until(rig.all_committed, timeout_s=20, message="re-drives committed")
    stats = rig.finish()
    assert rig.receipts()["m1"].status == "DELIVERED"
    assert len(rig.slack.posts) == 1
    assert stats.skipped == 1


def test_undecodable_input_is_dead_lettered_and_committed_past() -> None:
    rig = SinkRig(partitions=1).start()
    rig.send_raw(b"C1", b"garbage")
    rig.send([message(1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert stats.undecodable == 1 and stats.delivered == 1
    assert [d.value() for d in rig.broker.records(DLQ)] == [b"garbage"]


def test_revoke_commits_what_is_finished_before_the_partition_moves() -> None:
    rig = SinkRig(partitions=2).start()
    rig.send([message(i, f"C{i}") for i in range(6)])
    wait_until(lambda: len(rig.receipts()) == 6, timeout_s=20, message="6 receipts")
    # A second member joins: one partition moves, and the first member commits it on revoke.
    other = rig.broker.consumer(
        {"group.id": "notifier", "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    )
    other.subscribe([rig.config.topic])
    wait_until(
        lambda: (other.consume(1, 0.05) or True) and len(other.assignment()) == 1,
        timeout_s=20,
        message="the partition moved",
    )
    assert rig.loop is not None
    wait_until(lambda: rig.loop is not None and len(rig.loop.assigned) == 1, timeout_s=20)
    moved = other.assignment()[0].partition
    assert rig.ends()[moved] > 0
    assert rig.committed()[moved] == rig.ends()[moved]
    stats = rig.finish()
    assert stats.revocations >= 1
    other.close()


def test_a_wedged_commit_is_bounded_and_stops_the_loop() -> None:
    """librdkafka's synchronous commit can block past any timeout (a coordinator that does not
    answer). Before the fix the sink called it unbounded: the loop hung for good, every channel
    stalled and the member was evicted without the process noticing. Now the commit is bounded
    by ``client_call_bound_s``: the loop stops with ClientCallTimeoutError (exit 1, restart),
    the wedged consumer is not called again, and nothing unfinished was committed."""
    rig = SinkRig(partitions=1, client_call_bound_s=0.5).start()
    wait_until(lambda: rig.consumers and rig.consumers[0].assignment(), timeout_s=20)
    release = rig.consumers[0].hang("commit")
    try:
        started = time.monotonic()
        rig.send([message(1, "C1")])
        assert rig.join(20), "the sink loop hangs in a wedged commit"
        assert isinstance(rig.error, ClientCallTimeoutError), rig.error
        assert "consumer commit" in str(rig.error)
        assert time.monotonic() - started < 15
        # the receipt was produced before the commit; the offset is replayed, not lost
        assert rig.receipts()["m1"].status == "DELIVERED"
        assert rig.committed() == {0: None}
    finally:
        release.set()


def test_no_post_before_its_marker_is_durable() -> None:
    """With a store whose writes become durable later (a Kafka-backed one), the loop makes a
    post only from the marker's ``on_durable``: a crash in between leaves the post in doubt,
    never unrecorded."""
    rig = SinkRig()
    rig.markers = InMemoryAttemptLog(remote=True)
    posted_while_durable: list[bool] = []
    post = rig.slack.post

    def checked(request: PostRequest) -> PostOutcome:
        payload = request.metadata["event_payload"]
        assert isinstance(payload, dict)
        posted_while_durable.append(payload["message_id"] in rig.markers.durable)
        return post(request)

    rig.slack.post = checked  # type: ignore[method-assign]
    rig.start()
    rig.send([message(i, f"C{i % 2}") for i in range(6)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    assert posted_while_durable == [True] * 6
    assert len(rig.markers) == 0  # deleted once the receipts were acknowledged


def test_a_post_starts_as_soon_as_its_marker_is_durable() -> None:
    """A post starts from its marker's acknowledgement, which only a poll of the markers'
    producer serves. Before the fix the loop, with a call in flight or a marker pending, waited
    on the queue of finished Slack calls alone: each post of a channel started a whole
    ``poll_timeout_s`` after its marker was durable (one channel: 9 posts/s against a Slack
    answering in 1.4 ms). Now the loop watches both, so the posts of one channel follow each
    other at the pace of the answers, not of the poll timeout (3 s here)."""
    rig = SinkRig(partitions=1, poll_timeout_s=3.0)
    rig.markers = InMemoryAttemptLog(remote=True)
    posted_at: list[float] = []
    post = rig.slack.post

    def timed(request: PostRequest) -> PostOutcome:
        posted_at.append(time.monotonic())
        return post(request)

    rig.slack.post = timed  # type: ignore[method-assign]
    rig.start()
    rig.send([message(i, "C1") for i in range(3)])
    wait_until(lambda: len(posted_at) == 3, timeout_s=60, message="three posts")
    rig.finish()
    # before the fix: two waits of poll_timeout_s, at least 6 s
    assert posted_at[-1] - posted_at[0] < 3.0


def test_a_partition_starts_only_once_its_markers_are_restored() -> None:
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True, hold_restores=True)
    rig.start()
    rig.send([message(1, "C1")])
    loop = rig.loop
    assert loop is not None
    wait_until(lambda: loop.stats.consumed == 1, timeout_s=20)
    consumed_at = loop.last_turn
    # many turns later (each defers the channel by poll_timeout_s), still nothing posted
    wait_until(lambda: loop.last_turn > consumed_at + 0.3, timeout_s=20)
    assert rig.slack.posts == []
    rig.markers.restored(("slack-messages", 0))
    wait_until(rig.all_committed, timeout_s=20, message="posted once restored")
    rig.finish()
    assert len(rig.slack.posts) == 1


def test_a_partition_starts_only_once_the_receipts_table_reached_the_assignment_marks() -> None:
    """The previous owner delivered m1 and flushed its receipt before the partition moved, but
    not its offset. Before the fix the new owner started m1 after a fixed settle delay (0.5 s;
    none in the twins), whatever its receipts table had read, and posted it a second time. Now
    the partition waits until the table's positions reach the high watermarks of the
    assignment, however long the table takes."""
    rig = SinkRig(partitions=1)
    rig.send_receipt("m1", "C1", "1.0001")
    rig.send([message(1, "C1")])
    rig.table.hold()  # the new owner's table has not fetched the receipt yet
    rig.start()
    loop = rig.loop
    assert loop is not None
    wait_until(lambda: loop.stats.consumed == 1, timeout_s=20)
    consumed_at = loop.last_turn
    # well past the old settle delay, and many turns later: still gated
    wait_until(lambda: loop.last_turn > consumed_at + 0.8, timeout_s=20)
    assert rig.slack.posts == [] and loop.stats.skipped == 0
    rig.table.release()
    wait_until(rig.all_committed, timeout_s=20, message="skipped once the table caught up")
    stats = rig.finish()
    assert (stats.skipped, stats.posts) == (1, 0)
    assert rig.slack.posts == []


def test_an_unacknowledged_receipt_stops_the_loop_and_its_offset_stays_uncommitted() -> None:
    rig = SinkRig(partitions=1).start()
    wait_until(lambda: rig.producers, timeout_s=10)
    rig.producers[0].fail_delivery(RECEIPTS, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    rig.send([message(1, "C1")])
    assert rig.join(20), "the loop did not stop"
    assert isinstance(rig.error, DeliveryError), rig.error
    assert "replayed (without reposting)" in str(rig.error)
    assert rig.committed() == {0: None}
    assert len(rig.markers) == 1  # the post stays in doubt for the restart


def test_a_lost_partition_is_replayed_after_rejoining_without_posting_twice() -> None:
    # no commit before the loss: the replay starts from the beginning
    rig = SinkRig(partitions=1, pace=True, rate_per_channel_per_s=20.0, commit_interval_s=60)
    rig.start()
    msgs = [message(i, "C1") for i in range(10)]
    rig.send(msgs)
    wait_until(lambda: len(rig.slack.posts) >= 3, timeout_s=20, message="a few posts")
    member = rig.consumers[0]
    member.lose()  # a session timeout: nothing more may be committed for it
    wait_until(lambda: rig.loop is not None and not rig.loop.assigned, timeout_s=20)
    delivered_before = len(rig.receipts())
    member.rejoin()
    wait_until(lambda: len(rig.receipts()) == 10, timeout_s=20, message="all delivered")
    stats = rig.finish()  # commits on the way out
    assert rig.all_committed()
    posted = [p.request.metadata["event_payload"] for p in rig.slack.posts]
    ids = [p["message_id"] for p in posted]  # type: ignore[index]
    assert sorted(ids) == sorted(m.message_id for m in msgs)  # each posted exactly once
    # the replay found the receipts of what was delivered before the loss
    assert stats.skipped >= delivered_before >= 3


def test_a_static_member_fenced_by_itself_goes_on_with_a_new_consumer_posting_once() -> None:
    """librdkafka makes a static member's self-fence (its rejoin after a session timeout
    took a new member id under the same group.instance.id) fatal; the notifier exited
    and its pod restarted. Now the sink treats its partitions as lost and goes on with a
    new consumer, through the same gates: nothing is posted twice."""
    rig = SinkRig(partitions=1, pace=True, rate_per_channel_per_s=20.0, commit_interval_s=60)
    rig.start(instance_id="notifier-1")
    msgs = [message(i, "C1") for i in range(10)]
    rig.send(msgs)
    wait_until(lambda: len(rig.slack.posts) >= 3, timeout_s=20, message="a few posts")
    rig.consumers[0].fence()
    wait_until(lambda: len(rig.consumers) == 2, timeout_s=20, message="a new consumer")
    wait_until(lambda: len(rig.receipts()) == 10, timeout_s=20, message="all delivered")
    rig.finish()
    assert rig.all_committed()
    posted = [p.request.metadata["event_payload"] for p in rig.slack.posts]
    ids = [p["message_id"] for p in posted]  # type: ignore[index]
    assert sorted(ids) == sorted(m.message_id for m in msgs)  # each posted exactly once


def test_a_failed_receipt_is_never_written_before_its_dead_letter_is_acknowledged() -> None:
    # A kill -9 between the two once left the receipt without its letter: the replay skipped
    # the message (final receipt) and the letter was lost for good (e2e kill9-seed22).
    rig = SinkRig(partitions=1)
    rig.slack.script("C404", Rejected("channel_not_found"))
    rig.start()
    wait_until(lambda: rig.producers, timeout_s=10)
    rig.producers[0].fail_delivery(DLQ, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    rig.send([message(1, "C404")])
    assert rig.join(20), "the loop did not stop"
    assert isinstance(rig.error, DeliveryError), rig.error
    assert rig.receipts() == {}
    assert rig.committed() == {0: None}
    # the restart (a new process: its table read from the topic) posts again, Slack refuses
    # again, and both are written
    rig.table = MemoryReceiptTable(rig.broker)
    rig.slack.script("C404", Rejected("channel_not_found"))
    rig.start()
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    assert rig.receipts()["m1"].status == "FAILED"
    assert len(rig.broker.records(DLQ)) == 1


# -- updates -------------------------------------------------------------------------------------


def _update_ids(rig: SinkRig, original: str) -> list[str]:
    ids = []
    for u in rig.slack.updates_of(original):
        payload = u.metadata["event_payload"]
        assert isinstance(payload, dict)
        ids.append(str(payload["message_id"]))
    return ids


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_original_and_four_updates_are_one_post_and_four_updates_of_its_ts() -> None:
    calls_before = _sample("notifier_slack_calls_total", method="chat.update", result="updated")
    updated_before = _sample("notifier_messages_total", outcome="updated")
    rig = SinkRig().start()
    rig.send([message(1, "C1"), *(update(10 + n, 1, "C1", n) for n in range(1, 5))])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    [post] = rig.slack.posts
    assert [c for c in rig.slack.calls if c[0] != "history"] == [("post", "C1")] + [
        ("update", "C1")
    ] * 4
    assert _update_ids(rig, "m1") == ["m1-u1", "m1-u2", "m1-u3", "m1-u4"]
    assert all(u.ts == post.ts for u in rig.slack.updates_of("m1"))
    assert post.updates[-1].text == "alert 1, update 4"
    receipts = rig.receipts()
    for mid in ("m1", "m1-u1", "m1-u2", "m1-u3", "m1-u4"):
        r = receipts[mid]
        assert (r.status, r.slack_ts, r.channel, r.attempts) == ("DELIVERED", post.ts, "C1", 1)
    assert (stats.posts, stats.updates, stats.delivered, stats.updated) == (1, 4, 1, 4)
    assert len(rig.markers) == 0
    calls = _sample("notifier_slack_calls_total", method="chat.update", result="updated")
    assert calls - calls_before == 4
    assert _sample("notifier_messages_total", outcome="updated") - updated_before == 4


def test_an_update_waits_for_its_originals_receipt_then_updates_it() -> None:
    """The original was posted by another replica whose receipt is not on the topic yet: the
    update waits (its channel only), and applies once the receipt arrives."""
    rig = SinkRig(partitions=1)
    ts = rig.slack.post(
        PostRequest(
            "C1",
            "alert 1",
            [],
            {"event_type": "field_alert", "event_payload": {"message_id": "m1"}},
        )
    )
    assert isinstance(ts, Posted)
    rig.start()
    rig.send([update(2, 1, "C1"), message(3, "C2")])
    loop = rig.loop
    assert loop is not None
    # the other channel is not held up by the waiting update
    wait_until(lambda: "m3" in rig.receipts(), timeout_s=20, message="C2 delivered")
    wait_until(lambda: loop.stats.update_waits == 1, timeout_s=20)
    waited_from = loop.last_turn
    wait_until(lambda: loop.last_turn > waited_from + 0.3, timeout_s=20)
    assert rig.slack.updates_of("m1") == [] and "m1-u1" not in rig.receipts()
    rig.send_receipt("m1", "C1", ts.ts)
    wait_until(rig.all_committed, timeout_s=20, message="updated once the receipt arrived")
    stats = rig.finish()
    assert _update_ids(rig, "m1") == ["m1-u1"]
    assert rig.receipts()["m1-u1"].slack_ts == ts.ts
    assert (stats.posts, stats.updated, stats.update_waits) == (1, 1, 1)  # C2's post


def test_an_update_queued_before_its_original_lets_the_original_go_first() -> None:
    """Upstream orders an original before its updates. If it ever did not, the update at the
    head of the channel would wait for a receipt that only the message behind it can give,
    fail after the wait bound, and the original would post after its update was lost."""
    rig = SinkRig(partitions=1)
    rig.config = replace(
        rig.config, policy=RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05, update_wait_s=30)
    )
    rig.start()
    rig.send([update(2, 1, "C1"), message(3, "C1"), message(1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    receipts = rig.receipts()
    assert {receipts[m].status for m in ("m1", "m1-u1", "m3")} == {"DELIVERED"}
    assert _update_ids(rig, "m1") == ["m1-u1"]
    assert [c for c in rig.slack.calls if c[0] != "history"] == [
        ("post", "C1"),
        ("update", "C1"),
        ("post", "C1"),
    ]
    assert (stats.posts, stats.updated, stats.update_waits) == (2, 1, 0)


def test_an_update_whose_original_never_comes_fails_with_a_dead_letter_and_never_posts() -> None:
    rig = SinkRig(partitions=1)
    rig.config = replace(
        rig.config, policy=RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05, update_wait_s=0.3)
    )
    rig.start()
    rig.send([update(2, 1, "C1"), message(3, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    r = rig.receipts()["m1-u1"]
    assert (r.status, r.error) == ("FAILED", "original_not_delivered")
    [dead] = rig.broker.records(DLQ)
    assert b"original_not_delivered" in dict(dead.headers() or [])["dlq.error.message"]
    # the message behind it in the channel went on afterwards; no post or update of the update
    assert [c for c in rig.slack.calls if c[0] != "history"] == [("post", "C1")]
    assert rig.receipts()["m3"].status == "DELIVERED"
    assert (stats.failed, stats.updates, stats.dead_lettered) == (1, 0, 1)


def test_an_update_of_a_failed_original_fails_with_a_dead_letter_after_the_originals() -> None:
    rig = SinkRig(partitions=1)
    rig.slack.script("C404", Rejected("channel_not_found"))
    rig.start()
    rig.send([message(1, "C404"), update(2, 1, "C404")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    receipts = rig.receipts()
    assert receipts["m1"].status == "FAILED"
    assert (receipts["m1-u1"].status, receipts["m1-u1"].error) == ("FAILED", "original_failed")
    assert len(rig.broker.records(DLQ)) == 2
    assert rig.slack.calls == [("post", "C404")]


def test_killed_between_the_update_and_its_receipt_the_replay_finds_it_applied() -> None:
    """The update reached Slack, the process died before its receipt was written (here: the
    receipt's delivery fails and the loop stops, its marker and offset left behind). The
    replay finds the marker, reads the message at the original's ts (its metadata names the
    update) and writes the receipt without a second chat.update."""
    rig = SinkRig(partitions=1).start()
    rig.send([message(1, "C1")])
    wait_until(lambda: "m1" in rig.receipts() and rig.all_committed(), timeout_s=20)
    rig.producers[0].fail_delivery(RECEIPTS, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    rig.send([update(2, 1, "C1")])
    assert rig.join(20), "the loop did not stop"
    assert isinstance(rig.error, DeliveryError), rig.error
    assert _update_ids(rig, "m1") == ["m1-u1"]  # applied in Slack
    assert "m1-u1" not in rig.receipts() and len(rig.markers) == 1
    # the restart: a new process, its receipts table read from the topic
    rig.table = MemoryReceiptTable(rig.broker)
    rig.start()
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    r = rig.receipts()["m1-u1"]
    assert (r.status, r.slack_ts, r.attempts) == ("DELIVERED", rig.slack.posts[0].ts, 1)
    assert _update_ids(rig, "m1") == ["m1-u1"]  # not applied twice
    assert (stats.update_checks, stats.updates, stats.updated) == (1, 0, 1)
    assert len(rig.markers) == 0


def test_an_update_in_doubt_that_did_not_reach_slack_is_applied_once() -> None:
    rig = SinkRig(partitions=1)
    rig.slack.script("C1", Unavailable("connection reset", in_doubt=True), method="update")
    rig.start()
    rig.send([message(1, "C1"), update(2, 1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _update_ids(rig, "m1") == ["m1-u1"]
    assert rig.receipts()["m1-u1"].attempts == 2
    # not applied at the first check, right after the failure: checked again once settled
    assert (stats.update_checks, stats.updates) == (2, 2)


def test_a_timed_out_update_that_was_applied_is_not_applied_again() -> None:
    rig = SinkRig(partitions=1)
    rig.slack.script("C1", STORE_THEN_TIMEOUT, method="update")
    rig.start()
    rig.send([message(1, "C1"), update(2, 1, "C1"), update(3, 1, "C1", 2)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _update_ids(rig, "m1") == ["m1-u1", "m1-u2"]
    assert (stats.update_checks, stats.updates, stats.updated) == (1, 2, 2)


def test_a_replay_skips_finished_updates() -> None:
    rig = SinkRig().start()
    rig.send([message(1, "C1"), update(2, 1, "C1"), update(3, 1, "C1", 2)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    rig.start(group="replay")
    wait_until(lambda: rig.all_committed("replay"), timeout_s=20, message="replay committed")
    stats = rig.finish()
    assert (stats.skipped, stats.posts, stats.updates) == (3, 0, 0)
    assert _update_ids(rig, "m1") == ["m1-u1", "m1-u2"]


def test_a_permanent_update_error_fails_that_update_only() -> None:
    rig = SinkRig(partitions=1)
    rig.slack.script("C1", Rejected("cant_update_message"), method="update")
    rig.start()
    rig.send([message(1, "C1"), update(2, 1, "C1"), update(3, 1, "C1", 2)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    receipts = rig.receipts()
    assert (receipts["m1-u1"].status, receipts["m1-u1"].error) == ("FAILED", "cant_update_message")
    assert receipts["m1-u2"].status == "DELIVERED"
    assert len(rig.broker.records(DLQ)) == 1
    assert _update_ids(rig, "m1") == ["m1-u2"]


# -- markers written ahead ---------------------------------------------------------------------


def _blocking_first_post(rig: SinkRig, until: Callable[[], bool]) -> list[bool]:
    """Hold the first post until ``until()`` (bounded); record whether each post's marker was
    durable when the post was made."""
    assert isinstance(rig.markers, InMemoryAttemptLog)
    markers = rig.markers
    durable_at_post: list[bool] = []
    post = rig.slack.post

    def held(request: PostRequest) -> PostOutcome:
        payload = request.metadata["event_payload"]
        assert isinstance(payload, dict)
        durable_at_post.append(payload["message_id"] in markers.durable)
        if len(durable_at_post) == 1:
            wait_until(until, timeout_s=20, message="the condition while the first post is held")
        return post(request)

    rig.slack.post = held  # type: ignore[method-assign]
    return durable_at_post


def test_the_next_posts_marker_is_written_while_the_post_before_it_is_in_flight() -> None:
    """The marker of the message behind the head is begun while the head's post is in flight
    (it overlaps that post instead of following it), and is still durable before its own
    post; every post is made once and every marker cleared."""
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers
    durable_at_post = _blocking_first_post(rig, lambda: "m2" in markers.durable)
    rig.start()
    rig.send([message(i, "C1") for i in range(1, 5)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert durable_at_post == [True] * 4
    assert rig.loop is not None and rig.loop._posts_waiting == 0
    ids = [p.request.metadata["event_payload"]["message_id"] for p in rig.slack.posts]  # type: ignore[index]
    assert ids == ["m1", "m2", "m3", "m4"]
    assert (stats.posts, stats.delivered, stats.history_checks) == (4, 4, 0)
    assert len(rig.markers) == 0


def test_no_marker_is_written_ahead_when_pacing_holds_the_next_post_back() -> None:
    """With Slack's pacing (one post per second, a burst of 1) the next post could not follow
    at once: no early marker, so a takeover has no extra history check to make."""
    rig = SinkRig(partitions=1, pace=True, rate_per_channel_per_s=1.0, rate_burst=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers
    seen: list[set[str]] = []
    durable_at_post = _blocking_first_post(rig, lambda: seen.append(set(markers.markers)) or True)
    rig.start()
    rig.send([message(1, "C1"), message(2, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    rig.finish()
    assert durable_at_post == [True, True]
    assert seen[0] == {"m1"}


def test_a_takeover_after_an_early_marker_checks_the_history_and_posts_once() -> None:
    """The process dies with m2's marker written ahead and m2 never posted (here: m1's
    receipt cannot be written, the loop stops). The restart finds both markers: m1 is found in
    the history (not posted again), m2 is not found and is posted once."""
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers
    _blocking_first_post(rig, lambda: "m2" in markers.durable)
    held = rig.slack.post

    def dying(request: PostRequest) -> PostOutcome:
        if request.metadata["event_payload"] != {"message_id": "m2", "pipeline": "p1"}:
            return held(request)
        # m2's post may start before the loop notices m1's receipt failed: the process dies
        # before it reaches Slack
        wait_until(lambda: rig.error is not None, timeout_s=20, message="the loop stopped")
        return Unavailable("the process died first", in_doubt=True)

    rig.slack.post = dying  # type: ignore[method-assign]
    rig.start()
    wait_until(lambda: rig.producers, timeout_s=10)
    rig.producers[0].fail_delivery(RECEIPTS, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    rig.send([message(1, "C1"), message(2, "C1")])
    assert rig.join(20), "the loop did not stop"
    assert isinstance(rig.error, DeliveryError), rig.error
    assert set(markers.markers) == {"m1", "m2"}
    ids = [p.request.metadata["event_payload"]["message_id"] for p in rig.slack.posts]  # type: ignore[index]
    assert ids[0] == "m1" and ids.count("m1") == 1
    # the restart: a new process (its receipts table read from the topic), the same markers
    rig.table = MemoryReceiptTable(rig.broker)
    rig.slack.post = type(rig.slack).post.__get__(rig.slack)  # type: ignore[method-assign]
    rig.start()
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    ids = [p.request.metadata["event_payload"]["message_id"] for p in rig.slack.posts]  # type: ignore[index]
    assert sorted(ids) == ["m1", "m2"]  # each posted exactly once
    # m2, not found right at the takeover, is checked again after the settle delay
    assert stats.history_checks == 3 and stats.found_in_history == 1
    assert {r.status for r in rig.receipts().values()} == {"DELIVERED"}
    assert len(rig.markers) == 0


def test_an_early_marker_whose_post_never_started_is_cleared_at_stop() -> None:
    """Stopped while m2's marker was written ahead and m1's post in flight: the drain finishes
    m1; m2 is not posted, and its marker is tombstoned (no history check for the next owner)."""
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers
    _blocking_first_post(rig, lambda: rig.stop.is_set())
    rig.start()
    rig.send([message(1, "C1"), message(2, "C1")])
    wait_until(lambda: "m2" in markers.durable, timeout_s=20, message="m2's marker ahead")
    rig.stop.set()
    assert rig.join(20), "the loop did not stop"
    assert rig.error is None, rig.error
    ids = [p.request.metadata["event_payload"]["message_id"] for p in rig.slack.posts]  # type: ignore[index]
    assert ids == ["m1"]
    assert "m1" in rig.receipts() and "m2" not in rig.receipts()
    assert len(rig.markers) == 0


def _counting_lookups(rig: SinkRig) -> dict[str, int]:
    """Count the receipts table's lookups per message id."""
    asked: dict[str, int] = {}
    get = rig.table.get

    def counted(key: str) -> SlackDeliveryReceipt | None:
        asked[key] = asked.get(key, 0) + 1
        return get(key)

    rig.table.get = counted  # type: ignore[method-assign]
    return asked


def test_a_message_whose_marker_was_begun_ahead_is_looked_up_once() -> None:
    """Its receipt was looked up when its marker was begun, a moment before its turn: the
    table, which has applied no receipt of that message since (only others: m1's, another
    message's), is not asked again (it was: two lookups, a store read and a decode each)."""
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers
    asked = _counting_lookups(rig)

    def other_receipt_read_meanwhile() -> bool:
        if "m2" not in markers.durable:
            return False
        if not rig.receipts():
            rig.send_receipt("x9", "C9", "9.0001")
        return rig.table.positions().get(0, 0) > 0

    durable_at_post = _blocking_first_post(rig, other_receipt_read_meanwhile)
    rig.start()
    rig.send([message(i, "C1") for i in range(1, 5)])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert durable_at_post == [True] * 4
    assert (stats.posts, stats.delivered) == (4, 4)
    assert {k: v for k, v in asked.items() if k != "x9"} == {"m1": 1, "m2": 1, "m3": 1, "m4": 1}


def test_a_receipt_the_table_reads_after_the_early_marker_still_skips_the_message() -> None:
    """m2's marker is begun while m1's post is held; meanwhile another replica's receipt of
    m2 reaches the receipts table. At its turn m2 is looked up again (the table has applied
    a record since) and skipped, not posted; its early marker is cleared."""
    rig = SinkRig(partitions=1)
    rig.markers = InMemoryAttemptLog(remote=True)
    markers = rig.markers

    def receipt_read_meanwhile() -> bool:
        if "m2" not in markers.durable:
            return False
        if not rig.receipts():
            rig.send_receipt("m2", "C1", "9.0001")
        return rig.table.get("m2") is not None

    _blocking_first_post(rig, receipt_read_meanwhile)
    rig.start()
    rig.send([message(1, "C1"), message(2, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _posted_ids(rig) == ["m1"]
    assert (stats.posts, stats.skipped) == (1, 1)
    assert rig.receipts()["m2"].slack_ts == "9.0001"
    assert len(rig.markers) == 0


def test_a_replay_behind_its_first_copy_is_skipped_from_memory_until_the_table_reads_it() -> None:
    """The copy of m1 right behind it sees m1's receipt before the receipts table has read
    it, without the receipt being written into the table (it was, a store write per message);
    once the table has read the receipts back, the loop forgets them."""
    rig = SinkRig(partitions=1)
    rig.table.hold()
    rig.start()
    rig.send([message(1, "C1"), message(1, "C1"), message(2, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    loop = rig.loop
    assert loop is not None
    assert _posted_ids(rig) == ["m1", "m2"]
    assert loop.stats.skipped == 1
    assert rig.table.get("m1") is None and rig.table.get("m2") is None  # not written through
    assert len(loop.own_receipts) == 2
    rig.table.release()
    wait_until(lambda: len(loop.own_receipts) == 0, timeout_s=20, message="forgotten once read")
    rig.finish()
    assert rig.table.get("m1") is not None


def test_a_slack_call_that_raises_counts_as_unanswered_and_the_workers_end_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An adapter raising (a bug) is an unanswered call: the post is in doubt, the history is
    checked, and it is posted once. At stop the call threads end."""
    rig = SinkRig(partitions=1)
    post = rig.slack.post
    raised: list[str] = []

    def buggy(request: PostRequest) -> PostOutcome:
        if not raised:
            raised.append(request.channel)
            raise RuntimeError("adapter bug")
        return post(request)

    rig.slack.post = buggy  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="services.notifier.sink")
    rig.start()
    rig.send([message(1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    loop = rig.loop
    assert loop is not None
    stats = rig.finish()
    assert raised == ["C1"]
    assert any(r.getMessage() == "Slack call raised" and r.exc_info for r in caplog.records)
    # not found at once, and again after the settle delay: then posted
    assert (stats.posts, stats.history_checks, stats.delivered) == (2, 2, 1)
    assert _posted_ids(rig) == ["m1"]
    workers = [w.thread for w in loop._calls._workers if w.thread is not None]
    assert workers
    wait_until(lambda: not any(t.is_alive() for t in workers), timeout_s=20, message="ended")


# -- in-doubt posts that Slack stores late (issue 11) ------------------------------------------

SETTLING = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05, history_settle_s=0.5)


def _posted_ids(rig: SinkRig) -> list[str]:
    return [p.request.metadata["event_payload"]["message_id"] for p in rig.slack.posts]  # type: ignore[index]


def test_a_timed_out_post_stored_late_is_found_by_a_check_after_the_settle_delay() -> None:
    """The post times out and Slack stores it only after the first history check has read
    the channel (the soak's overloaded fake Slack). That check's "not found" comes before the
    settle delay, so the channel checks again instead of posting: one post, DELIVERED."""
    rig = SinkRig(partitions=1, policy=SETTLING)
    rig.slack.script("C1", STORE_LATE)
    rig.start()
    rig.send([message(1, "C1"), message(2, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _posted_ids(rig) == ["m1", "m2"]  # m1 once, m2 after it
    assert stats.history_checks == 2 and stats.found_in_history == 1
    assert stats.unverified == 0
    assert {r.status for r in rig.receipts().values()} == {"DELIVERED"}
    assert rig.receipts()["m1"].attempts == 1


def test_a_takeover_of_a_post_slack_is_still_storing_does_not_post_it_again() -> None:
    """A replica died mid-post; its marker is read back by the next owner, whose first check
    comes before Slack stored the post. The settle delay counts from the takeover (when the
    dead replica's attempt had surely ended), not from the marker's time, which may be long
    before the post was made."""
    rig = SinkRig(partitions=1, policy=SETTLING)
    m1 = message(1, "C1")
    request = core.prepare_post(m1)
    assert isinstance(request, PostRequest)
    rig.slack.script("C1", STORE_LATE)
    assert isinstance(rig.slack.post(request), Unavailable)  # the dead replica's post
    # its marker, written long before (the post waited for its acknowledgement)
    rig.markers.markers["m1"] = AttemptMarker("C1", 1, datetime.now(UTC) - timedelta(minutes=5))
    rig.start()
    rig.send([m1])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _posted_ids(rig) == ["m1"]
    assert stats.posts == 0 and stats.history_checks == 2 and stats.found_in_history == 1
    assert rig.receipts()["m1"].status == "DELIVERED"


def test_an_in_doubt_post_whose_window_cannot_be_read_fails_with_a_dead_letter() -> None:
    """Every check answers "window exceeded": the message is FAILED and dead-lettered after
    the check cap, and never posted a second time."""
    rig = SinkRig(partitions=1, policy=replace(SETTLING, max_attempts=3))
    rig.slack.script("C1", STORE_THEN_TIMEOUT)
    rig.slack.script("C1", *[Rejected(core.HISTORY_WINDOW_EXCEEDED)] * 3, method="history")
    rig.start()
    rig.send([message(1, "C1")])
    wait_until(rig.all_committed, timeout_s=20, message="all committed")
    stats = rig.finish()
    assert _posted_ids(rig) == ["m1"]
    assert stats.history_checks == 3 and stats.unverified == 0
    receipt = rig.receipts()["m1"]
    assert receipt.status == "FAILED" and core.IN_DOUBT_UNVERIFIED in str(receipt.error)
    assert len(rig.broker.records(DLQ)) == 1


def test_over_http_a_post_slack_stores_after_the_timeout_is_posted_once() -> None:
    """The soak's case end to end on the Slack side: slack-sdk against the fake Slack server,
    which stores the post 1.6 s after it arrived, while the client gives up after 1 s. The
    check right after the timeout does not see it; the one after the settle delay does."""
    with FakeSlack(token="xoxb-test") as fake:
        rig = SinkRig(partitions=1, policy=replace(SETTLING, history_settle_s=2.0))
        rig.slack = SlackWebNotifier(  # type: ignore[assignment]
            "xoxb-test", base_url=fake.base_url, timeout_s=1.0
        )
        fake.slow("C1", delay_s=0, then_store=True, store_after_s=1.6)
        rig.start()
        rig.send([message(1, "C1")])
        wait_until(rig.all_committed, timeout_s=30, message="all committed")
        stats = rig.finish()
        assert stats.posts == 1  # before issue 11's fix: 2, and two m1 in the channel
        assert fake.post_counts() == {"m1": 1}
        assert stats.history_checks >= 1 and stats.found_in_history == 1
        assert stats.unverified == 0
        assert rig.receipts()["m1"].status == "DELIVERED"


def test_receipts_are_counted_into_a_summary_line_and_only_a_failed_one_has_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A line per receipt was a tenth of the loop's CPU: the delivered ones are counted into a
    periodic INFO summary (a line each at DEBUG), a FAILED one keeps its WARNING line."""
    rig = SinkRig()
    rig.slack.script("C404", Rejected("channel_not_found"))
    with caplog.at_level(logging.INFO, logger="services.notifier.sink"):
        rig.start()
        rig.send([message(1, "C1"), message(2, "C2"), message(3, "C404"), message(4, "C1")])
        wait_until(rig.all_committed, timeout_s=20, message="all committed")
        rig.finish()
    lines = [r for r in caplog.records if r.name == "services.notifier.sink"]
    [failed] = [r for r in lines if r.getMessage() == "receipt"]
    assert failed.levelno == logging.WARNING and failed.__dict__["message_id"] == "m3"
    summaries = [r for r in lines if r.getMessage() == "receipts"]
    assert summaries and all(r.levelno == logging.INFO for r in summaries)
    assert sum(r.__dict__.get("delivered", 0) for r in summaries) == 3
    assert all("failed" not in r.__dict__ for r in summaries)
