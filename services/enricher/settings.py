"""The enricher's own settings (``ENRICHER_...``), read once at start.

Transactional id and zombie fencing (``ENRICHER_TRANSACTIONAL_ID``)
--------------------------------------------------------------------
With ``exactly_once`` every checkpoint is a Kafka transaction opened by a producer with a
``transactional.id``. When an instance dies mid-transaction (kill -9, OOM, node loss), its open
transaction holds back the last stable offset of ``slack-messages``: ``read_committed`` readers
(the notifier) see nothing past it until the transaction is aborted. Who aborts it depends on
the id:

* a *stable* id (the default ``<group>-<hostname>`` with a StatefulSet's stable pod names, or
  an explicit ``ENRICHER_TRANSACTIONAL_ID``): the restarted instance's ``init_transactions``
  bumps the epoch, fences the old producer and aborts its open transaction immediately;
* an id that changes on every restart (a Deployment's random pod names): nobody fences the
  predecessor; the broker aborts its transaction only after ``transaction.timeout.ms``
  (30 s here), so readers stall that long after every crash.

Duplicate output is prevented either way: since KIP-447 the consumer group generation sent
with the offsets fences a zombie, so the id need not be tied to partitions. It must be unique
among instances running at the same time, though: two live instances sharing an id fence each
other in turn, and each fenced one exits (and is restarted) with a fatal error.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, Json, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.enricher.core import template_problem
from services.enricher.pipelines import PIPELINES


class EnricherSettings(BaseSettings):
    """Settings of ``python -m services.enricher``."""

    model_config = SettingsConfigDict(env_prefix="ENRICHER_", extra="ignore", frozen=True)

    group_id: str = Field(default="enricher", min_length=1, description="consumer group")
    state_dir: Path = Field(
        default=Path("./state/enricher"),
        description="RocksDB lookup tables (a cache: rebuilt from Kafka when lost)",
    )
    fallback_channel: str | None = Field(
        default=None,
        description="channel for alerts whose owner or Slack user is unknown (unset: dropped)",
    )
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    transactional_id: str | None = Field(
        default=None,
        description="default <group>-<hostname>; see the module docstring on fencing",
    )
    # Json[...] rather than a plain dict: pydantic-settings would raise a SettingsError on bad
    # JSON for a dict field, which escapes the one-line settings error of the CLI.
    link_templates: Json[dict[str, str]] = Field(
        default="{}",
        validate_default=True,
        description=(
            'JSON {"<pipeline>.<link>": "https://...{field}..."} overriding link URL templates '
            "(links: console, docs, crm)"
        ),
    )
    checkpoint_interval_s: float = Field(default=0.5, gt=0, description="commit interval")
    session_timeout_ms: int = Field(
        default=45_000,
        ge=6_000,
        le=300_000,
        description="how soon a crashed instance's partitions move to another (group session)",
    )

    group_instance_id: str | None = Field(
        default=None,
        description=(
            "consumer group.instance.id (static membership: a restart within the session "
            "timeout keeps its partitions); unique per instance; unset: dynamic membership"
        ),
    )

    dedup_window_s: float = Field(
        default=3600.0,
        ge=0,
        description=(
            "alert grouping: later events of a pipeline's dedup key within this many seconds "
            "of the first update its message in place; 0 disables grouping"
        ),
    )
    dedup_windows_s: Json[dict[str, float]] = Field(
        default="{}",
        validate_default=True,
        description='JSON {"<pipeline>": seconds} overriding ENRICHER_DEDUP_WINDOW_S per pipeline',
    )
    park_ttl_s: float = Field(
        default=3600.0,
        ge=0,
        description=(
            "a join miss waits this many seconds for its owner or Slack user before the miss is "
            "final (fallback copy or drop); 0 disables parking"
        ),
    )
    malloc_tune: bool = Field(
        default=True,
        description=(
            "once the tables are loaded, keep up to 64 MB free at glibc's heap top instead of "
            "trimming it per batch (services/enricher/malloc.py); false keeps glibc's defaults"
        ),
    )

    @field_validator("fallback_channel", "transactional_id", "group_instance_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_link_templates(self) -> EnricherSettings:
        pipelines = {p.name: p for p in PIPELINES}
        for key, template in self.link_templates.items():
            pipeline_name, _, link_name = key.rpartition(".")
            pipeline = pipelines.get(pipeline_name)
            links = {link.name for link in pipeline.links} if pipeline else set()
            if pipeline is None or link_name not in links:
                known = sorted(f"{p.name}.{link.name}" for p in PIPELINES for link in p.links)
                raise ValueError(f"unknown link {key!r}; known: {known}")
            problem = template_problem(template, pipeline.link_fields)
            if problem:
                raise ValueError(f"link template {key!r} {problem}")
        return self

    @model_validator(mode="after")
    def _check_dedup_windows(self) -> EnricherSettings:
        names = sorted(p.name for p in PIPELINES)
        for name, seconds in self.dedup_windows_s.items():
            if name not in names:
                raise ValueError(f"unknown pipeline {name!r} in dedup windows; known: {names}")
            if seconds < 0:
                raise ValueError(f"dedup window of {name!r} must be >= 0, got {seconds}")
        return self

    def dedup_window(self, pipeline: str) -> float:
        """The grouping window of ``pipeline`` in seconds (0: no grouping)."""
        return self.dedup_windows_s.get(pipeline, self.dedup_window_s)

    def effective_transactional_id(self) -> str:
        """``ENRICHER_TRANSACTIONAL_ID``, or ``<group>-<hostname>`` (stable per pod name)."""
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}"

    def link_overrides(self, pipeline: str) -> dict[str, str]:
        """The link template overrides of one pipeline, by link name."""
        prefix = pipeline + "."
        return {
            key[len(prefix) :]: template
            for key, template in self.link_templates.items()
            if key.startswith(prefix)
        }
