"""The webhook connector against a real HTTP vendor peer: signing, auth, retries, breaker, user actions."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from pydantic import ValidationError

from iim.connectors.contract import (
    ConnectorContext,
    ConnectorError,
    ConnectorUnavailable,
    Notification,
    TtsDelivery,
    UserActionRequest,
    UserActionResult,
)
from iim.connectors.http import CALLBACK_PREFIX, connector_callback_app
from iim.connectors.registry import ConnectorRegistry
from iim.connectors.webhook import WebhookConfig, WebhookConnector
from iim.core.metrics import REGISTRY
from iim.core.secrets import resolve_secret
from iim.core.signing import verify_webhook
from tests.connector_peer import (
    CLIENT_ID,
    CLIENT_SECRET,
    SIGNING_SECRET,
    SIGNING_SECRET_TEXT,
    STATIC_TOKEN,
    StepClock,
    VendorPeer,
    serve,
)

NOTE = Notification(target="speaker-1", title="SMS", text="Привет", correlation={"sms_id": "s1"})
Make = Callable[..., Awaitable[WebhookConnector]]


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)


@pytest.fixture
async def peer() -> AsyncIterator[VendorPeer]:
    vendor = VendorPeer()
    runner, vendor.url = await serve(vendor.app())
    yield vendor
    await vendor.close()
    await runner.cleanup()


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


def _config(peer: VendorPeer, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "base_url": peer.url,
        "paths": {"send_notification": "/notify", "request_user_action": "/ask", "deliver_tts": "/speak"},
        "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"},
        "signing_secret_ref": "env:ACME_SIGNING",
        "request_timeout_s": 0.3,
        "retry": {"attempts": 3, "backoff_base_s": 0.1, "backoff_max_s": 1.0},
        "breaker": {"failure_threshold": 5, "reset_timeout_s": 30},
    }
    config.update(overrides)
    return config


OAUTH = {"kind": "oauth2_client_credentials", "token_url": "", "client_id": CLIENT_ID,
         "client_secret_ref": "env:ACME_CLIENT_SECRET", "scope": "notify"}


@pytest.fixture
async def make(peer: VendorPeer, clock: StepClock) -> AsyncIterator[Make]:
    made: list[WebhookConnector] = []

    async def build(name: str = "acme", callback_base_url: str | None = None, **overrides: Any) -> WebhookConnector:
        context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=clock,
                                   callback_base_url=callback_base_url, connector_name=name)
        connector = WebhookConnector(_config(peer, **overrides), context)
        await connector.setup()
        made.append(connector)
        return connector

    yield build
    for connector in made:
        await connector.unload()


def _count(name: str, capability: str, result: str) -> float:
    value = REGISTRY.get_sample_value("iim_connector_requests_total",
                                      {"connector": name, "capability": capability, "result": result})
    return value or 0.0


async def test_requests_are_signed_the_way_we_verify_and_carry_the_bearer_token(peer: VendorPeer, make: Make) -> None:
    connector = await make("signed")
    assert await connector.send_notification(NOTE) == "vendor-1"
    assert await connector.deliver_tts(TtsDelivery("speaker-1", "https://iim/v1/audio/ab.wav", "hi")) == "vendor-2"
    assert peer.signature_failures == 0
    first, second = peer.received
    assert first.path == "/notify"
    assert first.body == {"type": "notification", "target": "speaker-1", "title": "SMS", "text": "Привет",
                          "correlation": {"sms_id": "s1"}}
    assert first.headers["Authorization"] == f"Bearer {STATIC_TOKEN}"
    assert first.headers["webhook-id"].startswith("msg_")
    assert second.body["audio_url"] == "https://iim/v1/audio/ab.wav"
    assert _count("signed", "send_notification", "ok") == 1
    assert connector.health().state == "up"


async def test_a_peer_with_another_secret_refuses_us(peer: VendorPeer, make: Make,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_SIGNING", "whsec_" + "QUJD" * 10)  # a different (valid) secret
    connector = await make("wrongkey")
    with pytest.raises(ConnectorError) as err:
        await connector.send_notification(NOTE)
    assert not isinstance(err.value, ConnectorUnavailable)  # 401 with a static token: final, not retried
    assert peer.signature_failures == 1


async def test_5xx_is_retried_with_growing_jittered_backoff_under_one_message_id(
        peer: VendorPeer, make: Make, clock: StepClock) -> None:
    peer.script("/notify", ("status", 500), ("status", 503))
    connector = await make("retry")
    assert await connector.send_notification(NOTE) == "vendor-3"
    assert len({r.headers["webhook-id"] for r in peer.received}) == 1  # the vendor can dedupe retries
    assert len({r.headers["webhook-timestamp"] for r in peer.received}) >= 1
    first, second = clock.sleeps
    assert 0.05 <= first <= 0.1
    assert 0.1 <= second <= 0.2
    assert _count("retry", "send_notification", "server_error") == 2
    assert connector.health().state == "degraded"  # recovered, but failed a moment ago
    assert connector.health().last_error == "send_notification: HTTP 503"


async def test_gives_up_after_the_attempts_with_connector_unavailable(peer: VendorPeer, make: Make) -> None:
    peer.script("/notify", ("status", 500), ("status", 500), ("status", 500))
    connector = await make("giveup")
    with pytest.raises(ConnectorUnavailable, match="after 3 attempt"):
        await connector.send_notification(NOTE)
    assert len(peer.received) == 3


async def test_4xx_is_final(peer: VendorPeer, make: Make, clock: StepClock) -> None:
    peer.script("/notify", ("status", 400))
    connector = await make("final")
    with pytest.raises(ConnectorError, match="HTTP 400") as err:
        await connector.send_notification(NOTE)
    assert not isinstance(err.value, ConnectorUnavailable)
    assert len(peer.received) == 1
    assert clock.sleeps == []
    assert connector.breaker_state() == "closed"


async def test_429_waits_for_retry_after(peer: VendorPeer, make: Make, clock: StepClock) -> None:
    peer.script("/notify", ("retry_after", "2"))
    connector = await make("ratelimited")
    assert await connector.send_notification(NOTE) == "vendor-2"
    assert clock.sleeps == [2.0]
    assert _count("ratelimited", "send_notification", "rate_limited") == 1


async def test_429_asking_too_long_a_wait_is_given_up_at_once(peer: VendorPeer, make: Make,
                                                              clock: StepClock) -> None:
    peer.script("/notify", ("retry_after", "120"))
    connector = await make("toolong")
    with pytest.raises(ConnectorUnavailable, match="rate limited for 120 s"):
        await connector.send_notification(NOTE)
    assert len(peer.received) == 1
    assert clock.sleeps == []


async def test_a_timeout_is_retried(peer: VendorPeer, make: Make) -> None:
    peer.script("/notify", ("sleep", 0.5))
    connector = await make("slow")
    assert await connector.send_notification(NOTE) == "vendor-2"
    assert _count("slow", "send_notification", "timeout") == 1


async def test_connection_refused_is_retried_then_unavailable(make: Make, clock: StepClock) -> None:
    connector = await make("refused", base_url="http://127.0.0.1:9")
    with pytest.raises(ConnectorUnavailable):
        await connector.send_notification(NOTE)
    assert len(clock.sleeps) == 2
    assert _count("refused", "send_notification", "connection_error") == 3
    assert connector.health().last_error == "send_notification: ClientConnectorError"


async def test_breaker_opens_then_one_probe_closes_it(peer: VendorPeer, make: Make, clock: StepClock) -> None:
    peer.script("/notify", ("status", 500), ("status", 500))
    connector = await make("breaker", retry={"attempts": 1}, breaker={"failure_threshold": 2, "reset_timeout_s": 30},
                           degraded_window_s=10)
    for _ in range(2):
        with pytest.raises(ConnectorUnavailable):
            await connector.send_notification(NOTE)
    assert connector.breaker_state() == "open"
    assert connector.health().state == "down"
    with pytest.raises(ConnectorUnavailable, match="circuit open"):
        await connector.send_notification(NOTE)
    assert len(peer.received) == 2  # refused locally: the cloud was not called
    assert _count("breaker", "send_notification", "circuit_open") == 1
    text = generate_latest(REGISTRY).decode()
    assert 'iim_connector_requests_total{capability="send_notification",connector="breaker",result="circuit_open"}' \
        in text

    clock.advance(30)
    assert connector.breaker_state() == "half_open"
    assert connector.health().state == "degraded"
    assert await connector.send_notification(NOTE) == "vendor-3"
    assert connector.breaker_state() == "closed"
    clock.advance(10)
    assert connector.health().state == "up"


async def test_a_failed_probe_reopens_and_only_one_probe_goes_out(peer: VendorPeer, make: Make,
                                                                  clock: StepClock) -> None:
    peer.script("/notify", ("status", 500), ("sleep", 0.5))
    connector = await make("probe", retry={"attempts": 1}, breaker={"failure_threshold": 1, "reset_timeout_s": 5},
                           request_timeout_s=0.2)
    with pytest.raises(ConnectorUnavailable):
        await connector.send_notification(NOTE)
    clock.advance(5)
    # Two callers while half-open: one is the probe (it times out), the other is refused at once.
    results = await asyncio.gather(connector.send_notification(NOTE), connector.send_notification(NOTE),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectorUnavailable) for r in results)
    assert sum("circuit open" in str(r) for r in results) == 1
    assert len(peer.received) == 2
    assert connector.breaker_state() == "open"


async def test_oauth2_token_is_cached_and_fetched_again_once_on_401(peer: VendorPeer, make: Make) -> None:
    connector = await make("oauth", auth={**OAUTH, "token_url": peer.url + "/oauth/token"})
    await connector.send_notification(NOTE)
    await connector.send_notification(NOTE)
    assert len(peer.token_requests) == 1
    assert peer.token_requests[0]["grant_type"] == "client_credentials"
    assert peer.token_requests[0]["scope"] == "notify"
    peer.revoke_tokens()
    await connector.send_notification(NOTE)
    assert len(peer.token_requests) == 2
    assert len(peer.received) == 3
    assert _count("oauth", "send_notification", "unauthorized") == 1


async def test_oauth2_token_is_renewed_before_it_expires(peer: VendorPeer, make: Make, clock: StepClock) -> None:
    peer.token_lifetime_s = 100
    connector = await make("expiry", auth={**OAUTH, "token_url": peer.url + "/oauth/token", "expiry_skew_s": 30})
    await connector.send_notification(NOTE)
    clock.advance(69)
    await connector.send_notification(NOTE)
    assert len(peer.token_requests) == 1
    clock.advance(2)  # 71 s: inside the 30 s skew before expiry
    await connector.send_notification(NOTE)
    assert len(peer.token_requests) == 2


async def test_refused_client_credentials_are_final(peer: VendorPeer, make: Make) -> None:
    peer.refuse_client = True
    connector = await make("badclient", auth={**OAUTH, "token_url": peer.url + "/oauth/token"})
    with pytest.raises(ConnectorError, match=r"HTTP 401 \(invalid_client\)") as err:
        await connector.send_notification(NOTE)
    assert not isinstance(err.value, ConnectorUnavailable)
    assert len(peer.token_requests) == 1
    assert connector.breaker_state() == "closed"
    assert "invalid_client" in (connector.health().last_error or "")


ASK = UserActionRequest(target="speaker-1", prompt="Звонок от +79160000000. Ответить?", options=("accept", "decline"),
                        timeout_s=2.0, correlation={"call_id": "c1"})


async def test_user_action_answered_in_the_response(peer: VendorPeer, make: Make) -> None:
    peer.script("/ask", ("choice", "accept"))
    connector = await make("sync")
    assert await connector.request_user_action(ASK) == UserActionResult("accept")
    body = peer.received[0].body
    assert body["options"] == ["accept", "decline"]
    assert body["callback_url"] is None


async def test_user_action_answered_with_an_option_not_offered_is_an_error(peer: VendorPeer, make: Make) -> None:
    peer.script("/ask", ("choice", "maybe"))
    connector = await make("badchoice")
    with pytest.raises(ConnectorError, match="not offered"):
        await connector.request_user_action(ASK)


@pytest.fixture
async def iim_callbacks(peer: VendorPeer, clock: StepClock) -> AsyncIterator[tuple[WebhookConnector, str]]:
    """IIM's public side: a registry holding connector ``acme`` and the callback sub-app on a real server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=clock,
                               callback_base_url=url)
    registry = ConnectorRegistry(context, factories={"webhook": WebhookConnector})
    await registry.load([{"name": "acme", "plugin": "webhook", "config": _config(peer)}])
    root = web.Application()
    root.add_subapp(CALLBACK_PREFIX, connector_callback_app(registry))
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    connector = registry.get("acme")
    assert isinstance(connector, WebhookConnector)
    yield connector, url
    await registry.aclose()
    await runner.cleanup()


