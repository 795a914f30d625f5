"""decide(): every ring mode and every rule, as a pure function of snapshot, call and time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from fs_app.dialstring import DialSettings, bridge_dial_string
from fs_app.routing import CallFacts, decide, in_quiet_hours
from policy_cache.snapshot import RoutingSnapshot, SpeakerDevice, compile_snapshot

NOON = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # 12:00 in Berlin (CEST)
CALL = CallFacts(destination="+4915112345678", caller="+4930111222", uuid="c0ffee00-0000-4000-8000-000000000001")


def _snapshot(**changes: object) -> RoutingSnapshot:
    base = compile_snapshot(
        subscriber_id="sub-1", tenant_id="tenant-a", msisdn="+4915112345678", aor="anna@iim.local",
        time_zone="Europe/Berlin", ring_mode="simultaneous", phone_timeout_s=20, home_timeout_s=25,
        quiet_start_min=23 * 60, quiet_end_min=7 * 60, dnd=False, allowed_callers=None, blocked_callers=None,
        presence="home", home_only_when_present=False, announce_consent=True, fallback="voicemail",
        speakers=(
            SpeakerDevice("dev-kitchen", "kitchen@iim.local", sip=True, cloud_announce=False, online=True,
                          name="kitchen"),
            SpeakerDevice("dev-living", "living@iim.local", sip=True, cloud_announce=False, online=True,
                          name="living"),
            SpeakerDevice("dev-cloud", "vendor:echo-1", sip=False, cloud_announce=True, online=True, name="echo"),
        ),
        policy_version=7,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _targets(decision) -> list[list[str]]:  # type: ignore[no-untyped-def]
    return [[leg.target for leg in group] for group in decision.groups]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("phone_only", [["+4915112345678"]]),
        ("home_only", [["kitchen@iim.local", "living@iim.local"]]),
        ("simultaneous", [["+4915112345678", "kitchen@iim.local", "living@iim.local"]]),
        ("phone_then_home", [["+4915112345678"], ["kitchen@iim.local", "living@iim.local"]]),
        ("home_then_phone", [["kitchen@iim.local", "living@iim.local"], ["+4915112345678"]]),
    ],
)
def test_each_ring_mode_orders_the_legs(mode: str, expected: list[list[str]]) -> None:
    decision = decide(_snapshot(ring_mode=mode), CALL, NOON)
    assert decision.action == "ring"
    assert _targets(decision) == expected
    assert decision.policy_version == 7
    assert decision.rules[0] == f"policy v7: ring_mode={mode}"


def test_cloud_only_speaker_is_announced_not_bridged() -> None:
    decision = decide(_snapshot(), CALL, NOON)
    assert [a.endpoint for a in decision.announcements] == ["vendor:echo-1"]
    assert "vendor:echo-1" not in [leg.target for leg in decision.legs]


def test_blocked_caller_is_rejected() -> None:
    decision = decide(_snapshot(blocked_callers=frozenset({"+4930111222"})), CALL, NOON)
    assert decision.action == "reject"
    assert decision.reject_cause == "CALL_REJECTED"
    assert any("blocked" in rule for rule in decision.rules)


def test_dnd_goes_straight_to_the_fallback() -> None:
    decision = decide(_snapshot(dnd=True), CALL, NOON)
    assert decision.action == "fallback"
    assert decision.fallback == "voicemail"
    assert decision.groups == ()


def test_allowed_caller_passes_dnd_and_quiet_hours() -> None:
    night = datetime(2026, 6, 1, 22, 30, tzinfo=UTC)  # 00:30 in Berlin
    snap = _snapshot(dnd=True, allowed_callers=frozenset({"+4930111222"}))
    decision = decide(snap, CALL, night)
    assert decision.action == "ring"
    assert len(decision.legs) == 3


def test_quiet_hours_keep_the_home_silent_but_ring_the_phone() -> None:
    night = datetime(2026, 6, 1, 22, 30, tzinfo=UTC)
    decision = decide(_snapshot(), CALL, night)
    assert _targets(decision) == [["+4915112345678"]]
    assert any("quiet hours 23:00-07:00 Europe/Berlin" in rule for rule in decision.rules)


@pytest.mark.parametrize(
    ("utc", "quiet"),
    [
        # Spring forward, 2026-03-29: 07:00 local is 05:00 UTC after the change (06:00 UTC before it).
        (datetime(2026, 3, 29, 4, 59, tzinfo=UTC), True),   # 06:59 CEST
        (datetime(2026, 3, 29, 5, 0, tzinfo=UTC), False),   # 07:00 CEST
        (datetime(2026, 3, 28, 5, 59, tzinfo=UTC), True),   # 06:59 CET the day before
        (datetime(2026, 3, 28, 6, 0, tzinfo=UTC), False),
        # Fall back, 2026-10-25: 23:00 local on the 24th is 21:00 UTC (CEST), 07:00 on the 25th is 06:00 UTC (CET).
        (datetime(2026, 10, 24, 20, 59, tzinfo=UTC), False),
        (datetime(2026, 10, 24, 21, 0, tzinfo=UTC), True),
        (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), True),   # 02:30 CET, after the repeated hour
        (datetime(2026, 10, 25, 5, 59, tzinfo=UTC), True),   # 06:59 CET
        (datetime(2026, 10, 25, 6, 0, tzinfo=UTC), False),   # 07:00 CET
    ],
)
def test_quiet_hours_follow_local_time_across_dst_changes(utc: datetime, quiet: bool) -> None:
    assert in_quiet_hours(_snapshot(), utc) is quiet


def test_offline_speaker_is_skipped_with_a_rule() -> None:
    snap = _snapshot().with_device_status("kitchen@iim.local", False)
    decision = decide(snap, CALL, NOON)
    assert "kitchen@iim.local" not in [leg.target for leg in decision.legs]
    assert "device kitchen is offline: skipped" in decision.rules


def test_without_consent_the_home_never_rings() -> None:
    decision = decide(_snapshot(announce_consent=False, ring_mode="home_only"), CALL, NOON)
    assert _targets(decision) == [["+4915112345678"]]
    assert decision.announcements == ()
    assert any("no consent" in rule for rule in decision.rules)


def test_presence_rule_keeps_an_empty_home_silent() -> None:
    decision = decide(_snapshot(presence="away", home_only_when_present=True), CALL, NOON)
    assert _targets(decision) == [["+4915112345678"]]


def test_home_only_with_no_usable_device_still_rings_the_phone() -> None:
    snap = _snapshot(ring_mode="home_only", speakers=())
    decision = decide(snap, CALL, NOON)
    assert _targets(decision) == [["+4915112345678"]]
    assert "no home device can ring: phone only" in decision.rules


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        decide(_snapshot(), CALL, datetime(2026, 1, 1, 12, 0))  # noqa: DTZ001


def test_fork_dial_string_confirms_the_mobile_leg_only() -> None:
    decision = decide(_snapshot(), CALL, NOON)
    dial = bridge_dial_string(decision, DialSettings(), call_uuid=CALL.uuid)
    assert dial == (
        "{ignore_early_media=true,iim_policy_version=7,iim_call_id=c0ffee00-0000-4000-8000-000000000001}"
        "[leg_timeout=20,group_confirm_key=1,group_confirm_file=http_cache://http://127.0.0.1:8088/v1/prompts/confirm-call.wav,"
        "group_confirm_timeout=15]sofia/gateway/ims/+4915112345678,"
        "[leg_timeout=25,iim_device_id=dev-kitchen]user/kitchen@iim.local,"
        "[leg_timeout=25,iim_device_id=dev-living]user/living@iim.local"
    )


def test_sequential_dial_string_uses_pipes_and_no_confirmation_for_a_lone_phone() -> None:
    decision = decide(_snapshot(ring_mode="phone_then_home"), CALL, NOON)
    dial = bridge_dial_string(decision, DialSettings())
    assert dial == (
        "{ignore_early_media=true,iim_policy_version=7}"
        "[leg_timeout=20]sofia/gateway/ims/+4915112345678|"
        "[leg_timeout=25,iim_device_id=dev-kitchen]user/kitchen@iim.local,"
        "[leg_timeout=25,iim_device_id=dev-living]user/living@iim.local"
    )


@pytest.mark.parametrize("evil", ["x@iim.local,sofia/gateway/ims/900", "a]{x=1}@h", "ann@host|user/1000"])
def test_device_endpoint_cannot_inject_into_the_dial_string(evil: str) -> None:
    snap = _snapshot(ring_mode="home_only",
                     speakers=(SpeakerDevice("d", evil, sip=True, cloud_announce=False, online=True),))
    with pytest.raises(ValueError, match="AoR"):
        bridge_dial_string(decide(snap, CALL, NOON), DialSettings())


def test_consent_that_expired_since_the_last_sync_keeps_the_home_silent() -> None:
    decision = decide(_snapshot(announce_consent_expires=NOON.timestamp() - 1), CALL, NOON)
    assert _targets(decision) == [["+4915112345678"]]
    assert "consent to announce calls has expired: home devices skipped" in decision.rules


def test_a_webrtc_speaker_is_offered_webrtc_media_and_a_sip_one_plain_rtp() -> None:
    snap = _snapshot(ring_mode="home_only", speakers=(
        SpeakerDevice("dev-browser", "browser@iim.local", sip=True, cloud_announce=False, online=True, webrtc=True),
        SpeakerDevice("dev-desk", "desk@iim.local", sip=True, cloud_announce=False, online=True)))
    dial = bridge_dial_string(decide(snap, CALL, NOON), DialSettings())
    assert dial == (
        "{ignore_early_media=true,iim_policy_version=7}"
        "[leg_timeout=25,media_webrtc=true,iim_device_id=dev-browser]user/browser@iim.local,"
        "[leg_timeout=25,iim_device_id=dev-desk]user/desk@iim.local"
    )


def test_speakers_registered_on_the_edge_are_dialled_through_it() -> None:
    dial = bridge_dial_string(decide(_snapshot(ring_mode="home_only"), CALL, NOON),
                              DialSettings(speaker_endpoint="sofia/external/{aor};fs_path=sip:10.0.0.2:5060"))
    assert "]sofia/external/kitchen@iim.local;fs_path=sip:10.0.0.2:5060," in dial
    user_only = bridge_dial_string(decide(_snapshot(ring_mode="home_only"), CALL, NOON),
                                   DialSettings(speaker_endpoint="sofia/external/{user}@10.0.0.2"))
    assert user_only.endswith("]sofia/external/living@10.0.0.2")


def test_record_message_fallback_needs_a_call_recording_consent() -> None:
    refused = decide(_snapshot(fallback="record_message", dnd=True), CALL, NOON)
    assert refused.fallback == "missed_call_sms"
    assert "no consent to record calls: record_message fallback replaced by missed_call_sms" in refused.rules
    granted = decide(_snapshot(fallback="record_message", recording_consent=True), CALL, NOON)
    assert granted.fallback == "record_message"
    expired = _snapshot(fallback="record_message", recording_consent=True,
                        recording_consent_expires=NOON.timestamp() - 1)
    assert decide(expired, CALL, NOON).fallback == "missed_call_sms"
