"""The warehouse queries the producer runs, each declared once: SQL, cursor columns, mapping.

Adding a query means one ``QueryDefinition`` here (and its mapper), one table setting, and
an entry in ``app.bound_queries``; the cursor, batching, transactions, dead letters and metrics
come with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from libs.serde.records import OnboardingStarted
from services.producer.core import QueryDefinition, RowContext, Unmappable


def map_onboarding_started(
    values: Mapping[str, object], ctx: RowContext
) -> OnboardingStarted | Unmappable:
    """One ``onboarding`` row (CONTRACT.md "Warehouse") to an ``OnboardingStarted``.

    ``org_id``, ``org_name`` and ``plan`` are required non-empty strings, ``cloud`` an optional
    string, ``started_at`` a timezone-aware timestamp; anything else is ``Unmappable`` with
    the first problem found.
    """
    required: dict[str, str] = {}
    for column in ("org_id", "org_name", "plan"):
        value = values.get(column)
        if not isinstance(value, str) or not value.strip():
            return Unmappable(f"{column} is missing or empty (got {value!r})")
        required[column] = value
    cloud = values.get("cloud")
    if cloud is not None and not isinstance(cloud, str):
        return Unmappable(f"cloud must be a string or NULL (got {cloud!r})")
    started_at = values.get("started_at")
    if not isinstance(started_at, datetime) or started_at.tzinfo is None:
        return Unmappable(f"started_at must be a timezone-aware timestamp (got {started_at!r})")
    return OnboardingStarted(
        event_id=ctx.event_id,
        org_id=required["org_id"],
        org_name=required["org_name"],
        plan=required["plan"],
        cloud=cloud or None,
        started_at=started_at,
        source=ctx.source,
    )


ONBOARDING_STARTED = QueryDefinition(
    name="onboarding-started",
    sql="SELECT org_id, org_name, plan, cloud, started_at FROM {table}",
    columns=("org_id", "org_name", "plan", "cloud", "started_at"),
    timestamp_column="started_at",
    key_column="org_id",
    record_type=OnboardingStarted,
    map_row=map_onboarding_started,
)

#: Every query the producer knows, by name.
QUERIES: dict[str, QueryDefinition] = {q.name: q for q in (ONBOARDING_STARTED,)}
