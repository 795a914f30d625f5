"""Channel-variable templates derived from the FreeSWITCH 1.10.12 recordings.

FreeSWITCH keeps channel variables in insertion order and *moves a variable to the
end* whenever it is set again; events serialise them after the caller profile. The
functions here return ``(name, value)`` lists in the order a sofia channel acquires
them (INVITE received, media negotiated, ACK, hangup/CDR), with the machine-specific
values (uuids, ports, tags, times) parameterised. Values are raw; the channel encodes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

CODEC_STRING = "OPUS,G722,PCMU,PCMA,H264,VP8"

Q850 = {
    "UNSPECIFIED": 0, "UNALLOCATED_NUMBER": 1, "NO_ROUTE_DESTINATION": 3, "NORMAL_CLEARING": 16,
    "USER_BUSY": 17, "NO_USER_RESPONSE": 18, "NO_ANSWER": 19, "SUBSCRIBER_ABSENT": 20, "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22, "DESTINATION_OUT_OF_ORDER": 27, "INVALID_NUMBER_FORMAT": 28,
    "NORMAL_UNSPECIFIED": 31, "NORMAL_CIRCUIT_CONGESTION": 34, "NETWORK_OUT_OF_ORDER": 38,
    "NORMAL_TEMPORARY_FAILURE": 41, "SWITCH_CONGESTION": 42, "INCOMPATIBLE_DESTINATION": 88,
    "RECOVERY_ON_TIMER_EXPIRE": 102, "ORIGINATOR_CANCEL": 487, "CRASH": 700, "SYSTEM_SHUTDOWN": 701,
    "LOSE_RACE": 702, "MANAGER_REQUEST": 703, "BLIND_TRANSFER": 800, "ATTENDED_TRANSFER": 801,
    "ALLOTTED_TIMEOUT": 802, "USER_CHALLENGE": 803, "MEDIA_TIMEOUT": 804, "PICKED_OFF": 805,
    "USER_NOT_REGISTERED": 806, "PROGRESS_TIMEOUT": 807, "INVALID_GATEWAY": 808, "GATEWAY_DOWN": 809,
}

# SIP status a sofia leg reports for a failure cause (sip_invite_failure_status / proto cause).
SIP_FAILURE = {
    "USER_BUSY": (486, "Busy Here"),
    "NO_ANSWER": (487, "Request Terminated"),
    "ALLOTTED_TIMEOUT": (487, "Request Terminated"),
    "ORIGINATOR_CANCEL": (487, "Request Terminated"),
    "CALL_REJECTED": (603, "Decline"),
    "UNALLOCATED_NUMBER": (404, "Not Found"),
    "NORMAL_TEMPORARY_FAILURE": (503, "Service Unavailable"),
    "DESTINATION_OUT_OF_ORDER": (502, "Bad Gateway"),
    "RECOVERY_ON_TIMER_EXPIRE": (408, "Request Timeout"),
    "NO_USER_RESPONSE": (480, "Temporarily Unavailable"),
}

_TAG_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def random_tag(rng: random.Random, n: int = 13) -> str:
    """A SIP tag-like token of ``n`` alphanumerics."""
    value = rng.getrandbits(6 * n)
    out = []
    for _ in range(n):
        value, digit = divmod(value, 62)
        out.append(_TAG_ALPHABET[digit])
    return "".join(out)


_STAMPS: dict[int, str] = {}


def local_stamp(us: int) -> str:
    """``YYYY-mm-dd HH:MM:SS`` local time (cached per second)."""
    second = us // 1_000_000
    text = _STAMPS.get(second)
    if text is None:
        if len(_STAMPS) > 4096:
            _STAMPS.clear()
        text = _STAMPS[second] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    return text


def q850(cause: str) -> int:
    return Q850.get(cause, 0)


def dialstatus(cause: str) -> str:
    """``DIALSTATUS`` for an originate result cause, as the end of ``switch_ivr_originate`` sets it."""
    return {
        "SUCCESS": "SUCCESS", "ORIGINATOR_CANCEL": "CANCEL", "USER_BUSY": "BUSY", "NO_ANSWER": "NOANSWER",
        "DESTINATION_OUT_OF_ORDER": "INVALIDARGS", "INVALID_PROFILE": "INVALIDARGS", "CALL_REJECTED": "DONTCALL",
    }.get(cause, cause)


@dataclass(slots=True)
class SipCallerParams:
    """What the INVITE that created an inbound sofia channel looked like."""

    uuid: str
    session_id: int
    cid_name: str
    cid_num: str
    destination: str
    profile: str = "external"
    caller_host: str = "127.0.0.1"
    caller_port: int = 5070
    fs_ip: str = "127.0.0.1"
    fs_port: int = 5080
    call_id: str = ""
    from_tag: str = ""
    branch: str = ""
    created_us: int = 0


_RFC2822: dict[int, str] = {}


def rfc2822(ts: float) -> str:
    second = int(ts)
    text = _RFC2822.get(second)
    if text is None:
        if len(_RFC2822) > 4096:
            _RFC2822.clear()
        text = _RFC2822[second] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(second))
    return text


def remote_sdp(host: str, port: int) -> str:
    return (
        "v=0\r\no=user1 53655765 2353687637 IN IP4 " + host + "\r\ns=-\r\nc=IN IP4 " + host + "\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
    )


def local_sdp(ip: str, port: int, session: int) -> str:
    return (
        f"v=0\r\no=FreeSWITCH {session} {session + 1} IN IP4 {ip}\r\ns=FreeSWITCH\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
    )


def sofia_inbound_vars(p: SipCallerParams) -> list[tuple[str, str]]:
    """Variables of an inbound sofia channel when the dialplan reaches ``socket``."""
    chan = f"sofia/{p.profile}/{p.cid_num}@{p.caller_host}:{p.caller_port}"
    from_uri = f"{p.cid_num}@{p.caller_host}:{p.caller_port}"
    req_uri = f"{p.destination}@{p.fs_ip}:{p.fs_port}"
    return [
        ("direction", "inbound"),
        ("uuid", p.uuid),
        ("session_id", str(p.session_id)),
        ("sip_from_user", p.cid_num),
        ("sip_from_port", str(p.caller_port)),
        ("sip_from_uri", from_uri),
        ("sip_from_host", p.caller_host),
        ("video_media_flow", "disabled"),
        ("audio_media_flow", "disabled"),
        ("text_media_flow", "disabled"),
        ("channel_name", chan),
        ("sip_call_id", p.call_id),
        ("sip_local_network_addr", p.fs_ip),
        ("sip_network_ip", p.caller_host),
        ("sip_network_port", str(p.caller_port)),
        ("sip_invite_stamp", str(p.created_us)),
        ("sip_received_ip", p.caller_host),
        ("sip_received_port", str(p.caller_port)),
        ("sip_via_protocol", "udp"),
        ("sip_from_user_stripped", p.cid_num),
        ("sip_from_tag", p.from_tag),
        ("sofia_profile_name", p.profile),
        ("sofia_profile_url", f"sip:mod_sofia@{p.fs_ip}:{p.fs_port}"),
        ("recovery_profile_name", p.profile),
        ("sip_full_via", f"SIP/2.0/UDP {p.caller_host}:{p.caller_port};branch={p.branch}"),
        ("sip_from_display", p.cid_name),
        ("sip_full_from", f'"{p.cid_name}" <sip:{from_uri}>;tag={p.from_tag}'),
        ("sip_full_to", f"<sip:{req_uri}>"),
        ("sip_req_user", p.destination),
        ("sip_req_port", str(p.fs_port)),
        ("sip_req_uri", req_uri),
        ("sip_req_host", p.fs_ip),
        ("sip_to_user", p.destination),
        ("sip_to_port", str(p.fs_port)),
        ("sip_to_uri", req_uri),
        ("sip_to_host", p.fs_ip),
        ("sip_contact_user", p.cid_num),
        ("sip_contact_port", str(p.caller_port)),
        ("sip_contact_uri", from_uri),
        ("sip_contact_host", p.caller_host),
        ("rtp_use_codec_string", CODEC_STRING),
        ("sip_via_host", p.caller_host),
        ("sip_via_port", str(p.caller_port)),
        ("max_forwards", "70"),
        ("switch_r_sdp", remote_sdp(p.caller_host, 6000)),
        ("ep_codec_string", "CORE_PCM_MODULE.PCMU@8000h@20i@64000b"),
        ("endpoint_disposition", "DELAYED NEGOTIATION"),
        ("call_uuid", p.uuid),
        ("outside_call", "true"),
        ("RFC2822_DATE", rfc2822(p.created_us / 1e6)),
        ("export_vars", "RFC2822_DATE"),
    ]


def per_call_vars(p: SipCallerParams) -> list[tuple[str, str]]:
    """The variables of :func:`sofia_inbound_vars` that change from call to call."""
    return [
        ("uuid", p.uuid),
        ("session_id", str(p.session_id)),
        ("sip_call_id", p.call_id),
        ("sip_invite_stamp", str(p.created_us)),
        ("sip_from_tag", p.from_tag),
        ("sip_full_via", f"SIP/2.0/UDP {p.caller_host}:{p.caller_port};branch={p.branch}"),
        ("sip_full_from", f'"{p.cid_name}" <sip:{p.cid_num}@{p.caller_host}:{p.caller_port}>;tag={p.from_tag}'),
        ("call_uuid", p.uuid),
        ("RFC2822_DATE", rfc2822(p.created_us / 1e6)),
    ]


def media_vars(*, fs_ip: str, local_port: int, ssrc: int, remote_ip: str, remote_port: int) -> list[tuple[str, str]]:
    """Set when media is negotiated (pre-answer / answer of a sofia leg)."""
    return [
        ("rtp_use_codec_string", CODEC_STRING),
        ("remote_video_media_flow", "inactive"),
        ("remote_text_media_flow", "inactive"),
        ("remote_audio_media_flow", "sendrecv"),
        ("audio_media_flow", "sendrecv"),
        ("rtp_audio_recv_pt", "0"),
        ("rtp_use_codec_name", "PCMU"),
        ("rtp_use_codec_rate", "8000"),
        ("rtp_use_codec_ptime", "20"),
        ("rtp_use_codec_channels", "1"),
        ("rtp_last_audio_codec_string", "PCMU@8000h@20i@1c"),
        ("read_codec", "PCMU"),
        ("original_read_codec", "PCMU"),
        ("read_rate", "8000"),
        ("original_read_rate", "8000"),
        ("write_codec", "PCMU"),
        ("write_rate", "8000"),
        ("dtmf_type", "rfc2833"),
        ("local_media_ip", fs_ip),
        ("local_media_port", str(local_port)),
        ("advertised_media_ip", fs_ip),
        ("rtp_use_timer_name", "soft"),
        ("rtp_use_pt", "0"),
        ("rtp_use_ssrc", str(ssrc)),
        ("rtp_2833_send_payload", "101"),
        ("rtp_2833_recv_payload", "101"),
        ("remote_media_ip", remote_ip),
        ("remote_media_port", str(remote_port)),
    ]


def ack_vars(p: SipCallerParams, to_tag: str) -> list[tuple[str, str]]:
    """Set by sofia when the caller's ACK arrives after our 200 OK."""
    from_uri = f"{p.cid_num}@{p.caller_host}:{p.caller_port}"
    req_uri = f"{p.destination}@{p.fs_ip}:{p.fs_port}"
    return [
        ("sip_to_tag", to_tag),
        ("sip_from_tag", p.from_tag),
        ("sip_cseq", "1"),
        ("sip_call_id", p.call_id),
        ("sip_full_via", f"SIP/2.0/UDP {p.caller_host}:{p.caller_port};branch={p.branch}-15"),
        ("sip_from_display", p.cid_name),
        ("sip_full_from", f'"{p.cid_name}" <sip:{from_uri}>;tag={p.from_tag}'),
        ("sip_full_to", f"<sip:{req_uri}>;tag={to_tag}"),
    ]


