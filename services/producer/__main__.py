"""``python -m services.producer``: poll the warehouse, produce events (see --help)."""

from __future__ import annotations

import sys

from services.common.cli import run_service
from services.producer.app import ProducerService
from services.producer.settings import ProducerSettings

if __name__ == "__main__":
    sys.exit(
        run_service(
            name="producer",
            description="Polls warehouse queries (first: onboarding-started) and produces one "
            "event per new row, with a gap-free (timestamp, key) cursor committed in the same "
            "Kafka transaction as the events.",
            settings=ProducerSettings,
            build=ProducerService,
        )
    )
