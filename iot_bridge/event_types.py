"""The kinds of device event IIM understands; shared by the bridge (validation) and scenarios (triggers)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


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
    BATTERY_OK = "battery_ok"
    SELF_TEST_FAILED = "self_test_failed"
    SELF_TEST_PASSED = "self_test_passed"
    #: IIM's own finding (device supervision: nothing heard past the device's interval); no device may report it
    OFFLINE = "offline"


#: Events that describe a danger to people; they open incidents (as do :data:`HEALTH` conditions). The rest are
#: housekeeping.
HAZARDS = frozenset({EventType.SMOKE, EventType.CO, EventType.DOORBELL, EventType.FALL, EventType.PULSE,
                     EventType.PANIC, EventType.WATER_LEAK, EventType.INTRUSION, EventType.TAMPER})

#: Device health (not a danger to people): each is a condition of the device that opens one non-emergency
#: incident when it is raised and is cleared by the events of :data:`HEALTH_CLEARS` (any event clears offline).
HEALTH = frozenset({EventType.OFFLINE, EventType.BATTERY_LOW, EventType.SELF_TEST_FAILED})
HEALTH_CLEARS: Mapping[EventType, EventType] = MappingProxyType({
    EventType.BATTERY_OK: EventType.BATTERY_LOW, EventType.SELF_TEST_PASSED: EventType.SELF_TEST_FAILED})
#: What only IIM reports, never a device or a vendor cloud.
OWN_FINDINGS = frozenset({EventType.OFFLINE})
