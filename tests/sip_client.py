"""A minimal SIP client for the Kamailio tests: requests are built and responses parsed without I/O (so the
same REGISTER goes over UDP or a WebSocket), digest answers computed per RFC 2617 (qop=auth).

Only what the tests need: REGISTER, OPTIONS, out-of-dialog INVITE; one response at a time; and, for a speaker
that takes calls (tests/webrtc_speaker.py), incoming requests and the replies to them."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import time
from dataclasses import dataclass, field

_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]+))')


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive), as SIP compares header names."""
    wanted = name.lower()
    return next((value for key, value in headers if key.lower() == wanted), None)


@dataclass(frozen=True)
class Response:
    code: int
    reason: str
    headers: list[tuple[str, str]]
    raw: str

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)

    def header_names(self) -> list[str]:
        return [key.lower() for key, _ in self.headers]


def parse_response(data: bytes) -> Response:
    text = data.decode(errors="replace")
    head = text.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    _, code, reason = ([*lines[0].split(" ", 2), ""])[:3]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Response(int(code), reason, headers, text)


@dataclass(frozen=True)
class IncomingRequest:
    """A request sent to us (INVITE, ACK, BYE): what a reply needs from it."""

    method: str
    uri: str
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def _split(text: str) -> tuple[str, list[tuple[str, str]], str]:
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers, body


def parse_message(data: bytes) -> Response | IncomingRequest:
    """A response or a request, told apart by the start line."""
    text = data.decode(errors="replace")
    start, headers, body = _split(text)
    if start.startswith("SIP/2.0 "):
        return parse_response(data)
    method, uri, _ = [*start.split(" ", 2), "", ""][:3]
    return IncomingRequest(method, uri, headers, body)


def reply(request: IncomingRequest, code: int, reason: str, *, to_tag: str | None = None,
          contact: str | None = None, body: str = "", content_type: str = "application/sdp") -> bytes:
    """A response to ``request`` (RFC 3261 8.2.6: Via, From, To, Call-ID, CSeq and Record-Route copied)."""
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += [f"Via: {via}" for via in request.all("Via")]
    lines += [f"Record-Route: {rr}" for rr in request.all("Record-Route")]
    to = request.header("To") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [f"From: {request.header('From')}", f"To: {to}", f"Call-ID: {request.header('Call-ID')}",
              f"CSeq: {request.header('CSeq')}"]
    if contact:
        lines.append(f"Contact: <{contact}>")
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


@dataclass
class Request:
    method: str
    uri: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""

    def encode(self, via_transport: str, via_host: str) -> bytes:
        branch = "z9hG4bK" + secrets.token_hex(8)
        lines = [f"{self.method} {self.uri} SIP/2.0", f"Via: SIP/2.0/{via_transport} {via_host};branch={branch};rport"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(self.body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body).encode()


def register(user: str, domain: str, contact: str, *, to_user: str | None = None, cseq: int = 1,
             call_id: str | None = None, user_agent: str = "iim-test", expires: int = 300) -> Request:
    aor = f"sip:{to_user or user}@{domain}"
    return Request("REGISTER", f"sip:{domain}", [
        ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={secrets.token_hex(4)}"), ("To", f"<{aor}>"),
        ("Call-ID", call_id or secrets.token_hex(8)), ("CSeq", f"{cseq} REGISTER"), ("Contact", f"<{contact}>"),
        ("Expires", str(expires)), ("User-Agent", user_agent)])


def options(uri: str, *, user_agent: str = "iim-test") -> Request:
    return Request("OPTIONS", uri, [
        ("Max-Forwards", "70"), ("From", f"<sip:probe@iim.invalid>;tag={secrets.token_hex(4)}"), ("To", f"<{uri}>"),
        ("Call-ID", secrets.token_hex(8)), ("CSeq", "1 OPTIONS"), ("User-Agent", user_agent)])


def invite(uri: str, from_uri: str, contact: str, *, user_agent: str = "iim-test") -> Request:
    return Request("INVITE", uri, [
        ("Max-Forwards", "70"), ("From", f"<{from_uri}>;tag={secrets.token_hex(4)}"), ("To", f"<{uri}>"),
        ("Call-ID", secrets.token_hex(8)), ("CSeq", "1 INVITE"), ("Contact", f"<{contact}>"),
        ("User-Agent", user_agent)])


def authorize(request: Request, challenge: Response, user: str, password: str) -> Request:
    """The same request with the next CSeq and an Authorization/Proxy-Authorization answering ``challenge``."""
    proxy = challenge.code == 407
    header = challenge.header("Proxy-Authenticate" if proxy else "WWW-Authenticate")
    assert header is not None, challenge.raw
    assert header.lower().startswith("digest"), challenge.raw
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(header)}
    realm, nonce = params["realm"], params["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{request.method}:{request.uri}".encode()).hexdigest()
    cnonce, nc = secrets.token_hex(8), "00000001"
    answer = f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{request.uri}", algorithm=MD5'
    if "auth" in params.get("qop", "").split(","):
        response = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        answer += f', qop=auth, nc={nc}, cnonce="{cnonce}", response="{response}"'
    else:
        answer += f', response="{hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()}"'
    headers = []
    for name, value in request.headers:
        if name == "CSeq":
            number, method = value.split()
            value = f"{int(number) + 1} {method}"
        headers.append((name, value))
    headers.append(("Proxy-Authorization" if proxy else "Authorization", answer))
    return Request(request.method, request.uri, headers, request.body)


class Udp:
    """One UDP socket bound to ``host`` (any 127.0.0.0/8 address: the source the edge sees)."""

    def __init__(self, host: str) -> None:
        self.host = host

    def request(self, request: Request, target: tuple[str, int], timeout: float) -> Response | None:
        """Send and return the first final response (provisionals skipped); None after ``timeout`` of silence."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((self.host, 0))
            port = sock.getsockname()[1]
            sock.sendto(request.encode("UDP", f"{self.host}:{port}"), target)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, _ = sock.recvfrom(65535)
                except TimeoutError:
                    return None
                response = parse_response(data)
                if response.code >= 200:
                    return response
            return None

    def register(self, target: tuple[str, int], user: str, password: str, domain: str, *,
                 to_user: str | None = None, user_agent: str = "iim-test", contact: str | None = None,
                 timeout: float = 3.0, expires: int = 300) -> tuple[Response | None, Response | None]:
        """REGISTER, then answer its challenge: (the challenge, the final answer to the authorised request);
        ``expires=0`` un-registers ``contact``."""
        first = register(user, domain, contact or f"sip:{user}@{self.host}:5060", to_user=to_user,
                         user_agent=user_agent, expires=expires)
        challenge = self.request(first, target, timeout)
        if challenge is None or challenge.code not in (401, 407):
            return challenge, None
        return challenge, self.request(authorize(first, challenge, user, password), target, timeout)


def flood(source: str, target: tuple[str, int], count: int, domain: str) -> None:
    """``count`` unauthenticated REGISTERs from ``source`` as fast as one socket sends them (answers ignored)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        port = sock.getsockname()[1]
        for n in range(count):
            request = register(f"flood{n}", domain, f"sip:flood{n}@{source}:{port}")
            sock.sendto(request.encode("UDP", f"{source}:{port}"), target)
