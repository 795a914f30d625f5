"""The SMPP transport (aiosmpplib) against a real SMSC process (smpp34) on loopback: parts on the wire,
typed refusals, receipts and MO from deliver_sm, link loss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import uuid4

import pytest
import pytest_asyncio

from iim.sms.segments import reassemble
from iim.sms.smpp import SmppSettings, SmppTransport, parse_receipt_text
from iim.sms.smsc_sim import SmscProcess
from iim.sms.transport import (
    MoSms,
    OutboundSms,
    QueueFull,
    Receipt,
    ReceiptState,
    Rejected,
    SmsTransport,
    Throttled,
    TransportDown,
)
from tests.conftest import eventually

ESME_RTHROTTLED = 0x58
ESME_RMSGQFUL = 0x14
ESME_RINVDSTADR = 0x0B


@pytest.fixture(scope="module")
def smsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmscProcess]:
    proc = SmscProcess(tmp_path_factory.mktemp("smsc") / "smsc.jsonl")
    proc.start_sync()
    yield proc
    proc.stop_sync()


class Inbox:
    def __init__(self) -> None:
        self.mo: list[MoSms] = []
        self.receipts: list[Receipt] = []
        self.changed = asyncio.Event()

    async def on_mo(self, mo: MoSms) -> None:
        self.mo.append(mo)
        self.changed.set()

    async def on_receipt(self, receipt: Receipt) -> None:
        self.receipts.append(receipt)
        self.changed.set()

    async def wait(self, what: str, count: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(getattr(self, what)) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest_asyncio.fixture
async def link(smsc: SmscProcess) -> AsyncIterator[tuple[SmppTransport, Inbox]]:
    await smsc.set_rules()
    await smsc.set_receipts({})
    transport = SmppTransport(SmppSettings("127.0.0.1", smsc.port, "iim", "secret", source_addr="IIM-ALARM",
                                           response_timeout=3.0, reconnect_min=0.05, reconnect_max=0.5))
    inbox = Inbox()
    transport.bind_inbound(inbox.on_mo, inbox.on_receipt)
    await transport.start()
    await transport.wait_bound()
    yield transport, inbox
    await transport.aclose()


def _records(smsc: SmscProcess, ref: str) -> list[tuple[int, int, bytes, int]]:
    return sorted((r.seq, r.dc, r.sm, r.esm) for r in smsc.records() if r.ref == ref)


def test_the_transport_satisfies_the_protocol() -> None:
    assert isinstance(SmppTransport(SmppSettings("127.0.0.1", 1, "a", "b")), SmsTransport)


async def test_single_gsm_sms_is_one_submit_with_our_reference(link: tuple[SmppTransport, Inbox],
                                                               smsc: SmscProcess) -> None:
    transport, _ = link
    msg = OutboundSms(uuid4(), "+79001234567", "Smoke alarm at Flat 12 {kitchen}")
    result = await transport.submit(msg)
    assert result.segments == 1
    [(seq, dc, sm, esm)] = _records(smsc, str(msg.reference))
    assert (seq, dc, esm) == (1, 0x00, 0x00)
    assert reassemble([(dc, sm)], udhi=False) == msg.body
    [record] = [r for r in smsc.records() if r.ref == str(msg.reference)]
    assert (record.dest, record.src, record.id) == ("79001234567", "IIM-ALARM", result.message_ids[0])


async def test_long_russian_sms_goes_as_three_ucs2_parts_with_one_udh_reference(
        link: tuple[SmppTransport, Inbox], smsc: SmscProcess) -> None:
    transport, _ = link
    body = "Внимание! Сработал датчик дыма на кухне, квартира 12. " * 3 + "Позвоните 112."
    msg = OutboundSms(uuid4(), "+79001234567", body)
    result = await transport.submit(msg)
    assert result.segments == 3
    assert len(set(result.message_ids)) == 3
    parts = _records(smsc, str(msg.reference))
    assert [p[0] for p in parts] == [1, 2, 3]
    assert {p[1] for p in parts} == {0x08}
    assert {p[3] for p in parts} == {0x40}
    assert {p[2][:5] for p in parts} == {bytes((5, 0, 3, msg.concat_ref, 3))}
    assert reassemble([(dc, sm) for _, dc, sm, _ in parts], udhi=True) == body


async def test_flash_sms_is_data_coding_class_zero(link: tuple[SmppTransport, Inbox], smsc: SmscProcess) -> None:
    transport, _ = link
    gsm = OutboundSms(uuid4(), "+79001234567", "FIRE! Leave the flat", flash=True)
    cyr = OutboundSms(uuid4(), "+79001234567", "ПОЖАР! Покиньте квартиру", flash=True)
    await transport.submit(gsm)
    await transport.submit(cyr)
    assert _records(smsc, str(gsm.reference))[0][1] == 0x10
    assert _records(smsc, str(cyr.reference))[0][1] == 0x18


@pytest.mark.parametrize(("status", "error"), [(ESME_RTHROTTLED, Throttled), (ESME_RMSGQFUL, QueueFull),
                                               (ESME_RINVDSTADR, Rejected)])
async def test_smsc_refusals_raise_typed_errors(link: tuple[SmppTransport, Inbox], smsc: SmscProcess, status: int,
                                                error: type[Exception]) -> None:
    transport, _ = link
    await smsc.set_rules({"status": status, "destination": "79005550000", "times": 1})
    with pytest.raises(error) as refused:
        await transport.submit(OutboundSms(uuid4(), "+79005550000", "hi"))
    assert refused.value.code == status  # type: ignore[attr-defined]
    assert (await transport.submit(OutboundSms(uuid4(), "+79005550000", "hi"))).segments == 1


async def test_a_retry_sends_only_the_parts_not_yet_accepted(link: tuple[SmppTransport, Inbox],
                                                              smsc: SmscProcess) -> None:
    transport, _ = link
    msg = OutboundSms(uuid4(), "+79001234567", "x" * 400)  # 3 GSM parts
    first = await transport.submit(msg)
    again = await transport.submit(OutboundSms(msg.reference, msg.msisdn, msg.body,
                                               done_parts={0: first.message_ids[0], 2: first.message_ids[2]}))
    assert again.message_ids == first.message_ids  # the simulator honours the reference: same id for part 2
    seqs = [r.seq for r in smsc.records() if r.ref == str(msg.reference)]
    assert sorted(seqs) == [1, 2, 2, 3]


async def test_delivery_receipts_are_parsed_from_text_and_tlvs_even_with_12_digit_dates(
        link: tuple[SmppTransport, Inbox], smsc: SmscProcess) -> None:
    transport, inbox = link
    # aiosmpplib's own receipt parser raises on YYMMDDhhmmss dates and drops the session without a
    # deliver_sm_resp; with ours the session survives and the receipt arrives.
    binds = (await smsc.stats())["binds"]
    await smsc.set_receipts({"79001230001": "DELIVRD", "79001230002": "UNDELIV"}, date_format="%y%m%d%H%M%S")
    ok = await transport.submit(OutboundSms(uuid4(), "+79001230001", "one"))
    bad = await transport.submit(OutboundSms(uuid4(), "+79001230002", "two"))
    await inbox.wait("receipts", 2)
    by_id = {r.message_id: r for r in inbox.receipts}
    assert by_id[ok.message_ids[0]].state is ReceiptState.DELIVERED
    assert by_id[bad.message_ids[0]].state is ReceiptState.UNDELIVERED
    assert by_id[bad.message_ids[0]].error == "001"
    assert transport.ready
    assert (await smsc.stats())["binds"] == binds  # no rebind: the session never dropped


async def test_a_receipt_quoting_bytes_outside_the_gsm_alphabet_still_arrives(link: tuple[SmppTransport, Inbox],
                                                                               smsc: SmscProcess) -> None:
    _, inbox = link
    # aiosmpplib decodes the text strictly and would answer generic_nack (the SMSC redelivers forever).
    text = b"id:abc-1 sub:001 dlvrd:000 submit date:2611251200 done date:2611251201 stat:EXPIRED err:027 text:\x05\x00\x03\x86"
    assert await smsc.deliver(destination="IIM", source="79001234567", hex=text.hex(), esm_class=0x04) == 0
    await inbox.wait("receipts")
    [receipt] = inbox.receipts
    assert (receipt.message_id, receipt.state, receipt.error) == ("abc-1", ReceiptState.EXPIRED, "027")


async def test_mo_is_decoded_and_concatenated_parts_are_joined(link: tuple[SmppTransport, Inbox],
                                                               smsc: SmscProcess) -> None:
    _, inbox = link
    assert await smsc.deliver(destination="79001234567", source="79160000001", text="Where are you?") == 0
    text = "Мама, я дома. Всё хорошо, пожар был учебный!"
    raw = text.encode("utf-16-be")
    half = len(raw) // 2 // 2 * 2
    for seq, chunk in ((2, raw[half:]), (1, raw[:half])):  # out of order
        udh = bytes((5, 0, 3, 0x33, 2, seq))
        await smsc.deliver(destination="79001234567", source="79160000002", hex=(udh + chunk).hex(),
                           esm_class=0x40, data_coding=8)
    await inbox.wait("mo", 2)
    first, joined = inbox.mo
    assert (first.source, first.destination, first.body) == ("+79160000001", "+79001234567", "Where are you?")
    assert (joined.source, joined.body) == ("+79160000002", text)


async def test_killed_smsc_fails_in_flight_submits_and_the_transport_rebinds(tmp_path: Path) -> None:
    own = SmscProcess(tmp_path / "smsc.jsonl")
    await own.start()
    transport = SmppTransport(SmppSettings("127.0.0.1", own.port, "iim", "secret", reconnect_min=0.05,
                                           reconnect_max=0.3, response_timeout=3.0))
    transport.bind_inbound(Inbox().on_mo, Inbox().on_receipt)
    try:
        await transport.start()
        await transport.wait_bound()
        await own.kill()
        await eventually(lambda: not transport.ready, 3)
        with pytest.raises(TransportDown):
            await transport.submit(OutboundSms(uuid4(), "+79001234567", "lost?"))
        await own.start()
        await transport.wait_bound(5)
        assert (await transport.submit(OutboundSms(uuid4(), "+79001234567", "back"))).segments == 1
    finally:
        await transport.aclose()
        await own.aclose()


def test_receipt_text_parser_keeps_fields_and_tolerates_formats() -> None:
    fields = parse_receipt_text("id:0A1B sub:001 dlvrd:000 submit date:2611251230 done date:261125123059 "
                                "stat:EXPIRED err:027 Text:Hello world: x")
    assert fields["id"] == "0A1B"
    assert fields["stat"] == "EXPIRED"
    assert fields["err"] == "027"
    assert fields["done date"] == "261125123059"
    assert fields["text"] == "Hello world: x"
