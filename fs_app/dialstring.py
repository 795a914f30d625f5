"""Turn a :class:`RoutingDecision` into a FreeSWITCH bridge dial string.

``{...}`` holds variables for every leg, ``[...]`` per-leg ones, ``,`` rings legs
together and ``|`` moves on to the next group when a group fails. Nothing from a
caller or a device is copied in unchecked: targets must be plain numbers or SIP AoRs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fs_app.routing import Leg, RoutingDecision

_NUMBER = re.compile(r"\+?[0-9]{3,20}")
_AOR = re.compile(r"[A-Za-z0-9._~+\-]{1,64}@[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class DialSettings:
    """Where legs go on this FreeSWITCH: the core gateway for mobiles, the directory for devices."""

    phone_endpoint: str = "sofia/gateway/ims/{msisdn}"
    # ``{aor}`` (user@domain), ``{user}``, ``{domain}``: the switch's own directory by default; speakers registered
    # on the Kamailio edge are reached through it, e.g. "sofia/external/{aor};fs_path=sip:EDGE:5060".
    speaker_endpoint: str = "user/{aor}"
    confirm_key: str = "1"
    # How long a forked mobile has to press the key once it answered (the prompt, then 5 s, over again). Per leg,
    # FreeSWITCH counts it from the answer; without it the leg's leg_timeout (from the start of ringing) cuts a late
    # answer short, and a per-leg group_confirm_cancel_timeout is ignored (only the {..} one is read).
    confirm_timeout_s: int = 15
    # Prompts are IIM's own audio, fetched over HTTP and cached by the switch (mod_http_cache): FreeSWITCH has no
    # sound package here, and IIM may run on another host. The service points these at its HTTP site.
    confirm_prompt: str = "http_cache://http://127.0.0.1:8088/v1/prompts/confirm-call.wav"
    voicemail_prompt: str = "http_cache://http://127.0.0.1:8088/v1/prompts/leave-message.wav"
    # The operator's voicemail platform as a dial string ("sofia/gateway/ims/vm{msisdn}"); unset: the switch
    # records the message itself (mod_voicemail is not loaded, and would need sound files nobody ships).
    voicemail_endpoint: str | None = None
    # Where the switch writes recorded messages: its own recordings directory unless configured.
    recordings_dir: str = "${recordings_dir}"
    # (tenant id, call uuid) -> where the switch records a message instead: IIM's signed, one-call upload URL
    # (``http_cache://http://IIM/v1/recordings/...``), for a switch that shares no directory with IIM.
    recording_url: Callable[[str, str], str] | None = None


def _leg_target(leg: Leg, settings: DialSettings) -> str:
    if leg.kind == "phone":
        if not _NUMBER.fullmatch(leg.target):
            raise ValueError(f"not a phone number: {leg.target[:40]!r}")
        return settings.phone_endpoint.format(msisdn=leg.target)
    if not _AOR.fullmatch(leg.target):
        raise ValueError(f"not a SIP AoR: {leg.target[:80]!r}")
    user, _, domain = leg.target.partition("@")
    return settings.speaker_endpoint.format(aor=leg.target, user=user, domain=domain)


def _leg(leg: Leg, settings: DialSettings, *, forked: bool) -> str:
    variables = [f"leg_timeout={max(1, int(leg.timeout_s))}"]
    if leg.kind == "phone" and forked:
        # A mobile that forwards to carrier voicemail "answers" at once and would win the
        # fork; the callee has to press a key before this leg is bridged.
        variables += [
            f"group_confirm_key={settings.confirm_key}",
            f"group_confirm_file={settings.confirm_prompt}",
            f"group_confirm_timeout={max(1, settings.confirm_timeout_s)}",
        ]
    if leg.webrtc:
        # A browser or app over WSS takes only ICE + DTLS-SRTP (SAVPF); a plain SIP device would refuse that offer.
        variables.append("media_webrtc=true")
    if leg.device_id:
        # The caller's channel imports this from the leg that answers (BRIDGE_IMPORT): who took the call.
        variables.append(f"iim_device_id={leg.device_id}")
    return "[" + ",".join(variables) + "]" + _leg_target(leg, settings)


#: Set on the caller's channel before the bridge: FreeSWITCH then copies these variables from the answering leg
#: to it (``import`` is read from the caller, the values from the winner, on success only).
BRIDGE_IMPORT = "import=iim_device_id"


def bridge_dial_string(decision: RoutingDecision, settings: DialSettings, *, call_uuid: str = "") -> str:
    """The ``bridge`` argument for a ringing decision."""
    if decision.action != "ring" or not decision.groups:
        raise ValueError("only a ringing decision has a dial string")
    globals_ = ["ignore_early_media=true"]
    if decision.policy_version is not None:
        globals_.append(f"iim_policy_version={decision.policy_version}")
    if call_uuid:
        globals_.append(f"iim_call_id={call_uuid}")
    groups = []
    for group in decision.groups:
        forked = len(group) > 1
        groups.append(",".join(_leg(leg, settings, forked=forked) for leg in group))
    return "{" + ",".join(globals_) + "}" + "|".join(groups)
