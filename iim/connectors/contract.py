"""What every smart-home connector offers (the spec's connector contract), independent of any vendor.

A connector is a plugin found through the ``iim.connectors`` entry-point group. It declares a manifest
(name, capabilities, config schema) and is set up and unloaded in pairs. Callers never learn a vendor's
protocol: they send notifications, ask a person to choose (answer a call? false alarm?), deliver
rendered speech, and receive events; health says whether the cloud behind it can be relied on now, and
``probe()`` checks it: the registry probes every connector on an interval, so "up" always means "checked".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
from pydantic import BaseModel

__all__ = [
    "Capability", "Connector", "ConnectorLookup", "ConnectorError", "ConnectorHealth", "ConnectorManifest", "ConnectorUnavailable",
    "Notification", "TtsDelivery", "UserActionRequest", "UserActionResult",
    "CALLBACK_PATH", "ActionCallbackReceiver", "CallbackRejected", "Clock", "ConnectorContext", "ConnectorFactory",
    "HasBreakerState", "PresenceReceiver", "PresenceReport", "PresenceUnavailable", "PRESENCE_PATH",
    "LinkScope", "LinkedTokens", "NotLinked",
]


class Capability(StrEnum):
    SEND_NOTIFICATION = "send_notification"
    REQUEST_USER_ACTION = "request_user_action"
    DELIVER_TTS = "deliver_tts"
    RECEIVE_EVENT = "receive_event"


@dataclass(frozen=True, slots=True)
class ConnectorManifest:
    name: str
    version: str
    capabilities: frozenset[Capability]
    #: pydantic model validating the connector's config (no secrets: only credential references)
    config_schema: type[BaseModel]


@dataclass(frozen=True, slots=True)
class Notification:
    """A text to show or say on a household's devices/app. ``target`` is the device's ``connector_ref``."""

    target: str
    title: str
    text: str
    correlation: Mapping[str, str] = field(default_factory=dict)  # event_id / call_id / sms_id


@dataclass(frozen=True, slots=True)
class UserActionRequest:
    """Ask a person to choose, e.g. "Call from +7900..., answer?" with options accept/decline."""

    target: str
    prompt: str
    options: tuple[str, ...]
    timeout_s: float
    correlation: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UserActionResult:
    choice: str | None  # one of the options, or None when nobody chose before the timeout
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TtsDelivery:
    """Speech for a speaker: a signed, expiring URL the vendor cloud fetches (and the text, for displays)."""

    target: str
    audio_url: str
    text: str
    correlation: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnectorHealth:
    """``checked_at``: when the vendor last answered or failed to (a probe or a request); ``None`` until then,
    and a connector never checked is never ``up``."""

    state: Literal["up", "degraded", "down"]
    last_error: str | None = None
    checked_at: datetime | None = None


class ConnectorError(Exception):
    """The connector could not do what was asked (the vendor refused, bad answer)."""


class ConnectorUnavailable(ConnectorError):
    """The cloud behind the connector is down or its circuit is open: use the fallback (phone/SMS)."""


class NotLinked(ConnectorError):
    """The household has no active account link at this connector, or the link does not grant the scope the
    capability needs: use the fallback (phone/SMS), and ask the household to link (again)."""


class LinkScope(StrEnum):
    """What a household's account link may allow, and nothing wider (spec 4.1, 3.1)."""

    READ_EVENTS = "read_events"
    SEND_NOTIFICATIONS = "send_notifications"
    VOICE_INTERACTION = "voice_interaction"


class LinkedTokens(Protocol):
    """The households' account links, as a connector uses them (``iim.linking.service.LinkingService``)."""

    async def access_token(self, connector: str, target: str, scope: LinkScope) -> str:
        """The access token of the household that has device ``target`` at ``connector``, checked to grant
        ``scope``.

        Raises:
            NotLinked: no active link for that household, or its grant lacks ``scope``.
            ConnectorUnavailable: the links cannot be read or renewed now.
        """
        ...


@runtime_checkable
class Connector(Protocol):
    manifest: ConnectorManifest

    async def setup(self) -> None: ...

    async def unload(self) -> None: ...

    async def send_notification(self, notification: Notification) -> str: ...

    async def request_user_action(self, request: UserActionRequest) -> UserActionResult: ...

    async def deliver_tts(self, delivery: TtsDelivery) -> str: ...

    def health(self) -> ConnectorHealth: ...

    async def probe(self) -> ConnectorHealth:
        """Ask the vendor now, with one cheap request, whether it works, and return the health that follows.

        Called by the registry every probe interval under its own deadline (a probe still running then is
        cancelled and counted as ``down``); raising counts as ``down`` too. No retries: the next probe is
        the retry.
        """
        ...