async def test_user_action_answered_later_by_signed_callback(
        peer: VendorPeer, iim_callbacks: tuple[WebhookConnector, str]) -> None:
    connector, url = iim_callbacks
    peer.script("/ask", ("callback", "decline", 0.05))
    assert await connector.request_user_action(ASK) == UserActionResult("decline")
    request_id = peer.received[0].body["request_id"]
    assert peer.received[0].body["callback_url"] == f"{url}/v1/connectors/acme/actions/{request_id}"


async def test_callbacks_are_authenticated_and_checked(
        peer: VendorPeer, iim_callbacks: tuple[WebhookConnector, str]) -> None:
    connector, _ = iim_callbacks
    peer.script("/ask", ("pending",))
    task = asyncio.create_task(connector.request_user_action(ASK))
    await peer.wait_received()
    request_id = peer.received[0].body["request_id"]
    cb = peer.received[0].body["callback_url"]
    good = {"request_id": request_id, "choice": "accept"}

    status, problem = await peer.post_callback(cb, good, secret=b"x" * 32)
    assert (status, problem["error_id"]) == (401, "bad-signature")
    status, problem = await peer.post_callback(cb, good, timestamp=int(time.time()) - 3600)
    assert status == 401
    status, problem = await peer.post_callback(cb.replace(request_id, "f" * 32), {**good, "request_id": "f" * 32})
    assert (status, problem["error_id"]) == (404, "no-such-request")
    status, problem = await peer.post_callback(cb, {**good, "request_id": "0" * 32})
    assert (status, problem["error_id"]) == (422, "bad-body")  # a body signed for another request
    status, problem = await peer.post_callback(cb, {**good, "choice": "maybe"})
    assert (status, problem["error_id"]) == (422, "unknown-option")
    status, problem = await peer.post_callback(cb.replace("/acme/", "/nobody/"), good)
    assert (status, problem["error_id"]) == (404, "no-such-connector")
    assert not task.done()

    status, _ = await peer.post_callback(cb, good)
    assert status == 204
    status, problem = await peer.post_callback(cb, good)
    assert status in (404, 409)  # answered: either still being collected or already gone
    assert await task == UserActionResult("accept")


