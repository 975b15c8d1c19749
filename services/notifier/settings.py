"""The notifier's own settings (``NOTIFIER_...``), read once at start.

Without ``NOTIFIER_SLACK_BOT_TOKEN`` the notifier runs in dry-run mode: it renders every message
to the log and writes ``DRY_RUN`` receipts, and never talks to Slack.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.notifier.core import RetryPolicy


class NotifierSettings(BaseSettings):
    """Settings of ``python -m services.notifier``."""

    model_config = SettingsConfigDict(env_prefix="NOTIFIER_", extra="ignore", frozen=True)

    group_id: str = Field(default="notifier", min_length=1, description="consumer group")
    state_dir: Path = Field(
        default=Path("./state/notifier"),
        description=(
            "RocksDB caches of the receipts and in-doubt markers topics (lost: both are rebuilt "
            "from Kafka)"
        ),
    )
    slack_bot_token: SecretStr | None = Field(
        default=None, description="Slack bot token (xoxb-...); unset: dry-run"
    )
    slack_api_url: str = Field(
        default="https://slack.com/api/", min_length=1, description="Slack Web API base URL"
    )
    slack_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="HTTP timeout of one Slack call (a timed-out post is in doubt)",
    )
    slack_keep_alive_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "reuse a call thread's HTTP connection to Slack while it has been idle less than "
            "this; 0: a new connection (and TLS handshake) per call, as plain slack-sdk"
        ),
    )
    concurrency: int = Field(
        default=16,
        ge=1,
        le=256,
        description=(
            "Slack calls in flight at once, at most one per channel (16 calls of ~200 ms each "
            "keep ~80 channels at 1 post/s)"
        ),
    )
    rate_per_channel_per_s: float = Field(
        default=1.0, gt=0, description="local chat.postMessage rate limit per channel"
    )
    rate_burst: int = Field(default=1, ge=1, description="token bucket size of that limit")
    max_attempts: int = Field(
        default=8,
        ge=1,
        description="give up (FAILED receipt + dead letter) after this many retryable failures",
    )
    backoff_base_s: float = Field(
        default=1.0, gt=0, description="first retry delay; doubles per failure"
    )
    backoff_max_s: float = Field(default=60.0, gt=0, description="retry delay cap")
    history_limit: int = Field(
        default=200, ge=1, le=999, description="messages per conversations.history page"
    )
    history_max_pages: int = Field(
        default=20,
        ge=1,
        description=(
            "pages an in-doubt check reads at most (and for at most twice "
            "NOTIFIER_SLACK_TIMEOUT_S); a window it cannot read to its start is retried, then "
            "FAILED + dead letter, never posted again"
        ),
    )
    history_margin_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "clock skew allowed between this host and Slack: the in-doubt check reads history "
            "from the first attempt minus this margin to the last attempt's end plus "
            "NOTIFIER_HISTORY_SETTLE_S plus this margin"
        ),
    )
    history_settle_s: float = Field(
        default=20.0,
        ge=0,
        description=(
            "how long after the last attempt ended Slack may still store an in-doubt post: a "
            "post not found earlier is looked for again then, not posted again"
        ),
    )
    update_wait_s: float = Field(
        default=900.0,
        gt=0,
        description=(
            "how long an update waits for its original's receipt before it fails "
            "(FAILED receipt + dead letter; it never becomes a new post)"
        ),
    )
    max_buffered_per_partition: int = Field(
        default=500,
        ge=1,
        description="consumed-but-unfinished messages per partition before it is paused",
    )
    poll_timeout_s: float = Field(default=0.1, gt=0, le=5, description="longest wait per loop turn")
    commit_interval_s: float = Field(default=1.0, gt=0, description="offset commit interval")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1000, description="consumer max.poll.interval.ms"
    )
    session_timeout_ms: int = Field(
        default=45_000, ge=1000, description="consumer session.timeout.ms"
    )
    marker_retention_h: float = Field(
        default=168.0,
        gt=0,
        description="retention of the in-doubt markers topic (markers never cleared expire)",
    )
    group_instance_id: str | None = Field(
        default=None,
        description=(
            "consumer group.instance.id (static membership: a restart within the session "
            "timeout keeps its partitions); unique per instance; unset: dynamic membership"
        ),
    )
    create_topics: bool = Field(
        default=True,
        description="create slack-messages, receipts, in-doubt markers and the DLQs when missing",
    )

    @field_validator("group_instance_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_api_url")
    @classmethod
    def _http_url_with_host(cls, value: str) -> str:
        # httpx would only fail at the first post, and a relative "URL" would be joined onto
        # nothing: refuse it at start.
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. https://slack.com/api/")
        return value.strip()

    @model_validator(mode="after")
    def _check(self) -> NotifierSettings:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("NOTIFIER_BACKOFF_MAX_S must be >= NOTIFIER_BACKOFF_BASE_S")
        if self.slack_bot_token is not None and not self.slack_bot_token.get_secret_value():
            # An empty variable (a Secret key present but blank) means "no token": dry-run.
            object.__setattr__(self, "slack_bot_token", None)
        return self

    @property
    def dry_run(self) -> bool:
        """True when no Slack token is configured."""
        return self.slack_bot_token is None

    def retry_policy(self) -> RetryPolicy:
        """The core's retry policy from these settings."""
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            history_margin_s=self.history_margin_s,
            history_settle_s=self.history_settle_s,
            update_wait_s=self.update_wait_s,
        )

    def masked(self) -> dict[str, object]:
        """The effective settings for the start-up log line, the token masked."""
        out = self.model_dump(mode="json")
        out["slack_bot_token"] = "********" if self.slack_bot_token is not None else None
        out["dry_run"] = self.dry_run
        return out
