"""The kinds of device event IIM understands; shared by the bridge (validation) and scenarios (triggers)."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    SMOKE = "smoke"
    CO = "co"
    DOORBELL = "doorbell"
    FALL = "fall"
    PULSE = "pulse"
    PANIC = "panic"
    WATER_LEAK = "water_leak"
    INTRUSION = "intrusion"
    HEARTBEAT = "heartbeat"
    BATTERY_LOW = "battery_low"
    TAMPER = "tamper"
    CLEARED = "cleared"


#: Events that describe a danger to people; they open incidents. The rest are housekeeping.
HAZARDS = frozenset({EventType.SMOKE, EventType.CO, EventType.DOORBELL, EventType.FALL, EventType.PULSE,
                     EventType.PANIC, EventType.WATER_LEAK, EventType.INTRUSION, EventType.TAMPER})
