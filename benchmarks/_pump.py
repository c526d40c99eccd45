"""A bare TCP byte pump: the event loop's floor under the sidecar's figures in benchmarks/proxy.py.

Each accepted connection gets one upstream connection, and bytes are copied both ways, unparsed:
no HTTP, no routing, no telemetry. Chained twice between the benchmark's client and nginx, as the
two sidecars are, it costs what the event loop and the kernel's loopback TCP cost per proxied
request with nothing else done, so the sidecar's figure splits into that floor and the sidecar's
own per-request work.

    python benchmarks/_pump.py trio|asyncio|uvloop LISTEN_PORT UPSTREAM_PORT

- ``trio``: the sidecar's own I/O layer (``trio.serve_tcp``, ``trio.open_tcp_stream``, both
  wrapped in ``tracemesh._sockio.FastStream``, two tasks a connection), on the sidecar's
  event loop.
- ``asyncio``: the standard library's loop with ``asyncio.Protocol`` callbacks (no coroutine per
  read), the cheapest pure-Python pump we know of.
- ``uvloop``: the same protocol on uvloop (libuv), when it is installed (it is not a tracemesh
  dependency; the benchmark skips it otherwise).

Listens on 127.0.0.1; TCP_NODELAY on every socket, as the sidecar.
"""

from __future__ import annotations

import socket
import sys
from functools import partial

BUFSIZE = 65536


def run_trio(listen: int, upstream: int) -> None:
    import trio

    from tracemesh._sockio import FastStream

    async def copy(src, dst) -> None:
        try:
            while data := await src.receive_some(BUFSIZE):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(down: trio.SocketStream) -> None:
        try:
            up = await trio.open_tcp_stream("127.0.0.1", upstream)
        except OSError:
            await down.aclose()
            return
        a, b = FastStream.wrap(down), FastStream.wrap(up)
        async with down, up, trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b)
            nursery.start_soon(copy, b, a)

    trio.run(partial(trio.serve_tcp, handle, listen, host="127.0.0.1"))


def run_asyncio(listen: int, upstream: int, uvloop: bool) -> None:
    import asyncio

    class Side(asyncio.Protocol):
        """One side of a connection pair; bytes that arrive before the peer exists wait here."""

        def __init__(self) -> None:
            self.transport = None
            self.peer: Side | None = None
            self.pending: list[bytes] = []
            self.eof = False

        def connection_made(self, transport) -> None:
            self.transport = transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            if self.peer is None:
                self.pending.append(data)
            else:
                self.peer.transport.write(data)

        def eof_received(self):
            if self.peer is None:
                self.eof = True
            elif self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
            return True  # keep our own write side open for the answer

        def connection_lost(self, exc) -> None:
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.close()

    class Downstream(Side):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, up = await asyncio.get_running_loop().create_connection(Side, "127.0.0.1", upstream)
            except OSError:
                self.transport.close()
                return
            up.peer, self.peer = self, up
            for data in self.pending:
                up.transport.write(data)
            self.pending.clear()
            if self.eof:
                up.transport.write_eof()
            if self.transport.is_closing():
                up.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Downstream, "127.0.0.1", listen, backlog=512)
        await server.serve_forever()

    if uvloop:
        import uvloop as _uvloop
        _uvloop.run(main())
    else:
        asyncio.run(main())


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in ("trio", "asyncio", "uvloop"):
        sys.exit("usage: python benchmarks/_pump.py trio|asyncio|uvloop LISTEN_PORT UPSTREAM_PORT")
    kind, listen, upstream = argv[0], int(argv[1]), int(argv[2])
    if kind == "trio":
        run_trio(listen, upstream)
    else:
        run_asyncio(listen, upstream, uvloop=kind == "uvloop")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
