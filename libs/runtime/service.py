"""One lifecycle for every service: the steps around its loop, in one documented order.

``run_lifecycle(service, runtime)`` drives a ``Service`` (the hooks a service provides) through:

1. ``"<name> starting"``: one log line with the effective config (Kafka settings masked by
   ``KafkaSettings.masked``, the service masks its own secrets in ``Service.config``);
2. topics: ``Service.topics()`` created when missing (idempotent). Kafka is reached here first,
   so wrong Kafka credentials fail within seconds, before anything else is started;
3. ``Service.prepare()``: checks and adapters that need the topics but no schema (the
   notifier's Slack token check); ``StartRefusedError`` stops the service with one line;
4. the health server on ``metrics_port`` (``/metrics``, ``/healthz``, ``/readyz``; 0: none);
   from here on the pod is alive and says why it is not ready yet;
5. the schema registry: waited for with backoff while it does not answer; credentials it
   rejects stop the service with one line naming the setting that holds them;
6. ``Service.bootstrap()``: the tables gate (lookup tables loaded up to the high watermarks of
   the start); nothing for a service without tables;
7. ``Service.run()``: the loop, until the stop event is set;
8. always, also after an error: ``Service.close()``, the health server stopped, and
   ``"<name> stopped"`` with ``Service.counts()``.

Exit codes: ``EXIT_OK`` after a graceful stop (a stop requested in any step), ``EXIT_FATAL``
when the service must not start as configured; any other exception propagates with its
traceback (the caller logs it and exits ``EXIT_FATAL``, so Kubernetes restarts the pod).
Readiness is false before step 7 whatever the service says; liveness is true before step 6
(steps 1-5 are bounded or deliberately waiting), then the service's own check decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from libs.kafka import KafkaSettings, TopicSpec, ensure_topics
from libs.runtime.health import HealthServer
from libs.serde import RegistryAuthError, SchemaRegistry, wait_for_registry

log = logging.getLogger(__name__)

#: a graceful stop
EXIT_OK = 0
#: a fatal error, or a configuration the service refuses to start with
EXIT_FATAL = 1
#: a missing or invalid setting (the settings loader's exit code)
EXIT_CONFIG = 2


class StartRefusedError(Exception):
    """The service must not start as configured (a rejected credential, say).

    The lifecycle logs ``message`` as one ERROR line with ``details`` and exits ``EXIT_FATAL``
    without a traceback: a restart with the same configuration would fail the same way, and a
    traceback would bury the cause.
    """

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Service(Protocol):
    """The hooks a service provides; ``run_lifecycle`` calls them in the module's order.

    The service gets its stop event at construction and hands it to whatever blocks
    (table bootstrap, the loop); the lifecycle only checks it between steps.
    """

    def config(self) -> Mapping[str, object]:
        """The service's effective settings for the start line, secrets masked."""
        ...

    def topics(self) -> Sequence[TopicSpec]:
        """The topics to create when missing (empty: create none)."""
        ...

    def prepare(self) -> None:
        """Checks and adapters that need the topics but no schema; may raise StartRefusedError."""
        ...

    def bootstrap(self) -> None:
        """Load what must be loaded before the loop (the tables gate); returns early on stop."""
        ...

    def run(self) -> None:
        """Run the loop until the stop event is set."""
        ...

    def close(self) -> None:
        """Release clients and stores; called once, whichever step was reached."""
        ...

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """``/healthz`` from the bootstrap on: false when the service is wedged."""
        ...

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """``/readyz`` while the loop runs: false while it cannot do its work."""
        ...

    def counts(self) -> Mapping[str, object]:
        """The counts for the stop line."""
        ...


class Phase(Enum):
    """Where the lifecycle is; reported by the health checks."""

    STARTING = "starting"
    WAITING_FOR_REGISTRY = "waiting for the schema registry"
    BOOTSTRAP = "bootstrap"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True)
class ServiceRuntime:
    """What the lifecycle needs besides the service: built once from the settings."""

    name: str
    kafka: KafkaSettings
    registry: SchemaRegistry
    #: the registry URL for the start line
    registry_url: str
    #: named in the error line when the registry rejects the credentials
    registry_credentials_setting: str
    metrics_port: int
    stop: threading.Event
    #: the topic creation port (``libs.kafka.ensure_topics``; a fake in unit tests)
    ensure_topics: Callable[[dict[str, Any], Sequence[TopicSpec]], object] = ensure_topics


class Lifecycle:
    """One run of a service; ``run()`` returns the exit code."""

    def __init__(self, service: Service, runtime: ServiceRuntime) -> None:
        self.service = service
        self.runtime = runtime
        self.phase = Phase.STARTING

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive during the start steps; the service's check from the bootstrap on."""
        if self.phase in (Phase.STARTING, Phase.WAITING_FOR_REGISTRY):
            return True, {"lifecycle": self.phase.value}
        ok, details = self.service.liveness()
        return ok, {"lifecycle": self.phase.value, **details}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready only while the loop runs and the service says so."""
        ok, details = self.service.readiness()
        return self.phase is Phase.RUNNING and ok, {"lifecycle": self.phase.value, **details}

    def run(self) -> int:
        """The steps of the module docstring; the exit code."""
        rt, service = self.runtime, self.service
        log.info(
            f"{rt.name} starting",
            extra={
                "kafka": rt.kafka.masked(),
                "schema_registry_url": rt.registry_url,
                "metrics_port": rt.metrics_port,
                **service.config(),
            },
        )
        started = time.monotonic()
        health: HealthServer | None = None
        try:
            specs = list(service.topics())
            if specs:
                rt.ensure_topics(rt.kafka.client_config(), specs)
            service.prepare()
            if rt.metrics_port:
                health = HealthServer(
                    rt.metrics_port, liveness=self.liveness, readiness=self.readiness
                ).start()
            self.phase = Phase.WAITING_FOR_REGISTRY
            if not self._wait_for_registry():
                log.info("stopped while waiting for the schema registry")
                return EXIT_OK
            self.phase = Phase.BOOTSTRAP
            service.bootstrap()
            if rt.stop.is_set():
                log.info("stopped before the loop started")
                return EXIT_OK
            self.phase = Phase.RUNNING
            service.run()
            return EXIT_OK
        except StartRefusedError as exc:
            log.error(exc.message, extra=exc.details)
            return EXIT_FATAL
        finally:
            self.phase = Phase.STOPPING
            try:
                service.close()
            finally:
                if health is not None:
                    health.stop()
                log.info(
                    f"{rt.name} stopped",
                    extra={"seconds": round(time.monotonic() - started, 1), **service.counts()},
                )

    def _wait_for_registry(self) -> bool:
        try:
            return wait_for_registry(self.runtime.registry, self.runtime.stop)
        except RegistryAuthError as exc:
            setting = self.runtime.registry_credentials_setting
            raise StartRefusedError(
                f"the schema registry rejects the credentials ({setting}), not starting",
                error=str(exc),
            ) from exc


def run_lifecycle(service: Service, runtime: ServiceRuntime) -> int:
    """Run ``service`` through the lifecycle of this module; the exit code."""
    return Lifecycle(service, runtime).run()
