"""The universal webhook/REST connector: OEM gateways and aggregator clouds that take JSON over HTTPS.

Each capability is one ``POST {base_url}{path}`` with a JSON body (``type``: ``notification``,
``user_action`` or ``tts``). What the vendor must do:

* authenticate us by our bearer token (static, or OAuth2 client-credentials: cached until it expires,
  fetched again once on a 401) and, when ``signing_secret_ref`` is set, by our Standard Webhooks signature
  (``webhook-id``/``-timestamp``/``-signature``; exactly what :func:`iot_bridge.signing.verify_webhook`
  checks for inbound events, and the ``webhook-id`` stays the same across retries so it can dedupe);
* answer 2xx; for a user action either the choice at once (``{"choice": "accept"}``) or later by signed
  callback to ``callback_url`` with ``{"request_id": ..., "choice": ...}``.

Failure handling, so one slow cloud cannot hold calls: timeouts on every request; retries with exponential
backoff and jitter on 5xx, timeouts and connection errors (a 4xx is final, except 429 which waits for
``Retry-After``); a circuit breaker that stops calling after ``failure_threshold`` consecutive failures and
lets one probe through after ``reset_timeout_s``. While open, calls fail at once with
:class:`ConnectorUnavailable` and callers use their fallback (phone call, SMS).

Health is checked, not assumed: ``probe()`` (the registry calls it on an interval) sends one signed,
authorised ``GET {base_url}{probe_path}``: 2xx is up, 429 degraded, anything else down. Without a
``probe_path`` it asks ``GET {base_url}`` and only needs the vendor's server to answer (below 500, not
401/403). Until a probe or a request has reached the vendor, the connector is ``degraded``: "not checked yet".

Secrets are resolved from references at ``setup()`` and kept in :class:`_Secret` holders that never print;
errors and logs say what failed (status, exception type), never a header or token.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ipaddress
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from urllib.parse import quote
from uuid import uuid4

import aiohttp
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from iim.connectors import metrics
from iim.connectors.breaker import BreakerState, CircuitBreaker
from iim.connectors.contract import (
    CallbackRejected,
    Capability,
    ConnectorContext,
    ConnectorError,
    ConnectorHealth,
    ConnectorManifest,
    ConnectorUnavailable,
    LinkScope,
    Notification,
    NotLinked,
    PresenceReport,
    TtsDelivery,
    UserActionRequest,
    UserActionResult,
)
from iim.connectors.linking import AccountLinking
from iim.core import strict_json
from iim.core.retry import backoff_delay
from iim.core.signing import SignatureError, decode_secret, sign_webhook, verify_webhook

__all__ = ["MANIFEST", "BearerAuth", "OAuth2ClientCredentials", "WebhookConfig", "WebhookConnector"]

log = logging.getLogger(__name__)

SecretRef = Annotated[str, StringConstraints(pattern=r"^(env|file):\S+$", max_length=1024)]

_T = TypeVar("_T", str, bytes)
_LOOPBACK_NAMES = frozenset({"localhost"})
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_VENDOR_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
#: The scope a household's link must grant for each capability (checked on every use, not only at linking).
_SCOPE_FOR: dict[Capability, LinkScope] = {
    Capability.SEND_NOTIFICATION: LinkScope.SEND_NOTIFICATIONS,
    Capability.REQUEST_USER_ACTION: LinkScope.SEND_NOTIFICATIONS,
    Capability.DELIVER_TTS: LinkScope.VOICE_INTERACTION,
}


def _check_url(value: str, what: str) -> str:
    """HTTPS only (plain HTTP only to loopback, for tests and local gateways), no credentials in the URL."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not a URL") from None
    if url.scheme not in ("https", "http") or not url.host:
        raise ValueError(f"{what} must be an absolute https:// URL")
    if url.user is not None or url.password is not None:
        raise ValueError(f"{what} must not carry credentials (use a credential reference)")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise ValueError(f"{what} must use https (plain http is allowed to loopback only)")
    if url.query_string or url.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    return value


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BearerAuth(_Strict):
    """A static bearer token, given by reference."""

    kind: Literal["bearer"]
    token_ref: SecretRef


