"""FreeSwitchEmulator: the public entry point.

It owns one switch core (Core-UUID, Event-Sequence, event routing), the live sessions,
the scripted callee behaviours, SIP registrations, and the inbound listening sockets.
Outbound calls are placed with :meth:`FreeSwitchEmulator.place_call`; inbound clients
connect to the server returned by :meth:`FreeSwitchEmulator.start_inbound`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import wave
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from fs_app.testing import wire
from fs_app.testing.api import API_COMMANDS, ApiResult
from fs_app.testing.channel import CallerProfile, Channel, now_us
from fs_app.testing.core import SwitchCore, new_uuid
from fs_app.testing.faults import NO_FAULTS, FaultConfig
from fs_app.testing.http_cache import HttpCache
from fs_app.testing.inbound import InboundServer
from fs_app.testing.listener import EslListener
from fs_app.testing.outbound import OutboundSocket, finalise_result, parse_socket_data
from fs_app.testing.session import Session
from fs_app.testing.spec import (
    BridgeRecord,
    CallResult,
    CallSpec,
    ExecutionRecord,
    OriginateRecord,
    RecordingRecord,
    TargetBehaviour,
)
from fs_app.testing.templates import (
    SipCallerParams,
    expire_headers,
    per_call_vars,
    random_tag,
    register_headers,
    sofia_inbound_vars,
    unregister_headers,
)

_UTF8_VALUE = "Привет, мир — 你好 ☎ ünïcödé"



@dataclass(slots=True)
class Registration:
    user: str
    domain: str
    contact: str
    expires: int
    call_id: str
    network_ip: str
    network_port: int
    user_agent: str
    profile: str
    registered_at: float


class FreeSwitchEmulator:
    """An emulated FreeSWITCH 1.10.12 Event Socket (outbound and inbound).

    Args:
        targets: behaviour per dialled endpoint (matched exactly, after stripping ``[..]`` leg vars).
        default_target: behaviour of endpoints not in ``targets``.
        faults: default fault knobs for every connection (a CallSpec may override).
        time_scale: multiplies every scripted duration (callee delays, leg timeouts, playback,
            linger N, app timeouts); 0.01 runs a 3 s scenario in 30 ms.
        playback_ms: how long media that exists plays; None: its real length (tone/silence streams, WAV
            headers; see ``fs_app.testing.media``). Media that does not exist never plays (FILE NOT FOUND).
        sounds_dir: where relative file names are looked up (FreeSWITCH's sounds directory); None: nowhere, as
            on a switch without a sound package.
        tts_engines: the TTS modules the switch has, for ``say:`` with the channel's ``tts_engine`` (the shipped
            configuration loads none, so ``say:`` does not play: pass ``("flite",)`` to model a switch that
            loads mod_flite, as ``IIM_ALERT_PROMPT_TTS=freeswitch`` needs).
        first_command_timeout_s: how long an outbound socket waits for the first command (FS: 25 s).
        park_delay_ms: delay between ``connect`` and CHANNEL_PARK when no sendmsg arrives first.
        write_recordings: ``record`` writes a WAV file without audio (header only) at its path.

    ``originates`` lists every ``originate`` received (newest last, the last 10 000);
    ``recordings`` every ``record`` run (the last 10 000).
    """

    def __init__(
        self,
        targets: Mapping[str, TargetBehaviour] | None = None,
        default_target: TargetBehaviour | None = None,
        *,
        hostname: str = "fs-emulator",
        ipv4: str = "127.0.0.1",
        ipv6: str = "::1",
        sip_ip: str = "127.0.0.1",
        sip_port: int = 5080,
        password: str = wire.DEFAULT_PASSWORD,
        faults: FaultConfig = NO_FAULTS,
        time_scale: float = 1.0,
        playback_ms: float | None = 20.0,
        first_command_timeout_s: float = 25.0,
        park_delay_ms: float = 20.0,
        seed: int | None = None,
        core_uuid: str | None = None,
        write_recordings: bool = False,
        sounds_dir: Path | None = None,
        tts_engines: Iterable[str] = (),
    ) -> None:
        self.core = SwitchCore(hostname=hostname, ipv4=ipv4, ipv6=ipv6, core_uuid=core_uuid)
        self.targets: dict[str, TargetBehaviour] = dict(targets or {})
        self.default_target = default_target or TargetBehaviour.answer()
        self.sip_ip = sip_ip
        self.sip_port = sip_port
        self.password = password
        self.faults = faults
        self.time_scale = time_scale
        self.playback_ms = playback_ms
        self.sounds_dir = sounds_dir
        self.tts_engines = frozenset(tts_engines)
        self.first_command_timeout_s = first_command_timeout_s
        self.park_delay_ms = park_delay_ms
        self.rng = random.Random(seed)
        self.sessions: dict[str, Session] = {}
        self.registrations: dict[tuple[str, str], Registration] = {}
        self.servers: set[InboundServer] = set()
        self.global_vars: dict[str, str] = {
            "hostname": hostname, "local_ip_v4": ipv4, "local_ip_v6": ipv6, "domain": sip_ip,
            "switch_serial": "emulator",
        }
        self.errors: list[str] = []
        self.results: list[CallResult] = []
        self.originates: deque[OriginateRecord] = deque(maxlen=10_000)
        #: mod_hash's table (``hash insert/select/delete``): in memory, gone when the switch restarts
        self.hash_db: dict[str, str] = {}
        #: called with each originate as it arrives (benchmarks time them; the deque keeps only the last ones)
        self.originate_listeners: list[Callable[[OriginateRecord], None]] = []
        self.recordings: deque[RecordingRecord] = deque(maxlen=10_000)
        #: (channel uuid, application) of every ``execute`` the switch refused as an Invalid Application
        self.invalid_applications: deque[tuple[str, str]] = deque(maxlen=10_000)
        #: every application a channel ran, in order (the last 10 000)
        self.executions: deque[ExecutionRecord] = deque(maxlen=10_000)
        #: every ``bridge`` whose B-leg answered, with the keys that crossed it (the last 10 000)
        self.bridges: deque[BridgeRecord] = deque(maxlen=10_000)
        self.write_recordings = write_recordings
        #: ``http_cache://`` prompts, fetched over HTTP like mod_http_cache (``http_cache.fetched`` lists them)
        self.http_cache = HttpCache()
        self.keep_results = False
        self._session_ids = itertools.count(1)
        self._prototypes: dict[tuple[object, ...], tuple[str, CallerProfile, Channel]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --------------------------------------------------------------- plumbing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def next_session_id(self) -> int:
        return next(self._session_ids)

    def register_session(self, session: Session) -> None:
        self.sessions[session.uuid] = session
        self.core.session_created()

    def unregister_session(self, session: Session) -> None:
        if self.sessions.get(session.uuid) is session:
            del self.sessions[session.uuid]
            self.core.session_destroyed()

    def note_error(self, message: str) -> None:
        self.errors.append(message)

    def note_recording(self, record: RecordingRecord) -> None:
        """A ``record`` application finished; optionally leave a WAV (header only, no audio) behind."""
        self.recordings.append(record)
        if not self.write_recordings or record.uploaded is not None:  # an upload leaves no file here
            return
        try:
            path = Path(record.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with wave.open(str(path), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(8000)
        except OSError as exc:
            self.note_error(f"record {record.path}: {exc}")

    def note_invalid_application(self, uuid: str, app: str) -> None:
        self.invalid_applications.append((uuid, app))

    def note_execution(self, record: ExecutionRecord) -> None:
        self.executions.append(record)

    def note_bridge(self, record: BridgeRecord) -> None:
        self.bridges.append(record)

    def executions_on(self, uuid: str) -> list[ExecutionRecord]:
        """The applications channel ``uuid`` ran, in order."""
        return [e for e in self.executions if e.uuid == uuid]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.note_error(f"background task failed: {t.exception()!r}")

        task.add_done_callback(done)

    def target_for(self, endpoint: str) -> TargetBehaviour:
        """The scripted behaviour of a dialled endpoint."""
        target = self.targets.get(endpoint)
        if target is not None:
            return target
        if endpoint.startswith("error/"):
            return TargetBehaviour.reject(endpoint[6:].upper())
        if endpoint.startswith("user/"):
            user, _, domain = endpoint[5:].partition("@")
            if not self.is_registered(user, domain or None):
                return TargetBehaviour.not_registered()
        return self.default_target

    def originates_to(self, destination: str) -> list[OriginateRecord]:
        """The originates whose first leg dialled ``destination`` (user part or whole endpoint)."""
        return [o for o in self.originates if destination in (o.destination, *o.endpoints)]

    def run_api(
        self, name: str, arg: str | None, listener: EslListener | None = None, *, background: bool = False
    ) -> ApiResult:
        """Run an API command; the text FreeSWITCH would return (or an awaitable of it)."""
        func = API_COMMANDS.get(name)
        if func is None:
            return f"-ERR {name} Command not found!\n"
        return func(self, arg, listener)

    # ---------------------------------------------------------------- outbound

    def _caller_session(self, spec: CallSpec, uuid: str, socket_data: str, app_host: str) -> Session:
        """The inbound sofia A-leg that reached ``socket``: built from a per-shape prototype.

        Calls with the same CallSpec shape share one prototype (variables, encoded lines,
        caller profile); each call copies it and patches the per-call values in place, which
        keeps FreeSWITCH's variable order and costs a fraction of building it anew.
        """
        created = now_us()
        rng = self.rng
        cid_num = spec.caller_id_number
        cid_name = spec.caller_id_name if spec.caller_id_name is not None else cid_num
        faults = spec.faults or self.faults
        if faults.multibyte_values and spec.caller_id_name is None:
            cid_name = "Ёжик Иванов ☎"
        params = SipCallerParams(
            uuid=uuid, session_id=self.next_session_id(), cid_name=cid_name, cid_num=cid_num,
            destination=spec.destination, profile=spec.profile, caller_host=spec.caller_host,
            caller_port=spec.caller_port, fs_ip=self.sip_ip, fs_port=self.sip_port,
            call_id=f"{rng.getrandbits(24)}-{rng.getrandbits(16)}@{spec.caller_host}",
            from_tag=random_tag(rng, 10) + "Tag001", branch=f"z9hG4bK-{rng.getrandbits(20)}", created_us=created,
        )
        key = (spec.destination, cid_num, cid_name, spec.profile, spec.caller_host, spec.caller_port, spec.context,
               tuple(spec.variables.items()), socket_data, app_host, faults.multibyte_values,
               faults.event_header_lines, faults.huge_connect_reply)
        proto = self._prototypes.get(key)
        if proto is None:
            if len(self._prototypes) >= 512:
                self._prototypes.clear()
            proto = self._prototypes[key] = self._build_prototype(spec, params, socket_data, app_host, faults)
        name, profile_proto, proto_channel = proto
        profile = profile_proto.copy()
        stamp = str(created)
        profile.set("Unique-ID", uuid)
        profile.set("Profile-Created-Time", stamp)
        profile.set("Channel-Created-Time", stamp)
        per_call = per_call_vars(params)
        channel = Channel(self.core, uuid=uuid, name=name, direction="inbound", profile=profile, variables=(),
                          created_us=created)
        channel.adopt(proto_channel, per_call)
        session = Session(self, channel, socket_data=socket_data, caller=params)
        if spec.dtmf:
            session.dtmf.extend(spec.dtmf)
        session.dtmf_duration_ms = spec.dtmf_duration_ms
        channel.fire("CHANNEL_CREATE")
        return session

    def _build_prototype(
        self, spec: CallSpec, params: SipCallerParams, socket_data: str, app_host: str, faults: FaultConfig
    ) -> tuple[str, CallerProfile, Channel]:
        cid_num, cid_name = params.cid_num, params.cid_name
        name = f"sofia/{spec.profile}/{cid_num}@{spec.caller_host}:{spec.caller_port}"
        profile = CallerProfile({
            "Direction": "inbound", "Logical-Direction": "inbound", "Username": cid_num, "Dialplan": "XML",
            "Caller-ID-Name": cid_name, "Caller-ID-Number": cid_num, "Orig-Caller-ID-Name": cid_name,
            "Orig-Caller-ID-Number": cid_num, "Network-Addr": spec.caller_host, "ANI": cid_num,
            "Destination-Number": spec.destination, "Unique-ID": params.uuid, "Source": "mod_sofia",
            "Context": spec.context, "Channel-Name": name, "Profile-Index": "1",
            "Profile-Created-Time": "0", "Channel-Created-Time": "0",
        })
        variables = sofia_inbound_vars(params)
        variables.extend(spec.variables.items())
        if faults.multibyte_values:
            variables.append(("emulator_utf8", _UTF8_VALUE))
            variables.append(("sip_h_X-Display", _UTF8_VALUE[::-1]))
        for index in range(faults.event_header_lines):
            variables.append((f"emulator_pad_{index:05d}", f"v{index}"))
        if faults.huge_connect_reply:
            chunk = "x" * 1000
            variables.extend((f"emulator_big_{index:03d}", chunk) for index in range(70))
        variables += [("current_application_data", socket_data), ("current_application", "socket"),
                      ("socket_host", app_host)]
        proto = Channel(SwitchCore(), uuid=params.uuid, name=name, direction="inbound", profile=profile,
                        variables=variables)
        return name, profile, proto

    async def place_call(self, host: str, port: int, spec: CallSpec | None = None) -> CallResult:
        """Dial an outbound-socket application the way ``socket host:port <args>`` does; wait for the end."""
        spec = spec or CallSpec()
        uuid = spec.uuid or new_uuid()
        result = CallResult(uuid=uuid)
        socket_data = f"{host}:{port} {spec.socket_args}".rstrip()
        _, _, _, async_mode, full = parse_socket_data(socket_data)
        session = self._caller_session(spec, uuid, socket_data, host)
        if self.keep_results:
            self.results.append(result)
        faults = spec.faults or self.faults
        listener = OutboundSocket(
            self, session, async_mode=async_mode, full=full, result=result, faults=faults,
            first_command_timeout_s=spec.first_command_timeout_s or self.first_command_timeout_s,
            caller_hangup_after_ms=spec.caller_hangup_after_ms, max_duration_s=spec.max_duration_s,
        )
        try:
            await self.loop.create_connection(lambda: listener, host, port)
        except OSError as exc:
            result.error = f"connect to {host}:{port} failed: {exc}"
            result.disconnect = "connect-failed"
            listener.shutdown()
        await listener.closed_future
        if not session.done.done():
            try:
                await asyncio.wait_for(asyncio.shield(session.done), timeout=max(1.0, spec.max_duration_s))
            except TimeoutError:
                result.error = result.error or "session did not end"
                session.kill()
        finalise_result(result, session)
        return result

    async def start_socket_app(self, session: Session, data: str) -> str:
        """Run the ``socket`` application on an (originated) session: connect to the app."""
        host, port, path, async_mode, full = parse_socket_data(data)
        ch = session.channel
        session.socket_data = data
        ch.set_var("current_application_data", data)
        ch.set_var("current_application", "socket")
        if path is not None:
            ch.set_var("socket_path", path)
        ch.set_var("socket_host", host)
        result = CallResult(uuid=session.uuid)
        if self.keep_results:
            self.results.append(result)
        listener = OutboundSocket(self, session, async_mode=async_mode, full=full, result=result, faults=self.faults,
                                  first_command_timeout_s=self.first_command_timeout_s)
        try:
            await self.loop.create_connection(lambda: listener, host, port)
        except OSError as exc:
            result.error = f"connect to {host}:{port} failed: {exc}"
            result.disconnect = "connect-failed"
            listener.shutdown()

        async def wait_end() -> None:
            await listener.closed_future
            await session.done
            finalise_result(result, session)

        self.spawn(wait_end())
        return f"+OK {session.uuid}\n"

    # ----------------------------------------------------------------- inbound

    async def start_inbound(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str | None = None,
        acl_allow: Iterable[str] | None = None,
        *,
        faults: FaultConfig | None = None,
        auth_timeout_s: float = 25.0,
    ) -> InboundServer:
        """Listen for inbound ESL clients (FreeSWITCH's 8021)."""
        server = InboundServer(self, host=host, port=port, password=password or self.password, acl_allow=acl_allow,
                               faults=faults or self.faults, auth_timeout_s=auth_timeout_s)
        await server.start_listening()
        self.servers.add(server)
        return server

    # ---------------------------------------------------------- registrations

    def is_registered(self, user: str, domain: str | None = None) -> bool:
        if domain:
            return (user, domain) in self.registrations
        return any(u == user for u, _ in self.registrations)

    def register_user(
        self,
        user: str,
        domain: str = "127.0.0.1",
        contact: str | None = None,
        expires: int = 3600,
        *,
        network_ip: str = "127.0.0.1",
        network_port: int = 5060,
        user_agent: str = "fs-emulator",
        call_id: str | None = None,
        profile: str = "internal",
    ) -> None:
        """A SIP REGISTER succeeded: CUSTOM ``sofia::register`` (relative ``expires``)."""
        reg = Registration(
            user=user, domain=domain, contact=contact or f'"" <sip:{user}@{network_ip}:{network_port}>',
            expires=expires, call_id=call_id or f"{self.rng.getrandbits(32):x}@{network_ip}",
            network_ip=network_ip, network_port=network_port, user_agent=user_agent, profile=profile,
            registered_at=time.time(),
        )
        self.registrations[(user, domain)] = reg
        headers = register_headers(user=user, domain=domain, contact=reg.contact, expires=expires,
                                   call_id=reg.call_id, network_ip=network_ip, network_port=network_port,
                                   user_agent=user_agent, profile=profile)
        self.core.dispatch(self.core.simple_event("CUSTOM", headers, subclass="sofia::register"))

    def unregister_user(self, user: str, domain: str = "127.0.0.1") -> bool:
        """REGISTER with Expires: 0: CUSTOM ``sofia::unregister``."""
        reg = self.registrations.pop((user, domain), None)
        if reg is None:
            return False
        headers = unregister_headers(user=user, domain=domain, contact=reg.contact, call_id=reg.call_id,
                                     network_ip=reg.network_ip, network_port=reg.network_port,
                                     user_agent=reg.user_agent, profile=reg.profile)
        self.core.dispatch(self.core.simple_event("CUSTOM", headers, subclass="sofia::unregister"))
        return True

    def expire_user(self, user: str, domain: str = "127.0.0.1") -> bool:
        """The registration lapsed: CUSTOM ``sofia::expire`` with an absolute epoch ``expires``."""
        reg = self.registrations.pop((user, domain), None)
        if reg is None:
            return False
        headers = expire_headers(user=user, domain=domain, contact=reg.contact, call_id=reg.call_id,
                                 network_ip=reg.network_ip, network_port=reg.network_port,
                                 user_agent=reg.user_agent, expires_epoch=int(reg.registered_at + reg.expires),
                                 profile=reg.profile)
        self.core.dispatch(self.core.simple_event("CUSTOM", headers, subclass="sofia::expire"))
        return True

    # ------------------------------------------------------------------ misc

    def heartbeat(self) -> None:
        """Fire a HEARTBEAT event (FreeSWITCH sends one every 20 s)."""
        core = self.core
        up = int(time.monotonic() - core.started_monotonic)
        headers = [("Event-Info", "System Ready"), ("Up-Time", f"0 years, 0 days, 0 hours, 0 minutes, {up} seconds"),
                   ("FreeSWITCH-Version", "1.10.12-release~64bit"), ("Uptime-msec", str(up * 1000)),
                   ("Session-Count", str(core.session_count)), ("Max-Sessions", "1000"),
                   ("Session-Per-Sec", "30"), ("Session-Since-Startup", str(core.sessions_since_startup)),
                   ("Idle-CPU", "99.000000")]
        core.dispatch(core.simple_event("HEARTBEAT", headers))

    async def close(self) -> None:
        """Stop listening, drop clients (``The system is being shut down.``), end every session."""
        for server in list(self.servers):
            await server.close()
        for session in list(self.sessions.values()):
            for controller in list(session.controllers):
                if isinstance(controller, EslListener):
                    controller.kill(wire.SHUTDOWN_BODY)
            session.hangup("SYSTEM_SHUTDOWN")
            session.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def wait_sessions(self) -> Awaitable[Any]:
        """Until every live session has ended."""
        futures = [s.done for s in self.sessions.values()]
        return asyncio.gather(*futures) if futures else asyncio.sleep(0)
