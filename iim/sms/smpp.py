"""SMPP 3.4 transport on aiosmpplib: bind transceiver, ``submit_sm`` per part, MO and receipts from ``deliver_sm``.

What aiosmpplib does for us: the TCP session, bind, ``enquire_link``, sequence numbers, answering
``deliver_sm`` (after our handler returns), reconnect and rebind. What we replace, through its plug-in
points:

* **PDU body.** Our :mod:`iim.sms.segments` builds the parts (UDH, ``data_coding``); aiosmpplib's own
  encoder cannot express flash SMS (``data_coding`` 0x10/0x18 is not in its ``SmppDataCoding``), so the
  ``submit_sm`` we enqueue renders its own body (:class:`_PartSubmitSm`), with our client reference in a
  vendor TLV (:data:`CLIENT_REF_TAG`).
* **Broker, correlator, hook, throttle handler** (all in memory; the outbox in PostgreSQL is the durable
  part). The library's ``SimpleCorrelator`` rescans every stored id on each put (quadratic under load)
  and keeps receipt correlations for three days; ours keeps only in-flight sequence numbers. Its
  ``SimpleThrottleHandler`` pauses the whole session for 3 s once 1 % of answers are throttled; the
  outbox backs off per message instead, so ours always allows.
* **Parsing inbound ``deliver_sm``.** The hook gets the raw PDU; we parse it ourselves (receipts by
  ``esm_class``, text or TLVs; MO with UDH reassembly). aiosmpplib's ``DeliverSm.parse_receipt`` raises on
  a 12-digit ``submit date`` (YYMMDDhhmmss, common) *outside* its error handling, which drops the session
  before the ``deliver_sm_resp``: the SMSC redelivers the receipt and the session loops. We register a
  ``DeliverSm`` subclass whose ``parse_receipt`` cannot raise.

Limits of aiosmpplib 0.7.4 we cannot plug around (documented, not fixed): a ``command_status`` outside its
enum (vendor codes 0x400-0x4FF) in any response raises while reading the header and drops the session
(the submit is then retried as ``TransportDown``); a ``deliver_sm`` whose ``data_coding`` it does not know
(e.g. class-0 MO, 0x10/0x18) is answered with ``generic_nack`` by the library before we see it as valid,
so such MO are not stored.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import random
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from aiosmpplib import (  # type: ignore[import-untyped]
    ESME,
    NPI,
    TON,
    AbstractBroker,
    AbstractCorrelator,
    AbstractHook,
    AbstractRetryTimer,
    AbstractThrottleHandler,
    BindTransceiverResp,
    DeliverSm,
    GenericNack,
    PhoneNumber,
    SmppCommand,
    SmppCommandStatus,
    SmppDataCoding,
    SmppSessionState,
    SubmitSm,
    SubmitSmResp,
)
from aiosmpplib import protocol as _aio_protocol
from aiosmpplib.codec import find_codec_info  # type: ignore[import-untyped]

from iim.core.errors import ConfigError
from iim.core.lifecycle import AsyncResource
from iim.core.retry import backoff_delay
from iim.sms.segments import decode_part, encode_sms
from iim.sms.transport import (
    MoHandler,
    MoSms,
    OutboundSms,
    QueueFull,
    Receipt,
    ReceiptHandler,
    ReceiptState,
    Rejected,
    SmsTransportError,
    SubmitResult,
    TemporaryFailure,
    Throttled,
    TransportDown,
    to_e164,
)

__all__ = ["CLIENT_REF_TAG", "SmppSettings", "SmppTransport", "parse_deliver_sm", "parse_receipt_text"]

log = logging.getLogger("iim.messaging.smpp")

#: Vendor-specific TLV (0x1400..0x3FFF) carrying our client reference (the outbox row id) in submit_sm.
CLIENT_REF_TAG = 0x1450

ESME_ROK = 0x00
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
#: transient SMSC answers: system error, temporary application error, unknown error
_TEMPORARY = frozenset({0x08, 0x64, 0xFF})

_TLV_RECEIPTED_MESSAGE_ID = 0x001E
_TLV_MESSAGE_PAYLOAD = 0x0424
_TLV_MESSAGE_STATE = 0x0427
_TLV_NETWORK_ERROR_CODE = 0x0423
_TLV_SAR_MSG_REF_NUM = 0x020C
_TLV_SAR_TOTAL_SEGMENTS = 0x020E
_TLV_SAR_SEGMENT_SEQNUM = 0x020F

_STAT = {"DELIVRD": ReceiptState.DELIVERED, "DELIVERED": ReceiptState.DELIVERED,
         "UNDELIV": ReceiptState.UNDELIVERED, "UNDELIVERABLE": ReceiptState.UNDELIVERED,
         "EXPIRED": ReceiptState.EXPIRED, "REJECTD": ReceiptState.REJECTED, "REJECTED": ReceiptState.REJECTED,
         "DELETED": ReceiptState.DELETED, "ACCEPTD": ReceiptState.ACCEPTED, "ACCEPTED": ReceiptState.ACCEPTED,
         "ENROUTE": ReceiptState.ENROUTE, "UNKNOWN": ReceiptState.UNKNOWN}
# message_state TLV values (SMPP 3.4 5.3.2.35)
_MESSAGE_STATE = {1: ReceiptState.ENROUTE, 2: ReceiptState.DELIVERED, 3: ReceiptState.EXPIRED,
                  4: ReceiptState.DELETED, 5: ReceiptState.UNDELIVERED, 6: ReceiptState.ACCEPTED,
                  7: ReceiptState.UNKNOWN, 8: ReceiptState.REJECTED}


@dataclass(frozen=True, slots=True)
class SmppSettings:
    """One SMSC account. ``password`` is the resolved secret (``iim.settings.resolve_secret(ref)``)."""

    host: str
    port: int
    system_id: str
    password: str
    system_type: str = ""
    #: our sender address: "+7..." (international), digits (short code) or alphanumeric (<= 11 chars)
    source_addr: str = "IIM"
    service_type: str = ""
    #: concurrent unanswered submit_sm (SMPP window)
    window: int = 64
    #: no submit_sm_resp within this -> TransportDown (the SMSC may still have it)
    response_timeout: float = 10.0
    enquire_link_interval: float = 30.0
    socket_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 30.0
    #: 1 = SMSC delivery receipt on success and failure
    registered_delivery: int = 1
    #: vendor TLV for our client reference; None when the SMSC refuses unknown TLVs
    client_ref_tag: int | None = CLIENT_REF_TAG
    #: transport name: receipts are correlated by (name, SMSC message id)
    name: str = "smpp"
    #: aiosmpplib's own logger (it logs to its own handler; forwarded to ``iim.messaging.aiosmpplib``)
    library_log_level: str = "ERROR"
    #: incomplete concatenated MO are dropped after this
    mo_reassembly_ttl: float = 300.0

    def __post_init__(self) -> None:
        """SMPP 3.4's bind fields are C-octet strings of fixed maximum size (4.1.1): refuse a longer value here,
        as a configuration error naming the field, instead of a crash inside the SMPP library at start."""
        for name, most in (("system_id", 15), ("password", 8), ("system_type", 12)):
            value: str = getattr(self, name)
            if len(value.encode("ascii", "replace")) > most:
                raise ConfigError(f"SMPP {name} is longer than SMPP 3.4 allows ({most} characters)")
            if not value.isascii():
                raise ConfigError(f"SMPP {name} must be ASCII (SMPP 3.4 C-octet string)")


def _address(addr: str) -> tuple[int, int, str]:
    """(TON, NPI, digits/text) for an SMPP address field."""
    if addr.startswith("+") and addr[1:].isdigit():
        return TON.INTERNATIONAL, NPI.ISDN, addr[1:]
    if addr.isdigit():
        return (TON.INTERNATIONAL, NPI.ISDN, addr) if len(addr) >= 11 else (TON.NETWORK_SPECIFIC, NPI.ISDN, addr)
    return TON.ALPHANUMERIC, NPI.UNKNOWN, addr


def _cstr(value: str) -> bytes:
    return value.encode("ascii") + b"\x00"


class _PartSubmitSm(SubmitSm):  # type: ignore[misc]
    """A ``submit_sm`` whose body we render (one prepared part: UDH, data_coding, TLVs)."""

    def __init__(self, *, destination: str, source: str, short_message: bytes, esm_class: int, data_coding: int,
                 registered_delivery: int, service_type: str, tlvs: bytes, log_id: str) -> None:
        d_ton, d_npi, d_addr = _address(destination)
        s_ton, s_npi, s_addr = _address(source)
        super().__init__(short_message=" ", source=PhoneNumber(s_addr, TON(s_ton), NPI(s_npi)),
                         destination=PhoneNumber(d_addr, TON(d_ton), NPI(d_npi)), log_id=log_id)
        self._body = (
            _cstr(service_type) + bytes((s_ton, s_npi)) + _cstr(s_addr) + bytes((d_ton, d_npi)) + _cstr(d_addr)
            + bytes((esm_class, 0, 0)) + b"\x00" + b"\x00"  # protocol_id, priority; schedule, validity: none
            + bytes((registered_delivery, 0, data_coding, 0, len(short_message))) + short_message + tlvs)

    def pdu(self) -> bytes:
        return cast(bytes, self.pack_header(16 + len(self._body))) + self._body


class _TolerantDeliverSm(DeliverSm):  # type: ignore[misc]
    """aiosmpplib's DeliverSm, except that a receipt it cannot parse yields {} instead of dropping the session."""

    def parse_receipt(self) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], super().parse_receipt())
        except ValueError:
            self._parsed_receipt: dict[str, Any] = {}
            return {}


