"""A session: one channel, its serial application executor and its teardown.

FreeSWITCH runs a channel's applications one after another in the session thread
(``sendmsg`` execute in async mode queues a private event that the park loop
dequeues; event-lock serialises them). Hangup interrupts the running application,
which still completes (CHANNEL_EXECUTE_COMPLETE comes *after* CHANNEL_HANGUP), and
then the state machine tears the channel down::

    CHANNEL_UNPARK, EXECUTE_COMPLETE(socket), CHANNEL_STATE CS_HANGUP, CHANNEL_CALLSTATE HANGUP,
    CHANNEL_STATE CS_REPORTING, CHANNEL_HANGUP_COMPLETE            ... (listeners released)
    CHANNEL_DESTROY, CHANNEL_STATE CS_DESTROY

CHANNEL_DESTROY waits until every controlling listener released the session (an
outbound socket holds the session's read lock), so it never reaches those sockets.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fs_app.esl import Execute, LocalProtocolError, serialise
from fs_app.testing.channel import Channel
from fs_app.testing.core import SwitchCore, new_uuid
from fs_app.testing.http_cache import HttpCache
from fs_app.testing.spec import BridgeRecord, ExecutionRecord, RecordingRecord, TargetBehaviour
from fs_app.testing.templates import cdr_vars

if TYPE_CHECKING:
    from fs_app.testing.templates import OriginateParams, SipCallerParams


class SessionHost(Protocol):
    """What a session needs from the emulator that owns it."""

    core: SwitchCore
    rng: random.Random
    time_scale: float
    playback_ms: float | None
    sounds_dir: Path | None
    tts_engines: frozenset[str]
    http_cache: HttpCache

    def target_for(self, endpoint: str) -> TargetBehaviour: ...

    def register_session(self, session: Session) -> None: ...

    def unregister_session(self, session: Session) -> None: ...

    def note_recording(self, record: RecordingRecord) -> None: ...

    def note_error(self, message: str) -> None: ...

    def note_invalid_application(self, uuid: str, app: str) -> None: ...

    def note_execution(self, record: ExecutionRecord) -> None: ...

    def note_bridge(self, record: BridgeRecord) -> None: ...


class SessionController(Protocol):
    """A listener bound to a session (outbound socket, inbound ``myevents <uuid>``)."""

    def session_hangup(self, session: Session) -> None:
        """CHANNEL_HANGUP has just fired."""

    def session_down(self, session: Session) -> None:
        """The session reached the point where FreeSWITCH's listener sees the channel down."""


AppImpl = Callable[["Session", str], Awaitable[str | None]]


