"""A golden corpus for the enricher: events in, encoded ``SlackMessage`` bytes out.

Every case is built by code (hand-written edge cases plus a seeded random sample), so the
corpus is reproducible; ``tests/unit/data/enricher_golden.json`` holds what the enricher
produced for it when the file was written. ``tests/unit/test_enricher_golden.py`` checks that
today's code still produces the same bytes, so a faster renderer, decoder or encoder cannot
change a single character of an alert unnoticed.

Each case goes the whole way the shell takes: the event is encoded to Avro and decoded again
(as the enricher receives it), routed by the core, and the message encoded for the output
topic. Regenerate (only when a change of output is intended, and review the diff):

    .venv/bin/python -m tests.support.enricher_corpus
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

from libs.serde import (
    ConnectorStatusChanged,
    CsdrAssignment,
    OnboardingStarted,
    SlackUser,
)
from services.enricher.core import Pipeline
from services.enricher.pipelines import PIPELINES
from services.enricher.pipelines.connector_provisioning_failed import PIPELINE as CONNECTOR
from services.enricher.pipelines.onboarding_started import PIPELINE as ONBOARDING

GOLDEN = Path(__file__).resolve().parents[1] / "unit" / "data" / "enricher_golden.json"
NOW = datetime(2026, 11, 25, 9, 30, 2, 123456, tzinfo=UTC)
T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
FALLBACK = "C0FALLBACK"
V = TypeVar("V")

#: mrkdwn control characters, link syntax, markup, braces (format fields), unicode of every
#: width (accents, CJK, an astral emoji, combining marks, right-to-left), whitespace
NASTY = (
    "<!channel> & <@U123|x> >",
    "*bold* _it_ ~st~ `code` ```fence```",
    "{org_id} {0} {} }{ %s %(x)s",
    "Connecteur été ☃ 日本語 🚀 e\u0301 \u05e9\u05dc\u05d5\u05dd",
    "a b\tc\nd  e",
    "100% /path?x=1&y=2#frag+plus|pipe",
    "&amp; &lt; already escaped",
)

#: pipelines as the enricher runs them, plus variants that reach the renderer's limits
_OVERRIDES = {
    "console": "https://console.example.com/e/{environment_id}/c/{cluster_id}/x/{connector_id}"
    "?name={connector_name}&type={connector_type}",
    "crm": "https://crm.example.com/a/{org_id}",
}
_MANY = dataclasses.replace(
    CONNECTOR.with_link_templates(_OVERRIDES),
    name="connector-provisioning-failed-many",
    steps=tuple(f"Step {i}: check <{i}> & read the docs carefully " * 4 for i in range(30)),
    links=CONNECTOR.links * 12,
)


@dataclass(frozen=True)
class Case:
    """One event through one pipeline with what the lookups found."""

    name: str
    pipeline: Pipeline[Any]
    event: Any
    owner: CsdrAssignment | None
    user: SlackUser | None
    fallback: str | None


class DictLookup(Generic[V]):
    """A lookup table over a dict, as the core sees a table."""

    def __init__(self, items: dict[str, V]) -> None:
        self._items = items

    def get(self, key: str) -> V | None:
        return self._items.get(key)


class ConsumedRecord:
    """The parts of a consumed ``confluent_kafka.Message`` the handler reads."""

    def __init__(self, topic: str, value: bytes) -> None:
        self._topic, self._value = topic, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0

    def value(self) -> bytes:
        return self._value


class ListEmitter:
    """Collects what the handler produces."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None]] = []

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None
    ) -> None:
        assert headers is None
        self.records.append((topic, key, value))


def owner(
    org_id: str = "org-1",
    *,
    org_name: str = "Acme Corp",
    email: str = "Dana.Owner@Example.com",
    name: str | None = "Dana Owner",
) -> CsdrAssignment:
    return CsdrAssignment(org_id, org_name, email, T0, name)


def user(slack_id: str = "U0DANA", email: str = "dana.owner@example.com") -> SlackUser:
    return SlackUser(email, slack_id, T0, "Dana")


def connector(
    i: int = 1,
    *,
    org_id: str = "org-1",
    old: str = "PROVISIONING",
    new: str = "FAILED",
    error: str | None = "Invalid AWS credentials: access denied for bucket orders",
    name: str = "orders to s3",
    ctype: str = "S3Sink",
    env: str = "env-abc12",
    cluster: str = "lkc-xyz98",
    at: datetime = T0,
) -> ConnectorStatusChanged:
    return ConnectorStatusChanged(
        f"ev-{i}", org_id, env, cluster, f"lcc-{i}", name, ctype, old, new, at, error
    )


