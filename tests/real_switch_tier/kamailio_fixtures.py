"""Fixture helpers shared by the Kamailio modules: speakers in IIM's registry and the edge's database role."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from policy_cache import registry
from policy_cache.bootstrap import scram_verifier, with_url
from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceCreate, DeviceType, HouseholdCreate
from tests.kamailio_edge import DOMAIN, ha1
from tests.pg import PgCluster, PgDatabase, create_tenant, run_sync


@dataclass(frozen=True)
class Speaker:
    user: str
    password: str


SPEAKER = Speaker("kitchen", "Kitchen-Secret-1")
CALLER = Speaker("hallway", "Hallway-Secret-2")  # places calls from 127.0.0.3 in the flood test


def kamailio_db_url(cluster: PgCluster, db: PgDatabase, tcp_port: int) -> str:
    """Kamailio's URL: the migration's login role, this run's password, the TCP bridge's port."""
    url = with_url(cluster.admin_url, user="iim_kamailio", password=cluster.role_password, database=db.name)
    userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
    return f"postgres://{userinfo}@127.0.0.1:{tcp_port}/{db.name}"


async def _grant_edge_login(cluster: PgCluster, db: PgDatabase) -> None:
    import asyncpg

    admin = await asyncpg.connect(db.admin_url)
    try:
        verifier = scram_verifier(cluster.role_password)
        for role in ("iim_kamailio", "iim_registrar"):  # credentials (read-only) and registrations (usrloc)
            await admin.execute(f"ALTER ROLE {role} PASSWORD '{verifier}'")
    finally:
        await admin.close()


def grant_edge_login(cluster: PgCluster, db: PgDatabase) -> None:
    """The edge's database roles get this run's password (an operator's ALTER ROLE ... PASSWORD)."""
    run_sync(_grant_edge_login(cluster, db))


async def _provision(cluster: PgCluster, db: PgDatabase, speakers: tuple[Speaker, ...]) -> UUID:
    await _grant_edge_login(cluster, db)
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=2)
    try:
        tenant = await create_tenant(pool, "kamailio-edge")
        async with tenant_tx(pool, tenant) as conn:
            home = await registry.create(conn, registry.HOUSEHOLD,
                                         HouseholdCreate(name="home", time_zone="Europe/Moscow"), actor="test")
            for speaker in speakers:
                await registry.create(conn, registry.DEVICE, DeviceCreate(
                    household_id=home.id, name=speaker.user, type=DeviceType.SPEAKER,
                    capabilities=frozenset({DeviceCapability.SIP, DeviceCapability.WEBRTC}),
                    sip_uri=f"sip:{speaker.user}@{DOMAIN}",
                    sip_ha1=ha1(speaker.user, DOMAIN, speaker.password)), actor="test")
        return tenant
    finally:
        await pool.close()


def provision_speakers(cluster: PgCluster, db: PgDatabase, *speakers: Speaker) -> UUID:
    """Speakers with SIP credentials, created through IIM's registry (as an operator would)."""
    return run_sync(_provision(cluster, db, speakers or (SPEAKER, CALLER)))
