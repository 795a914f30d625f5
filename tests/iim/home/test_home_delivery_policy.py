"""The pure SMS read-out decision: consent, senders, quiet hours across midnight and DST, DND, presence,
devices - and a refusal never carries the body."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from iim.home.sms_policy import (
    ConsentFacts,
    DeviceFacts,
    HouseholdFacts,
    PolicyFacts,
    SmsFacts,
    SmsReadout,
    decide_sms_readout,
    in_quiet_hours,
    normalise_number,
    sender_allowed,
)

TENANT = "00000000-0000-0000-0000-00000000000a"
OTHER_TENANT = "00000000-0000-0000-0000-00000000000b"
SUB = "10000000-0000-0000-0000-000000000001"
BODY = "Your code is 482913"
NOON_MSK = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)  # 12:00 Europe/Moscow

SPEAKER = DeviceFacts("d-spk", "Kitchen speaker", frozenset({"tts", "cloud_announce"}), "acme", "spk-1")
PANEL = DeviceFacts("d-pnl", "Hall panel", frozenset({"display"}), "acme", "pnl-1")
SIP_SPEAKER = DeviceFacts("d-sip", "SIP speaker", frozenset({"sip", "tts"}), None, None, "sip:s@iim.local")


def consent(**kw: object) -> ConsentFacts:
    base: dict[str, object] = {"consent_id": "c-1", "tenant_id": TENANT, "subscriber_id": SUB,
                               "purpose": "read_sms", "expires_at": None, "revoked_at": None,
                               "scope": {"allowed_senders": ["+7916"]}}
    base.update(kw)
    return ConsentFacts(**base)  # type: ignore[arg-type]


def facts(**kw: object) -> SmsFacts:
    home = HouseholdFacts("h-1", "Europe/Moscow", "home", (SPEAKER, PANEL, SIP_SPEAKER))
    base: dict[str, object] = {"tenant_id": TENANT, "sms_id": "sms-1", "sender": "79161234567",
                               "subscriber_id": SUB, "households": (home,), "consent": consent(),
                               "received_at": NOON_MSK, "body": BODY}
    base.update(kw)
    return SmsFacts(**base)  # type: ignore[arg-type]


def refused(readout: SmsReadout) -> None:
    assert readout.nothing
    assert readout.text is None
    assert BODY not in repr(readout)
    assert all(BODY not in r for r in readout.reasons)


def test_consented_sender_at_home_is_read_aloud_on_cloud_speakers_and_shown_on_displays() -> None:
    out = decide_sms_readout(facts(), NOON_MSK)
    assert [t.device_id for t in out.read_aloud] == ["d-spk"]
    assert [t.device_id for t in out.show_text] == ["d-pnl"]
    assert out.text == f"Message from +79161234567. {BODY}"
    assert out.consent_id == "c-1"
    assert "device_sip_only" in out.codes  # SIP playback is out of scope: said, not hidden
    assert BODY not in repr(out)
    assert BODY not in repr(facts())


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"consent": None}, "no_consent"),
        ({"consent": consent(purpose="announce_calls")}, "no_consent"),
        ({"consent": consent(revoked_at=NOON_MSK - timedelta(minutes=1))}, "consent_revoked"),
        ({"consent": consent(expires_at=NOON_MSK)}, "consent_expired"),
        ({"consent": consent(tenant_id=OTHER_TENANT)}, "consent_foreign"),
        ({"consent": consent(subscriber_id="someone-else")}, "consent_foreign"),
        ({"subscriber_id": None}, "no_subscriber"),
    ],
)
def test_without_a_valid_consent_nothing_is_looked_at_and_no_text_is_carried(change: dict[str, object],
                                                                               code: str) -> None:
    out = decide_sms_readout(facts(**change), NOON_MSK)
    refused(out)
    assert out.codes == (code,)
    assert out.consent_id is None


@pytest.mark.parametrize(
    ("sender", "allowed", "blocked", "code"),
    [
        ("+79161234567", ["+79161234567"], [], None),
        ("79161234567", ["+7916"], [], None),
        ("+7 (916) 123-45-67", ["+7916"], [], None),
        ("+79031234567", ["+7916"], [], "sender_not_allowed"),
        ("+79161234567", [], [], "sender_not_allowed"),
        ("+79161234567", ["*"], [], None),
        ("+79161234567", ["+7916"], ["+79161234567"], "sender_blocked"),
        ("+79161234567", ["*"], ["+79161234567"], "sender_blocked"),
        ("MyBank", ["mybank"], [], None),
        ("MyBank", ["+7916"], [], "sender_not_allowed"),
        ("89161234567", ["+7916"], [], "sender_not_allowed"),  # a national format is not guessed
    ],
)
def test_senders(sender: str, allowed: list[str], blocked: list[str], code: str | None) -> None:
    f = facts(sender=sender, consent=consent(scope={"allowed_senders": allowed}),
              subscriber_policy=PolicyFacts(blocked_callers=frozenset(blocked)))
    out = decide_sms_readout(f, NOON_MSK)
    if code is None:
        assert out.read_aloud
    else:
        refused(out)
        assert out.codes == (code,)


def test_a_household_policy_block_also_wins() -> None:
    home = HouseholdFacts("h-1", "Europe/Moscow", "home", (SPEAKER,), PolicyFacts(blocked_callers=frozenset(
        {"+79161234567"})))
    out = decide_sms_readout(facts(households=(home,), subscriber_policy=PolicyFacts()), NOON_MSK)
    assert out.codes == ("sender_blocked",)


def test_missing_or_malformed_allowed_senders_means_nobody() -> None:
    for scope in ({}, {"allowed_senders": "+7916"}, {"allowed_senders": [None, 5]}):
        refused(decide_sms_readout(facts(consent=consent(scope=scope)), NOON_MSK))


QUIET = PolicyFacts(quiet_start=time(23, 0), quiet_end=time(7, 0))


@pytest.mark.parametrize(
    ("utc", "quiet"),
    [
        (datetime(2026, 11, 25, 19, 59, tzinfo=UTC), False),  # 22:59 MSK
        (datetime(2026, 11, 25, 20, 0, tzinfo=UTC), True),    # 23:00 MSK
        (datetime(2026, 11, 25, 21, 30, tzinfo=UTC), True),   # 00:30 MSK, after midnight
        (datetime(2026, 11, 26, 3, 59, tzinfo=UTC), True),    # 06:59 MSK
        (datetime(2026, 11, 26, 4, 0, tzinfo=UTC), False),    # 07:00 MSK
    ],
)
def test_quiet_hours_in_moscow_across_midnight_silence_speakers_but_not_displays(utc: datetime,
                                                                                  quiet: bool) -> None:
    out = decide_sms_readout(facts(subscriber_policy=QUIET, received_at=utc), utc)
    assert bool(out.read_aloud) is not quiet
    assert [t.device_id for t in out.show_text] == ["d-pnl"]
    assert ("quiet_hours" in out.codes) is quiet


@pytest.mark.parametrize(
    ("utc", "quiet"),
    [
        (datetime(2026, 3, 29, 4, 59, tzinfo=UTC), True),    # 06:59 CEST, the first morning of summer time
        (datetime(2026, 3, 29, 5, 0, tzinfo=UTC), False),    # 07:00 CEST
        (datetime(2026, 10, 25, 5, 59, tzinfo=UTC), True),   # 06:59 CET, the first morning of winter time
        (datetime(2026, 10, 25, 6, 0, tzinfo=UTC), False),
    ],
)
def test_quiet_hours_follow_the_wall_clock_across_dst(utc: datetime, quiet: bool) -> None:
    assert in_quiet_hours(time(23, 0), time(7, 0), "Europe/Berlin", utc) is quiet


def test_quiet_hours_without_a_display_read_nothing() -> None:
    home = HouseholdFacts("h-1", "Europe/Moscow", "home", (SPEAKER,))
    at = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)  # 00:00 MSK
    out = decide_sms_readout(facts(households=(home,), subscriber_policy=QUIET, received_at=at), at)
    refused(out)
    assert out.codes == ("quiet_hours", "no_target")


def test_dnd_silences_speakers() -> None:
    out = decide_sms_readout(facts(subscriber_policy=PolicyFacts(dnd=True)), NOON_MSK)
    assert not out.read_aloud
    assert "dnd" in out.codes


@pytest.mark.parametrize("presence", ["away", "unknown"])
def test_nobody_home_nothing_is_said_or_shown(presence: str) -> None:
    home = HouseholdFacts("h-1", "Europe/Moscow", presence, (SPEAKER, PANEL))
    out = decide_sms_readout(facts(households=(home,)), NOON_MSK)
    refused(out)
    assert out.codes == ("nobody_home", "no_target")


def test_only_the_household_where_someone_is_home_hears_it() -> None:
    away = HouseholdFacts("h-away", "Europe/Moscow", "away", (replace(SPEAKER, device_id="d-away"),))
    home = HouseholdFacts("h-home", "Asia/Yekaterinburg", "home", (SPEAKER,))
    out = decide_sms_readout(facts(households=(away, home)), NOON_MSK)
    assert [(t.household_id, t.device_id) for t in out.read_aloud] == [("h-home", "d-spk")]


def test_offline_disabled_and_connectorless_devices_are_skipped() -> None:
    devices = (replace(SPEAKER, online=False), replace(PANEL, enabled=False),
               DeviceFacts("d-x", "x", frozenset({"tts"}), None, None))
    out = decide_sms_readout(facts(households=(HouseholdFacts("h", "UTC", "home", devices),)), NOON_MSK)
    refused(out)
    assert out.codes == ("device_offline", "device_no_connector", "no_target")


def test_stale_message_is_not_read_late() -> None:
    out = decide_sms_readout(facts(received_at=NOON_MSK - timedelta(hours=2)), NOON_MSK)
    refused(out)
    assert out.codes == ("stale",)


def test_long_bodies_are_cut_and_the_refusal_object_cannot_be_built_with_text() -> None:
    out = decide_sms_readout(facts(body="x" * 5000), NOON_MSK)
    assert out.text is not None
    assert len(out.text) < 1700
    with pytest.raises(ValueError, match="must not carry"):
        SmsReadout("s", TENANT, None, (), (), (), (), text=BODY)
    with pytest.raises(ValueError, match="timezone-aware"):
        decide_sms_readout(facts(), datetime(2026, 1, 1))  # noqa: DTZ001


def test_number_normalisation_and_prefixes() -> None:
    assert normalise_number("0079161234567") == "+79161234567"
    assert normalise_number(" +7 916 123 45 67 ") == "+79161234567"
    assert normalise_number("Bank") == "Bank"
    assert sender_allowed("+79161234567", ["+7916"])
    assert not sender_allowed("+79161234567", ["+7903", "", "  "])
