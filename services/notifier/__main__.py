"""``python -m services.notifier``: run the notifier in the foreground (SIGTERM stops it).

``python -m services.notifier receipt MESSAGE_ID`` prints a message's delivery receipt instead.
"""

import logging
import sys
import threading
from pathlib import Path

from libs.runtime.compiled import use_compiled

# Before anything imports the sink loop: its mypyc build (``make install``) when it was made
# from exactly these sources, else the sources; which one runs is logged at start.
ROOT = Path(__file__).resolve().parents[2]
COMPILED = use_compiled(ROOT, ROOT / "build" / "mypyc" / "lib")

from libs.serde import SchemaRegistry  # noqa: E402
from services.common.cli import run_service  # noqa: E402
from services.common.settings import CommonSettings, TopicSettings  # noqa: E402
from services.notifier.app import NotifierService  # noqa: E402
from services.notifier.settings import NotifierSettings  # noqa: E402


def build(
    common: CommonSettings,
    topics: TopicSettings,
    settings: NotifierSettings,
    *,
    registry: SchemaRegistry,
    stop: threading.Event,
) -> NotifierService:
    """The notifier, once logging is configured: say first which hot path it runs."""
    logging.getLogger("services.notifier").info("hot path: %s", COMPILED.describe())
    return NotifierService(common, topics, settings, registry=registry, stop=stop)


if __name__ == "__main__":
    if sys.argv[1:2] == ["receipt"]:
        from services.notifier.receipt import main as receipt

        sys.exit(receipt(sys.argv[2:]))
    sys.exit(
        run_service(
            name="notifier",
            description="Posts slack-messages to Slack (dry-run without a token) and produces "
            "one receipt per message to slack-message-receipts. "
            "`receipt MESSAGE_ID` prints one message's receipt (see `receipt --help`).",
            settings=NotifierSettings,
            build=build,
        )
    )
