"""Account linking end to end, over real HTTP and against a real PostgreSQL.

IIM's HTTP site (the admin API and ``/oauth2/callback``) runs on a free port; the vendor is two peers: a small
authorization server (``tests/oauth_peer.py``: authorize, token with PKCE verified, refresh rotation,
invalid_grant, RFC 7009 revoke) and the vendor cloud (``tests/connector_peer.py``), which accepts only access
tokens the authorization server issued. The household's browser is an ``aiohttp`` client following the
authorize redirect back to IIM. The demo household's kitchen speaker is the connector target.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from iim.admin import cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.admin.links import link_routes
from iim.admin.settings import AdminSettings
from iim.connectors.contract import ConnectorContext, LinkScope, Notification, NotLinked, TtsDelivery
from iim.connectors.registry import ConnectorRegistry, SystemClock
from iim.connectors.webhook import WebhookConnector
from iim.core.envelope import DataKey
from iim.core.secrets import resolve_secret
from iim.http import create_app
from iim.key_rotation import rotate_data_key, tenant_keys
from iim.keys.keyring import Keyring
from iim.linking import store as link_store
from iim.linking.flow import s256_challenge
from iim.linking.http import callback_routes
from iim.linking.sealing import SealError, open_secret
from iim.linking.service import LinkingService
from iim.linking.store import ACCOUNT_LINK
from policy_cache import registry
from policy_cache.audit import flush_pending
from policy_cache.bootstrap import load_demo
from policy_cache.db import Connection, DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import BindingCreate, BindingRole, HouseholdCreate, SubscriberCreate
from tests.connector_peer import SIGNING_SECRET_TEXT, VendorPeer, serve
from tests.iim.linking.legacy_rows import OLD, legacy_link
from tests.oauth_peer import CLIENT_ID, CLIENT_SECRET, SCOPES, AuthorizationServer
from tests.pg import TEST_MASTER_KEY, PgDatabase, create_tenant, dump_data, every_row_as_text

TARGET = "kitchen-speaker-1"  # the demo's cloud speaker, at the "webhook" connector


@dataclass
class Rig:
    iim: str
    tenant: UUID
    household: UUID
    auth: AuthorizationServer
    vendor: VendorPeer
    linking: LinkingService
    connectors: ConnectorRegistry
    session: aiohttp.ClientSession
    admin_conn: Connection

    def links(self, tenant: UUID | None = None, household: UUID | None = None, connector: str = "webhook") -> str:
        return (f"{self.iim}/v1/tenants/{tenant or self.tenant}/households/{household or self.household}"
                f"/connectors/{connector}/links")

    async def api(self, method: str, url: str, *, token: str = "op", body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, url, json=body,
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def start(self, scopes: list[str] | None = None) -> str:
        status, started = await self.api("POST", self.links(), body={"scopes": scopes or ["send_notifications",
                                                                                         "voice_interaction"]})
        assert status == 201, started
        return str(started["authorization_url"])

    async def consent(self, authorization_url: str) -> str:
        """The household at the vendor: the authorize endpoint redirects the browser back; where to."""
        async with self.session.get(authorization_url, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            return resp.headers["Location"]

    async def browse(self, url: str) -> tuple[int, str, dict[str, str]]:
        async with self.session.get(url, allow_redirects=False) as resp:
            return resp.status, await resp.text(), dict(resp.headers)

    async def link(self, scopes: list[str] | None = None) -> None:
        status, page, _ = await self.browse(await self.consent(await self.start(scopes)))
        assert status == 200, page
        assert "Account linked" in page

    async def audit(self, action: str) -> list[dict[str, Any]]:
        await flush_pending(self.linking_pool)
        rows = await self.admin_conn.fetch("SELECT actor, detail FROM iim.audit_log WHERE tenant_id = $1 AND "
                                           "action = $2 ORDER BY id", self.tenant, action)
        return [{"actor": r["actor"], "detail": json.loads(r["detail"]) if isinstance(r["detail"], str)
                 else r["detail"]} for r in rows]

    linking_pool: Pool = None  # type: ignore[assignment]


def _tokens(tenant: UUID) -> TokenTable:
    entries = {"op": {"actor": "alice@operator", "role": "operator", "tenant": str(tenant)},
               "other": {"actor": "mallory@elsewhere", "role": "operator", "tenant": "00000000-0000-4000-8000-"
                                                                                     "000000000001"},
               "viewer": {"actor": "vic@operator", "role": "viewer", "tenant": str(tenant)},
               "adm": {"actor": "root@noc", "role": "admin"}}
    return TokenTable.from_json(json.dumps({hash_token(k): v for k, v in entries.items()}))


@pytest.fixture
async def rig(pg_db: PgDatabase, app_pool: Pool, admin_conn: Connection,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("IIM_TEST_VENDOR_SIGNING", SIGNING_SECRET_TEXT)
    monkeypatch.setenv("IIM_TEST_LINK_CLIENT", CLIENT_SECRET)
    async with app_pool.acquire() as conn:
        demo = await load_demo(conn)
    await admin_conn.execute("DELETE FROM iim.account_link; DELETE FROM iim.link_state; DELETE FROM iim.sms_outbox")
    vendor = VendorPeer()
    auth = AuthorizationServer(vendor)
    vendor_runner, vendor.url = await serve(vendor.app())
    auth_runner, auth.url = await serve(auth.app())
    directory = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    holder: list[ConnectorRegistry] = []
    linking = LinkingService(lambda: app_pool, lambda: directory, lambda: holder[0], Keyring(app_pool, TEST_MASTER_KEY))
    await linking.__aenter__()
    root = create_app([])
    callback_routes(root, linking)
    mount_registry(root, create_registry_app(lambda: app_pool, AdminSettings(), tokens=_tokens(demo.tenant_id),
                                             extra_routes=link_routes(lambda: linking),
                                             unlink_on_erase=linking.unlink_for_erasure))
    iim_runner, iim_url = await serve(root)
    auth.redirect_uri = f"{iim_url}/oauth2/callback"
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=SystemClock(),
                               linked_tokens=linking)
    registry = ConnectorRegistry(context, factories={"webhook": WebhookConnector})
    await registry.load([{"name": "webhook", "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify", "deliver_tts": "/tts"},
        "signing_secret_ref": "env:IIM_TEST_VENDOR_SIGNING",
        "retry": {"attempts": 1},
        "account_linking": {
            "authorize_url": f"{auth.url}/authorize", "token_url": f"{auth.url}/token",
            "revocation_url": f"{auth.url}/revoke", "client_id": CLIENT_ID,
            "client_secret_ref": "env:IIM_TEST_LINK_CLIENT", "redirect_uri": auth.redirect_uri,
            "scope_names": SCOPES, "request_timeout_s": 5.0}}}])
    holder.append(registry)
    async with aiohttp.ClientSession() as session:
        r = Rig(iim_url, demo.tenant_id, demo.household_id, auth, vendor, linking, registry, session, admin_conn)
        r.linking_pool = app_pool
        yield r
    await registry.aclose()
    await iim_runner.cleanup()
    await linking.__aexit__(None, None, None)
    await directory.close()
    await auth_runner.cleanup()
    await vendor_runner.cleanup()
    await vendor.close()


def _notification() -> Notification:
    return Notification(target=TARGET, title="Door", text="Someone is at the door")


# -- linking ------------------------------------------------------------------------------------------------

async def test_a_household_links_and_the_connector_then_calls_the_vendor_with_its_token(rig: Rig) -> None:
    url = await rig.start()
    assert "code_challenge_method=S256" in url
    assert "notify.send+voice.talk" in url.replace("%20", "+")
    connector = rig.connectors.get("webhook")
    with pytest.raises(NotLinked):  # nothing linked yet: the caller falls back to phone/SMS
        await connector.send_notification(_notification())

    status, page, headers = await rig.browse(await rig.consent(url))
    assert status == 200
    assert "Account linked" in page
    assert headers["Cache-Control"] == "no-store"

    await connector.send_notification(_notification())
    await connector.deliver_tts(TtsDelivery(target=TARGET, audio_url="https://iim.example/a.wav", text="hi"))
    bearer = {r.headers["Authorization"].removeprefix("Bearer ") for r in rig.vendor.received}
    assert len(bearer) == 1
    assert bearer <= rig.vendor.valid_tokens

    status, link = await rig.api("GET", rig.links(), token="viewer")
    assert status == 200, link
    assert (link["status"], link["scopes"]) == ("active", ["send_notifications", "voice_interaction"])
    assert "token" not in json.dumps({k: v for k, v in link.items() if k != "access_expires_at"})
    started, linked = await rig.audit("account_link.started"), await rig.audit("account_link.linked")
    assert [a["actor"] for a in started + linked] == ["alice@operator", "alice@operator"]
    assert linked[0]["detail"]["scopes"] == ["send_notifications", "voice_interaction"]


async def test_tokens_and_verifiers_are_stored_sealed_and_states_only_hashed(rig: Rig) -> None:
    url = await rig.start()
    state = URL(url).query["state"]
    row = await rig.admin_conn.fetchrow("SELECT state_digest, verifier_sealed FROM iim.link_state")
    assert row is not None
    assert state.encode() not in row["state_digest"]
    assert len(row["state_digest"]) == 32
    await rig.browse(await rig.consent(url))
    link = await rig.admin_conn.fetchrow("SELECT access_token_sealed, refresh_token_sealed FROM iim.account_link")
    assert link is not None
    issued = rig.vendor.valid_tokens | set(rig.auth.refresh_tokens)
    assert not any(token in (link[0] + link[1]) for token in issued)


async def test_the_same_callback_twice_links_once_and_the_second_page_says_nothing_about_why(rig: Rig) -> None:
    back = await rig.consent(await rig.start())
    assert (await rig.browse(back))[0] == 200
    again = await rig.browse(back)
    unknown = await rig.browse(back.replace(back.split("state=")[1].split("&")[0], "A" * 43))
    assert again[0] == unknown[0] == 400
    assert again[1] == unknown[1]  # used and unknown states look alike: no oracle


async def test_an_expired_state_is_refused_like_an_unknown_one(rig: Rig) -> None:
    back = await rig.consent(await rig.start())
    await rig.admin_conn.execute("UPDATE iim.link_state SET created_at = now() - interval '2 hours', "
                                 "expires_at = now() - interval '1 hour'")
    status, page, _ = await rig.browse(back)
    assert status == 400
    assert "not valid" in page
    assert await rig.admin_conn.fetchval("SELECT count(*) FROM iim.account_link") == 0
    assert await rig.admin_conn.fetchval("SELECT count(*) FROM iim.link_state") == 0  # used up all the same


async def test_a_code_presented_with_another_linkings_state_fails_the_pkce_check(rig: Rig) -> None:
    """Code injection: an attacker's code, replayed into the household's own linking, has the wrong verifier."""
    attacker = await rig.consent(await rig.start())
    victim = await rig.consent(await rig.start())
    code = attacker.split("code=")[1].split("&")[0]
    injected = victim.replace(victim.split("code=")[1].split("&")[0], code)
    status, page, _ = await rig.browse(injected)
    assert status == 400
    assert "did not complete" in page
    assert await rig.admin_conn.fetchval("SELECT count(*) FROM iim.account_link") == 0
    failed = await rig.audit("account_link.failed")
    assert failed[-1]["detail"]["reason"] == "invalid_grant"


async def test_a_household_that_declines_at_the_vendor_links_nothing_and_it_is_audited(rig: Rig) -> None:
    rig.auth.deny = True
    status, page, _ = await rig.browse(await rig.consent(await rig.start()))
    assert status == 400
    assert "cancelled" in page
    declined = await rig.audit("account_link.declined")
    assert declined[0]["detail"]["error"] == "access_denied"


async def test_a_grant_wider_than_asked_is_refused_and_its_tokens_revoked(rig: Rig) -> None:
    rig.auth.grant_scope = "notify.send voice.talk admin.everything"
    status, page, _ = await rig.browse(await rig.consent(await rig.start()))
    assert status == 400
    assert "more access" in page
    assert await rig.admin_conn.fetchval("SELECT count(*) FROM iim.account_link") == 0
    assert {hint for _, hint in rig.auth.revoked} == {"access_token", "refresh_token"}
    assert rig.vendor.valid_tokens == set()


async def test_scopes_wider_than_iims_three_cannot_even_be_asked_for(rig: Rig) -> None:
    status, problem = await rig.api("POST", rig.links(), body={"scopes": ["send_notifications", "admin"]})
    assert status == 422
    assert problem["error_id"] == "validation-failed"


async def test_the_granted_scope_is_checked_on_use(rig: Rig) -> None:
    await rig.link(["read_events", "voice_interaction"])
    connector = rig.connectors.get("webhook")
    with pytest.raises(NotLinked, match="send_notifications"):
        await connector.send_notification(_notification())
    await connector.deliver_tts(TtsDelivery(target=TARGET, audio_url="https://iim.example/a.wav", text="hi"))
    assert [r.path for r in rig.vendor.received] == ["/tts"]


async def test_a_vendor_that_fails_the_exchange_is_a_503_and_a_reload_then_links(rig: Rig) -> None:
    back = await rig.consent(await rig.start())
    rig.auth.fail_token = 1
    status, _, headers = await rig.browse(back)
    assert status == 503
    assert headers["Retry-After"]
    status, page, _ = await rig.browse(back)  # the state was not consumed
    assert status == 200
    assert "Account linked" in page


async def test_other_tenants_and_unknown_connectors_are_404(rig: Rig) -> None:
    status, _ = await rig.api("POST", rig.links(), token="other", body={"scopes": ["read_events"]})
    assert status == 403
    status, problem = await rig.api("POST", rig.links(connector="nope"), body={"scopes": ["read_events"]})
    assert status == 404, problem
    status, problem = await rig.api("GET", rig.links())
    assert status == 404
    assert problem["error_id"] == "not-found"


# -- renewal, breakage, unlinking ---------------------------------------------------------------------------

async def test_tokens_are_renewed_before_expiry_with_refresh_token_rotation(rig: Rig) -> None:
    rig.auth.access_lifetime_s = 120  # inside the default 300 s renewal window: due at once
    await rig.link()
    first_refresh = set(rig.auth.refresh_tokens)
    assert await rig.linking.refresh_due() == 1
    assert await rig.linking.refresh_due() == 1  # the rotated refresh token works in turn
    grants = [r for r in rig.auth.token_requests if r.get("grant_type") == "refresh_token"]
    assert len(grants) == 2
    assert grants[0]["refresh_token"] in first_refresh
    assert grants[1]["refresh_token"] not in first_refresh
    await rig.connectors.get("webhook").send_notification(_notification())
    used = rig.vendor.received[-1].headers["Authorization"].removeprefix("Bearer ")
    assert used.startswith("at-")
    assert used in rig.vendor.valid_tokens
    _status, link = await rig.api("GET", rig.links())
    assert link["refreshed_at"] is not None
    assert link["status"] == "active"


async def test_invalid_grant_on_renewal_breaks_the_link_tells_the_owner_and_is_audited(rig: Rig) -> None:
    rig.auth.access_lifetime_s = 120
    await rig.link()
    rig.auth.kill_grants()  # the household withdrew consent at the vendor
    assert await rig.linking.refresh_due() == 1
    status, link = await rig.api("GET", rig.links())
    assert status == 200
    assert (link["status"], link["reason"]) == ("broken", "the authorization server says invalid_grant")
    broken = await rig.audit("account_link.broken")
    assert broken[0]["actor"] == "iim:link-refresher"
    assert broken[0]["detail"]["owner_notified"] is True
    sms = await rig.admin_conn.fetch("SELECT msisdn FROM iim.sms_outbox WHERE key LIKE 'link-broken:%'")
    assert [r["msisdn"] for r in sms] == ["+79001234567"]
    assert any(hint == "refresh_token" for _, hint in rig.auth.revoked)
    with pytest.raises(NotLinked):
        await rig.connectors.get("webhook").send_notification(_notification())
    await rig.link()  # linking again mends it
    _status, link = await rig.api("GET", rig.links())
    assert link["status"] == "active"


async def test_unlinking_revokes_at_the_vendor_forgets_the_tokens_and_is_audited(rig: Rig) -> None:
    await rig.link()
    refresh = next(iter(rig.auth.refresh_tokens))
    status, link = await rig.api("DELETE", rig.links())
    assert status == 200, link
    assert (link["status"], link["vendor_revoked"]) == ("revoked", True)
    assert (refresh, "refresh_token") in rig.auth.revoked
    assert rig.vendor.valid_tokens == set()
    row = await rig.admin_conn.fetchrow("SELECT access_token_sealed, refresh_token_sealed FROM iim.account_link")
    assert row is not None
    assert tuple(row) == (None, None)
    revoked = await rig.audit("account_link.revoked")
    assert revoked[0]["actor"] == "alice@operator"
    assert revoked[0]["detail"]["vendor_revoked"] is True
    with pytest.raises(NotLinked):
        await rig.connectors.get("webhook").send_notification(_notification())


# -- tokens under the tenant's envelope ------------------------------------------------------------------------

def _issued(rig: Rig) -> set[str]:
    """Every token the authorization server ever issued (access and refresh, live or dead)."""
    return (set(rig.auth.refresh_tokens) | rig.vendor.valid_tokens
            | {a for grant in rig.auth.refresh_tokens.values() for a in grant.access})


async def _data_key(conn: Connection, tenant: UUID, key_id: int) -> DataKey:
    wrapped = await conn.fetchval("SELECT wrapped FROM iim.tenant_data_key WHERE tenant_id = $1 AND key_id = $2",
                                  tenant, key_id)
    return TEST_MASTER_KEY.unwrap(tenant, key_id, wrapped)


async def test_a_linked_accounts_tokens_are_in_the_database_only_as_envelope_ciphertext(
        rig: Rig, pg_db: PgDatabase) -> None:
    rig.auth.access_lifetime_s = 120
    await rig.link()
    assert await rig.linking.refresh_due() == 1  # a renewed (rotated) pair at rest too
    pending = URL(await rig.start())  # and a started linking's code verifier
    issued = _issued(rig)
    assert len(issued) >= 4
    rows, dump = await every_row_as_text(rig.admin_conn), await dump_data(pg_db)
    assert [t for t in issued if t in rows or t in dump] == []
    link = await rig.admin_conn.fetchrow("SELECT * FROM iim.account_link")
    assert link is not None
    assert link["access_token_sealed"] in dump  # what the dump shows of the tokens is ciphertext
    # ... the envelope's: the tenant's data key (under the master key) opens it, bound to this row and column.
    access = (await _data_key(rig.admin_conn, rig.tenant, link["access_token_key"])).open(
        "account_link", str(link["id"]), "access_token", link["access_token_sealed"])
    refresh = (await _data_key(rig.admin_conn, rig.tenant, link["refresh_token_key"])).open(
        "account_link", str(link["id"]), "refresh_token", link["refresh_token_sealed"])
    assert access in rig.vendor.valid_tokens
    assert rig.auth.refresh_tokens[refresh].alive
    state = await rig.admin_conn.fetchrow("SELECT id, verifier_sealed, verifier_key FROM iim.link_state")
    assert state is not None
    verifier = (await _data_key(rig.admin_conn, rig.tenant, state["verifier_key"])).open(
        "link_state", str(state["id"]), "code_verifier", state["verifier_sealed"])
    assert s256_challenge(verifier) == pending.query["code_challenge"]
    assert verifier not in dump


async def test_a_sealed_token_copied_to_another_row_column_or_tenant_does_not_open(
        rig: Rig, app_pool: Pool, keyring: Keyring) -> None:
    await rig.link()
    link = await rig.admin_conn.fetchrow("SELECT * FROM iim.account_link")
    assert link is not None
    # Another row of the same tenant (the same data key opens it, were it not for the place).
    await rig.admin_conn.execute(
        "INSERT INTO iim.account_link (tenant_id, id, household_id, connector, scopes, access_token_sealed, "
        "access_token_key, refresh_token_sealed, refresh_token_key, access_expires_at, actor) "
        "SELECT tenant_id, $1, household_id, 'copycat', scopes, access_token_sealed, access_token_key, "
        "refresh_token_sealed, refresh_token_key, access_expires_at, actor FROM iim.account_link WHERE id = $2",
        uuid4(), link["id"])
    # Another tenant's household.
    other = await create_tenant(app_pool, "Other")
    async with tenant_tx(app_pool, other) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="Elsewhere", time_zone="Europe/Moscow"), actor="t")
        theirs = await keyring.active(conn, other)
        await conn.execute(
            "INSERT INTO iim.account_link (id, household_id, connector, scopes, access_token_sealed, "
            "access_token_key, access_expires_at, actor) VALUES ($1, $2, 'webhook', '{send_notifications}', $3, $4, "
            "now() + interval '1 hour', 't')", uuid4(), home.id, link["access_token_sealed"], theirs.key_id)

    async def opens(tenant: UUID, household: UUID, connector: str, column: str = "access_token") -> str:
        async with tenant_tx(app_pool, tenant) as conn:
            row = await link_store.get_link(conn, household, connector)
            assert row is not None
            assert row.access_token is not None
            return await open_secret(conn, keyring, tenant, ACCOUNT_LINK, row.id, column, row.access_token)

    assert await opens(rig.tenant, rig.household, "webhook") in rig.vendor.valid_tokens  # where it was sealed
    with pytest.raises(SealError):
        await opens(rig.tenant, rig.household, "copycat")  # another row
    with pytest.raises(SealError):
        await opens(rig.tenant, rig.household, "webhook", "refresh_token")  # another column
    with pytest.raises(SealError):
        await opens(other, home.id, "webhook")  # another tenant
    with pytest.raises(NotLinked, match="does not open"):  # what a connector sees of a copied token
        await _token_of(rig, "copycat")


async def _token_of(rig: Rig, connector: str) -> str:
    """The connector path for a link at ``connector``: the household's kitchen speaker moved there for a moment."""
    await rig.admin_conn.execute("UPDATE iim.device SET connector = $1 WHERE connector_ref = $2", connector, TARGET)
    try:
        return await rig.linking.access_token(connector, TARGET, LinkScope.SEND_NOTIFICATIONS)
    finally:
        await rig.admin_conn.execute("UPDATE iim.device SET connector = 'webhook' WHERE connector_ref = $1", TARGET)