# Installed once at import: the library looks deliver_sm's class up in this table for every PDU.
_aio_protocol.MESSAGE_TYPE_MAP[SmppCommand.DELIVER_SM] = _TolerantDeliverSm


def _lenient(decode: Callable[..., tuple[str, int]]) -> Callable[..., tuple[str, int]]:
    def run(data: bytes, errors: str = "strict") -> tuple[str, int]:
        return decode(data, "replace")
    return run


def _lenient_codecs() -> dict[str, codecs.CodecInfo]:
    """aiosmpplib decodes every deliver_sm's text strictly and answers ``generic_nack`` when it cannot (a
    receipt quoting a byte outside the GSM alphabet, an odd-length UCS-2 body): the SMSC then redelivers
    it forever. We read the raw PDU ourselves, so its decoding only has to not fail."""
    out: dict[str, codecs.CodecInfo] = {}
    for name in SmppDataCoding.__members__:
        try:
            base = find_codec_info(name)
        except LookupError:
            continue
        out[name] = codecs.CodecInfo(base.encode, _lenient(base.decode), name=name)
    return out


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[str]
    generation: int
    part: int


@dataclass(frozen=True, slots=True)
class _Interrupt:
    generation: int


class _Broker(AbstractBroker):  # type: ignore[misc]
    """In-memory queue into the library's sender. Parts whose submit already gave up are dropped, never sent
    late. :meth:`interrupt` ends the sender of a dead session at once (aiosmpplib would wait 0.5 s and cancel
    it), so the next bind is not held up."""

    def __init__(self, live: Callable[[str], bool], generation: Callable[[], int]) -> None:
        self.queue: asyncio.Queue[_PartSubmitSm | _Interrupt] = asyncio.Queue()
        self._live = live
        self._generation = generation
        self.closed = False

    async def enqueue(self, message: _PartSubmitSm) -> None:
        self.queue.put_nowait(message)

    def interrupt(self, generation: int) -> None:
        self.queue.put_nowait(_Interrupt(generation))

    async def dequeue(self) -> _PartSubmitSm:
        mine = self._generation()
        while True:
            message = await self.queue.get()
            if isinstance(message, _Interrupt):
                if self.closed or message.generation == mine:
                    # A ConnectionError is what aiosmpplib's task reaper expects from a dying session.
                    raise ConnectionAbortedError("SMPP session over")
                continue
            if self._live(message.log_id):
                return message


