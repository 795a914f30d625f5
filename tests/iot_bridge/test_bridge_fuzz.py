"""A bounded hypothesis fuzz of every bridge input: headers and bodies, Standard Webhooks and JWS.

Against the real aiohttp app and real PostgreSQL, each example is one request; many are *validly signed* (with
the rig's device key, the device's JWS key or the cloud source's key) so that the fuzzed bodies get past the
signature to the parser, the schema, the rate limits and the intake. Whatever arrives: never a 5xx, every
refusal is problem+json, and the middleware's catch-all (a bug: ``internal-error``) is never reached. The
verifiers themselves are fuzzed too: they may raise only their own ``SignatureError``.

Bounded for CI (``max_examples``, ``deadline``): well under 30 s in all.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iot_bridge import signing
from iot_bridge.app import EVENTS, BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import CredentialKind, CredentialRefCreate, DeviceCreate, DeviceType
from tests.alarm_rig import AlarmRig, new_secret, secret_text
from tests.iot_bridge.test_bridge_http import rig

__all__ = ["rig"]

FUZZ = settings(max_examples=100, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass
class Target:
    client: TestClient[Any, Any]
    rig: AlarmRig
    source_secret: bytes


@pytest_asyncio.fixture
async def target(app_pool: Pool, rig: AlarmRig, tmp_path: Path) -> AsyncIterator[Target]:
    source_secret = new_secret()
    path = tmp_path / "acme.whsec"
    path.write_text(secret_text(source_secret))
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="webhook:acme", kind=CredentialKind.WEBHOOK_SECRET, ref=f"file:{path}"), actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=rig.household_id, name="acme smoke", type=DeviceType.SENSOR, external_id="acme-1",
            connector="acme", connector_ref="acme:1"), actor="test")
    limits = RateLimitSettings(device_rate=1e6, device_burst=10**6, source_rate=1e6, source_burst=10**6,
                               tenant_rate=1e6, tenant_burst=10**6)
    client: TestClient[Any, Any] = TestClient(TestServer(create_bridge_app(app_pool, BridgeConfig(rate_limits=limits))))
    await client.start_server()
    try:
        yield Target(client, rig, source_secret)
    finally:
        await client.close()


# -- strategies -------------------------------------------------------------------------------------------

_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                       max_size=300)
_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                 | st.text(max_size=50))
_JSON = st.recursive(_JSON_SCALARS, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=20)
_JSON_OBJECT = st.dictionaries(st.text(max_size=10), _JSON, max_size=5)
_TYPES = st.sampled_from(["smoke", "co", "water_leak", "doorbell", "cleared", "heartbeat", "battery_low", "x", ""])


@st.composite
def _events(draw: st.DrawFn, device: str) -> Any:
    """Mostly valid events with a fuzzed payload (to reach the intake), often one field fuzzed, sometimes a
    field added or removed, sometimes anything at all."""
    mode = draw(st.integers(0, 9))
    if mode == 0:
        return draw(_JSON)
    event: dict[str, Any] = {"event_id": draw(st.from_regex(r"\Aev-[a-z0-9]{1,20}\Z")), "device_id": device,
                             "type": draw(_TYPES.filter(bool).filter(lambda t: t != "x")),
                             "occurred_at": "2026-11-25T10:00:00+03:00", "payload": draw(_JSON_OBJECT)}
    if mode in (1, 2, 3):
        field = draw(st.sampled_from(list(event)))
        event[field] = draw(_JSON | st.text(max_size=140) | st.datetimes().map(lambda d: d.isoformat() + "Z"))
    elif mode == 4:
        event[draw(st.text(max_size=10))] = draw(_JSON)
    elif mode == 5:
        del event[draw(st.sampled_from(list(event)))]
    return event


def _mostly(value: str, fuzz: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``value`` three times in four, else ``fuzz``."""
    return st.integers(0, 3).flatmap(lambda n: fuzz if n == 3 else st.just(value))  # hypothesis favours 0


def _encode(value: Any, raw: bytes | None) -> bytes:
    return raw if raw is not None else json.dumps(value, allow_nan=False).encode()


_KEY = ec.generate_private_key(ec.SECP256R1())


# -- the properties ---------------------------------------------------------------------------------------

def _internal_errors() -> float:
    return EVENTS.labels("refused", "internal-error")._value.get()


async def _check(target: Target, path: str, body: bytes, headers: dict[str, str]) -> None:
    before = _internal_errors()
    async with target.client.post(path, data=body, headers=headers) as resp:
        text = await resp.read()
        assert resp.status < 500, (resp.status, text[:300])
        if resp.status >= 400:
            assert resp.headers["Content-Type"].startswith("application/problem+json"), text[:300]
            json.loads(text)
    assert _internal_errors() == before


