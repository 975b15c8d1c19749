"""``onboarding-started``: a customer organisation started onboarding.

Source: ``onboarding-events`` (``OnboardingStarted``, written by the producer from the
warehouse). Every record is an alert: the first days decide whether a customer gets to
production, and a welcome from the account team is the cheapest help there is.
"""

from __future__ import annotations

from typing import Final

from libs.serde import OnboardingStarted
from services.enricher.core import Context, FactTemplate, LinkTemplate, NoteTemplate, Pipeline
from services.enricher.render import utc_minute

NAME: Final = "onboarding-started"


def org_id(event: OnboardingStarted) -> str:
    """One alert per organisation: a repeated start updates the first message."""
    return event.org_id


def values(event: OnboardingStarted, ctx: Context) -> tuple[str, ...]:
    """The strings ``DESCRIBE`` shows, in the order of its slots."""
    cloud = event.cloud or ""
    return (
        event.org_name or ctx.org_name or event.org_id,
        event.org_id,
        event.plan,
        cloud,
        f" on {cloud}" if cloud else "",
        utc_minute(event.started_at),
        event.source,
    )


#: Who started onboarding, on which plan and cloud.
DESCRIBE: Final = NoteTemplate[OnboardingStarted](
    # on_cloud: " on <cloud>" or nothing (plain text: escaping it escapes the cloud alone)
    slots=("org", "org_id", "plan", "cloud", "on_cloud", "started_at", "source"),
    values=values,
    title="New customer onboarding: {org}",
    summary="*{org}* (`{org_id}`) just started onboarding on the *{plan}* plan{on_cloud}. "
    "The first days decide whether they get to production: a short welcome from their "
    "account team now goes a long way.",
    facts=(
        FactTemplate("Customer", "{org} ({org_id})"),
        FactTemplate("Plan", "{plan}"),
        FactTemplate("Cloud", "{cloud}"),
        FactTemplate("Started at", "{started_at}"),
        FactTemplate("Source", "{source}", code=True),
    ),
)


PIPELINE: Final = Pipeline[OnboardingStarted](
    name=NAME,
    source_topic_setting="onboarding_events",
    record_type=OnboardingStarted,
    describe=DESCRIBE,
    dedup_key=org_id,
    steps=(
        "Send a short welcome and offer a kickoff call.",
        "Share the getting-started guide and ask what they plan to stream first.",
        "Log the outreach on the CRM record.",
    ),
    links=(
        LinkTemplate(
            "docs",
            "Getting started",
            "https://docs.confluent.io/cloud/current/get-started/index.html",
        ),
        LinkTemplate("crm", "CRM record", "https://crm.example.com/accounts/{org_id}"),
    ),
    link_fields=("org_id", "org_name", "plan", "cloud"),
)