class _Correlator(AbstractCorrelator):  # type: ignore[misc]
    """Sequence number -> request for in-flight PDUs only (answers we never get expire after ``ttl``)."""

    def __init__(self, ttl: float) -> None:
        self._store: OrderedDict[int, tuple[float, Any]] = OrderedDict()
        self._ttl = ttl

    def get_cumulated_status(self, ref_num: int) -> int:
        return 0

    async def expired(self, smpp_message: Any) -> None:
        return None

    async def put(self, smpp_message: Any) -> None:
        now = time.monotonic()
        while self._store:
            seq, (at, _) = next(iter(self._store.items()))
            if now - at < self._ttl:
                break
            del self._store[seq]
        self._store[smpp_message.sequence_num] = (now, smpp_message)

    async def put_delivery(self, smsc_message_id: str, submit_sm: Any) -> None:
        return None  # receipts are correlated in PostgreSQL (outbox), not here

    async def put_delivery_segmented(self, deliver_sm: Any) -> Any:
        return deliver_sm  # we reassemble MO ourselves, from the raw PDUs

    async def get(self, response: Any) -> Any:
        item = self._store.pop(response.sequence_num, None)
        return item[1] if item else None

    async def get_segmented(self, smpp_seq_num: int, remove: bool = False) -> tuple[None, int]:
        return None, 0

    async def get_delivery(self, receipt: Any) -> None:
        return None


