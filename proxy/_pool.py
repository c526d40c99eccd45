"""Kept-alive upstream HTTP/1.1 connections, per endpoint.

A connection goes back to the pool only when its h11 state says the exchange ended cleanly and
both sides can go on; the pool keeps at most :data:`MAX_IDLE_PER_ENDPOINT` per endpoint and closes
connections idle longer than :data:`IDLE_TIMEOUT_S` (before the upstream's own keep-alive timeout
would close them under us, in the common case).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import h11
import trio

from tracemesh.net import Addr

MAX_IDLE_PER_ENDPOINT = 64
IDLE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
#: Response heads larger than this are a protocol error (Envoy's default limit is 60 KiB).
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class UpstreamConn:
    addr: Addr
    stream: trio.SocketStream
    h11: h11.Connection
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class ConnectError(Exception):
    """Could not open a TCP connection to the upstream (Envoy's UF)."""


class Pool:
    def __init__(self) -> None:
        self._idle: dict[Addr, list[UpstreamConn]] = {}
        self.opened = 0

    async def acquire(self, addr: Addr) -> UpstreamConn:
        """An idle kept-alive connection to *addr*, or a new one. Raises ConnectError."""
        idle = self._idle.get(addr)
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if now - c.idle_since < IDLE_TIMEOUT_S:
                c.reused = True
                return c
            await c.aclose()
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await trio.open_tcp_stream(addr.host, addr.port)
        except trio.TooSlowError:
            raise ConnectError(f"connect to {addr} timed out after {CONNECT_TIMEOUT_S:.0f}s") from None
        except OSError as exc:
            raise ConnectError(f"connect to {addr} failed: {exc.strerror or exc}") from None
        self.opened += 1
        return UpstreamConn(addr, stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES))

    async def release(self, c: UpstreamConn) -> None:
        """Keep *c* for reuse when its exchange ended cleanly; close it otherwise."""
        conn = c.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                pass
        idle = self._idle.setdefault(c.addr, [])
        if conn.our_state is h11.IDLE and conn.their_state is h11.IDLE and len(idle) < MAX_IDLE_PER_ENDPOINT:
            c.idle_since = time.monotonic()
            idle.append(c)
        else:
            await c.aclose()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                await c.aclose()
        self._idle.clear()
