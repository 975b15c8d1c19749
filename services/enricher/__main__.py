"""``python -m services.enricher``: run the enricher in the foreground (SIGTERM stops it)."""

import logging
import sys
import threading
from pathlib import Path

from libs.runtime.compiled import use_compiled

# Before anything imports the hot path: its mypyc build (``make install``) when it was made
# from exactly these sources, else the sources; which one runs is logged at start.
ROOT = Path(__file__).resolve().parents[2]
COMPILED = use_compiled(ROOT, ROOT / "build" / "mypyc" / "lib")

from libs.serde import SchemaRegistry  # noqa: E402
from services.common.cli import run_service  # noqa: E402
from services.common.settings import CommonSettings, TopicSettings  # noqa: E402
from services.enricher.app import Enricher  # noqa: E402
from services.enricher.settings import EnricherSettings  # noqa: E402


def build(
    common: CommonSettings,
    topics: TopicSettings,
    settings: EnricherSettings,
    *,
    registry: SchemaRegistry,
    stop: threading.Event,
) -> Enricher:
    """The enricher, once logging is configured: say first which hot path it runs."""
    logging.getLogger("services.enricher").info("hot path: %s", COMPILED.describe())
    return Enricher(common, topics, settings, registry=registry, stop=stop)


if __name__ == "__main__":
    sys.exit(
        run_service(
            name="enricher",
            description="Filters events, joins them with their account-team owner and produces "
            "Slack-ready messages to slack-messages.",
            settings=EnricherSettings,
            build=build,
        )
    )
