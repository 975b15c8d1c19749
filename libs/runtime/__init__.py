"""Process runtime: the service lifecycle, stop on signals, logging, metrics and health."""

from libs.runtime.health import Check, HealthServer, seconds_since
from libs.runtime.logging import JsonFormatter, TextFormatter, configure_logging
from libs.runtime.service import (
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_OK,
    Lifecycle,
    Phase,
    Service,
    ServiceRuntime,
    StartRefusedError,
    run_lifecycle,
)
from libs.runtime.signals import install_stop_handlers

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FATAL",
    "EXIT_OK",
    "Check",
    "HealthServer",
    "JsonFormatter",
    "Lifecycle",
    "Phase",
    "Service",
    "ServiceRuntime",
    "StartRefusedError",
    "TextFormatter",
    "configure_logging",
    "install_stop_handlers",
    "run_lifecycle",
    "seconds_since",
]
