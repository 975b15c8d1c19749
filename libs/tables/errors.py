"""The tables library's exceptions."""

from __future__ import annotations


class TableError(Exception):
    """Root of every error raised by ``libs.tables``."""