async def test_a_key_rotation_reseals_the_link_tokens_and_renewal_works_after(rig: Rig, app_pool: Pool) -> None:
    rig.auth.access_lifetime_s = 120
    await rig.link()
    first_refresh = set(rig.auth.refresh_tokens)
    pending = await rig.consent(await rig.start())  # a linking under way across the rotation
    before = await rig.admin_conn.fetchrow("SELECT * FROM iim.account_link")
    state_before = await rig.admin_conn.fetchrow("SELECT * FROM iim.link_state")
    assert before is not None
    assert state_before is not None

    done = await rotate_data_key(app_pool, Keyring(app_pool, TEST_MASTER_KEY), rig.tenant, actor="cli:ops")
    assert (done.resealed["account_link"], done.resealed["link_state"], done.unreadable) == (1, 1, 0)
    after = await rig.admin_conn.fetchrow("SELECT * FROM iim.account_link")
    state_after = await rig.admin_conn.fetchrow("SELECT * FROM iim.link_state")
    assert after is not None
    assert state_after is not None
    assert before["access_token_key"] < done.key_id
    assert (after["access_token_key"], after["refresh_token_key"], state_after["verifier_key"]) == (done.key_id,) * 3
    assert after["access_token_sealed"] != before["access_token_sealed"]
    assert after["refresh_token_sealed"] != before["refresh_token_sealed"]
    assert state_after["verifier_sealed"] != state_before["verifier_sealed"]
    status = await tenant_keys(app_pool, rig.tenant)
    assert {k.key_id: k.rows for k in status.keys}[done.key_id] >= 3
    assert status.legacy_rows == 0

    assert await rig.linking.refresh_due() == 1  # the refresh token opens under the new key
    grant = [r for r in rig.auth.token_requests if r.get("grant_type") == "refresh_token"][-1]
    assert grant["refresh_token"] in first_refresh
    _status, link = await rig.api("GET", rig.links())
    assert (link["status"], link["refreshed_at"] is not None) == ("active", True)
    await rig.connectors.get("webhook").send_notification(_notification())
    assert rig.vendor.received[-1].headers["Authorization"].removeprefix("Bearer ") in rig.vendor.valid_tokens
    status_code, page, _ = await rig.browse(pending)  # its code verifier opens under the new key
    assert status_code == 200, page


