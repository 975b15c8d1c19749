"""``ensure_changelogs``' partition check, without a broker: the metadata reads are stubbed."""

from __future__ import annotations

from typing import Any

import pytest

from libs.state import changelog
from libs.state.errors import ChangelogTopicError

IN, CL = "events", "g-events-changelog"


def _stub(monkeypatch: pytest.MonkeyPatch, answers: list[dict[str, int]]) -> list[list[str]]:
    """Input topic ``events`` with 3 partitions; the changelog counts come from ``answers``
    (the last one repeats)."""
    reads: list[list[str]] = []

    def counts(config: dict[str, Any], topics: list[str], timeout_s: float) -> dict[str, int]:
        reads.append(topics)
        if topics == [IN]:
            return {IN: 3}
        return answers.pop(0) if len(answers) > 1 else answers[0]

    monkeypatch.setattr(changelog, "_partition_counts", counts)
    monkeypatch.setattr(changelog, "ensure_topics", lambda *a, **k: [])
    return reads


def test_a_changelog_not_yet_in_the_answering_brokers_metadata_is_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two enrichers started together on a 3-broker cluster: one created the changelog, the
    other's metadata read came from a broker that did not know it yet ("0 partitions"), and
    it refused to start (a fleet e2e run)."""
    reads = _stub(monkeypatch, [{}, {CL: 3}])
    assert changelog.ensure_changelogs({}, "g", [IN], replication_factor=3, settle_s=5) == []
    assert reads.count([CL]) == 2


def test_a_changelog_that_stays_short_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, [{CL: 2}])
    with pytest.raises(ChangelogTopicError, match="has 2 partitions, fewer than the 3"):
        changelog.ensure_changelogs({}, "g", [IN], replication_factor=3, settle_s=0.3)
