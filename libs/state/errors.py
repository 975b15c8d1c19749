"""Errors of the state stores (one root)."""

from __future__ import annotations


class StateError(Exception):
    """Root of the state stores' errors; the loop stops on any of them (fail closed)."""


class ChangelogTopicError(StateError):
    """A changelog topic is missing or has fewer partitions than its input topic."""


class RestoreStalledError(StateError):
    """A restore made no progress for too long (a transaction that never ends, a dead broker)."""
