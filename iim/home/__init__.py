"""Telecom -> home deliveries: incoming SMS read aloud (with consent) and cloud-announced calls."""
