"""The enricher's pure core: filters, joins, routing, message ids, links (table-driven)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.serde import ConnectorStatusChanged, CsdrAssignment, OnboardingStarted, SlackUser
from libs.tables import InMemoryTable
from services.common.settings import TopicSettings
from services.enricher.core import (
    NO_OWNER,
    NO_SLACK_USER,
    Alert,
    Drop,
    Miss,
    invalid_reason,
    message_id,
    process,
    resolve_links,
    route,
    slack_user_key,
    template_problem,
)
from services.enricher.pipelines import PIPELINES, by_name
from services.enricher.pipelines.connector_provisioning_failed import (
    NOT_FAILED,
    NOT_FROM_PROVISIONING,
)
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 9, 30, 2, tzinfo=UTC)


def connector_event(
    i: int = 1,
    *,
    org_id: str = "org-1",
    old: str = "PROVISIONING",
    new: str = "FAILED",
    error: str | None = "Invalid AWS credentials: access denied for bucket orders",
    name: str = "orders to s3",
) -> ConnectorStatusChanged:
    return ConnectorStatusChanged(
        event_id=f"ev-{i}",
        org_id=org_id,
        environment_id="env-abc12",
        cluster_id="lkc-xyz98",
        connector_id=f"lcc-{i}",
        connector_name=name,
        connector_type="S3Sink",
        old_status=old,
        new_status=new,
        occurred_at=T0,
        error_message=error,
    )


def onboarding_event(
    i: int = 1, *, org_id: str = "org-1", cloud: str | None = "AWS"
) -> OnboardingStarted:
    return OnboardingStarted(
        event_id=f"onb-{i}",
        org_id=org_id,
        org_name="Acme Corp",
        plan="Standard",
        started_at=T0,
        source="onboarding",
        cloud=cloud,
    )


def owner(org_id: str = "org-1", email: str = "Jane.Doe@Example.com") -> CsdrAssignment:
    return CsdrAssignment(
        org_id=org_id,
        org_name="Acme Corp",
        csdr_email=email,
        updated_at=T0,
        csdr_name="Jane Doe",
    )


def user(email: str = "jane.doe@example.com", slack_id: str = "U0JANE") -> SlackUser:
    return SlackUser(email=email, slack_user_id=slack_id, updated_at=T0, display_name="jane")


def tables(
    owners: list[CsdrAssignment] | None = None, users: list[SlackUser] | None = None
) -> tuple[InMemoryTable[CsdrAssignment], InMemoryTable[SlackUser]]:
    return (
        InMemoryTable({o.org_id: o for o in owners or []}),
        InMemoryTable({slack_user_key(u.email): u for u in users or []}),
    )


def text_of(blocks_json: str) -> str:
    """Every text in a blocks JSON, joined (for 'the message says X' assertions)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("text"), str):
                out.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(blocks_json))
    return "\n".join(out)


# -- the filter --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("PROVISIONING", "FAILED", None),
        ("PROVISIONING", "RUNNING", NOT_FAILED),
        ("PROVISIONING", "DEGRADED", NOT_FAILED),
        ("RUNNING", "FAILED", NOT_FROM_PROVISIONING),
        ("PAUSED", "FAILED", NOT_FROM_PROVISIONING),
        ("FAILED", "FAILED", NOT_FROM_PROVISIONING),
        ("provisioning", "FAILED", NOT_FROM_PROVISIONING),  # statuses are exact strings
        ("RUNNING", "DELETED", NOT_FROM_PROVISIONING),
    ],
)
def test_connector_filter_keeps_only_provisioning_failures(
    old: str, new: str, expected: str | None
) -> None:
    owners, users = tables([owner()], [user()])
    outcome = process(
        connector_event(old=old, new=new),
        pipeline=CONNECTOR,
        owners=owners,
        users=users,
        now=NOW,
        fallback_channel="#fallback",
    )
    if expected is None:
        assert isinstance(outcome, Alert)
    else:
        assert outcome == Drop(expected)


def test_onboarding_keeps_every_record() -> None:
    owners, users = tables([owner()], [user()])
    for cloud in ("AWS", None):
        outcome = process(
            onboarding_event(cloud=cloud),
            pipeline=ONBOARDING,
            owners=owners,
            users=users,
            now=NOW,
            fallback_channel=None,
        )
        assert isinstance(outcome, Alert) and outcome.message.channel == "U0JANE"


class _Explode:
    def get(self, key: str) -> Any:
        raise AssertionError(f"looked up {key} for a dropped event")


def test_dropped_events_cost_no_lookup() -> None:
    outcome = process(
        connector_event(old="RUNNING"),
        pipeline=CONNECTOR,
        owners=_Explode(),
        users=_Explode(),
        now=NOW,
        fallback_channel=None,
    )
    assert outcome == Drop(NOT_FROM_PROVISIONING)