class _AlwaysAllow(AbstractThrottleHandler):  # type: ignore[misc]
    async def throttled(self) -> None:
        return None

    async def not_throttled(self) -> None:
        return None

    async def allow_request(self) -> bool:
        return True

    async def throttle_delay(self) -> float:
        return 0.0


class _Backoff(AbstractRetryTimer):  # type: ignore[misc]
    """Reconnect delays: exponential with full jitter, so a fleet does not rebind in lockstep."""

    def __init__(self, low: float, high: float) -> None:
        self._low, self._high = low, high
        self._attempt = 0

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())
        self._attempt += 1

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        """Uniform between the floor and the kernel's exponential ceiling for this attempt."""
        return random.uniform(self._low, backoff_delay(self._attempt + 1, self._low, self._high, jitter=0))


class _ForwardHandler(logging.Handler):
    """aiosmpplib logs through its own StructuredLogger and handler; re-emit into our JSON logging."""

    def __init__(self) -> None:
        super().__init__()
        self._target = logging.getLogger("iim.messaging.aiosmpplib")

    def emit(self, record: logging.LogRecord) -> None:
        self._target.log(record.levelno, "%s", record.getMessage())


@dataclass(frozen=True, slots=True)
class DeliverSmFields:
    esm_class: int
    data_coding: int
    source: str
    source_ton: int
    destination: str
    dest_ton: int
    short_message: bytes
    tlvs: dict[int, bytes]


def parse_deliver_sm(pdu: bytes) -> DeliverSmFields:
    """The fields we need from a raw ``deliver_sm`` PDU (header included). ``ValueError`` when malformed."""
    index = 16

    def cstr() -> str:
        nonlocal index
        end = pdu.index(b"\x00", index)
        value = pdu[index:end].decode("latin-1")
        index = end + 1
        return value

    def byte() -> int:
        nonlocal index
        if index >= len(pdu):
            raise ValueError("deliver_sm truncated")
        value = pdu[index]
        index += 1
        return value

    cstr()  # service_type
    source_ton = byte()
    byte()
    source = cstr()
    dest_ton = byte()
    byte()
    destination = cstr()
    esm_class = byte()
    byte()  # protocol_id
    byte()  # priority_flag
    cstr()  # schedule_delivery_time
    cstr()  # validity_period
    byte()  # registered_delivery
    byte()  # replace_if_present_flag
    data_coding = byte()
    byte()  # sm_default_msg_id
    length = byte()
    short_message = pdu[index:index + length]
    if len(short_message) != length:
        raise ValueError("deliver_sm short_message truncated")
    index += length
    tlvs: dict[int, bytes] = {}
    while index + 4 <= len(pdu):
        tag, size = struct.unpack_from("!HH", pdu, index)
        tlvs[tag] = pdu[index + 4:index + 4 + size]
        index += 4 + size
    return DeliverSmFields(esm_class, data_coding, source, source_ton, destination, dest_ton, short_message, tlvs)


def parse_receipt_text(text: str) -> dict[str, str]:
    """``id:... sub:... dlvrd:... submit date:... done date:... stat:... err:... text:...`` -> fields.

    Tolerant: unknown keys are kept, dates are not interpreted (SMSCs use 10 or 12 digits), ``text`` is
    the rest of the line.
    """
    fields: dict[str, str] = {}
    rest = text
    lowered = rest.lower()
    cut = lowered.find("text:")
    if cut >= 0:
        fields["text"] = rest[cut + 5:]
        rest = rest[:cut]
    keys = ("id", "sub", "dlvrd", "submit date", "done date", "stat", "err")
    positions = sorted((rest.lower().find(k + ":"), k) for k in keys if rest.lower().find(k + ":") >= 0)
    for i, (pos, key) in enumerate(positions):
        end = positions[i + 1][0] if i + 1 < len(positions) else len(rest)
        fields[key] = rest[pos + len(key) + 1:end].strip()
    return fields


def _text_of(data_coding: int, payload: bytes, *, udhi: bool) -> str:
    try:
        return decode_part(payload, data_coding, udhi=udhi)[1]
    except (ValueError, UnicodeDecodeError):
        body = payload[1 + payload[0]:] if udhi and payload else payload
        return body.decode("latin-1")


