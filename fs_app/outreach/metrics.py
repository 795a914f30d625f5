"""Prometheus metrics of alert calls, in the ESL layer's registry (``iim.core.metrics.REGISTRY``).

Label values are closed sets: outcome kinds, refusal reasons, IVR results.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from iim.core.metrics import REGISTRY

ORIGINATES = Counter(
    "iim_outreach_originates", "Alert calls placed, by outcome (answered, no_answer, busy, failed, unreachable, "
    "refused)", ["result"], registry=REGISTRY,
)
#: The one count of alert calls the toll-fraud guard refused (the scenario worker counts here too).
REFUSALS = Counter(
    "iim_originate_refused", "Alert calls refused by the toll-fraud guard, by reason", ["reason"],
    registry=REGISTRY,
)
IVR_RESULTS = Counter(
    "iim_outreach_ivr", "Alert-call IVR sessions on the outbound socket, by result", ["result"], registry=REGISTRY,
)
IN_FLIGHT = Gauge("iim_outreach_calls_in_flight", "Alert calls being placed or in their IVR", registry=REGISTRY)


def count_refusal(reason: str) -> None:
    REFUSALS.labels(reason).inc()
