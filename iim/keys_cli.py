"""``iim keys rotate|status``: key rotation from the command line (offline: straight to the database).

    iim keys rotate --master [--tenant T]    re-wrap the data keys (every tenant's by default) under
                                             IIM_MASTER_KEY_REF; the old master stays in
                                             IIM_MASTER_KEY_PREVIOUS_REFS until this has run
    iim keys rotate --tenant T [--tenant U]  a new data key for each tenant, then its rows re-sealed in batches
    iim keys rotate --all-tenants [--finish] every tenant; --finish: no new key, re-seal what is left
                                             (with IIM_LINK_TOKEN_KEY_REF given, account-link tokens still
                                             in the old format are re-sealed under the data key too)
    iim keys status [--tenant T]             data keys per tenant (id, master, created), never a key, and the
                                             tenant's rotation job (running, else the last; survives restarts)

A data-key rotation from here is a rotation job like the API's (``iim.key_rotation_job``, audited the same way):
when the tenant already has one running (a service's, or a command line's cut short), nothing new starts -- a
service resumes a cut job at its start, and ``--finish`` here takes it up too.

Exit codes: 0 done; 1 some rows did not open (logged, left as they were), or the job failed; 2 configuration
refused; 3 a rotation job of that tenant runs elsewhere (``iim keys status`` follows it).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from pathlib import Path
from uuid import UUID

from pydantic import ValidationError

from iim import logs
from iim.core.errors import ConfigError
from iim.core.secrets import resolve_secret
from iim.key_rotation import rewrap_master
from iim.keys import store as key_store
from iim.keys.keyring import Keyring, load_master_keys
from iim.keys_api import JobElsewhere, KeyRotations, RotateBody, RotationJob
from iim.linking.sealing import AesGcmSealer
from iim.settings import Settings
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx

__all__ = ["register_subcommands"]


def register_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="per-tenant data keys: rotate, status")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    rotate = actions.add_parser("rotate", help="re-wrap under a new master key, or rotate tenants' data keys")
    rotate.add_argument("--master", action="store_true", help="re-wrap every data key under the current master")
    rotate.add_argument("--tenant", action="append", type=UUID, default=[], help="a tenant id (repeatable)")
    rotate.add_argument("--all-tenants", action="store_true", help="every tenant")
    rotate.add_argument("--finish", action="store_true", help="no new data key: re-seal rows still on older ones")
    rotate.add_argument("--batch", type=int, default=500, help="rows per transaction (default 500)")
    rotate.add_argument("--actor", help="who rotates, for the audit log (default cli:<login>)")
    rotate.add_argument("--database-url", help="PostgreSQL URL (default IIM_DATABASE_URL, else embedded)")
    rotate.set_defaults(func=cmd_keys)
    status = actions.add_parser("status", help="each tenant's data keys (ids and master fingerprints)")
    status.add_argument("--tenant", action="append", type=UUID, default=[], help="a tenant id (default all)")
    status.add_argument("--database-url", help="PostgreSQL URL (default IIM_DATABASE_URL, else embedded)")
    status.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    logs.configure("WARNING")
    settings = Settings()
    try:
        return asyncio.run(_keys(args, settings))
    except ConfigError as exc:
        sys.stderr.write(f"iim keys: configuration refused: {exc}\n")
        return 2


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from policy_cache.bootstrap import bootstrap

    if args.keys_command == "rotate" and not (args.master or args.tenant or args.all_tenants):
        raise ConfigError("say what to rotate: --master, --tenant T or --all-tenants")
    master, previous = load_master_keys(settings.master_key_ref, settings.master_key_previous_refs,
                                        generated_file=Path(settings.data_dir).parent / "master.key")
    legacy = _legacy_link_key(settings)  # refused before the database is touched
    db = await bootstrap(database_url=args.database_url or settings.database_url, data_dir=settings.data_dir,
                         demo=settings.demo_data)
    async with (db, await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=2,
                                       command_timeout=settings.db_command_timeout_s,
                                       acquire_timeout=settings.db_acquire_timeout_s) as pool,
                await connect_pool(db.cache_url, role=DbRole.CACHE, min_size=1, max_size=1,
                                   command_timeout=settings.db_command_timeout_s) as cache_pool):
        every = await key_store.tenant_ids(cache_pool)
        tenants = every if (args.keys_command == "status" and not args.tenant) or getattr(
            args, "all_tenants", False) else list(args.tenant)
        unknown = [str(t) for t in tenants if t not in every]
        if unknown:
            raise ConfigError(f"no such tenant: {', '.join(unknown)}")
        keyring = Keyring(pool, master, previous=previous)
        if args.keys_command == "status":
            for tenant in tenants:
                async with tenant_tx(pool, tenant, readonly=True) as conn:
                    rows = await key_store.keys(conn)
                    job = await key_store.last_job(conn)
                print(json.dumps({"tenant_id": str(tenant), "keys": [
                    {"key_id": r["key_id"], "master_key_id": r["master_key_id"],
                     "current_master": r["master_key_id"] == master.key_id,
                     "created_at": r["created_at"].isoformat()} for r in rows],
                    "rotation": None if job is None else RotationJob.of(job).model_dump(mode="json")}))
            return 0
        actor = args.actor or f"cli:{getpass.getuser()}"
        failed = 0
        if args.master:  # re-wrapping only: the data keys and the rows stay as they are
            for tenant in tenants or every:
                done = await rewrap_master(pool, keyring, tenant, actor=actor)
                print(json.dumps({"tenant_id": str(tenant), "rewrapped": done.rewrapped, "unchanged": done.unchanged}))
            return 0
        try:
            body = RotateBody(finish=args.finish, batch=args.batch)
        except ValidationError as exc:
            raise ConfigError(f"--batch: {exc.errors()[0]['msg']}") from exc
        busy = 0
        async with KeyRotations(lambda: pool, lambda: keyring, lambda: legacy) as rotations:
            for tenant in tenants:
                ended = await _rotate(rotations, pool, tenant, body, actor=actor)
                if ended.state == "running":  # not ours to run: a service (or a cut command) holds it
                    busy += 1
                    print(json.dumps({"tenant_id": str(tenant), "job_id": str(ended.id), "state": "running",
                                      "running_since": ended.started_at.isoformat(), "started_by": ended.actor}))
                    continue
                failed += ended.unreadable + (ended.state == "failed")
                print(json.dumps({"tenant_id": str(tenant), "job_id": str(ended.id), "state": ended.state,
                                  "key_id": ended.key_id, "resealed": ended.resealed, "unreadable": ended.unreadable,
                                  **({"error": ended.error} if ended.error else {})}))
        return 1 if failed else 3 if busy else 0


async def _rotate(rotations: KeyRotations, pool: Pool, tenant: UUID, body: RotateBody, *,
                  actor: str) -> RotationJob:
    """Open the tenant's rotation job and run it here; a job already running is taken up only with ``--finish``
    (it re-seals, never makes a second key) and only when no service holds it. Returns the job as it ended, or
    as it runs elsewhere."""
    async with tenant_tx(pool, tenant) as conn:
        job, created = await rotations.open(conn, tenant, body, actor=actor)
    if created or body.finish:
        try:
            await rotations.run_once(tenant, job.id)
        except JobElsewhere:
            pass
    async with tenant_tx(pool, tenant, readonly=True) as conn:
        row = await key_store.last_job(conn)
    return job if row is None else RotationJob.of(row)


def _legacy_link_key(settings: Settings) -> AesGcmSealer | None:
    """The old link token key (``IIM_LINK_TOKEN_KEY_REF``), while it is given: account-link secrets still in the
    old format are re-sealed under the tenant's data key with the rest."""
    if settings.link_token_key_ref is None:
        return None
    try:
        return AesGcmSealer.from_secret(resolve_secret(settings.link_token_key_ref))
    except (LookupError, ValueError) as exc:
        raise ConfigError(f"IIM_LINK_TOKEN_KEY_REF: {exc}") from None
