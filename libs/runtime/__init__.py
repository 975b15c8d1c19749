"""Process runtime: stop on signals, JSON logging, metrics and health endpoints."""

from libs.runtime.health import Check, HealthServer
from libs.runtime.logging import JsonFormatter, TextFormatter, configure_logging
from libs.runtime.signals import install_stop_handlers

__all__ = [
    "Check",
    "HealthServer",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "install_stop_handlers",
]