def onboarding(
    i: int = 1,
    *,
    org_id: str = "org-1",
    org_name: str = "Acme Corp",
    plan: str = "Standard",
    cloud: str | None = "AWS",
    source: str = "onboarding",
    at: datetime = T0,
) -> OnboardingStarted:
    return OnboardingStarted(f"onb-{i}", org_id, org_name, plan, at, source, cloud)


def _hand_written() -> Iterator[Case]:
    o, u = owner(), user()
    for p in PIPELINES:
        ev = connector() if p is CONNECTOR else onboarding()
        yield Case(f"{p.name}/dm", p, ev, o, u, FALLBACK)
        yield Case(f"{p.name}/dm-no-fallback-set", p, ev, o, u, None)
        yield Case(f"{p.name}/dm-owner-without-name", p, ev, owner(name=None), u, FALLBACK)
        yield Case(f"{p.name}/dm-owner-name-blank", p, ev, owner(name="   "), u, FALLBACK)
        yield Case(f"{p.name}/dm-user-id-padded", p, ev, o, user(" U0PAD \t"), FALLBACK)
        yield Case(f"{p.name}/fallback-no-owner", p, ev, None, None, FALLBACK)
        yield Case(f"{p.name}/fallback-no-slack-user", p, ev, o, None, FALLBACK)
        yield Case(f"{p.name}/fallback-blank-slack-id", p, ev, o, user("  "), FALLBACK)
        yield Case(
            f"{p.name}/fallback-no-slack-user-no-name", p, ev, owner(name=None), None, FALLBACK
        )
        yield Case(f"{p.name}/miss-no-owner", p, ev, None, None, None)
        yield Case(f"{p.name}/miss-no-slack-user", p, ev, o, None, None)
        yield Case(f"{p.name}/miss-no-slack-user-empty-fallback", p, ev, o, None, "")
        yield Case(f"{p.name}/owner-org-name-empty", p, ev, owner(org_name=""), u, FALLBACK)
        for n, s in enumerate(NASTY):
            yield Case(f"{p.name}/nasty-owner-{n}", p, ev, owner(org_name=s, name=s), u, FALLBACK)
            yield Case(
                f"{p.name}/nasty-email-{n}", p, ev, owner(email=f" {s}@X.com "), None, FALLBACK
            )

    # connector-provisioning-failed: filter, values, links, truncation
    p = CONNECTOR
    o, u = owner(), user()
    yield Case("cpf/drop-not-from-provisioning", p, connector(old="RUNNING"), o, u, FALLBACK)
    yield Case("cpf/drop-not-failed", p, connector(new="RUNNING"), o, u, FALLBACK)
    yield Case("cpf/drop-lower-case", p, connector(old="provisioning"), o, u, FALLBACK)
    yield Case("cpf/no-error", p, connector(error=None), o, u, FALLBACK)
    yield Case("cpf/empty-error", p, connector(error=""), o, u, FALLBACK)
    yield Case("cpf/blank-error", p, connector(error="  \n "), o, u, FALLBACK)
    yield Case("cpf/error-backticks", p, connector(error="x ``` y ```` z `"), o, u, None)
    tz = timezone(timedelta(hours=-7, minutes=-30))
    yield Case(
        "cpf/non-utc-time", p, connector(at=datetime(2026, 1, 1, 1, 2, tzinfo=tz)), o, u, None
    )
    yield Case("cpf/sub-milli-time", p, connector(at=T0 + timedelta(microseconds=999)), o, u, None)
    for n, s in enumerate(NASTY):
        ev = connector(10 + n, name=s, ctype=s, env=s, cluster=s, error=s, org_id=f"org {s}")
        yield Case(f"cpf/nasty-fields-{n}", p, ev, o, u, FALLBACK)
        yield Case(f"cpf/nasty-fields-miss-{n}", p, ev, None, None, FALLBACK)
        yield Case(
            f"cpf/nasty-fields-overrides-{n}", p.with_link_templates(_OVERRIDES), ev, o, u, None
        )
    # error messages around the detail section's 3000 characters, escapes at the cut
    for size in (2900, 2980, 2985, 2986, 2987, 2990, 3000, 3001, 3100, 50_000):
        for fill in ("x", "&", "<>", "a&"):
            err = (fill * size)[:size]
            yield Case(f"cpf/error-{fill}-{size}", p, connector(error=err), o, u, FALLBACK)
    # a name that makes the console link longer than 3000 characters (dropped) or just under
    for size in (2900, 2930, 2931, 3000):
        yield Case(f"cpf/long-name-{size}", p, connector(name="n" * size), o, u, FALLBACK)
    yield Case("cpf/long-name-quoted", p, connector(name="é &" * 400), o, u, FALLBACK)
    # an org name long enough to cut the header (150), a fact (2000), the summary (3000)
    # and the fallback text (1500)
    for size in (140, 149, 150, 151, 1990, 2000, 2990, 3000, 4000):
        for fill in ("O", "&", "<é>"):
            name = (fill * size)[:size]
            yield Case(f"cpf/org-{fill}-{size}", p, connector(), owner(org_name=name), u, FALLBACK)
    yield Case("cpf/org-whitespace-title", p, connector(), owner(org_name=" \n\t "), u, FALLBACK)
    # an org id long enough to cut the warning of a fallback message
    big = "org-" + "&" * 3200
    yield Case("cpf/long-org-id-fallback", p, connector(org_id=big), None, None, FALLBACK)
    yield Case(
        "cpf/long-owner-name-fallback", p, connector(), owner(name="N" * 3200), None, FALLBACK
    )
    # steps and links sections over 3000 characters (cut without half a link or escape)
    yield Case("cpf/many-steps-and-links", _MANY, connector(), o, u, FALLBACK)
    yield Case(
        "cpf/many-steps-and-links-miss", _MANY, connector(name="<&>" * 50), None, None, FALLBACK
    )

    # onboarding-started
    p = ONBOARDING
    yield Case("onb/no-cloud", p, onboarding(cloud=None), o, u, FALLBACK)
    yield Case("onb/empty-cloud", p, onboarding(cloud=""), o, u, FALLBACK)
    yield Case("onb/no-org-name", p, onboarding(org_name=""), o, u, FALLBACK)
    yield Case("onb/no-org-name-no-owner", p, onboarding(org_name=""), None, None, FALLBACK)
    yield Case("onb/source-code", p, onboarding(source="tbl`x`"), o, u, FALLBACK)
    for n, s in enumerate(NASTY):
        ev = onboarding(20 + n, org_name=s, plan=s, cloud=s, source=s, org_id=f"org {s}")
        yield Case(f"onb/nasty-fields-{n}", p, ev, o, u, FALLBACK)
        yield Case(f"onb/nasty-fields-miss-{n}", p, ev, None, None, FALLBACK)
    for size in (149, 151, 2000, 3000):
        yield Case(f"onb/long-plan-{size}", p, onboarding(plan="P&" * size), o, u, FALLBACK)
        yield Case(f"onb/long-org-{size}", p, onboarding(org_name="<" * size), o, u, FALLBACK)