class OAuth2ClientCredentials(_Strict):
    """OAuth2 client-credentials grant (RFC 6749 §4.4); the token is cached until shortly before it expires."""

    kind: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str = Field(min_length=1, max_length=256)
    client_secret_ref: SecretRef
    scope: str | None = Field(default=None, max_length=1024)
    #: ``basic``: HTTP Basic (RFC 6749 §2.3.1, what servers must support); ``post``: in the form body.
    client_auth: Literal["basic", "post"] = "basic"
    #: Renew this long before ``expires_in`` runs out (capped at half the lifetime).
    expiry_skew_s: float = Field(default=30.0, ge=0, le=600)

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, "token_url")


class CapabilityPaths(_Strict):
    """Path under ``base_url`` per capability; a capability without a path is not offered."""

    send_notification: str | None = None
    request_user_action: str | None = None
    deliver_tts: str | None = None

    @field_validator("send_notification", "request_user_action", "deliver_tts")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not _PATH.fullmatch(value) or "/../" in value + "/" or "//" in value):
            raise ValueError("must be an absolute path such as /v1/notify (no host, query or ..)")
        return value

    def offered(self) -> dict[Capability, str]:
        pairs = {Capability.SEND_NOTIFICATION: self.send_notification,
                 Capability.REQUEST_USER_ACTION: self.request_user_action,
                 Capability.DELIVER_TTS: self.deliver_tts}
        return {capability: path for capability, path in pairs.items() if path is not None}


class RetryPolicy(_Strict):
    attempts: int = Field(default=3, ge=1, le=10)
    backoff_base_s: float = Field(default=0.2, gt=0, le=60)
    backoff_max_s: float = Field(default=5.0, gt=0, le=300)
    #: A 429 asking to wait longer than this is given up on at once (the cloud is unavailable to us now).
    retry_after_max_s: float = Field(default=30.0, ge=0, le=600)


class BreakerPolicy(_Strict):
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    reset_timeout_s: float = Field(default=30.0, gt=0, le=3600)


class WebhookConfig(_Strict):
    """Config of one webhook connector. Credentials appear only as references (``env:NAME``, ``file:/path``)."""

    base_url: str
    paths: CapabilityPaths
    auth: Annotated[BearerAuth | OAuth2ClientCredentials, Field(discriminator="kind")] | None = None
    #: Standard Webhooks secret (``whsec_...``): signs our requests and verifies the vendor's callbacks.
    signing_secret_ref: SecretRef | None = None
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    request_timeout_s: float = Field(default=10.0, gt=0, le=120)
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    #: Health stays ``degraded`` this long after the last failure.
    degraded_window_s: float = Field(default=60.0, ge=0, le=3600)
    #: Callbacks older or newer than this (by ``webhook-timestamp``) are refused.
    callback_tolerance_s: int = Field(default=300, ge=10, le=3600)
    max_response_bytes: int = Field(default=1 << 20, ge=1024, le=16 << 20)
    #: What ``probe()`` asks (``GET {base_url}{probe_path}``, 2xx expected); ``None``: ``GET {base_url}``,
    #: any answer below 500 (bar 401/403) counts.
    probe_path: str | None = None
    #: Take the vendor's home/away reports (``POST /v1/connectors/{name}/presence``, signed like callbacks);
    #: off by default: a vendor speaks for presence only when the operator says so.
    accept_presence: bool = False
    #: Households link their vendor accounts (OAuth2 authorization code + PKCE, ``iim link start``); each request
    #: for a household then carries that household's access token (its grant checked for the capability's
    #: scope), and a household without a link gets :class:`NotLinked` (the caller's fallback). ``auth`` still
    #: authorises the probes.
    account_linking: AccountLinking | None = None

    @field_validator("probe_path")
    @classmethod
    def _probe(cls, value: str | None) -> str | None:
        if value is not None and (not _PATH.fullmatch(value) or "/../" in value + "/" or "//" in value):
            raise ValueError("must be an absolute path such as /v1/health (no host, query or ..)")
        return value

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return _check_url(value, "base_url").rstrip("/")

    @model_validator(mode="after")
    def _some_capability(self) -> WebhookConfig:
        if not self.paths.offered():
            raise ValueError("paths must name at least one capability")
        return self