class SmppTransport(AsyncResource):
    """:class:`iim.sms.transport.SmsTransport` over one SMPP transceiver bind."""

    def __init__(self, settings: SmppSettings) -> None:
        self.settings = settings
        self._on_mo: MoHandler | None = None
        self._on_receipt: ReceiptHandler | None = None
        self._pending: dict[str, _Pending] = {}
        self._by_seq: dict[int, str] = {}
        self._generation = 0
        self._bound = False
        self._window = asyncio.Semaphore(settings.window)
        self._mo_parts: OrderedDict[tuple[str, str, int, int], tuple[float, dict[int, tuple[int, bytes]]]] = (
            OrderedDict())
        self._esme: Any = None
        self._broker = _Broker(self._live, lambda: self._generation)
        # aiosmpplib never closes its StreamWriter (it only writes EOF, or drops it on a lost link); we close
        # each session's writer ourselves once the library is done with it (the next bind, or stop).
        self._session_writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def ready(self) -> bool:
        return self._bound

    def bind_inbound(self, on_mo: MoHandler, on_receipt: ReceiptHandler) -> None:
        self._on_mo, self._on_receipt = on_mo, on_receipt

    def _new_esme(self) -> Any:
        s = self.settings
        return ESME(
            smsc_host=s.host, smsc_port=s.port, system_id=s.system_id, password=s.password,
            system_type=s.system_type, client_id=f"iim-{s.name}", enquire_link_interval=float(s.enquire_link_interval),
            log_level=s.library_log_level, log_handler=_ForwardHandler(), log_include_timestamp=False,
            hook=_Hook(self), broker=self._broker, throttle_handler=_AlwaysAllow(),
            correlator=_Correlator(ttl=max(1.0, s.response_timeout * 3)),
            retry_timer=_Backoff(s.reconnect_min, s.reconnect_max), socket_timeout=float(s.socket_timeout),
            custom_codecs=_lenient_codecs())

    async def start(self) -> None:
        self._stopping = False
        self._broker.closed = False
        self._esme = self._new_esme()
        self._task = asyncio.create_task(self._supervise(), name=f"smpp-{self.name}")
        self._watch = asyncio.create_task(self._watchdog(), name=f"smpp-{self.name}-watch")

    async def _supervise(self) -> None:
        """Run aiosmpplib's session loop; if it ever dies (it ends on exception types it does not expect), start
        a fresh ESME rather than stay unbound for good."""
        while True:
            try:
                await self._esme.start()
            except (OSError, RuntimeError, ValueError, LookupError, asyncio.IncompleteReadError) as exc:
                log.error("SMPP %s: aiosmpplib's session loop died (%r); restarting it", self.name, exc)
            if self._stopping:
                return
            self._link_lost("session loop ended")
            if self._session_writer is not None:
                self._session_writer.close()
                self._session_writer = None
            await asyncio.sleep(self.settings.reconnect_min)
            self._esme = self._new_esme()

    async def wait_bound(self, timeout: float = 10.0) -> None:
        """For tests and start-up checks: until bound (``TimeoutError`` otherwise)."""
        deadline = time.monotonic() + timeout
        while not self._bound:
            if time.monotonic() > deadline:
                raise TimeoutError(f"SMPP {self.name}: not bound after {timeout} s")
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        esme, task, watch = self._esme, self._task, self._watch
        self._task = self._watch = None
        if watch is not None:
            watch.cancel()
        self._stopping = True
        if esme is not None:
            stopper = asyncio.create_task(esme.stop())
            # esme.stop() unbinds, then waits for its tasks; its sender sits in our broker and would be given
            # 0.5 s before being cancelled. Once the session is no longer bound, end it at once.
            while not stopper.done() and esme.session_state == SmppSessionState.BOUND_TRX:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            self._broker.closed = True
            self._broker.interrupt(self._generation)
            # Likewise its keep-alive task waits for data or its enquire_link timer; wake it (private event,
            # set only to make it notice the shutdown flag).
            esme._data_received.set()
            try:
                await asyncio.wait_for(stopper, 5)
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.warning("SMPP %s: unclean stop: %r", self.name, exc)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if watch is not None:
            await asyncio.gather(watch, return_exceptions=True)
        self._link_lost("transport stopped")
        for writer in (self._session_writer, esme._writer if esme is not None else None):  # private, read-only
            if writer is not None:
                writer.close()
        self._session_writer = None

    # --- submit ------------------------------------------------------------------------------------------

    def _live(self, log_id: str) -> bool:
        entry = self._pending.get(log_id)
        return entry is not None and not entry.future.done()

    async def submit(self, msg: OutboundSms) -> SubmitResult:
        encoded = encode_sms(msg.body, flash=msg.flash, reference=msg.concat_ref)
        parts = len(encoded.parts)
        done = {i: mid for i, mid in msg.done_parts.items() if 0 <= i < parts}
        if not self._bound:
            raise TransportDown(f"SMPP {self.name} not bound", accepted=done, parts=parts)
        s = self.settings
        tlvs = b""
        if s.client_ref_tag is not None:
            ref = str(msg.reference).encode()
            tlvs = struct.pack("!HH", s.client_ref_tag, len(ref)) + ref
        loop = asyncio.get_running_loop()
        waits: list[tuple[int, asyncio.Future[str], float]] = []  # part, answer, deadline
        try:
            for index, part in enumerate(encoded.parts):
                if index in done:
                    continue
                await self._window.acquire()
                log_id = f"{msg.reference}:{index}"
                future: asyncio.Future[str] = loop.create_future()
                future.add_done_callback(functools.partial(self._settled, log_id))
                self._pending[log_id] = _Pending(future, self._generation, index)
                if not self._is_bound():  # the link went down while we waited for the window
                    future.set_exception(TransportDown(f"SMPP {self.name} link lost"))
                else:
                    await self._esme.broker.enqueue(_PartSubmitSm(
                        destination=msg.msisdn, source=msg.source or s.source_addr, short_message=part,
                        esm_class=encoded.esm_class, data_coding=encoded.data_coding,
                        registered_delivery=s.registered_delivery, service_type=s.service_type, tlvs=tlvs,
                        log_id=log_id))
                waits.append((index, future, loop.time() + s.response_timeout))
            accepted = dict(done)
            failure: SmsTransportError | None = None
            for index, future, deadline in waits:
                try:
                    accepted[index] = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    failure = _worse(failure, TransportDown(f"no submit_sm_resp within {s.response_timeout} s"))
                except SmsTransportError as exc:
                    failure = _worse(failure, exc)
        finally:
            # Timed out, or this submit was cancelled: give up on the part (frees its window slot; a part still
            # in the broker is then dropped, never sent late).
            for _, future, _ in waits:
                if not future.done():
                    future.set_exception(TransportDown("abandoned"))
        if failure is not None:
            failure.accepted = accepted
            failure.parts = parts
            raise failure
        return SubmitResult(tuple(accepted[i] for i in range(parts)))

    def _is_bound(self) -> bool:
        return self._bound

    def _settled(self, log_id: str, future: asyncio.Future[str]) -> None:
        self._window.release()
        self._pending.pop(log_id, None)
        if not future.cancelled():
            future.exception()  # retrieved here: a submit that gave up early must not leave it "never retrieved"

    def _link_lost(self, why: str) -> None:
        """Fail everything in flight: their answers will never come on this session."""
        if self._bound:
            self._broker.interrupt(self._generation)
        self._bound = False
        self._by_seq.clear()
        for entry in list(self._pending.values()):
            if not entry.future.done():
                entry.future.set_exception(TransportDown(f"SMPP {self.name}: {why}"))

    def _new_session(self) -> None:
        if self._session_writer is not None:  # a session we did not see end
            self._session_writer.close()
        self._session_writer = self._esme._writer  # private, read-only use: see _session_writer
        self._generation += 1
        for entry in list(self._pending.values()):
            if entry.generation < self._generation and not entry.future.done():
                entry.future.set_exception(TransportDown(f"SMPP {self.name}: rebound, answer lost"))
        self._by_seq.clear()
        self._bound = True
        log.info("SMPP %s bound", self.name, extra={"smsc": f"{self.settings.host}:{self.settings.port}"})

    async def _watchdog(self) -> None:
        wanted = SmppSessionState.BOUND_TRX
        while True:
            await asyncio.sleep(0.05)
            if self._bound and self._esme is not None and self._esme.session_state != wanted:
                log.warning("SMPP %s link lost", self.name)
                self._link_lost("link lost")

    # --- hook callbacks ------------------------------------------------------------------------------------

    def _sending(self, message: Any) -> None:
        if isinstance(message, _PartSubmitSm):
            self._by_seq[message.sequence_num] = message.log_id

    def _answer(self, message: Any) -> None:
        log_id = self._by_seq.pop(message.sequence_num, None)
        if log_id is None:
            return
        entry = self._pending.get(log_id)
        if entry is None or entry.future.done():
            return
        status = int(message.command_status)
        if status == ESME_ROK and isinstance(message, SubmitSmResp):
            entry.future.set_result(message.message_id)
            return
        entry.future.set_exception(_error_for(status, isinstance(message, GenericNack)))

    def _send_failed(self, message: Any, error: Exception) -> None:
        if isinstance(message, _PartSubmitSm):
            entry = self._pending.get(message.log_id)
            if entry is not None and not entry.future.done():
                entry.future.set_exception(TransportDown(f"send failed: {error!r}"))

    async def _deliver(self, pdu: bytes) -> None:
        try:
            fields = parse_deliver_sm(pdu)
        except ValueError as exc:
            log.warning("SMPP %s: unparsable deliver_sm (%s); acknowledged and dropped", self.name, exc)
            return
        kind = fields.esm_class & 0x3C
        if kind in (0x04, 0x20):  # SMSC delivery receipt, intermediate notification
            await self._receipt(fields)
        elif kind == 0:
            await self._mo(fields)
        else:  # SME acknowledgements: nothing for us
            log.info("SMPP %s: deliver_sm esm_class 0x%02x ignored", self.name, fields.esm_class)

    async def _receipt(self, f: DeliverSmFields) -> None:
        udhi = bool(f.esm_class & 0x40)
        text = _text_of(f.data_coding, f.short_message, udhi=udhi) if f.short_message else ""
        parsed = parse_receipt_text(text)
        message_id = f.tlvs.get(_TLV_RECEIPTED_MESSAGE_ID, b"").rstrip(b"\x00").decode("latin-1") or parsed.get("id", "")
        state: ReceiptState | None = None
        if f.tlvs.get(_TLV_MESSAGE_STATE):
            state = _MESSAGE_STATE.get(f.tlvs[_TLV_MESSAGE_STATE][0])
        if state is None:
            state = _STAT.get(parsed.get("stat", "").upper(), ReceiptState.UNKNOWN)
        error = parsed.get("err")
        if _TLV_NETWORK_ERROR_CODE in f.tlvs:
            error = f.tlvs[_TLV_NETWORK_ERROR_CODE].hex()
        if not message_id:
            log.warning("SMPP %s: receipt without a message id: %r", self.name, text[:120])
            return
        if self._on_receipt is not None:
            await self._on_receipt(Receipt(self.name, message_id, state, error, text[:200]))

    async def _mo(self, f: DeliverSmFields) -> None:
        udhi = bool(f.esm_class & 0x40)
        payload = f.tlvs.get(_TLV_MESSAGE_PAYLOAD) or f.short_message
        concat: tuple[int, int, int] | None = None
        if udhi:
            concat = _udh_concat(payload)
        elif _TLV_SAR_MSG_REF_NUM in f.tlvs:
            concat = (int.from_bytes(f.tlvs[_TLV_SAR_MSG_REF_NUM], "big"),
                      f.tlvs.get(_TLV_SAR_TOTAL_SEGMENTS, b"\x01")[0], f.tlvs.get(_TLV_SAR_SEGMENT_SEQNUM, b"\x01")[0])
        source = to_e164(f.source, f.source_ton)
        destination = to_e164(f.destination, f.dest_ton)
        if concat is not None and concat[1] > 1:
            body = self._reassemble(source, destination, concat, f.data_coding, payload, udhi)
            if body is None:
                return  # more parts to come (acknowledged; kept in memory)
        else:
            body = _text_of(f.data_coding, payload, udhi=udhi)
        sms_id = f.tlvs.get(_TLV_RECEIPTED_MESSAGE_ID, b"").rstrip(b"\x00").decode("latin-1") or None
        if self._on_mo is not None:
            await self._on_mo(MoSms(self.name, source, destination, body, datetime.now(UTC), sms_id,
                                    source_received=None if f.source_ton == 1 else f.source))

    def _reassemble(self, source: str, destination: str, concat: tuple[int, int, int], data_coding: int,
                    payload: bytes, udhi: bool) -> str | None:
        now = time.monotonic()
        while self._mo_parts:
            key0, (at, _) = next(iter(self._mo_parts.items()))
            if now - at < self.settings.mo_reassembly_ttl:
                break
            del self._mo_parts[key0]
            log.warning("SMPP %s: incomplete concatenated MO dropped", self.name)
        ref, total, seq = concat
        key = (source, destination, ref, total)
        _, parts = self._mo_parts.get(key, (now, {}))
        body = payload[1 + payload[0]:] if udhi else payload
        parts[seq] = (data_coding, body)
        self._mo_parts[key] = (now, parts)
        if len(parts) < total:
            return None
        del self._mo_parts[key]
        ordered = [parts[i] for i in sorted(parts)]
        joined = b"".join(b for _, b in ordered)
        return _text_of(ordered[0][0], joined, udhi=False)