_ALPHABET = "abcXYZ019 -._~&<>|*`_{}%+/?#=\n\té☃日🚀\u0301'\"\\"


def _text(rng: random.Random) -> str:
    size = rng.choice((0, 1, 5, 20, 60, 200, 1500, 2990, 3010))
    return "".join(rng.choice(_ALPHABET) for _ in range(size))


def _short(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(1, 30)))


def _random(count: int = 120, seed: int = 14) -> Iterator[Case]:
    rng = random.Random(seed)
    for n in range(count):
        org_id = _short(rng)
        o = (
            None
            if rng.random() < 0.2
            else CsdrAssignment(
                org_id,
                _text(rng) if rng.random() < 0.3 else _short(rng),
                _short(rng),
                T0,
                rng.choice((None, _short(rng))),
            )
        )
        u = None if rng.random() < 0.2 else SlackUser("x", rng.choice(("U1", " ", "U2 ")), T0)
        fallback = rng.choice((FALLBACK, None))
        if rng.random() < 0.5:
            ev: Any = ConnectorStatusChanged(
                f"rnd-{n}-{_short(rng)}", org_id, _short(rng), _short(rng), _short(rng),
                _text(rng), _short(rng), rng.choice(("PROVISIONING", "RUNNING")),
                rng.choice(("FAILED", "FAILED", "PAUSED")),
                T0 + timedelta(milliseconds=rng.randrange(10**9)),
                rng.choice((None, _text(rng))),
            )  # fmt: skip
            p: Pipeline[Any] = CONNECTOR
        else:
            ev = OnboardingStarted(
                f"rnd-{n}-{_short(rng)}", org_id, rng.choice(("", _short(rng), _text(rng))),
                _short(rng), T0 + timedelta(milliseconds=rng.randrange(10**9)), _short(rng),
                rng.choice((None, "", _short(rng))),
            )  # fmt: skip
            p = ONBOARDING
        yield Case(f"random/{n}", p, ev, o, u, fallback)


def cases() -> list[Case]:
    """Every case of the corpus, in a stable order with unique names."""
    out = [*_hand_written(), *_random()]
    names = [c.name for c in out]
    assert len(names) == len(set(names)), "case names must be unique"
    return out


def digest(data: bytes) -> str:
    """How the golden file records large byte strings."""
    return hashlib.sha256(data).hexdigest()


def write(results: dict[str, dict[str, Any]]) -> None:
    """Write the golden file (sorted, one case per line group, reviewable as a diff)."""
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from tests.unit.test_enricher_golden import run_corpus

    write(run_corpus())
    print(f"wrote {GOLDEN}", file=sys.stderr)
