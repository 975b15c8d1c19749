"""Notifier: delivers slack-messages to Slack, once, and writes a receipt for every message."""
