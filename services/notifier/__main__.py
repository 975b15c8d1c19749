"""``python -m services.notifier``: run the notifier in the foreground (SIGTERM stops it)."""

import sys

from services.common.cli import run_service
from services.notifier.app import NotifierService
from services.notifier.settings import NotifierSettings

if __name__ == "__main__":
    sys.exit(
        run_service(
            name="notifier",
            description="Posts slack-messages to Slack (dry-run without a token) and produces "
            "one receipt per message to slack-message-receipts.",
            settings=NotifierSettings,
            build=NotifierService,
        )
    )