async def test_tokens_in_the_old_format_are_resealed_by_a_rotation_given_the_old_key(
        rig: Rig, app_pool: Pool) -> None:
    link_id, access, _refresh = await legacy_link(rig.admin_conn, rig.tenant, rig.household)
    rig.vendor.valid_tokens.add(access)
    connector = rig.connectors.get("webhook")
    with pytest.raises(NotLinked, match="old format"):  # this service was given no old key
        await connector.send_notification(_notification())
    keyring = Keyring(app_pool, TEST_MASTER_KEY)
    assert (await tenant_keys(app_pool, rig.tenant)).legacy_rows == 2

    unopened = await rotate_data_key(app_pool, keyring, rig.tenant, actor="cli:ops", new_key=False)
    assert (unopened.resealed["account_link"], unopened.unreadable) == (0, 1)  # left as it was
    done = await rotate_data_key(app_pool, keyring, rig.tenant, actor="cli:ops", new_key=False, legacy=OLD)
    assert (done.resealed["account_link"], done.unreadable) == (1, 0)
    row = await rig.admin_conn.fetchrow("SELECT * FROM iim.account_link WHERE id = $1", link_id)
    assert row is not None
    assert (row["access_token_key"], row["refresh_token_key"]) == (done.key_id, done.key_id)
    assert (await tenant_keys(app_pool, rig.tenant)).legacy_rows == 0
    await connector.send_notification(_notification())  # without the old key now
    assert rig.vendor.received[-1].headers["Authorization"] == f"Bearer {access}"


