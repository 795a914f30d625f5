"""HTTPS bridge for device events: verification, validation, rate limits, durable intake."""
