"""Kept-alive upstream HTTP/1.1 connections, per endpoint and per security (plaintext, or mesh mTLS
to an expected peer identity: a connection made for one is never reused for the other).

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

from tracemesh.identity import SpiffeId
from tracemesh.net import Addr
from tracemesh import _h1fast
from tracemesh._sockio import FastStream

MAX_IDLE_PER_ENDPOINT = 64
IDLE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
#: Response heads larger than this are a protocol error (Envoy's default limit is 60 KiB).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Security:
    """How to reach an upstream: ``mtls`` with the workload certificate, the peer verified to be
    in our trust domain and, when ``expected`` is set, exactly that identity."""

    mtls: bool = False
    expected: SpiffeId | None = None


PLAINTEXT = Security()


@dataclass
class UpstreamConn:
    addr: Addr
    stream: trio.abc.Stream  # plain TCP: a FastStream (tracemesh._sockio) over a SocketStream; mTLS: an SSLStream
    h11: h11.Connection
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    security: Security = PLAINTEXT
    peer: SpiffeId | None = None  # the upstream's verified identity (mTLS only)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class ConnectError(Exception):
    """Could not open a TCP connection to the upstream (Envoy's UF)."""


async def open_tcp(addr: Addr, deadline: float) -> trio.SocketStream:
    """A TCP connection to *addr* by *deadline* (trio time; the connect budget is
    :data:`CONNECT_TIMEOUT_S`); ConnectError when it times out or is refused."""
    try:
        with trio.fail_at(deadline):
            return await trio.open_tcp_stream(addr.host, addr.port)
    except trio.TooSlowError:
        raise ConnectError(f"connect to {addr} timed out after {CONNECT_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise ConnectError(f"connect to {addr} failed: {exc.strerror or exc}") from None


class Pool:
    """``tls`` (a :class:`tracemesh.proxy._mtls.MeshTls`) runs the client handshake of mTLS
    connections; without it only plaintext connections can be made."""

    def __init__(self, tls=None) -> None:
        self._idle: dict[tuple[Addr, Security], list[UpstreamConn]] = {}
        self.opened = 0
        self.tls = tls

    async def acquire(self, addr: Addr, security: Security = PLAINTEXT) -> UpstreamConn:
        """An idle kept-alive connection to *addr* with this *security*, or a new one (TCP
        connect, then the TLS handshake and peer check for mTLS, all within
        :data:`CONNECT_TIMEOUT_S`). Raises ConnectError."""
        idle = self._idle.get((addr, security))
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if now - c.idle_since < IDLE_TIMEOUT_S:
                c.reused = True
                return c
            await c.aclose()
        stream, peer = await self.connect(addr, security)
        self.opened += 1
        # plain TCP: no trip through the scheduler per read and write (TLS keeps trio's SSLStream)
        return UpstreamConn(addr, FastStream.wrap(stream),
                            _h1fast.connection(h11.CLIENT, MAX_HEADER_BYTES),
                            security=security, peer=peer)

    async def connect(self, addr: Addr, security: Security = PLAINTEXT,
                      alpn: str = "http/1.1") -> tuple[trio.abc.Stream, SpiffeId | None]:
        """A new connection to *addr*: TCP, then for mTLS the handshake (offering *alpn*) and the
        peer check, all within :data:`CONNECT_TIMEOUT_S`; (stream, peer identity). ConnectError."""
        deadline = trio.current_time() + CONNECT_TIMEOUT_S
        stream = await open_tcp(addr, deadline)
        peer = None
        if security.mtls:
            from tracemesh.proxy._mtls import UpstreamTlsError

            try:
                stream, peer = await self.tls.connect(stream, security.expected,
                                                      max(0.0, deadline - trio.current_time()), alpn)
            except UpstreamTlsError as exc:
                raise ConnectError(f"mTLS to {addr} failed: {exc}") from None
        return stream, peer

    async def release(self, c: UpstreamConn) -> None:
        """Keep *c* for reuse when its exchange ended cleanly; close it otherwise."""
        conn = c.h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                pass
        idle = self._idle.setdefault((c.addr, c.security), [])
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
