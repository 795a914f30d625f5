"""The inbound socket (the application connects to FreeSWITCH on 8021).

FreeSWITCH greets with ``auth/request`` and waits 25 s for ``auth``; a wrong password
gets ``-ERR invalid`` then the disconnect notice and EOF. An address outside the ACL
gets the rude rejection and is closed before the greeting. Tests can drop every
connection (to exercise reconnect logic) and stop/start the listening socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fs_app.testing import wire
from fs_app.testing.faults import NO_FAULTS, FaultConfig
from fs_app.testing.listener import EslListener

if TYPE_CHECKING:
    from fs_app.testing.emulator import FreeSwitchEmulator

AUTH_TIMEOUT_S = 25.0


class InboundConnection(EslListener):
    """One inbound ESL client."""

    def __init__(self, emu: FreeSwitchEmulator, server: InboundServer) -> None:
        super().__init__(emu, server.faults)
        self.server = server
        self.password = server.password
        self.peer: str | None = None
        self._auth_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else None
        self.server.connections.add(self)
        if not self.server.allows(self.peer):
            head, body = wire.rude_rejection()
            self.send_pair(head, body, "text/rude-rejection")
            self.shutdown()
            return
        self.send(wire.AUTH_REQUEST, "auth/request")
        self._auth_timer = self.loop.call_later(self.server.auth_timeout_s, self._auth_timeout)

    def _auth_timeout(self) -> None:
        if not self.authed and not self.closed:
            self.finish("auth-timeout")

    def cmd_auth(self, password: str) -> None:
        super().cmd_auth(password)
        if self.authed and self._auth_timer is not None:
            self._auth_timer.cancel()

    def record_sent(self, kind: str) -> None:
        self.server.sent_log.append(kind)

    def on_closed(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.server.connections.discard(self)


class InboundServer:
    """The emulated ``mod_event_socket`` listening socket."""

    def __init__(
        self,
        emu: FreeSwitchEmulator,
        *,
        host: str,
        port: int,
        password: str,
        acl_allow: Iterable[str] | None,
        faults: FaultConfig = NO_FAULTS,
        auth_timeout_s: float = AUTH_TIMEOUT_S,
    ) -> None:
        self.emu = emu
        self.host = host
        self.port = port
        self.password = password
        self.faults = faults
        self.auth_timeout_s = auth_timeout_s
        self.acl = [ipaddress.ip_network(net, strict=False) for net in acl_allow] if acl_allow is not None else None
        self.connections: set[InboundConnection] = set()
        self.sent_log: list[str] = []
        self._server: asyncio.Server | None = None

    def allows(self, address: str | None) -> bool:
        if self.acl is None:
            return True
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.acl)

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start_listening(self) -> None:
        """Bind and listen (again, on the same port once one was chosen)."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: InboundConnection(self.emu, self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_listening(self) -> None:
        """Close the listening socket; established connections stay up."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def drop_connections(self, *, reset: bool = False) -> int:
        """Drop every client: with the disconnect notice and FIN, or with an RST."""
        dropped = 0
        for conn in list(self.connections):
            dropped += 1
            if reset and conn.writer is not None:
                conn.writer.reset()
                conn.shutdown()
            else:
                conn.finish("dropped", wire.SHUTDOWN_BODY)
        return dropped

    async def close(self) -> None:
        await self.stop_listening()
        self.drop_connections()
        await asyncio.sleep(0)
        self.emu.servers.discard(self)
