"""TLS for the device bridge: the server context, and mapping a client certificate to a tenant's device.

The TLS layer (OpenSSL) only proves that the client certificate chains to *some* loaded tenant CA.
:class:`TenantCaRegistry` then says *which* tenant issued it and which device or gateway it names, so the
caller can refuse a certificate from tenant A presented for a device of tenant B.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["ClientCertError", "ClientIdentity", "TenantCaRegistry", "server_context"]

#: Forward-secret AEAD suites for TLS 1.2 (TLS 1.3 suites are fixed by OpenSSL and all qualify).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_IIM_URI = re.compile(r"urn:iim:(device|gateway):([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})")


def server_context(cert_file: Path, key_file: Path, *, client_ca_files: Sequence[Path] = (),
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum (1.3 negotiated when offered), no compression, no renegotiation.

    Client certificates are asked for when ``client_ca_files`` are given and required with
    ``require_client_cert``. Every CA file is a trust anchor on its own (partial chains allowed), so a tenant
    may register an intermediate CA without its root.
    """
    if require_client_cert and not client_ca_files:
        raise ValueError("require_client_cert needs at least one client CA file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.load_cert_chain(cert_file, key_file)
    for ca_file in client_ca_files:
        ctx.load_verify_locations(cafile=ca_file)
    if client_ca_files:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who a client certificate names: ``fingerprint`` is the SHA-256 hex of its DER (for pinning/denylists)."""

    tenant_id: str
    kind: Literal["device", "gateway"]
    external_id: str
    fingerprint: str


class ClientCertError(Exception):
    """The certificate does not identify a device of any registered tenant; answer 401/403."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _TenantCa:
    tenant_id: str
    cert: x509.Certificate
    key_der: bytes


def _public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


class TenantCaRegistry:
    """The CAs each tenant uses to issue device and gateway certificates (several per tenant: rotation).

    A CA key belongs to exactly one tenant: adding the same key for a second tenant is refused, or a
    certificate could not be attributed.
    """

    def __init__(self) -> None:
        #: issuer name (DER) -> CAs with that subject.
        self._by_subject: dict[bytes, list[_TenantCa]] = {}

    def add(self, tenant_id: str, ca_pem: bytes) -> None:
        """Register every CA certificate in ``ca_pem`` for ``tenant_id``; ``ValueError`` if one is not a CA."""
        try:
            certs = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ValueError(f"not PEM certificates: {exc}") from None
        for cert in certs:
            if not _is_ca(cert):
                raise ValueError("certificate is not a CA (basicConstraints CA:TRUE missing)")
            key_der = _public_key_der(cert)
            for entries in self._by_subject.values():
                for entry in entries:
                    if entry.key_der == key_der and entry.tenant_id != tenant_id:
                        raise ValueError("this CA key is already registered for another tenant")
            entries = self._by_subject.setdefault(cert.subject.public_bytes(), [])
            if not any(entry.cert == cert for entry in entries):
                entries.append(_TenantCa(tenant_id, cert, key_der))

    def remove_tenant(self, tenant_id: str) -> None:
        """Forget all CAs of a tenant (offboarding, or before re-adding its current set)."""
        for subject in list(self._by_subject):
            kept = [entry for entry in self._by_subject[subject] if entry.tenant_id != tenant_id]
            if kept:
                self._by_subject[subject] = kept
            else:
                del self._by_subject[subject]

    def identify(self, peer_der: bytes, *, now: datetime) -> ClientIdentity:
        """The tenant, kind and external id named by a client certificate (DER, as from ``getpeercert(True)``).

        The issuer must be a registered CA that directly signed the certificate, both must be valid at ``now``
        (aware), the certificate must not be a CA, its extended key usage (if any) must allow client auth, and
        it must carry exactly one ``urn:iim:device:<id>`` or ``urn:iim:gateway:<id>`` SAN URI.
        """
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        try:
            cert = x509.load_der_x509_certificate(peer_der)
            issuer = cert.issuer.public_bytes()
            ca = self._issuer(cert, issuer)
            self._check_validity(cert, ca, now)
            kind, external_id = self._subject(cert)
        except (ValueError, UnsupportedAlgorithm) as exc:
            # Malformed encodings surface lazily (e.g. on reading extensions) as ValueError.
            raise ClientCertError(f"unusable certificate: {exc}") from None
        return ClientIdentity(tenant_id=ca.tenant_id, kind=kind, external_id=external_id,
                              fingerprint=hashlib.sha256(peer_der).hexdigest())

    def _issuer(self, cert: x509.Certificate, issuer: bytes) -> _TenantCa:
        for entry in self._by_subject.get(issuer, ()):
            try:
                cert.verify_directly_issued_by(entry.cert)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return entry
        raise ClientCertError("certificate not issued by a registered tenant CA")

    @staticmethod
    def _check_validity(cert: x509.Certificate, ca: _TenantCa, now: datetime) -> None:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ClientCertError("certificate not valid at this time")
        if not ca.cert.not_valid_before_utc <= now <= ca.cert.not_valid_after_utc:
            raise ClientCertError("issuing CA not valid at this time")

    @staticmethod
    def _subject(cert: x509.Certificate) -> tuple[Literal["device", "gateway"], str]:
        if _is_ca(cert):
            raise ClientCertError("a CA certificate cannot identify a device")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            pass
        else:
            if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
                raise ClientCertError("certificate is not for client authentication")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ClientCertError("certificate has no subjectAltName") from None
        ours = [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
                if uri.lower().startswith("urn:iim:")]
        if len(ours) != 1:
            raise ClientCertError(f"expected exactly one urn:iim: SAN URI, found {len(ours)}")
        match = _IIM_URI.fullmatch(ours[0])
        if match is None:
            raise ClientCertError("SAN URI must be urn:iim:device:<id> or urn:iim:gateway:<id>")
        return cast(Literal["device", "gateway"], match.group(1)), match.group(2)