async def test_user_action_nobody_answers_before_the_timeout(peer: VendorPeer, make: Make) -> None:
    peer.script("/ask", ("pending",))
    connector = await make("silent")
    quick = UserActionRequest(target="speaker-1", prompt="?", options=("ok",), timeout_s=0.2)
    assert await connector.request_user_action(quick) == UserActionResult(None, "timeout")


@pytest.mark.parametrize("answer", [("pending",), ("sleep", 0.25)], ids=["waiting-for-callback", "mid-request"])
async def test_unload_releases_whoever_waits_for_an_answer(peer: VendorPeer, make: Make,
                                                           answer: tuple[Any, ...]) -> None:
    peer.script("/ask", answer)
    connector = await make("unloading")
    task = asyncio.create_task(connector.request_user_action(ASK))
    await peer.wait_received()
    await asyncio.sleep(0.05)
    await connector.unload()
    with pytest.raises(ConnectorUnavailable, match=r"unloaded|not set up"):
        await task
    assert connector.health().state == "down"


async def test_secrets_never_reach_logs_reprs_or_errors(peer: VendorPeer, make: Make,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    peer.script("/notify", ("status", 500), ("status", 500), ("status", 500))
    connector = await make("quiet", auth={**OAUTH, "token_url": peer.url + "/oauth/token"})
    with pytest.raises(ConnectorUnavailable) as err:
        await connector.send_notification(NOTE)
    token = next(iter(peer.valid_tokens))
    seen = " ".join([caplog.text, repr(connector), repr(connector.__dict__), str(err.value),
                     str(connector.health()), repr(connector.config)])
    for secret in (token, CLIENT_SECRET, SIGNING_SECRET_TEXT, SIGNING_SECRET.decode()):
        assert secret not in seen


@pytest.mark.parametrize(("change", "complaint"), [
    ({"base_url": "http://vendor.example.com"}, "base_url: Value error, base_url must use https"),
    ({"base_url": "https://user:hunter2@vendor.example.com"}, "must not carry credentials"),
    ({"paths": {}}, "paths must name at least one capability"),
    ({"paths": {"send_notification": "https://elsewhere/x"}}, "paths.send_notification"),
    ({"auth": {"kind": "bearer", "token_ref": "hunter2"}}, "auth.bearer.token_ref"),
    ({"auth": {"kind": "basic"}}, "auth: Input tag 'basic'"),
    ({"retry": {"attempts": 0}}, "retry.attempts"),
    ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
])
def test_bad_config_is_refused_clearly(peer: VendorPeer, change: dict[str, Any], complaint: str) -> None:
    from iim.connectors.registry import describe_validation_error

    with pytest.raises(ValidationError) as err:
        WebhookConfig.model_validate(_config(peer, **change))
    message = describe_validation_error(err.value)
    assert complaint in message
    assert "hunter2" not in message


def test_what_we_send_verifies_with_the_inbound_verifier() -> None:
    """The helper the peer uses is the very verifier of inbound device webhooks."""
    from iim.core.signing import sign_webhook

    body = b'{"a":1}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000",
               "webhook-signature": sign_webhook("msg_1", 1700000000, body, SIGNING_SECRET)}
    assert verify_webhook(headers, body, [SIGNING_SECRET], now=1700000000).msg_id == "msg_1"


