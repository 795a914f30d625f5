"""Dialplan applications the emulator runs on a channel (``sendmsg`` execute).

Each application is ``async def app(session, arg) -> Application-Response | None``;
``None`` is reported as ``_none_``. Durations go through :meth:`Session.wait` (scaled by
the emulator's ``time_scale``) so a hangup interrupts them, and variables are set in the
order FreeSWITCH sets them so events carry the same variable sequence.
"""

from __future__ import annotations

import io
import math
import re
import wave
from typing import Literal

from fs_app.testing.channel import now_us
from fs_app.testing.dialstring import DialString, DialStringError, parse_dialstring
from fs_app.testing.http_cache import PREFIX as HTTP_CACHE
from fs_app.testing.http_cache import PUT_OK, MediaNotFound
from fs_app.testing.media import lengths, played_ms
from fs_app.testing.originate import (
    DEFAULT_ORIGINATE_TIMEOUT_S,
    GroupPlan,
    LegPlan,
    _true,
    array_value,
    confirm_files,
    originatee_profile,
    plan_group,
)
from fs_app.testing.session import AppImpl, Session
from fs_app.testing.spec import BridgeRecord, RecordingRecord
from fs_app.testing.templates import (
    SIP_FAILURE,
    ack_vars,
    dialstatus,
    local_sdp,
    media_vars,
    q850,
    random_tag,
)


def separate_args(text: str) -> list[str]:
    """Split application data on blanks as ``switch_separate_string(.., ' ', ..)`` does.

    A ``'...'`` span keeps its blanks and loses its quotes; a backslash escapes the next
    ``'``, ``"`` or backslash. So ``1 1 3 5000 none 'say:Press 1, it\'s real' ...`` gives
    the prompt ``say:Press 1, it's real`` as one argument.
    """
    out: list[str] = []
    buf: list[str] = []
    quoted = started = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "'\"\\":
            buf.append(text[i + 1])
            started = True
            i += 2
            continue
        if ch == "'" and (quoted or "'" in text[i + 1:]):
            quoted = not quoted
            started = True
        elif ch == " " and not quoted:
            if started:
                out.append("".join(buf))
                buf, started = [], False
        else:
            buf.append(ch)
            started = True
        i += 1
    if started:
        out.append("".join(buf))
    return out


async def app_unknown(session: Session, arg: str) -> str | None:
    """Applications the switch has but the emulator does not model complete at once (``execute`` of one the
    switch does not have is refused before this: see ``fs_app.testing.modules``)."""
    return None


# ---------------------------------------------------------------- media/answer


def _media(session: Session) -> list[tuple[str, str]]:
    rng = session.host.rng
    caller = session.caller
    fs_ip = caller.fs_ip if caller else session.host.core.ipv4
    remote_ip = caller.caller_host if caller else "127.0.0.1"
    return media_vars(
        fs_ip=fs_ip, local_port=rng.randrange(16384, 32768, 2), ssrc=rng.getrandbits(32),
        remote_ip=remote_ip, remote_port=6000,
    )


