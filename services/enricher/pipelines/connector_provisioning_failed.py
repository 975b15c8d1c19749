"""``connector-provisioning-failed``: a managed connector failed while it was being provisioned.

Source: ``data-notifications-pipeline`` (``ConnectorStatusChanged``). Kept: ``PROVISIONING ->
FAILED`` only; every other transition is dropped and counted by reason. Customers who hit this
early often give up quietly, so the account team hears about it while it is fresh.

Lifecycle: one alert per connector (dedup key: ``connector_id``); a later change of that
connector to ``RUNNING`` or ``DELETED`` resolves it (such events are otherwise dropped).
"""

from __future__ import annotations

from typing import Final

from libs.serde import ConnectorStatusChanged, Status
from services.enricher.core import Context, FactTemplate, LinkTemplate, NoteTemplate, Pipeline
from services.enricher.render import utc_minute

NAME: Final = "connector-provisioning-failed"

#: drop reasons (metric label values)
NOT_FROM_PROVISIONING: Final = "not_from_provisioning"
NOT_FAILED: Final = "not_failed"


def keep(event: ConnectorStatusChanged) -> str | None:
    """Keep ``PROVISIONING -> FAILED``; name why anything else is dropped."""
    if event.old_status != Status.PROVISIONING:
        return NOT_FROM_PROVISIONING
    if event.new_status != Status.FAILED:
        return NOT_FAILED
    return None


def dedup_key(event: ConnectorStatusChanged) -> str:
    """One alert per connector: its repeated failures update the first message."""
    return event.connector_id


def resolves(event: ConnectorStatusChanged) -> str | None:
    """A connector running again, or deleted, resolves its open alert; say how."""
    if event.new_status == Status.RUNNING:
        return f"connector {event.connector_name} is RUNNING"
    if event.new_status == Status.DELETED:
        return f"connector {event.connector_name} was DELETED"
    return None


def values(event: ConnectorStatusChanged, ctx: Context) -> tuple[str, ...]:
    """The strings ``DESCRIBE`` shows, in the order of its slots."""
    return (
        ctx.org_name or event.org_id,
        event.org_id,
        event.connector_type,
        event.connector_name,
        event.connector_id,
        f"{event.old_status} → {event.new_status}",
        event.cluster_id,
        event.environment_id,
        utc_minute(event.occurred_at),
        event.error_message or "",
    )


#: What happened, to which customer, and the context that matters.
DESCRIBE: Final = NoteTemplate[ConnectorStatusChanged](
    slots=(
        "org",
        "org_id",
        "connector_type",
        "connector_name",
        "connector_id",
        "status",
        "cluster_id",
        "environment_id",
        "failed_at",
        "error",
    ),
    values=values,
    title="Connector failed to provision: {org}",
    summary="*{org}* (`{org_id}`) just tried to create the {connector_type} connector "
    "*{connector_name}*, and it failed while provisioning. Customers who hit this early "
    "often give up quietly: a quick note from you while it is fresh can save the setup.",
    facts=(
        FactTemplate("Customer", "{org} ({org_id})"),
        FactTemplate("Connector", "{connector_name} ({connector_id})"),
        FactTemplate("Type", "{connector_type}"),
        FactTemplate("Status", "{status}"),
        FactTemplate("Cluster", "{cluster_id}", code=True),
        FactTemplate("Environment", "{environment_id}", code=True),
        FactTemplate("Failed at", "{failed_at}"),
    ),
    detail=("Error", "error"),
)


PIPELINE: Final = Pipeline[ConnectorStatusChanged](
    name=NAME,
    source_topic_setting="data_notifications_pipeline",
    record_type=ConnectorStatusChanged,
    keep=keep,
    describe=DESCRIBE,
    dedup_key=dedup_key,
    resolves=resolves,
    error=lambda event: event.error_message,
    steps=(
        "Read the error: most provisioning failures are configuration (credentials, network "
        "access, a missing topic or ACL).",
        "Open the connector in the Cloud Console and compare its settings with the docs.",
        "Reach out with the fix or an offer to pair on it, and note it on the CRM record.",
    ),
    links=(
        LinkTemplate(
            "console",
            "Connector in Cloud Console",
            "https://confluent.cloud/environments/{environment_id}/clusters/{cluster_id}"
            "/connectors/{connector_name}",
        ),
        LinkTemplate(
            "docs",
            "Connector docs",
            "https://docs.confluent.io/cloud/current/connectors/overview.html",
        ),
        LinkTemplate("crm", "CRM record", "https://crm.example.com/accounts/{org_id}"),
    ),
    link_fields=(
        "org_id",
        "environment_id",
        "cluster_id",
        "connector_id",
        "connector_name",
        "connector_type",
    ),
)
