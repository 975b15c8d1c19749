"""In-doubt markers: "a post of this message was started", kept on local disk.

How the notifier knows, after a kill -9, that a post is in doubt
-----------------------------------------------------------------
Before every ``chat.postMessage`` the loop writes a marker (channel, attempts so far, time of the
first attempt) for the message to a small RocksDB in ``NOTIFIER_STATE_DIR``; it deletes the
marker once the message's receipt is acknowledged by Kafka. A marker found when the message is
consumed again means the previous run died between starting a post and recording its outcome,
so the post is *in doubt*: the channel's history is checked for the message id (Slack message
metadata) before anything is posted again.

Why a marker, and not "check the history of every message without a receipt after a restart":
``conversations.history`` is a Tier 3 method (about 50 calls a minute), far below what posting
at one message per second per channel needs, so history checks must be the exception. With the
marker only the few messages whose post was actually started without a recorded outcome pay for
a check; everything else after a restart is posted straight away.

Durability: markers are written with RocksDB's write-ahead log but without fsync, which survives
a killed process (kill -9, OOM kill, a container restart: the data is in the OS page cache) but
not a crash of the machine. When the state directory is lost (a machine crash, a pod moved to
another node with an ``emptyDir``, a deleted volume), the markers are gone and a post that was in
flight at that moment may be sent twice: delivery falls back to at-least-once for exactly
those messages. The receipts table in the same directory is only a cache and is rebuilt from
Kafka.

The port, and where it goes next
--------------------------------
``AttemptLog`` is the store; ``InDoubtStore`` is the store as the sink loop uses it, shaped so
that a store backed by a compacted Kafka topic (in-doubt state shared across replicas, so
any replica that takes a partition over checks Slack before it re-posts) drops in without a
change to the loop:

* markers are scoped by the *input* partition: ``assign``/``revoke`` follow the consumer's
  rebalances, and ``ready(tp)`` is False while the markers of a newly assigned partition are
  still being restored; the loop starts no message of that partition before;
* a marker must be durable *before* its post: ``begin`` takes ``on_durable`` and the loop
  makes the Slack call only from it. The local stores call it at once (the write-ahead log
  has the marker when ``put`` returns); a Kafka store calls it from the marker's delivery
  report (``acks=all``), served on the loop's thread by ``poll()``;
* ``delete`` stays fire-and-forget: a leftover marker costs one history check, never a
  duplicate post.

The Kafka-backed store (not built yet): a compacted topic partitioned like
``slack-messages`` (marker of input partition p in changelog partition p, keyed by
``message_id``, a tombstone on delete), written by the sink's idempotent producer;
``assign`` snapshots each changelog partition's high watermark and reads it from the start
until the position reaches it (the global table's gate, per partition); ``revoke`` drops the
partition's markers; retention is by tombstones, replacing ``prune``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Protocol, cast

from rocksdict import Options, Rdict, WriteOptions

from services.notifier.core import AttemptMarker

log = logging.getLogger(__name__)

#: an input partition: (topic, partition)
TP = tuple[str, int]


class AttemptLog(Protocol):
    """Where markers live."""

    def get(self, message_id: str) -> AttemptMarker | None:
        """The marker of ``message_id``, if a post of it was started and not settled."""
        ...

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        """Record (durably against a process kill) that a post is about to be made."""
        ...

    def delete(self, message_id: str) -> None:
        """Forget the marker once the receipt is acknowledged."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """Release the store."""
        ...


class InDoubtStore(AttemptLog, Protocol):
    """The markers as the sink loop uses them: per input partition, durable asynchronously.

    See "The port, and where it goes next" in the module docstring.
    """

    def assign(self, tps: Iterable[TP]) -> None:
        """The loop owns ``tps`` now: make their markers available (restore them)."""
        ...

    def ready(self, tp: TP) -> bool:
        """True once every marker of ``tp`` is readable with ``get``."""
        ...

    def revoke(self, tps: Iterable[TP]) -> None:
        """The loop no longer owns ``tps`` (revoked or lost)."""
        ...

    def begin(
        self, tp: TP, message_id: str, marker: AttemptMarker, on_durable: Callable[[], None]
    ) -> None:
        """Record a post about to be made; ``on_durable()`` once the marker would survive."""
        ...

    def poll(self) -> None:
        """Serve restores and acknowledgements (on the loop's thread; never blocks)."""
        ...


def _encode(marker: AttemptMarker) -> bytes:
    return json.dumps(
        {
            "channel": marker.channel,
            "attempts": marker.attempts,
            "first_attempt_at": marker.first_attempt_at.isoformat(),
        }
    ).encode()


def _decode(raw: bytes) -> AttemptMarker:
    data = json.loads(raw)
    return AttemptMarker(
        channel=str(data["channel"]),
        attempts=int(data["attempts"]),
        first_attempt_at=datetime.fromisoformat(str(data["first_attempt_at"])),
    )


class RocksDictAttemptLog:
    """Markers in RocksDB (rocksdict), with the write-ahead log on."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self._db = Rdict(str(path), opts)
        except Exception as exc:  # rocksdict raises bare Exception on corruption
            # A corrupt marker store must not crash-loop the service: losing it only weakens
            # the in-flight posts of the previous run to at-least-once (see the module doc).
            log.warning(
                "marker store does not open, starting empty",
                extra={"path": str(path), "error": str(exc)},
            )
            shutil.rmtree(path, ignore_errors=True)
            self._db = Rdict(str(path), opts)
        self._write = WriteOptions()
        self._write.sync = False
        self._count = sum(1 for _ in self._db.keys())  # noqa: SIM118 - Rdict iterates keys

    def get(self, message_id: str) -> AttemptMarker | None:
        raw = self._db.get(message_id.encode())
        if raw is None:
            return None
        try:
            return _decode(bytes(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable marker ignored", extra={"message_id": message_id})
            return None

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        key = message_id.encode()
        if self._db.get(key) is None:
            self._count += 1
        self._db.put(key, _encode(marker), self._write)

    def delete(self, message_id: str) -> None:
        key = message_id.encode()
        if self._db.get(key) is not None:
            self._count -= 1
            self._db.delete(key, self._write)

    def prune(self, older_than: datetime) -> int:
        """Drop markers whose first attempt is older than ``older_than``; return how many.

        A marker whose message never comes back (its partition moved to another instance
        that delivered it) would otherwise stay forever.
        """
        stale: list[bytes] = []
        for key, raw in self._db.items():
            k, v = cast(bytes, key), cast(bytes, raw)
            try:
                if _decode(v).first_attempt_at < older_than:
                    stale.append(k)
            except (ValueError, KeyError, TypeError):
                stale.append(k)
        for key in stale:
            self._db.delete(key, self._write)
        self._count -= len(stale)
        return len(stale)

    def __len__(self) -> int:
        return self._count

    # -- InDoubtStore: one local copy, so every marker is readable and durable at once --------
    def assign(self, tps: Iterable[TP]) -> None:
        pass

    def ready(self, tp: TP) -> bool:
        return True

    def revoke(self, tps: Iterable[TP]) -> None:
        pass

    def begin(
        self, tp: TP, message_id: str, marker: AttemptMarker, on_durable: Callable[[], None]
    ) -> None:
        # In the write-ahead log when put returns: survives a killed process (module doc).
        self.put(message_id, marker)
        on_durable()

    def poll(self) -> None:
        pass

    def close(self) -> None:
        self._db.flush()
        self._db.close()


class InMemoryAttemptLog:
    """A dict-backed ``InDoubtStore`` for unit tests.

    ``remote=True`` behaves as a store in Kafka would: a marker becomes durable (and
    ``on_durable`` runs) only at the next ``poll()``, and an assigned partition is ``ready``
    only after a ``poll()`` (or, with ``hold_restores``, once ``restored(tp)`` is called).
    """

    def __init__(self, *, remote: bool = False, hold_restores: bool = False) -> None:
        self.markers: dict[str, AttemptMarker] = {}
        self.remote = remote
        self.hold_restores = hold_restores
        self.durable: set[str] = set()
        self._waiting: list[tuple[str, Callable[[], None]]] = []
        self._restoring: set[TP] = set()

    def assign(self, tps: Iterable[TP]) -> None:
        if self.remote:
            self._restoring.update(tps)

    def ready(self, tp: TP) -> bool:
        return tp not in self._restoring

    def restored(self, tp: TP) -> None:
        """The markers of ``tp`` are all read (remote mode)."""
        self._restoring.discard(tp)

    def revoke(self, tps: Iterable[TP]) -> None:
        self._restoring.difference_update(tps)

    def begin(
        self, tp: TP, message_id: str, marker: AttemptMarker, on_durable: Callable[[], None]
    ) -> None:
        self.markers[message_id] = marker
        if not self.remote:
            self.durable.add(message_id)
            on_durable()
        else:
            self._waiting.append((message_id, on_durable))

    def poll(self) -> None:
        if not self.hold_restores:
            self._restoring.clear()
        waiting, self._waiting = self._waiting, []
        for message_id, on_durable in waiting:
            self.durable.add(message_id)
            on_durable()

    def get(self, message_id: str) -> AttemptMarker | None:
        return self.markers.get(message_id)

    def put(self, message_id: str, marker: AttemptMarker) -> None:
        self.markers[message_id] = marker

    def delete(self, message_id: str) -> None:
        self.markers.pop(message_id, None)

    def __len__(self) -> int:
        return len(self.markers)

    def close(self) -> None:
        pass
