"""The :class:`iim.home.ports.SmsSink` of the running service: SMS go into the PostgreSQL outbox."""

from __future__ import annotations

from uuid import UUID

from iim.keys.keyring import Keyring
from iim.sms.store import enqueue_sms
from policy_cache.db import Pool, tenant_tx

__all__ = ["OutboxSmsSink"]


class OutboxSmsSink:
    """Queues an SMS in ``iim.sms_outbox`` (the SMS sender delivers it); the key makes a retry harmless."""

    def __init__(self, pool: Pool, keyring: Keyring) -> None:
        self.pool = pool
        self.keyring = keyring

    async def send(self, tenant_id: UUID, msisdn: str, text: str, key: str) -> None:
        async with tenant_tx(self.pool, tenant_id) as conn:
            await enqueue_sms(conn, key=key, msisdn=msisdn, body=text,
                              data_key=await self.keyring.active(conn, tenant_id))