class _PresenceBody(_Strict):
    """A vendor's presence report: ``{"target": connector_ref, "state": "home"|"away", "ttl_s": 60..86400}``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    target: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    state: Literal["home", "away"]
    ttl_s: int = Field(ge=60, le=86_400)
    subject: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None


MANIFEST = ConnectorManifest(
    name="webhook", version="1.0.0",
    capabilities=frozenset({Capability.SEND_NOTIFICATION, Capability.REQUEST_USER_ACTION,
                            Capability.DELIVER_TTS}),
    config_schema=WebhookConfig,
)


class _Secret(Generic[_T]):
    """A resolved credential: usable by :meth:`reveal`, invisible in reprs, logs and tracebacks."""

    __slots__ = ("_value",)
    _value: _T

    def __init__(self, value: _T) -> None:
        self._value = value

    def reveal(self) -> _T:
        return self._value

    def __repr__(self) -> str:
        return "_Secret('***')"

    __str__ = __repr__


@dataclass(slots=True)
class _Token:
    value: _Secret[str]
    expires_at: float  # monotonic


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[UserActionResult]
    options: frozenset[str]


class _TokenRefused(ConnectorError):
    """The token endpoint refused our client credentials (4xx): retrying will not help."""


class _TokenUnavailable(ConnectorError):
    """The token endpoint failed (5xx, bad answer): retry like any other failure."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None