# --- what a plugin is given, and how it is made (the loader's side of the contract) ----------------------

#: The route of vendors' answers to user-action requests (see :func:`iim.connectors.http.connector_callback_app`).
CALLBACK_PATH = "/v1/connectors/{name}/actions/{request_id}"


class Clock(Protocol):
    """Time as plugins see it: injected so tests drive timeouts, token expiry and cool-downs."""

    def time(self) -> float:
        """Wall-clock unix seconds (signature timestamps, ``checked_at``)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (deadlines, token lifetimes, breaker cool-downs)."""
        ...

    async def sleep(self, delay: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """Everything a plugin may use from IIM; nothing else is reachable (no globals, no service locator).

    Attributes:
        resolve_secret: turns a credential reference (``env:NAME`` / ``file:/path``) into its value.
        http_session: makes a new ``aiohttp.ClientSession``, owned (and closed) by the connector.
        clock: wall and monotonic time, sleep.
        callback_base_url: IIM's public URL under which ``/v1/connectors/{name}/actions/{id}`` is reachable
            by vendors; ``None`` when callbacks are not exposed (vendors must then answer synchronously).
        connector_name: this connector's configured name (set by the registry for each connector).
        linked_tokens: the households' account links (OAuth2 authorization code + PKCE); ``None`` when
            account linking is off.
    """

    resolve_secret: Callable[[str], str]
    http_session: Callable[[], aiohttp.ClientSession]
    clock: Clock
    callback_base_url: str | None = None
    connector_name: str = ""
    linked_tokens: LinkedTokens | None = None

    def callback_url(self, request_id: str) -> str | None:
        """Where the vendor posts its answer to user-action request ``request_id`` (``None``: no callbacks)."""
        if self.callback_base_url is None or not self.connector_name:
            return None
        path = CALLBACK_PATH.format(name=self.connector_name, request_id=request_id)
        return self.callback_base_url.rstrip("/") + path


class ConnectorFactory(Protocol):
    """What an ``iim.connectors`` entry point yields: ``factory(config, context) -> Connector``.

    A factory that also carries ``manifest`` (a connector class with a class-level manifest, say) has its
    config validated before it is even constructed.
    """

    def __call__(self, config: dict[str, Any], context: ConnectorContext, /) -> Connector: ...


class CallbackRejected(ConnectorError):
    """A vendor's answer to a user-action request was refused; ``status`` is the HTTP status to send."""

    def __init__(self, status: int, error_id: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error_id = error_id
        self.reason = reason


@runtime_checkable
class ActionCallbackReceiver(Protocol):
    """A connector whose vendor may answer :meth:`Connector.request_user_action` later, by callback."""

    def accept_action_callback(self, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        """Authenticate and apply one answer; raises :class:`CallbackRejected` (never anything else)."""
        ...


#: The route of vendors' home/away reports (see :func:`iim.connectors.http.connector_callback_app`).
PRESENCE_PATH = "/v1/connectors/{name}/presence"


@dataclass(frozen=True, slots=True)
class PresenceReport:
    """A vendor's word that its home is occupied or empty.

    ``target`` is the ``connector_ref`` of one of the household's devices at that vendor (how IIM finds the
    household); ``subject`` the vendor's person or home it speaks about (default: the target); the word counts
    for ``ttl_s`` seconds unless the vendor speaks again.
    """

    target: str
    state: Literal["home", "away"]
    ttl_s: int
    subject: str | None = None


class PresenceUnavailable(Exception):
    """IIM cannot take a presence report now (its database is away): the vendor should retry later."""


@runtime_checkable
class PresenceReceiver(Protocol):
    """A connector whose vendor reports home/away (``POST /v1/connectors/{name}/presence``)."""

    def accept_presence_callback(self, headers: Mapping[str, str], body: bytes) -> PresenceReport:
        """Authenticate and parse one report; raises :class:`CallbackRejected` (never anything else)."""
        ...


@runtime_checkable
class HasBreakerState(Protocol):
    """A connector with a circuit breaker exposes its state for ``iim_connector_breaker_state``."""

    def breaker_state(self) -> str:
        """``closed``, ``half_open`` or ``open``."""
        ...


class ConnectorLookup(Protocol):
    """Connector instances by name (``iim.connectors.registry.ConnectorRegistry``); callers that only send
    through connectors depend on this, not on the registry."""

    def get(self, name: str) -> Connector | None: ...
