"""The enricher shell's decision on decode failures: poison (dead letter) or retry later."""

from __future__ import annotations

import pytest

from libs.kafka import RetryLater
from libs.serde import DeserializationError, RegistryError
from services.enricher.handler import retry_if_registry_down as _retry_if_registry_down


class _HttpError(Exception):
    def __init__(self, status: int | None) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status_code = status


def _error(cause: BaseException | None) -> DeserializationError:
    exc = DeserializationError("cannot decode", topic="t", partition=0, offset=7)
    exc.__cause__ = cause
    return exc


def _registry_error(inner: BaseException) -> RegistryError:
    err = RegistryError("registry said no")
    err.__cause__ = inner
    return err


@pytest.mark.parametrize(
    ("cause", "unavailable"),
    [
        (None, False),  # corrupt bytes
        (EOFError("short read"), False),
        (_registry_error(_HttpError(404)), False),  # unknown schema id: the record's fault
        (_registry_error(_HttpError(422)), False),
        (_registry_error(_HttpError(500)), True),
        (_registry_error(_HttpError(503)), True),
        (_registry_error(_HttpError(429)), True),
        (_registry_error(_HttpError(408)), True),
        (_registry_error(ConnectionRefusedError("refused")), True),  # registry down
    ],
)
def test_registry_unavailable_vs_poison(cause: BaseException | None, unavailable: bool) -> None:
    exc = _error(cause)
    assert exc.registry_unavailable is unavailable
    if unavailable:
        with pytest.raises(RetryLater):
            _retry_if_registry_down(exc)
    else:
        _retry_if_registry_down(exc)  # returns: the caller re-raises it as poison
