"""SIA event codes and Contact ID events -> IIM's device-event types (pure).

What a panel reports is read into :class:`Report` items; only those with a meaning for people at home map to
an :class:`~iot_bridge.event_types.EventType` (the same types a device posts to the HTTPS bridge, so the same
scenarios escalate them). A report with no mapping (an arming, an opening, a test the operator does not
supervise) is understood and acknowledged but opens nothing. A restore of an alarm is ``cleared``.

SIA codes (SIA DC-03): FA fire, KA heat, GA gas/CO, MA/QA medical, PA/HA panic and hold-up, BA burglary,
WA water, TA tamper, XT/YT low battery, RP automatic test (:data:`SIA_CODES`). Contact ID (SIA DC-05)
over ADM-CID: qualifier 1 new event, 3 restore, 6 previously reported (taken as new); event codes 1xx alarms,
3xx troubles, 6xx tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from iot_bridge.event_types import EventType
from iot_bridge.sia.codec import FrameError, MessageId, Reply

__all__ = ["CID_EVENTS", "SIA_CODES", "Report", "read_reports"]

#: SIA two-letter codes: (event type, is a restore).
SIA_CODES: Final[dict[str, tuple[EventType, bool]]] = {
    "FA": (EventType.SMOKE, False), "FH": (EventType.SMOKE, True), "FR": (EventType.SMOKE, True),
    "KA": (EventType.SMOKE, False), "KH": (EventType.SMOKE, True), "KR": (EventType.SMOKE, True),
    "GA": (EventType.CO, False), "GH": (EventType.CO, True), "GR": (EventType.CO, True),
    "MA": (EventType.PANIC, False), "MH": (EventType.PANIC, True), "MR": (EventType.PANIC, True),
    "QA": (EventType.PANIC, False), "QH": (EventType.PANIC, True), "QR": (EventType.PANIC, True),
    "PA": (EventType.PANIC, False), "PH": (EventType.PANIC, True), "PR": (EventType.PANIC, True),
    "HA": (EventType.PANIC, False), "HH": (EventType.PANIC, True), "HR": (EventType.PANIC, True),
    "BA": (EventType.INTRUSION, False), "BH": (EventType.INTRUSION, True), "BR": (EventType.INTRUSION, True),
    "WA": (EventType.WATER_LEAK, False), "WH": (EventType.WATER_LEAK, True), "WR": (EventType.WATER_LEAK, True),
    "TA": (EventType.TAMPER, False), "TR": (EventType.TAMPER, True),
    "XT": (EventType.BATTERY_LOW, False), "YT": (EventType.BATTERY_LOW, False),
    "RP": (EventType.HEARTBEAT, False),
}

#: Contact ID event codes (or ranges' first digits) -> event type.
CID_EVENTS: Final[dict[str, EventType]] = {
    "100": EventType.PANIC, "101": EventType.PANIC, "102": EventType.PANIC,  # medical, pendant, fail to report
    "110": EventType.SMOKE, "111": EventType.SMOKE, "112": EventType.SMOKE, "113": EventType.SMOKE,
    "114": EventType.SMOKE, "115": EventType.SMOKE, "116": EventType.SMOKE, "117": EventType.SMOKE,
    "118": EventType.SMOKE,
    "120": EventType.PANIC, "121": EventType.PANIC, "122": EventType.PANIC, "123": EventType.PANIC,
    "130": EventType.INTRUSION, "131": EventType.INTRUSION, "132": EventType.INTRUSION,
    "133": EventType.INTRUSION, "134": EventType.INTRUSION, "135": EventType.INTRUSION,
    "136": EventType.INTRUSION, "137": EventType.TAMPER, "139": EventType.INTRUSION,
    "151": EventType.CO, "162": EventType.CO, "154": EventType.WATER_LEAK,
    "302": EventType.BATTERY_LOW, "309": EventType.BATTERY_LOW, "384": EventType.BATTERY_LOW,
    "602": EventType.HEARTBEAT, "603": EventType.HEARTBEAT,
}

_SIA_DATA = re.compile(r"[NO](?P<items>[\x20-\x7e]*)")
_SIA_ITEM = re.compile(r"(?P<code>[A-Z]{2})(?P<address>[0-9A-Za-z]{0,8})(?:\^[\x20-\x5d\x5f-\x7e]{0,64}\^)?")
_MODIFIER = re.compile(r"(?P<name>ti|id|ri|pi)(?P<value>[0-9:]{0,8})")
_CID_DATA = re.compile(r"(?P<qualifier>[136])(?P<code>[0-9]{3}) (?P<group>[0-9]{2}) (?P<zone>[0-9]{3})")


@dataclass(frozen=True, slots=True)
class Report:
    """One thing the panel reported: its code (``FA``; ``CID:1110``), where (zone or user, area), and what it
    means to IIM (None: acknowledged, nothing opened)."""

    code: str
    zone: str
    area: str
    event_type: EventType | None

    def payload(self) -> dict[str, str]:
        return {"sia_code": self.code, "zone": self.zone, "area": self.area}


def read_reports(message_id: MessageId, data: str) -> tuple[Report, ...]:
    """The reports in a frame's data (without the ``#acct|`` prefix).

    Raises:
        FrameError: DUH when the data is not SIA-DCS / ADM-CID data.
    """
    if message_id is MessageId.NULL:
        return ()
    if message_id is MessageId.ADM_CID:
        return (_contact_id(data),)
    return _sia(data)


def _sia(data: str) -> tuple[Report, ...]:
    match = _SIA_DATA.fullmatch(data)
    if match is None:
        raise FrameError(Reply.DUH, "SIA-DCS data does not start with N or O")
    area = ""
    reports: list[Report] = []
    for item in match["items"].split("/"):
        modifier = _MODIFIER.fullmatch(item)
        if modifier is not None:
            if modifier["name"] == "ri":
                area = modifier["value"]
            continue
        code = _SIA_ITEM.fullmatch(item)
        if code is None:
            raise FrameError(Reply.DUH, "SIA-DCS data item not understood")
        mapped = SIA_CODES.get(code["code"])
        event_type = None if mapped is None else EventType.CLEARED if mapped[1] else mapped[0]
        reports.append(Report(code["code"], code["address"], area, event_type))
    if not reports:
        raise FrameError(Reply.DUH, "SIA-DCS data holds no event code")
    return tuple(reports)


def _contact_id(data: str) -> Report:
    match = _CID_DATA.fullmatch(data)
    if match is None:
        raise FrameError(Reply.DUH, "ADM-CID data is not 'QEEE GG ZZZ'")
    event_type = CID_EVENTS.get(match["code"])
    if event_type is not None and match["qualifier"] == "3":
        event_type = EventType.CLEARED if event_type not in (EventType.HEARTBEAT, EventType.BATTERY_LOW) else None
    return Report(f"CID:{match['qualifier']}{match['code']}", match["zone"], match["group"], event_type)
