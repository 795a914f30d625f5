"""The seeded fault schedule: which fault, when, on what, for how long. Pure: the same seed, the same run."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: kind -> weight. Every kind appears at least once when there are at least as many faults as kinds.
KINDS: dict[str, float] = {
    "pg_stop": 2.0,                    # SIGSTOP the whole server for N s, then SIGCONT
    "pg_restart": 1.0,                 # pg_ctl -m immediate stop, then start
    "esl_reset": 1.5,                  # reset the instance's ESL connection now, hold it down N s
    "esl_reset_after_originate": 2.0,  # ... right after an originate went through
    "kill": 1.0,                       # SIGKILL an instance now, restart it after N s
    "kill_after_claim": 1.5,           # ... on its next originate, before the switch sees it
    "kill_after_send": 1.5,            # ... right after its next originate went out
    "smsc_drop": 1.0,                  # reset the instance's SMPP connection, hold it down N s
    "smsc_restart": 0.5,               # SIGKILL the SMSC, start it again after N s
    "connector_500": 1.0,              # the vendor cloud answers the next k requests with 500
    "connector_timeout": 1.0,          # ... answers the next k requests too late
    "tts_down": 0.5,                   # restart an instance with speech down, back to normal after N s
}
#: Faults that share a resource run one after the other (two instances are never down together).
RESOURCE = {"pg_stop": "pg", "pg_restart": "pg", "kill": "instances", "kill_after_claim": "instances",
            "kill_after_send": "instances", "tts_down": "instances", "smsc_drop": "smsc", "smsc_restart": "smsc",
            "connector_500": "connector", "connector_timeout": "connector"}


@dataclass(frozen=True, slots=True)
class PlannedFault:
    at: float
    kind: str
    target: str
    duration: float
    count: int = 0

    @property
    def resource(self) -> str:
        return RESOURCE.get(self.kind, f"{self.kind.split('_')[0]}-{self.target}")


def plan(seed: int, faults: int, span_s: float, *, instances: tuple[str, ...] = ("a", "b"),
         pg_stop_max_s: float = 12.0, kinds: dict[str, float] | None = None) -> list[PlannedFault]:
    """``faults`` faults at uniform random times in ``[1, span_s]``."""
    rng = random.Random(seed)
    weights = kinds or KINDS
    names = list(weights)
    chosen = names[:faults] if faults < len(names) else list(names)
    chosen += rng.choices(names, weights=[weights[n] for n in names], k=max(0, faults - len(chosen)))
    rng.shuffle(chosen)
    times = sorted(rng.uniform(1.0, max(1.5, span_s)) for _ in chosen)
    out = []
    for at, kind in zip(times, chosen, strict=True):
        target = rng.choice(instances)
        duration = {"pg_stop": rng.uniform(1.0, pg_stop_max_s), "pg_restart": rng.uniform(0.0, 3.0),
                    "esl_reset": rng.uniform(0.0, 5.0), "esl_reset_after_originate": rng.uniform(0.0, 5.0),
                    "kill": rng.uniform(0.5, 3.0), "kill_after_claim": rng.uniform(0.5, 3.0),
                    "kill_after_send": rng.uniform(0.5, 3.0), "smsc_drop": rng.uniform(1.0, 8.0),
                    "smsc_restart": rng.uniform(0.5, 5.0), "tts_down": rng.uniform(5.0, 15.0)}.get(kind, 0.0)
        count = rng.randint(1, 5) if kind.startswith("connector") else 0
        out.append(PlannedFault(round(at, 3), kind, target, round(duration, 2), count))
    return out
