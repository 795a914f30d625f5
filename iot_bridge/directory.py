"""Who may post: devices and webhook sources of a tenant, with their verification keys.

Keys live in a secret store and are found through the device's ``credential_ref`` (``env:`` or ``file:``);
only the reference is in PostgreSQL. One reference may hold several keys (whitespace-separated secrets,
or concatenated PEM public keys) so a device can rotate without downtime. Lookups are cached briefly,
unknown devices included, so a flood of bogus device ids does not become a flood of queries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from cachetools import TTLCache

from iim.core.secrets import resolve_secret
from iot_bridge import store
from iot_bridge.intake import KnownDevice
from iot_bridge.signing import decode_secret, load_public_key
from policy_cache.db import Pool, tenant_tx

__all__ = ["DeviceDirectory", "DeviceKeys", "SourceKeys"]

log = logging.getLogger(__name__)

_PEM_RE = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A device and the keys its events may be signed with (HMAC secrets and/or JWS public keys)."""

    device: KnownDevice
    connector: str | None
    hmac_secrets: tuple[bytes, ...]
    jws_keys: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class SourceKeys:
    """An OEM or aggregator cloud posting webhooks for a tenant's devices."""

    source: str
    hmac_secrets: tuple[bytes, ...]


def _secrets(kind: str | None, ref: str | None) -> tuple[tuple[bytes, ...], tuple[Any, ...]]:
    if kind is None or ref is None:
        return (), ()
    try:
        value = resolve_secret(ref)
    except (LookupError, ValueError) as exc:
        log.warning("device key reference does not resolve: %s", exc)
        return (), ()
    try:
        if kind == "webhook_secret":
            return tuple(decode_secret(part) for part in value.split()), ()
        if kind == "signing_key":
            return (), tuple(load_public_key(pem) for pem in _PEM_RE.findall(value.encode()))
    except ValueError as exc:
        log.warning("device key reference holds an unusable key: %s", exc)
    return (), ()


class DeviceDirectory:
    def __init__(self, pool: Pool, *, ttl_s: float = 30.0, max_entries: int = 200_000) -> None:
        self._pool = pool
        self._devices: TTLCache[tuple[UUID, str], DeviceKeys | None] = TTLCache(max_entries, ttl_s)
        self._sources: TTLCache[tuple[UUID, str], SourceKeys | None] = TTLCache(10_000, ttl_s)

    def forget(self) -> None:
        """Drop cached keys (after a rotation, or in tests)."""
        self._devices.clear()
        self._sources.clear()

    async def device(self, tenant_id: UUID, external_id: str) -> DeviceKeys | None:
        key = (tenant_id, external_id)
        if key in self._devices:
            return self._devices[key]
        row = await store.event_device(self._pool, tenant_id, external_id)
        found = None
        if row is not None and row["enabled"]:
            hmac_secrets, jws_keys = _secrets(row["kind"], row["ref"])
            found = DeviceKeys(KnownDevice(tenant_id, row["id"], row["household_id"], row["external_id"], row["type"]),
                               row["connector"], hmac_secrets, jws_keys)
        self._devices[key] = found
        return found

    async def source(self, tenant_id: UUID, source: str) -> SourceKeys | None:
        key = (tenant_id, source)
        if key in self._sources:
            return self._sources[key]
        async with tenant_tx(self._pool, tenant_id, readonly=True) as conn:
            row = await store.credential_ref(conn, f"webhook:{source}")
        found = None
        if row is not None and row["kind"] == "webhook_secret":
            found = SourceKeys(source, _secrets(row["kind"], row["ref"])[0])
        self._sources[key] = found
        return found

    async def gateway_household(self, tenant_id: UUID, gateway_id: str) -> UUID | None:
        """The household of a hub that identified itself with a client certificate."""
        async with tenant_tx(self._pool, tenant_id, readonly=True) as conn:
            return await store.gateway_household(conn, gateway_id)
