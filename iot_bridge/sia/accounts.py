"""Which tenant and device an account number speaks for, and its AES key (resolved from its reference).

An account is taken only when exactly one enabled account in all tenants has the number, its receiver and
line prefixes (where the registry sets them) are the frame's, and its device is enabled; anything else is
"unknown" (DUH), with the reason in the log. A key reference that does not resolve to 16, 24 or 32 bytes of
hex makes the account unusable until it is fixed (logged), rather than silently taking plain messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from iim.core.secrets import resolve_secret
from iot_bridge.intake import KnownDevice
from iot_bridge.sia import store
from iot_bridge.sia.codec import Frame
from policy_cache.db import Pool

__all__ = ["AccountUnusable", "SiaAccount", "find_account", "read_key"]

log = logging.getLogger(__name__)


class AccountUnusable(Exception):
    """No account to take this frame (``reason`` goes to the log, never to the sender)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SiaAccount:
    account: str
    device: KnownDevice
    key: bytes | None


def read_key(ref: str) -> bytes:
    """The AES key behind ``ref``: 32, 48 or 64 hex digits.

    Raises:
        ValueError: the reference does not resolve or holds no AES key (the message never holds the value).
    """
    try:
        text = resolve_secret(ref).strip()
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{ref} does not hold a hex AES key") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"{ref} holds {len(key)} bytes, not an AES-128/192/256 key")
    return key


async def find_account(pool: Pool, frame: Frame) -> SiaAccount:
    """The account ``frame`` is sent under.

    Raises:
        AccountUnusable: no account, several tenants, wrong receiver/line, disabled, or a key that cannot be read.
    """
    if frame.account is None:
        raise AccountUnusable("the frame names no account")
    rows = [row for row in await store.account_matches(pool, frame.account)
            if row["receiver"] in (None, frame.receiver) and row["line"] in (None, frame.line)]
    if not rows:
        raise AccountUnusable(f"no account {frame.account} for receiver {frame.receiver} line {frame.line}")
    if len(rows) > 1:
        log.warning("SIA account %s is held by %d tenants; refused until only one holds it", frame.account,
                    len(rows))
        raise AccountUnusable("account held by several tenants")
    row = rows[0]
    if not row["enabled"] or not row["device_enabled"]:
        raise AccountUnusable(f"account {frame.account} or its device is disabled")
    key = None
    if row["key_ref"] is not None:
        try:
            key = read_key(row["key_ref"])
        except ValueError as exc:
            log.error("SIA account %s: its key cannot be used: %s", frame.account, exc)
            raise AccountUnusable("the account's key cannot be read") from None
    device = KnownDevice(row["tenant_id"], row["device_id"], row["household_id"], row["external_id"], row["type"])
    return SiaAccount(frame.account, device, key)
