"""Fault injection knobs and the writer that applies them to one socket.

Without faults :class:`FrameWriter` is a thin veneer over ``transport.write`` (one
call per FreeSWITCH ``send()``). With faults it can fragment every write into random
chunks (seeded, down to 1 byte, each chunk its own ``write`` on a later loop turn),
coalesce everything written during one loop turn into a single write, stall (a
silent peer: stop reading and writing), or reset the connection with an RST.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Adversity for tests. All off by default.

    Attributes:
        fragment: split every write into random chunks of 1..``fragment_max`` bytes.
        fragment_max: largest chunk when fragmenting.
        fragment_delay_ms: pause between chunks (0: one event-loop turn).
        seed: seed of the fragmentation RNG (reproducible chunk boundaries).
        coalesce: gather all writes of one loop turn into a single ``write``.
        flood_events: fire this many extra CHANNEL_APPLICATION events in one burst right
            after CHANNEL_PARK (with ``coalesce`` they arrive in one chunk).
        stall_after_ms / stall_on_app: become a silent peer (no reads, no writes).
        reset_after_ms / reset_on_app: abort the TCP connection with an RST.
        overflow_after_events: after this many delivered events, kill the listener the way
            FreeSWITCH does on event-queue overflow (``killed listener because of lost events``).
        huge_connect_reply: pad the channel with variables so the connect reply exceeds 64 KiB.
        event_header_lines: add this many variables, so every event carrying variables has
            more header lines than that.
        multibyte_values: add UTF-8 heavy variables (and they travel URL-encoded).
        early_notice: send the linger notice (or, without linger, the disconnect) right after
            CHANNEL_HANGUP, before the rest of the teardown events; without linger the later
            events are lost, as on a loaded FreeSWITCH.
    """

    fragment: bool = False
    fragment_max: int = 16
    fragment_delay_ms: float = 0.0
    seed: int = 0
    coalesce: bool = False
    flood_events: int = 0
    stall_after_ms: float | None = None
    stall_on_app: str | None = None
    reset_after_ms: float | None = None
    reset_on_app: str | None = None
    overflow_after_events: int | None = None
    huge_connect_reply: bool = False
    event_header_lines: int = 0
    multibyte_values: bool = False
    early_notice: bool = False

    @property
    def shapes_writes(self) -> bool:
        return self.fragment or self.coalesce


NO_FAULTS = FaultConfig()


def set_rst_on_close(transport: asyncio.BaseTransport) -> None:
    """SO_LINGER {on, 0}: the next close sends RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class FrameWriter:
    """Writes FreeSWITCH ``send()`` calls to a transport, shaping them per :class:`FaultConfig`."""

    __slots__ = ("_buf", "_close_after", "_closed", "_delay", "_flush_handle", "_frag_max", "_loop",
                 "_pending", "_plain", "_pump_handle", "_rng", "_seed", "_stalled", "_transport", "bytes_written", "coalesce",
                 "fragment")

    def __init__(self, transport: asyncio.WriteTransport, faults: FaultConfig) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self.fragment = faults.fragment
        self.coalesce = faults.coalesce
        self._frag_max = max(1, faults.fragment_max)
        self._delay = faults.fragment_delay_ms / 1000.0
        self._seed = faults.seed
        self._rng: random.Random | None = None
        self._pending: deque[bytes] = deque()
        self._buf: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._pump_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._close_after = False
        self._closed = False
        self._stalled = False
        self._plain = not (self.coalesce or self.fragment)
        self.bytes_written = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        """One FreeSWITCH ``send()``."""
        if self._closed or self._stalled or not data:
            return
        self.bytes_written += len(data)
        if self.coalesce:
            self._buf.append(data)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
            return
        if self.fragment:
            self._enqueue_fragments(data)
            return
        self._transport.write(data)

    def write_pair(self, head: bytes, body: bytes) -> None:
        """Header and body as two sends, as FreeSWITCH writes events and notices."""
        if self._plain and not self._closed:
            self.bytes_written += len(head) + len(body)
            write = self._transport.write
            write(head)
            write(body)
            return
        self.write(head)
        self.write(body)

    def buffered(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(c) for c in self._pending)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._buf or self._stalled:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        if self.fragment:
            self._enqueue_fragments(data)
        elif not self._transport.is_closing():
            self._transport.write(data)
        if self._close_after and not self._pending:
            self._do_close()

    def _enqueue_fragments(self, data: bytes) -> None:
        rng = self._rng
        if rng is None:
            rng = self._rng = random.Random(self._seed)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            size = rng.randint(1, self._frag_max)
            self._pending.append(bytes(view[pos : pos + size]))
            pos += size
        if self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        if self._stalled or not self._pending:
            return
        if not self._transport.is_closing():
            self._transport.write(self._pending.popleft())
        else:
            self._pending.clear()
        if self._pending:
            if self._delay:
                self._pump_handle = self._loop.call_later(self._delay, self._pump)
            else:
                self._pump_handle = self._loop.call_soon(self._pump)
        elif self._close_after and not self._buf:
            self._do_close()

    def close(self) -> None:
        """Close after everything written so far has gone out (FIN)."""
        if self._closed:
            return
        self._closed = True
        self._plain = False
        if self._buf or self._pending:
            self._close_after = True
            if self._buf and self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
            return
        self._transport.close()

    def _do_close(self) -> None:
        self._close_after = False
        self._transport.close()

    def stall(self) -> None:
        """Become a silent peer: stop reading, drop everything not yet written."""
        self._stalled = True
        self._plain = False
        self._buf.clear()
        self._pending.clear()
        try:
            self._transport.pause_reading()  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            pass

    def reset(self) -> None:
        """Abort the connection with an RST (SO_LINGER 0)."""
        self._closed = True
        self._plain = False
        self._buf.clear()
        self._pending.clear()
        set_rst_on_close(self._transport)
        self._transport.abort()
