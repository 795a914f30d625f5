"""What every SMS transport offers the outbox: submit, typed failures, and inbound MO and receipts.

The outbox (``iim.sms.outbox``) is the only durable state. A transport keeps nothing across a restart:
in-flight correlation (SMPP sequence numbers) lives in memory, and whatever was not confirmed when the
process stopped is submitted again from the outbox. The failures are split by what the outbox should do:

* :class:`TemporaryFailure` (``Throttled``, ``QueueFull``, ``TransportDown``, other transient SMSC errors):
  back to the queue with exponential backoff;
* :class:`Rejected`: permanent (bad destination, bad message); the row becomes ``failed``.

Both carry ``accepted``: the parts the SMSC did accept before the failure (by part index), so a retry sends
only the missing parts of a long message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable
from uuid import UUID

__all__ = [
    "MoHandler", "MoSms", "OutboundSms", "QueueFull", "Receipt", "ReceiptHandler", "ReceiptState", "Rejected",
    "SmsTransport", "SmsTransportError", "SubmitResult", "TemporaryFailure", "Throttled", "TransportDown",
    "to_e164",
]


@dataclass(frozen=True, slots=True)
class OutboundSms:
    """One outbox row, as a transport sees it.

    ``reference`` is the outbox row id: globally unique and stable across retries. It travels to the SMSC as
    a client reference where the protocol has a place for it (an SMPP vendor TLV, the HTTP ``reference``),
    so an SMSC that honours it can drop a resubmission. ``done_parts`` maps part index -> SMSC message id
    for parts already accepted by an earlier attempt; they are not sent again.
    """

    reference: UUID
    msisdn: str
    body: str
    flash: bool = False
    source: str | None = None
    done_parts: Mapping[int, str] = field(default_factory=dict)

    @property
    def concat_ref(self) -> int:
        """The 8-bit concatenation reference: from the row id, so resent parts join the earlier ones."""
        return self.reference.int & 0xFF


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The SMSC message id of every part, in part order (one entry for a single SMS)."""

    message_ids: tuple[str, ...]

    @property
    def segments(self) -> int:
        return len(self.message_ids)


class SmsTransportError(Exception):
    """A submit did not complete. ``accepted``: parts (index -> SMSC id) accepted before it failed."""

    def __init__(self, detail: str, *, code: int | None = None, accepted: Mapping[int, str] | None = None,
                 parts: int = 0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.accepted: dict[int, str] = dict(accepted or {})
        self.parts = parts


class TemporaryFailure(SmsTransportError):
    """Try again later (the SMSC is busy or failing transiently)."""


class Throttled(TemporaryFailure):
    """ESME_RTHROTTLED (or HTTP 429): we exceed the SMSC's rate."""


class QueueFull(TemporaryFailure):
    """ESME_RMSGQFUL: the SMSC's queue (or the subscriber's) is full."""


class TransportDown(TemporaryFailure):
    """Not bound, connection lost, or no answer in time; the SMSC may or may not have the message."""


class Rejected(SmsTransportError):
    """Permanent refusal (ESME_RINVDSTADR, HTTP 4xx, ...); sending again would fail the same way."""


class ReceiptState(StrEnum):
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    EXPIRED = "expired"
    REJECTED = "rejected"
    DELETED = "deleted"
    ACCEPTED = "accepted"
    ENROUTE = "enroute"
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        return self not in (ReceiptState.ACCEPTED, ReceiptState.ENROUTE)

    @property
    def failed(self) -> bool:
        return self in (ReceiptState.UNDELIVERED, ReceiptState.EXPIRED, ReceiptState.REJECTED,
                        ReceiptState.DELETED, ReceiptState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A delivery receipt for one part (one SMSC message id)."""

    transport: str
    message_id: str
    state: ReceiptState
    error: str | None = None
    raw: str = ""


@dataclass(frozen=True, slots=True)
class MoSms:
    """A mobile-originated SMS (reassembled when it came in parts).

    ``sms_id`` is the SMSC's id for it when the SMSC sends one; otherwise None and the outbox derives a
    content hash for deduplication of redeliveries. ``source_received``: the source as the SMSC sent it when it
    did not say the number is international (``source`` is then only a guess, :func:`to_e164`): the national form
    ``89041234567`` must be read under the tenant's numbering plan, which the transport does not know.
    """

    transport: str
    source: str
    destination: str
    body: str
    received_at: datetime
    sms_id: str | None = None
    source_received: str | None = None


MoHandler = Callable[[MoSms], Awaitable[None]]
ReceiptHandler = Callable[[Receipt], Awaitable[None]]


@runtime_checkable
class SmsTransport(Protocol):
    """An SMSC connection. ``submit`` raises the typed errors above; inbound traffic goes to the handlers.

    Handlers are awaited before the SMSC is acknowledged (an MO handler that returns has stored the MO; if
    it raises, the SMSC is not acknowledged where the protocol allows, and redelivers).
    """

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool:
        """Worth submitting now (SMPP: bound). The sender does not claim rows while this is False."""
        ...

    def bind_inbound(self, on_mo: MoHandler, on_receipt: ReceiptHandler) -> None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def submit(self, msg: OutboundSms) -> SubmitResult: ...


def to_e164(address: str, ton: int = 1) -> str:
    """An SMPP/HTTP address as E.164 (``+`` and digits) when it is an international number, else unchanged.

    TON 1 (international) digits get a ``+``; so do unknown-TON (0) digit strings of 11+ digits, which is how
    many SMSCs send international numbers. Short codes and alphanumeric senders stay as they are.
    """
    text = address.strip()
    if text.startswith("+"):
        return text
    if text.isdigit() and (ton == 1 or (ton == 0 and len(text) >= 11)):
        return "+" + text
    return text

