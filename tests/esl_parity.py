"""One small ESL script run the same way against the real FreeSWITCH and the emulator, reduced to what must agree.

What the switch refuses is where the emulator used to be lenient: API commands it does not have, an
application it does not have, media that does not open (a missing file, an unreachable ``http_cache://`` URL),
``play_and_get_digits``/``read`` around them, and a forked leg whose ``group_confirm_file`` does not open. The
script originates a call over the inbound socket to ``&socket(...)`` on our outbound server, runs the steps on
it, and records per step the application's response, the channel events it caused, and the variables that
say how it ended. ``tests/data/emulator-parity.json`` holds what FreeSWITCH 1.10.12 answered
(``python -m tests.esl_parity --record`` with the switch installed rewrites it).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fs_app.esl import (
    Api,
    Auth,
    AuthRequest,
    BgApi,
    ChannelData,
    Connect,
    Event,
    EventSubscribe,
    Execute,
    HangupCmd,
    Linger,
    MyEvents,
)
from fs_app.testing.media import write_silent_wav
from fs_app.testing.peers import AppServer, EslPeer

RECORDED = Path(__file__).resolve().parent / "data" / "emulator-parity.json"
UNKNOWN_API = ("nosuchcommand", "NoSuch arg1 arg2", "voicemail default 127.0.0.1 1000", "uuid_nosuch abc")
STEP_TIMEOUT_S = 20.0
_STEP_EVENTS = ("CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP")
_VARS = ("read_result", "iim_d", "iim_d_invalid", "iim_r", "playback_ms", "originate_disposition", "DIALSTATUS",
         "originate_failed_cause")


@dataclass(frozen=True)
class Endpoints:
    """Where the script's calls go: the call's own far end, a callee that answers after about a second, one
    that rings until cancelled; and a TCP port nobody listens on (an unreachable prompt server)."""

    callee: str
    answers: str
    rings: str
    closed_port: int


def steps(files: Path, ep: Endpoints) -> list[tuple[str, str | None]]:
    """The applications run on the call, in order (the last one is refused and ends the call)."""
    played = write_silent_wav(files / "present.wav", 300)
    missing = files / "missing.wav"
    url = f"http_cache://http://127.0.0.1:{ep.closed_port}/v1/prompts/confirm-call.wav"
    fork = (f"{{ignore_early_media=true}}[leg_timeout=3,group_confirm_key=1,group_confirm_file={missing},"
            f"group_confirm_cancel_timeout=1]{ep.answers},[leg_timeout=2]{ep.rings}")
    return [
        ("answer", None),
        ("playback", str(missing)),
        ("playback", url),
        ("playback", str(played)),
        ("play_and_get_digits", f"1 1 2 300 # {missing} silence_stream://100 iim_d \\d"),
        ("play_and_get_digits", "1 1 1 300 # silence_stream://100 silence_stream://100 iim_d \\d"),
        ("read", f"1 1 {url} iim_r 300 #"),
        ("set", "continue_on_fail=true"),
        ("bridge", fork),
        ("voicemail", "default 127.0.0.1 1000"),
    ]


def _causes(value: str | None) -> list[str] | None:
    """``originate_causes`` without the leg uuids (``ARRAY::uuid;CAUSE|:uuid;CAUSE``)."""
    if value is None:
        return None
    return [item.partition(";")[2] for item in value.removeprefix("ARRAY::").split("|:")]


async def _run_step(peer: EslPeer, app: str, arg: str | None) -> dict[str, Any]:
    event_uuid = str(uuid.uuid4())
    start = len(peer.messages)
    reply = await peer.reply(Execute(app=app, arg=arg, event_uuid=event_uuid, event_lock=True))
    seen: dict[str, Any] = {"app": app, "reply": reply.reply_text}

    def events() -> list[Event]:
        return [m for m in peer.messages[start:] if isinstance(m, Event) and m.name in _STEP_EVENTS]

    def ended() -> bool:
        return any(e.name == "CHANNEL_HANGUP" or (e.name == "CHANNEL_EXECUTE_COMPLETE" and e.application_uuid == event_uuid)
                   for e in events())

    while not ended():
        await peer.next(timeout=STEP_TIMEOUT_S)
    mine = events()
    mine = mine[:next(i for i, e in enumerate(mine) if e.name == "CHANNEL_HANGUP" or (
        e.name == "CHANNEL_EXECUTE_COMPLETE" and e.application_uuid == event_uuid)) + 1]
    seen["events"] = [f"{e.name}:{e.get('Application') or e.get('Hangup-Cause')}" for e in mine]
    last = mine[-1]
    seen["response"] = last.get("Application-Response")
    variables: dict[str, Any] = {name: last.variable(name) for name in _VARS}
    if app != "playback" or seen["response"] != "FILE PLAYED":
        variables.pop("playback_ms")  # left over from an earlier file: not this step's doing
    variables["originate_causes"] = _causes(last.variable("originate_causes"))
    seen["vars"] = {k: v for k, v in variables.items() if v is not None}
    return seen


async def _logged_in(esl_port: int, password: str) -> EslPeer:
    """An inbound Event Socket connection past its ``auth``."""
    inbound = await EslPeer.connect("127.0.0.1", esl_port, timeout=STEP_TIMEOUT_S)
    try:
        assert isinstance(await inbound.next(), AuthRequest)
        assert (await inbound.reply(Auth(password))).reply_text == "+OK accepted"
    except BaseException:
        inbound.close()
        raise
    return inbound


async def observe(esl_port: int, password: str, ep: Endpoints, files: Path) -> dict[str, Any]:
    """Run the script against the switch whose inbound Event Socket is on ``esl_port``."""
    script = steps(files, ep)
    results: dict[str, Any] = {}
    done: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()

    async def on_call(peer: EslPeer) -> None:
        try:
            peer.send(Connect())
            await peer.expect(ChannelData)
            await peer.reply(MyEvents())
            await peer.reply(Linger())
            done.set_result([await _run_step(peer, app, arg) for app, arg in script])
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            raise

    inbound = await _logged_in(esl_port, password)
    try:
        for command in UNKNOWN_API:
            results[f"api {command}"] = (await inbound.api(Api(command))).body
        await inbound.reply(EventSubscribe("plain", ("BACKGROUND_JOB",)))
        job = str(uuid.uuid4())
        results["bgapi nosuchcommand"] = re.sub(job, "<job>", (await inbound.reply(BgApi("nosuchcommand x", job)))
                                                .reply_text)
        while not isinstance(event := await inbound.next(timeout=STEP_TIMEOUT_S), Event) or \
                event.name != "BACKGROUND_JOB":
            pass
        results["bgapi nosuchcommand job"] = event.body
        async with AppServer(on_call, timeout=STEP_TIMEOUT_S) as app:
            await inbound.reply(BgApi(f"originate {{ignore_early_media=true}}{ep.callee} "
                                      f"&socket('127.0.0.1:{app.port} async full')", str(uuid.uuid4())))
            results["steps"] = await asyncio.wait_for(done, STEP_TIMEOUT_S * len(script))
    finally:
        inbound.close()
    return results


async def confirm_outcome(esl_port: int, password: str, callee: str, fork: str) -> str:
    """Bridge a call to ``fork``: ``bridged`` once a leg won (then the call is hung up), else the bridge's
    ``originate_disposition`` and the causes of its legs (``DISPOSITION CAUSE,CAUSE``)."""
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_call(peer: EslPeer) -> None:
        try:
            peer.send(Connect())
            await peer.expect(ChannelData)
            await peer.reply(MyEvents())
            await peer.reply(Linger())
            await peer.reply(Execute(app="answer"))
            await peer.reply(Execute(app="set", arg="continue_on_fail=true"))
            await peer.reply(Execute(app="bridge", arg=fork))

            def ended(m: object) -> bool:
                return isinstance(m, Event) and (m.name == "CHANNEL_BRIDGE" or (
                    m.name == "CHANNEL_EXECUTE_COMPLETE" and m.get("Application") == "bridge"))

            event = await peer.expect(ended, timeout=STEP_TIMEOUT_S)
            assert isinstance(event, Event)
            if event.name == "CHANNEL_BRIDGE":
                done.set_result("bridged")
            else:
                causes = ",".join(_causes(event.variable("originate_causes")) or [])
                done.set_result(f"{event.variable('originate_disposition')} {causes}")
            await peer.reply(HangupCmd())
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            raise

    inbound = await _logged_in(esl_port, password)
    try:
        async with AppServer(on_call, timeout=STEP_TIMEOUT_S) as app:
            await inbound.reply(BgApi(f"originate {{ignore_early_media=true}}{callee} "
                                      f"&socket('127.0.0.1:{app.port} async full')", str(uuid.uuid4())))
            return await asyncio.wait_for(done, STEP_TIMEOUT_S * 2)
    finally:
        inbound.close()


def _record() -> None:  # pragma: no cover - run by hand against the real switch
    import contextlib
    import tempfile

    from tests import sipp
    from tests.real_switch import free_port, running_switch

    with tempfile.TemporaryDirectory() as tmp, running_switch(Path(tmp) / "fs") as switch:
        base = Path(tmp)
        ports = [free_port() for _ in range(3)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(sipp.core(base / "a", ports[0], "core_answer.xml", answer_ms=100))
            stack.enter_context(sipp.core(base / "b", ports[1], "core_answer.xml", answer_ms=1000))
            stack.enter_context(sipp.core(base / "c", ports[2], "core_ring.xml"))
            ep = endpoints(ports, free_port())
            seen = asyncio.run(observe(switch.esl_port, switch.password, ep, base / "files"))
    RECORDED.write_text(json.dumps(seen, indent=1, ensure_ascii=False) + "\n")


def endpoints(ports: list[int], closed_port: int) -> Endpoints:
    a, b, c = ports
    return Endpoints(f"sofia/external/callee@127.0.0.1:{a}", f"sofia/external/answers@127.0.0.1:{b}",
                     f"sofia/external/rings@127.0.0.1:{c}", closed_port)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:  # pragma: no cover
    _record()
