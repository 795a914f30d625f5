"""Presence precedence and expiry: a pure function of the claims and the time (policy_cache.presence)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fs_app.routing import CallFacts, decide
from policy_cache.presence import SOURCE_RANK, PresenceClaim, registration_word, resolve_presence
from policy_cache.snapshot import RoutingSnapshot, SpeakerDevice

T0 = 1_800_000_000.0

claims_st = st.builds(
    PresenceClaim,
    source=st.sampled_from(["registration", "connector", "app"]),
    subject=st.sampled_from(["anna", "boris", "phone@home", "vendor:hub"]),
    state=st.sampled_from(["home", "away"]),
    observed_at=st.floats(T0 - 7200, T0, allow_nan=False),
    expires_at=st.floats(T0 - 3600, T0 + 7200, allow_nan=False),
)
baseline_st = st.sampled_from(["home", "away", "unknown"])
now_st = st.floats(T0 - 3600, T0 + 7200, allow_nan=False)


@given(baseline_st, st.lists(claims_st, max_size=8), now_st)
def test_with_no_live_claim_the_registry_decides(baseline: str, claims: list[PresenceClaim], now: float) -> None:
    expired = [c for c in claims if c.expires_at <= now]
    view = resolve_presence(baseline, expired, now)  # type: ignore[arg-type]
    assert (view.state, view.source, view.until) == (baseline, "registry", None)


@given(baseline_st, st.lists(claims_st, max_size=8), now_st)
def test_expired_claims_change_nothing(baseline: str, claims: list[PresenceClaim], now: float) -> None:
    live = [c for c in claims if c.expires_at > now]
    assert resolve_presence(baseline, claims, now) == resolve_presence(baseline, live, now)  # type: ignore[arg-type]


@given(baseline_st, st.lists(claims_st, max_size=8), now_st, st.randoms())
def test_the_order_of_the_claims_does_not_matter(baseline: str, claims: list[PresenceClaim], now: float,
                                                  rnd: object) -> None:
    shuffled = list(claims)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert resolve_presence(baseline, claims, now) == resolve_presence(baseline, shuffled, now)  # type: ignore[arg-type]


@given(baseline_st, st.lists(claims_st, min_size=1, max_size=8), now_st)
def test_live_claims_override_the_registry_and_home_wins_when_any_subject_is_home(
        baseline: str, claims: list[PresenceClaim], now: float) -> None:
    live = [c for c in claims if c.expires_at > now]
    view = resolve_presence(baseline, claims, now)  # type: ignore[arg-type]
    if not live:
        return
    strongest: dict[str, PresenceClaim] = {}
    for c in live:
        held = strongest.get(c.subject)
        key = (SOURCE_RANK[c.source], c.observed_at, c.state == "home")
        if held is None or key > (SOURCE_RANK[held.source], held.observed_at, held.state == "home"):
            strongest[c.subject] = c
    expected = "home" if any(c.state == "home" for c in strongest.values()) else "away"
    assert view.state == expected
    assert view.source != "registry"
    assert view.until == min(c.expires_at for c in live)
    assert view.live_claims == len(live)


@given(baseline_st, st.lists(claims_st, max_size=8), now_st, st.floats(0, 1, allow_nan=False))
def test_the_answer_holds_until_the_next_expiry(baseline: str, claims: list[PresenceClaim], now: float,
                                                 fraction: float) -> None:
    view = resolve_presence(baseline, claims, now)  # type: ignore[arg-type]
    later = now + (((view.until or now + 3600) - now) * fraction * 0.999)
    assert resolve_presence(baseline, claims, later).state == view.state  # type: ignore[arg-type]


@given(st.sampled_from(["registration", "connector"]), st.sampled_from(["home", "away"]))
def test_the_app_outranks_other_sources_about_the_same_subject(source: str, other: str) -> None:
    mine = "away" if other == "home" else "home"
    claims = [PresenceClaim(source, "anna", other, T0, T0 + 600),  # type: ignore[arg-type]
              PresenceClaim("app", "anna", mine, T0 - 300, T0 + 600)]  # type: ignore[arg-type]
    view = resolve_presence("unknown", claims, T0 + 1)
    assert (view.state, view.source) == (mine, "app")


def test_someone_home_wins_over_someone_away() -> None:
    claims = [PresenceClaim("app", "anna", "away", T0, T0 + 600),
              PresenceClaim("registration", "phone@home", "home", T0 - 60, T0 + 60)]
    view = resolve_presence("away", claims, T0 + 1)
    assert (view.state, view.source, view.subject, view.until) == ("home", "registration", "phone@home", T0 + 60)
    after = resolve_presence("unknown", claims, T0 + 61)  # the registration ran out
    assert (after.state, after.source) == ("away", "app")
    assert resolve_presence("unknown", claims, T0 + 601).source == "registry"


def _snapshot(presence: str, claims: tuple[PresenceClaim, ...]) -> RoutingSnapshot:
    speaker = SpeakerDevice("d-1", "speaker@home", sip=True, cloud_announce=False, online=True, name="Speaker")
    return RoutingSnapshot(
        subscriber_id="s-1", tenant_id="t-1", msisdn="+79001234567", aor=None, time_zone="UTC",
        ring_mode="simultaneous", phone_timeout_s=20, home_timeout_s=20, quiet_start_min=None, quiet_end_min=None,
        dnd=False, allowed_callers=frozenset(), blocked_callers=frozenset(), presence=presence,  # type: ignore[arg-type]
        home_only_when_present=True, announce_consent=True, fallback="voicemail", speakers=(speaker,),
        policy_version=3, household_id="h-1", presence_claims=claims)


def test_decide_rings_the_home_only_while_a_live_claim_says_someone_is_home() -> None:
    snap = _snapshot("away", (PresenceClaim("app", "anna", "home", T0, T0 + 600),))
    at = datetime.fromtimestamp(T0 + 10, UTC)
    ringing = decide(snap, CallFacts("+79001234567", None), at)
    assert [leg.kind for leg in ringing.legs] == ["phone", "speaker"]
    assert any(rule.startswith("presence home (operator app anna") for rule in ringing.rules)
    expired = decide(snap, CallFacts("+79001234567", None), datetime.fromtimestamp(T0 + 600, UTC))
    assert [leg.kind for leg in expired.legs] == ["phone"]
    assert "presence away (registry; no live source): home devices ring only when someone is home" in expired.rules


# -- what a registration says (policy_cache.presence.registration_word) ---------------------------------------

HOME_NETS = ["192.0.2.0/24", "192.0.2.128/25", "2001:db8:1::/48"]


@pytest.mark.parametrize(("personal", "sources", "networks", "word"), [
    (True, ["192.0.2.200"], HOME_NETS, ("home", "from home network 192.0.2.128/25")),  # the narrowest one
    (True, ["2001:db8:1::42"], HOME_NETS, ("home", "from home network 2001:db8:1::/48")),
    (True, ["[2001:db8:1::42]"], HOME_NETS, ("home", "from home network 2001:db8:1::/48")),
    (True, ["::ffff:192.0.2.7"], HOME_NETS, ("home", "from home network 192.0.2.0/24")),  # v4 on a v6 socket
    (True, ["198.51.100.7"], HOME_NETS, ("away", "from 198.51.100.7, outside the home networks")),
    (True, ["198.51.100.7", "192.0.2.9"], HOME_NETS, ("home", "from home network 192.0.2.0/24")),  # any contact
    (True, ["192.0.2.9"], [], None),  # no home networks: reachable is not located
    (False, ["192.0.2.9"], HOME_NETS, None),  # a fixed device: registered whether anyone is in or not
    (True, ["phone.example", ""], HOME_NETS, None),  # no address to place it by
    (True, [], HOME_NETS, None),
])
def test_a_registration_speaks_for_a_person_by_where_it_came_from(
        personal: bool, sources: list[str], networks: list[str], word: tuple[str, str] | None) -> None:
    assert registration_word(personal, sources, networks) == word


def test_the_explanation_says_why_a_registration_decided() -> None:
    claim = PresenceClaim("registration", "anna@iim.example", "home", T0, T0 + 600, "from home network 192.0.2.0/24")
    assert resolve_presence("away", [claim], T0).describe().startswith(
        "presence home (device registration anna@iim.example from home network 192.0.2.0/24; 1 live claim(s)")
