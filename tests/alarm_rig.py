"""A household with contacts and signed devices, for the device-bridge and scenario tests.

Keys are real: an HMAC secret in a 0600 file and an EC P-256 key pair, referenced from the registry by
``credential_ref`` (``file:``) exactly as an operator would configure them.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iot_bridge.signing import sign_jws, sign_webhook
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
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
    HouseholdCreate,
    PresenceState,
    SubscriberCreate,
    TenantCreate,
)


@dataclass
class AlarmRig:
    tenant_id: UUID
    household_id: UUID
    sensor_id: UUID
    sensor: str
    jws_sensor: str
    doorphone: str
    hub: str
    owner: str
    backup: str
    security: str
    secret: bytes
    secret_file: Path
    jws_private: ec.EllipticCurvePrivateKey
    extra: dict[str, Any] = field(default_factory=dict)

    def event(self, event_type: str = "smoke", *, event_id: str | None = None, device: str | None = None,
              payload: dict[str, Any] | None = None) -> bytes:
        return json.dumps({"event_id": event_id or f"ev-{uuid4().hex[:16]}", "device_id": device or self.sensor,
                           "type": event_type, "occurred_at": "2026-11-25T10:00:00+03:00",
                           "payload": payload or {"ppm": 412}}).encode()

    def signed_headers(self, body: bytes, *, device: str | None = None, ts: int | None = None,
                       msg_id: str | None = None, secret: bytes | None = None) -> dict[str, str]:
        ts = int(time.time()) if ts is None else ts
        msg_id = msg_id or f"msg_{uuid4().hex}"
        return {"Content-Type": "application/json", "IIM-Tenant": str(self.tenant_id),
                "IIM-Device": device or self.sensor, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                "webhook-signature": sign_webhook(msg_id, ts, body, secret or self.secret)}

    def jws(self, event: dict[str, Any], *, iat: int | None = None, key: Any = None,
            kid: str | None = None) -> bytes:
        claims = {"iat": int(time.time()) if iat is None else iat, "jti": f"jti-{uuid4().hex}",
                  "sub": kid or self.jws_sensor, "event": event}
        return sign_jws(claims, key or self.jws_private, kid or self.jws_sensor)


#: What a household consents to by default here: everything its scenarios may do (iim.scenarios.consent).
SCENARIO_CONSENTS = (ConsentPurpose.HEALTH_EVENTS, ConsentPurpose.CALL_RECORDING, ConsentPurpose.EMERGENCY_ESCALATION)


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def secret_text(secret: bytes) -> str:
    return "whsec_" + base64.b64encode(secret).decode()


async def build_rig(pool: Pool, tmp: Path, *, name: str = "alarm", tenant_id: UUID | None = None,
                    owner: str = "+79001110001", backup: str = "+79001110002",
                    security: str = "+79001110003",
                    consents: Sequence[ConsentPurpose] = SCENARIO_CONSENTS) -> AlarmRig:
    """Tenant, household (Europe/Moscow), owner/backup/security contacts, a smoke sensor (HMAC), a CO
    sensor signing JWS, a doorphone, a hub and a SIP speaker; the owner holds ``consents``."""
    tenant_id = tenant_id or uuid4()
    secret = new_secret()
    secret_file = tmp / f"{name}-{tenant_id.hex[:8]}.whsec"
    secret_file.write_text(secret_text(secret))
    secret_file.chmod(0o600)
    private = ec.generate_private_key(ec.SECP256R1())
    pem_file = tmp / f"{name}-{tenant_id.hex[:8]}.pub.pem"
    pem_file.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    suffix = tenant_id.hex[:6]
    async with tenant_tx(pool, tenant_id) as conn:
        await registry.create(conn, registry.TENANT, TenantCreate(name=name), actor="test")
        hh = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="Flat 12", time_zone="Europe/Moscow",
                                                                             presence=PresenceState.AWAY), actor="test")
        hmac_ref = await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="sensor-hmac", kind=CredentialKind.WEBHOOK_SECRET, ref=f"file:{secret_file}"), actor="test")
        jws_ref = await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="sensor-jws", kind=CredentialKind.SIGNING_KEY, ref=f"file:{pem_file}"), actor="test")
        sensor = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Kitchen smoke sensor", type=DeviceType.SENSOR, external_id=f"smoke-{suffix}",
            credential_ref_id=hmac_ref.id, status=DeviceStatus.ONLINE), actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Hall CO sensor", type=DeviceType.SENSOR, external_id=f"co-{suffix}",
            credential_ref_id=jws_ref.id, status=DeviceStatus.ONLINE), actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Front door", type=DeviceType.DOORPHONE, external_id=f"door-{suffix}",
            credential_ref_id=hmac_ref.id, sip_uri=f"sip:door-{suffix}@iim.local",
            capabilities=frozenset({DeviceCapability.SIP}), status=DeviceStatus.ONLINE), actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Hub", type=DeviceType.HUB, external_id=f"hub-{suffix}",
            credential_ref_id=hmac_ref.id, status=DeviceStatus.ONLINE), actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Kitchen speaker", type=DeviceType.SPEAKER,
            sip_uri=f"sip:speaker-{suffix}@iim.local", capabilities=frozenset({DeviceCapability.SIP}),
            status=DeviceStatus.ONLINE), actor="test")
        for msisdn, role, prio in ((owner, BindingRole.OWNER, 10), (backup, BindingRole.BACKUP_CONTACT, 20),
                                   (security, BindingRole.SECURITY_SERVICE, 30)):
            sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), actor="test")
            await registry.create(
                conn, registry.BINDING,
                BindingCreate(subscriber_id=sub.id, household_id=hh.id, role=role,
                              priority=prio), actor="test")
            if role is BindingRole.OWNER:  # the household consents to what its scenarios do
                for purpose in consents:
                    await registry.create(conn, registry.CONSENT, ConsentCreate(
                        subscriber_id=sub.id, purpose=purpose, evidence={"channel": "test"}), actor="test")
    return AlarmRig(tenant_id=tenant_id, household_id=hh.id, sensor_id=sensor.id, sensor=f"smoke-{suffix}",
                    jws_sensor=f"co-{suffix}", doorphone=f"door-{suffix}", hub=f"hub-{suffix}", owner=owner,
                    backup=backup, security=security, secret=secret, secret_file=secret_file, jws_private=private)
