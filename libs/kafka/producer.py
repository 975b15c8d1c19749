"""One producer for every service: back-pressure, delivery errors and transactions, once.

``ProducerClient`` wraps a confluent-kafka ``Producer`` so that no service writes its own
produce-with-``BufferError`` retry, delivery-error collection or transaction-error
classification (they had drifted: a retriable ``commit_transaction`` error was retried by the
warehouse producer and fatal in the run loop).

Transaction errors are classified the way librdkafka's transactional API documents them:

* retriable (``err.retriable()``): the same call is made again, up to ``commit_attempts``;
* abortable (``err.txn_requires_abort()``): the transaction is aborted here and
  ``TransactionAbortedError`` raised; nothing of it is visible to ``read_committed`` readers,
  and the caller replays from its last checkpoint;
* fatal (``err.fatal()``, fenced by a newer instance, or anything else): ``FatalLoopError``;
  the process restarts.

Every blocking call is bounded (``libs.kafka.bounded``): past ``timeout_s`` plus a margin the
client is wedged, ``ClientCallTimeoutError`` is raised and the client is not called again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from libs.kafka.bounded import MARGIN_S, call_bounded
from libs.kafka.errors import (
    ClientCallTimeoutError,
    DeliveryError,
    FatalLoopError,
    KafkaLibError,
)
from libs.kafka.ports import ProducerPort

Headers = Sequence[tuple[str, Any]] | None
OnDelivery = Callable[[KafkaError | None, Message], None]


class TransactionAbortedError(KafkaLibError):
    """The transaction was aborted: nothing of it is visible; replay from the checkpoint."""


class ProducerClient:
    """A producer with bounded calls and classified transaction errors (module docstring)."""

    def __init__(
        self,
        producer: ProducerPort,
        *,
        timeout_s: float,
        transactional: bool,
        commit_attempts: int = 3,
        record_failures: bool = True,
    ) -> None:
        if not record_failures and not transactional:
            # nothing else would notice a failed delivery: flush only counts what is queued
            raise ValueError("record_failures=False needs a transactional producer")
        self.producer = producer
        self.timeout_s = timeout_s
        self.transactional = transactional
        self.in_transaction = False
        self.wedged = False
        self.delivery_errors: list[str] = []
        self._commit_attempts = commit_attempts
        #: the report of a record produced without a callback of its own (None: no report)
        self._default_report: OnDelivery | None = self._on_delivery if record_failures else None

    # -- bounded calls -----------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
        if self.wedged:
            raise ClientCallTimeoutError(f"{what}: the producer is wedged")
        try:
            return call_bounded(what, (timeout_s or self.timeout_s) + MARGIN_S, fn)
        except ClientCallTimeoutError:
            self.wedged = True
            raise

    # -- producing ---------------------------------------------------------------------------
    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.delivery_errors.append(f"{msg.topic()}: {err.str()}")

    def _reporter(self, on_acked: Callable[[Message], None]) -> OnDelivery:
        def report(err: KafkaError | None, msg: Message) -> None:
            self._on_delivery(err, msg)
            if err is None:
                on_acked(msg)

        return report

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = None,
        on_acked: Callable[[], None] | None = None,
        partition: int | None = None,
        on_delivered: Callable[[Message], None] | None = None,
    ) -> None:
        """Produce one record (opening a transaction first when transactional).

        ``on_acked`` runs (in ``poll``/``flush``) once the broker acknowledged the record; a
        delivery error is recorded instead (``delivery_errors``, raised by ``flush`` and
        ``check_delivery``). ``on_delivered`` is the same with the acknowledged record (its
        partition and offset). ``partition`` pins the record to a partition; by default the
        partitioner picks one.

        With ``record_failures=False`` (transactional only) a record without ``on_acked`` or
        ``on_delivered`` gets no report at all: librdkafka puts the transaction in the
        abortable state when one of its records fails, so ``commit`` raises
        ``TransactionAbortedError`` (its message names the failure) and the interval is
        replayed. Recording failures per record would cost a Python call and a ``Message``
        per delivered record whenever success reports are on (``delivery.report.only.error``
        off, as a loop keeping state needs for its changelog positions).

        A full local queue is waited out by serving delivery reports, for at most
        ``timeout_s``: a queue that does not drain in that time means a broker that does not
        answer, which is ``DeliveryError``.
        """
        if self.transactional and not self.in_transaction:
            self.begin()
        report = self._default_report
        if on_acked is not None:
            acked = on_acked
            report = self._reporter(lambda _msg: acked())
        elif on_delivered is not None:
            report = self._reporter(on_delivered)
        self._produce_waiting(
            topic,
            key,
            value,
            list(headers or ()),
            # -1 (RD_KAFKA_PARTITION_UA) is confluent-kafka's default: the partitioner
            -1 if partition is None else partition,
            report,
        )

    def produce_run(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes | None]],
        on_last_delivered: Callable[[Message], None],
    ) -> None:
        """Produce ``records`` (key, value) in order to one partition; report the last one.

        What ``produce`` does per record with ``partition`` and no headers, for a run of
        records that only needs to know where the last one landed (a changelog at the
        checkpoint: the producer is idempotent, so a partition's records keep their order and
        the last one's offset + 1 is the position after all of them). ``on_last_delivered``
        gets the last record once acknowledged; the others get the producer's default report
        (none with ``record_failures=False``). One C call per record instead of three Python
        frames and confluent-kafka's keyword parsing: ≈ 1 µs per record.
        """
        if not records:
            return
        if self.transactional and not self.in_transaction:
            self.begin()
        produce = self.producer.produce
        report = self._default_report
        last = len(records) - 1
        for i, (key, value) in enumerate(records):
            if i == last:
                report = self._reporter(on_last_delivered)
            try:
                if report is None:
                    produce(topic, value, key, partition)
                else:
                    produce(topic, value, key, partition, on_delivery=report)
            except BufferError:
                self._produce_waiting(topic, key, value, None, partition, report)

    def _produce_waiting(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, Any]] | None,
        partition: int,
        report: OnDelivery | None,
    ) -> None:
        """``produce``, a full local queue waited out by serving delivery reports (bounded)."""
        deadline: float | None = None
        while True:
            try:
                self.producer.produce(
                    topic,
                    key=key,
                    value=value,
                    headers=headers,
                    on_delivery=report,
                    partition=partition,
                )
                return
            except BufferError:
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s
                if now > deadline:
                    raise DeliveryError(
                        f"local produce queue still full after {self.timeout_s:.0f}s"
                    ) from None
                self.producer.poll(0.05)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports that are ready, waiting at most ``timeout_s`` for one."""
        self.producer.poll(timeout_s)

    def flush(self) -> None:
        """Wait (bounded) until every record is acknowledged; ``DeliveryError`` otherwise."""
        timeout = self.timeout_s
        remaining = self._call("flush", lambda: self.producer.flush(timeout))
        if remaining or self.delivery_errors:
            errors, self.delivery_errors = self.delivery_errors[:3], []
            raise DeliveryError(f"{remaining} records unacknowledged, delivery errors: {errors}")

    def flush_pending(self, timeout_s: float | None = None) -> int:
        """Wait (bounded) for acknowledgements; how many records are still unacknowledged.

        For a sink that finishes records as they are acknowledged (``on_acked``) and can
        live with some still in flight at a revoke; delivery errors are left for
        ``check_delivery``.
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        return int(self._call("flush", lambda: self.producer.flush(timeout), timeout))

    def check_delivery(self, consequence: str = "") -> None:
        """``DeliveryError`` when a record produced so far was not acknowledged."""
        if self.delivery_errors:
            errors = self.delivery_errors[:3]
            raise DeliveryError(f"records not acknowledged: {errors}{consequence}")

    # -- transactions ------------------------------------------------------------------------
    def init_transactions(self) -> None:
        """Fence any earlier producer with the same ``transactional.id`` (bounded)."""
        timeout = self.timeout_s
        self._classified("init_transactions", lambda: self.producer.init_transactions(timeout))

    def begin(self) -> None:
        """Open a transaction."""
        self._classified("begin_transaction", self.producer.begin_transaction)
        self.in_transaction = True
        self.delivery_errors.clear()

    def commit(
        self, offsets: list[TopicPartition] | None = None, group_metadata: Any = None
    ) -> None:
        """Commit the open transaction (with consumed ``offsets``, when given).

        Raises ``TransactionAbortedError`` after aborting it, or ``FatalLoopError``.
        """
        if not self.in_transaction:
            self.begin()
        timeout = self.timeout_s
        if offsets:
            self._retried(
                "send_offsets_to_transaction",
                lambda: self.producer.send_offsets_to_transaction(offsets, group_metadata, timeout),
            )
        self._retried("commit_transaction", lambda: self.producer.commit_transaction(timeout))
        self.in_transaction = False

    def _retried(self, what: str, fn: Callable[[], Any]) -> None:
        """``fn`` (a step of committing), retried while librdkafka calls its error retriable.

        A retriable error (the transaction coordinator not answering in time: a broker
        restart) that outlasts the attempts aborts the transaction instead of stopping the
        loop: ``TransactionAbortedError``, and the caller replays the interval. Should the
        commit have gone through after all, the abort fails and that is fatal.
        """
        for attempt in range(1, self._commit_attempts + 1):
            try:
                self._call(what, fn)
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.fatal() or err.txn_requires_abort() or not err.retriable():
                    self._raise_classified(what, exc)
                if attempt < self._commit_attempts:
                    continue
                self.abort()
                raise TransactionAbortedError(
                    f"{what} still failing after {attempt} attempts, aborted: {err.str()}"
                ) from exc

    def abort(self) -> None:
        """Abort the open transaction, if any (a failed abort is fatal).

        The records produced are flushed first (bounded): librdkafka sends the abort's EndTxn
        as soon as the AddPartitionsToTxn of the transaction's first records is *sent*, not
        answered, and a coordinator that has not processed it yet rejects the EndTxn with a
        fatal INVALID_TXN_STATE (librdkafka #4849, open). A record is acknowledged only once
        its partition is in the transaction, so after the flush the abort is safe. Seen in a
        clean-clone CI run, by a test that aborted right after producing.
        """
        if not self.in_transaction:
            return
        timeout = self.timeout_s
        # what is not acknowledged by then is purged by the abort, as before
        settle = min(timeout, 5.0)
        self._call("flush before abort", lambda: self.producer.flush(settle), settle)
        try:
            self._call("abort_transaction", lambda: self.producer.abort_transaction(timeout))
        except KafkaException as exc:
            raise FatalLoopError(f"abort_transaction failed: {exc}") from exc
        self.in_transaction = False

    def _classified(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return self._call(what, fn)
        except KafkaException as exc:
            self._raise_classified(what, exc)

    def _raise_classified(self, what: str, exc: KafkaException) -> NoReturn:
        err: KafkaError = exc.args[0]
        detail = f"; delivery errors: {self.delivery_errors[:3]}" if self.delivery_errors else ""
        if not err.fatal() and err.txn_requires_abort():
            self.abort()
            raise TransactionAbortedError(f"{what} failed, aborted: {err.str()}{detail}") from exc
        raise FatalLoopError(f"{what} failed: {err.str()}{detail}") from exc

    # -- closing -----------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> list[str]:
        """Abort what is open and flush, each bounded; never raises. Returns what failed."""
        problems: list[str] = []
        if self.wedged:
            return ["the producer is wedged; not closed"]
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("producer flush", lambda: self.producer.flush(timeout_s))
        ]
        if self.in_transaction:
            steps.insert(0, ("abort on close", lambda: self.producer.abort_transaction(timeout_s)))
        for what, step in steps:
            try:
                self._call(what, step, timeout_s)
            except ClientCallTimeoutError as exc:
                problems.append(str(exc))
                break
            except KafkaException as exc:
                problems.append(f"{what} failed: {exc}")
        self.in_transaction = False
        return problems
