"""What every operator command (``python -m services.dlq``, ``services.notifier receipt``) does
around its work: arguments, settings with one clear line on error, logging, exit codes.

Commands write their results to stdout (for people and pipes) and their progress and
diagnostics to the log on stderr, so ``... | jq`` keeps working while a long scan reports.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from libs.kafka import KafkaLibError
from libs.runtime import EXIT_CONFIG, EXIT_FATAL, EXIT_OK, configure_logging
from libs.serde import SerdeError
from services.common.cli import describe_validation_error

log = logging.getLogger(__name__)

#: the command ran and found nothing to report on (no receipt, no letters matched)
EXIT_NOT_FOUND = 1
#: bad arguments, as argparse exits
EXIT_USAGE = 2
#: interrupted by Ctrl-C
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace, list[BaseSettings]], int]


def run_tool(
    *,
    prog: str,
    parser: argparse.ArgumentParser,
    settings_models: Sequence[type[BaseSettings]],
    run: Command,
    argv: Sequence[str] | None = None,
    usage_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse ``argv``, load the settings, configure logging and run; errors become one line.

    Bad arguments exit 2 (argparse, and the ``usage_errors`` a command raises for input it
    can only check later: a time format, an offset range outside the topic), a missing or
    invalid setting exits 2 naming it, an error the libraries raise on purpose
    (``KafkaLibError``, ``SerdeError``: an unknown topic, a refused re-drive) exits 1 with its
    message, anything else exits 1 with a traceback in the log.
    """
    args = parser.parse_args(argv)
    loaded: list[BaseSettings] = []
    for model in settings_models:
        try:
            loaded.append(model())
        except ValidationError as exc:
            prefix = str(model.model_config.get("env_prefix", ""))
            say(prog, describe_validation_error(exc, prefix, model=model))
            return EXIT_CONFIG
    common = loaded[0]
    configure_logging(
        str(getattr(common, "log_level", "INFO")),
        json_format=getattr(common, "log_format", "json") == "json",
    )
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return run(args, loaded)
    except usage_errors as exc:
        say(prog, str(exc))
        return EXIT_USAGE
    except (KafkaLibError, SerdeError) as exc:
        say(prog, str(exc))
        return EXIT_FATAL
    except KeyboardInterrupt:
        say(prog, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly; stdout is pointed at /dev/null so
        # the interpreter's final flush does not raise again
        with contextlib.suppress(OSError, ValueError):  # stdout without a file descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception:
        log.exception("command failed", extra={"command": prog})
        return EXIT_FATAL


def say(prog: str, line: str) -> None:
    """One diagnostic line on stderr, prefixed with the command."""
    # The one line an operator reads; it must not drown in (or depend on) the JSON log.
    print(f"{prog}: {line}", file=sys.stderr)  # noqa: T201


def write(line: str) -> None:
    """One line of a command's result on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FATAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "run_tool",
    "say",
    "write",
]
