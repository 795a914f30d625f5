"""The service's retention defaults, and the pure rule for how long a purge round waits before the next."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetentionDefaults", "next_round_delay"]

DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class RetentionDefaults:
    """What a tenant without its own ``iim.retention_policy`` value keeps, in seconds."""

    sms_body_s: int = DAY_S
    event_payload_s: int = 30 * DAY_S
    audit_detail_s: int = 365 * DAY_S
    #: Commands sent to hubs: at least a day, the row being what makes a retried command idempotent.
    hub_command_s: int = 90 * DAY_S

    def __post_init__(self) -> None:
        if min(self.sms_body_s, self.event_payload_s) < 0:
            raise ValueError("retention cannot be negative")
        if self.audit_detail_s < DAY_S:
            raise ValueError("audit details are kept at least a day")
        if self.hub_command_s < DAY_S:
            raise ValueError("hub commands are kept at least a day")


def next_round_delay(purged: dict[str, int], batch: int, interval_s: float) -> float:
    """Right away while a kind filled its batch (more is due), else the interval."""
    return 0.0 if any(n >= batch for n in purged.values()) else interval_s
