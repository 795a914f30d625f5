"""PostgreSQL side of the policy cache: rows in, compiled snapshots out, changes by sequence.

``PgPolicyStore`` implements :class:`policy_cache.cache.PolicyStore` on a connection of
the ``iim_cache`` role (reads every tenant's routing tables, nothing else) and a
second connection that LISTENs on ``iim_policy``. asyncpg's connection errors are
mapped to :class:`PolicyStoreUnavailable` here, at the layer boundary, so the cache
only has to know that PostgreSQL is away, not how it went away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime, time
from uuid import UUID

import asyncpg

from policy_cache.cache import PolicyStoreUnavailable
from policy_cache.db import DbRole, connect
from policy_cache.errors import ChangeLogTruncatedError
from policy_cache.models import ConsentPurpose, DeviceCapability, DeviceStatus
from policy_cache.repository import RoutingDevice, RoutingRow, changes_since, load_routing_rows
from policy_cache.snapshot import RoutingSnapshot, SpeakerDevice, compile_snapshot

CHANNEL = "iim_policy"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, cannot connect now
)

_SIP = frozenset({DeviceCapability.SIP, DeviceCapability.WEBRTC})


@contextlib.contextmanager
def unavailable_as_store_error() -> Iterator[None]:
    """Map PostgreSQL being away (not SQL mistakes) to PolicyStoreUnavailable."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise PolicyStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _minutes(value: time | None) -> int | None:
    return None if value is None else value.hour * 60 + value.minute


def snapshot_from_row(row: RoutingRow, now: datetime, speakers_cache: dict[object, tuple[SpeakerDevice, ...]]
                      ) -> RoutingSnapshot:
    """Compile one subscriber's routing row; devices of a household are compiled once and shared."""
    primary = row.primary
    household = primary.household if primary else None
    policy = row.policy
    speakers: list[SpeakerDevice] = []
    seen: set[str] = set()
    for binding in row.bindings:
        key = (binding.household.id, binding.device_id, binding.household.devices)
        compiled = speakers_cache.get(key)
        if compiled is None:
            compiled = speakers_cache[key] = tuple(_speakers(binding.devices))
        for device in compiled:
            if device.device_id not in seen:
                seen.add(device.device_id)
                speakers.append(device)
    consent = row.consent(ConsentPurpose.ANNOUNCE_CALLS, now)
    return compile_snapshot(
        subscriber_id=str(row.subscriber_id),
        tenant_id=str(row.tenant_id),
        msisdn=row.msisdn,
        aor=row.sip_aor.removeprefix("sip:") if row.sip_aor else None,
        time_zone=household.time_zone if household else "UTC",
        ring_mode=policy.ring_mode.value if policy else "phone_only",
        phone_timeout_s=policy.phone_timeout_s if policy else 20,
        home_timeout_s=policy.home_timeout_s if policy else 20,
        quiet_start_min=_minutes(policy.quiet_start) if policy else None,
        quiet_end_min=_minutes(policy.quiet_end) if policy else None,
        dnd=policy.dnd if policy else False,
        allowed_callers=list(policy.allowed_callers) if policy else None,
        blocked_callers=list(policy.blocked_callers) if policy else None,
        presence=household.presence.value if household else "unknown",
        home_only_when_present=policy.home_only_when_present if policy else False,
        announce_consent=consent is not None,
        announce_consent_expires=consent.expires_at.timestamp() if consent and consent.expires_at else None,
        fallback=policy.fallback.value if policy else "none",
        speakers=tuple(speakers),
        policy_version=policy.version if policy else 0,
        household_id=str(household.id) if household else None,
    )


def _speakers(devices: Iterable[RoutingDevice]) -> Iterator[SpeakerDevice]:
    for device in devices:
        caps = device.capabilities
        sip = bool(caps & _SIP) and device.sip_uri is not None
        announce = DeviceCapability.CLOUD_ANNOUNCE in caps and device.connector is not None
        if not (sip or announce):
            continue  # sensors, wearables: they raise events, they do not ring
        if sip and device.sip_uri is not None:
            endpoint = device.sip_uri.removeprefix("sip:")
        else:
            endpoint = f"{device.connector}:{device.connector_ref}"
        yield SpeakerDevice(
            device_id=str(device.id),
            endpoint=endpoint,
            sip=sip,
            cloud_announce=announce,
            # "unknown" rings: FreeSWITCH answers USER_NOT_REGISTERED at once if it is not there.
            online=device.status is not DeviceStatus.OFFLINE,
            name=device.vendor or "",
        )


class _ListenFeed:
    """LISTEN iim_policy on a dedicated connection; ``wait`` raises once the connection is gone."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._event = asyncio.Event()
        self._lost = False

    async def start(self) -> None:
        self._conn.add_termination_listener(self._on_terminated)
        with unavailable_as_store_error():
            await self._conn.add_listener(CHANNEL, self._on_notify)

    def _on_notify(self, *_args: object) -> None:
        self._event.set()

    def _on_terminated(self, *_args: object) -> None:
        self._lost = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
        if self._lost or self._conn.is_closed():
            raise PolicyStoreUnavailable("change listener connection lost")

    async def close(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()


class PgPolicyStore:
    """The cache's view of PostgreSQL (``iim_cache`` role DSN)."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, command_timeout: float = 30.0) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            with unavailable_as_store_error():
                conn = await connect(self._dsn, role=DbRole.CACHE, timeout=self._connect_timeout,
                                     command_timeout=self._command_timeout)
            self._conn = conn
        return conn

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None

    async def _compile(self, stream: AsyncIterator[RoutingRow]) -> list[RoutingSnapshot]:
        now = datetime.now(UTC)
        speakers: dict[object, tuple[SpeakerDevice, ...]] = {}
        return [snapshot_from_row(row, now, speakers) async for row in stream]

    async def load_all(self) -> tuple[list[RoutingSnapshot], int]:
        conn = await self._connection()
        with unavailable_as_store_error():
            stream = load_routing_rows(conn)
            snapshots = await self._compile(aiter(stream))
        assert stream.watermark is not None
        return snapshots, stream.watermark

    async def load_subscribers(self, subscriber_ids: Iterable[str]) -> list[RoutingSnapshot]:
        ids = [UUID(s) for s in subscriber_ids]
        if not ids:
            return []
        conn = await self._connection()
        with unavailable_as_store_error():
            return await self._compile(aiter(load_routing_rows(conn, subscriber_ids=ids)))

    async def changes_since(self, seq: int) -> tuple[set[str], int]:
        conn = await self._connection()
        with unavailable_as_store_error():
            changed, new_seq = await changes_since(conn, seq)
        return {str(u) for u in changed}, new_seq

    async def find_subscriber_ids(self, number: str) -> list[str]:
        """Subscribers (of any tenant) with this MSISDN (with or without ``+``) or SIP AoR."""
        digits = number.removeprefix("+")
        conn = await self._connection()
        with unavailable_as_store_error():
            rows = await conn.fetch(
                "SELECT id FROM iim.subscriber WHERE msisdn = ANY($1::text[]) OR sip_aor = ANY($1::text[])",
                [number, "+" + digits, digits, "sip:" + number.removeprefix("sip:")])
        return [str(r["id"]) for r in rows]

    async def listen(self) -> _ListenFeed:
        with unavailable_as_store_error():
            conn = await connect(self._dsn, role=DbRole.CACHE, timeout=self._connect_timeout)
        feed = _ListenFeed(conn)
        await feed.start()
        return feed


__all__ = ["ChangeLogTruncatedError", "PgPolicyStore", "snapshot_from_row", "unavailable_as_store_error"]
