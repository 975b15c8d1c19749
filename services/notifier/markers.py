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
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import Protocol, cast

from rocksdict import Options, Rdict, WriteOptions

from services.notifier.core import AttemptMarker

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        self._db.flush()
        self._db.close()


class InMemoryAttemptLog:
    """A dict-backed ``AttemptLog`` for unit tests."""

    def __init__(self) -> None:
        self.markers: dict[str, AttemptMarker] = {}

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
