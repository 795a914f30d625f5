"""Account linking, run: start, the vendor's callback, status, unlink, tokens for connectors, renewal.

Each operation is one tenant transaction under a deadline (the store's, plus the authorization server's when it
is called inside): a stalled PostgreSQL or vendor is :class:`LinkingUnavailable` (503 with ``Retry-After``), never
a hang. The callback holds its state's row until the token exchange is decided: a vendor that fails (5xx, a
timeout) rolls it back, so the household may simply reload the page; any definite answer consumes it (single use).
Every change is audited on the tenant's chain with its actor: ``account_link.started``, ``.linked``,
``.declined``, ``.failed``, ``.revoked``, ``.broken`` (renewals are staged: ``.refreshed``). A link the vendor
kills (``invalid_grant`` on renewal, or a renewal that widens the grant) is marked broken, its tokens dropped and
revoked, and the household's owner is told by SMS (the outbox) to link again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self
from uuid import UUID, uuid4

from iim.connectors.contract import ConnectorUnavailable, LinkScope, NotLinked
from iim.connectors.linking import AccountLinking
from iim.connectors.registry import ConnectorRegistry
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.secrets import resolve_secret
from iim.keys.keyring import Keyring
from iim.linking import flow, store
from iim.linking.oauth import OAuthClient
from iim.linking.sealing import Sealer, SealError, open_secret, seal_secret
from iim.linking.store import ACCOUNT_LINK, LINK_STATE
from iim.sms.store import enqueue_sms
from policy_cache import audit
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.errors import NotFound

__all__ = ["CallbackRefused", "LinkView", "LinkingError", "LinkingService", "LinkingUnavailable", "Linked",
           "NoSuchLink", "NotLinkable", "StartedLink"]

log = logging.getLogger(__name__)

PoolProvider = Callable[[], Pool]
#: the store is away: its outages, and a pool not connected yet
_AWAY: tuple[type[BaseException], ...] = (LookupError, *STORE_UNAVAILABLE)
REFRESHER = "iim:link-refresher"


class LinkingError(Exception):
    """Base of what linking refuses or cannot do now."""


class NotLinkable(LinkingError):
    """No such connector, or it does not take account links."""


class NoSuchLink(LinkingError):
    """The household (of this tenant) has no link at this connector, or there is no such household."""


class LinkingUnavailable(LinkingError):
    """PostgreSQL or the vendor's authorization server is away or too slow: retry later."""


class CallbackRefused(LinkingError):
    """The callback completes no linking. ``page`` is what the household is told (``invalid`` says nothing about
    why: an unknown, used or expired state look alike); the message is for the log."""

    def __init__(self, page: Literal["invalid", "declined", "refused", "too_wide"], reason: str) -> None:
        super().__init__(reason)
        self.page = page


@dataclass(frozen=True, slots=True)
class StartedLink:
    authorization_url: str
    expires_at: datetime
    scopes: frozenset[LinkScope]


@dataclass(frozen=True, slots=True)
class Linked:
    connector: str
    scopes: frozenset[LinkScope]


@dataclass(frozen=True, slots=True)
class LinkView:
    """A link as operators see it (never a token)."""

    household_id: UUID
    connector: str
    status: str
    scopes: frozenset[LinkScope]
    access_expires_at: datetime | None
    linked_at: datetime
    refreshed_at: datetime | None
    changed_at: datetime
    actor: str
    reason: str | None
    vendor_revoked: bool | None = None

    @classmethod
    def of(cls, row: store.LinkRow, vendor_revoked: bool | None = None) -> LinkView:
        return cls(row.household_id, row.connector, row.status, row.scopes, row.access_expires_at, row.linked_at,
                   row.refreshed_at, row.changed_at, row.actor, row.reason, vendor_revoked)


