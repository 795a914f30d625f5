"""Benchmarks (run as modules, e.g. ``python -m benchmarks.esl_parse``)."""
