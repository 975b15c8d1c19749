"""``python -m services.dlq``: list, show and re-drive dead letters (mechanism in libs.kafka)."""
