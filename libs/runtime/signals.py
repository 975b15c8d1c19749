"""Signals become a stop event; nothing else happens inside a signal handler."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


#: how long a stop may take before the process exits anyway; below the manifests'
#: ``terminationGracePeriodSeconds`` (60), so the pod ends by itself before the SIGKILL
DEFAULT_GRACE_S = 50.0
#: the exit code of a stop that overran its grace period
EXIT_STOP_OVERRUN = 3


def install_stop_handlers(
    stop: threading.Event | None = None, *, grace_s: float | None = DEFAULT_GRACE_S
) -> threading.Event:
    """Set ``stop`` on SIGTERM and SIGINT and return it.

    A Python process running as PID 1 in a container ignores SIGTERM unless it installs a
    handler, so Kubernetes would wait out the grace period and SIGKILL it mid-checkpoint.
    A second signal while stopping restores the default action, so a stuck stop can be forced.

    The first signal also starts a watchdog: when the process has not exited ``grace_s`` later
    (a client call wedged in librdkafka, say), it logs that and exits with
    ``EXIT_STOP_OVERRUN``. ``None`` disables the watchdog.
    """
    event = stop or threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            signal.signal(signum, signal.SIG_DFL)
            return
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        event.set()
        if grace_s is not None:
            watchdog = threading.Timer(grace_s, _overrun, args=(grace_s,))
            watchdog.daemon = True
            watchdog.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def _overrun(grace_s: float) -> None:
    log.error("stop did not finish within the grace period, exiting", extra={"grace_s": grace_s})
    logging.shutdown()
    os._exit(EXIT_STOP_OVERRUN)
