"""The switch core: identity, the global event sequence, event clock and event routing.

FreeSWITCH stamps every event with the same Core-UUID/host block, a global
``Event-Sequence`` taken at creation, and the creation time; mod_event_socket then
walks its listeners and queues a copy for each one that wants it. Here an event is an
:class:`EventView` rendered lazily, once per wire format, at the moment it fires.
Routing is indexed: session listeners (``myevents``) are looked up by the event's
Unique-ID / Job-Owner-UUID so an event costs O(interested listeners), not O(calls).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from typing import Protocol

from fs_app.testing import wire

_UUID_RNG = random.Random(int.from_bytes(os.urandom(16), "big"))
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_uuid() -> str:
    """A random (version 4) UUID string; much cheaper than ``str(uuid.uuid4())`` (no syscall)."""
    h = f"{(_UUID_RNG.getrandbits(128) & _V4_CLEAR) | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# (file, function, line) FreeSWITCH 1.10.12 stamps into Event-Calling-* (from the recordings).
CALLING: dict[str, tuple[str, str, int]] = {
    "CHANNEL_DATA": ("mod_event_socket.c", "parse_command", 2021),
    "CHANNEL_PARK": ("switch_ivr.c", "switch_ivr_park", 1002),
    "CHANNEL_UNPARK": ("switch_ivr.c", "switch_ivr_park", 1213),
    "CHANNEL_EXECUTE": ("switch_core_session.c", "switch_core_session_exec", 2944),
    "CHANNEL_EXECUTE_COMPLETE": ("switch_core_session.c", "switch_core_session_exec", 2967),
    "CHANNEL_ANSWER": ("switch_channel.c", "switch_channel_perform_mark_answered", 3846),
    "CHANNEL_PROGRESS": ("switch_channel.c", "switch_channel_perform_mark_ring_ready_value", 3505),
    "CHANNEL_PROGRESS_MEDIA": ("switch_channel.c", "switch_channel_perform_mark_pre_answered", 3560),
    "CHANNEL_HANGUP": ("switch_channel.c", "switch_channel_perform_hangup", 3445),
    "CHANNEL_HANGUP_COMPLETE": ("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
    "CHANNEL_STATE": ("switch_channel.c", "switch_channel_perform_set_running_state", 2408),
    "CHANNEL_CALLSTATE": ("switch_channel.c", "switch_channel_perform_set_callstate", 301),
    "CHANNEL_CREATE": ("switch_core_state_machine.c", "switch_core_session_run", 626),
    "CHANNEL_DESTROY": ("switch_core_session.c", "switch_core_session_perform_destroy", 1584),
    "CHANNEL_OUTGOING": ("switch_core_session.c", "switch_core_session_outgoing_channel", 768),
    "CHANNEL_BRIDGE": ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1689),
    "CHANNEL_UNBRIDGE": ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1879),
    "CHANNEL_APPLICATION": ("switch_channel.c", "switch_channel_event_set_data", 2900),
    "DTMF": ("switch_channel.c", "switch_channel_dequeue_dtmf", 677),
    "PRIVATE_COMMAND": ("switch_ivr.c", "switch_ivr_parse_next_event", 804),
    "BACKGROUND_JOB": ("mod_event_socket.c", "api_exec", 1572),
    "HEARTBEAT": ("switch_core.c", "send_heartbeat", 87),
    "sofia::register": ("sofia_reg.c", "sofia_reg_handle_register_token", 2059),
    "sofia::unregister": ("sofia_reg.c", "sofia_reg_handle_register_token", 2213),
    "sofia::expire": ("sofia_reg.c", "sofia_reg_del_callback", 726),
}
_DEFAULT_CALLING = ("switch_event.c", "switch_event_fire_detailed", 2019)


def _calling_plain(key: str) -> str:
    file, func, line = CALLING.get(key, _DEFAULT_CALLING)
    return f"Event-Calling-File: {file}\nEvent-Calling-Function: {func}\nEvent-Calling-Line-Number: {line}\n"


_CALLING_PLAIN = {key: _calling_plain(key) for key in CALLING}


class EventStamp:
    """Creation time of one event in the forms FreeSWITCH writes (raw and URL-encoded)."""

    __slots__ = ("dates_plain", "gmt", "local", "micros")

    def __init__(self, local: str, gmt: str, micros: int, dates_plain: str) -> None:
        self.local = local
        self.gmt = gmt
        self.micros = micros
        self.dates_plain = dates_plain


class EventClock:
    """``Event-Date-*`` values; the formatted strings are cached per wall-clock second."""

    __slots__ = ("_dates_plain", "_gmt", "_local", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._local = ""
        self._gmt = ""
        self._dates_plain = ""

    def stamp(self) -> EventStamp:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._gmt = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
            self._dates_plain = (
                f"Event-Date-Local: {wire.encode_value(self._local)}\n"
                f"Event-Date-GMT: {wire.encode_value(self._gmt)}\n"
            )
        return EventStamp(self._local, self._gmt, int(now * 1_000_000), self._dates_plain)


class EventView:
    """One fired event; each wire format is rendered at most once, on first demand.

    Subclasses implement :meth:`render_plain` / :meth:`render_pairs`. Rendering happens
    synchronously inside :meth:`SwitchCore.dispatch`, while the source (a channel) is
    still in the state the event describes.
    """

    __slots__ = ("_json", "_pairs", "_plain", "_xml", "body", "job_owner", "name", "seq", "subclass", "unique_id")

    def __init__(
        self,
        name: str,
        seq: int,
        *,
        unique_id: str | None = None,
        job_owner: str | None = None,
        subclass: str | None = None,
        body: str | None = None,
    ) -> None:
        self.name = name
        self.seq = seq
        self.unique_id = unique_id
        self.job_owner = job_owner
        self.subclass = subclass
        self.body = body
        self._plain: bytes | None = None
        self._json: bytes | None = None
        self._xml: bytes | None = None
        self._pairs: list[tuple[str, str]] | None = None

    def render_plain(self) -> str:
        raise NotImplementedError

    def render_pairs(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def pairs(self) -> list[tuple[str, str]]:
        """Raw (not URL-encoded) header pairs in wire order, body excluded."""
        if self._pairs is None:
            self._pairs = self.render_pairs()
        return self._pairs

    def payload(self, fmt: str) -> bytes:
        if fmt == "plain":
            if self._plain is None:
                self._plain = self.render_plain().encode()
            return self._plain
        if fmt == "json":
            if self._json is None:
                self._json = wire.serialize_json(self.pairs(), self.body).encode()
            return self._json
        if self._xml is None:
            self._xml = wire.serialize_xml(self.pairs(), self.body).encode()
        return self._xml

    def header(self, name: str) -> str | None:
        """A header's raw value (first occurrence), as filters compare it."""
        if name == "Event-Name":
            return self.name
        if name == "Unique-ID" and self.unique_id is not None:
            return self.unique_id
        lname = name.lower()
        for key, value in self.pairs():
            if key.lower() == lname:
                return value
        return None