class WebhookConnector:
    """The webhook/REST connector (entry point ``webhook``): ``WebhookConnector(config, context)``."""

    manifest: ConnectorManifest = MANIFEST

    def __init__(self, config: dict[str, Any], context: ConnectorContext, /) -> None:
        self.config = WebhookConfig.model_validate(config)
        self.context = context
        self.name = context.connector_name or "webhook"
        self._paths = self.config.paths.offered()
        self.manifest = replace(MANIFEST, capabilities=frozenset(self._paths))
        self._clock = context.clock
        self._breaker = CircuitBreaker(failure_threshold=self.config.breaker.failure_threshold,
                                       reset_timeout_s=self.config.breaker.reset_timeout_s,
                                       clock=context.clock.monotonic)
        self._timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                              sock_connect=self.config.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._bearer: _Secret[str] | None = None
        self._client_secret: _Secret[str] | None = None
        self._signing: tuple[_Secret[bytes], ...] = ()
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self._pending: dict[str, _Pending] = {}
        self._last_error: str | None = None
        self._last_failure_at: float | None = None
        #: wall time the vendor last answered or failed to (a probe or a request); None: never checked
        self._checked_at: float | None = None
        #: the last probe's verdict when it was not "up" (cleared by a probe or request that succeeds)
        self._probe_trouble: tuple[Literal["degraded", "down"], str] | None = None

    def __repr__(self) -> str:
        return (f"WebhookConnector(name={self.name!r}, base_url={self.config.base_url!r}, "
                f"breaker={self._breaker.state.value})")

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Resolve the credentials and open the HTTP session. The cloud itself is not contacted: one that
        is down at start-up is the breaker's business, not a reason to leave the connector unloaded."""
        auth = self.config.auth
        if isinstance(auth, BearerAuth):
            self._bearer = _Secret(self._resolve(auth.token_ref, "auth.token_ref"))
        elif isinstance(auth, OAuth2ClientCredentials):
            self._client_secret = _Secret(self._resolve(auth.client_secret_ref, "auth.client_secret_ref"))
        if self.config.signing_secret_ref is not None:
            text = self._resolve(self.config.signing_secret_ref, "signing_secret_ref")
            try:
                self._signing = (_Secret(decode_secret(text)),)
            except ValueError as exc:
                raise ConnectorError(f"signing_secret_ref: {exc}") from None
        self._session = self.context.http_session()

    async def unload(self) -> None:
        """Close the session; anyone still waiting for a user's answer gets :class:`ConnectorUnavailable`."""
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectorUnavailable(f"{self.name}: connector unloaded"))
        self._pending.clear()
        session, self._session = self._session, None
        self._token = None
        if session is not None:
            await session.close()

    def _resolve(self, ref: str, what: str) -> str:
        try:
            return self.context.resolve_secret(ref)
        except (LookupError, ValueError) as exc:
            raise ConnectorError(f"{what}: {exc}") from None

    # --- capabilities --------------------------------------------------------------------------------------

    async def send_notification(self, notification: Notification) -> str:
        """Returns the vendor's message id when it gives one (``{"id": ...}``), else our ``webhook-id``."""
        payload = {"type": "notification", "target": notification.target, "title": notification.title,
                   "text": notification.text, "correlation": dict(notification.correlation)}
        msg_id, answer = await self._call(Capability.SEND_NOTIFICATION, payload)
        return _vendor_id(answer) or msg_id

    async def deliver_tts(self, delivery: TtsDelivery) -> str:
        payload = {"type": "tts", "target": delivery.target, "audio_url": delivery.audio_url,
                   "text": delivery.text, "correlation": dict(delivery.correlation)}
        msg_id, answer = await self._call(Capability.DELIVER_TTS, payload)
        return _vendor_id(answer) or msg_id

    async def request_user_action(self, request: UserActionRequest) -> UserActionResult:
        """Ask and wait: the vendor's synchronous answer, or its callback, or ``choice=None`` at the timeout.

        Raises:
            ConnectorUnavailable: the request could not be delivered (use the fallback).
            ConnectorError: the vendor refused it, or answered with an option we did not offer.
        """
        if not request.options:
            raise ValueError("a user action needs at least one option")
        deadline = self._clock.monotonic() + request.timeout_s
        request_id = uuid4().hex
        future: asyncio.Future[UserActionResult] = asyncio.get_running_loop().create_future()
        # Registered before sending: the callback may overtake the HTTP response.
        self._pending[request_id] = _Pending(future, frozenset(request.options))
        try:
            payload = {"type": "user_action", "request_id": request_id, "target": request.target,
                       "prompt": request.prompt, "options": list(request.options),
                       "timeout_s": request.timeout_s, "callback_url": self.context.callback_url(request_id),
                       "correlation": dict(request.correlation)}
            _, answer = await self._call(Capability.REQUEST_USER_ACTION, payload)
            sync = _choice_from(answer, frozenset(request.options))
            if sync is not None:
                return sync
            remaining = deadline - self._clock.monotonic()
            if future.done() or remaining > 0:
                try:
                    return await asyncio.wait_for(asyncio.shield(future), max(remaining, 0.0))
                except TimeoutError:
                    pass
            return UserActionResult(None, "timeout")
        finally:
            self._pending.pop(request_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: an unload() during the HTTP exchange is not "never retrieved"

    def accept_action_callback(self, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        """A vendor's later answer (``POST /v1/connectors/{name}/actions/{request_id}``).

        The signed body must repeat the ``request_id`` of the URL: the signature does not cover the URL, and
        without this a captured "accept" could be replayed onto another request.
        """
        if not self._signing:
            raise CallbackRejected(401, "callbacks-disabled", "no signing secret configured for this connector")
        try:
            verify_webhook(headers, body, [secret.reveal() for secret in self._signing], now=self._clock.time(),
                           tolerance_s=self.config.callback_tolerance_s)
        except SignatureError as exc:
            raise CallbackRejected(401, "bad-signature", exc.reason) from None
        pending = self._pending.get(request_id)
        if pending is None:
            raise CallbackRejected(404, "no-such-request", "no pending request with that id (unknown or timed out)")
        if pending.future.done():
            raise CallbackRejected(409, "already-answered", "this request has already been answered")
        try:
            doc = strict_json.loads(body, max_depth=4)
        except strict_json.BadJson as exc:
            raise CallbackRejected(422, "bad-body", exc.reason) from None
        if not isinstance(doc, dict) or doc.get("request_id") != request_id:
            raise CallbackRejected(422, "bad-body", "the body must be an object naming the same request_id")
        try:
            result = _choice_from(doc, pending.options)
        except ConnectorError as exc:
            raise CallbackRejected(422, "unknown-option", str(exc)) from None
        if result is None:
            raise CallbackRejected(422, "bad-body", "the body must carry a choice")
        pending.future.set_result(result)

    def accept_presence_callback(self, headers: Mapping[str, str], body: bytes) -> PresenceReport:
        """A vendor's home/away report, signed with the connector's Standard Webhooks secret."""
        if not self.config.accept_presence:
            raise CallbackRejected(404, "presence-disabled", "this connector takes no presence reports")
        if not self._signing:
            raise CallbackRejected(401, "callbacks-disabled", "no signing secret configured for this connector")
        try:
            verify_webhook(headers, body, [secret.reveal() for secret in self._signing], now=self._clock.time(),
                           tolerance_s=self.config.callback_tolerance_s)
        except SignatureError as exc:
            raise CallbackRejected(401, "bad-signature", exc.reason) from None
        try:
            doc = _PresenceBody.model_validate(strict_json.loads(body, max_depth=3))
        except strict_json.BadJson as exc:
            raise CallbackRejected(422, "bad-body", exc.reason) from None
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors())
            raise CallbackRejected(422, "bad-body", f"invalid presence report: {fields}") from None
        return PresenceReport(doc.target, doc.state, doc.ttl_s, doc.subject)

    # --- health --------------------------------------------------------------------------------------------

    def health(self) -> ConnectorHealth:
        """down: not set up, circuit open or the last probe failed; degraded: never checked, half-open, a
        failure in the last window or a rate-limited probe; else up (checked, and working)."""
        checked = None if self._checked_at is None else datetime.fromtimestamp(self._checked_at, UTC)
        if self._session is None:
            return ConnectorHealth("down", self._last_error or "not set up", checked)
        state = self._breaker.state
        if state is BreakerState.OPEN:
            return ConnectorHealth("down", self._last_error, checked)
        if self._probe_trouble is not None and self._probe_trouble[0] == "down":
            return ConnectorHealth("down", self._probe_trouble[1], checked)
        if checked is None:
            return ConnectorHealth("degraded", "not checked yet", None)
        recent = (self._last_failure_at is not None
                  and self._clock.monotonic() - self._last_failure_at < self.config.degraded_window_s)
        if state is BreakerState.HALF_OPEN or recent or self._probe_trouble is not None:
            reason = self._probe_trouble[1] if self._probe_trouble is not None else self._last_error
            return ConnectorHealth("degraded", reason, checked)
        return ConnectorHealth("up", self._last_error, checked)

    async def probe(self) -> ConnectorHealth:
        """One signed, authorised ``GET`` to the vendor (no retries, past the breaker: a probe is how an open
        circuit's cloud is seen to be back, but only real requests move the breaker)."""
        session = self._session
        if session is None or session.closed:
            return self.health()
        path = self.config.probe_path
        url = self.config.base_url + (path or "")
        msg_id = f"probe_{uuid4().hex}"
        timestamp = int(self._clock.time())
        headers = {"Accept": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._signing:
            headers["webhook-signature"] = sign_webhook(msg_id, timestamp, b"", self._signing[0].reveal())
        trouble: tuple[Literal["degraded", "down"], str] | None
        try:
            token = await self._bearer_token(session)
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            async with session.get(url, headers=headers, timeout=self._timeout, allow_redirects=False) as resp:
                await self._read_limited(resp)
                status = resp.status
        except _TokenRefused as exc:
            trouble = ("down", f"probe: {exc}")
        except (TimeoutError, aiohttp.ClientError, _TokenUnavailable) as exc:
            reason = str(exc) if isinstance(exc, _TokenUnavailable) else type(exc).__name__
            trouble = ("down", f"probe: {reason}")
        else:
            if status == 429:
                trouble = ("degraded", "probe: HTTP 429")
            elif (200 <= status < 300) or (path is None and status < 500 and status not in (401, 403)):
                trouble = None
            else:
                trouble = ("down", f"probe: HTTP {status}")
        self._checked_at = self._clock.time()
        self._probe_trouble = trouble
        if trouble is not None:
            log.warning("connector %s: %s", self.name, trouble[1])
        return self.health()

    def breaker_state(self) -> str:
        return self._breaker.state.value

    @property
    def account_linking(self) -> AccountLinking | None:
        """This vendor's authorization server, when its households link their accounts."""
        return self.config.account_linking

    # --- the HTTP exchange ---------------------------------------------------------------------------------

    async def _call(self, capability: Capability, payload: dict[str, Any]) -> tuple[str, Any]:
        """POST ``payload`` with retries and the breaker: ``(webhook-id, parsed JSON answer or None)``."""
        path = self._paths.get(capability)
        if path is None:
            raise ConnectorError(f"{self.name}: {capability} is not configured")
        url = self.config.base_url + path
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        msg_id = f"msg_{uuid4().hex}"
        retry = self.config.retry
        refreshed = False
        attempt = 0
        while True:
            session = self._session  # checked on every attempt: unload() may close it between two
            if session is None or session.closed:
                raise ConnectorUnavailable(f"{self.name}: connector is not set up")
            if not self._breaker.allow():
                self._count(capability, "circuit_open")
                raise ConnectorUnavailable(
                    f"{self.name}: circuit open, next probe in {self._breaker.retry_in():.0f} s")
            try:
                token = await self._request_token(session, capability, payload.get("target"))
                answer = await self._post(session, url, body, msg_id, token)
            except _TokenRefused as exc:
                self._breaker.record_success()  # the cloud answered; our credentials are the problem
                self._count(capability, "unauthorized")
                self._last_error = str(exc)
                self._checked_at = self._clock.time()
                self._probe_trouble = ("down", str(exc))  # nothing will work until the credentials are fixed
                raise
            except (TimeoutError, aiohttp.ClientError, _TokenUnavailable) as exc:
                result = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
                reason = str(exc) if isinstance(exc, _TokenUnavailable) else type(exc).__name__
                self._failure(capability, result, f"{capability}: {reason}")
                delay = self._backoff(attempt)
            else:
                status = answer.status
                self._checked_at = self._clock.time()
                if 200 <= status < 300:
                    self._breaker.record_success()
                    self._count(capability, "ok")
                    self._probe_trouble = None
                    return msg_id, _parse(answer.body)
                if status == 401 and isinstance(self.config.auth, OAuth2ClientCredentials) and not refreshed:
                    # The token may have been revoked early: fetch a new one, once, without using an attempt.
                    refreshed = True
                    self._breaker.record_success()
                    self._count(capability, "unauthorized")
                    self._drop_token(token)
                    continue
                if status == 429:
                    self._breaker.record_success()
                    self._count(capability, "rate_limited")
                    self._last_error = f"{capability}: HTTP 429"
                    wait = _retry_after(answer.retry_after, self._clock.time())
                    if wait is not None and wait > retry.retry_after_max_s:
                        raise ConnectorUnavailable(f"{self.name}: rate limited for {wait:.0f} s")
                    delay = self._backoff(attempt) if wait is None else wait
                elif status >= 500:
                    self._failure(capability, "server_error", f"{capability}: HTTP {status}")
                    delay = self._backoff(attempt)
                else:
                    self._breaker.record_success()
                    self._count(capability, "unauthorized" if status in (401, 403) else "refused")
                    self._last_error = f"{capability}: HTTP {status}"
                    raise ConnectorError(f"{self.name}: {capability} refused with HTTP {status}")
            attempt += 1
            if attempt >= retry.attempts:
                raise ConnectorUnavailable(
                    f"{self.name}: {capability} failed after {attempt} attempt(s): {self._last_error}")
            await self._clock.sleep(delay)

    async def _post(self, session: aiohttp.ClientSession, url: str, body: bytes, msg_id: str,
                    token: str | None) -> _Answer:
        timestamp = int(self._clock.time())
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._signing:
            headers["webhook-signature"] = sign_webhook(msg_id, timestamp, body, self._signing[0].reveal())
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with session.post(url, data=body, headers=headers, timeout=self._timeout,
                                allow_redirects=False) as resp:
            data = await self._read_limited(resp)
            return _Answer(resp.status, data, resp.headers.get("Retry-After"))

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.config.max_response_bytes
        data = await resp.content.read(limit + 1)
        return b"" if len(data) > limit else data  # an oversized answer is treated as an empty one

    async def _request_token(self, session: aiohttp.ClientSession, capability: Capability,
                             target: object) -> str | None:
        """The household's linked access token (its grant checked for the capability) or the connector's own."""
        if self.config.account_linking is None:
            return await self._bearer_token(session)
        linked = self.context.linked_tokens
        if linked is None:
            raise NotLinked(f"{self.name}: account linking is not running in this IIM")
        if not isinstance(target, str) or not target:
            raise NotLinked(f"{self.name}: a linked request needs a target")
        return await linked.access_token(self.name, target, _SCOPE_FOR[capability])

    async def _bearer_token(self, session: aiohttp.ClientSession) -> str | None:
        if self._bearer is not None:
            return self._bearer.reveal()
        auth = self.config.auth
        if not isinstance(auth, OAuth2ClientCredentials):
            return None
        token = self._token
        if token is not None and self._clock.monotonic() < token.expires_at:
            return token.value.reveal()
        async with self._token_lock:  # concurrent requests share one token fetch
            token = self._token
            if token is None or self._clock.monotonic() >= token.expires_at:
                token = self._token = await self._fetch_token(session, auth)
            return token.value.reveal()

    def _drop_token(self, used: str | None) -> None:
        token = self._token
        if token is not None and token.value.reveal() == used:
            self._token = None

    async def _fetch_token(self, session: aiohttp.ClientSession, auth: OAuth2ClientCredentials) -> _Token:
        assert self._client_secret is not None  # set by setup() whenever auth is OAuth2
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        headers = {"Accept": "application/json"}
        if auth.client_auth == "basic":
            # RFC 6749 §2.3.1: form-urlencode id and secret, then HTTP Basic.
            pair = f"{quote(auth.client_id, safe='')}:{quote(self._client_secret.reveal(), safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": auth.client_id, "client_secret": self._client_secret.reveal()}
        async with session.post(auth.token_url, data=form, headers=headers, timeout=self._timeout,
                                allow_redirects=False) as resp:
            data = await self._read_limited(resp)
            status = resp.status
        doc = _parse(data)
        if 400 <= status < 500:
            code = doc.get("error") if isinstance(doc, dict) else None
            detail = f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
            raise _TokenRefused(f"{self.name}: OAuth2 token request refused: HTTP {status}{detail}")
        if status != 200:
            raise _TokenUnavailable(f"OAuth2 token endpoint: HTTP {status}")
        access = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(access, str) or not access:
            raise _TokenUnavailable("OAuth2 token endpoint: no access_token in the answer")
        assert isinstance(doc, dict)
        token_type = doc.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise _TokenUnavailable("OAuth2 token endpoint: token_type is not bearer")
        expires_in = doc.get("expires_in", 300)
        if type(expires_in) not in (int, float) or expires_in <= 0:
            expires_in = 300
        lifetime = float(expires_in) - min(auth.expiry_skew_s, float(expires_in) / 2)
        return _Token(_Secret(access), self._clock.monotonic() + lifetime)

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def _failure(self, capability: Capability, result: str, reason: str) -> None:
        self._checked_at = self._clock.time()
        self._breaker.record_failure()
        self._count(capability, result)
        self._last_error = reason
        self._last_failure_at = self._clock.monotonic()
        log.warning("connector %s: %s (breaker %s)", self.name, reason, self._breaker.state.value)

    def _count(self, capability: Capability, result: str) -> None:
        metrics.REQUESTS.labels(self.name, capability.value, result).inc()

    def _backoff(self, attempt: int) -> float:
        """Exponential with "equal jitter": never zero, never in lockstep with other IIM nodes."""
        return backoff_delay(attempt + 1, self.config.retry.backoff_base_s, self.config.retry.backoff_max_s)


def _parse(data: bytes) -> Any:
    """The answer as JSON, or ``None`` (empty, not JSON: a bare 2xx is a valid answer)."""
    if not data.strip():
        return None
    try:
        return strict_json.loads(data, max_depth=8)
    except strict_json.BadJson:
        return None


def _vendor_id(answer: Any) -> str | None:
    value = answer.get("id") if isinstance(answer, dict) else None
    return value if isinstance(value, str) and _VENDOR_ID.fullmatch(value) else None


def _choice_from(answer: Any, options: frozenset[str]) -> UserActionResult | None:
    """``{"choice": "accept", "detail": "..."}`` -> result; no choice (pending) -> ``None``."""
    if not isinstance(answer, dict):
        return None
    choice = answer.get("choice")
    if choice is None:
        return None
    if not isinstance(choice, str) or choice not in options:
        raise ConnectorError("the vendor answered with an option that was not offered")
    detail = answer.get("detail")
    return UserActionResult(choice, detail[:200] if isinstance(detail, str) else "")


def _retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
