"""The outbound socket: FreeSWITCH dials the application (dialplan ``socket host:port async full``).

FreeSWITCH says nothing until the application sends its first command; only a
``connect`` first command is answered (with the CHANNEL_DATA block), any other first
command is processed silently. It waits 25 s for that first command. In async mode
the channel is parked (CHANNEL_PARK) once connected and ``sendmsg`` execute is queued;
in sync (``static``) mode the listener runs inside the session thread, so ``sendmsg``
is answered only after the application finished and the teardown events after the
hangup are never seen by the socket. Without ``full`` only a handful of commands work.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fs_app.esl import Command, Execute
from fs_app.testing.faults import FaultConfig
from fs_app.testing.listener import EslListener
from fs_app.testing.session import Session
from fs_app.testing.spec import CallResult, Disconnect

if TYPE_CHECKING:
    from fs_app.testing.emulator import FreeSwitchEmulator

_FINISH_REASONS: dict[str, Disconnect] = {
    "no-linger": "no-linger",
    "linger-timeout": "linger-timeout",
    "killed": "killed",
    "first-command-timeout": "first-command-timeout",
}


def parse_socket_data(data: str) -> tuple[str, int, str | None, bool, bool]:
    """``host[:port][/path] [async] [full]`` -> (host, port, path, async, full); port defaults to 8084."""
    words = data.split()
    target = words[0] if words else "127.0.0.1"
    flags = {w.lower() for w in words[1:]}
    path: str | None = None
    if "/" in target:
        target, _, path = target.partition("/")
    host, port = target, 8084
    if ":" in target:
        head, _, tail = target.rpartition(":")
        if tail.isdigit():
            host, port = head.strip("[]"), int(tail)
    return host, port, path, "async" in flags, "full" in flags


class OutboundSocket(EslListener):
    """FreeSWITCH's listener for one outbound-socket call."""

    outbound = True

    def __init__(
        self,
        emu: FreeSwitchEmulator,
        session: Session,
        *,
        async_mode: bool,
        full: bool,
        result: CallResult,
        faults: FaultConfig,
        first_command_timeout_s: float,
        caller_hangup_after_ms: float | None = None,
        max_duration_s: float | None = None,
    ) -> None:
        super().__init__(emu, faults)
        self.async_mode = async_mode
        self.full = full
        self.authed = True
        self.session = session
        self.result = result
        self.first_seen = False
        self.connected = False
        self.first_command_timeout_s = first_command_timeout_s
        self.caller_hangup_after_ms = caller_hangup_after_ms
        self.max_duration_s = max_duration_s
        self.closed_future: asyncio.Future[None] = self.loop.create_future()
        self._timers: list[asyncio.TimerHandle] = []
        session.attach(self)
        session.deferred_teardown = not async_mode
        session.on_park.append(self._flood)

    # ----------------------------------------------------------------- timing

    def _later(self, delay: float, callback: object) -> None:
        self._timers.append(self.loop.call_later(delay, callback))  # type: ignore[arg-type]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.result.connected_at = time.monotonic()
        faults = self.faults
        scale = self.emu.time_scale
        self._later(self.first_command_timeout_s, self._first_command_timeout)
        if self.caller_hangup_after_ms is not None:
            self._later(self.caller_hangup_after_ms * scale / 1000.0, self._caller_hangup)
        if faults.stall_after_ms is not None:
            self._later(faults.stall_after_ms / 1000.0, self.stall)
        if faults.reset_after_ms is not None:
            self._later(faults.reset_after_ms / 1000.0, self.reset)
        if self.max_duration_s is not None:
            self._later(self.max_duration_s, self._max_duration)

    def _first_command_timeout(self) -> None:
        if not self.first_seen and not self.closed:
            self.finish("first-command-timeout")

    def _caller_hangup(self) -> None:
        session = self.session
        if session is not None:
            session.caller_hangup()

    def _max_duration(self) -> None:
        if self.closed:
            return
        self.result.error = self.result.error or "call exceeded max_duration_s"
        if self.result.disconnect is None:
            self.result.disconnect = "timeout"
        if self.session is not None:
            self.session.hangup("NORMAL_CLEARING")
        self.finish(None)

    # ----------------------------------------------------------------- faults

    def stall(self) -> None:
        """Become a silent peer."""
        if self.closed or self.stalled:
            return
        self.stalled = True
        if self.result.disconnect is None:
            self.result.disconnect = "stalled"
        if self.writer is not None:
            self.writer.stall()

    def reset(self) -> None:
        """Abort the TCP connection with an RST."""
        if self.closed:
            return
        if self.result.disconnect is None:
            self.result.disconnect = "reset"
        if self.writer is not None:
            self.writer.reset()
        self.shutdown()

    # --------------------------------------------------------------- commands

    def handle(self, cmd: Command) -> None:
        result = self.result
        result.commands.append(cmd)
        now = time.monotonic()
        if isinstance(cmd, Execute):
            if cmd.app == "bridge" and result.bridge_command_at is None:
                result.bridge_command_at = now
            faults = self.faults
            if faults.stall_on_app is not None and cmd.app == faults.stall_on_app:
                self.stall()
                return
            if faults.reset_on_app is not None and cmd.app == faults.reset_on_app:
                self.reset()
                return
        if not self.first_seen:
            self.first_seen = True
            result.first_command_at = now
            self.mute_replies = True
            try:
                super().handle(cmd)
            finally:
                self.mute_replies = False
            return
        super().handle(cmd)

    def cmd_connect(self) -> None:
        super().cmd_connect()
        if self.connected:
            return
        self.connected = True
        if self.async_mode:
            delay = self.emu.park_delay_ms / 1000.0
            if delay <= 0:
                self._park()
            else:
                self._later(delay, self._park)

    def _park(self) -> None:
        session = self.session
        if session is None or session.parked or not session.channel.up or session.busy:
            return
        session.park()

    def _flood(self, session: Session) -> None:
        count = self.faults.flood_events
        if not count:
            return
        ch = session.channel
        for index in range(count):
            ch.fire("CHANNEL_APPLICATION", post=[("Application-Name", "emulator_flood"),
                                                 ("Application-Data", str(index))], with_vars=False)

    # ------------------------------------------------------------- recording

    def record_sent(self, kind: str) -> None:
        self.result.sent.append(kind)
        if kind.startswith("command/reply "):
            self.result.replies.append(kind[14:])

    def record_event(self, name: str) -> None:
        self.result.sent.append("event " + name)
        self.result.events.append(name)

    def session_hangup(self, session: Session) -> None:
        if self.result.hangup_at is None:
            self.result.hangup_at = time.monotonic()
        super().session_hangup(session)

    def on_finish(self, reason: str | None) -> None:
        result = self.result
        if result.disconnect is not None or reason is None:
            return
        if reason == "exit":
            session = self.session
            lingering = session is not None and not session.channel.up
            result.disconnect = "linger-exit" if lingering else "app-exit"
        else:
            result.disconnect = _FINISH_REASONS.get(reason)

    def peer_closed(self) -> None:
        if not self.closed and self.result.disconnect is None:
            self.result.disconnect = "app-closed"
        self.shutdown()

    def protocol_error(self, message: str) -> None:
        self.result.error = f"unparseable command stream: {message}"
        super().protocol_error(message)

    def on_closed(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.result.closed_at = time.monotonic()
        if not self.closed_future.done():
            self.closed_future.set_result(None)


def finalise_result(result: CallResult, session: Session) -> None:
    """Copy the channel's final state into the call result."""
    ch = session.channel
    result.hangup_cause = ch.hangup_cause
    result.answered = ch.answered
    result.originate_disposition = ch.get_var("originate_disposition")
    result.bridged_to = session.bridged_to
    result.digits_collected = session.digits_collected
    result.resumed = ch.get_var("socket_resume") == "true"
    result.variables = dict(ch.vars)
