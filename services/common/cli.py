"""What every ``python -m services.<name>`` does around its app: help, settings, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from libs.runtime import (
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_OK,
    Service,
    ServiceRuntime,
    configure_logging,
    install_stop_handlers,
    run_lifecycle,
)
from libs.serde import SchemaRegistry
from services.common.settings import CommonSettings, TopicSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseSettings)
S_contra = TypeVar("S_contra", bound=BaseSettings, contravariant=True)
M = TypeVar("M", bound=BaseSettings)


def env_help(*models: type[BaseSettings]) -> str:
    """One line per setting: variable name, default (or 'required'), description."""
    lines = []
    for model in models:
        prefix = str(model.model_config.get("env_prefix", ""))
        for name, field in model.model_fields.items():
            env = (prefix + name).upper()
            if field.is_required():
                default = "required"
            elif "secret" in str(field.annotation).lower():
                default = "secret, unset"
            else:
                value = field.default
                default = f"default {str(value) if isinstance(value, Path) else value!r}"
            doc = f"  {field.description}" if field.description else ""
            lines.append(f"  {env:<40} {default}{doc}")
    return "\n".join(lines)


#: settings whose value is never repeated in an error line, even without the model at hand
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|USER_INFO|CREDENTIAL", re.IGNORECASE)
#: credentials inside a URL (``scheme://user:password@host``), hidden in an echoed value
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _secret_fields(model: type[BaseModel] | None) -> set[str]:
    if model is None:
        return set()
    return {
        name
        for name, field in model.model_fields.items()
        if "secret" in str(field.annotation).lower()
    }


def describe_validation_error(
    exc: ValidationError, prefix: str = "", *, model: type[BaseModel] | None = None
) -> str:
    """One line naming every bad or missing setting by its environment variable.

    The value a setting got is quoted, except for secrets (``SecretStr`` fields of ``model``
    and names that look like credentials), whose value is never printed, and the credentials
    part of a URL.
    """
    secrets = _secret_fields(model)
    parts = []
    for err in exc.errors():
        name = (prefix + "_".join(str(p) for p in err["loc"])).upper()
        field = str(err["loc"][0]) if err["loc"] else ""
        value = err.get("input")
        if err["type"] == "missing":
            parts.append(f"{name} is required but not set")
        elif not err["loc"]:
            # A check across settings: its message names them; its input is every setting,
            # secrets included.
            parts.append(err["msg"].removeprefix("Value error, "))
        elif value is None:
            parts.append(f"{name}: {err['msg']}")
        elif field in secrets or _SECRET_NAME.search(name):
            parts.append(f"{name}: {err['msg']} (value hidden: a secret)")
        else:
            shown = _URL_USERINFO.sub("***@", repr(value))
            parts.append(f"{name}: {err['msg']} (got {shown})")
    return "invalid settings: " + "; ".join(parts)


class ServiceFactory(Protocol[S_contra]):
    """Builds a service from its typed settings (the service classes' constructors)."""

    def __call__(
        self,
        common: CommonSettings,
        topics: TopicSettings,
        settings: S_contra,
        *,
        registry: SchemaRegistry,
        stop: threading.Event,
    ) -> Service: ...


class _BadSettingsError(Exception):
    """One line naming the bad settings of one model."""


def _load(model: type[M]) -> M:
    try:
        return model()
    except ValidationError as exc:
        prefix = str(model.model_config.get("env_prefix", ""))
        raise _BadSettingsError(describe_validation_error(exc, prefix, model=model)) from None


def run_service(
    *,
    name: str,
    description: str,
    settings: type[S],
    build: ServiceFactory[S],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``--help``, load settings (one clear line on error), configure logging, run.

    The service built by ``build`` runs through ``libs.runtime.run_lifecycle``: start line,
    topics, health server, registry wait, bootstrap, loop, stop line.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=description,
        epilog="settings (environment variables):\n"
        + env_help(CommonSettings, TopicSettings, settings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        common = _load(CommonSettings)
        topics = _load(TopicSettings)
        own = _load(settings)
    except _BadSettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    configure_logging(common.log_level, json_format=common.log_format == "json")
    # The registry client's HTTP library logs every request at INFO: one line per schema id.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))
    stop = install_stop_handlers()
    try:
        registry = common.registry()
        try:
            service = build(common, topics, own, registry=registry, stop=stop)
            return run_lifecycle(
                service,
                ServiceRuntime(
                    name=name,
                    kafka=common.kafka(name),
                    registry=registry,
                    registry_url=common.schema_registry_url,
                    registry_credentials_setting="SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                    metrics_port=common.metrics_port,
                    stop=stop,
                ),
            )
        finally:
            registry.close()
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("fatal error, exiting", extra={"service": name})
        hard_exit(EXIT_FATAL)


def hard_exit(code: int) -> NoReturn:
    """Exit now, without the interpreter's teardown.

    After a fatal error a Kafka client may be wedged inside librdkafka (a call that overran
    its bound, see ``libs.kafka.bounded``); destroying it at teardown can block for as long as
    the call does, and Kubernetes would see a hung pod instead of an exit.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
