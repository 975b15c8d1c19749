"""``python -m services.enricher``: run the enricher in the foreground (SIGTERM stops it)."""

import sys

from services.common.cli import run_service
from services.enricher.app import Enricher
from services.enricher.settings import EnricherSettings

if __name__ == "__main__":
    sys.exit(
        run_service(
            name="enricher",
            description="Filters events, joins them with their account-team owner and produces "
            "Slack-ready messages to slack-messages.",
            settings=EnricherSettings,
            build=Enricher,
        )
    )
