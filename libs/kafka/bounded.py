"""Blocking client calls with a bound the runtime enforces, whatever the library promises.

librdkafka takes a timeout for every blocking call, but does not always honour it:
``send_offsets_to_transaction`` can block for minutes after a broker restart although a 30 s
timeout is passed (librdkafka #5456 and #5511: the coordinator request's timeout is never
checked; open upstream, not fixed in confluent-kafka 2.16.1, the newest release). A call that
never returns wedges the loop: the group evicts the member at ``max.poll.interval.ms`` and the
process no longer reacts to anything.

``call_bounded`` runs the call on a helper thread (the client releases the GIL while it
blocks) and gives up waiting after ``bound_s``: it raises ``ClientCallTimeoutError``, a fatal
loop error. The caller must then treat the client as wedged: never call it again, and let the
process exit non-zero so that Kubernetes restarts it. The restart is safe by construction: the
new instance's ``init_transactions`` fences the wedged producer (same ``transactional.id``),
aborting whatever it had open, and consumption resumes from the committed offsets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from libs.kafka.errors import ClientCallTimeoutError

T = TypeVar("T")

#: what a bound adds to the timeout the call itself was given
MARGIN_S = 5.0


def call_bounded(what: str, bound_s: float, fn: Callable[[], T]) -> T:
    """``fn()``, or ``ClientCallTimeoutError`` once ``bound_s`` passes without an answer.

    Exceptions of ``fn`` are re-raised unchanged on the caller's thread.
    """
    outcome: list[object] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread below
            failure.append(exc)
        finally:
            done.set()

    # A daemon thread: a call that never returns must not keep the process from exiting.
    threading.Thread(target=run, name=f"bounded-{what}", daemon=True).start()
    if not done.wait(bound_s):
        raise ClientCallTimeoutError(
            f"{what} did not return within {bound_s:.0f}s; the client is wedged"
        )
    if failure:
        raise failure[0]
    return outcome[0]  # type: ignore[return-value]
