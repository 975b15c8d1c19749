"""The enricher: filters events, joins them with who owns the customer, renders Slack alerts."""
