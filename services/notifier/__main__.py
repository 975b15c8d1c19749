"""``python -m services.notifier``: run the notifier in the foreground (SIGTERM stops it).

``python -m services.notifier receipt MESSAGE_ID`` prints a message's delivery receipt instead.
"""

import sys

from services.common.cli import run_service
from services.notifier.app import NotifierService
from services.notifier.settings import NotifierSettings

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
            build=NotifierService,
        )
    )
