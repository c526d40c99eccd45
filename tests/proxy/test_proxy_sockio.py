"""FastStream: trio.SocketStream's send_all/receive_some without a trip through the scheduler when
the kernel does not make them wait, keeping Trio's cancellation, fairness and error semantics."""

import socket

import pytest
import trio
import trio.testing

from tracemesh.proxy._sockio import YIELD_EVERY, FastStream


async def _pair():
    """A connected (FastStream, trio.SocketStream) pair over loopback TCP."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    sock, _ = await listener.accept()
    listener.close()
    return FastStream(client), trio.SocketStream(sock)


def test_wrap_only_plain_socket_streams():
    async def main():
        fast, other = await _pair()
        assert isinstance(fast, FastStream) and FastStream.wrap(other).__class__ is FastStream
        mem = trio.testing.MemorySendStream()
        assert FastStream.wrap(mem) is mem
        assert fast.socket is fast._stream.socket
        await fast.aclose()
        await other.aclose()

    trio.run(main)


def test_round_trip_and_large_transfers_both_ways():
    """A send larger than the socket buffers waits for the peer (wait_writable), bytes intact."""
    data = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB

    async def main():
        fast, peer = await _pair()
        got = bytearray()

        async def read_slowly():
            while len(got) < len(data):
                chunk = await peer.receive_some(65536)
                assert chunk
                got.extend(chunk)
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await fast.send_all(data)
        assert bytes(got) == data
        await peer.send_all(b"pong")
        assert await fast.receive_some(10) == b"pong"
        await peer.aclose()
        assert await fast.receive_some() == b""  # EOF
        await fast.aclose()

    trio.run(main)


def test_a_deadline_cancels_reads_that_never_wait():
    """The peer keeps data ready, so no read blocks; the timeout still ends the loop."""

    async def main():
        fast, peer = await _pair()
        fast.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        await peer.send_all(b"x" * 30_000)  # fits in the socket buffers
        await trio.sleep(0.05)
        reads = 0
        with trio.move_on_after(0.02) as scope:
            while True:
                assert await fast.receive_some(1) == b"x"
                reads += 1
                if reads == 29_000:
                    break
        assert scope.cancelled_caught and reads < 29_000
        with trio.CancelScope() as scope:  # an already-cancelled scope: the very next call raises
            scope.cancel()
            await fast.receive_some(1)
            raise AssertionError("not cancelled")
        with trio.CancelScope() as scope:
            scope.cancel()
            await fast.send_all(b"y")
            raise AssertionError("not cancelled")
        await fast.aclose()
        await peer.aclose()

    trio.run(main)


def test_a_busy_connection_does_not_starve_other_tasks():
    async def main():
        fast, peer = await _pair()
        await peer.send_all(b"x" * 30_000)
        await trio.sleep(0.05)
        ticks = 0

        async def other():
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.sleep(0)
            before = ticks
            for _ in range(YIELD_EVERY * 10):
                await fast.receive_some(1)
            assert ticks - before >= 9  # it ran at least once per YIELD_EVERY reads
            nursery.cancel_scope.cancel()
        await fast.aclose()
        await peer.aclose()

    trio.run(main)


def test_errors_as_trio_socket_streams():
    async def main():
        fast, peer = await _pair()
        # the peer resets: sending breaks
        peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await peer.aclose()
        await trio.sleep(0.05)
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):
                await fast.send_all(b"z" * 65536)
        await fast.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await fast.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await fast.send_all(b"z")

        fast, peer = await _pair()
        await fast.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await fast.send_all(b"after eof")
        assert await peer.receive_some() == b""
        await fast.aclose()
        await peer.aclose()

    trio.run(main)


def test_closing_wakes_a_blocked_reader():
    async def main():
        fast, peer = await _pair()

        async def close_soon():
            await trio.sleep(0.05)
            await fast.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await fast.receive_some()
        await peer.aclose()

    trio.run(main)


def test_try_send_takes_what_the_kernel_takes_and_leaves_yielding_to_send_all():
    async def main():
        fast, peer = await _pair()
        assert fast.try_send(b"abc") == 3
        assert await peer.receive_some() == b"abc"
        fast._streak = YIELD_EVERY - 1
        assert fast.try_send(b"def") == 0  # send_all's turn: it yields
        await fast.send_all(b"def")
        assert fast._streak == 0
        assert await peer.receive_some() == b"def"
        await fast.aclose()
        with pytest.raises(trio.ClosedResourceError):
            fast.try_send(b"x")
        await peer.aclose()

    trio.run(main)