class LinkingService:
    """Account links of every tenant; ``async with`` opens its HTTP client. Implements
    :class:`iim.connectors.contract.LinkedTokens` for the connectors.

    Args:
        app_pool: the ``iim_app`` pool (tenant-scoped).
        directory_pool: an ``iim_cache`` pool: which household a connector's target belongs to (any tenant).
        connectors: the connector registry (each linkable connector's ``account_linking``).
        keyring: tenants' data keys: tokens and code verifiers are sealed with them at rest (and the owner's
            "link again" SMS).
        legacy: the old process-wide token key, if still given: opens values a start has not converted yet.
        deadline_s: the store's deadline per operation (a vendor's request timeout is added where it is called).
    """

    def __init__(self, app_pool: PoolProvider, directory_pool: PoolProvider,
                 connectors: Callable[[], ConnectorRegistry], keyring: Keyring, *, legacy: Sealer | None = None,
                 oauth: OAuthClient | None = None, deadline_s: float = 5.0,
                 secrets: Callable[[str], str] = resolve_secret) -> None:
        self._app_pool = app_pool
        self._directory_pool = directory_pool
        self._keyring = keyring
        self._legacy = legacy
        self._connectors = connectors
        self._oauth = oauth or OAuthClient()
        self._deadline_s = deadline_s
        self._secrets = secrets

    @property
    def legacy(self) -> Sealer | None:
        """The old process-wide token key, while it is given (key rotation converts what is left with it)."""
        return self._legacy

    async def __aenter__(self) -> Self:
        await self._oauth.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._oauth.__aexit__(*exc)

    # --- configuration -------------------------------------------------------------------------------------

    def config(self, connector: str) -> AccountLinking:
        """The connector's authorization server; :class:`NotLinkable` when there is none."""
        try:
            found: object = self._connectors().get(connector)
        except (KeyError, ConnectorUnavailable):
            found = None
        linking = getattr(found, "account_linking", None)
        if not isinstance(linking, AccountLinking):
            raise NotLinkable(f"no connector {connector!r} that takes account links")
        return linking

    def _client_secret(self, config: AccountLinking) -> str | None:
        if config.client_secret_ref is None:
            return None
        try:
            return self._secrets(config.client_secret_ref)
        except (LookupError, ValueError) as exc:
            raise LinkingUnavailable(f"the client secret does not resolve: {exc}") from None

    async def _open(self, conn: Connection, tenant_id: UUID, table: str, row: UUID, column: str,
                    value: store.Sealed) -> str:
        return await open_secret(conn, self._keyring, tenant_id, table, row, column, value, self._legacy)

    @asynccontextmanager
    async def _tx(self, tenant_id: UUID, *, extra_s: float = 0.0) -> AsyncIterator[Connection]:
        try:
            async with asyncio.timeout(self._deadline_s + extra_s), tenant_tx(self._app_pool(), tenant_id) as conn:
                yield conn
        except _AWAY as exc:
            raise LinkingUnavailable(f"the link store is unavailable: {type(exc).__name__}") from exc

    # --- operator actions ----------------------------------------------------------------------------------

    async def start(self, tenant_id: UUID, household_id: UUID, connector: str, scopes: Iterable[LinkScope], *,
                    actor: str, correlation: Mapping[str, Any] | None = None) -> StartedLink:
        """Begin linking: a fresh state (stored hashed) and PKCE verifier (stored sealed); the URL to send the
        household to. Raises NotLinkable, NoSuchLink (no such household), LinkingUnavailable."""
        config = self.config(connector)
        wanted = frozenset(scopes)
        if not wanted:
            raise ValueError("at least one scope")
        state, verifier, state_id = flow.new_state(), flow.new_verifier(), uuid4()
        url = flow.authorization_url(config, state=state, challenge=flow.s256_challenge(verifier), scopes=wanted)
        try:
            async with self._tx(tenant_id) as conn:
                sealed = seal_secret(await self._keyring.active(conn, tenant_id), LINK_STATE, state_id,
                                     "code_verifier", verifier)
                await store.sweep_states(conn)
                expires = await store.insert_state(conn, state_id=state_id, household_id=household_id,
                                                   connector=connector, digest=flow.state_digest(state),
                                                   verifier=sealed, scopes=wanted, actor=actor,
                                                   ttl_s=config.state_ttl_s)
                await audit.append(conn, tenant_id, actor=actor, action="account_link.started",
                                   entity="household", entity_id=household_id,
                                   detail={"connector": connector, "scopes": sorted(wanted),
                                           "expires_at": expires.isoformat()}, correlation=correlation)
        except NotFound as exc:
            raise NoSuchLink(str(exc)) from exc
        return StartedLink(url, expires, wanted)

    async def status(self, tenant_id: UUID, household_id: UUID, connector: str) -> LinkView:
        async with self._tx(tenant_id) as conn:
            row = await store.get_link(conn, household_id, connector)
        if row is None:
            raise NoSuchLink(f"household {household_id} has no link at {connector!r}")
        return LinkView.of(row)

    async def revoke(self, tenant_id: UUID, household_id: UUID, connector: str, *, actor: str,
                     correlation: Mapping[str, Any] | None = None, reason: str = "unlinked") -> LinkView:
        """Unlink: the tokens are revoked at the vendor (RFC 7009, refresh token first: that ends the grant) and
        dropped here; done here even when the vendor cannot be reached (``vendor_revoked`` says which)."""
        config = self.config(connector)
        async with self._tx(tenant_id, extra_s=2 * config.request_timeout_s) as conn:
            found = await store.get_link(conn, household_id, connector)
            row = None if found is None else await store.lock_link(conn, found.id)
            if row is None:
                raise NoSuchLink(f"household {household_id} has no link at {connector!r}")
            if row.status != "active":
                return LinkView.of(row)
            vendor_revoked = await self._revoke_at_vendor(conn, tenant_id, config, row)
            marked = await store.mark_link(conn, row.id, status="revoked", reason=reason, actor=actor)
            assert marked is not None
            await audit.append(conn, tenant_id, actor=actor, action="account_link.revoked", entity="household",
                               entity_id=household_id, detail={"connector": connector, "reason": reason,
                                                               "vendor_revoked": vendor_revoked},
                               correlation=correlation)
        return LinkView.of(marked, vendor_revoked)

    async def unlink_for_erasure(self, tenant_id: UUID, subscriber_id: UUID, actor: str) -> int:
        """Before a subscriber's erasure: each active link of their own homes (nobody else bound) revoked at its
        vendor and here, as an unlink is. A link whose connector is not loaded, or a link store that is away, is
        left to the erasure, which drops the tokens (the vendor's grant then expires). How many were revoked."""
        try:
            async with self._tx(tenant_id) as conn:
                links = await store.own_home_links(conn, subscriber_id)
        except LinkingUnavailable as exc:
            log.warning("erasure of subscriber %s: account links not revoked at the vendors (%s)", subscriber_id, exc)
            return 0
        done = 0
        for household_id, connector in links:
            try:
                view = await self.revoke(tenant_id, household_id, connector, actor=actor,
                                         reason="erased with the subscriber")
            except (NotLinkable, NoSuchLink, LinkingUnavailable) as exc:
                log.warning("erasure of subscriber %s: the link of household %s at %s not revoked at the vendor "
                            "(%s); its tokens are dropped", subscriber_id, household_id, connector, exc)
                continue
            done += view.vendor_revoked is not None
        return done

    async def _revoke_at_vendor(self, conn: Connection, tenant_id: UUID, config: AccountLinking,
                                row: store.LinkRow) -> bool:
        secret = self._client_secret(config)
        revoked = False
        for column, sealed, hint in (("refresh_token", row.refresh_token, "refresh_token"),
                                     ("access_token", row.access_token, "access_token")):
            if sealed is None:
                continue
            try:
                token = await self._open(conn, tenant_id, ACCOUNT_LINK, row.id, column, sealed)
            except SealError:
                log.error("account link %s: the stored %s does not open", row.id, column)
                continue
            revoked = await self._oauth.revoke(config, secret, token=token, hint=hint) or revoked
        return revoked

    # --- the vendor's callback -----------------------------------------------------------------------------

    async def callback(self, query: Iterable[tuple[str, str]]) -> Linked:
        """The household is back from the vendor: check the state and exchange the code with its verifier.

        Raises:
            CallbackRefused: nothing linked (the page to show says how much the household may know).
            LinkingUnavailable: try again (nothing consumed).
        """
        answer = flow.parse_callback(query)
        if isinstance(answer, flow.Malformed):
            raise CallbackRefused("invalid", answer.reason)
        digest = flow.state_digest(answer.state)
        try:
            async with asyncio.timeout(self._deadline_s + 60.0), self._app_pool().acquire() as proxy:
                conn: Connection = proxy  # type: ignore[assignment]
                async with conn.transaction():
                    outcome = await self._complete(conn, digest, answer)
        except _AWAY as exc:
            raise LinkingUnavailable(f"the link store is unavailable: {type(exc).__name__}") from exc
        if isinstance(outcome, CallbackRefused):  # committed: the state is used up, the audit line kept
            raise outcome
        return outcome

    async def _complete(self, conn: Connection, digest: bytes,
                        answer: flow.CallbackAnswer | flow.Denied) -> Linked | CallbackRefused:
        taken = await store.take_state(conn, digest)
        if taken is None:
            return CallbackRefused("invalid", "no started linking has this state")
        if taken.expired:
            return CallbackRefused("invalid", "the linking's state has expired")
        await store.enter_tenant(conn, taken.tenant_id)
        where = {"connector": taken.connector, "via": "oauth2-callback"}
        if isinstance(answer, flow.Denied):
            await audit.append(conn, taken.tenant_id, actor=taken.actor, action="account_link.declined",
                               entity="household", entity_id=taken.household_id,
                               detail={**where, "error": answer.error})
            return CallbackRefused("declined", f"the vendor answered {answer.error}")
        try:
            config = self.config(taken.connector)
            verifier = await self._open(conn, taken.tenant_id, LINK_STATE, taken.id, "code_verifier", taken.verifier)
        except (NotLinkable, SealError) as exc:
            return CallbackRefused("refused", f"cannot complete: {exc}")
        secret = self._client_secret(config)
        async with asyncio.timeout(config.request_timeout_s + 1.0):
            result = await self._oauth.exchange_code(config, secret, code=answer.code, verifier=verifier,
                                                     requested=taken.scopes)
        if isinstance(result, flow.TokenFailure):
            if result.kind == "unavailable":
                raise LinkingUnavailable(f"the authorization server is unavailable: {result.detail}")
            for token, hint in result.issued:
                await self._oauth.revoke(config, secret, token=token, hint=hint)
            await audit.append(conn, taken.tenant_id, actor=taken.actor, action="account_link.failed",
                               entity="household", entity_id=taken.household_id,
                               detail={**where, "reason": result.kind, "detail": result.detail})
            page: Literal["too_wide", "refused"] = "too_wide" if result.kind == "too_wide" else "refused"
            return CallbackRefused(page, f"token exchange: {result.kind}: {result.detail}")
        existing = await store.get_link(conn, taken.household_id, taken.connector)
        link_id = existing.id if existing is not None else uuid4()
        key = await self._keyring.active(conn, taken.tenant_id)
        row = await store.save_link(
            conn, link_id=link_id, household_id=taken.household_id, connector=taken.connector, scopes=result.scopes,
            access=seal_secret(key, ACCOUNT_LINK, link_id, "access_token", result.access_token),
            refresh=None if result.refresh_token is None else seal_secret(
                key, ACCOUNT_LINK, link_id, "refresh_token", result.refresh_token),
            expires_in=result.expires_in, actor=taken.actor)
        if row is None:
            raise LinkingUnavailable("the household's link changed meanwhile; retry")
        await audit.append(conn, taken.tenant_id, actor=taken.actor, action="account_link.linked",
                           entity="household", entity_id=taken.household_id,
                           detail={**where, "scopes": sorted(result.scopes),
                                   "previous": None if existing is None else existing.status,
                                   "refresh_token": result.refresh_token is not None})
        return Linked(taken.connector, result.scopes)

    # --- tokens for connectors -----------------------------------------------------------------------------

    async def access_token(self, connector: str, target: str, scope: LinkScope) -> str:
        """:class:`iim.connectors.contract.LinkedTokens`: the household's token, its grant checked for ``scope``;
        renewed first when it has expired (the refresher was late)."""
        try:
            async with asyncio.timeout(self._deadline_s), self._directory_pool().acquire() as proxy:
                owners = await store.households_of_target(proxy, connector, target)  # type: ignore[arg-type]
        except _AWAY as exc:
            raise ConnectorUnavailable(f"{connector}: account links unavailable ({type(exc).__name__})") from exc
        if len(owners) != 1:
            raise NotLinked(f"{connector}: the target belongs to {len(owners)} households")
        tenant_id, household_id = owners[0]
        try:
            async with self._tx(tenant_id) as conn:  # one transaction on the hot path: read, check, open
                row = await store.get_link(conn, household_id, connector)
                if row is None or row.status != "active" or row.access_token is None:
                    raise NotLinked(f"{connector}: the household has no active account link")
                if scope not in row.scopes:
                    raise NotLinked(f"{connector}: the household's link does not grant {scope}")
                assert row.access_expires_at is not None
                if row.access_expires_at > datetime.now(UTC):
                    return await self._open_access(conn, tenant_id, row, connector)
        except LinkingUnavailable as exc:
            raise ConnectorUnavailable(f"{connector}: {exc}") from exc
        try:
            renewed = await self.refresh(tenant_id, row.id)
        except LinkingUnavailable as exc:
            raise ConnectorUnavailable(f"{connector}: the expired token cannot be renewed now ({exc})") from exc
        if renewed is None or renewed.access_token is None:
            raise NotLinked(f"{connector}: the household's access token has expired and was not renewed")
        try:
            async with self._tx(tenant_id) as conn:
                return await self._open_access(conn, tenant_id, renewed, connector)
        except LinkingUnavailable as exc:
            raise ConnectorUnavailable(f"{connector}: {exc}") from exc

    async def _open_access(self, conn: Connection, tenant_id: UUID, row: store.LinkRow, connector: str) -> str:
        assert row.access_token is not None
        try:
            return await self._open(conn, tenant_id, ACCOUNT_LINK, row.id, "access_token", row.access_token)
        except SealError as exc:
            raise NotLinked(f"{connector}: the stored token does not open ({exc})") from None

    # --- renewal -------------------------------------------------------------------------------------------

    async def refresh(self, tenant_id: UUID, link_id: UUID, *, skip_locked: bool = False) -> store.LinkRow | None:
        """Renew one link's access token now (rotating the refresh token when the vendor does). A dead grant
        (``invalid_grant``) or a widened one breaks the link; a vendor that is away leaves it to the next try.
        Returns the link as it is afterwards (``None``: locked by another renewal, or gone)."""
        async with self._tx(tenant_id, extra_s=30.0) as conn:
            row = await store.lock_link(conn, link_id, skip_locked=skip_locked)
            if row is None or row.status != "active":
                return row
            try:
                config = self.config(row.connector)
            except NotLinkable:
                log.warning("account link %s: connector %s is not loaded; not renewed", row.id, row.connector)
                return row
            outcome = await self._renew(conn, tenant_id, config, row)
            if isinstance(outcome, store.LinkRow):
                return outcome
            broken = await store.mark_link(conn, row.id, status="broken", reason=outcome.detail, actor=REFRESHER)
            notify = await self._tell_household(conn, tenant_id, row)
            log.warning("account link %s broken (%s); owner told: %s", row.id, outcome.kind, notify is not None)
            await audit.append(conn, tenant_id, actor=REFRESHER, action="account_link.broken",
                               entity="household", entity_id=row.household_id,
                               detail={"connector": row.connector, "reason": outcome.kind,
                                       "owner_notified": notify is not None})
            return broken

    async def _renew(self, conn: Connection, tenant_id: UUID, config: AccountLinking,
                     row: store.LinkRow) -> store.LinkRow | flow.TokenFailure:
        if row.refresh_token is None:
            return flow.TokenFailure("invalid_grant", "the access token expired and the vendor gave no refresh token")
        try:
            refresh_token = await self._open(conn, tenant_id, ACCOUNT_LINK, row.id, "refresh_token", row.refresh_token)
        except SealError:
            return flow.TokenFailure("invalid_grant", "the stored refresh token does not open")
        secret = self._client_secret(config)
        async with asyncio.timeout(config.request_timeout_s + 1.0):
            result = await self._oauth.refresh(config, secret, refresh_token=refresh_token, scopes=row.scopes)
        if isinstance(result, flow.TokenFailure):
            if result.kind in ("unavailable", "refused"):
                log.warning("account link %s: renewal failed (%s: %s); retried later", row.id, result.kind,
                            result.detail)
                return row
            for token, hint in (*result.issued, (refresh_token, "refresh_token")):
                await self._oauth.revoke(config, secret, token=token, hint=hint)
            return result
        key = await self._keyring.active(conn, tenant_id)
        updated = await store.update_tokens(
            conn, row.id, access=seal_secret(key, ACCOUNT_LINK, row.id, "access_token", result.access_token),
            refresh=None if result.refresh_token is None else seal_secret(
                key, ACCOUNT_LINK, row.id, "refresh_token", result.refresh_token),
            expires_in=result.expires_in, scopes=result.scopes)
        await audit.stage(conn, actor=REFRESHER, action="account_link.refreshed", entity="household",
                          entity_id=row.household_id, detail={"connector": row.connector,
                                                              "rotated": result.refresh_token is not None})
        return updated if updated is not None else row

    async def _tell_household(self, conn: Connection, tenant_id: UUID, row: store.LinkRow) -> UUID | None:
        """The owner's SMS (the normal outbox path): the vendor account must be linked again."""
        msisdn = await store.owner_msisdn(conn, row.household_id)
        if msisdn is None:
            return None
        await enqueue_sms(conn, key=f"link-broken:{row.id}:{row.changed_at.timestamp():.0f}", msisdn=msisdn,
                          body=f"Your {row.connector} account is no longer linked to your home service. "
                               "Please link it again in your app.",
                          data_key=await self._keyring.active(conn, tenant_id))
        return row.household_id

    async def refresh_due(self, *, within_s: float | None = None) -> int:
        """Renew every link, of any tenant, whose access token expires within its connector's ``refresh_before_s``
        (or ``within_s``); the number of links looked at (renewed, broken, or left for the next try)."""
        horizon = within_s if within_s is not None else self._horizon_s()
        try:
            async with asyncio.timeout(self._deadline_s), self._app_pool().acquire() as proxy:
                due = await store.due_links(proxy, horizon)  # type: ignore[arg-type]
        except _AWAY as exc:
            raise LinkingUnavailable(f"the link store is unavailable: {type(exc).__name__}") from exc
        done = 0
        for tenant_id, link_id in due:
            before = await self.refresh(tenant_id, link_id, skip_locked=True)
            done += before is not None
        return done

    def _horizon_s(self) -> float:
        horizons = [linking.refresh_before_s for _, c in self._connectors().ready()
                    if isinstance(linking := getattr(c, "account_linking", None), AccountLinking)]
        return max(horizons, default=300.0)

    async def run_refresher(self, interval_s: float = 30.0) -> None:
        """Renew due links every ``interval_s`` until cancelled (run it under a ``TaskSupervisor``)."""
        while True:
            try:
                await self.refresh_due()
            except LinkingUnavailable as exc:
                log.warning("account link renewal skipped: %s", exc)
            await asyncio.sleep(interval_s)
