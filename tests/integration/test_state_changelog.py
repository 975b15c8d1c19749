"""State stores against the real broker: a loop with state killed -9 mid-stream and
restarted, and a partition moving between two processes, end with state that agrees with
the committed outputs.

The loop (tests/support/state_loop.py) counts records per key in its partition's state and
writes each new count into its output, so the outputs of a key must read 1, 2, 3... without
a gap (state lost or rolled back behind the outputs) or a repeat (state ahead of the
outputs, or an output duplicated), and the changelog's last value per key must be the
key's output count.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from libs.state.changelog import changelog_topic, ensure_changelogs
from libs.state.errors import ChangelogTopicError
from tests.support.kafka import consume_all, create_topics, produce, unique, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 3
KEYS = 40


class Topics:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.topic_in, self.topic_out = unique("state-in"), unique("state-out")
        self.group = unique("state")
        create_topics(
            bootstrap, [self.topic_in, self.topic_out, self.topic_in + ".dlq"], partitions=3
        )
        created = ensure_changelogs(
            {"bootstrap.servers": bootstrap}, self.group, [self.topic_in], replication_factor=1
        )
        assert created == [changelog_topic(self.group, self.topic_in)]

    def send(self, n: int, start: int = 0) -> None:
        produce(
            self.bootstrap,
            self.topic_in,
            ((f"k{i % KEYS}", b"x") for i in range(start, start + n)),
        )

    def _checker(self) -> Consumer:
        # read_uncommitted: asks for committed offsets without waiting for a transaction
        # that holds offsets of the group (a killed loop's) to end
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "isolation.level": "read_uncommitted",
            }
        )

    def committed(self) -> int:
        c = self._checker()
        try:
            parts = [TopicPartition(self.topic_in, p) for p in range(PARTITIONS)]
            return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=30))
        finally:
            c.close()

    def all_committed(self) -> bool:
        c = self._checker()
        try:
            parts = [TopicPartition(self.topic_in, p) for p in range(PARTITIONS)]
            committed = c.committed(parts, timeout=30)
            ends = [c.get_watermark_offsets(tp, timeout=30)[1] for tp in parts]
            return [max(tp.offset, 0) for tp in committed] == ends
        finally:
            c.close()

    def start(self, state_dir: Path, instance: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:  # the child has its own copy of the descriptor
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.state_loop",
                    self.bootstrap,
                    self.topic_in,
                    self.topic_out,
                    self.group,
                    str(state_dir),
                    instance,
                    "exactly_once",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def check(self, expected_total: int) -> None:
        """Outputs count 1..n per key, n records in all; the changelog agrees."""
        outputs = consume_all(self.bootstrap, self.topic_out, expected=expected_total)
        seqs: dict[bytes, list[int]] = defaultdict(list)
        for m in outputs:
            key, _, count = (m.value() or b"").partition(b"=")
            seqs[key].append(int(count))
        assert sum(len(s) for s in seqs.values()) == expected_total
        for key, seq in seqs.items():
            assert seq == list(range(1, len(seq) + 1)), (key, seq[:5], len(seq))
        changelog = changelog_topic(self.group, self.topic_in)
        last: dict[bytes, bytes] = {}
        for m in consume_all(self.bootstrap, changelog):
            last[(m.key() or b"").removeprefix(b"count/")] = m.value() or b""
        assert last == {k: str(len(s)).encode() for k, s in seqs.items()}


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, log.read_text()[-3000:]


def restored(log: Path) -> int:
    [line] = [x for x in log.read_text().splitlines() if x.startswith("STATS ")]
    return int(line.rsplit("restored=", 1)[1])


def test_kill_9_mid_stream_and_restart_keeps_state_and_outputs_in_agreement(
    bootstrap: str, tmp_path: Path
) -> None:
    t = Topics(bootstrap)
    total = 30_000
    t.send(total)
    log = tmp_path / "loop.log"
    proc = t.start(tmp_path / "state", "a", log)
    try:
        wait_until(lambda: t.committed() >= 2_000, timeout_s=120, interval_s=0.05,
                   message="some records committed")  # fmt: skip
        proc.kill()  # -9: no checkpoint, no close, an open transaction left behind
        proc.wait(30)
        assert t.committed() < total, "finished before the kill: nothing was tested"
        # the same state dir: local state holds only committed writes; the restore reads
        # what the transactions committed after the last local write
        proc = t.start(tmp_path / "state", "a", log)
        wait_until(t.all_committed, timeout_s=180, interval_s=0.5, message="all committed")
        stop(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.check(total)
    # warm: the local stores kept every committed write through the kill; at most the one
    # interval committed before its local write (one value per key) is read again
    assert restored(log) <= KEYS


def test_a_partition_moving_to_another_process_brings_its_state(
    bootstrap: str, tmp_path: Path
) -> None:
    t = Topics(bootstrap)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = t.start(tmp_path / "a", "a", log_a)
    b: subprocess.Popen[bytes] | None = None
    try:
        t.send(6_000)
        wait_until(t.all_committed, timeout_s=120, interval_s=0.5, message="a committed all")
        # b owns nothing yet and has an empty state dir: whatever it takes over, it restores
        b = t.start(tmp_path / "b", "b", log_b)
        wait_until(
            lambda: "state restored" in log_b.read_text(), timeout_s=120, message="b restored"
        )
        t.send(6_000, start=6_000)
        wait_until(t.all_committed, timeout_s=180, interval_s=0.5, message="all committed")
        stop(b, log_b)
        stop(a, log_a)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert restored(log_b) > 0
    t.check(12_000)


def test_restore_waits_for_an_open_transaction_on_the_changelog(
    bootstrap: str, tmp_path: Path
) -> None:
    """A zombie's open transaction on the changelog: the restore must not end below it (the
    transaction may still commit), and ends with its records once it commits."""
    from confluent_kafka import Producer

    from libs.kafka import KafkaSettings
    from libs.state.stores import StateStores

    t = Topics(bootstrap)
    changelog = changelog_topic(t.group, t.topic_in)
    zombie = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique("zombie")})
    zombie.init_transactions(30)
    zombie.begin_transaction()
    zombie.produce(changelog, key=b"count/k0", value=b"7", partition=0)
    zombie.flush(30)
    stores = StateStores(
        "zombie",
        tmp_path,
        t.group,
        KafkaSettings(bootstrap_servers=bootstrap).consumer_config(t.group),
    )
    try:
        stores.assigned([(t.topic_in, 0)])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            stores.restore()
        assert stores.restoring, "the restore ended below an open transaction"
        zombie.commit_transaction(30)

        def done() -> bool:
            stores.restore()
            return not stores.restoring

        wait_until(done, timeout_s=60, interval_s=0.0, message="restored after the commit")
        assert stores.state((t.topic_in, 0)).get(b"count/k0") == b"7"
    finally:
        stores.close()


def test_ensure_changelogs_checks_partition_counts(bootstrap: str) -> None:
    topic, group = unique("state-in"), unique("state")
    create_topics(bootstrap, [topic], partitions=3)
    create_topics(bootstrap, [changelog_topic(group, topic)], partitions=2, compacted=True)
    with pytest.raises(ChangelogTopicError, match="has 2 partitions, fewer than the 3"):
        ensure_changelogs({"bootstrap.servers": bootstrap}, group, [topic], replication_factor=1)
    with pytest.raises(ChangelogTopicError, match="do not exist"):
        ensure_changelogs(
            {"bootstrap.servers": bootstrap}, group, [unique("nope")], replication_factor=1
        )


def test_a_store_written_against_another_cluster_is_rebuilt(bootstrap: str, tmp_path: Path) -> None:
    """A state dir that outlived a purged cluster: its position lies within the new
    changelog, so only the cluster id the real metadata carries tells the logs apart."""
    from libs.kafka import KafkaSettings
    from libs.state.local import LocalStore
    from libs.state.stores import StateStores

    t = Topics(bootstrap)
    changelog = changelog_topic(t.group, t.topic_in)
    from confluent_kafka import Producer

    writer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(3):
        writer.produce(changelog, key=f"count/k{i}".encode(), value=b"1", partition=0)
    assert writer.flush(30) == 0
    # what the purged cluster's run left: an open group and a position the new log has passed
    old = LocalStore(
        tmp_path / "lifecycle" / f"{t.topic_in}-0",
        store="lifecycle",
        changelog=(changelog, 0),
        cluster_id="a-purged-cluster",
    )
    old.open()
    old.write([(b"count/stale", b"9")], 2, caught_up_at=time.time())
    old.close()
    stores = StateStores(
        "lifecycle",
        tmp_path,
        t.group,
        KafkaSettings(bootstrap_servers=bootstrap).consumer_config(t.group),
    )
    try:
        stores.assigned([(t.topic_in, 0)])

        def done() -> bool:
            stores.restore()
            return not stores.restoring

        wait_until(done, timeout_s=60, interval_s=0.0, message="restored")
        st = stores.state((t.topic_in, 0))
        assert st.get(b"count/stale") is None
        assert [st.get(f"count/k{i}".encode()) for i in range(3)] == [b"1"] * 3
        assert stores.restored_records == 3
    finally:
        stores.close()
