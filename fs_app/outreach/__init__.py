"""Reaching people: alert calls (originate + IVR) under toll-fraud limits, and SMS."""
