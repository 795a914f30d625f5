"""Secret references: ``env:``/``file:`` built in, other schemes only through an installed resolver plug-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iim.core.secrets import SecretResolvers, UnresolvableReference, discover_resolvers, resolve_secret
from tests.secret_plugin import VaultResolver, install_entry_point


@pytest.fixture
def vault_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "vault.json"
    path.write_text(json.dumps({"kv/oem": {"token": "s3cret-token"}}))
    monkeypatch.setenv("IIM_TEST_VAULT_FILE", str(path))
    return path


def test_a_scheme_without_a_resolver_is_refused_saying_what_is_installed() -> None:
    resolvers = SecretResolvers({})
    for ref in ("vault:kv/oem#token", "kms:alias/iim"):
        with pytest.raises(UnresolvableReference, match=r"no resolver for secret reference scheme '(vault|kms)' is "
                                                        r"installed \(installed: env, file; plug-ins register"):
            resolvers.check(ref)
    with pytest.raises(UnresolvableReference, match="SCHEME:WHERE"):
        resolvers.check("no-scheme")


def test_check_all_names_every_unresolvable_setting_at_once() -> None:
    with pytest.raises(UnresolvableReference) as caught:
        SecretResolvers({}).check_all([("IIM_A_REF", "vault:x#y"), ("IIM_B_REF", "env:OK"), ("IIM_C_REF", "kms:k")])
    assert "IIM_A_REF: " in str(caught.value)
    assert "IIM_C_REF: " in str(caught.value)
    assert "IIM_B_REF" not in str(caught.value)


def test_a_resolver_registered_as_an_entry_point_is_discovered_and_resolves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vault_file: Path) -> None:
    install_entry_point(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found, errors = discover_resolvers()
    assert errors == {}
    assert isinstance(found["vault"], VaultResolver)
    resolvers = SecretResolvers()
    assert resolvers.schemes >= {"env", "file", "vault"}
    assert resolvers.resolve("vault:kv/oem#token") == "s3cret-token"
    assert resolve_secret("vault:kv/oem#token", resolvers=lambda: resolvers) == "s3cret-token"
    with pytest.raises(LookupError, match="does not resolve"):
        resolvers.resolve("vault:kv/oem#missing")


def test_a_plug_in_that_fails_to_load_refuses_only_its_own_scheme(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_point(tmp_path / "site", name="kms", target="tests.no_such_module:Resolver")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    resolvers = SecretResolvers()
    with pytest.raises(UnresolvableReference, match=r"resolver plug-in 'kms'.*failed to load: ModuleNotFoundError"):
        resolvers.check("kms:alias/iim")
    monkeypatch.setenv("IIM_TEST_SECRET", "still works")
    assert resolvers.resolve("env:IIM_TEST_SECRET") == "still works"


def test_env_and_file_references_resolve_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_TEST_SECRET", "from env")
    (tmp_path / "s").write_text("from file\n")
    assert resolve_secret("env:IIM_TEST_SECRET") == "from env"
    assert resolve_secret(f"file:{tmp_path / 's'}") == "from file"
    assert resolve_secret("env:IIM_TEST_UNSET", default="d") == "d"