# --- probes: "up" means checked ----------------------------------------------------------------------------


async def test_a_connector_nobody_used_is_not_up_until_a_probe_checked_the_vendor(peer: VendorPeer,
                                                                                   make: Make) -> None:
    connector = await make("unused", probe_path="/health")
    assert connector.health().state == "degraded"
    assert connector.health().last_error == "not checked yet"
    assert connector.health().checked_at is None
    health = await connector.probe()
    assert health.state == "up"
    assert health.checked_at is not None
    assert peer.probes == ["/health"]
    assert peer.signature_failures == 0  # the probe is signed and authorised like every request


async def test_a_probe_the_vendor_fails_makes_the_connector_down_until_one_succeeds(peer: VendorPeer,
                                                                                     make: Make) -> None:
    connector = await make("flaky", probe_path="/health")
    assert (await connector.probe()).state == "up"
    peer.script("/health", ("status", 503))
    health = await connector.probe()
    assert (health.state, health.last_error) == ("down", "probe: HTTP 503")
    assert connector.breaker_state() == "closed"  # probes never move the breaker
    assert (await connector.probe()).state == "up"


async def test_a_rate_limited_probe_is_degraded(peer: VendorPeer, make: Make) -> None:
    connector = await make("busy", probe_path="/health")
    peer.script("/health", ("retry_after", "30"))
    health = await connector.probe()
    assert (health.state, health.last_error) == ("degraded", "probe: HTTP 429")