@dataclass(frozen=True, slots=True)
class OriginateParams:
    """An outgoing sofia leg created by ``originate`` (or a bridge B-leg)."""

    uuid: str
    session_id: int
    endpoint: str
    user: str
    host: str
    port: int
    profile: str = "external"
    fs_ip: str = "127.0.0.1"
    fs_port: int = 5080
    from_number: str = "0000000000"


def originate_create_vars(p: OriginateParams, dial_vars: list[tuple[str, str]]) -> list[tuple[str, str]]:
    dest = f"{p.user}@{p.host}:{p.port}" if p.port else f"{p.user}@{p.host}"
    chan = f"sofia/{p.profile}/{dest}"
    out = [
        ("direction", "outbound"),
        ("is_outbound", "true"),
        ("uuid", p.uuid),
        ("call_uuid", p.uuid),
        ("session_id", str(p.session_id)),
        ("sip_local_network_addr", p.fs_ip),
        ("sip_profile_name", p.profile),
        ("video_media_flow", "disabled"),
        ("text_media_flow", "disabled"),
        ("channel_name", chan),
        ("sip_destination_url", f"sip:{dest}"),
    ]
    out.extend(dial_vars)
    out += [
        ("originate_early_media", "false"),
        ("originate_endpoint", p.endpoint.split("/", 1)[0]),
        ("rtp_use_codec_string", CODEC_STRING),
        ("local_media_ip", p.fs_ip),
        ("advertised_media_ip", p.fs_ip),
        ("audio_media_flow", "sendrecv"),
        ("sip_outgoing_contact_uri", f"<sip:mod_sofia@{p.fs_ip}:{p.fs_port}>"),
        ("sip_req_uri", dest),
        ("sip_to_host", f"{p.host}:{p.port}" if p.port else p.host),
        ("sip_from_host", p.fs_ip),
        ("sofia_profile_name", p.profile),
        ("recovery_profile_name", p.profile),
        ("sofia_profile_url", f"sip:mod_sofia@{p.fs_ip}:{p.fs_port}"),
    ]
    return out


