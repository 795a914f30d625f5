"""Subscriber policy: PostgreSQL registry (source of truth) and the in-memory routing cache."""
