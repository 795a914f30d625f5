"""What a hub and IIM say to each other over MQTT: the topic layout, the signed event payload, the replies.

Topics, per tenant and hub (``{prefix}`` is ``iim`` by default)::

    {prefix}/{tenant}/{hub}/events   hub -> IIM   one signed device event per message, QoS 1
    {prefix}/{tenant}/{hub}/ack      IIM -> hub   the answer to each event: accepted (202) or refused (4xx)
    {prefix}/{tenant}/{hub}/cmd      IIM -> hub   operator commands (arm, disarm, silence, test, reboot), QoS 1
    {prefix}/{tenant}/{hub}/cmd-ack  hub -> IIM   the hub's answer to each command (iot_bridge.mqtt.commands)

The broker, not IIM, proves who published: it knows each hub by its client certificate (the certificate's CN,
``{tenant}/{hub}``, is its user name) and its ACL lets a hub publish only under its own ``{tenant}/{hub}``. So
the topic is the hub's authenticated identity, as a client certificate is on the HTTPS bridge.

A payload is signed exactly as a ``POST /v1/events`` body is (MQTT 3.1.1 has no headers, so they travel in
the payload): either a compact JWS (``kid`` = the device), or Standard Webhooks headers, a blank line and the
exact event JSON the signature covers::

    webhook-id: msg_1
    webhook-timestamp: 1767222000
    webhook-signature: v1,K5oZ...
    iim-device: smoke-1            (optional: the device whose key signed; default the hub itself)

    {"event_id": "...", "device_id": "smoke-1", ...}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from iot_bridge.app import BridgeRefusal
from iot_bridge.events import ID_PATTERN
from iot_bridge.intake import IntakeOutcome

__all__ = ["CMD_ACK", "EVENTS", "HEADER_NAMES", "BadTopic", "HubMessage", "Route", "ack", "cmd_ack_filter",
           "events_filter", "nack", "read_payload", "read_topic"]

#: The leaves a hub publishes on: its signed events, its answers to commands.
EVENTS, CMD_ACK = "events", "cmd-ack"

#: The header lines a payload may carry; any other is refused (deny by default).
HEADER_NAMES = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature", "iim-device"})
_MAX_HEADER_BLOCK = 4096
_HEADER_LINE = re.compile(r"([A-Za-z0-9-]{1,64}):[ \t]*([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)[ \t]*")
_ID = re.compile(ID_PATTERN)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}(?:/[A-Za-z0-9_.-]{1,64}){0,3}")


class BadTopic(ValueError):
    """A message on a topic outside the layout (the broker's ACL should make this impossible)."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which hub of which tenant a message came from (or a reply goes to)."""

    prefix: str
    tenant: UUID
    hub: str
    leaf: str = EVENTS  # where the message came (for a reply: unused)

    def topic(self, leaf: str) -> str:
        return f"{self.prefix}/{self.tenant}/{self.hub}/{leaf}"


def check_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the MQTT topic prefix is 1-4 levels of [A-Za-z0-9_.-]")
    return prefix


def events_filter(prefix: str) -> str:
    """The one subscription IIM makes: every hub's events."""
    return f"{check_prefix(prefix)}/+/+/{EVENTS}"


def cmd_ack_filter(prefix: str) -> str:
    """The second subscription: every hub's answers to commands."""
    return f"{check_prefix(prefix)}/+/+/{CMD_ACK}"


def read_topic(prefix: str, topic: str) -> Route:
    """The route of ``{prefix}/{tenant}/{hub}/events`` or ``.../cmd-ack``; anything else is :class:`BadTopic`."""
    head = f"{prefix}/"
    if not topic.startswith(head):
        raise BadTopic("not under the prefix")
    parts = topic[len(head):].split("/")
    if len(parts) != 3 or parts[2] not in (EVENTS, CMD_ACK):
        raise BadTopic("not {tenant}/{hub}/events or {tenant}/{hub}/cmd-ack")
    try:
        tenant = UUID(parts[0])
    except ValueError:
        raise BadTopic("the tenant level is not a UUID") from None
    if str(tenant) != parts[0] or not _ID.fullmatch(parts[1]):
        raise BadTopic("the tenant is not a canonical UUID or the hub is not an id")
    return Route(prefix, tenant, parts[1], parts[2])


@dataclass(frozen=True, slots=True)
class HubMessage:
    """A payload split into what the bridge verifies: the signed bytes and how they are signed."""

    jose: bool
    body: bytes
    headers: dict[str, str]
    device: str | None

    @property
    def msg_id(self) -> str | None:
        """The sender's message id as given (unverified): echoed in the reply, which only that hub reads."""
        value = self.headers.get("webhook-id")
        return value if value is not None and _ID.fullmatch(value) else None


def read_payload(payload: bytes, *, max_body: int) -> HubMessage:
    """Split a payload (see the module docstring). Nothing of the body is parsed here: the bridge verifies the
    signature over these exact bytes first.

    Raises:
        BridgeRefusal: 413 over ``max_body``; 400 for a header block that is not the one described.
    """
    if len(payload) > max_body:
        raise BridgeRefusal(413, "body-too-large", "the message is over the size limit")
    split = _split(payload)
    if split is None:
        return HubMessage(True, payload, {}, None)  # no header block: a compact JWS
    block, body = split
    headers: dict[str, str] = {}
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise BridgeRefusal(400, "malformed-message", "the header block is not ASCII") from None
    for line in text.splitlines():
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise BridgeRefusal(400, "malformed-message", "a header line is not 'name: value'")
        name = match[1].lower()
        if name not in HEADER_NAMES:
            raise BridgeRefusal(400, "malformed-message", "a header is not one of " + ", ".join(sorted(HEADER_NAMES)))
        if name in headers:
            raise BridgeRefusal(400, "malformed-message", "a header is repeated")
        headers[name] = match[2]
    device = headers.pop("iim-device", None)
    if device is not None and not _ID.fullmatch(device):
        raise BridgeRefusal(400, "malformed-message", "iim-device is not a device id")
    return HubMessage(False, body, headers, device)


def _split(payload: bytes) -> tuple[bytes, bytes] | None:
    """(header block, body) at the first blank line within the first 4 KiB, or None (no header block)."""
    head = payload[:_MAX_HEADER_BLOCK + 4]
    candidates = [(i, 4) for i in (head.find(b"\r\n\r\n"),) if i >= 0]
    candidates += [(i, 2) for i in (head.find(b"\n\n"),) if i >= 0]
    if not candidates:
        return None
    index, width = min(candidates)
    if index > _MAX_HEADER_BLOCK:
        return None
    return payload[:index], payload[index + width:]


def ack(outcome: IntakeOutcome, msg_id: str | None) -> bytes:
    """The reply to an event committed now or before (``replayed``): ``code`` 202 and the body the HTTPS bridge
    answers with (``status``, ``event_id``, ``incident_id``, ...)."""
    body: dict[str, Any] = {"code": 202, "replayed": outcome.kind == "replayed", **outcome.body}
    if msg_id is not None:
        body["msg_id"] = msg_id
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def nack(refusal: BridgeRefusal, msg_id: str | None) -> bytes:
    """The reply to a refused event: ``code`` (the HTTPS bridge's status), error id and detail (never the input)."""
    body: dict[str, Any] = {"code": refusal.status, "error_id": refusal.error_id, "detail": refusal.detail}
    for key, value in (("event_id", refusal.event_id), ("msg_id", msg_id), ("retry_after", refusal.retry_after),
                       ("errors", refusal.errors)):
        if value is not None:
            body[key] = value
    return json.dumps(body, separators=(",", ":")).encode()
