"""OIDC bearer JWTs against a real local issuer (tests/oidc_issuer.py: discovery + JWKS over HTTP)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iim.admin.auth import BAD_TOKEN, Grant, Role, TokenTable, hash_token
from iim.admin.authn import Authenticator
from iim.admin.jwks import JwksClient, KeyCache, Lookup, usable_keys
from iim.admin.oidc import OidcVerifier, grants_from_claim
from iim.admin.problems import IdentityUnavailable, Unauthenticated
from iim.admin.settings import OidcSettings
from iim.admin.token_source import TOKEN_RELOADS, ReloadAuditor, TokenSource, table_changes
from policy_cache import audit
from policy_cache.db import tenant_tx
from tests.oidc_issuer import (
    AUDIENCE,
    Issuer,
    ec_key,
    hs256_with_public_key,
    rsa_key,
    running_issuer,
    unsigned,
)

TENANT, BRAND = uuid4(), uuid4()


def _settings(issuer: str, **over: Any) -> OidcSettings:
    values: dict[str, Any] = {"issuer": issuer, "audience": AUDIENCE, "leeway_s": 30, "fetch_timeout_s": 1.0,
                              "jwks_min_refetch_s": 0}
    values.update(over)
    return OidcSettings(**values)


@pytest_asyncio.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with running_issuer() as peer:
        yield peer


async def _refused(verifier: OidcVerifier, token: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        await verifier.authenticate(token)
    assert info.value.detail == BAD_TOKEN


# -- settings and the roles claim (pure) ------------------------------------------------------------------

@pytest.mark.parametrize("algs", [["none"], ["HS256"], ["RS256", "HS512"]])
def test_symmetric_and_none_algorithms_are_refused_in_settings(algs: list[str]) -> None:
    with pytest.raises(ValidationError):
        OidcSettings(issuer="https://idp.example", audience="a", algorithms=algs)


@pytest.mark.parametrize("url", ["http://idp.example", "ftp://127.0.0.1/x", "https://user:pw@idp.example"])
def test_issuer_must_be_https_or_loopback(url: str) -> None:
    with pytest.raises(ValidationError):
        OidcSettings(issuer=url, audience="a")


def test_issuer_without_audience_is_refused() -> None:
    with pytest.raises(ValidationError):
        OidcSettings(issuer="https://idp.example")


def test_roles_claim_maps_to_grants() -> None:
    claim = [{"role": "operator", "tenant": str(TENANT), "brand": str(BRAND)}, {"role": "viewer"}]
    assert grants_from_claim(claim) == (Grant(Role.OPERATOR, TENANT, BRAND), Grant(Role.VIEWER))


@pytest.mark.parametrize("claim", [
    "admin", {"role": "admin"}, [{"role": "root"}], [{"role": "operator"}], [{"role": "admin", "tenant": str(TENANT)}],
    [{"role": "viewer", "brand": str(BRAND)}], [{"role": "viewer", "tenant": "not-a-uuid"}],
    [{"role": "viewer", "extra": 1}], [{"role": "viewer"}] * 51,
])
def test_invalid_roles_claim_grants_nothing(claim: object) -> None:
    with pytest.raises(ValueError, match="roles claim"):
        grants_from_claim(claim)


def test_key_cache_refetches_unknown_kids_at_most_once_per_interval() -> None:
    cache = KeyCache(ttl_s=300, min_refetch_s=30, max_stale_s=3600)
    assert cache.lookup("k", 0) is Lookup.FETCH
    cache.fetched({}, 0)
    assert cache.lookup("k", 10) is Lookup.UNKNOWN  # too soon: no request to the issuer
    assert cache.lookup("k", 30) is Lookup.FETCH
    cache.failed(30)
    assert cache.lookup("k", 40) is Lookup.UNAVAILABLE  # the issuer failed: 503, not 401


def test_key_cache_keeps_known_keys_while_the_issuer_is_away_until_max_stale() -> None:
    key = next(iter(usable_keys({"keys": [rsa_key("a").public_jwk()]}, ["RS256"]).values()))
    cache = KeyCache(ttl_s=300, min_refetch_s=30, max_stale_s=3600)
    cache.fetched({"a": key}, 0)
    assert cache.lookup("a", 299) is Lookup.FOUND
    assert cache.lookup("a", 300) is Lookup.FETCH  # old: refresh
    cache.failed(300)
    assert cache.lookup("a", 310) is Lookup.FOUND  # issuer down: the key fetched earlier still verifies
    assert cache.lookup("a", 3600) is Lookup.FETCH
    cache.failed(3600)
    assert cache.lookup("a", 3601) is Lookup.UNAVAILABLE


def test_jwk_set_keeps_only_signing_keys_fit_for_the_algorithms() -> None:
    good_rsa, good_ec = rsa_key("r").public_jwk(), ec_key("e").public_jwk()
    enc = {**rsa_key("enc").public_jwk(), "use": "enc"}
    wrong_alg = {**rsa_key("hs").public_jwk(), "alg": "HS256"}
    secret = {"kty": "oct", "kid": "oct", "k": "c2VjcmV0"}
    keys = usable_keys({"keys": [good_rsa, good_ec, enc, wrong_alg, secret, "junk", {"kty": "RSA"}]}, ["RS256"])
    assert sorted(keys) == ["r"]
    assert sorted(usable_keys({"keys": [good_rsa, good_ec]}, ["RS256", "ES256"])) == ["e", "r"]
    with pytest.raises(ValueError, match="JWK Set"):
        usable_keys({"keys": "none"}, ["RS256"])


# -- tokens against the issuer ----------------------------------------------------------------------------

async def test_rs256_and_es256_tokens_give_the_sub_as_actor_and_the_claimed_grants(issuer: Issuer) -> None:
    roles = [{"role": "operator", "tenant": str(TENANT)}]
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        for kid in ("rsa-1", "ec-1"):
            principal = await verifier.authenticate(issuer.token("alice@corp", roles, kid=kid))
            assert principal.actor == f"alice@corp ({issuer.url})"
            assert principal.grants == (Grant(Role.OPERATOR, TENANT),)
    assert issuer.jwks_requests == 1  # fetched once, then cached


async def test_token_without_roles_authenticates_with_no_grants(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        principal = await verifier.authenticate(issuer.token(roles=()))
        assert principal.grants == ()
        assert principal.visible_tenants() == frozenset()


async def test_time_claims_hold_within_the_leeway_only(issuer: Issuer) -> None:
    now = int(time.time())
    async with OidcVerifier(_settings(issuer.url, leeway_s=30)) as verifier:
        await verifier.authenticate(issuer.token(exp=now - 10, iat=now - 100))  # expired 10 s ago: skew
        await verifier.authenticate(issuer.token(nbf=now + 10))
        for over in ({"exp": now - 60, "iat": now - 200}, {"nbf": now + 120}, {"iat": now + 120, "exp": now + 300},
                     {"exp": None}, {"iat": None}, {"exp": "tomorrow"}):
            await _refused(verifier, issuer.token(**over))


async def test_overlong_token_lifetime_is_refused(issuer: Issuer) -> None:
    now = int(time.time())
    async with OidcVerifier(_settings(issuer.url, max_token_lifetime_s=3600)) as verifier:
        await _refused(verifier, issuer.token(iat=now, exp=now + 7200))


async def test_wrong_audience_issuer_or_subject_is_refused(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        await verifier.authenticate(issuer.token(aud=["other", AUDIENCE]))
        for over in ({"aud": "other-app"}, {"aud": None}, {"iss": "https://evil.example"}, {"iss": None},
                     {"sub": None}, {"sub": ""}, {"sub": "a\nb"}, {"sub": "x" * 101}, {"sub": 42},
                     {"iim_roles": [{"role": "operator"}]}):
            await _refused(verifier, issuer.token(**over))


async def test_algorithm_confusion_is_refused(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        await _refused(verifier, hs256_with_public_key(issuer))
        await _refused(verifier, unsigned(issuer))
        # RS256 in the header, the kid of the EC key: the key was not made for that algorithm.
        await _refused(verifier, issuer.token(kid="ec-1", key=issuer.key("rsa-1")))
        # A key the issuer does not publish, under a kid it does.
        await _refused(verifier, issuer.token(kid="rsa-1", key=rsa_key("rsa-1")))
    async with OidcVerifier(_settings(issuer.url, algorithms=["ES256"])) as es_only:
        await _refused(es_only, issuer.token(kid="rsa-1"))  # RS256 not in the accepted list


async def test_unknown_kids_refetch_at_most_once_per_interval(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url, jwks_min_refetch_s=3600)) as verifier:
        await verifier.authenticate(issuer.token())
        stranger = rsa_key("stranger")
        for i in range(20):
            await _refused(verifier, issuer.token(kid=f"made-up-{i}", key=stranger))
        assert issuer.jwks_requests == 1  # the first fetch only: a stream of bad kids does not reach the issuer


async def test_rotated_keys_are_picked_up_and_retired_keys_refused(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        old = issuer.token(kid="rsa-1")
        await verifier.authenticate(old)
        issuer.rotate(rsa_key("rsa-2"))  # published next to the old one first
        await verifier.authenticate(issuer.token(kid="rsa-2"))  # unknown kid -> refetch -> found
        await verifier.authenticate(old)
        assert issuer.jwks_requests == 2
        issuer.rotate(rsa_key("rsa-3"), drop="rsa-1")
        await verifier.authenticate(issuer.token(kid="rsa-3"))
        await _refused(verifier, old)  # the refetched set no longer holds rsa-1
        await verifier.authenticate(issuer.token(kid="rsa-2"))


async def test_issuer_down_is_503_with_retry_after(issuer: Issuer) -> None:
    issuer.mode = "down"
    async with OidcVerifier(_settings(issuer.url, retry_after_s=17)) as verifier:
        with pytest.raises(IdentityUnavailable) as info:
            await verifier.authenticate(issuer.token())
        assert info.value.status == 503
        assert info.value.headers["Retry-After"] == "17"
        issuer.mode = "ok"
        await verifier.authenticate(issuer.token())  # back: min_refetch 0, fetched again


async def test_slow_issuer_is_503_within_the_fetch_deadline(issuer: Issuer) -> None:
    issuer.mode = "slow"
    async with OidcVerifier(_settings(issuer.url, fetch_timeout_s=0.5)) as verifier:
        started = time.monotonic()
        with pytest.raises(IdentityUnavailable):
            await verifier.authenticate(issuer.token())
        assert time.monotonic() - started < 5  # bounded by the deadline, not by the issuer


async def test_discovery_naming_another_issuer_is_not_trusted(issuer: Issuer) -> None:
    issuer.mode = "liar"
    async with OidcVerifier(_settings(issuer.url)) as verifier:
        with pytest.raises(IdentityUnavailable):
            await verifier.authenticate(issuer.token())
    assert issuer.jwks_requests == 0


async def test_known_keys_keep_verifying_while_the_issuer_is_down(issuer: Issuer) -> None:
    async with OidcVerifier(_settings(issuer.url, jwks_ttl_s=1, jwks_min_refetch_s=0)) as verifier:
        await verifier.authenticate(issuer.token())
        issuer.mode = "down"
        await asyncio.sleep(1.1)  # the keys are older than their ttl: a refetch is tried, fails, cached keys used
        await verifier.authenticate(issuer.token())


async def test_static_tokens_work_while_the_issuer_is_down(issuer: Issuer) -> None:
    issuer.mode = "down"
    table = TokenTable.from_json(json.dumps({hash_token("boot"): {"actor": "root@noc", "role": "admin"}}))
    async with Authenticator(TokenSource.fixed(table), OidcVerifier(_settings(issuer.url))) as auth:
        assert (await auth.principal("Bearer boot")).actor == "root@noc"
        with pytest.raises(IdentityUnavailable):
            await auth.principal(f"Bearer {issuer.token()}")
        for header in (None, "Bearer nope", "Bearer a.b.c.d", "Basic x"):
            with pytest.raises(Unauthenticated) as info:
                await auth.principal(header)
            assert info.value.detail == BAD_TOKEN


# -- malformed tokens: always the same 401 ----------------------------------------------------------------

_JWTISH = st.lists(st.text(alphabet="ABCDEFabcdef0123456789-_=+/.", max_size=40), min_size=3, max_size=3).map(".".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.one_of(st.text(max_size=200), _JWTISH))
def test_any_malformed_token_is_the_same_401(token: str) -> None:
    cache = KeyCache(min_refetch_s=1e9)
    cache.fetched({}, 0.0)  # nothing known, no refetch allowed: no network in this test
    jwks = JwksClient("https://idp.example", ["RS256"], timeout_s=1, cache=cache, clock=lambda: 1.0)
    verifier = OidcVerifier(OidcSettings(issuer="https://idp.example", audience="a"), jwks=jwks)

    async def run() -> None:
        with pytest.raises(Unauthenticated) as info:
            await verifier.authenticate(token)
        assert info.value.detail == BAD_TOKEN

    asyncio.run(run())


# -- the static token table, reloaded ---------------------------------------------------------------------

def _write(path: Path, tokens: dict[str, dict[str, str]]) -> None:
    path.write_text(json.dumps({hash_token(k): v for k, v in tokens.items()}))


def test_token_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _write(path, {"one": {"actor": "one@noc", "role": "admin"}})
    clock = [0.0]
    source = TokenSource(f"file:{path}", check_interval_s=1.0, clock=lambda: clock[0])
    assert source.current().authenticate("one") is not None
    _write(path, {"two": {"actor": "two@noc", "role": "viewer"}, "three": {"actor": "x", "role": "viewer"}})
    assert source.current().authenticate("two") is None  # not looked at again within the interval
    clock[0] = 1.0
    assert source.current().authenticate("two") is not None
    assert source.current().authenticate("one") is None  # revoked without a restart
    refused = TOKEN_RELOADS.labels("refused")._value.get()
    path.write_text("{not json")
    clock[0] = 2.0
    assert source.current().authenticate("two") is not None  # the bad file is refused, the old table stays
    assert TOKEN_RELOADS.labels("refused")._value.get() == refused + 1
    clock[0] = 3.0
    source.current()
    assert TOKEN_RELOADS.labels("refused")._value.get() == refused + 1  # not retried until the file changes
    path.unlink()
    clock[0] = 4.0
    assert source.current().authenticate("two") is not None  # a vanished file keeps the table too


def test_reload_on_demand_rereads_an_env_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_TEST_TOKENS", json.dumps({hash_token("a"): {"actor": "a", "role": "admin"}}))
    source = TokenSource("env:IIM_TEST_TOKENS")
    monkeypatch.setenv("IIM_TEST_TOKENS", json.dumps({hash_token("b"): {"actor": "b", "role": "admin"}}))
    assert source.reload()
    assert source.current().authenticate("b") is not None
    monkeypatch.setenv("IIM_TEST_TOKENS", "[]")
    assert not source.reload()
    assert source.current().authenticate("b") is not None


def test_a_reload_says_which_tokens_were_added_removed_or_changed_by_key_id_never_the_token() -> None:
    def table(tokens: dict[str, dict[str, str]]) -> TokenTable:
        return TokenTable.from_json(json.dumps({hash_token(k): v for k, v in tokens.items()}))

    old = table({"t-keep": {"actor": "keep@noc", "role": "admin"}, "t-gone": {"actor": "gone@noc", "role": "admin"},
                 "t-moved": {"actor": "mo@noc", "role": "viewer"}})
    new = table({"t-keep": {"actor": "keep@noc", "role": "admin"}, "t-new": {"actor": "new@noc", "role": "admin"},
                 "t-moved": {"actor": "mo@noc", "role": "admin"}})
    changes = table_changes(old, new)
    assert [e["actor"] for e in changes["added"]] == ["new@noc"]
    assert [e["actor"] for e in changes["removed"]] == ["gone@noc"]
    assert [(c["before"]["role"], c["after"]["role"]) for c in changes["changed"]] == [("viewer", "admin")]
    assert changes["added"][0]["key_id"] == hash_token("t-new")[:8]
    text = json.dumps(changes)
    assert not any(t in text or hash_token(t) in text for t in ("t-keep", "t-new", "t-gone", "t-moved"))


async def test_reloads_wait_for_the_database_and_are_audited_in_order_once_it_is_back(
        app_pool: Any, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    _write(path, {"one": {"actor": "one@noc", "role": "admin"}})
    source = TokenSource(f"file:{path}", check_interval_s=0.05)
    database_up = False

    def pool() -> Any:
        if not database_up:
            raise LookupError("pool not started")
        return app_pool

    async with ReloadAuditor(source, pool, deadline_s=2.0):
        path.write_text("{not json")
        await asyncio.sleep(0.3)
        _write(path, {"two": {"actor": "two@noc", "role": "admin"}})
        await asyncio.sleep(0.3)
        assert [r.action for r in source.reloads] == ["admin_tokens.reload_refused", "admin_tokens.reloaded"]
        database_up = True
        deadline = time.monotonic() + 10
        while source.reloads:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    async with tenant_tx(app_pool, audit.SYSTEM_CHAIN) as conn:
        rows = await conn.fetch("SELECT action, detail FROM iim.audit_log WHERE entity_id = $1 ORDER BY id",
                                f"file:{path}")
    assert [r["action"] for r in rows] == ["admin_tokens.reload_refused", "admin_tokens.reloaded"]
    assert rows[1]["detail"]["removed"][0]["actor"] == "one@noc"
