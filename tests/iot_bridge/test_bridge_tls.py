"""TLS server context and client-certificate identity: unit checks plus one real handshake over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from iot_bridge.tls import ClientCertError, ClientIdentity, TenantCaRegistry, server_context
from tests.pki import (
    DAY,
    Issued,
    LoopbackPki,
    make_ca,
    make_client_cert,
    make_device_cert,
    make_expired_client_cert,
    make_loopback_pki,
    write_pem,
)

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def tenant_a() -> Issued:
    return make_ca("Tenant A CA")


@pytest.fixture(scope="module")
def tenant_b() -> Issued:
    return make_ca("Tenant B CA")


@pytest.fixture(scope="module")
def registry(tenant_a: Issued, tenant_b: Issued) -> TenantCaRegistry:
    registry = TenantCaRegistry()
    registry.add("tenant-a", tenant_a.cert_pem)
    registry.add("tenant-b", tenant_b.cert_pem)
    return registry


@pytest.fixture
def pki(tmp_path: Path) -> LoopbackPki:
    return make_loopback_pki(tmp_path)


# --- server_context -----------------------------------------------------------------------------------------

def test_server_context_without_client_cas_asks_for_no_certificate(pki: LoopbackPki) -> None:
    ctx = server_context(pki.server_files.cert, pki.server_files.key)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_with_cas_asks_for_but_does_not_require_a_certificate(pki: LoopbackPki) -> None:
    ctx = server_context(pki.server_files.cert, pki.server_files.key, client_ca_files=[pki.tenant_ca_file])
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_server_context_requiring_a_certificate_loads_every_ca_file(pki: LoopbackPki, tmp_path: Path) -> None:
    second = tmp_path / "tenant-b.crt"
    second.write_bytes(make_ca("Tenant B CA").cert_pem)
    ctx = server_context(pki.server_files.cert, pki.server_files.key, client_ca_files=[pki.tenant_ca_file, second],
                         require_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.cert_store_stats()["x509_ca"] == 2


def test_requiring_a_client_certificate_without_any_ca_is_a_value_error(pki: LoopbackPki) -> None:
    with pytest.raises(ValueError, match="CA"):
        server_context(pki.server_files.cert, pki.server_files.key, require_client_cert=True)


def test_tls12_negotiates_only_forward_secret_aead_suites(pki: LoopbackPki) -> None:
    ctx = server_context(pki.server_files.cert, pki.server_files.key)
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name) for name in tls12)


def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Drive both ends over memory BIOs until done; returns each side's SSL error reason (None = success)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    errors: dict[str, str | None] = {"client": None, "server": None}
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", cli), ("server", srv)):
            if done[side] or errors[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                errors[side] = exc.reason
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if (done["client"] or errors["client"]) and (done["server"] or errors["server"]):
            break
    return errors["client"], errors["server"]


def _tls11_client(pki: LoopbackPki) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=pki.server_ca_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.1 is deprecated: that is the point
        client.minimum_version = client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer TLS 1.1, so the server must refuse
    return client


def test_server_itself_refuses_a_tls11_client_hello(pki: LoopbackPki) -> None:
    server = server_context(pki.server_files.cert, pki.server_files.key)
    client_error, server_error = _memory_handshake(server, _tls11_client(pki))
    assert server_error == "UNSUPPORTED_PROTOCOL"
    assert client_error == "TLSV1_ALERT_PROTOCOL_VERSION"


# --- TenantCaRegistry ---------------------------------------------------------------------------------------

def test_device_certificate_identifies_tenant_kind_and_external_id(registry: TenantCaRegistry,
                                                                   tenant_a: Issued) -> None:
    cert = make_device_cert(tenant_a, "smoke-42")
    identity = registry.identify(cert.der, now=NOW)
    assert identity == ClientIdentity(tenant_id="tenant-a", kind="device", external_id="smoke-42",
                                      fingerprint=cert.cert.fingerprint(hashes.SHA256()).hex())


def test_gateway_certificate_identifies_a_gateway(registry: TenantCaRegistry, tenant_b: Issued) -> None:
    identity = registry.identify(make_device_cert(tenant_b, "hub-7", kind="gateway").der, now=NOW)
    assert (identity.tenant_id, identity.kind, identity.external_id) == ("tenant-b", "gateway", "hub-7")


def test_certificate_from_another_tenants_ca_names_that_other_tenant(registry: TenantCaRegistry,
                                                                     tenant_b: Issued) -> None:
    # Same device id, issued by tenant B: the caller compares tenant_id and refuses it for tenant A's device.
    assert registry.identify(make_device_cert(tenant_b, "smoke-42").der, now=NOW).tenant_id == "tenant-b"


def test_certificate_from_an_unknown_ca_is_refused(registry: TenantCaRegistry) -> None:
    with pytest.raises(ClientCertError, match="not issued by a registered"):
        registry.identify(make_device_cert(make_ca("Stranger CA"), "smoke-42").der, now=NOW)


def test_forged_ca_with_a_registered_name_but_another_key_is_refused(registry: TenantCaRegistry) -> None:
    impostor = make_ca("Tenant A CA")
    with pytest.raises(ClientCertError, match="not issued by a registered"):
        registry.identify(make_device_cert(impostor, "smoke-42").der, now=NOW)


def test_tenant_ca_rotation_keeps_both_cas_valid(tenant_a: Issued) -> None:
    registry = TenantCaRegistry()
    new_ca = make_ca("Tenant A CA")  # same name, new key: both must work during rotation
    registry.add("tenant-a", tenant_a.cert_pem + new_ca.cert_pem)
    assert registry.identify(make_device_cert(tenant_a, "old").der, now=NOW).tenant_id == "tenant-a"
    assert registry.identify(make_device_cert(new_ca, "new").der, now=NOW).tenant_id == "tenant-a"


def test_removed_tenant_certificates_are_refused(tenant_a: Issued, tenant_b: Issued) -> None:
    registry = TenantCaRegistry()
    registry.add("tenant-a", tenant_a.cert_pem)
    registry.add("tenant-b", tenant_b.cert_pem)
    registry.remove_tenant("tenant-a")
    with pytest.raises(ClientCertError):
        registry.identify(make_device_cert(tenant_a, "d").der, now=NOW)
    assert registry.identify(make_device_cert(tenant_b, "d").der, now=NOW).tenant_id == "tenant-b"


def test_the_same_ca_key_cannot_belong_to_two_tenants(tenant_a: Issued) -> None:
    registry = TenantCaRegistry()
    registry.add("tenant-a", tenant_a.cert_pem)
    registry.add("tenant-a", tenant_a.cert_pem)  # idempotent for the same tenant
    with pytest.raises(ValueError, match="another tenant"):
        registry.add("tenant-b", make_ca("Renamed", key=tenant_a.key).cert_pem)


def test_adding_a_leaf_or_garbage_as_ca_is_a_value_error(tenant_a: Issued) -> None:
    registry = TenantCaRegistry()
    with pytest.raises(ValueError, match="not a CA"):
        registry.add("tenant-a", make_device_cert(tenant_a, "d").cert_pem)
    with pytest.raises(ValueError):
        registry.add("tenant-a", b"garbage")


def test_expired_certificate_is_refused(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    with pytest.raises(ClientCertError, match="not valid at this time"):
        registry.identify(make_expired_client_cert(tenant_a, "urn:iim:device:d").der, now=NOW)


def test_not_yet_valid_certificate_is_refused(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    cert = make_device_cert(tenant_a, "d")
    with pytest.raises(ClientCertError, match="not valid"):
        registry.identify(cert.der, now=cert.cert.not_valid_before_utc - timedelta(seconds=1))


def test_certificate_from_an_expired_ca_is_refused() -> None:
    ca = make_ca("Old CA", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    registry = TenantCaRegistry()
    registry.add("t", ca.cert_pem)
    cert = make_client_cert(ca, "urn:iim:device:d", not_before=NOW - 5 * DAY, not_after=NOW + DAY)
    with pytest.raises(ClientCertError, match="CA not valid"):
        registry.identify(cert.der, now=NOW)


def test_naive_now_is_a_programming_error(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    with pytest.raises(ValueError, match="aware"):
        registry.identify(make_device_cert(tenant_a, "d").der, now=datetime(2026, 1, 1))  # noqa: DTZ001


@pytest.mark.parametrize(("uris", "reason"), [
    ((), "no subjectAltName"),
    (("https://example.com/device/1",), "found 0"),
    (("urn:iim:device:a", "urn:iim:device:b"), "found 2"),
    (("urn:iim:device:a", "urn:iim:gateway:a"), "found 2"),
    (("urn:iim:thermostat:a",), "must be"),
    (("urn:iim:device:",), "must be"),
    (("urn:iim:device:bad id",), "must be"),
    (("URN:IIM:DEVICE:a",), "must be"),
])
def test_certificate_without_exactly_one_valid_iim_uri_is_refused(registry: TenantCaRegistry, tenant_a: Issued,
                                                                  uris: tuple[str, ...], reason: str) -> None:
    with pytest.raises(ClientCertError, match=reason):
        registry.identify(make_client_cert(tenant_a, *uris).der, now=NOW)


def test_other_san_uris_next_to_the_iim_uri_are_ignored(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    cert = make_client_cert(tenant_a, "https://vendor.example/serial/1", "urn:iim:device:d-1")
    assert registry.identify(cert.der, now=NOW).external_id == "d-1"


def test_server_only_certificate_is_refused_as_client(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    cert = make_client_cert(tenant_a, "urn:iim:device:d", usage=ExtendedKeyUsageOID.SERVER_AUTH)
    with pytest.raises(ClientCertError, match="client authentication"):
        registry.identify(cert.der, now=NOW)


def test_certificate_without_extended_key_usage_is_accepted(registry: TenantCaRegistry, tenant_a: Issued) -> None:
    assert registry.identify(make_client_cert(tenant_a, "urn:iim:device:d", usage=None).der, now=NOW).kind == "device"


def test_ca_certificate_presented_as_client_is_refused(tenant_a: Issued) -> None:
    registry = TenantCaRegistry()
    registry.add("tenant-a", tenant_a.cert_pem)
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub_ca = (x509.CertificateBuilder().subject_name(tenant_a.cert.subject).issuer_name(tenant_a.cert.subject)
              .public_key(sub_key.public_key()).serial_number(1)
              .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:iim:device:d")]),
                             critical=False)
              .sign(tenant_a.key, hashes.SHA256()))
    with pytest.raises(ClientCertError, match="CA certificate"):
        registry.identify(sub_ca.public_bytes(Encoding.DER), now=NOW)


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x01", b"garbage" * 10])
def test_unparsable_certificate_is_a_client_cert_error(registry: TenantCaRegistry, der: bytes) -> None:
    with pytest.raises(ClientCertError):
        registry.identify(der, now=NOW)


# --- one real handshake over loopback -----------------------------------------------------------------------

@dataclass
class _Bridge:
    port: int
    seen: list[ClientIdentity | str] = field(default_factory=list)


@pytest.fixture
async def mtls_server(pki: LoopbackPki) -> AsyncIterator[_Bridge]:
    ctx = server_context(pki.server_files.cert, pki.server_files.key, client_ca_files=[pki.tenant_ca_file],
                         require_client_cert=True)
    registry = TenantCaRegistry()
    registry.add("tenant-a", pki.tenant_ca.cert_pem)
    bridge = _Bridge(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            identity = registry.identify(peer, now=datetime.now(UTC))
        except ClientCertError as exc:
            bridge.seen.append(exc.reason)
            writer.write(b"refused\n")
        else:
            bridge.seen.append(identity)
            writer.write(f"hello {identity.external_id}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    bridge.port = server.sockets[0].getsockname()[1]
    async with server:
        yield bridge


def _client(pki: LoopbackPki, tmp_path: Path, cert: Issued | None = None) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=pki.server_ca_file)
    if cert is not None:
        files = write_pem(tmp_path, "client", cert)
        client.load_cert_chain(files.cert, files.key)
    return client


async def _exchange(port: int, client: ssl.SSLContext) -> bytes:
    """Connect, read the greeting; errors after the TLS 1.3 handshake (a rejected certificate) read as b''."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost"), 5)
    try:
        return await asyncio.wait_for(reader.read(100), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_loopback_client_with_tenant_certificate_is_identified(mtls_server: _Bridge, pki: LoopbackPki,
                                                                     tmp_path: Path) -> None:
    client = _client(pki, tmp_path, make_device_cert(pki.tenant_ca, "smoke-42"))
    assert await _exchange(mtls_server.port, client) == b"hello smoke-42\n"
    [identity] = mtls_server.seen
    assert isinstance(identity, ClientIdentity)
    assert (identity.tenant_id, identity.external_id) == ("tenant-a", "smoke-42")


async def test_loopback_client_without_certificate_fails_the_handshake(mtls_server: _Bridge, pki: LoopbackPki,
                                                                       tmp_path: Path) -> None:
    for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = _client(pki, tmp_path)
        client.maximum_version = maximum
        try:
            greeting = await _exchange(mtls_server.port, client)
        except (ssl.SSLError, ConnectionError):
            greeting = b""  # TLS 1.2: the handshake itself fails
        assert greeting == b""
    assert mtls_server.seen == []  # the application never saw an unauthenticated connection


async def test_loopback_client_with_a_certificate_from_an_unknown_ca_fails_the_handshake(
        mtls_server: _Bridge, pki: LoopbackPki, tmp_path: Path) -> None:
    client = _client(pki, tmp_path, make_device_cert(make_ca("Stranger CA"), "smoke-42"))
    assert await _exchange(mtls_server.port, client) == b""
    assert mtls_server.seen == []


async def test_loopback_tls11_client_is_refused(mtls_server: _Bridge, pki: LoopbackPki, tmp_path: Path) -> None:
    client = _tls11_client(pki)
    files = write_pem(tmp_path, "client", make_device_cert(pki.tenant_ca, "d"))
    client.load_cert_chain(files.cert, files.key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _exchange(mtls_server.port, client)
    assert mtls_server.seen == []