def originate_progress_vars(p: OriginateParams, rng: random.Random) -> list[tuple[str, str]]:
    to_tag = random_tag(rng)
    from_tag = random_tag(rng)
    branch = "z9hG4bK" + random_tag(rng)
    callee = f"{p.user}@{p.host}:{p.port}" if p.port else f"{p.user}@{p.host}"
    return [
        ("sip_reply_host", p.host),
        ("sip_reply_port", str(p.port or 5060)),
        ("sip_network_ip", p.host),
        ("sip_network_port", str(p.port or 5060)),
        ("sip_recover_contact", f"<sip:{callee};transport=UDP>"),
        ("sip_full_via", f"SIP/2.0/UDP {p.fs_ip}:{p.fs_port};rport;branch={branch}"),
        ("sip_recover_via", f"SIP/2.0/UDP {p.fs_ip}:{p.fs_port};rport;branch={branch}"),
        ("sip_full_from", f"<sip:{p.from_number}@{p.fs_ip}>;tag={from_tag}"),
        ("sip_full_to", f"<sip:{callee}>;tag={to_tag}"),
        ("sip_from_user", p.from_number),
        ("sip_from_uri", f"{p.from_number}@{p.fs_ip}"),
        ("sip_from_host", p.fs_ip),
        ("sip_to_user", p.user),
        ("sip_to_port", str(p.port or 5060)),
        ("sip_to_uri", callee),
        ("sip_to_host", p.host),
        ("sip_contact_params", "transport=UDP"),
        ("sip_contact_user", p.user),
        ("sip_contact_port", str(p.port or 5060)),
        ("sip_contact_uri", callee),
        ("sip_contact_host", p.host),
        ("sip_to_tag", to_tag),
        ("sip_from_tag", from_tag),
        ("sip_cseq", str(rng.randint(100000000, 200000000))),
        ("sip_call_id", f"{rng.getrandbits(32):08x}-6385-1240-d7a0-c21ce82d38ef"),
    ]