def answer_channel(session: Session, *, early_media_vars: list[tuple[str, str]] | None = None) -> None:
    """Answer an inbound A-leg: CHANNEL_PROGRESS_MEDIA, CHANNEL_ANSWER (sofia 200 OK + SDP)."""
    ch = session.channel
    if ch.answered or not ch.up:
        return
    media = early_media_vars if early_media_vars is not None else _media(session)
    ch.pre_answer(media)
    port = next((v for k, v in media if k == "local_media_port"), "16384")
    fs_ip = next((v for k, v in media if k == "local_media_ip"), session.host.core.ipv4)
    ch.mark_answered([("rtp_local_sdp_str", local_sdp(fs_ip, int(port), int(now_us() // 1_000_000) - 24800))])
    ch.set_var("endpoint_disposition", "ANSWER")
    if session.caller is not None:
        session.pending_ack = ack_vars(session.caller, random_tag(session.host.rng))


async def app_answer(session: Session, arg: str) -> str | None:
    answer_channel(session)
    return None


async def app_pre_answer(session: Session, arg: str) -> str | None:
    ch = session.channel
    if not ch.answered:
        ch.pre_answer(_media(session))
    return None


async def app_ring_ready(session: Session, arg: str) -> str | None:
    session.channel.ring_ready()
    return None


# ------------------------------------------------------------------ variables


async def app_set(session: Session, arg: str) -> str | None:
    name, _, value = arg.partition("=")
    name = name.strip()
    if name:
        session.channel.set_var(name, value if value != "" else None)
    return None


async def app_export(session: Session, arg: str) -> str | None:
    name, _, value = arg.partition("=")
    name = name.strip()
    local = True
    if name.startswith("nolocal:"):
        name, local = name[8:], False
    if not name:
        return None
    ch = session.channel
    if local:
        ch.set_var(name, value if value != "" else None)
    exported = [v for v in (ch.get_var("export_vars") or "").split(",") if v]
    if name not in exported:
        exported.append(name)
    ch.set_var("export_vars", ",".join(exported))
    return None


async def app_unset(session: Session, arg: str) -> str | None:
    if arg.strip():
        session.channel.set_var(arg.strip(), None)
    return None


async def app_multiset(session: Session, arg: str) -> str | None:
    sep = " "
    if arg.startswith("^^") and len(arg) > 2:
        sep, arg = arg[2], arg[3:]
    for item in arg.split(sep):
        if "=" in item:
            await app_set(session, item)
    return None


# ------------------------------------------------------------------ call flow


async def app_hangup(session: Session, arg: str) -> str | None:
    session.hangup(arg.strip() or "NORMAL_CLEARING")
    return None


async def app_sleep(session: Session, arg: str) -> str | None:
    try:
        ms = float(arg.strip() or 0)
    except ValueError:
        ms = 0.0
    await session.wait(session.scaled(ms))
    return None


async def app_park(session: Session, arg: str) -> str | None:
    """``park``: CHANNEL_PARK, wait for the hangup, CHANNEL_UNPARK when the park loop ends."""
    session.park()
    await session.wait(math.inf)
    session.unpark()
    return None


async def media_length_ms(session: Session, arg: str) -> float | None:
    """How long ``arg`` plays (the emulator's ``playback_ms`` when set), or None when the switch cannot open it."""
    host = session.host
    return await played_ms(arg, sounds_dir=host.sounds_dir, playback_ms=host.playback_ms,
                           tts_engine=session.channel.get_var("tts_engine"), tts_engines=host.tts_engines)


Played = Literal["played", "not_found", "hangup"]


async def play_file(session: Session, arg: str) -> Played:
    """Play ``arg`` as ``switch_ivr_play_file`` does; sets the playback_* variables when it opened.

    A file that does not open is reported at once (``mod_sndfile Error Opening File``) and sets nothing.
    """
    ch = session.channel
    if not ch.up:
        return "hangup"
    if not ch.answered and not ch.progress_media_us:
        ch.pre_answer(_media(session))
    total_ms: float | None = None
    try:
        if arg.startswith(HTTP_CACHE):  # downloaded as mod_http_cache does: a URL that does not download fails
            await session.host.http_cache.open(arg)
        total_ms = await media_length_ms(session, arg)
    except MediaNotFound:
        pass
    if total_ms is None:
        ch.core.log(4, "mod_sndfile.c", "sndfile_file_open", 281, f"Error Opening File [{arg}] "
                    "[System error : No such file or directory.]")
        return "not_found"
    started = session.loop.time()
    ok = await session.wait(session.scaled(total_ms))
    if ok:
        played = total_ms
    else:
        scale = session.host.time_scale or 1.0
        played = min(total_ms, (session.loop.time() - started) * 1000.0 / scale)
    samples = int(played * 8)
    ch.set_var("playback_last_offset_pos", str(max(0, samples - 960) if not ok else samples))
    ch.set_var("playback_seconds", str(int(played // 1000)))
    ch.set_var("playback_ms", str(int(played)))
    ch.set_var("playback_samples", str(samples))
    return "played" if ok else "hangup"


_PLAYBACK_RESPONSE: dict[Played, str] = {
    "played": "FILE PLAYED", "not_found": "FILE NOT FOUND", "hangup": "PLAYBACK ERROR",
}


async def app_playback(session: Session, arg: str) -> str | None:
    return _PLAYBACK_RESPONSE[await play_file(session, arg)]


def _fire_dtmf(session: Session, digit: str) -> None:
    session.channel.fire(
        "DTMF",
        post=[("DTMF-Digit", digit), ("DTMF-Duration", str(session.dtmf_duration_ms * 8)), ("DTMF-Source", "RTP")],
        with_vars=False,
    )


ReadStatus = Literal["success", "timeout", "too_small", "failed", "hangup"]


async def _collect(
    session: Session, *, max_digits: int, timeout_ms: float, digit_timeout_ms: float, terminators: str
) -> tuple[str, str, bool] | None:
    """(digits, terminator used, timed out) from the caller's script; None on hangup.

    The scripted keys are pressed at once; when none is left the caller is silent until the timeout
    (``timeout`` before the first digit, ``digit_timeout`` after one), as ``switch_ivr_collect_digits_count``.
    """
    digits = ""
    while len(digits) < max_digits:
        if not session.dtmf:
            if not await session.wait(session.scaled(digit_timeout_ms if digits else timeout_ms)):
                return None
            return digits, "", True
        digit = session.dtmf.popleft()
        _fire_dtmf(session, digit)
        if digit in terminators:
            return digits, digit, False
        digits += digit
    return digits, "", False


async def ivr_read(
    session: Session, *, min_digits: int, max_digits: int, prompt: str, var_name: str, timeout_ms: float,
    terminators: str, digit_timeout_ms: float,
) -> tuple[ReadStatus, str]:
    """``switch_ivr_read``: clear read_result and the variable, play the prompt (a prompt that does not open
    ends it at once, read_result unset), collect, then read_result success / timeout / failure."""
    ch = session.channel
    ch.set_var("read_result", None)
    if var_name:
        ch.set_var(var_name, None)
    max_digits = max(max_digits, min_digits)
    if prompt and prompt.lower() != "silence":
        played = await play_file(session, prompt)
        if played != "played":
            return ("hangup" if played == "hangup" else "failed"), ""
    collected = await _collect(session, max_digits=max_digits, timeout_ms=timeout_ms,
                               digit_timeout_ms=digit_timeout_ms or timeout_ms, terminators=terminators)
    if collected is None:
        return "hangup", ""
    digits, terminator, timed_out = collected
    status: ReadStatus = "timeout" if timed_out else "success"
    if terminator:
        ch.set_var("read_terminator_used", terminator)
    if min_digits and len(digits) < min_digits:
        status = "too_small"
    ch.set_var("read_result", {"success": "success", "timeout": "timeout"}.get(status, "failure"))
    if var_name and digits:
        ch.set_var(var_name, digits)
    return status, digits


async def app_play_and_get_digits(session: Session, arg: str) -> str | None:
    """``min max tries timeout terminators file invalid_file var regexp [digit_timeout]``, as
    ``switch_play_and_get_digits``: after every failed try (no input, too few digits, no regexp match, a prompt
    that does not open) the invalid file is played, and the last try's read_result stays."""
    args = separate_args(arg)
    try:
        min_d, max_d, tries, timeout_ms = int(args[0]), int(args[1]), int(args[2]), float(args[3])
        terminators, prompt = args[4], args[5]
    except (IndexError, ValueError):
        return None
    if terminators.lower() == "none":  # no terminator: '#' is a digit
        terminators = ""
    invalid = args[6] if len(args) > 6 else ""
    var_name = args[7] if len(args) > 7 else ""
    regexp = args[8] if len(args) > 8 else ""
    try:
        digit_timeout_ms = float(args[9]) if len(args) > 9 else 0.0
    except ValueError:
        digit_timeout_ms = 0.0
    ch = session.channel
    if regexp and var_name:
        ch.set_var(f"{var_name}_invalid", None)
    for _ in range(max(0, tries)):
        if not ch.up:
            return None
        status, digits = await ivr_read(session, min_digits=min_d, max_digits=max_d, prompt=prompt,
                                        var_name=var_name, timeout_ms=timeout_ms, terminators=terminators,
                                        digit_timeout_ms=digit_timeout_ms)
        if status == "hangup":
            return None
        if status == "timeout" and len(digits) >= min_d:
            status = "success"
        if min_d == 0 and not digits and ch.get_var("read_terminator_used"):
            return None
        if status == "success" and digits:
            if not regexp or re.search(regexp, digits):
                session.digits_collected = digits
                return None
            if var_name:
                ch.set_var(var_name, None)
                ch.set_var(f"{var_name}_invalid", digits)
        if invalid and await play_file(session, invalid) == "hangup":
            return None
    return None


async def app_read(session: Session, arg: str) -> str | None:
    """``min max file var timeout terminators [digit_timeout]``."""
    args = separate_args(arg)
    try:
        min_d, max_d, prompt, var_name, timeout_ms = int(args[0]), int(args[1]), args[2], args[3], float(args[4])
    except (IndexError, ValueError):
        return None
    terminators = args[5] if len(args) > 5 else "#"
    try:
        digit_timeout_ms = float(args[6]) if len(args) > 6 else 0.0
    except ValueError:
        digit_timeout_ms = 0.0
    status, digits = await ivr_read(session, min_digits=min_d, max_digits=max_d, prompt=prompt, var_name=var_name,
                                    timeout_ms=timeout_ms, terminators=terminators,
                                    digit_timeout_ms=digit_timeout_ms)
    if status in ("success", "timeout") and digits:
        session.digits_collected = digits
    return None


def silent_wav(samples: int) -> bytes:
    """A WAV as mod_sndfile writes a recording (16-bit mono, 8 kHz) of ``samples`` samples of silence."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(2 * samples))
    return out.getvalue()


async def app_record(session: Session, arg: str) -> str | None:
    """``record <path> [<time_limit_secs> [<silence_thresh> [<silence_hits>]]]``.

    RECORD_START, then the callee "speaks" until the time limit or the hangup (silence
    detection is not modelled), then ``record_samples``/``record_seconds``/``record_ms``
    (and ``record_completion_cause`` on the time limit) and RECORD_STOP, as
    ``switch_ivr_record_file_event`` does. No audio is written, except to an ``http_cache://`` URL: the
    recording's length of silence is uploaded there (:meth:`HttpCache.put`) before RECORD_STOP.
    """
    args = separate_args(arg)
    if not args:
        return None
    path = args[0]
    limit_s = float(args[1]) if len(args) > 1 and args[1].isdigit() else 0.0
    ch = session.channel
    if not ch.up:
        return None
    if not ch.answered and not ch.progress_media_us:
        ch.pre_answer(_media(session))
    ch.fire("RECORD_START", post=[("Record-File-Path", path)])
    started = session.loop.time()
    reached_limit = await session.wait(session.scaled(limit_s * 1000.0) if limit_s > 0 else math.inf)
    if reached_limit:
        recorded_ms = limit_s * 1000.0
    else:
        scale = session.host.time_scale or 1.0
        recorded_ms = (session.loop.time() - started) * 1000.0 / scale
        if limit_s > 0:
            recorded_ms = min(recorded_ms, limit_s * 1000.0)
    samples = int(recorded_ms * 8)
    uploaded = None
    if path.startswith(HTTP_CACHE):  # mod_http_cache PUTs the file as record closes it, before RECORD_STOP
        uploaded = await session.host.http_cache.put(path, silent_wav(samples))
        if uploaded not in PUT_OK:
            session.host.note_error(f"Received HTTP error {uploaded} trying to save a recording to "
                                    f"{path.removeprefix(HTTP_CACHE)}")
    ch.set_var("record_samples", str(samples))
    ch.set_var("record_seconds", str(samples // 8000))
    ch.set_var("record_ms", str(samples // 8))
    cause = "success-maxtime" if reached_limit else None
    post = [("Record-File-Path", path)]
    if cause is not None:
        ch.set_var("record_completion_cause", cause)
        post.append(("Record-Completion-Cause", cause))
    ch.fire("RECORD_STOP", post=post)
    session.host.note_recording(RecordingRecord(session.uuid, path, samples // 8, cause, uploaded))
    return None


# ---------------------------------------------------------------------- bridge


def _continue_on_fail(value: str | None, cause: str) -> bool:
    if not value:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    items = {item.strip().upper() for item in value.split(",")}
    return cause in items or str(q850(cause)) in items


class Bridge:
    """``bridge <dial string>`` on an A-leg, driven by the planned leg timelines."""

    def __init__(self, session: Session, dial: DialString, timeout_s: float) -> None:
        self.session = session
        self.ch = session.channel
        self.dial = dial
        self.timeout_s = timeout_s
        self.legs: list[LegPlan] = []
        self.causes: dict[str, str] = {}
        self.failure_vars: list[tuple[str, str]] = []
        self.rang = False

    def _groups(self) -> list[tuple[object, ...]]:
        branches = self.dial.branches
        if len(branches) == 1:
            return list(branches[0].groups)
        return [tuple(leg for branch in branches for leg in branch.groups[0])]

    async def run(self) -> str | None:
        host = self.session.host
        scale = host.time_scale
        cause = "NO_ANSWER"
        files = confirm_files(self.dial)
        media = await lengths(files, sounds_dir=host.sounds_dir, playback_ms=host.playback_ms) if files else {}
        for group in self._groups():
            plan = plan_group(self.dial, group, host.target_for,  # type: ignore[arg-type]
                              timeout_s=self.timeout_s, scale=scale, confirm_media=media)
            self.legs.extend(p for p in plan.legs if p.creates_channel)
            t = 0.0
            for at, kind, leg in plan.events():
                if at > t:
                    if not await self.session.wait(at - t):
                        return self._cancelled(plan)
                    t = at
                if kind == "ring":
                    self._ring(leg, plan)
                elif kind == "fail":
                    self._leg_failed(leg)
                else:
                    return await self._answered(leg, plan)
            if plan.end_at > t and not await self.session.wait(plan.end_at - t):
                return self._cancelled(plan)
            self.causes.update(plan.causes)
            cause = plan.cause
        return self._failed(cause)

    def _legs_value(self) -> str:
        return array_value([f"{p.uuid};{p.target.callee_id_name};{p.user}" for p in self.legs])

    def _causes_value(self) -> str:
        return array_value([f"{p.uuid};{self.causes.get(p.uuid, 'NONE')}" for p in self.legs])

    def _set_callee(self, leg: LegPlan) -> None:
        profile = self.ch.profile
        profile.set("Callee-ID-Name", leg.target.callee_id_name)
        profile.set("Callee-ID-Number", leg.user)

    def _ring(self, leg: LegPlan, plan: GroupPlan) -> None:
        ch = self.ch
        first = not self.rang
        self.rang = True
        if first:
            ch.set_var("originate_disposition", "failure")
            ch.set_var("DIALSTATUS", "INVALIDARGS")
        ch.set_var("originated_legs", self._legs_value())
        ch.set_var("originate_signal_bond", leg.uuid)
        ch.set_var("sip_to_tag", random_tag(self.session.host.rng))
        if not self.dial.simultaneous:
            self._set_callee(leg)
        if first and not ch.answered:
            ch.ring_ready()

    def _leg_failed(self, leg: LegPlan) -> None:
        cause = leg.fail_cause or "NORMAL_CLEARING"
        sip = SIP_FAILURE.get(cause)
        if sip is None or cause in ("ALLOTTED_TIMEOUT", "NO_ANSWER", "LOSE_RACE"):
            return
        code, phrase = sip
        self.failure_vars = [
            ("sip_invite_failure_status", str(code)),
            ("sip_invite_failure_phrase", phrase),
            ("sip_hangup_phrase", phrase),
            ("last_bridge_hangup_cause", cause),
            ("last_bridge_proto_specific_hangup_cause", f"sip:{code}"),
        ]
        self.ch.set_vars(self.failure_vars)

    def _cancelled(self, plan: GroupPlan) -> str | None:
        """The A-leg went away while the legs were ringing."""
        ch = self.ch
        for leg in plan.legs:
            if leg.creates_channel:
                self.causes[leg.uuid] = "ORIGINATOR_CANCEL"
        ch.set_var("originate_disposition", "ORIGINATOR_CANCEL")
        ch.set_var("DIALSTATUS", "CANCEL")
        if self.legs:
            ch.set_var("originate_causes", self._causes_value())
        ch.set_var("originate_failed_cause", "ORIGINATOR_CANCEL")
        return None

    def _failed(self, cause: str) -> str | None:
        ch = self.ch
        if self.legs:
            ch.set_var("originated_legs", self._legs_value())
            ch.set_var("sip_to_tag", ch.get_var("sip_to_tag") or random_tag(self.session.host.rng))
            ch.set_var("originate_causes", self._causes_value())
            ch.set_var("originate_signal_bond", self.legs[-1].uuid)
        ch.set_vars(self.failure_vars)
        ch.set_var("originate_disposition", cause)
        ch.set_var("DIALSTATUS", dialstatus(cause))
        ch.set_var("originate_failed_cause", cause)
        if self.legs and not self.dial.simultaneous:
            self._set_callee(self.legs[-1])
        if not _continue_on_fail(ch.get_var("continue_on_fail"), cause):
            self.session.hangup(cause)
        return None

    def _import_from(self, leg: LegPlan) -> None:
        """switch_process_import: the names in the caller's ``import`` are copied from the leg that answered
        (its ``{}`` and ``[]`` variables), on success only."""
        names = [name.strip() for name in (self.ch.get_var("import") or "").split(",") if name.strip()]
        if not names:
            return
        peer = {**self.dial.vars, **leg.leg.vars}
        for name in names:
            if peer.get(name) is not None:
                self.ch.set_var(name, peer[name])

    async def _answered(self, leg: LegPlan, plan: GroupPlan) -> str | None:
        session = self.session
        ch = self.ch
        self.causes.update(plan.causes)
        self._set_callee(leg)
        b_created = now_us()
        if not ch.answered:
            media = [("switch_m_sdp", ch.get_var("switch_r_sdp") or ""), ("video_media_flow", "inactive"),
                     ("text_media_flow", "inactive"), *_media(session)]
            ch.set_var("sip_invite_failure_status", None)
            ch.set_var("sip_invite_failure_phrase", None)
            answer_channel(session, early_media_vars=media)
        ch.set_var("originate_signal_bond", None)
        ch.set_var("originate_disposition", "SUCCESS")
        ch.set_var("DIALSTATUS", "SUCCESS")
        ch.set_var("originate_causes", self._causes_value())
        ch.set_var("signal_bond", leg.uuid)
        self._import_from(leg)
        session.flush_ack()
        bridged = now_us()
        ch.bridged_us = bridged
        ch.profile.set("Channel-Bridged-Time", str(bridged))
        other = originatee_profile(ch.profile, leg, channel_name=leg.endpoint, created_us=b_created,
                                   callee_id_name=leg.target.callee_id_name)
        other.set("Channel-Answered-Time", str(bridged))
        other.set("Channel-Progress-Time", str(b_created))
        ch.other_type = "originatee"
        ch.other = other
        session.bridged_to = leg.endpoint
        bridge_ids = [("Bridge-A-Unique-ID", ch.uuid), ("Bridge-B-Unique-ID", leg.uuid)]
        ch.fire("CHANNEL_BRIDGE", pre_data=bridge_ids)
        # The A-leg callee's keys left unread now cross the bridge (switch_ivr_bridge), unless the A-leg set
        # bridge_filter_dtmf: then FreeSWITCH drops them.
        keys = "".join(session.dtmf)
        session.dtmf.clear()
        filtered = _true(ch.get_var("bridge_filter_dtmf"))
        session.host.note_bridge(BridgeRecord(ch.uuid, leg.uuid, leg.endpoint, {**self.dial.vars, **leg.leg.vars},
                                              "" if filtered else keys, keys if filtered else ""))
        hang = leg.target.hangup_after_ms
        callee_hung_up = await session.wait(session.scaled(hang) if hang is not None else math.inf)
        ch.set_var("last_bridge_to", leg.uuid)
        ch.set_var("bridge_channel", leg.endpoint)
        ch.set_var("bridge_uuid", leg.uuid)
        ch.set_var("signal_bond", leg.uuid)
        ch.set_var("last_sent_callee_id_name", leg.target.callee_id_name)
        ch.set_var("last_sent_callee_id_number", leg.user)
        ch.set_var("sip_hangup_phrase", "OK")
        ch.set_var("last_bridge_hangup_cause", "NORMAL_CLEARING")
        ch.set_var("last_bridge_proto_specific_hangup_cause", "sip:200")
        ch.set_var("bridge_hangup_cause", "NORMAL_CLEARING")
        other.set("Channel-Hangup-Time", str(now_us()))
        ch.fire("CHANNEL_UNBRIDGE", pre_data=bridge_ids)
        after = (ch.get_var("hangup_after_bridge") or "").lower()
        if callee_hung_up and ch.up and after in ("true", "yes", "1", "on"):
            session.hangup("NORMAL_CLEARING")
        return None


async def app_bridge(session: Session, arg: str) -> str | None:
    ch = session.channel
    try:
        dial = parse_dialstring(arg)
    except DialStringError:
        ch.set_var("originate_disposition", "INVALID_NUMBER_FORMAT")
        ch.set_var("DIALSTATUS", "INVALIDARGS")
        if not _continue_on_fail(ch.get_var("continue_on_fail"), "INVALID_NUMBER_FORMAT"):
            session.hangup("INVALID_NUMBER_FORMAT")
        return None
    timeout = None
    for raw in (dial.vars.get("originate_timeout"), ch.get_var("call_timeout")):
        try:
            if raw is not None and float(raw) > 0:
                timeout = float(raw)
                break
        except ValueError:
            continue
    return await Bridge(session, dial, timeout or DEFAULT_ORIGINATE_TIMEOUT_S).run()


APPS: dict[str, AppImpl] = {
    "answer": app_answer,
    "pre_answer": app_pre_answer,
    "ring_ready": app_ring_ready,
    "set": app_set,
    "export": app_export,
    "unset": app_unset,
    "multiset": app_multiset,
    "hangup": app_hangup,
    "sleep": app_sleep,
    "park": app_park,
    "playback": app_playback,
    "play_and_get_digits": app_play_and_get_digits,
    "read": app_read,
    "record": app_record,
    "bridge": app_bridge,
}
