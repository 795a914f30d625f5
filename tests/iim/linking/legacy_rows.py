"""Rows as a release before the envelope wrote them: link secrets sealed with the one process-wide token key
(``IIM_LINK_TOKEN_KEY_REF``, :class:`AesGcmSealer`), no data key id beside them."""

from __future__ import annotations

import secrets
from uuid import UUID, uuid4

from iim.linking.sealing import AesGcmSealer
from policy_cache.db import Connection

OLD_KEY = "5a" * 32
OLD = AesGcmSealer.from_secret(OLD_KEY)


async def legacy_link(admin_conn: Connection, tenant: UUID, household: UUID, *,
                      connector: str = "webhook") -> tuple[UUID, str, str]:
    """An active link with both tokens in the old format; ``(link id, access token, refresh token)``."""
    link_id, access, refresh = uuid4(), f"at-legacy-{secrets.token_hex(8)}", f"rt-legacy-{secrets.token_hex(8)}"
    await admin_conn.execute(
        "INSERT INTO iim.account_link (tenant_id, id, household_id, connector, scopes, access_token_sealed, "
        "refresh_token_sealed, access_expires_at, actor) VALUES ($1, $2, $3, $4, "
        "'{send_notifications,voice_interaction}', $5, $6, now() + interval '1 hour', 'alice@operator')",
        tenant, link_id, household, connector, OLD.seal(tenant, link_id, "access_token", access),
        OLD.seal(tenant, link_id, "refresh_token", refresh))
    return link_id, access, refresh


async def legacy_state(admin_conn: Connection, tenant: UUID, household: UUID) -> UUID:
    """A started linking whose code verifier is in the old format."""
    state_id = uuid4()
    await admin_conn.execute(
        "INSERT INTO iim.link_state (tenant_id, id, household_id, connector, state_digest, verifier_sealed, scopes, "
        "actor, expires_at) VALUES ($1, $2, $3, 'webhook', $4, $5, '{read_events}', 'alice@operator', "
        "now() + interval '10 minutes')", tenant, state_id, household, secrets.token_bytes(32),
        OLD.seal(tenant, state_id, "code_verifier", secrets.token_urlsafe(48)))
    return state_id
