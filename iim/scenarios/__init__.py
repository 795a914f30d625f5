"""Scenarios: data-defined escalations for device incidents; pure decisions, separate executors."""
