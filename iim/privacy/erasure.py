"""Right to erasure: a subscriber's personal content removed in one tenant transaction, audited with the actor.

Removed: their incoming SMS (rows and bodies), the messages callers left them (rows, and the files in the
recordings directory, deleted before the transaction commits), the payloads of their devices' events (the ledger
rows stay for idempotency and the incident history), the details of audit rows about them (tombstones: the hash
chain still verifies), the vendor-account tokens of their own homes (households nobody else is bound to: each
account link revoked here, its tokens dropped; the running service revokes them at the vendor just before, see
``iim.linking.service.LinkingService.unlink_for_erasure``), and the subscriber row
itself with its bindings, consents and policy. Kept: incident history (calls and texts placed to their number
during an alarm) and outgoing SMS rows, which are the operator's record of what was done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from iim.privacy import store
from iim.privacy.recordings import remove_recording_files
from iim.sms import store as sms_store
from policy_cache import audit, registry
from policy_cache.db import Connection
from policy_cache.errors import NotFound

__all__ = ["ErasureReport", "erase_subscriber"]

log = logging.getLogger(__name__)


class ErasureReport(BaseModel):
    """What an erasure removed (counts only: the report itself holds nothing personal)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subscriber_id: UUID
    sms_inbound_deleted: int = Field(ge=0)
    event_payloads_erased: int = Field(ge=0)
    devices: int = Field(ge=0, description="devices whose events were theirs")
    audit_details_tombstoned: int = Field(ge=0)
    recordings_deleted: int = Field(default=0, ge=0, description="recorded messages (rows) deleted")
    recording_files_deleted: int = Field(default=0, ge=0, description="their files removed from the recordings "
                                                                      "directory")
    account_links_revoked: int = Field(default=0, ge=0, description="account links of their own homes revoked, "
                                                                    "tokens dropped")


async def erase_subscriber(conn: Connection, tenant_id: UUID, subscriber_id: UUID, *, actor: str,
                           correlation: Mapping[str, Any] | None = None,
                           recordings_dir: Path | None = None) -> ErasureReport:
    """Erase inside ``tenant_tx(pool, tenant_id)``; :class:`NotFound` for an unknown subscriber.
    ``recordings_dir``: IIM's recordings directory (``IIM_RECORDINGS_DIR``), where the files of their
    recorded messages are deleted; a file that cannot be deleted fails the erasure (nothing is committed)."""
    who = await store.subject(conn, subscriber_id)
    if who is None:
        raise NotFound(f"subscriber {subscriber_id} not found", entity="subscriber")
    devices = await store.subject_devices(conn, subscriber_id)
    sms = await sms_store.erase_inbound(conn, subscriber_id, who.msisdn)
    payloads = await store.erase_event_payloads(conn, devices)
    recordings = await store.erase_recorded_messages(conn, subscriber_id)
    if recordings and recordings_dir is None:
        log.warning("erasure: %d recorded message rows deleted, but no recordings directory to delete their "
                    "files from (IIM_RECORDINGS_DIR unset)", len(recordings))
    files = await asyncio.to_thread(remove_recording_files, recordings_dir, recordings)
    links = await store.erase_account_links(conn, subscriber_id, actor)
    await store.flush_staged_audit(conn)
    tombstoned = await audit.tombstone(conn, tenant_id, await store.audit_rows_about(conn, who, devices),
                                       reason="erasure")
    await registry.delete(conn, registry.SUBSCRIBER, subscriber_id, actor=actor, correlation=correlation)
    # The delete's own audit row names the subscriber too: tombstoned with the rest.
    tombstoned += await audit.tombstone(conn, tenant_id, await store.audit_rows_about(conn, who, devices),
                                        reason="erasure")
    report = ErasureReport(subscriber_id=subscriber_id, sms_inbound_deleted=sms, event_payloads_erased=payloads,
                           devices=len(devices), audit_details_tombstoned=tombstoned,
                           recordings_deleted=len(recordings), recording_files_deleted=files,
                           account_links_revoked=links)
    await audit.append(conn, tenant_id, actor=actor, action="subscriber.erased", entity="subscriber",
                       entity_id=subscriber_id, detail=report.model_dump(mode="json", exclude={"subscriber_id"}),
                       correlation=correlation)
    return report