def _udh_concat(payload: bytes) -> tuple[int, int, int] | None:
    if not payload:
        return None
    udh = payload[1:1 + payload[0]]
    i = 0
    while i + 2 <= len(udh):
        iei, length = udh[i], udh[i + 1]
        data = udh[i + 2:i + 2 + length]
        if iei == 0x00 and length == 3 and len(data) == 3:
            return data[0], data[1], data[2]
        if iei == 0x08 and length == 4 and len(data) == 4:
            return (data[0] << 8) | data[1], data[2], data[3]
        i += 2 + length
    return None


def _error_for(status: int, nack: bool) -> SmsTransportError:
    try:
        name = SmppCommandStatus(status).name
    except ValueError:
        name = f"0x{status:08x}"
    if status == ESME_RTHROTTLED:
        return Throttled(name, code=status)
    if status == ESME_RMSGQFUL:
        return QueueFull(name, code=status)
    if status in _TEMPORARY:
        return TemporaryFailure(name, code=status)
    return Rejected(("generic_nack " if nack else "") + name, code=status)


_SEVERITY = {Rejected: 3, Throttled: 2, QueueFull: 2, TransportDown: 1, TemporaryFailure: 1}


def _worse(current: SmsTransportError | None, new: SmsTransportError) -> SmsTransportError:
    """One failure for a multi-part submit: permanent beats throttling beats link trouble."""
    if current is None:
        return new
    return new if _SEVERITY.get(type(new), 0) > _SEVERITY.get(type(current), 0) else current


