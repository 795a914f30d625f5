"""The switch: the FreeSWITCH emulator's inbound ESL, with a call log the checker reads.

Every originate is logged with its correlation variables (incident, action key), when its job finished
(``+OK`` = answered, ``-ERR <cause>``) and whether IIM killed the channel (``uuid_kill``, ``hupall``)
after it was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from benchmarks._chaos.checker import CallRecord
from fs_app.esl import Execute, HangupCmd
from fs_app.testing import CallResult, FreeSwitchEmulator, InboundServer, TargetBehaviour
from fs_app.testing.api import ApiResult
from fs_app.testing.listener import EslListener
from fs_app.testing.spec import OriginateRecord


@dataclass
class _Call:
    record: OriginateRecord
    result_at: float | None = None
    killed_at: float | None = None
    answered_at: float | None = None
    instance: str = ""


class _Emulator(FreeSwitchEmulator):
    """The emulator, noting which answered channels an API client killed."""

    def __init__(self, killed: dict[str, tuple[float, float | None]], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._killed = killed

    def run_api(self, name: str, arg: str | None, listener: EslListener | None = None, *,
                background: bool = False) -> ApiResult:
        if name in ("uuid_kill", "hupall"):
            now = time.time()
            targets = [self.sessions.get((arg or "").split(" ")[0])] if name == "uuid_kill" \
                else list(self.sessions.values())
            for session in targets:
                if session is not None and session.channel.up:
                    answered = session.channel.answered_us / 1e6 if session.channel.answered else None
                    self._killed.setdefault(session.uuid, (now, answered))
        return super().run_api(name, arg, listener, background=background)


@dataclass
class Switch:
    password: str
    default_target: TargetBehaviour = field(default_factory=lambda: TargetBehaviour.answer(after_ms=300, dtmf="1"))
    calls: dict[str, _Call] = field(default_factory=dict)
    unmatched: list[OriginateRecord] = field(default_factory=list)
    _killed: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    _emu: _Emulator | None = None
    _server: InboundServer | None = None
    _sampler: asyncio.Task[None] | None = None
    _instance_of: dict[str, str] = field(default_factory=dict)

    @property
    def emulator(self) -> FreeSwitchEmulator:
        assert self._emu is not None
        return self._emu

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    async def start(self) -> None:
        # IIM runs with IIM_ALERT_PROMPT_TTS=freeswitch here (and iim for the tts_down fault): a switch with mod_flite
        # speaks the say: prompts; IIM's own WAVs are local files.
        self._emu = _Emulator(self._killed, default_target=self.default_target, password=self.password,
                              first_command_timeout_s=10.0, tts_engines=("flite",))
        self._emu.originate_listeners.append(self._on_originate)
        self._emu.keep_results = True  # what IIM did on each answered call's outbound socket
        self._server = await self._emu.start_inbound(password=self.password)
        self._sampler = asyncio.create_task(self._sample(), name="switch-sampler")

    def sent_by(self, instance: str) -> object:
        """A proxy listener: the originate of ``uuid`` came through ``instance``'s connection."""
        def note(uuid: str) -> None:
            self._instance_of.setdefault(uuid, instance)
        return note

    def target(self, msisdn: str, behaviour: TargetBehaviour) -> None:
        self.emulator.targets[f"sofia/gateway/ims/{msisdn}"] = behaviour

    def _on_originate(self, record: OriginateRecord) -> None:
        uuid = record.uuid
        if uuid is None or "iim_incident_id" not in record.variables:
            self.unmatched.append(record)
            return
        # Two originates with one uuid are two calls for the checker: keep the first under its uuid.
        key = uuid if uuid not in self.calls else f"{uuid}#{len(self.calls)}"
        self.calls[key] = _Call(record)

    def _stamp(self) -> None:
        now = time.time()
        for call in self.calls.values():
            if call.result_at is None and call.record.result is not None:
                call.result_at = now
                if call.record.result.startswith("+OK"):
                    call.answered_at = now

    async def _sample(self) -> None:
        while True:
            self._stamp()
            await asyncio.sleep(0.05)

    def records(self) -> list[CallRecord]:
        """The call log for the checker."""
        self._stamp()
        unheard = {r.uuid for r in self.emulator.results if _hung_up_unheard(r)}
        out = []
        for key, call in self.calls.items():
            r = call.record
            uuid = key.split("#")[0]
            flat = r.variables.get("iim_action_key", "")
            action_key = f"{flat[:36]}/{flat[37:].replace('-', '/')}" if len(flat) > 37 else flat
            killed = self._killed.get(uuid)
            answered = call.answered_at
            if killed is not None and killed[1] is not None:
                answered = killed[1] if answered is None else min(answered, killed[1])
            out.append(CallRecord(
                uuid=uuid, incident_id=r.variables.get("iim_incident_id", ""), action_key=action_key,
                destination=r.destination, at=r.at, result=r.result, result_at=call.result_at,
                answered_at=answered, killed_by_iim_at=killed[0] if killed is not None else None,
                instance=self._instance_of.get(uuid, ""), hung_up_unheard=uuid in unheard))
        return out

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._emu is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._emu.close(), 10)


_SPOKEN = frozenset({"playback", "play_and_get_digits", "read", "record", "speak", "bridge"})


def _hung_up_unheard(result: CallResult) -> bool:
    """IIM hung the answered call up on its outbound socket before it played, asked or bridged anything (an
    alert call it did not recognise, say, while the callee was listening)."""
    if not result.answered:
        return False
    for cmd in result.commands:
        if isinstance(cmd, Execute) and cmd.app in _SPOKEN:
            return False
        if isinstance(cmd, HangupCmd) or (isinstance(cmd, Execute) and cmd.app == "hangup"):
            return True
    return False
