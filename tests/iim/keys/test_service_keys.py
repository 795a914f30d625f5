"""The service at start: secret references no installed resolver can read are refused (settings and registry
rows alike), and the keyring is built from the master key reference."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iim.core.envelope import MasterKey
from iim.core.errors import ConfigError
from iim.core.secrets import SecretResolvers, set_default_resolvers
from iim.keys.keyring import Keyring
from iim.service import DatabaseUrls, Service
from iim.settings import Settings, secret_references
from policy_cache import registry
from policy_cache.bootstrap import load_demo
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import CredentialKind, CredentialRefCreate
from tests.pg import PgDatabase, create_tenant
from tests.secret_plugin import VaultResolver


@pytest.fixture
async def urls(pg_db: PgDatabase, app_pool: Pool) -> DatabaseUrls:
    async with app_pool.acquire() as conn:
        await load_demo(conn)
    return DatabaseUrls(pg_db.app_url, pg_db.cache_url)


@pytest.fixture(autouse=True)
def fresh_resolvers() -> Iterator[None]:
    set_default_resolvers(None)
    yield
    set_default_resolvers(None)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"esl_port": 0, "http_port": 0, "bridge_port": 0, "data_dir": str(tmp_path / "pg"),
                              "bridge_enabled": False}
    values.update(overrides)
    return Settings(**values)


def test_every_secret_reference_of_the_settings_is_listed_for_the_start_check(tmp_path: Path) -> None:
    settings = _settings(tmp_path, master_key_ref="kms:alias/iim", master_key_previous_refs=["file:/old"],
                         connectors=[{"name": "a", "plugin": "webhook",
                                      "config": {"auth": {"token_ref": "vault:kv/a#t"}}}])
    refs = dict(secret_references(settings))
    assert refs["IIM_MASTER_KEY_REF"] == "kms:alias/iim"
    assert refs["IIM_MASTER_KEY_PREVIOUS_REFS[0]"] == "file:/old"
    assert refs["IIM_SMPP_PASSWORD_REF"] == "env:IIM_SMPP_PASSWORD"
    assert refs["IIM_CONNECTORS[0].config.auth.token_ref"] == "vault:kv/a#t"


async def test_a_settings_reference_without_a_resolver_stops_the_start(
        tmp_path: Path, urls: DatabaseUrls) -> None:
    service = Service(_settings(tmp_path, sms_hash_key_ref="kms:alias/sms-hash"), database=urls)
    with pytest.raises(ConfigError, match=r"IIM_SMS_HASH_KEY_REF: no resolver for secret reference scheme 'kms'"):
        await service.start()


async def test_a_registry_reference_without_a_resolver_stops_the_start_instead_of_being_left_unresolved(
        tmp_path: Path, urls: DatabaseUrls, app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="oem-token", kind=CredentialKind.OAUTH_TOKEN, ref="vault:kv/oem#token"), actor="test")
    with pytest.raises(ConfigError, match=r"credential references in the registry use vault: \(1 rows\) but no "
                                          r"resolver for vault is installed"):
        async with Service(_settings(tmp_path), database=urls):
            pass
    # With the plug-in installed the same registry starts (and the plug-in resolves the reference).
    (tmp_path / "vault.json").write_text(json.dumps({"kv/oem": {"token": "t0k3n"}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IIM_TEST_VAULT_FILE", str(tmp_path / "vault.json"))
        set_default_resolvers(SecretResolvers([VaultResolver()]))
        async with Service(_settings(tmp_path), database=urls) as service:
            assert service.running.policy is not None
            assert service.running.policy.keyring.master.key_id
        assert SecretResolvers([VaultResolver()]).resolve("vault:kv/oem#token") == "t0k3n"
    async with tenant_tx(app_pool, tenant) as conn:
        await conn.execute("DELETE FROM iim.credential_ref WHERE name = 'oem-token'")


async def test_an_instance_whose_master_cannot_unwrap_the_stored_data_keys_refuses_to_start(
        tmp_path: Path, urls: DatabaseUrls, app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool)
    other = Keyring(app_pool, MasterKey.from_bytes(b"\x05" * 32))  # the master the other instances use
    async with tenant_tx(app_pool, tenant) as conn:
        await other.active(conn, tenant)
    try:
        with pytest.raises(ConfigError, match=rf"wrapped by master key\(s\) {other.master.key_id} \(1 keys\) but "
                                              r"this instance has [0-9a-f]{16}: give IIM_MASTER_KEY_REF"):
            async with Service(_settings(tmp_path), database=urls):  # no reference: its own generated key
                pass
    finally:
        await admin_conn.execute("DELETE FROM iim.tenant_data_key WHERE tenant_id = $1", tenant)
