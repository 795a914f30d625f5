"""Right to erasure: a subscriber's personal content removed in one tenant transaction, audited with the actor.

Removed: their incoming SMS (rows and bodies), the payloads of their devices' events (the ledger rows stay for
idempotency and the incident history), the details of audit rows about them (tombstones: the hash chain still
verifies), and the subscriber row itself with its bindings, consents and policy. Kept: incident history
(calls and texts placed to their number during an alarm) and outgoing SMS rows, which are the operator's
record of what was done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from iim.privacy import store
from iim.sms import store as sms_store
from policy_cache import audit, registry
from policy_cache.db import Connection
from policy_cache.errors import NotFound

__all__ = ["ErasureReport", "erase_subscriber"]


class ErasureReport(BaseModel):
    """What an erasure removed (counts only: the report itself holds nothing personal)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subscriber_id: UUID
    sms_inbound_deleted: int = Field(ge=0)
    event_payloads_erased: int = Field(ge=0)
    devices: int = Field(ge=0, description="devices whose events were theirs")
    audit_details_tombstoned: int = Field(ge=0)


async def erase_subscriber(conn: Connection, tenant_id: UUID, subscriber_id: UUID, *, actor: str,
                           correlation: Mapping[str, Any] | None = None) -> ErasureReport:
    """Erase inside ``tenant_tx(pool, tenant_id)``; :class:`NotFound` for an unknown subscriber."""
    who = await store.subject(conn, subscriber_id)
    if who is None:
        raise NotFound(f"subscriber {subscriber_id} not found", entity="subscriber")
    devices = await store.subject_devices(conn, subscriber_id)
    sms = await sms_store.erase_inbound(conn, subscriber_id, who.msisdn)
    payloads = await store.erase_event_payloads(conn, devices)
    await store.flush_staged_audit(conn)
    tombstoned = await audit.tombstone(conn, tenant_id, await store.audit_rows_about(conn, who, devices),
                                       reason="erasure")
    await registry.delete(conn, registry.SUBSCRIBER, subscriber_id, actor=actor, correlation=correlation)
    # The delete's own audit row names the subscriber too: tombstoned with the rest.
    tombstoned += await audit.tombstone(conn, tenant_id, await store.audit_rows_about(conn, who, devices),
                                        reason="erasure")
    report = ErasureReport(subscriber_id=subscriber_id, sms_inbound_deleted=sms, event_payloads_erased=payloads,
                           devices=len(devices), audit_details_tombstoned=tombstoned)
    await audit.append(conn, tenant_id, actor=actor, action="subscriber.erased", entity="subscriber",
                       entity_id=subscriber_id, detail=report.model_dump(mode="json", exclude={"subscriber_id"}),
                       correlation=correlation)
    return report
