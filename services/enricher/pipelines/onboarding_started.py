"""``onboarding-started``: a customer organisation started onboarding.

Source: ``onboarding-events`` (``OnboardingStarted``, written by the producer from the
warehouse). Every record is an alert: the first days decide whether a customer gets to
production, and a welcome from the account team is the cheapest help there is.
"""

from __future__ import annotations

from typing import Final

from libs.serde import OnboardingStarted
from services.enricher.core import Context, LinkTemplate, Pipeline
from services.enricher.render import Fact, Mrkdwn, Note, utc_minute

NAME: Final = "onboarding-started"


def org_id(event: OnboardingStarted) -> str:
    """One alert per organisation: a repeated start updates the first message."""
    return event.org_id


def describe(event: OnboardingStarted, ctx: Context) -> Note:
    """Who started onboarding, on which plan and cloud."""
    org = event.org_name or ctx.org_name or event.org_id
    where = " on {cloud}" if event.cloud else ""
    summary = Mrkdwn(
        "*{org}* (`{org_id}`) just started onboarding on the *{plan}* plan" + where + ". "
        "The first days decide whether they get to production: a short welcome from their "
        "account team now goes a long way.",
        {"org": org, "org_id": event.org_id, "plan": event.plan, "cloud": event.cloud or ""},
    )
    return Note(
        title=f"New customer onboarding: {org}",
        summary=summary,
        facts=(
            Fact("Customer", f"{org} ({event.org_id})"),
            Fact("Plan", event.plan),
            Fact("Cloud", event.cloud or ""),
            Fact("Started at", utc_minute(event.started_at)),
            Fact("Source", event.source, code=True),
        ),
    )


PIPELINE: Final = Pipeline[OnboardingStarted](
    name=NAME,
    source_topic_setting="onboarding_events",
    record_type=OnboardingStarted,
    describe=describe,
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