# -- erasure ---------------------------------------------------------------------------------------------------

async def test_erasing_the_only_owner_of_a_home_revokes_its_links_at_the_vendor_and_keeps_other_homes_links(
        rig: Rig, app_pool: Pool) -> None:
    async with tenant_tx(app_pool, rig.tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="Solo flat",
                                                                               time_zone="Europe/Moscow"), actor="t")
        owner = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79005550177"), actor="t")
        await registry.create(conn, registry.BINDING, BindingCreate(subscriber_id=owner.id, household_id=home.id,
                                                                    role=BindingRole.OWNER), actor="t")
    status, started = await rig.api("POST", rig.links(household=home.id), body={"scopes": ["read_events"]})
    assert status == 201, started
    assert (await rig.browse(await rig.consent(started["authorization_url"])))[0] == 200
    theirs = set(rig.auth.refresh_tokens)
    await rig.link()  # the demo home, which the erased subscriber has nothing to do with

    status, report = await rig.api("POST", f"{rig.iim}/v1/tenants/{rig.tenant}/subscribers/{owner.id}/erase",
                                   token="adm")
    assert status == 200, report
    assert report["account_links_revoked"] == 1
    assert {token for token, hint in rig.auth.revoked if hint == "refresh_token"} == theirs  # at the vendor
    _status, link = await rig.api("GET", rig.links(household=home.id))
    assert (link["status"], link["reason"], link["actor"]) == ("revoked", "erased with the subscriber", "root@noc")
    row = await rig.admin_conn.fetchrow("SELECT access_token_sealed, refresh_token_sealed, access_token_key "
                                        "FROM iim.account_link WHERE household_id = $1", home.id)
    assert row is not None
    assert tuple(row) == (None, None, None)
    _status, kept = await rig.api("GET", rig.links())
    assert kept["status"] == "active"
    await rig.connectors.get("webhook").send_notification(_notification())  # the demo home's link still works


