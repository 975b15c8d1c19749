"""``python -m services.enricher``: run the enricher in the foreground (SIGTERM stops it)."""

import sys

from services.common.cli import run_service
from services.common.settings import CommonSettings, TopicSettings
from services.enricher.app import build_and_run
from services.enricher.settings import EnricherSettings

if __name__ == "__main__":
    sys.exit(
        run_service(
            name="enricher",
            description="Filters events, joins them with their account-team owner and produces "
            "Slack-ready messages to slack-messages.",
            settings_models=[CommonSettings, TopicSettings, EnricherSettings],
            build_and_run=build_and_run,
        )
    )
