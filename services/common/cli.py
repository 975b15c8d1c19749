"""What every ``python -m services.<name>`` does around its app: help, settings, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from libs.runtime import configure_logging

log = logging.getLogger(__name__)

S = TypeVar("S")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2


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
    and names that look like credentials), whose value is never printed.
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
            parts.append(f"{name}: {err['msg']} (got {value!r})")
    return "invalid settings: " + "; ".join(parts)


def run_service(
    *,
    name: str,
    description: str,
    settings_models: Sequence[type[BaseSettings]],
    build_and_run: Callable[[list[BaseSettings]], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``--help``, load settings (one clear line on error), configure logging, run."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=description,
        epilog="settings (environment variables):\n" + env_help(*settings_models),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    loaded: list[BaseSettings] = []
    for model in settings_models:
        try:
            loaded.append(model())
        except ValidationError as exc:
            prefix = str(model.model_config.get("env_prefix", ""))
            print(f"{name}: {describe_validation_error(exc, prefix, model=model)}", file=sys.stderr)  # noqa: T201
            return EXIT_CONFIG
    common = loaded[0]
    configure_logging(
        str(getattr(common, "log_level", "INFO")),
        json_format=getattr(common, "log_format", "json") == "json",
    )
    # The registry client's HTTP library logs every request at INFO: one line per schema id.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return build_and_run(loaded)
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
