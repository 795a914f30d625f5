"""One Event Socket connection as mod_event_socket's ``listener_t`` handles it.

:class:`EslListener` is the part shared by inbound and outbound sockets: command
framing (via :class:`fs_app.esl.CommandDecoder`), FreeSWITCH's ``parse_command`` with
its prefix matching and exact reply texts, event subscriptions and filters, event
delivery (Content-Length first, header and body as two sends), api/bgapi, linger and
the disconnect notices. Commands are handled strictly in order; a command that takes
time (a blocking ``api``, a sync-mode ``sendmsg``) blocks the ones behind it, as the
single listener thread does in FreeSWITCH.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from fs_app.esl import (
    Api,
    Auth,
    BgApi,
    Command,
    CommandDecoder,
    Connect,
    DivertEvents,
    EventSubscribe,
    Execute,
    Exit,
    Filter,
    FilterDelete,
    GetVar,
    HangupCmd,
    Linger,
    Log,
    MyEvents,
    NixEvent,
    NoEvents,
    NoLinger,
    NoLog,
    RawCommand,
    RemoteProtocolError,
    Resume,
    SendEvent,
)
from fs_app.testing import wire
from fs_app.testing.core import LOG_LEVELS, EventView, new_uuid
from fs_app.testing.faults import FaultConfig, FrameWriter
from fs_app.testing.session import Session

if TYPE_CHECKING:
    from fs_app.testing.emulator import FreeSwitchEmulator

MAX_MISSED = 500
MAX_BUFFERED_BYTES = 64 * 1024 * 1024

# switch_event.c EVENT_NAMES (the names ``event``/``nixevent`` accept).
EVENT_NAMES = frozenset(
    ["CUSTOM", "CLONE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_STATE", "CHANNEL_CALLSTATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HOLD", "CHANNEL_UNHOLD", "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_UNPARK", "CHANNEL_APPLICATION", "CHANNEL_ORIGINATE", "CHANNEL_UUID", "API", "LOG", "INBOUND_CHAN", "OUTBOUND_CHAN", "STARTUP", "SHUTDOWN", "PUBLISH", "UNPUBLISH", "TALK", "NOTALK", "SESSION_CRASH", "MODULE_LOAD", "MODULE_UNLOAD", "DTMF", "MESSAGE", "PRESENCE_IN", "NOTIFY_IN", "PRESENCE_OUT", "PRESENCE_PROBE", "MESSAGE_WAITING", "MESSAGE_QUERY", "ROSTER", "CODEC", "BACKGROUND_JOB", "DETECTED_SPEECH", "DETECTED_TONE", "PRIVATE_COMMAND", "HEARTBEAT", "TRAP", "ADD_SCHEDULE", "DEL_SCHEDULE", "EXE_SCHEDULE", "RE_SCHEDULE", "RELOADXML", "NOTIFY", "PHONE_FEATURE", "PHONE_FEATURE_SUBSCRIBE", "SEND_MESSAGE", "RECV_MESSAGE", "REQUEST_PARAMS", "CHANNEL_DATA", "GENERAL", "COMMAND", "SESSION_HEARTBEAT", "CLIENT_DISCONNECTED", "SERVER_DISCONNECTED", "SEND_INFO", "RECV_INFO", "RECV_RTCP_MESSAGE", "SEND_RTCP_MESSAGE", "CALL_SECURE", "NAT", "RECORD_START", "RECORD_STOP", "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE", "FAILURE", "SOCKET_DATA", "MEDIA_BUG_START", "MEDIA_BUG_STOP", "CONFERENCE_DATA_QUERY", "CONFERENCE_DATA", "CALL_SETUP_REQ", "CALL_SETUP_RESULT", "CALL_DETAIL", "DEVICE_STATE", "TEXT", "SHUTDOWN_REQUESTED", "ALL"]
)
MYEVENTS = frozenset(
    ["CHANNEL_ANSWER", "CHANNEL_APPLICATION", "CHANNEL_BRIDGE", "CHANNEL_CREATE", "CHANNEL_DATA", "CHANNEL_DESTROY", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_ORIGINATE", "CHANNEL_UUID", "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_STATE", "CHANNEL_UNBRIDGE", "CHANNEL_UNPARK", "DETECTED_SPEECH", "DTMF", "NOTALK", "TALK"]
)


def command_line(cmd: Command) -> str:
    """The command line FreeSWITCH would have read for a decoded command."""
    match cmd:
        case RawCommand(line=line):
            return line
        case Execute(uuid=u) | HangupCmd(uuid=u):
            return f"sendmsg {u}" if u else "sendmsg"
        case Connect():
            return "connect"
        case Auth(password=pw):
            return f"auth {pw}"
        case MyEvents(format=fmt, uuid=u):
            return " ".join(w for w in ("myevents", u, fmt) if w)
        case Linger(seconds=s):
            return "linger" if s is None else f"linger {s}"
        case NoLinger():
            return "nolinger"
        case EventSubscribe(format=fmt, names=names):
            return f"event {fmt} {' '.join(names)}".rstrip()
        case NoEvents():
            return "noevents"
        case Filter(header=h, value=v):
            return f"filter {h} {v}"
        case FilterDelete(header=h, value=v):
            return f"filter delete {h}" + (f" {v}" if v is not None else "")
        case Api(command=c):
            return f"api {c}"
        case BgApi(command=c):
            return f"bgapi {c}"
        case GetVar(name=n):
            return f"getvar {n}"
        case Resume():
            return "resume"
        case Exit():
            return "exit"
        case Log(level=lvl):
            return f"log {lvl}"
        case NoLog():
            return "nolog"
        case DivertEvents(on=on):
            return "divert_events on" if on else "divert_events off"
        case NixEvent(names=names):
            return f"nixevent {' '.join(names)}"
        case SendEvent(name=n):
            return f"sendevent {n}"


def _strip_cr(text: str) -> str:
    for sep in ("\r", "\n"):
        cut = text.find(sep)
        if cut >= 0:
            text = text[:cut]
    return text


def _header(cmd: Command, name: str) -> str | None:
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(cmd, (RawCommand, SendEvent)):
        headers = cmd.headers
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


class EslListener(asyncio.Protocol):
    """FreeSWITCH's side of one ESL connection (shared by inbound and outbound sockets)."""

    outbound = False

    def __init__(self, emu: FreeSwitchEmulator, faults: FaultConfig) -> None:
        self.emu = emu
        self.core = emu.core
        self.faults = faults
        self.loop = asyncio.get_running_loop()
        self.password = emu.password
        self.transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None
        self.decoder = CommandDecoder()
        self.queue: deque[Command] = deque()
        self.blocked = 0
        self.running = True
        self.closed = False
        self.stalled = False
        self.authed = False
        self.full = True
        self.async_mode = True
        self.session: Session | None = None
        self.events_on = False
        self.myevents = False
        self.all_events = False
        self.event_names: set[str] = set()
        self.custom: set[str] = set()
        self.format = "plain"
        self.filters: list[tuple[str, str]] = []
        self.log_level: int | None = None
        self.linger: int | None = None
        self.resume = False
        self.handled_disco = False
        self.mute_replies = False
        self.hold: list[tuple[bytes, bytes]] | None = None
        self.delivered = 0
        self.lost = 0
        self._routed: str | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._logs: list[tuple[bytes, bytes]] = []

    # ----------------------------------------------------------- asyncio side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but implement the same API.
        self.transport = cast(asyncio.Transport, transport)
        self.writer = FrameWriter(self.transport, self.faults)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.stalled:
            return
        try:
            commands = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            self.protocol_error(str(exc))
            return
        if commands:
            self.queue.extend(commands)
            self.pump()

    def eof_received(self) -> bool | None:
        self.peer_closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.peer_closed()
        self._cleanup()

    # --------------------------------------------------------------- hooks

    def peer_closed(self) -> None:
        """The application closed (or reset) its side."""
        self.shutdown()

    def protocol_error(self, message: str) -> None:
        """FreeSWITCH drops a connection whose command framing it cannot read."""
        self.finish(None)

    def record_sent(self, kind: str) -> None:
        """Subclasses record what they wrote (the outbound CallResult)."""

    def record_event(self, name: str) -> None:
        """Subclasses record delivered events."""

    # ------------------------------------------------------------- commands

    def pump(self) -> None:
        while self.queue and not self.blocked and self.running and not self.stalled:
            self.handle(self.queue.popleft())

    def block_on(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` with the command loop blocked (FreeSWITCH's busy listener thread)."""
        self.blocked += 1
        task = self.loop.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self.blocked -= 1
            if not t.cancelled() and t.exception() is not None:
                self.emu.note_error(f"listener task failed: {t.exception()!r}")
            self.pump()

        task.add_done_callback(done)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle(self, cmd: Command) -> None:
        line = command_line(cmd)
        low = line.lower()
        if low.startswith(("exit", "...")):
            self.reply("+OK bye")
            self.finish("exit")
            return
        if not self.authed:
            if low.startswith("auth "):
                self.cmd_auth(_strip_cr(line[5:]))
            else:
                self.reply("-ERR command not found")
            return
        if low.startswith("filter "):
            self.cmd_filter(_strip_cr(line[7:]))
            return
        if self.session is not None and low.startswith("resume"):
            self.resume = True
            self.session.channel.set_var("socket_resume", "true")
            self.reply("+OK")
            return
        if self.session is not None or low.startswith("myevents "):
            if low.startswith("connect"):
                self.cmd_connect()
                return
            if low.startswith("getvar"):
                self.cmd_getvar(_strip_cr(line))
                return
            if low.startswith("myevents"):
                self.cmd_myevents(line)
                return
        if low.startswith("divert_events"):
            self.cmd_divert(line[13:])
            return
        if low.startswith("sendmsg"):
            self.cmd_sendmsg(cmd, _strip_cr(line[7:]).strip(" "))
            return
        if self.outbound and not self.full:
            self.reply("-ERR command not found")
            return
        if low.startswith("sendevent"):
            self.cmd_sendevent(cmd, _strip_cr(line[9:]).strip(" \t"))
        elif low.startswith("api "):
            self.cmd_api(_strip_cr(line[4:]))
        elif low.startswith("bgapi "):
            job = cmd.job_uuid if isinstance(cmd, BgApi) else _header(cmd, "job-uuid")
            self.cmd_bgapi(_strip_cr(line[6:]), job or new_uuid())
        elif low.startswith("log"):
            self.cmd_log(_strip_cr(line))
        elif low.startswith("linger"):
            self.cmd_linger(line)
        elif low.startswith("nolinger"):
            if self.session is not None:
                self.linger = None
                self.reply("+OK will not linger")
            else:
                self.reply("-ERR not controlling a session")
        elif low.startswith("nolog"):
            if self.log_level is not None:
                self.log_level = None
                self.core.set_log_sink(self, None)
                self.reply("+OK no longer logging")
            else:
                self.reply("-ERR not loging")
        elif low.startswith("event"):
            self.cmd_event(_strip_cr(line))
        elif low.startswith("nixevent"):
            self.cmd_nixevent(_strip_cr(line))
        elif low.startswith("noevents"):
            if self.events_on:
                self.events_on = False
                self.all_events = False
                self.event_names.clear()
                self.custom.clear()
                self.update_routing()
                self.reply("+OK no longer listening for events")
            else:
                self.reply("-ERR not listening for events")
        else:
            self.reply("-ERR command not found")

    def cmd_auth(self, password: str) -> None:
        if password == self.password:
            self.authed = True
            self.reply("+OK accepted")
        else:
            self.reply("-ERR invalid")
            self.finish("auth-failed")

    def cmd_filter(self, text: str) -> None:
        text = text.lstrip(" ")
        name, sep, value = text.partition(" ")
        header_val: str | None = value if sep else None
        if name.lower() == "delete" and header_val is not None:
            name, sep2, rest = header_val.partition(" ")
            val = rest if sep2 else None
            if name.lower() == "all":
                self.filters.clear()
            else:
                self.filters = [
                    (h, v) for h, v in self.filters
                    if not (h.lower() == name.lower() and (val is None or v == val))
                ]
            self.reply(f"+OK filter deleted. [{name}][{val or ''}]")
            return
        if header_val is not None:
            if name.lower() == "add":
                name, sep2, rest = header_val.partition(" ")
                header_val = rest if sep2 else "(null)"
            self.filters.append((name, header_val))
            self.reply(f"+OK filter added. [{name}]=[{header_val}]")
            return
        self.reply("-ERR invalid syntax")

    def cmd_connect(self) -> None:
        session = self.session
        if session is None:
            self.reply("-ERR command not found")
            return
        data = session.channel.channel_data(async_mode=self.async_mode, full=self.full)
        self.send(data, "channel-data")

    def cmd_getvar(self, line: str) -> None:
        _, sep, name = line.partition(" ")
        value = ""
        if sep and self.session is not None:
            value = self.session.channel.lookup(name) or ""
        raw = value.encode()[:511]
        if not raw:
            self.reply("-ERR command not found")
            return
        self.send(b"Content-Type: command/reply\nReply-Text: " + raw + b"\n\n", "command/reply", raw.decode(
            "utf-8", "replace"))

    def cmd_myevents(self, line: str) -> None:
        if self.myevents:
            self.reply("-ERR aready enabled.")
            return
        if self.session is None:
            rest = _strip_cr(line[9:])
            target, _, fmt = rest.partition(" ")
            session = self.emu.sessions.get(target)
            if session is None:
                if fmt:
                    self.reply("-ERR invalid uuid")
                    return
            else:
                self.session = session
                session.attach(self)
                self.async_mode = True
            if fmt.lower() in ("xml", "plain", "json"):
                self.format = fmt.lower()
        self.event_names |= MYEVENTS
        self.myevents = True
        self.events_on = True
        if "xml" in line or "XML" in line:
            self.format = "xml"
        if "json" in line or "JSON" in line:
            self.format = "json"
        self.update_routing()
        self.reply("+OK Events Enabled")

    def cmd_divert(self, rest: str) -> None:
        if self.session is None:
            self.reply("-ERR not controlling a session.")
            return
        onoff = _strip_cr(rest.lstrip(" "))
        if not onoff:
            self.reply("-ERR missing value.")
        elif onoff.lower() == "on":
            self.reply("+OK events diverted")
        else:
            self.reply("+OK events not diverted")

    def cmd_sendmsg(self, cmd: Command, target: str) -> None:
        if not target:
            target = _header(cmd, "session-id") or ""
        own = self.session
        if target and own is not None and target == own.uuid:
            target = ""
        if not target and own is not None:
            self.sendmsg_own(cmd, own)
            return
        session = self.emu.sessions.get(target) if target else None
        if session is None:
            self.reply(f"-ERR invalid session id [{target}]")
            return
        self.reply("+OK")
        deliver_sendmsg(cmd, session)

    def sendmsg_own(self, cmd: Command, session: Session) -> None:
        """``sendmsg`` to the controlled session: queued (async) or run inline (sync)."""
        if self.async_mode or not isinstance(cmd, Execute):
            self.reply("+OK")
            deliver_sendmsg(cmd, session)
            return
        self.block_on(self._sync_execute(cmd, session))

    async def _sync_execute(self, cmd: Execute, session: Session) -> None:
        self.hold = []
        try:
            if session.channel.up:
                await session.execute(cmd)
        finally:
            held, self.hold = self.hold, None
            self.reply("+OK")
            self.release_held(held or [])
            if not session.channel.up:
                session.after_hangup()

    def cmd_sendevent(self, cmd: Command, name: str) -> None:
        event_uuid = new_uuid()
        headers = list(cmd.headers) if isinstance(cmd, (SendEvent, RawCommand)) else []
        body = cmd.body if isinstance(cmd, SendEvent) else None
        subclass = next((v for k, v in headers if k.lower() == "event-subclass"), None)
        headers.append(("Event-UUID", event_uuid))
        event_name = name.upper() if name.upper() in EVENT_NAMES else "CUSTOM"
        unique = next((v for k, v in headers if k.lower() == "unique-id"), None)
        event = self.core.simple_event(event_name, headers, body=body,
                                       subclass=subclass if event_name == "CUSTOM" else None, unique_id=unique)
        self.reply(f"+OK {event_uuid}")
        self.core.dispatch(event)

    def cmd_api(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        result = self.emu.run_api(name, arg or None, self)
        if isinstance(result, str):
            self.send_api(result)
            return

        async def finish(pending: Awaitable[str]) -> None:
            # The api runs in the listener thread: events queue up until the response is written.
            held: list[tuple[bytes, bytes]] = []
            self.hold = held
            try:
                output = await pending
            finally:
                self.hold = None
            self.send_api(output)
            self.release_held(held)

        self.block_on(finish(result))

    def release_held(self, held: list[tuple[bytes, bytes]]) -> None:
        writer = self.writer
        if writer is None:
            return
        for head, body in held:
            if not writer.closed:
                writer.write_pair(head, body)

    def send_api(self, text: str) -> None:
        head, body = wire.api_response(text.encode())
        self.send_pair(head, body, "api/response")

    def cmd_bgapi(self, text: str, job_uuid: str) -> None:
        name, _, arg = text.partition(" ")
        self.send(wire.bgapi_reply(job_uuid), "command/reply", f"+OK Job-UUID: {job_uuid}")
        owner = self.session.uuid if self.session is not None else None
        result = self.emu.run_api(name, arg or None, self, background=True)

        def fire(output: str) -> None:
            headers = [("Job-UUID", job_uuid)]
            if owner is not None:
                headers.append(("Job-Owner-UUID", owner))
            headers.append(("Job-Command", name))
            if arg:
                headers.append(("Job-Command-Arg", arg))
            self.core.dispatch(self.core.simple_event("BACKGROUND_JOB", headers, body=output, job_owner=owner))

        if isinstance(result, str):
            self.loop.call_soon(fire, result)
            return

        async def run(pending: Awaitable[str]) -> None:
            fire(await pending)

        self.emu.spawn(run(result))

    def cmd_log(self, line: str) -> None:
        level_s = line[3:]
        if level_s:
            level_s = level_s[1:]
        level: int | None = 7
        if level_s:
            level = int(level_s) if level_s.isdigit() and int(level_s) <= 7 else LOG_LEVELS.get(level_s.upper())
        if level is None:
            self.reply("-ERR invalid log level")
            return
        self.log_level = level
        self.core.set_log_sink(self, level)
        self.reply(f"+OK log level {level_s} [{level}]")

    def cmd_linger(self, line: str) -> None:
        if self.session is None:
            self.reply("-ERR not controlling a session")
            return
        if len(line) > 7 and line[6] == " ":
            match = re.match(r"\s*([+-]?\d+)", line[7:])
            self.linger = int(match.group(1)) if match else 0
            self.reply(f"+OK will linger {self.linger} seconds")
        else:
            self.linger = -1
            self.reply("+OK will linger")

    def _event_tokens(self, line: str, skip: int) -> list[str] | None:
        rest = line[skip:]
        cut = rest.find(" ")
        if cut < 0:
            return None
        return rest[cut + 1 :].split(" ")

    def cmd_event(self, line: str) -> None:
        tokens = self._event_tokens(line, 5)
        keys = 0
        custom = False
        for index, word in enumerate(tokens or ()):
            if index == 0 and word.lower() in ("xml", "plain", "json"):
                self.format = word.lower()
                continue
            if custom:
                self.custom.add(word)
            elif word in EVENT_NAMES:
                keys += 1
                if word == "ALL":
                    self.all_events = True
                self.event_names.add(word)
                if word == "CUSTOM":
                    custom = True
        if not keys:
            self.reply("-ERR no keywords supplied")
            return
        self.events_on = True
        self.update_routing()
        self.reply(f"+OK event listener enabled {self.format}")

    def cmd_nixevent(self, line: str) -> None:
        tokens = self._event_tokens(line, 5)
        keys = 0
        custom = False
        for word in tokens or ():
            if custom:
                self.custom.discard(word)
            elif word in EVENT_NAMES:
                keys += 1
                if word == "CUSTOM":
                    custom = True
                elif word == "ALL":
                    self.all_events = False
                    self.event_names.clear()
                else:
                    if self.all_events:
                        self.all_events = False
                        self.event_names = set(EVENT_NAMES) - {"ALL"}
                    self.event_names.discard(word)
        if not keys:
            self.reply("-ERR no keywords supplied")
            return
        self.events_on = True
        self.update_routing()
        self.reply("+OK events nixed")

    # ---------------------------------------------------------------- events

    def update_routing(self) -> None:
        """Register with the core's router according to the current flags."""
        want: str | None = None
        if self.events_on and not self.closed:
            want = "session" if self.myevents and self.session is not None else "global"
        if want == self._routed:
            return
        if self._routed == "session" and self.session is not None:
            self.core.unsubscribe_session(self.session.uuid, self)
        elif self._routed == "global":
            self.core.unsubscribe_global(self)
        if want == "session" and self.session is not None:
            self.core.subscribe_session(self.session.uuid, self)
        elif want == "global":
            self.core.subscribe_global(self)
        self._routed = want

    def _filters_pass(self, event: EventView) -> bool:
        send = False
        for name, value in self.filters:
            hval = event.header(name)
            if hval is None:
                continue
            comp = value
            pos = True
            while comp and comp[0] in "+- ":
                if comp[0] == "+":
                    pos = True
                elif comp[0] == "-":
                    pos = False
                comp = comp[1:]
            if send and pos:
                continue
            if not comp:
                continue
            if value.startswith("/"):
                pattern = comp[1:-1] if comp.endswith("/") and len(comp) > 1 else comp.lstrip("/")
                try:
                    matched = re.search(pattern, hval) is not None
                except re.error:
                    matched = False
            else:
                matched = hval.lower() == comp.lower()
            if matched:
                if pos:
                    send = True
                else:
                    return False
        return send

    def wants(self, name: str) -> bool:
        return self.events_on and not self.closed and (self.all_events or name in self.event_names)

    def offer(self, event: EventView) -> None:
        """FreeSWITCH's event_handler check for this listener, then queue/write the event."""
        if not self.events_on or self.closed:
            return
        if not self.all_events:
            if event.name not in self.event_names:
                return
            if event.name == "CUSTOM" and event.subclass is not None and event.subclass not in self.custom:
                return
        if self.filters and not self._filters_pass(event):
            return
        if self.myevents:
            session = self.session
            if session is not None:
                if event.unique_id != session.uuid and event.job_owner != session.uuid:
                    return
            elif event.unique_id is None:
                return
        self.deliver(event)

    def deliver(self, event: EventView) -> None:
        writer = self.writer
        if writer is None or writer.closed or self.stalled:
            return
        fmt = self.format
        body = event.payload(fmt)
        head = wire.EVENT_HEADERS[fmt] % len(body)
        if self.hold is not None:
            self.hold.append((head, body))
        else:
            writer.write_pair(head, body)
        self.delivered += 1
        self.record_event(event.name)
        limit = self.faults.overflow_after_events
        if limit is not None:
            if self.delivered >= limit:
                self.kill(wire.LOST_EVENTS_BODY)
        elif not self.delivered & 31 and writer.buffered() > MAX_BUFFERED_BYTES:
            # FreeSWITCH's per-listener queue is full: it drops events and, past MAX_MISSED, kills us.
            self.lost += 32
            if self.lost > MAX_MISSED:
                self.kill(wire.LOST_EVENTS_BODY)

    def offer_log(self, level: int, head_and_body: tuple[bytes, bytes]) -> None:
        """Queue a log line; FreeSWITCH writes its log queue when the listener is idle."""
        if self.closed or self.writer is None:
            return
        self._logs.append(head_and_body)
        if len(self._logs) == 1:
            self.loop.call_soon(self._flush_logs)

    def _flush_logs(self) -> None:
        logs, self._logs = self._logs, []
        writer = self.writer
        if self.closed or writer is None:
            return
        for head, body in logs:
            writer.write_pair(head, body)
            self.record_sent("log/data")

    # ---------------------------------------------------------------- output

    def reply(self, text: str) -> None:
        if self.mute_replies:
            return
        self.send(wire.command_reply(text), "command/reply", text)

    def send(self, data: bytes, kind: str, reply_text: str | None = None) -> None:
        writer = self.writer
        if writer is None or writer.closed:
            return
        writer.write(data)
        self.record_sent(kind if reply_text is None else f"{kind} {reply_text}")

    def send_pair(self, head: bytes, body: bytes, kind: str) -> None:
        writer = self.writer
        if writer is None or writer.closed:
            return
        writer.write_pair(head, body)
        self.record_sent(kind)

    # -------------------------------------------------------------- teardown

    def session_hangup(self, session: Session) -> None:
        if self.faults.early_notice:
            self.channel_down_notice()

    def session_down(self, session: Session) -> None:
        self.channel_down_notice()

    def channel_down_notice(self) -> None:
        """What FreeSWITCH's listener does once it sees its channel down (LFLAG_HANDLE_DISCO)."""
        if self.handled_disco or self.closed or self.session is None:
            return
        self.handled_disco = True
        if self.linger is None:
            self.finish("no-linger")
            return
        session = self.session
        writer = self.writer
        if writer is not None and not writer.closed:
            writer.write(wire.linger_notice(session.uuid, session.channel.name, self.linger))
            self.record_sent("text/disconnect-notice linger")
        if self.linger >= 0:
            delay = self.linger * self.emu.time_scale
            self._linger_timer = self.loop.call_later(delay, self.finish, "linger-timeout")

    def finish(self, reason: str | None, body: bytes = wire.DISCONNECT_BODY) -> None:
        """End the listener as FreeSWITCH does: disconnect notice, then close (FIN)."""
        if self.closed:
            return
        writer = self.writer
        if writer is not None and not writer.closed:
            head, data = wire.disconnect_notice(self.session.uuid if self.session is not None else None, body)
            writer.write_pair(head, data)
            self.record_sent("text/disconnect-notice disconnect")
            writer.close()
        self.on_finish(reason)
        self.shutdown()

    def kill(self, body: bytes) -> None:
        """kill_listener: a disconnect notice with the given body, then shutdown."""
        self.finish("killed", body)

    def on_finish(self, reason: str | None) -> None:
        """Subclasses record why the listener ended."""

    def shutdown(self) -> None:
        """Stop processing, leave the router, release the session."""
        if self.closed:
            return
        self.closed = True
        self.running = False
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.queue.clear()
        self.update_routing()
        self.core.set_log_sink(self, None)
        if self.writer is not None and not self.writer.closed:
            self.writer.close()
        session = self.session
        if session is not None:
            session.release(self)
        self.on_closed()

    def on_closed(self) -> None:
        """Subclasses finalise their bookkeeping."""

    def _cleanup(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()


def deliver_sendmsg(cmd: Command, session: Session) -> None:
    """Queue a sendmsg on a session (private event)."""
    if isinstance(cmd, Execute):
        session.queue_execute(cmd)
    elif isinstance(cmd, HangupCmd):
        session.hangup(cmd.cause)
