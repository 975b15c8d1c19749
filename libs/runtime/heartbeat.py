"""A loop's heartbeat as a Prometheus gauge: the on-call's "is it still going round" signal.

The probes (``/healthz``) see a stalled loop from inside the process; this gauge lets an alert
see it from outside, across restarts and replicas. ``loop_last_checkpoint_timestamp_seconds``
cannot serve: an idle loop has nothing to checkpoint, so it stops moving on a quiet topic.
"""

from __future__ import annotations

from prometheus_client import Gauge

HEARTBEAT = Gauge(
    "loop_heartbeat_timestamp_seconds",
    "Wall time (Unix) the loop last went round; it stops moving when the loop is stalled",
    ["loop"],
)


def beat(loop: str) -> None:
    """Record that ``loop`` went round now (one gauge write: cheap enough for every poll)."""
    HEARTBEAT.labels(loop).set_to_current_time()