class _Hook(AbstractHook):  # type: ignore[misc]
    """aiosmpplib's callbacks into the transport. ``received`` is awaited before ``deliver_sm_resp`` is sent."""

    def __init__(self, transport: SmppTransport) -> None:
        self._t = transport

    async def sending(self, smpp_message: Any, pdu: bytes, client_id: str) -> None:
        # Called right before the library writes (no await in between). On uvloop a write to a closed
        # transport raises RuntimeError, which aiosmpplib does not expect and which ends its session loop;
        # a ConnectionError here ends just the session, and it rebinds.
        writer = self._t._esme._writer if self._t._esme is not None else None  # private, read-only use
        if writer is None or writer.transport.is_closing():
            raise ConnectionResetError("SMPP connection is closed")
        self._t._sending(smpp_message)

    async def received(self, smpp_message: Any, pdu: bytes, client_id: str) -> None:
        if len(pdu) < 16:
            return
        command = struct.unpack_from("!I", pdu, 4)[0]
        if command == SmppCommand.BIND_TRANSCEIVER_RESP:
            if isinstance(smpp_message, BindTransceiverResp) and int(smpp_message.command_status) == ESME_ROK:
                self._t._new_session()
            return
        if command == SmppCommand.UNBIND_RESP and self._t._stopping:
            # Our unbind is answered: end the library's sender now instead of after its 0.5 s grace.
            self._t._broker.closed = True
            self._t._broker.interrupt(self._t._generation)
            return
        if command == SmppCommand.UNBIND:
            self._t._link_lost("SMSC unbound")
            return
        if command in (SmppCommand.SUBMIT_SM_RESP, SmppCommand.GENERIC_NACK):
            if smpp_message is not None:
                self._t._answer(smpp_message)
            return
        if command == SmppCommand.DELIVER_SM:
            if smpp_message is None:
                log.warning("SMPP %s: aiosmpplib refused a deliver_sm it cannot decode (answered generic_nack)",
                            self._t.name, extra={"pdu": pdu[:64].hex()})
                return
            try:
                await self._t._deliver(pdu)
            except Exception as exc:
                # No deliver_sm_resp: a ConnectionError makes aiosmpplib drop and rebind the session cleanly
                # (other exception types would end its start() loop), and the SMSC redelivers.
                log.exception("SMPP %s: inbound handler failed; not acknowledged", self._t.name)
                raise ConnectionAbortedError("inbound handler failed") from exc

    async def send_error(self, smpp_message: Any, error: Exception, client_id: str) -> None:
        self._t._send_failed(smpp_message, error)
