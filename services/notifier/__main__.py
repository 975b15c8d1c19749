"""``python -m services.notifier``: run the notifier in the foreground (SIGTERM stops it)."""

import sys

from services.common.cli import run_service
from services.common.settings import CommonSettings, TopicSettings
from services.notifier.app import build_and_run
from services.notifier.settings import NotifierSettings

if __name__ == "__main__":
    sys.exit(
        run_service(
            name="notifier",
            description="Posts slack-messages to Slack (dry-run without a token) and produces "
            "one receipt per message to slack-message-receipts.",
            settings_models=[CommonSettings, TopicSettings, NotifierSettings],
            build_and_run=build_and_run,
        )
    )
