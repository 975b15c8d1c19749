"""Signals become a stop event; nothing else happens inside a signal handler."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


def install_stop_handlers(stop: threading.Event | None = None) -> threading.Event:
    """Set ``stop`` on SIGTERM and SIGINT and return it.

    A Python process running as PID 1 in a container ignores SIGTERM unless it installs a
    handler, so Kubernetes would wait out the grace period and SIGKILL it mid-checkpoint.
    A second signal while stopping restores the default action, so a stuck stop can be forced.
    """
    event = stop or threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            signal.signal(signum, signal.SIG_DFL)
            return
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event
