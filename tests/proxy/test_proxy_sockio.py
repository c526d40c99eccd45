"""FastStream: trio.SocketStream's send_all/receive_some without a trip through the scheduler when
the kernel does not make them wait, keeping Trio's cancellation, fairness and error semantics."""

import socket

import pytest
import trio
import trio.testing
from trio_helpers import run_on_mock_clock, tcp_pair

from tracemesh._sockio import YIELD_EVERY, FastStream


async def _pair():
    """A connected (FastStream, trio.SocketStream) pair over loopback TCP."""
    client, server = await tcp_pair()
    return FastStream(client), server


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


# -- CoarseTimer: read deadlines without a cancel scope per read ---------------------------------

def test_a_coarse_deadline_ends_a_blocked_read_on_time_and_the_stream_still_sends():
    from tracemesh._sockio import COARSE_MIN_S, COARSE_TICK_S, coarse_timer

    async def main():
        fast, peer = await _pair()
        timer = coarse_timer()
        for timeout in (COARSE_MIN_S, 7.3, 61.0):
            t0 = trio.current_time()
            timer.arm(fast, timeout)
            try:
                with pytest.raises(trio.TooSlowError):
                    await fast.receive_some()
            finally:
                timer.disarm(fast)
            late = trio.current_time() - t0 - timeout
            assert 0 <= late <= COARSE_TICK_S + 1e-9, late
        await fast.send_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # the caller can still answer
        assert await peer.receive_some() == b"HTTP/1.1 408 Request Timeout\r\n\r\n"
        await fast.aclose()
        await peer.aclose()

    run_on_mock_clock(main)


def test_a_read_done_in_time_is_untouched_and_a_later_read_waits_normally():
    from tracemesh._sockio import coarse_timer

    async def main():
        fast, peer = await _pair()
        timer = coarse_timer()

        async def answer_after(seconds, data):
            await trio.sleep(seconds)
            await peer.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_after, 4.9, b"one")
            timer.arm(fast, 5.0)
            try:
                assert await fast.receive_some() == b"one"
            finally:
                timer.disarm(fast)
            # disarmed: the old deadline passes while the next read waits, with no timer on it
            nursery.start_soon(answer_after, 30.0, b"two")
            assert await fast.receive_some() == b"two"
        await fast.aclose()
        await peer.aclose()

    run_on_mock_clock(main)