async def test_a_probe_refused_for_our_credentials_is_down(peer: VendorPeer, make: Make,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", "a-revoked-token")
    connector = await make("revoked", probe_path="/health")
    health = await connector.probe()
    assert (health.state, health.last_error) == ("down", "probe: HTTP 401")


async def test_without_a_probe_path_the_vendor_answering_at_all_counts(peer: VendorPeer, make: Make,
                                                                       clock: StepClock) -> None:
    connector = await make("reachable")
    assert (await connector.probe()).state == "up"
    assert peer.probes == ["/"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=clock,
                               connector_name="gone")
    gone = WebhookConnector(_config(peer, base_url=dead), context)
    await gone.setup()
    try:
        health = await gone.probe()
    finally:
        await gone.unload()
    assert (health.state, health.last_error) == ("down", "probe: ClientConnectorError")


async def test_a_successful_request_after_a_failed_probe_brings_the_connector_back(peer: VendorPeer,
                                                                                   make: Make) -> None:
    connector = await make("recovers", probe_path="/health")
    peer.script("/health", ("status", 500))
    assert (await connector.probe()).state == "down"
    await connector.send_notification(NOTE)
    assert connector.health().state == "up"


def test_a_probe_path_must_be_a_plain_path(peer: VendorPeer) -> None:
    with pytest.raises(ValidationError, match="probe_path"):
        WebhookConfig.model_validate(_config(peer, probe_path="https://elsewhere/health"))
