"""The one backoff formula: exponential, capped, jittered.

Jitter keeps a fleet of IIM instances from retrying in lockstep after a shared dependency comes back
(the reconnect storms seen in FusionPBX and OpenSIPS after a FreeSWITCH restart).
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, initial: float, ceiling: float, *, factor: float = 2.0, jitter: float = 0.5,
                  rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (1-based): ``min(ceiling, initial * factor**(attempt-1))``, of which the
    last ``jitter`` fraction is random (0.5: uniform in [d/2, d]; 0: exactly d)."""
    delay = min(ceiling, initial * factor ** min(max(attempt, 1) - 1, 64))
    if jitter <= 0:
        return delay
    return delay * (1.0 - jitter) + (rng or random).uniform(0.0, delay * jitter)
