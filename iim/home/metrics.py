"""Prometheus metrics of home deliveries, in the service's registry (``iim.core.metrics.REGISTRY``).

Labels are small closed sets (outcome, reason code, delivery kind and result).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from iim.core.metrics import REGISTRY

SMS_READOUTS = Counter(
    "iim_home_sms_readouts", "MO SMS handled for the home, by outcome (read_aloud, shown, nothing, failed, "
    "duplicate)", ["outcome"], registry=REGISTRY,
)
SMS_REFUSALS = Counter(
    "iim_home_sms_refusals", "Reasons an SMS (or a device) was left out, by code", ["code"], registry=REGISTRY,
)
SMS_DELIVERIES = Counter(
    "iim_home_sms_deliveries", "Per-device deliveries, by kind (tts, text) and result", ["kind", "result"],
    registry=REGISTRY,
)
TTS_FALLBACKS = Counter(
    "iim_home_sms_tts_unavailable", "SMS shown as text because TTS could not render", registry=REGISTRY,
)
SMS_SECONDS = Histogram(
    "iim_home_sms_readout_seconds", "MO SMS handed over to the last connector answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
ANNOUNCEMENTS = Counter(
    "iim_home_call_announcements", "Cloud announcements of incoming calls, by result", ["result"],
    registry=REGISTRY,
)
CLOUD_CALLS = Counter(
    "iim_home_cloud_calls", "Calls handled by the cloud-announcement step, by what happened", ["outcome"],
    registry=REGISTRY,
)
