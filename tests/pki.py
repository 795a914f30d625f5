"""A throwaway PKI for TLS tests: CAs, a loopback server certificate, device/gateway client certificates.

EC P-256 keys throughout (fast to generate). Certificates carry the extensions strict verifiers expect
(basicConstraints, keyUsage, SKI/AKI, extendedKeyUsage), so OpenSSL accepts them as real ones would be.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key, in object and encoded forms."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


@dataclass(frozen=True)
class PemFiles:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IIM test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _window(not_before: datetime | None, not_after: datetime | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return not_before or now - DAY, not_after or now + 30 * DAY


def make_ca(common_name: str = "Tenant CA", *, key: ec.EllipticCurvePrivateKey | None = None,
            not_before: datetime | None = None, not_after: datetime | None = None) -> Issued:
    """A self-signed CA (pass ``key`` to make a second CA certificate for the same key)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def _leaf(ca: Issued, common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier | None,
          not_before: datetime | None, not_after: datetime | None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, not_after)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_server_cert(ca: Issued, *, hosts: tuple[str, ...] = ("localhost",),
                     ips: tuple[str, ...] = ("127.0.0.1",)) -> Issued:
    """A server certificate for loopback: SAN DNS names and IP addresses, EKU serverAuth."""
    san: list[x509.GeneralName] = [x509.DNSName(host) for host in hosts]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return _leaf(ca, hosts[0] if hosts else ips[0], san, ExtendedKeyUsageOID.SERVER_AUTH, None, None)


def make_client_cert(ca: Issued, *san_uris: str, not_before: datetime | None = None,
                     not_after: datetime | None = None,
                     usage: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.CLIENT_AUTH) -> Issued:
    """A client certificate naming ``san_uris`` (e.g. ``urn:iim:device:dev-1``); none gives no SAN at all."""
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in san_uris]
    return _leaf(ca, san_uris[0] if san_uris else "no-san", san, usage, not_before, not_after)


def make_device_cert(ca: Issued, external_id: str, *, kind: str = "device") -> Issued:
    return make_client_cert(ca, f"urn:iim:{kind}:{external_id}")


def make_expired_client_cert(ca: Issued, *san_uris: str) -> Issued:
    """Valid for one day, ten days ago."""
    now = datetime.now(UTC)
    return make_client_cert(ca, *san_uris, not_before=now - 11 * DAY, not_after=now - 10 * DAY)


def write_pem(directory: Path, name: str, issued: Issued) -> PemFiles:
    """``<name>.crt`` and ``<name>.key`` (PKCS#8, unencrypted) in ``directory``."""
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(issued.cert_pem)
    key_path.write_bytes(issued.key_pem)
    key_path.chmod(0o600)
    return PemFiles(cert_path, key_path)


@dataclass(frozen=True)
class LoopbackPki:
    """Everything a loopback mTLS test needs, written to disk."""

    server_ca: Issued
    tenant_ca: Issued
    server: Issued
    server_files: PemFiles
    server_ca_file: Path
    tenant_ca_file: Path


def make_loopback_pki(directory: Path, *, tenant_ca_name: str = "Tenant A CA") -> LoopbackPki:
    """A server CA and server certificate for localhost/127.0.0.1, plus a tenant CA for client certificates."""
    server_ca = make_ca("Bridge server CA")
    tenant_ca = make_ca(tenant_ca_name)
    server = make_server_cert(server_ca)
    server_files = write_pem(directory, "server", server)
    server_ca_file = directory / "server-ca.crt"
    server_ca_file.write_bytes(server_ca.cert_pem)
    tenant_ca_file = directory / "tenant-ca.crt"
    tenant_ca_file.write_bytes(tenant_ca.cert_pem)
    return LoopbackPki(server_ca, tenant_ca, server, server_files, server_ca_file, tenant_ca_file)


def make_named_client_cert(ca: Issued, common_name: str) -> Issued:
    """A client certificate known by its CN alone (an MQTT broker's ``use_identity_as_username``)."""
    return _leaf(ca, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, None, None)
