"""The WebRTC test speaker's sans-I/O parts (tests/sip_client.py, tests/webrtc_speaker.py): what it reads from the
edge and what it sends back, without a socket, a switch or aiortc."""

from __future__ import annotations

from tests import sip_client
from tests.webrtc_speaker import with_explicit_direction, with_one_fingerprint

INVITE = (
    b"INVITE sip:browser@abc.invalid;transport=ws SIP/2.0\r\n"
    b"Via: SIP/2.0/WSS 127.0.0.1:7443;branch=z9hG4bKedge;rport\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKfs\r\n"
    b"Record-Route: <sip:127.0.0.1:7443;transport=ws;r2=on;lr>\r\n"
    b"Record-Route: <sip:127.0.0.1:5060;r2=on;lr>\r\n"
    b"From: <sip:79160000000@127.0.0.1>;tag=fs1\r\n"
    b"To: <sip:browser@iim.test>\r\n"
    b"Call-ID: call-1\r\n"
    b"CSeq: 10 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)


def test_a_request_is_told_from_a_response_and_parsed() -> None:
    request = sip_client.parse_message(INVITE)
    assert isinstance(request, sip_client.IncomingRequest)
    assert (request.method, request.uri, request.body) == ("INVITE", "sip:browser@abc.invalid;transport=ws", "v=0\n")
    assert len(request.all("via")) == 2
    response = sip_client.parse_message(b"SIP/2.0 401 Unauthorized\r\nCSeq: 1 REGISTER\r\n\r\n")
    assert isinstance(response, sip_client.Response)
    assert response.code == 401


def test_a_reply_copies_the_transaction_and_route_headers_and_tags_the_to() -> None:
    request = sip_client.parse_message(INVITE)
    assert isinstance(request, sip_client.IncomingRequest)
    reply = sip_client.parse_response(sip_client.reply(request, 200, "OK", to_tag="me",
                                                       contact="sip:browser@abc.invalid;transport=ws", body="v=0"))
    assert (reply.code, reply.reason) == (200, "OK")
    assert [value for name, value in reply.headers if name == "Via"] == request.all("Via")
    assert [value for name, value in reply.headers if name == "Record-Route"] == request.all("Record-Route")
    assert reply.header("To") == "<sip:browser@iim.test>;tag=me"
    assert (reply.header("Call-ID"), reply.header("CSeq")) == ("call-1", "10 INVITE")
    assert reply.header("Content-Length") == "3"


def test_an_offer_without_a_direction_gets_sendrecv_on_each_media_section() -> None:
    offer = "v=0\r\ns=-\r\nm=audio 1 RTP/SAVPF 8\r\na=rtpmap:8 PCMA/8000\r\nm=video 2 RTP/SAVPF 96\r\na=recvonly\r\n"
    assert with_explicit_direction(offer) == (
        "v=0\r\ns=-\r\nm=audio 1 RTP/SAVPF 8\r\na=rtpmap:8 PCMA/8000\r\na=sendrecv\r\n"
        "m=video 2 RTP/SAVPF 96\r\na=recvonly\r\n")


def test_the_answer_keeps_only_its_sha256_fingerprint() -> None:
    answer = ("m=audio 9 UDP/TLS/RTP/SAVPF 8\r\na=fingerprint:sha-256 AA:BB\r\na=fingerprint:sha-384 CC\r\n"
              "a=fingerprint:sha-512 DD\r\na=setup:active\r\n")
    assert with_one_fingerprint(answer) == "m=audio 9 UDP/TLS/RTP/SAVPF 8\r\na=fingerprint:sha-256 AA:BB\r\na=setup:active\r\n"
