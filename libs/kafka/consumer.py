"""One group consumer wrapper for every loop: bounded blocking calls and classified commits.

``ConsumerClient`` is the consumer-side twin of ``ProducerClient``: the run loop and the
notifier's sink loop both commit, read committed offsets and close through it, so neither
writes its own bounded-call and commit-error code (they had drifted: the run loop bounded
its commit, the sink did not).

Every blocking call (``commit``, ``committed``, ``close``) is bounded by ``call_bounded``:
librdkafka does not always honour its own timeouts, and a call stuck in a coordinator
request would hang the loop while the group evicts it. Past the bound the consumer is
*wedged*: ``ClientCallTimeoutError`` is raised, and the client is never called again (not
even ``close``); the process exits non-zero and is restarted.

Commit errors are classified: fatal ones are ``FatalLoopError``; anything else (a rebalance
in progress, a coordinator moving) is ``CommitFailedError``, which the caller may retry at
its next commit or treat as a reason to stop.

A static member (``group.instance.id``) can be fenced by *itself*: when its session times
out (a coordinator moving during a broker roll answers "not coordinator" for longer than the
session), librdkafka rejoins under the same instance id, the broker gives the id a new member
id, and the old member's next request gets FENCED_INSTANCE_ID, which librdkafka makes a fatal
error: that consumer is dead for good. Nothing else shares the id, so the remedy is a new
consumer with the same configuration (``replace_fenced``), not a process restart that would
also drop the tables and state already loaded. ``Budget`` bounds how often that happens: two
live processes given the same id by mistake would otherwise fence each other forever.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from libs.kafka.bounded import MARGIN_S, call_bounded
from libs.kafka.errors import ClientCallTimeoutError, FatalLoopError, KafkaLibError, is_fatal
from libs.kafka.ports import ConsumerPort

log = logging.getLogger(__name__)

T = TypeVar("T")
TP = tuple[str, int]


class CommitFailedError(KafkaLibError):
    """The group did not take a commit (not fatal): commit again later, or replay."""


class ConsumerClient:
    """A consumer with bounded blocking calls and classified commits (module docstring)."""

    def __init__(
        self, consumer: ConsumerPort, *, timeout_s: float, bound_s: float | None = None
    ) -> None:
        self.consumer = consumer
        #: the timeout given to calls that take one (``committed``)
        self.timeout_s = timeout_s
        #: how long any blocking call may take before the consumer counts as wedged
        self.bound_s = bound_s if bound_s is not None else timeout_s + MARGIN_S
        self.wedged = False
        #: replaced (``replace_fenced``): its rebalance callbacks, if any, are to be ignored
        self.retired = False

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (a blocking call of the consumer), bounded; wedged past the bound."""
        if self.wedged:
            raise ClientCallTimeoutError(f"{what}: the consumer is wedged")
        try:
            return call_bounded(what, self.bound_s, fn)
        except ClientCallTimeoutError:
            self.wedged = True
            raise

    def commit(
        self, offsets: Mapping[TP, int] | list[TopicPartition], *, in_rebalance: bool = False
    ) -> None:
        """Commit ``offsets`` (the next offset to consume per partition), synchronously.

        Raises ``CommitFailedError``, ``FatalLoopError`` or ``ClientCallTimeoutError``.
        ``in_rebalance``: called from a rebalance callback (on revoke), where the commit runs
        on the calling thread, unbounded: a bounded call waits on a helper thread, and a
        commit issued from another thread while the consumer sits in its revoke callback was
        seen not to return until the bound ran out (35 s, then the loop stopped and its
        partitions waited out the session timeout). The rebalance itself bounds this call
        (``max.poll.interval.ms``).
        """
        parts = (
            [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            if isinstance(offsets, Mapping)
            else offsets
        )
        if not parts:
            return
        try:
            if in_rebalance:
                self.consumer.commit(offsets=parts, asynchronous=False)
            else:
                self.call(
                    "consumer commit",
                    lambda: self.consumer.commit(offsets=parts, asynchronous=False),
                )
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise FatalLoopError(f"commit failed: {err.str()}") from exc
            raise CommitFailedError(f"commit failed: {err.str()}") from exc

    def committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets of ``partitions`` (negative where none), bounded."""
        if not partitions:
            return []
        timeout = self.timeout_s
        return self.call(
            "consumer committed", lambda: self.consumer.committed(partitions, timeout=timeout)
        )

    def close(self, timeout_s: float = 10.0) -> list[str]:
        """Leave the group (bounded at ``timeout_s`` plus a margin); never raises.

        Returns what went wrong, for the caller's stop log. A wedged consumer is not called.
        """
        if self.wedged:
            return ["the consumer is wedged; not closed"]
        try:
            call_bounded("consumer close", timeout_s + MARGIN_S, self.consumer.close)
        except ClientCallTimeoutError as exc:
            self.wedged = True
            return [str(exc)]
        except KafkaException as exc:
            return [f"consumer close failed: {exc}"]
        return []


class Budget:
    """At most ``limit`` uses in any ``window_s``: how often a loop repairs a client in place
    before it gives up and lets the process restart."""

    def __init__(
        self, limit: int, window_s: float = 600.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._uses: list[float] = []

    def spend(self) -> bool:
        """Record a use; False when it is one more than ``limit`` within the window."""
        now = self._clock()
        self._uses = [t for t in self._uses if now - t < self.window_s] + [now]
        return len(self._uses) <= self.limit

    @property
    def used(self) -> int:
        """Uses within the window (the one refused included)."""
        return len(self._uses)


def self_fenced(err: KafkaError, consumer_config: Mapping[str, object]) -> bool:
    """True for a fatal consumer error of a static member: fenced under its own instance id
    (module docstring), so a new consumer with the same configuration can take over."""
    return is_fatal(err) and consumer_config.get("group.instance.id") is not None


def replace_fenced(
    old: ConsumerClient,
    make: Callable[[], ConsumerPort],
    *,
    err: KafkaError,
    budget: Budget,
    owned: set[TP],
    lose: Callable[[list[TopicPartition]], None],
    close_timeout_s: float,
    log_extra: Mapping[str, object],
) -> ConsumerClient:
    """Replace a consumer fenced under its own instance id (``self_fenced``): give up what it
    owned, retire and close it, and return a client of a new one from ``make`` (same
    timeouts) for the caller to subscribe.

    ``lose`` gets every partition the old consumer owned (``owned``, what the caller tracks,
    plus its assignment if it still answers) and treats them as lost: their offsets may no
    longer count. Rebalance callbacks the old consumer still makes while closing must check
    ``retired`` and do nothing. The new consumer joins under the same ``group.instance.id``:
    with static membership the group gives it the old member's partitions back without a
    rebalance of the other members. Past ``budget``, ``FatalLoopError`` (restart).
    """
    if not budget.spend():
        raise FatalLoopError(
            f"consumer error: {err.str()}; the consumer was replaced {budget.used - 1} times "
            "in 10 minutes, giving up"
        )
    log.error(
        "consumer fenced under its own group.instance.id, replacing it",
        extra={**log_extra, "error": err.str()},
    )
    owned = set(owned)
    with contextlib.suppress(KafkaException, RuntimeError):  # a dead consumer may not answer
        owned |= {(tp.topic, tp.partition) for tp in old.consumer.assignment()}
    lose([TopicPartition(t, p) for t, p in sorted(owned)])
    old.retired = True
    for problem in old.close(close_timeout_s):
        log.warning(problem, extra=dict(log_extra))
    return ConsumerClient(make(), timeout_s=old.timeout_s, bound_s=old.bound_s)


def partition_names(partitions: list[TopicPartition]) -> list[str]:
    """``topic[partition]`` names for log lines."""
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