class SimpleEvent(EventView):
    """A non-channel event: std headers plus a fixed list of headers and an optional body."""

    __slots__ = ("_core", "extra", "stamp")

    def __init__(self, core: SwitchCore, name: str, seq: int, stamp: EventStamp, extra: list[tuple[str, str]],
                 **kwargs: str | None) -> None:
        super().__init__(name, seq, **kwargs)
        self._core = core
        self.stamp = stamp
        self.extra = extra

    def render_pairs(self) -> list[tuple[str, str]]:
        calling = self.subclass or self.name
        head = [("Event-Subclass", self.subclass)] if self.subclass is not None else []
        return head + self._core.std_pairs(self.name, self.seq, self.stamp, calling) + self.extra

    def render_plain(self) -> str:
        calling = self.subclass or self.name
        head = wire.plain_line("Event-Subclass", self.subclass) if self.subclass is not None else ""
        text = head + self._core.std_plain(self.name, self.seq, self.stamp, calling)
        text += "".join(wire.plain_line(k, v) for k, v in self.extra)
        body = self.body
        if body is not None:
            return text + f"Content-Length: {len(body.encode())}\n\n{body}"
        return text + "\n"


class EventSink(Protocol):
    """Anything that can receive routed events (an ESL listener)."""

    def wants(self, name: str) -> bool:
        """Cheap pre-check: could an event with this name be delivered at all?"""

    def offer(self, event: EventView) -> None: ...


class LogSink(Protocol):
    def offer_log(self, level: int, head_and_body: tuple[bytes, bytes]) -> None: ...


LOG_LEVELS = {"CONSOLE": 0, "ALERT": 1, "CRIT": 2, "ERR": 3, "WARNING": 4, "NOTICE": 5, "INFO": 6, "DEBUG": 7}
LOG_NAMES = {v: k for k, v in LOG_LEVELS.items()}


