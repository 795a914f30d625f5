"""Who may post: devices and webhook sources of a tenant, with their verification keys.

Keys live in a secret store and are found through the device's ``credential_ref`` (``env:`` or ``file:``);
only the reference is in PostgreSQL. One reference may hold several keys (whitespace-separated secrets,
or concatenated PEM public keys) so a device can rotate without downtime. Lookups are cached briefly,
unknown devices included, so a flood of bogus device ids does not become a flood of queries.

A revoked key or a disabled device must stop working at once, not when its entry expires: followed by a
:class:`KeyChanges` feed (``NOTIFY iim_bridge_keys``, migration 0018), the directory drops an entry as soon as
its device or key reference changes, and caches nothing while the feed is down (changes sent then are lost).
The time limit stays for what PostgreSQL cannot announce: the key material behind a reference (a file
rewritten in place).
"""

from __future__ import annotations

import json
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
from policy_cache.notifications import ChannelListener

__all__ = ["KEYS_CHANNEL", "DeviceDirectory", "DeviceKeys", "KeyChanges", "SourceKeys"]

#: Sent on commit by iim.tg_bridge_keys: ``{"tenant": uuid, "device": external_id}`` or ``{..., "credential": name}``.
KEYS_CHANNEL = "iim_bridge_keys"

log = logging.getLogger(__name__)

_PEM_RE = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)
#: What the registry can hold: an external id is 1..200 characters of text (no NUL: PostgreSQL text cannot
#: hold it, and the query would fail instead of finding nothing); a source names the credential reference
#: ``webhook:<source>``, whose names are checked by this pattern in the schema (migration 0002).
_MAX_EXTERNAL_ID = 200
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


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
    """Devices and sources by tenant, cached. ``followed``: entries are kept only while a :class:`KeyChanges`
    feed is up (until then, and while it is down, every lookup reads PostgreSQL)."""

    def __init__(self, pool: Pool, *, ttl_s: float = 30.0, max_entries: int = 200_000,
                 followed: bool = False) -> None:
        self._pool = pool
        self._devices: TTLCache[tuple[UUID, str], DeviceKeys | None] = TTLCache(max_entries, ttl_s)
        self._sources: TTLCache[tuple[UUID, str], SourceKeys | None] = TTLCache(10_000, ttl_s)
        self._caching = not followed
        # Bumped by every change: a lookup that read the row before a change must not cache what it read.
        self._generation = 0

    def forget(self) -> None:
        """Drop cached keys (after a rotation, or in tests)."""
        self._generation += 1
        self._devices.clear()
        self._sources.clear()

    def feed_up(self) -> None:
        """The change feed listens (again): what was cached before may have missed changes."""
        self.forget()
        self._caching = True

    def feed_down(self) -> None:
        """The change feed is lost: trust nothing cached until it is back."""
        self._caching = False
        self.forget()

    def changed(self, payload: str) -> None:
        """A ``KEYS_CHANNEL`` notification: drop the device's entry, or every entry of the tenant when a key
        reference changed (any device may use it). A payload that cannot be read drops everything."""
        self._generation += 1
        try:
            change = json.loads(payload)
            tenant = UUID(change["tenant"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable key change notification; dropping every cached key")
            self.forget()
            return
        device = change.get("device")
        if isinstance(device, str):
            self._devices.pop((tenant, device), None)
            return
        for cache in (self._devices, self._sources):
            for key in [k for k in cache if k[0] == tenant]:
                cache.pop(key, None)

    async def device(self, tenant_id: UUID, external_id: str) -> DeviceKeys | None:
        """The device posting as ``external_id`` (from a header or a JWS ``kid``: anything), or None."""
        if not 0 < len(external_id) <= _MAX_EXTERNAL_ID or "\x00" in external_id:
            return None  # no device can have that id
        key = (tenant_id, external_id)
        if key in self._devices:
            return self._devices[key]
        generation = self._generation
        row = await store.event_device(self._pool, tenant_id, external_id)
        found = None
        if row is not None and row["enabled"]:
            hmac_secrets, jws_keys = _secrets(row["kind"], row["ref"])
            found = DeviceKeys(KnownDevice(tenant_id, row["id"], row["household_id"], row["external_id"], row["type"]),
                               row["connector"], hmac_secrets, jws_keys)
        if self._caching and generation == self._generation:
            self._devices[key] = found
        return found

    async def source(self, tenant_id: UUID, source: str) -> SourceKeys | None:
        """The cloud posting as ``source`` (a URL path segment: anything), or None."""
        if not _CREDENTIAL_NAME.fullmatch(f"webhook:{source}"):
            return None  # no credential reference can have that name
        key = (tenant_id, source)
        if key in self._sources:
            return self._sources[key]
        generation = self._generation
        async with tenant_tx(self._pool, tenant_id, readonly=True) as conn:
            row = await store.credential_ref(conn, f"webhook:{source}")
        found = None
        if row is not None and row["kind"] == "webhook_secret":
            found = SourceKeys(source, _secrets(row["kind"], row["ref"])[0])
        if self._caching and generation == self._generation:
            self._sources[key] = found
        return found

    async def gateway_household(self, tenant_id: UUID, gateway_id: str) -> UUID | None:
        """The household of a hub that identified itself with a client certificate."""
        async with tenant_tx(self._pool, tenant_id, readonly=True) as conn:
            return await store.gateway_household(conn, gateway_id)


class KeyChanges(ChannelListener):
    """Follows ``KEYS_CHANNEL`` for a directory (on a dedicated ``iim_app`` connection to ``dsn``)."""

    def __init__(self, directory: DeviceDirectory, dsn: str, *, check_interval: float = 10.0) -> None:
        super().__init__(dsn, KEYS_CHANNEL, directory.changed, on_up=directory.feed_up, on_down=directory.feed_down,
                         check_interval=check_interval)