# -- the callback under fuzz ---------------------------------------------------------------------------------

_PARAM = st.sampled_from(["state", "code", "error", "iss", "state", "code"])
_VALUE = st.one_of(st.text(max_size=60), st.from_regex(r"\A[A-Za-z0-9_-]{43}\Z"), st.just("A" * 43))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.lists(st.tuples(_PARAM, _VALUE), max_size=5))
async def test_the_callback_answers_any_query_with_a_page_never_a_server_error(
        rig: Rig, params: list[tuple[str, str]]) -> None:
    invalid = await rig.browse(f"{rig.iim}/oauth2/callback?state=x")
    async with rig.session.get(f"{rig.iim}/oauth2/callback", params=params, allow_redirects=False) as resp:
        body = await resp.text()
        assert resp.status == 400, body
        assert body == invalid[1]  # one page for every failure: nothing echoed, nothing to tell states apart


# -- the CLI ------------------------------------------------------------------------------------------------

async def test_iim_link_start_status_revoke_from_the_cli(rig: Rig, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_OP_TOKEN", "op")

    async def iim(*argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, "--tenant", str(rig.tenant), "--household",
                                                  str(rig.household), "--connector", "webhook", "-o", "json",
                                                  "--api", rig.iim, "--token-ref", "env:IIM_OP_TOKEN"])
        out = capsys.readouterr()
        return code, json.loads(out.out) if code == 0 else out.err

    code, started = await iim("link", "start", "--scope", "send_notifications", "--scope", "read_events")
    assert code == 0, started
    assert started["scopes"] == ["read_events", "send_notifications"]
    status, page, _ = await rig.browse(await rig.consent(started["authorization_url"]))
    assert status == 200, page
    code, shown = await iim("link", "status")
    assert (code, shown["status"], shown["actor"]) == (0, "active", "alice@operator")
    code, revoked = await iim("link", "revoke")
    assert (code, revoked["status"], revoked["vendor_revoked"]) == (0, "revoked", True)
    with pytest.raises(SystemExit) as refused:  # argparse: not one of IIM's three scopes
        await iim("link", "start", "--scope", "read_events", "--scope", "admin")
    assert refused.value.code == 2