class SwitchCore:
    """Identity and event routing shared by every channel and listener of one emulator."""

    def __init__(
        self,
        *,
        hostname: str = "fs-emulator",
        switchname: str | None = None,
        ipv4: str = "127.0.0.1",
        ipv6: str = "::1",
        core_uuid: str | None = None,
        first_sequence: int = 1,
    ) -> None:
        self.core_uuid = core_uuid or new_uuid()
        self.hostname = hostname
        self.switchname = switchname or hostname
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.clock = EventClock()
        self._seq = first_sequence - 1
        self._ident_pairs = [
            ("Core-UUID", self.core_uuid),
            ("FreeSWITCH-Hostname", hostname),
            ("FreeSWITCH-Switchname", self.switchname),
            ("FreeSWITCH-IPv4", ipv4),
            ("FreeSWITCH-IPv6", ipv6),
        ]
        self._ident_plain = "".join(wire.plain_line(k, v) for k, v in self._ident_pairs)
        self._by_uuid: dict[str, list[EventSink]] = {}
        self._global: list[EventSink] = []
        self._log_sinks: list[tuple[LogSink, int]] = []
        self.started_monotonic = time.monotonic()
        self.sessions_since_startup = 0
        self.peak_sessions = 0
        self.session_count = 0

    # ------------------------------------------------------------------ events

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def std_plain(self, name: str, seq: int, stamp: EventStamp, calling: str | None = None) -> str:
        """Event-Name .. Event-Sequence, URL-encoded, in FreeSWITCH's order."""
        calling_block = _CALLING_PLAIN.get(calling or name) or _calling_plain(calling or name)
        return (
            f"Event-Name: {name}\n{self._ident_plain}{stamp.dates_plain}"
            f"Event-Date-Timestamp: {stamp.micros}\n"
            f"{calling_block}Event-Sequence: {seq}\n"
        )

    def std_pairs(self, name: str, seq: int, stamp: EventStamp, calling: str | None = None) -> list[tuple[str, str]]:
        file, func, line = CALLING.get(calling or name, _DEFAULT_CALLING)
        return [
            ("Event-Name", name),
            *self._ident_pairs,
            ("Event-Date-Local", stamp.local),
            ("Event-Date-GMT", stamp.gmt),
            ("Event-Date-Timestamp", str(stamp.micros)),
            ("Event-Calling-File", file),
            ("Event-Calling-Function", func),
            ("Event-Calling-Line-Number", str(line)),
            ("Event-Sequence", str(seq)),
        ]

    def simple_event(
        self,
        name: str,
        headers: Iterable[tuple[str, str]],
        *,
        body: str | None = None,
        subclass: str | None = None,
        unique_id: str | None = None,
        job_owner: str | None = None,
    ) -> EventView:
        """A non-channel event (BACKGROUND_JOB, CUSTOM, HEARTBEAT ...) ready to dispatch."""
        return SimpleEvent(self, name, self.next_seq(), self.clock.stamp(), list(headers), body=body,
                           subclass=subclass, unique_id=unique_id, job_owner=job_owner)

    # ----------------------------------------------------------------- routing

    def subscribe_session(self, uuid: str, sink: EventSink) -> None:
        sinks = self._by_uuid.setdefault(uuid, [])
        if sink not in sinks:
            sinks.append(sink)

    def unsubscribe_session(self, uuid: str, sink: EventSink) -> None:
        sinks = self._by_uuid.get(uuid)
        if sinks and sink in sinks:
            sinks.remove(sink)
            if not sinks:
                del self._by_uuid[uuid]

    def subscribe_global(self, sink: EventSink) -> None:
        if sink not in self._global:
            self._global.append(sink)

    def unsubscribe_global(self, sink: EventSink) -> None:
        if sink in self._global:
            self._global.remove(sink)

    def has_listeners_for(self, uuid: str) -> bool:
        return bool(self._global) or uuid in self._by_uuid

    def wants(self, uuid: str, name: str) -> bool:
        """Would any listener take an event ``name`` of channel ``uuid``? (cheap pre-check)"""
        sinks = self._by_uuid.get(uuid)
        if sinks:
            for sink in sinks:
                if sink.wants(name):
                    return True
        return any(sink.wants(name) for sink in self._global)

    def dispatch(self, event: EventView) -> None:
        key = event.unique_id or event.job_owner
        if key is not None:
            sinks = self._by_uuid.get(key)
            if sinks:
                for sink in tuple(sinks):
                    sink.offer(event)
        if self._global:
            for sink in tuple(self._global):
                sink.offer(event)

    # -------------------------------------------------------------------- logs

    def set_log_sink(self, sink: LogSink, level: int | None) -> None:
        self._log_sinks = [(s, lv) for s, lv in self._log_sinks if s is not sink]
        if level is not None:
            self._log_sinks.append((sink, level))

    def log(self, level: int, file: str, func: str, line: int, text: str, *, text_channel: int = 3) -> None:
        """Send a console log line to every listener that asked for ``log`` at this level."""
        if not self._log_sinks:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}"
        body = f"{stamp} 99.77% [{LOG_NAMES.get(level, 'DEBUG')}] {file}:{line} {text}\n".encode()
        frame = wire.log_data(body, level=level, text_channel=text_channel, file=file, func=func, line=line)
        for sink, wanted in tuple(self._log_sinks):
            if level <= wanted:
                sink.offer_log(level, frame)

    # ------------------------------------------------------------------- stats

    def session_created(self) -> None:
        self.sessions_since_startup += 1
        self.session_count += 1
        self.peak_sessions = max(self.peak_sessions, self.session_count)

    def session_destroyed(self) -> None:
        self.session_count = max(0, self.session_count - 1)