@FUZZ
@given(data=st.data())
async def test_device_events_signed_or_not_never_get_a_server_error(target: Target, data: st.DataObject) -> None:
    rig = target.rig
    event = data.draw(_events(rig.sensor))
    body = _encode(event, data.draw(st.integers(0, 3).flatmap(
        lambda n: st.binary(max_size=600) if n == 3 else st.none())))
    headers = {"Content-Type": data.draw(st.sampled_from(["application/json"] * 3 + ["text/plain", "application/jose"])),
               "IIM-Tenant": data.draw(_mostly(str(rig.tenant_id), _HEADER_TEXT)),
               "IIM-Device": data.draw(_mostly(rig.sensor, _HEADER_TEXT))}
    if data.draw(st.integers(0, 3)) < 3:  # mostly validly signed: the body is what gets fuzzed
        headers |= rig.signed_headers(body, device=headers["IIM-Device"]) | {
            "Content-Type": headers["Content-Type"], "IIM-Tenant": headers["IIM-Tenant"]}
    else:
        headers |= {"webhook-id": data.draw(_HEADER_TEXT), "webhook-timestamp": data.draw(
            st.integers(-(2**64), 2**64).map(str) | _HEADER_TEXT), "webhook-signature": data.draw(
            st.lists(st.tuples(st.sampled_from(["v1", "v1a", "", "v2"]), _HEADER_TEXT), max_size=3).map(
                lambda parts: " ".join(f"{v},{s}" for v, s in parts)) | _HEADER_TEXT)}
    extra = data.draw(st.dictionaries(st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z"), _HEADER_TEXT, max_size=3))
    await _check(target, "/v1/events", body, extra | headers)


@FUZZ
@given(data=st.data())
async def test_jws_events_never_get_a_server_error(target: Target, data: st.DataObject) -> None:
    rig = target.rig
    headers = {"Content-Type": "application/jose", "IIM-Tenant": str(rig.tenant_id)}
    kind = data.draw(st.sampled_from(["signed", "signed", "header", "junk"]))
    if kind == "signed":  # a valid signature over fuzzed claims
        claims: dict[str, Any] = {"iat": data.draw(st.integers(0, 3).flatmap(
                                      lambda n: st.integers(-(2**40), 2**40) if n == 3 else st.just(int(time.time())))),
                                  "jti": data.draw(_mostly("jti-1", st.text(max_size=20))), "sub": rig.jws_sensor,
                                  "event": data.draw(_events(rig.jws_sensor))}
        if data.draw(st.integers(0, 3)) == 3:
            del claims[data.draw(st.sampled_from(list(claims)))]
        token = signing.sign_jws(claims, rig.jws_private, data.draw(_mostly(rig.jws_sensor, st.text(max_size=10))))
    elif kind == "header":  # a fuzzed protected header on a real token
        header = data.draw(_JSON | st.fixed_dictionaries({"alg": st.sampled_from(["ES256", "EdDSA", "none", "HS256"])
                                                                   | st.text(max_size=8), "kid": _HEADER_TEXT}))
        segment = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
        token = segment + b"." + rig.jws(json.loads(rig.event("co", device=rig.jws_sensor))).split(b".", 1)[1]
    else:
        token = data.draw(st.binary(max_size=400) | st.lists(st.binary(max_size=60), max_size=5).map(b".".join))
    await _check(target, "/v1/events", token, headers)


@FUZZ
@given(data=st.data())
async def test_cloud_webhooks_never_get_a_server_error(target: Target, data: st.DataObject) -> None:
    rig = target.rig
    source = data.draw(_mostly("acme", st.from_regex(r"\A[A-Za-z0-9_.%-]{1,30}\Z")))
    batch = data.draw(st.fixed_dictionaries({"source": _mostly("acme", st.text(max_size=10)),
                                             "events": st.lists(_events("acme-1"), min_size=1, max_size=4)}))
    body = _encode(batch, data.draw(st.integers(0, 3).flatmap(
        lambda n: st.binary(max_size=300) if n == 3 else st.none())))
    secret = target.source_secret if data.draw(st.integers(0, 3)) < 3 else new_secret()
    headers = rig.signed_headers(body, secret=secret)
    if data.draw(st.integers(0, 3)) == 3:
        headers["webhook-signature"] = data.draw(_HEADER_TEXT)
    await _check(target, f"/v1/webhooks/{source}", body, headers)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(headers=st.dictionaries(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "x"]),
                               _HEADER_TEXT, max_size=4),
       body=st.binary(max_size=100), token=st.binary(max_size=300))
def test_the_verifiers_raise_only_their_own_error(headers: dict[str, str], body: bytes, token: bytes) -> None:
    key = _KEY.public_key()
    for verify in (lambda: signing.verify_webhook(headers, body, [b"k" * 32], now=time.time()),
                   lambda: signing.verify_jws(token, {"d": key}, now=time.time())):
        try:
            verify()
        except signing.SignatureError:
            pass
