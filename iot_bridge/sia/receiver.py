"""The SIA DC-09 receiver: one frame in, one reply out, each event through the device bridge's intake.

For a frame whose CRC, length, account, key, timestamp and data all check, every report that means something
(:mod:`iot_bridge.sia.codes`) becomes a :class:`~iot_bridge.events.DeviceEvent` of the account's device and is
taken by :meth:`Bridge.accept <iot_bridge.app.Bridge.accept>`: the same ledger, replay answer, incident and
first decision as an event posted to ``POST /v1/events``. The ACK is sent only after that commit. Then:

- a duplicate (a panel repeating a frame it got no ACK for: same account, sequence and timestamp) is the same
  ``event_id``, so it is acknowledged again and stored once; without a timestamp (plain messages may omit it)
  the sequence names one message within a ten-minute slot of the receiver's clock (a repeat that crosses a
  slot's end is stored again, and joins the incident the first copy opened);
- PostgreSQL away or past the bridge's store deadline, or the sender over its rate: no reply at all (the TCP
  connection is closed), so the panel repeats the frame later or turns to its backup receiver: an alarm is
  never acknowledged before it is stored;
- every other refusal is a NAK or DUH as :mod:`iot_bridge.sia.codec` describes, counted and logged with its
  reason (the reply itself says nothing more).

Extended data (:mod:`iot_bridge.sia.xdata`) rides along in each event's payload: the location, the
verification URL (https only; kept for the operator, never put in a message to the household nor said on a
call: whoever can send a plain frame under an account number could otherwise send a link from IIM's name),
the panel's MAC and alarm text. The panel's time of occurrence is the event's ``occurred_at`` when it is
within the same window as the message timestamp (else the message's time, or the receiver's, is). A block
that does not read, or a time outside the window, is dropped and counted (``iim_sia_extended_dropped``); it
never costs the alarm its ACK.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from prometheus_client import Counter

from iim.core.metrics import REGISTRY
from iot_bridge.app import Bridge, BridgeRefusal
from iot_bridge.directory import DeviceKeys
from iot_bridge.events import DeviceEvent
from iot_bridge.intake import IntakeOutcome, KnownDevice, StoreDown
from iot_bridge.sia import codec
from iot_bridge.sia.accounts import AccountUnusable, SiaAccount, find_account
from iot_bridge.sia.codes import Report, read_reports
from iot_bridge.sia.xdata import Extended, read_extended

__all__ = ["EXTENDED_DROPPED", "FRAMES", "SiaReceiver"]

log = logging.getLogger(__name__)

FRAMES = Counter("iim_sia_frames", "SIA DC-09 frames by reply (ack, nak, duh, none) and reason",
                 ["reply", "reason"], registry=REGISTRY)
EXTENDED_DROPPED = Counter("iim_sia_extended_dropped", "SIA extended data blocks dropped (the alarm was taken), "
                           "by block and reason", ["block", "reason"], registry=REGISTRY)
#: Without a timestamp, a sequence number names one message within this many seconds of its arrival.
UNSTAMPED_WINDOW_S = 600


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class SiaReceiver:
    """Frames to replies, for both drivers (TCP and UDP); ``clock`` is the receiver's time (UTC)."""

    bridge: Bridge
    clock: Callable[[], datetime] = field(default=_now)

    async def answer(self, item: codec.Frame | codec.FrameError, source: str) -> bytes | None:
        """The reply to one frame (or to the error reading it was); None: no reply (the sender repeats later)."""
        now = self.clock()
        try:
            self.bridge.rate_limit_source(source)  # first: a flood of garbage is not answered (nor logged) either
        except BridgeRefusal:
            FRAMES.labels("none", "rate-limited").inc()
            return None
        if isinstance(item, codec.FrameError):
            return self._refuse(item, now, source)
        try:
            async with self.bridge.store_deadline():
                account = await find_account(self.bridge.pool, item)
                content = codec.open_content(item, account.key)
                if not codec.within_window(content.timestamp, now):
                    raise codec.FrameError(codec.Reply.NAK, "timestamp outside the window", item)
                reports = read_reports(item.message_id, content.data)
                extended = self._extended(content, item, now)
                for index, report in enumerate(reports):
                    if report.event_type is not None:
                        await self._take(account, item, content, extended, report, index, now, source)
        except AccountUnusable as exc:
            return self._refuse(codec.FrameError(codec.Reply.DUH, exc.reason, item), now, source,
                                label="unknown-account")
        except codec.FrameError as exc:
            return self._refuse(exc, now, source)
        except StoreDown as exc:
            FRAMES.labels("none", "store-unavailable").inc()
            log.error("SIA frame not acknowledged: the event store is unavailable: %s", exc)
            return None
        except BridgeRefusal as exc:
            self.bridge.refused(exc, source)
            if exc.status == 429:
                FRAMES.labels("none", exc.error_id).inc()
                return None
            return self._refuse(codec.FrameError(codec.Reply.DUH, exc.reason, item), now, source,
                                label=exc.error_id)
        FRAMES.labels("ack", item.message_id.value).inc()
        return codec.ack(item, account.key, now)

    def _refuse(self, error: codec.FrameError, now: datetime, source: str, *, label: str | None = None) -> bytes:
        """NAK or DUH; ``label`` is the metric's reason where ``error.reason`` may name an account."""
        FRAMES.labels(error.reply.value.lower(), label or error.reason).inc()
        account = error.frame.account if error.frame is not None else None
        log.warning("SIA frame from %s answered %s: %s", source, error.reply.value, error.reason,
                    extra={"account": account})
        return codec.nak(now) if error.reply is codec.Reply.NAK else codec.duh(error.frame)

    @staticmethod
    def _extended(content: codec.Content, frame: codec.Frame, now: datetime) -> Extended:
        """The frame's extended data as kept; each dropped block counted and logged (the alarm goes on)."""
        extended = read_extended(content.extended, content.malformed)
        if extended.occurred_at is not None and not codec.within_window(extended.occurred_at, now):
            extended = replace(extended, occurred_at=None,
                               dropped=(*extended.dropped, ("H", "time-outside-window")))
        for block, reason in extended.dropped:
            EXTENDED_DROPPED.labels(block, reason).inc()
        if extended.dropped:
            log.info("SIA frame from account %s: extended data dropped: %s", frame.account,
                     ", ".join(f"{block} {reason}" for block, reason in extended.dropped))
        return extended

    async def _take(self, account: SiaAccount, frame: codec.Frame, content: codec.Content, extended: Extended,
                    report: Report, index: int, now: datetime, source: str) -> IntakeOutcome:
        assert report.event_type is not None
        device = account.device
        if not device.external_id:  # the registry's external id is optional; the event names the device anyway
            device = KnownDevice(device.tenant_id, device.id, device.household_id, str(device.id), device.type)
        stamp = (content.timestamp.strftime("%Y%m%dT%H%M%S") if content.timestamp is not None
                 else f"r{int(now.timestamp()) // UNSTAMPED_WINDOW_S}")
        event = DeviceEvent.model_validate({
            "event_id": f"sia-{frame.account}-{frame.sequence}-{stamp}-{index}",
            "device_id": device.external_id,
            "type": report.event_type.value,
            "occurred_at": extended.occurred_at or content.timestamp or now,
            "payload": {**report.payload(), **extended.payload(), "account": account.account,
                        "sequence": frame.sequence,
                        "receiver": frame.receiver or "", "line": frame.line, "protocol": frame.message_id.value},
            "severity": None,
        })
        # What makes two copies the same message: the frame's meaning, not its encryption's random pad.
        meaning = json.dumps([frame.message_id.value, frame.sequence, content.data, content.extended,
                              content.timestamp.isoformat() if content.timestamp else None, index],
                             separators=(",", ":"))
        self.bridge.rate_limit_sender(device.tenant_id, device.external_id, hazard=report.event_type)
        started = time.perf_counter()
        outcome = await self.bridge.accept(
            _carried(device), event, fingerprint=hashlib.sha256(meaning.encode()).hexdigest(),
            channel="sia", msg_id=f"sia-{frame.sequence}", source=source)
        log.info("SIA %s %s from account %s: %s in %.1f ms", report.code, report.event_type.value, account.account,
                 outcome.kind, (time.perf_counter() - started) * 1000)
        return outcome


def _carried(device: KnownDevice) -> DeviceKeys:
    """The device as the bridge's intake takes it; no keys: the receiver authenticated it by its account."""
    return DeviceKeys(device, None, (), ())