# -- joins and routing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("owners", "users", "fallback", "channel", "miss"),
    [
        ([owner()], [user()], None, "U0JANE", None),
        ([owner()], [user()], "#fallback", "U0JANE", None),
        ([], [user()], "#fallback", "#fallback", NO_OWNER),
        ([owner()], [], "#fallback", "#fallback", NO_SLACK_USER),
        ([owner(org_id="org-2")], [user()], "#fallback", "#fallback", NO_OWNER),
        ([owner()], [user(slack_id="  ")], "#fallback", "#fallback", NO_SLACK_USER),
        ([owner(email="")], [user()], "#fallback", "#fallback", NO_SLACK_USER),
        ([], [user()], None, None, NO_OWNER),
        ([owner()], [], None, None, NO_SLACK_USER),
    ],
)
@pytest.mark.parametrize("pipeline", ["connector", "onboarding"])
def test_join_and_route(
    owners: list[CsdrAssignment],
    users: list[SlackUser],
    fallback: str | None,
    channel: str | None,
    miss: str | None,
    pipeline: str,
) -> None:
    owner_table, user_table = tables(owners, users)
    if pipeline == "connector":
        outcome = process(
            connector_event(),
            pipeline=CONNECTOR,
            owners=owner_table,
            users=user_table,
            now=NOW,
            fallback_channel=fallback,
        )
    else:
        outcome = process(
            onboarding_event(),
            pipeline=ONBOARDING,
            owners=owner_table,
            users=user_table,
            now=NOW,
            fallback_channel=fallback,
        )
    if channel is None:
        assert isinstance(outcome, Miss) and outcome.reason == miss
        assert "org-1" in outcome.detail
        return
    assert isinstance(outcome, Alert)
    assert outcome.miss == miss
    msg = outcome.message
    assert msg.channel == channel
    assert msg.org_id == "org-1" and msg.created_at == NOW
    assert msg.text and msg.blocks
    if miss == NO_OWNER:
        assert "No account-team owner found for org org-1" in msg.text
        assert "No account-team owner found for org org-1" in text_of(msg.blocks)
    elif miss == NO_SLACK_USER:
        assert "No Slack user found for" in msg.text
    else:
        assert "Hi Jane," in text_of(msg.blocks)
        assert "No account-team owner" not in msg.text and "No Slack user" not in msg.text


def test_owner_email_is_lower_cased_for_the_user_lookup() -> None:
    owners, users = tables([owner(email="  Jane.DOE@Example.COM ")], [user()])
    outcome = process(
        connector_event(),
        pipeline=CONNECTOR,
        owners=owners,
        users=users,
        now=NOW,
        fallback_channel=None,
    )
    assert isinstance(outcome, Alert) and outcome.message.channel == "U0JANE"


def test_route_is_pure_given_what_the_joins_found() -> None:
    event = connector_event()
    a = route(event, owner(), user(), pipeline=CONNECTOR, now=NOW, fallback_channel=None)
    b = route(event, owner(), user(), pipeline=CONNECTOR, now=NOW, fallback_channel=None)
    assert a == b
    assert route(event, None, None, pipeline=CONNECTOR, now=NOW, fallback_channel=None) == Miss(
        NO_OWNER,
        "No account-team owner found for org org-1, so this alert came here instead of a DM. "
        "Assign an owner to route the next one directly.",
    )


@pytest.mark.parametrize("kept", [True, False])
def test_process_runs_the_filter_once_per_event(kept: bool) -> None:
    # a filter may be costly (a pipeline's own rule); it runs once, before any lookup
    calls: list[str] = []

    def keep(event: ConnectorStatusChanged) -> str | None:
        calls.append(event.event_id)
        return None if kept else "not_wanted"

    counting = dataclasses.replace(CONNECTOR, keep=keep)
    owners, users = tables([owner()], [user()])
    outcome = process(
        connector_event(),
        pipeline=counting,
        owners=owners,
        users=users,
        now=NOW,
        fallback_channel=None,
    )
    assert calls == ["ev-1"]
    assert isinstance(outcome, Alert) if kept else outcome == Drop("not_wanted")


# -- message ids -------------------------------------------------------------------------------
def test_message_id_is_deterministic_per_pipeline_and_event() -> None:
    event = connector_event()
    dm = route(event, owner(), user(), pipeline=CONNECTOR, now=NOW, fallback_channel=None)
    later = route(
        event,
        None,
        None,
        pipeline=CONNECTOR,
        now=NOW.replace(hour=12),
        fallback_channel="#fallback",
    )
    assert isinstance(dm, Alert) and isinstance(later, Alert)
    # same event, same pipeline: same id, whatever the time or the channel it ends up in
    assert dm.message.message_id == later.message.message_id == message_id(CONNECTOR.name, "ev-1")
    assert len(dm.message.message_id) == 32
    assert int(dm.message.message_id, 16) >= 0
    assert message_id(CONNECTOR.name, "ev-1") != message_id(ONBOARDING.name, "ev-1")
    assert message_id(CONNECTOR.name, "ev-1") != message_id(CONNECTOR.name, "ev-2")
    # no ambiguity between (pipeline, event id) pairs that concatenate alike
    assert message_id("a", "bc") != message_id("ab", "c")