def test_coarse_deadlines_fire_in_their_own_order_whatever_order_they_were_armed_in():
    """A short deadline armed while the timer sleeps towards a longer one still fires on time."""
    from tracemesh._sockio import COARSE_TICK_S, coarse_timer

    async def main():
        timer = coarse_timer()
        pairs = [await _pair() for _ in range(3)]
        fired = {}

        async def read(i, timeout, delay):
            await trio.sleep(delay)
            t0 = trio.current_time()
            timer.arm(pairs[i][0], timeout)
            try:
                await pairs[i][0].receive_some()
            except trio.TooSlowError:
                fired[i] = trio.current_time() - t0 - timeout
            finally:
                timer.disarm(pairs[i][0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 0, 60.0, 0)
            nursery.start_soon(read, 1, 5.0, 1.0)
            nursery.start_soon(read, 2, 20.0, 3.3)
        assert sorted(fired) == [0, 1, 2]
        assert all(0 <= late <= COARSE_TICK_S + 1e-9 for late in fired.values()), fired
        for a, b in pairs:
            await a.aclose()
            await b.aclose()

    run_on_mock_clock(main)


def test_a_coarse_deadline_ends_reads_that_never_wait():
    """The peer keeps the socket full, so no read blocks (and no wait can be woken): the deadline
    still ends the loop, at the first read after it. (Real time: a mock clock stands still while a
    task never waits. The timer takes short timeouts too; only callers keep to COARSE_MIN_S.)"""
    from tracemesh._sockio import COARSE_TICK_S, coarse_timer

    async def main():
        fast, peer = await _pair()
        timer = coarse_timer()

        async def feed():
            chunk = b"x" * 65536
            with trio.move_on_after(10):
                while True:
                    await peer.send_all(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            await trio.sleep(0.05)  # the buffers fill
            reads = 0
            t0 = trio.current_time()
            timer.arm(fast, 0.05)
            try:
                with trio.move_on_after(5) as guard, pytest.raises(trio.TooSlowError):
                    while True:
                        assert await fast.receive_some(1) == b"x"
                        reads += 1
                assert not guard.cancelled_caught, "the deadline never ended the reads"
            finally:
                timer.disarm(fast)
            assert reads > 1000
            assert trio.current_time() - t0 < 0.05 + COARSE_TICK_S + 1.0
            nursery.cancel_scope.cancel()
        await fast.aclose()
        await peer.aclose()

    trio.run(main)


def test_h11_next_event_takes_the_coarse_timer_for_long_timeouts_and_a_cancel_scope_for_short_ones():
    """A head trickled a byte a second never completes: both kinds of timeout end it at the
    deadline for the whole event (a byte does not renew it)."""
    import h11

    from tracemesh._h11io import next_event
    from tracemesh import _sockio

    async def main():
        for timeout in (2.0, 6.0):
            fast, peer = await _pair()
            conn = h11.Connection(h11.SERVER)

            async def trickle():
                with trio.move_on_after(30):
                    await peer.send_all(b"GET / HTTP/1.1\r\n")
                    while True:
                        await trio.sleep(1.0)
                        await peer.send_all(b"X")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                t0 = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await next_event(conn, fast, timeout)
                assert timeout <= trio.current_time() - t0 <= timeout + _sockio.COARSE_TICK_S + 1e-9
                nursery.cancel_scope.cancel()
            assert fast not in _sockio.coarse_timer()._armed  # disarmed either way
            await fast.aclose()
            await peer.aclose()

    run_on_mock_clock(main)


def test_the_coarse_timer_task_sleeps_when_nothing_is_armed():
    from tracemesh._sockio import coarse_timer

    async def main():
        fast, peer = await _pair()
        timer = coarse_timer()
        timer.arm(fast, 10.0)
        timer.disarm(fast)
        await trio.sleep(5)
        assert timer._idle  # waiting for an arm, not ticking
        timer.arm(fast, 10.0)  # and an arm wakes it
        with pytest.raises(trio.TooSlowError):
            await fast.receive_some()
        timer.disarm(fast)
        await fast.aclose()
        await peer.aclose()

    run_on_mock_clock(main)


def test_an_upstream_response_head_waits_on_the_coarse_timer_when_long_and_a_scope_when_short():
    """read_response_head: a deadline 5 s or more away is the CoarseTimer's (armed while it
    waits), a nearer one a cancel scope's (nothing armed); either ends the wait on time with
    TooSlowError, which the sidecar turns into 504 UT."""
    import h11

    from tracemesh import _h1fast, _sockio
    from tracemesh.net import Addr
    from tracemesh.proxy._http1 import MAX_HEADER_BYTES, read_response_head
    from tracemesh.proxy._pool import UpstreamConn

    async def main():
        for left, coarse in ((15.0, True), (_sockio.COARSE_MIN_S - 0.5, False)):
            client, server = await tcp_pair()
            uc = UpstreamConn(Addr("127.0.0.1", 1), FastStream(client), _h1fast.connection(h11.CLIENT, MAX_HEADER_BYTES))
            await uc.stream.send_all(uc.h11.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
                                     + uc.h11.send(h11.EndOfMessage()))
            armed = []

            async def look():
                await trio.sleep(1.0)
                armed.append(uc.stream in _sockio.coarse_timer()._armed)

            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(look)
                with pytest.raises(trio.TooSlowError):
                    await read_response_head(uc, t0 + left)
            assert left <= trio.current_time() - t0 <= left + _sockio.COARSE_TICK_S + 1e-9
            assert armed == [coarse]
            assert uc.stream not in _sockio.coarse_timer()._armed
            await client.aclose()
            await server.aclose()

    run_on_mock_clock(main)