def cdr_vars(
    *,
    cause: str,
    created_us: int,
    answered_us: int,
    progress_us: int,
    progress_media_us: int,
    bridged_us: int,
    ended_us: int,
    last_app: str | None,
    last_arg: str | None,
    caller_id: str,
    hangup_disposition: str | None,
    rtp_out_packets: int,
    media: bool = True,
) -> list[tuple[str, str]]:
    """The CDR block FreeSWITCH adds for CHANNEL_HANGUP_COMPLETE (switch_channel_set_timestamps)."""

    stamp = local_stamp
    out: list[tuple[str, str]] = [
        ("hangup_cause", cause),
        ("hangup_cause_q850", str(q850(cause))),
        ("digits_dialed", "none"),
        ("start_stamp", stamp(created_us)),
        ("profile_start_stamp", stamp(created_us)),
    ]
    if answered_us:
        out.append(("answer_stamp", stamp(answered_us)))
    if bridged_us:
        out.append(("bridge_stamp", stamp(bridged_us)))
    if progress_us:
        out.append(("progress_stamp", stamp(progress_us)))
    if progress_media_us:
        out.append(("progress_media_stamp", stamp(progress_media_us)))
    out.append(("end_stamp", stamp(ended_us)))

    def epoch(name: str, us: int) -> None:
        out.append((f"{name}_epoch", str(us // 1_000_000)))
        out.append((f"{name}_uepoch", str(us)))

    epoch("start", created_us)
    epoch("profile_start", created_us)
    epoch("answer", answered_us)
    epoch("bridge", bridged_us)
    epoch("last_hold", 0)
    out += [("hold_accum_seconds", "0"), ("hold_accum_usec", "0"), ("hold_accum_ms", "0")]
    epoch("resurrect", 0)
    epoch("progress", progress_us)
    epoch("progress_media", progress_media_us)
    epoch("end", ended_us)
    if last_app:
        out.append(("last_app", last_app))
    if last_arg:
        out.append(("last_arg", last_arg))
    out.append(("caller_id", caller_id))

    duration = max(0, ended_us - created_us)
    bill = max(0, ended_us - answered_us) if answered_us else 0
    progress = max(0, progress_us - created_us) if progress_us else 0
    answer = max(0, answered_us - created_us) if answered_us else 0
    progress_media = max(0, progress_media_us - created_us) if progress_media_us else 0
    wait = answer
    for unit, div in (("sec", 1_000_000), ("msec", 1000), ("usec", 1)):
        prefix = {"sec": "", "msec": "m", "usec": "u"}[unit]
        names = (
            (f"{prefix}duration" if prefix else "duration", duration),
            (f"bill{unit}", bill),
            (f"progress{unit}", progress),
            (f"answer{unit}", answer),
            (f"wait{unit}", wait),
            (f"progress_media{unit}", progress_media),
            (f"flow_bill{unit}", duration),
        )
        out += [(name, str(value // div)) for name, value in names]
    if hangup_disposition:
        out.append(("sip_hangup_disposition", hangup_disposition))
    if media:
        out += rtp_stats(rtp_out_packets)
    return out


def rtp_stats(out_packets: int) -> list[tuple[str, str]]:
    out_bytes = out_packets * 172
    return [
        ("rtp_audio_in_raw_bytes", "0"),
        ("rtp_audio_in_media_bytes", "0"),
        ("rtp_audio_in_packet_count", "0"),
        ("rtp_audio_in_media_packet_count", "0"),
        ("rtp_audio_in_skip_packet_count", "0"),
        ("rtp_audio_in_jitter_packet_count", "0"),
        ("rtp_audio_in_dtmf_packet_count", "0"),
        ("rtp_audio_in_cng_packet_count", "0"),
        ("rtp_audio_in_flush_packet_count", "0"),
        ("rtp_audio_in_largest_jb_size", "0"),
        ("rtp_audio_in_jitter_min_variance", "0.00"),
        ("rtp_audio_in_jitter_max_variance", "0.00"),
        ("rtp_audio_in_jitter_loss_rate", "0.00"),
        ("rtp_audio_in_jitter_burst_rate", "0.00"),
        ("rtp_audio_in_mean_interval", "0.00"),
        ("rtp_audio_in_flaw_total", "0"),
        ("rtp_audio_in_quality_percentage", "100.00"),
        ("rtp_audio_in_mos", "4.50"),
        ("rtp_audio_out_raw_bytes", str(out_bytes)),
        ("rtp_audio_out_media_bytes", str(out_bytes)),
        ("rtp_audio_out_packet_count", str(out_packets)),
        ("rtp_audio_out_media_packet_count", str(out_packets)),
        ("rtp_audio_out_skip_packet_count", "0"),
        ("rtp_audio_out_dtmf_packet_count", "0"),
        ("rtp_audio_out_cng_packet_count", "0"),
        ("rtp_audio_rtcp_packet_count", "0"),
        ("rtp_audio_rtcp_octet_count", "0"),
    ]


def register_headers(
    *, user: str, domain: str, contact: str, expires: int, call_id: str, network_ip: str, network_port: int,
    user_agent: str, profile: str = "internal",
) -> list[tuple[str, str]]:
    """``sofia::register`` body headers (i06)."""
    return [
        ("profile-name", profile),
        ("from-user", user),
        ("from-host", domain),
        ("presence-hosts", f"{domain},{domain}"),
        ("contact", contact),
        ("call-id", call_id),
        ("rpid", "unknown"),
        ("status", "Registered(UDP)"),
        ("expires", str(expires)),
        ("to-user", user),
        ("to-host", domain),
        ("network-ip", network_ip),
        ("network-port", str(network_port)),
        ("username", user),
        ("realm", domain),
        ("user-agent", user_agent),
        *directory_user_headers(user, domain),
    ]


def unregister_headers(
    *, user: str, domain: str, contact: str, call_id: str, network_ip: str, network_port: int, user_agent: str,
    profile: str = "internal",
) -> list[tuple[str, str]]:
    """``sofia::unregister`` body headers (i06): relative ``expires: 0``."""
    return [
        ("profile-name", profile),
        ("username", user),
        ("from-user", user),
        ("from-host", domain),
        ("contact", contact),
        ("call-id", call_id),
        ("rpid", "unknown"),
        ("realm", domain),
        ("network-ip", network_ip),
        ("network-port", str(network_port)),
        ("user-agent", user_agent),
        ("expires", "0"),
        *directory_user_headers(user, domain),
    ]


def expire_headers(
    *, user: str, domain: str, contact: str, call_id: str, network_ip: str, network_port: int, user_agent: str,
    expires_epoch: int, profile: str = "internal",
) -> list[tuple[str, str]]:
    """``sofia::expire`` body headers (i06): a smaller set and an *absolute* epoch ``expires``."""
    return [
        ("profile-name", profile),
        ("call-id", call_id),
        ("user", user),
        ("username", user),
        ("host", domain),
        ("contact", contact),
        ("expires", str(expires_epoch)),
        ("user-agent", user_agent),
        ("realm", domain),
        ("network-ip", network_ip),
        ("network-port", str(network_port)),
    ]


def directory_user_headers(user: str, domain: str) -> list[tuple[str, str]]:
    """The directory ``<variables>`` of the stock example users, copied into register events."""
    return [
        ("sip_number_alias", user),
        ("sip_auth_username", user),
        ("sip_auth_realm", domain),
        ("number_alias", user),
        ("user_name", user),
        ("domain_name", domain),
        ("record_stereo", "true"),
        ("default_gateway", "example.com"),
        ("default_areacode", "918"),
        ("transfer_fallback_extension", "operator"),
        ("toll_allow", "domestic,international,local"),
        ("accountcode", user),
        ("user_context", "default"),
        ("effective_caller_id_name", f"Extension {user}"),
        ("effective_caller_id_number", user),
        ("outbound_caller_id_name", "FreeSWITCH"),
        ("outbound_caller_id_number", "0000000000"),
        ("callgroup", "techsupport"),
    ]