class Session:
    """Channel + executor. All timing goes through :meth:`wait`, which a hangup interrupts."""

    def __init__(
        self,
        host: SessionHost,
        channel: Channel,
        *,
        socket_data: str | None = None,
        deferred_teardown: bool = False,
        caller: SipCallerParams | None = None,
    ) -> None:
        self.host = host
        self.channel = channel
        self.uuid = channel.uuid
        self.loop = asyncio.get_running_loop()
        self.socket_data = socket_data
        self.deferred_teardown = deferred_teardown
        self.caller = caller
        self.originate_params: OriginateParams | None = None
        self.apps: deque[Execute] = deque()
        self.controllers: list[SessionController] = []
        self.parked = False
        self.busy = False
        self.torn_down = False
        self.destroyed = False
        self.down_notified = False
        self.pending_ack: list[tuple[str, str]] = []
        self.dtmf: deque[str] = deque()
        self.dtmf_duration_ms = 280
        self.bridged_to: str | None = None
        self.digits_collected: str | None = None
        self.private_events = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._exec_task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self.on_teardown: list[Callable[[Session], None]] = []
        self.on_park: list[Callable[[Session], None]] = []
        host.register_session(self)

    # ------------------------------------------------------------------ timing

    def scaled(self, ms: float) -> float:
        """Seconds for a scripted duration in milliseconds, after the emulator's time scale."""
        return max(0.0, ms) * self.host.time_scale / 1000.0

    async def wait(self, seconds: float) -> bool:
        """Sleep; False if the channel hung up (before or during the wait)."""
        if not self.channel.up:
            return False
        if seconds <= 0:
            return True
        fut: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = fut
        handle = self.loop.call_later(seconds, _resolve, fut, True) if seconds != math.inf else None
        try:
            return await fut
        finally:
            if handle is not None:
                handle.cancel()
            if self._waiter is fut:
                self._waiter = None

    def interrupt(self, value: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timers.append(self.loop.call_later(delay, callback))

    # --------------------------------------------------------------- execution

    def park(self) -> None:
        """Enter the park loop (async outbound socket): CHANNEL_PARK, once."""
        if self.parked or not self.channel.up:
            return
        self.parked = True
        self.channel.fire("CHANNEL_PARK")
        for callback in tuple(self.on_park):
            callback(self)

    def unpark(self) -> None:
        """Leave the park loop: CHANNEL_UNPARK (the loop variables of the last app are gone by then)."""
        if not self.parked:
            return
        self.parked = False
        ch = self.channel
        ch.set_var("current_loop", None)
        ch.set_var("total_loops", None)
        ch.fire("CHANNEL_UNPARK")

    def queue_execute(self, cmd: Execute, *, park_first: bool = True) -> None:
        """Async ``sendmsg`` execute: queued, run in order; ignored once the channel is down.

        ``park_first``: the channel sits in the socket app's park loop, which fires
        CHANNEL_PARK before it dequeues the first private event.
        """
        if not self.channel.up:
            return
        self.apps.append(cmd)
        if self._exec_task is None:
            self._exec_task = self.loop.create_task(self._drain(park_first))

    async def _drain(self, park_first: bool) -> None:
        try:
            if park_first:
                self.park()
            while self.apps and self.channel.up:
                await self.execute(self.apps.popleft(), private=True)
        finally:
            self._exec_task = None
            self.apps.clear()
            if not self.channel.up:
                self.after_hangup()

    async def execute(self, cmd: Execute, *, private: bool = False) -> None:
        """Run one application: CHANNEL_EXECUTE, the app, CHANNEL_EXECUTE_COMPLETE."""
        from fs_app.testing.apps import APPS, app_unknown
        from fs_app.testing.modules import APPLICATIONS

        ch = self.channel
        app = cmd.app
        arg = cmd.arg if cmd.arg else None
        if app not in APPLICATIONS:
            # switch_core_session_execute_application_get_flags: no application interface by that name. No
            # CHANNEL_EXECUTE or EXECUTE_COMPLETE: the channel is hung up (an A-leg caller gets 502).
            ch.core.log(3, "switch_core_session.c", "switch_core_session_execute_application_get_flags", 2766,
                        f"Invalid Application {app}")
            self.host.note_invalid_application(self.uuid, app)
            self.hangup("DESTINATION_OUT_OF_ORDER")
            return
        self.host.note_execution(ExecutionRecord(self.uuid, app, arg))
        self.busy = True
        try:
            self.flush_ack()
            ch.set_var("current_application_response", None)
            ch.set_var("current_loop", "1")
            ch.set_var("total_loops", str(cmd.loops or 1))
            ch.set_var("current_application", app)
            ch.set_var("current_application_data", arg)
            ch.last_app, ch.last_arg = app, arg
            app_uuid = cmd.event_uuid or new_uuid()
            data = [("Application-Data", arg)] if arg is not None else []
            ch.fire("CHANNEL_EXECUTE", post=[("Application", app), *data, ("Application-UUID", app_uuid)])
            if arg is not None:
                ch.set_var("current_application_data", arg)
            ch.set_var("current_application", app)
            impl = APPS.get(app, app_unknown)
            response = None
            for _ in range(max(1, cmd.loops or 1)):
                response = await impl(self, arg or "")
                if not ch.up:
                    break
            if response is not None:
                ch.set_var("current_application_response", response)
            ch.fire(
                "CHANNEL_EXECUTE_COMPLETE",
                post=[("Application", app), *data, ("Application-Response", response or "_none_"),
                      ("Application-UUID", app_uuid)],
            )
            if private:
                self._fire_private_command(cmd)
        finally:
            self.busy = False

    def _fire_private_command(self, cmd: Execute) -> None:
        ch = self.channel
        if not ch.core.wants(ch.uuid, "PRIVATE_COMMAND"):
            ch.core.next_seq()
            return
        try:
            text = serialise(cmd).decode("utf-8", "replace")
        except LocalProtocolError:
            text = f"sendmsg\ncall-command: execute\nexecute-app-name: {cmd.app}\n\n"
        headers = [("Command", text), ("call-command", "execute"), ("execute-app-name", cmd.app)]
        if cmd.arg:
            headers.append(("execute-app-arg", cmd.arg))
        if cmd.event_lock:
            headers.append(("event-lock", "true"))
        if cmd.event_uuid:
            headers.append(("Event-UUID", cmd.event_uuid))
        self.channel.fire("PRIVATE_COMMAND", pre=headers, with_vars=False)

    def flush_ack(self) -> None:
        """Variables sofia sets when the caller's ACK arrives (applied before the next event)."""
        if self.pending_ack:
            self.channel.set_vars(self.pending_ack)
            self.pending_ack = []

    # ----------------------------------------------------------------- hangup

    def hangup(self, cause: str = "NORMAL_CLEARING", extra: list[tuple[str, str]] | None = None) -> None:
        """Hang the channel up from anywhere (app, API, far end, socket loss)."""
        ch = self.channel
        if not ch.up:
            return
        if ch.hangup_disposition is None:
            ch.hangup_disposition = "send_bye" if ch.answered else "send_refuse"
        if self._exec_task is None and not self.busy:
            # No application is running: the loop variables of the last one are gone.
            ch.set_var("current_loop", None)
            ch.set_var("total_loops", None)
        if not ch.mark_hangup(cause, extra or ()):
            return
        for ctl in tuple(self.controllers):
            ctl.session_hangup(self)
        self.interrupt(False)
        if self._exec_task is None and not self.busy:
            self.after_hangup()

    def caller_hangup(self) -> None:
        """The calling party ends the call: CANCEL before answer, BYE after."""
        ch = self.channel
        if not ch.up:
            return
        if ch.answered:
            ch.hangup_disposition = "recv_bye"
            self.hangup("NORMAL_CLEARING", [("sip_term_status", "200"),
                                            ("proto_specific_hangup_cause", "sip:200"),
                                            ("sip_term_cause", "16")])
        else:
            ch.hangup_disposition = "recv_cancel"
            self.hangup("ORIGINATOR_CANCEL", [("sip_hangup_disposition", "recv_cancel"),
                                              ("sip_invite_failure_status", "487"),
                                              ("sip_invite_failure_phrase", "CANCEL"),
                                              ("sip_term_status", "487"),
                                              ("proto_specific_hangup_cause", "sip:487"),
                                              ("sip_term_cause", "487")])

    def after_hangup(self) -> None:
        """The running application (if any) has completed after the hangup."""
        if self.down_notified:
            return
        if self.deferred_teardown and self.controllers:
            self._notify_down()
            return
        self.teardown()

    def _notify_down(self) -> None:
        if self.down_notified:
            return
        self.down_notified = True
        for ctl in tuple(self.controllers):
            ctl.session_down(self)

    def teardown(self) -> None:
        """The state machine after hangup, up to CHANNEL_HANGUP_COMPLETE."""
        if self.torn_down:
            return
        self.torn_down = True
        ch = self.channel
        self.flush_ack()
        self.unpark()
        if self.socket_data is not None:
            response = ch.get_var("current_application_response") or "_none_"
            ch.fire(
                "CHANNEL_EXECUTE_COMPLETE",
                post=[("Application", "socket"), ("Application-Data", self.socket_data),
                      ("Application-Response", response), ("Application-UUID", new_uuid())],
            )
        ch.set_state("CS_HANGUP")
        ch.fire("CHANNEL_STATE", with_vars=False)
        ch.set_call_state("HANGUP")
        ch.set_state("CS_REPORTING")
        ch.fire("CHANNEL_STATE", with_vars=False)
        profile = ch.profile
        cid = f'"{profile.get("Caller-ID-Name") or ""}" <{profile.get("Caller-ID-Number") or ""}>'
        cause = ch.hangup_cause or "NORMAL_CLEARING"
        duration_s = max(0, ch.hangup_us - ch.answered_us) / 1e6 if ch.answered_us else 0
        ch.set_vars(
            cdr_vars(
                cause=cause, created_us=ch.created_us, answered_us=ch.answered_us, progress_us=ch.progress_us,
                progress_media_us=ch.progress_media_us, bridged_us=ch.bridged_us, ended_us=ch.hangup_us,
                last_app=ch.last_app, last_arg=ch.last_arg, caller_id=cid,
                hangup_disposition=ch.hangup_disposition, rtp_out_packets=int(duration_s * 50), media=ch.media,
            )
        )
        ch.fire("CHANNEL_HANGUP_COMPLETE", pre_data=[("Hangup-Cause", cause)], hangup_in_data=False)
        for callback in tuple(self.on_teardown):
            callback(self)
        if self.controllers:
            self._notify_down()
        else:
            self.destroy()

    def attach(self, controller: SessionController) -> None:
        if controller not in self.controllers:
            self.controllers.append(controller)

    def release(self, controller: SessionController) -> None:
        """A controlling listener is gone (the read lock is released)."""
        if controller in self.controllers:
            self.controllers.remove(controller)
        if self.controllers:
            return
        if self.channel.up:
            # The socket went away without ``resume``: the park loop ends and the call hangs up.
            self.hangup("NORMAL_CLEARING")
            return
        if not self.torn_down:
            if not self.busy and self._exec_task is None:
                self.teardown()
            return
        self.destroy()

    def destroy(self) -> None:
        if self.destroyed:
            return
        self.destroyed = True
        ch = self.channel
        ch.fire("CHANNEL_DESTROY")
        ch.set_state("CS_DESTROY")
        ch.fire("CHANNEL_STATE", with_vars=False)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.host.unregister_session(self)
        if not self.done.done():
            self.done.set_result(None)

    def kill(self) -> None:
        """Stop everything (emulator shutdown)."""
        if self._exec_task is not None:
            self._exec_task.cancel()
        for timer in self._timers:
            timer.cancel()
        if not self.done.done():
            self.done.set_result(None)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