@pytest.mark.parametrize("pipeline", [CONNECTOR.name, ONBOARDING.name, "", "é→🚀"])
def test_message_id_is_the_sha256_of_pipeline_and_event_id(pipeline: str) -> None:
    """The ids are part of the contract (receipts recognise replays by them): the cached
    prefix hash gives the digest of the whole string, call after call."""
    for event_id in ["ev-1", "", "ev-1", "é\x00x", "x" * 1000, "ev-1"]:
        whole = hashlib.sha256(f"{pipeline}\x00{event_id}".encode()).hexdigest()[:32]
        assert message_id(pipeline, event_id) == whole


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        (connector_event(), None),
        (dataclasses.replace(connector_event(), event_id=" "), "event_id is empty"),
        (dataclasses.replace(connector_event(), org_id=""), "org_id is empty"),
        (dataclasses.replace(onboarding_event(), org_id=""), "org_id is empty"),
    ],
)
def test_invalid_events(event: Any, problem: str | None) -> None:
    assert invalid_reason(event) == problem


# -- links -------------------------------------------------------------------------------------
def test_links_are_formatted_and_values_percent_encoded() -> None:
    links = {link.label: link.url for link in resolve_links(CONNECTOR, connector_event())}
    assert links == {
        "Connector in Cloud Console": "https://confluent.cloud/environments/env-abc12/clusters/"
        "lkc-xyz98/connectors/orders%20to%20s3",
        "Connector docs": "https://docs.confluent.io/cloud/current/connectors/overview.html",
        "CRM record": "https://crm.example.com/accounts/org-1",
    }
    hostile = connector_event(name="a|b>c&d/../e")
    [console] = [link for link in resolve_links(CONNECTOR, hostile) if "Console" in link.label]
    assert console.url.endswith("/connectors/a%7Cb%3Ec%26d%2F..%2Fe")


def test_link_templates_can_be_overridden() -> None:
    custom = CONNECTOR.with_link_templates(
        {"crm": "https://example.my.salesforce.com/lightning/r/Account/{org_id}/view"}
    )
    urls = [link.url for link in resolve_links(custom, connector_event())]
    assert "https://example.my.salesforce.com/lightning/r/Account/org-1/view" in urls
    assert len(urls) == 3
    assert CONNECTOR.links[2].template == "https://crm.example.com/accounts/{org_id}"  # unchanged


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("https://x.example/{org_id}", None),
        ("https://x.example/static", None),
        ("ftp://x.example/{org_id}", "must start with https:// or http://"),
        ("https://x.example/{nope}", "uses unknown fields ['nope']"),
        ("https://x.example/{org_id", "is not a valid template"),
    ],
)
def test_template_problems(template: str, problem: str | None) -> None:
    found = template_problem(template, ("org_id",))
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


# -- the registry ------------------------------------------------------------------------------
def test_registry_declares_both_pipelines_consistently() -> None:
    assert set(by_name()) == {"connector-provisioning-failed", "onboarding-started"}
    topics = TopicSettings()
    sources = [getattr(topics, p.source_topic_setting) for p in PIPELINES]
    assert sources == ["data-notifications-pipeline", "onboarding-events"]
    for p in PIPELINES:
        fields = {f.name for f in dataclasses.fields(p.record_type)}
        assert set(p.link_fields) <= fields, p.name
        assert p.steps and p.links
        for link in p.links:
            assert template_problem(link.template, p.link_fields) is None, link
        assert len({link.name for link in p.links}) == len(p.links)


@pytest.mark.parametrize(
    "template",
    [
        "https://x/{org_id}",
        "https://x/{connector_name}?t={connector_type}&c={cluster_id}",
        "https://x/{org_id:>{connector_id}}",  # a nested field in the format spec
        "https://x/{org_id[0]}/{org_id.__class__.__name__}",
        "https://x/{unknown}",
        "https://x/{0}",
        "https://x/{}",
        "https://x/{{literal}}",
        "https://x/{org_id",
    ],
)
def test_links_quote_only_used_fields_with_the_same_result(template: str) -> None:
    """Quoting only the fields templates use gives what quoting every link field gave."""
    from services.enricher.render import quote_url_value

    pipeline = CONNECTOR.with_link_templates({"crm": template})
    event = connector_event(name="a b/é&", org_id="org 7")
    every = {n: quote_url_value(str(getattr(event, n, "") or "")) for n in pipeline.link_fields}
    expected = []
    for link in pipeline.links:
        try:
            expected.append((link.label, link.template.format_map(every)))
        except (KeyError, IndexError, ValueError, AttributeError):
            continue
    assert [(x.label, x.url) for x in resolve_links(pipeline, event)] == expected
