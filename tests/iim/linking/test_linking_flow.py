"""The pure half of account linking: PKCE (RFC 7636's own example), the callback's query, the token endpoint's
answers and the granted scope, fuzzed where input comes from outside."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from iim.connectors.contract import LinkScope
from iim.connectors.linking import AccountLinking
from iim.linking import flow

CONFIG = AccountLinking(authorize_url="https://auth.example/authorize?tenant=x", token_url="https://auth.example/token",
                        client_id="iim", redirect_uri="https://iim.example/oauth2/callback",
                        scope_names={LinkScope.READ_EVENTS: "events.read", LinkScope.SEND_NOTIFICATIONS: "notify",
                                     LinkScope.VOICE_INTERACTION: "voice"})
BOTH = frozenset({LinkScope.SEND_NOTIFICATIONS, LinkScope.VOICE_INTERACTION})
STATE = "S" * 43


def test_the_s256_challenge_is_rfc_7636s_example() -> None:
    assert flow.s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == (
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")


def test_fresh_states_and_verifiers_are_well_formed_and_distinct() -> None:
    states = {flow.new_state() for _ in range(50)}
    verifiers = {flow.new_verifier() for _ in range(50)}
    assert len(states) == len(verifiers) == 50
    assert all(isinstance(flow.parse_callback([("state", s), ("code", "c")]), flow.CallbackAnswer) for s in states)
    assert all(43 <= len(v) <= 128 and flow.s256_challenge(v) for v in verifiers)
    with pytest.raises(ValueError, match="code verifier"):
        flow.s256_challenge("too-short")


def test_the_authorization_url_carries_the_challenge_the_state_and_the_vendors_scope_names() -> None:
    url = URL(flow.authorization_url(CONFIG, state=STATE, challenge="C" * 43, scopes=BOTH))
    assert dict(url.query) == {"tenant": "x", "response_type": "code", "client_id": "iim",
                               "redirect_uri": "https://iim.example/oauth2/callback", "scope": "notify voice",
                               "state": STATE, "code_challenge": "C" * 43, "code_challenge_method": "S256"}


@pytest.mark.parametrize(("query", "expected"), [
    ([("state", STATE), ("code", "abc")], flow.CallbackAnswer(STATE, "abc")),
    ([("state", STATE), ("error", "access_denied"), ("error_description", "no")], flow.Denied(STATE, "access_denied")),
    ([("state", STATE), ("error", "<script>")], flow.Denied(STATE, "other")),
    ([("code", "abc"), ("state", STATE), ("iss", "https://auth.example")], flow.CallbackAnswer(STATE, "abc")),
])
def test_well_formed_callbacks(query: list[tuple[str, str]], expected: object) -> None:
    assert flow.parse_callback(query) == expected


@pytest.mark.parametrize("query", [
    [], [("code", "abc")], [("state", STATE)], [("state", STATE), ("code", "a"), ("error", "x")],
    [("state", STATE), ("state", STATE), ("code", "a")], [("state", STATE), ("code", "a"), ("code", "b")],
    [("state", "short"), ("code", "a")], [("state", STATE), ("code", "")], [("state", STATE), ("code", "a\nb")],
    [("state", STATE + "x"), ("code", "a")],
])
def test_anything_else_is_malformed(query: list[tuple[str, str]]) -> None:
    assert isinstance(flow.parse_callback(query), flow.Malformed)


@given(st.lists(st.tuples(st.sampled_from(["state", "code", "error", "x"]), st.text(max_size=80)), max_size=6))
def test_the_callback_parser_answers_every_query_and_lets_no_odd_character_through(
        query: list[tuple[str, str]]) -> None:
    result = flow.parse_callback(query)
    assert isinstance(result, flow.CallbackAnswer | flow.Denied | flow.Malformed)
    if isinstance(result, flow.CallbackAnswer):
        assert result.state.isascii()
        assert result.code.isprintable()
        assert result.code.isascii()
    if isinstance(result, flow.Denied):
        assert result.error.replace("_", "").isalpha()


def _answer(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_a_token_answer_becomes_a_grant_in_iims_scopes() -> None:
    grant = flow.parse_token_answer(CONFIG, BOTH, 200, _answer(access_token="a", token_type="bearer",
                                                               expires_in=60, refresh_token="r", scope="voice"))
    assert grant == flow.TokenGrant("a", 60, "r", frozenset({LinkScope.VOICE_INTERACTION}))
    assert "a" not in repr(grant).replace("TokenGrant", "").replace("scopes", "").replace("voice_interaction", "")
    as_asked = flow.parse_token_answer(CONFIG, BOTH, 200, _answer(access_token="a", token_type="Bearer"))
    assert isinstance(as_asked, flow.TokenGrant)
    assert (as_asked.scopes, as_asked.expires_in, as_asked.refresh_token) == (BOTH, 3600, None)


@pytest.mark.parametrize(("scope", "kind"), [
    ("notify voice admin", "too_wide"),  # a name IIM does not know
    ("notify events.read", "too_wide"),  # one of IIM's, but not asked for
    ("", "refused"),
])
def test_a_grant_wider_than_asked_is_refused_with_its_tokens_to_revoke(scope: str, kind: str) -> None:
    failure = flow.parse_token_answer(CONFIG, BOTH, 200, _answer(access_token="a", token_type="bearer",
                                                                 refresh_token="r", scope=scope))
    assert isinstance(failure, flow.TokenFailure)
    assert failure.kind == kind
    if kind == "too_wide":
        assert failure.issued == (("a", "access_token"), ("r", "refresh_token"))


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, _answer(error="invalid_grant"), "invalid_grant"),
    (401, _answer(error="invalid_client"), "refused"),
    (400, b"<html>", "refused"),
    (503, b"", "unavailable"),
    (200, b"not json", "unavailable"),
    (200, _answer(access_token="a", token_type="mac"), "unavailable"),
    (200, _answer(token_type="bearer"), "unavailable"),
    (200, _answer(access_token="a", token_type="bearer", refresh_token=5), "unavailable"),
])
def test_token_failures(status: int, body: bytes, kind: str) -> None:
    failure = flow.parse_token_answer(CONFIG, BOTH, status, body)
    assert isinstance(failure, flow.TokenFailure)
    assert failure.kind == kind


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=15), inner,
                                                                                 max_size=4), max_leaves=10)


@given(status=st.integers(100, 599), doc=st.one_of(
    _JSON, st.fixed_dictionaries({"access_token": _JSON, "token_type": st.sampled_from(["bearer", "x"]) | _JSON,
                                  "expires_in": _JSON, "refresh_token": _JSON, "scope": _JSON})),
       raw=st.binary(max_size=50))
def test_the_token_answer_parser_answers_every_body(status: int, doc: Any, raw: bytes) -> None:
    for body in (json.dumps(doc).encode(), raw):
        result = flow.parse_token_answer(CONFIG, BOTH, status, body)
        assert isinstance(result, flow.TokenGrant | flow.TokenFailure)
        if isinstance(result, flow.TokenGrant):
            assert status == 200
            assert result.scopes <= BOTH
            assert result.expires_in > 0


def test_renewal_is_due_within_the_window() -> None:
    assert flow.refresh_due(1000.0, 800.0, 300.0)
    assert not flow.refresh_due(1000.0, 600.0, 300.0)


def test_config_refuses_two_iim_scopes_with_one_vendor_name_and_non_loopback_http() -> None:
    with pytest.raises(ValueError, match="scope_names"):
        AccountLinking.model_validate({**CONFIG.model_dump(), "scope_names": {"read_events": "x", "voice_interaction": "x"}})
    with pytest.raises(ValueError, match="https"):
        AccountLinking.model_validate({**CONFIG.model_dump(), "token_url": "http://auth.example/token"})
