"""The enricher's pipelines: one small module each, registered here.

To add one: write a module with a ``PIPELINE`` (source topic setting, record type, filter,
``describe``, steps, links; see ``connector_provisioning_failed``) and list it in ``PIPELINES``.
Give ``describe`` as a ``NoteTemplate`` (title, summary, facts and detail as templates over
the strings a ``values`` function takes from the event) so the core renders its alerts from
compiled templates; any other ``describe`` returning a ``Note`` works, rendered in full per
event.
"""

from __future__ import annotations

from typing import Any, Final

from services.enricher.core import Pipeline
from services.enricher.pipelines import connector_provisioning_failed, onboarding_started

# Any: a registry holds pipelines of different record types (each module is typed precisely).
PIPELINES: Final[tuple[Pipeline[Any], ...]] = (
    connector_provisioning_failed.PIPELINE,
    onboarding_started.PIPELINE,
)


def by_name() -> dict[str, Pipeline[Any]]:
    """The registered pipelines by name."""
    return {p.name: p for p in PIPELINES}
