"""librdkafka's log lines, routed through Python logging as structured records.

Without a ``logger`` in the client config librdkafka writes its lines straight to stderr in
its own format (``%7|1700000000.123|FAIL|rdkafka#producer-1| ...``): not JSON, no level a
log pipeline understands, invisible to the handlers ``libs.runtime`` configures. With one,
confluent-kafka queues every line and hands it over on the thread that serves the client's
queue, i.e. inside ``poll()``/``flush()`` (producer, admin client) and ``poll()``/
``consume()`` (consumer): a client nobody polls keeps its lines until it is polled.

confluent-kafka maps librdkafka's syslog levels before calling ``logger.log``: 0-2
(emergency, alert, critical) -> CRITICAL, 3 (error) -> ERROR, 4 (warning) -> WARNING,
5-6 (notice, info) -> INFO, 7 (debug) -> DEBUG. ``LibrdkafkaLogger`` keeps that level, splits
the line into facility, client name and thread, and masks the secrets it was given:
librdkafka already prints ``[redacted]`` for sensitive properties in its config dump, the mask
is the second line of defence for any other line that might quote one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

#: the Python logger every librdkafka line goes to
LOGGER_NAME = "librdkafka"

_MASK = "********"
_THREAD = re.compile(r"^\[thrd:(?P<thread>[^\]]*)\]: ")


class LibrdkafkaLogger:
    """The ``logger`` of a client config: one structured Python log record per librdkafka line.

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client_name, line)`` with
    ``level`` already a Python level. The record's message is the line itself (thread prefix
    removed); facility (``FAIL``, ``CONF``, ``REQTMOUT``...), client and librdkafka thread
    become the fields ``facility``, ``client`` and ``kafka_thread`` (``thread`` is taken by
    ``LogRecord``), so the JSON formatter emits them as keys.
    """

    def __init__(
        self, logger: logging.Logger | None = None, *, secrets: Iterable[str] = ()
    ) -> None:
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def log(self, level: int, msg: str, *args: object) -> None:
        """Called by confluent-kafka for each librdkafka line (other shapes pass through)."""
        if not self._logger.isEnabledFor(level):
            return
        if len(args) != 3:
            # Not the shape confluent-kafka uses today; keep the line rather than lose it.
            self._logger.log(level, "%s", self._mask(msg % args if args else msg))
            return
        facility, client, line = (str(a) for a in args)
        extra = {"facility": facility, "client": client}
        match = _THREAD.match(line)
        if match:
            extra["kafka_thread"] = match["thread"]
            line = line[match.end() :]
        self._logger.log(level, "%s", self._mask(line), extra=extra)

    def __repr__(self) -> str:
        # Client configs get logged and compared; the secrets must never show up there.
        return f"LibrdkafkaLogger({self._logger.name!r})"
