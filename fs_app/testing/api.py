"""The FreeSWITCH API commands the emulator answers (``api`` / ``bgapi``).

A command returns its output text at once, or an awaitable when it takes time
(``originate`` rings its legs first). Unknown commands are reported by the caller as
``-ERR <cmd> Command not found!``. Output texts follow the 1.10.12 recordings
(``status``, ``show channels``, ``uuid_getvar``, originate's ``+OK <uuid>`` /
``-ERR <CAUSE>``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fs_app.esl import Execute
from fs_app.testing.channel import CallerProfile, Channel, now_us
from fs_app.testing.core import new_uuid
from fs_app.testing.dialstring import DialString, DialStringError, parse_dialstring
from fs_app.testing.originate import (
    DEFAULT_ORIGINATE_TIMEOUT_S,
    GroupPlan,
    LegPlan,
    endpoint_user,
    plan_group,
)
from fs_app.testing.session import Session
from fs_app.testing.spec import OriginateRecord
from fs_app.testing.templates import (
    OriginateParams,
    local_sdp,
    media_vars,
    originate_create_vars,
    originate_progress_vars,
    q850,
    remote_sdp,
)

if TYPE_CHECKING:
    from fs_app.testing.emulator import FreeSwitchEmulator
    from fs_app.testing.listener import EslListener

ApiResult = str | Awaitable[str]
ApiFunc = Callable[["FreeSwitchEmulator", str | None, "EslListener | None"], ApiResult]

VERSION = "FreeSWITCH Version 1.10.12-release~64bit ( 64bit)"
ORIGINATE_USAGE = (
    "-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] [<cid_name>] "
    "[<cid_num>] [<timeout_sec>]\n"
)
SHOW_CHANNELS_COLUMNS = (
    "uuid,direction,created,created_epoch,name,state,cid_name,cid_num,ip_addr,dest,application,"
    "application_data,dialplan,context,read_codec,read_rate,read_bit_rate,write_codec,write_rate,"
    "write_bit_rate,secure,hostname,presence_id,presence_data,accountcode,callstate,callee_name,callee_num,"
    "callee_direction,call_uuid,sent_callee_name,sent_callee_num,initial_cid_name,initial_cid_num,"
    "initial_ip_addr,initial_dest,initial_dialplan,initial_context"
)


def api_status(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    core = emu.core
    up_us = int((time.monotonic() - core.started_monotonic) * 1_000_000)
    seconds, micros = divmod(up_us, 1_000_000)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    years, day = divmod(days, 365)
    return (
        f"UP {years} years, {day} days, {hour} hours, {minute} minutes, {sec} seconds, "
        f"{micros // 1000} milliseconds, {micros % 1000} microseconds\n"
        "FreeSWITCH (Version 1.10.12-release  64bit) is ready\n"
        f"{core.sessions_since_startup} session(s) since startup\n"
        f"{core.session_count} session(s) - peak {core.peak_sessions}, last 5min {core.peak_sessions} \n"
        f"0 session(s) per Sec out of max 30, peak {min(core.peak_sessions, 30)}, last 5min "
        f"{min(core.peak_sessions, 30)} \n"
        "1000 session(s) max\n"
        "min idle cpu 0.00/99.00\n"
        "Current Stack Size/Max 240K/8192K\n"
    )


def _channel_row(emu: FreeSwitchEmulator, session: Session) -> str:
    ch = session.channel
    profile = ch.profile
    created = ch.created_us // 1_000_000
    fields = [
        ch.uuid, ch.direction, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)), str(created), ch.name,
        ch.state, profile.get("Caller-ID-Name") or "", profile.get("Caller-ID-Number") or "",
        profile.get("Network-Addr") or "", profile.get("Destination-Number") or "",
        ch.get_var("current_application") or "", ch.get_var("current_application_data") or "",
        profile.get("Dialplan") or "", profile.get("Context") or "",
        "PCMU" if ch.media else "", "8000" if ch.media else "", "64000" if ch.media else "",
        "PCMU" if ch.media else "", "8000" if ch.media else "", "64000" if ch.media else "",
        "", emu.core.hostname, "", "", "", ch.call_state, profile.get("Callee-ID-Name") or "",
        profile.get("Callee-ID-Number") or "", "", ch.uuid, "", "", profile.get("Caller-ID-Name") or "",
        profile.get("Caller-ID-Number") or "", profile.get("Network-Addr") or "",
        profile.get("Destination-Number") or "", profile.get("Dialplan") or "", profile.get("Context") or "",
    ]
    return ",".join(fields)


def api_show(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    what = (arg or "").split()
    if what and what[0] in ("channels", "calls"):
        rows = [_channel_row(emu, s) for s in emu.sessions.values() if not s.destroyed]
        if not rows:
            return "\n0 total.\n"
        return SHOW_CHANNELS_COLUMNS + "\n" + "\n".join(rows) + f"\n\n{len(rows)} total.\n"
    return "-USAGE: codec|endpoint|application|api|dialplan|file|timer|calls [count]|channels [count|like <match string>]|calls|detailed_calls|bridged_calls|detailed_bridged_calls|aliases|complete|chat|management|modules|nat_map|say|interfaces|interface_types|tasks|limits|status\n"


def _session_arg(emu: FreeSwitchEmulator, arg: str | None) -> tuple[Session | None, list[str]]:
    words = (arg or "").split(" ")
    return emu.sessions.get(words[0]), words[1:]


def api_uuid_getvar(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    session, rest = _session_arg(emu, arg)
    if not rest or not rest[0]:
        return "-USAGE: <uuid> <var>\n"
    if session is None:
        return "-ERR No such channel!\n"
    value = session.channel.lookup(rest[0])
    return value if value is not None else "_undef_"


def api_uuid_setvar(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    session, rest = _session_arg(emu, arg)
    if session is None:
        return "-ERR No such channel!\n"
    if not rest:
        return "-USAGE: <uuid> <var> [value]\n"
    session.channel.set_var(rest[0], " ".join(rest[1:]) or None)
    return "+OK\n"


def api_uuid_kill(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    session, rest = _session_arg(emu, arg)
    if session is None or not session.channel.up:
        return "-ERR No such channel!\n"
    session.hangup(rest[0] if rest and rest[0] else "NORMAL_CLEARING")
    return "+OK\n"


def api_uuid_exists(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    session, _ = _session_arg(emu, arg)
    return "true" if session is not None and not session.destroyed else "false"


def api_uuid_answer(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    from fs_app.testing.apps import answer_channel

    session, _ = _session_arg(emu, arg)
    if session is None:
        return "-ERR No such channel!\n"
    answer_channel(session)
    return "+OK\n"


def api_hupall(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    cause = (arg or "").split(" ")[0] or "MANAGER_REQUEST"
    for session in list(emu.sessions.values()):
        session.hangup(cause)
    return f"+OK hangup all channels with cause {cause}\n"


HASH_USAGE = "-ERR Usage: hash [insert|insert_ifempty|delete|delete_ifmatch]/<realm>/<key>/<val>\n"


def api_hash(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    """mod_hash's ``hash insert|insert_ifempty|select|delete|delete_ifmatch/<realm>/<key>[/<value>]`` (its
    ``db`` realm: one table per switch, gone when it restarts). ``select`` of a missing key prints nothing,
    which the Event Socket sends as ``-ERR no reply``."""
    parts = (arg or "").split("/", 3)
    if len(parts) < 3 or not parts[0]:
        return HASH_USAGE
    verb, key = parts[0].lower(), f"{parts[1]}_{parts[2]}"
    value = parts[3] if len(parts) > 3 else None
    table = emu.hash_db
    if verb in ("insert", "insert_ifempty", "delete_ifmatch") and value is None:
        return HASH_USAGE
    if verb == "insert":
        table[key] = value or ""
        return "+OK\n"
    if verb == "insert_ifempty":
        if key in table:
            return "-ERR key already exists\n"
        table[key] = value or ""
        return "+OK\n"
    if verb == "delete":
        return "+OK\n" if table.pop(key, None) is not None else "-ERR Not found\n"
    if verb == "delete_ifmatch":
        if key not in table:
            return "-ERR Not found\n"
        if table[key] != value:
            return "-ERR Doesn't match\n"
        del table[key]
        return "+OK\n"
    if verb == "select":
        return table.get(key, "")
    return HASH_USAGE


def api_version(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    return VERSION + "\n"


def api_hostname(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    return emu.core.hostname


def api_echo(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    return arg or ""


def api_global_getvar(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    if not arg:
        return "\n".join(f"{k}={v}" for k, v in emu.global_vars.items()) + "\n"
    return emu.global_vars.get(arg, "")


def api_reloadxml(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    emu.core.log(6, "switch_xml.c", "preprocess_glob", 1398,
                 "No files to include at /usr/local/freeswitch/conf/sip_profiles/external/*.xml", text_channel=0)
    emu.core.log(6, "switch_time.c", "switch_load_timezones", 1436, "Timezone reloaded 597 definitions",
                 text_channel=0)
    return "+OK [Success]\n"


# ------------------------------------------------------------------- originate


def _split_args(text: str) -> list[str]:
    """Split originate arguments on spaces outside quotes and parentheses."""
    out: list[str] = []
    buf: list[str] = []
    depth = 0
    quote = False
    for ch in text:
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth = max(0, depth - 1)
        if ch == " " and not quote and depth == 0:
            if buf:
                out.append("".join(buf))
                buf = []
            continue
        buf.append(ch)
    if buf:
        out.append("".join(buf))
    return out


def _parse_app(target: str) -> tuple[str, str | None]:
    """``&socket('127.0.0.1:8084 async full')`` -> ("socket", "127.0.0.1:8084 async full")."""
    body = target[1:]
    name, paren, rest = body.partition("(")
    if not paren:
        name, _, arg = body.partition(" ")
        return name, arg or None
    arg = rest.removesuffix(")")
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] == "'":
        arg = arg[1:-1]
    return name, arg or None


class Originate:
    """``originate``: ring the legs, create the B channel(s), start the application on answer."""

    def __init__(self, emu: FreeSwitchEmulator, arg: str) -> None:
        self.emu = emu
        self.arg = arg
        self.legs: dict[str, Session] = {}
        self._plan_ended: set[str] = set()  # legs the plan itself failed (busy, no answer, lost the race)

    def _log(self, level: int, line: int, text: str) -> None:
        self.emu.core.log(level, "switch_ivr_originate.c", "switch_ivr_originate", line, text)

    async def run(self) -> str:
        words = _split_args(self.arg)
        if len(words) < 2:
            return ORIGINATE_USAGE
        url, target = words[0], words[1]
        try:
            dial = parse_dialstring(url)
        except DialStringError:
            self._note(OriginateRecord(self.arg, (), "", {}, target, time.time(), time.monotonic()))
            return "-ERR INVALID_NUMBER_FORMAT\n"
        endpoints = tuple(leg.endpoint for leg in dial.legs)
        record = OriginateRecord(
            command=self.arg, endpoints=endpoints, destination=endpoint_user(endpoints[0])[0] if endpoints else "",
            variables=dict(dial.vars), app=target, at=time.time(), monotonic=time.monotonic(),
        )
        self._note(record)
        output = "-ERR SYSTEM_SHUTDOWN\n"  # what is left if the emulator stops while it rings
        try:
            output = await self._run(dial, words, target)
        finally:
            record.result = output.strip()
        return output

    def _note(self, record: OriginateRecord) -> None:
        self.emu.originates.append(record)
        for listener in self.emu.originate_listeners:
            listener(record)

    async def _run(self, dial: DialString, words: list[str], target: str) -> str:
        self._log(7, 2301, "Parsing global variables")
        dial_vars = dial.vars
        timeout = DEFAULT_ORIGINATE_TIMEOUT_S
        for raw in (dial_vars.get("originate_timeout"), words[6] if len(words) > 6 else None):
            if raw is not None and raw.replace(".", "", 1).isdigit() and float(raw) > 0:
                timeout = float(raw)
                break
        cid_name = dial_vars.get("origination_caller_id_name") or (words[4] if len(words) > 4 else "")
        cid_num = dial_vars.get("origination_caller_id_number") or (words[5] if len(words) > 5 else "0000000000")
        groups = list(dial.branches[0].groups) if len(dial.branches) == 1 else [
            tuple(leg for b in dial.branches for leg in b.groups[0])]
        cause = "NO_ANSWER"
        first_uuid = dial_vars.get("origination_uuid")
        for group in groups:
            plan = plan_group(dial, group, self.emu.target_for, timeout_s=timeout, scale=self.emu.time_scale)
            for leg in plan.legs:
                if leg.endpoint.startswith("error/"):
                    leg.creates_channel = False
                if leg.creates_channel:
                    if first_uuid:
                        leg.uuid, first_uuid = first_uuid, None
                    created = self._create(leg, dial.leg_var, dial_vars, cid_num, cid_name)
                    # The keys this callee will press at the socket application's digit prompts.
                    created.dtmf.extend(leg.target.dtmf)
                    self.legs[leg.uuid] = created
                else:
                    kind = leg.endpoint.split("/", 1)[0]
                    self._log(5, 3059, f"Cannot create outgoing channel of type [{kind}] cause: "
                                       f"[{leg.fail_cause}]")
            t = 0.0
            killed: str | None = None
            for at, kind, leg in plan.events():
                if at > t:
                    killed = await self._legs_gone_within(plan, at - t)
                    if killed is not None:
                        break
                    t = at
                session = self.legs.get(leg.uuid)
                if session is None:
                    continue
                if kind == "ring":
                    self._ring(session, leg)
                elif kind == "fail":
                    cause = leg.fail_cause or "NORMAL_CLEARING"
                    params = session.originate_params
                    if params is not None and cause not in ("NO_ANSWER", "ALLOTTED_TIMEOUT", "LOSE_RACE"):
                        session.channel.profile.set("Network-Addr", params.host)  # the far end answered (4xx/5xx)
                    self._fail(session, cause)
                else:
                    for other in plan.legs:
                        if other is not leg and other.uuid in self.legs:
                            self._fail(self.legs[other.uuid], "LOSE_RACE")
                    return await self._answered(session, leg, target)
            if killed is None and plan.end_at > t:
                killed = await self._legs_gone_within(plan, plan.end_at - t)
            if killed is not None:
                # Every leg was hung up while it rang (uuid_kill, hupall): the originate ends now, with
                # that cause, as switch_ivr_originate returns when its peer channels are gone.
                cause = killed
                break
            for leg in plan.legs:
                if leg.uuid in self.legs and self.legs[leg.uuid].channel.up:
                    self._fail(self.legs[leg.uuid], leg.fail_cause or "NO_ANSWER")
            cause = plan.cause
        self._log(7, 4056, f"Originate Resulted in Error Cause: {q850(cause)} [{cause}]")
        return f"-ERR {cause}\n"

    async def _legs_gone_within(self, plan: GroupPlan, delay: float) -> str | None:
        """Wait ``delay`` seconds; the hangup cause if every channel of the group the plan had not ended
        itself was hung up meanwhile from outside (uuid_kill, hupall)."""
        watched = [self.legs[leg.uuid] for leg in plan.legs
                   if leg.uuid in self.legs and leg.uuid not in self._plan_ended]
        if not watched:
            await asyncio.sleep(delay)
            return None
        _, pending = await asyncio.wait([s.done for s in watched], timeout=delay)
        if pending:
            return None
        return watched[0].channel.hangup_cause or "NORMAL_CLEARING"

    def _create(
        self, leg: LegPlan, leg_var: Callable[..., str | None], dial_vars: dict[str, str], cid_num: str,
        cid_name: str,
    ) -> Session:
        emu = self.emu
        user, host, port = endpoint_user(leg.endpoint)
        parts = leg.endpoint.split("/")
        profile_name = parts[1] if len(parts) > 2 and parts[0] == "sofia" and parts[1] != "gateway" else "external"
        params = OriginateParams(
            uuid=leg.uuid, session_id=emu.next_session_id(), endpoint=leg.endpoint, user=user, host=host, port=port,
            profile=profile_name, fs_ip=emu.sip_ip, fs_port=emu.sip_port, from_number=cid_num,
        )
        name = f"sofia/{profile_name}/{user}@{host}" + (f":{port}" if port else "") if parts[0] == "sofia" \
            else leg.endpoint
        created = now_us()
        profile = CallerProfile({
            "Direction": "outbound", "Logical-Direction": "outbound", "Caller-ID-Name": cid_name,
            "Caller-ID-Number": cid_num, "Orig-Caller-ID-Number": cid_num,
            "Callee-ID-Name": leg.target.callee_id_name, "Callee-ID-Number": user, "ANI": cid_num,
            "Destination-Number": user, "Unique-ID": leg.uuid, "Source": "src/switch_ivr_originate.c",
            "Context": "default", "Channel-Name": name, "Profile-Index": "1",
            "Profile-Created-Time": str(created), "Channel-Created-Time": str(created),
        })
        per_leg = dict(dial_vars)
        per_leg.update(leg.leg.vars)
        ch = Channel(emu.core, uuid=leg.uuid, name=name, direction="outbound", profile=profile,
                     variables=originate_create_vars(params, list(per_leg.items())), state="CS_NONE",
                     call_state="DOWN", answer_state="ringing", hit_dialplan=False, created_us=created)
        ch.set_var("local_media_port", str(emu.rng.randrange(16384, 32768, 2)))
        session = Session(emu, ch)
        session.originate_params = params
        ch.fire("CHANNEL_OUTGOING", with_vars=False)
        ch.set_state("CS_INIT")
        ch.fire("CHANNEL_STATE", with_vars=False)
        ch.fire("CHANNEL_CREATE")
        _api_on_originate(emu, per_leg)
        ch.set_state("CS_ROUTING")
        ch.fire("CHANNEL_STATE", with_vars=False)
        ch.set_state("CS_CONSUME_MEDIA")
        ch.fire("CHANNEL_STATE", with_vars=False)
        return session

    def _ring(self, session: Session, leg: LegPlan) -> None:
        ch = session.channel
        params = session.originate_params
        assert params is not None
        ch.profile.set("Network-Addr", params.host)
        ch.set_vars([("sip_local_network_addr", params.fs_ip)])
        ch.set_vars(originate_progress_vars(params, self.emu.rng))
        ch.ring_ready()
        ch.set_call_state("RINGING")

    def _fail(self, session: Session, cause: str) -> None:
        self._plan_ended.add(session.uuid)
        session.hangup(cause)

    async def _answered(self, session: Session, leg: LegPlan, target: str) -> str:
        emu = self.emu
        ch = session.channel
        params = session.originate_params
        assert params is not None
        port = int(ch.get_var("local_media_port") or 16384)
        ch.set_var("switch_r_sdp", remote_sdp(params.host, 6090))
        ch.set_var("ep_codec_string", "CORE_PCM_MODULE.PCMU@8000h@20i@64000b")
        ch.set_vars(media_vars(fs_ip=params.fs_ip, local_port=port, ssrc=emu.rng.getrandbits(32),
                               remote_ip=params.host, remote_port=6090))
        ch.set_var("rtp_local_sdp_str", local_sdp(params.fs_ip, port, int(time.time()) - 24800))
        ch.mark_answered()
        hang = leg.target.hangup_after_ms
        if hang is not None:
            session.call_later(session.scaled(hang), lambda: _far_end_bye(session))
        emu.loop.call_soon(self._start_app, session, target)
        if target.startswith("&socket"):
            _, arg = _parse_app(target)
            return await emu.start_socket_app(session, arg or "")
        return f"+OK {ch.uuid}\n"

    def _start_app(self, session: Session, target: str) -> None:
        ch = session.channel
        if not ch.up:
            return
        profile = ch.profile
        cid_num = profile.get("Caller-ID-Number") or ""
        profile.set("Caller-ID-Name", profile.get("Callee-ID-Name") or "")
        profile.set("Caller-ID-Number", profile.get("Callee-ID-Number") or "")
        profile.set("Callee-ID-Name", None)
        profile.set("Callee-ID-Number", cid_num)
        ch.set_var("endpoint_disposition", "ANSWER")
        ch.set_var("pre_transfer_caller_id_number", cid_num)
        ch.set_var("channel_cid_flipped", "yes")
        ch.set_var("call_uuid", ch.uuid)
        ch.hit_dialplan = "true"
        ch.set_state("CS_EXECUTE")
        ch.fire("CHANNEL_STATE", with_vars=False)
        if target.startswith("&socket"):
            return
        if target.startswith("&"):
            app, arg = _parse_app(target)
        else:
            app, arg = "park", None
        session.queue_execute(Execute(app=app, arg=arg, event_uuid=new_uuid()), park_first=False)
        if app != "park":
            session.queue_execute(Execute(app="hangup", arg="NORMAL_CLEARING", event_uuid=new_uuid()),
                                  park_first=False)


def _api_on_originate(emu: FreeSwitchEmulator, variables: dict[str, str]) -> None:
    """``api_on_originate*`` variables: each an API command (``name args``) run as the leg is created, as
    switch_ivr_originate does (its output only logged). The emulator runs commands that answer at once."""
    for name, value in variables.items():
        if name.startswith("api_on_originate") and value:
            command, _, args = value.strip("'").partition(" ")
            result = emu.run_api(command, args or None)
            if not isinstance(result, str) and asyncio.iscoroutine(result):
                result.close()  # a command that takes time (originate): not one an originate hook runs here


def _far_end_bye(session: Session) -> None:
    """The remote party of an originated leg hangs up (BYE)."""
    ch = session.channel
    if not ch.up:
        return
    ch.hangup_disposition = "recv_bye"
    session.hangup("NORMAL_CLEARING", [("sip_term_status", "200"), ("proto_specific_hangup_cause", "sip:200"),
                                       ("sip_term_cause", "16")])


def api_originate(emu: FreeSwitchEmulator, arg: str | None, listener: EslListener | None) -> ApiResult:
    if not arg:
        return ORIGINATE_USAGE
    return Originate(emu, arg).run()


API_COMMANDS: dict[str, ApiFunc] = {
    "status": api_status,
    "show": api_show,
    "uuid_getvar": api_uuid_getvar,
    "uuid_setvar": api_uuid_setvar,
    "uuid_kill": api_uuid_kill,
    "uuid_exists": api_uuid_exists,
    "uuid_answer": api_uuid_answer,
    "hupall": api_hupall,
    "version": api_version,
    "hash": api_hash,
    "hostname": api_hostname,
    "echo": api_echo,
    "global_getvar": api_global_getvar,
    "reloadxml": api_reloadxml,
    "originate": api_originate,
}
