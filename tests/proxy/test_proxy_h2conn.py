"""H2Conn's hot-path pieces, driven directly: writes from many tasks never interleave (the
flush that sends without the lock when nobody else is sending), per-stream waits and their
timeouts (no cancel scope where none is needed), and the cheaper ``fail_at``."""

import math

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from trio_helpers import run_on_mock_clock, tcp_pair

from tracemesh._sockio import FastStream
from tracemesh.proxy._http2 import H2Conn, _FailAt, _Stream


def test_concurrent_flushes_of_large_frames_never_interleave():
    """Eight tasks each send 1 MiB on their own stream over a socket with small buffers, so that
    sends are partial and the slow path (the lock) is taken while others try the fast one: the
    peer's h2 parses every frame and gets every byte, in order per stream."""
    payload = {sid: bytes([sid % 251]) * (1 << 20) for sid in range(1, 17, 2)}

    async def main():
        client, server = await tcp_pair()
        for s in (client, server):
            s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 16384)
            s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16384)
        conn = H2Conn(client, client_side=True)
        assert isinstance(conn.stream, FastStream)
        peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        peer.initiate_connection()
        peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        peer.increment_flow_control_window(2**31 - 1 - 65535)
        got = {sid: bytearray() for sid in payload}
        ended = set()

        async def read_peer():
            await server.send_all(peer.data_to_send())
            while len(ended) < len(payload):
                data = await server.receive_some(65536)
                assert data, "the connection closed early"
                for ev in peer.receive_data(data):  # a protocol error (interleaved bytes) raises here
                    if isinstance(ev, h2.events.DataReceived):
                        got[ev.stream_id] += ev.data
                        peer.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended.add(ev.stream_id)
                out = peer.data_to_send()
                if out:
                    await server.send_all(out)

        streams = {}
        for sid in payload:  # opened in order (h2 requires rising stream ids), then written at once
            streams[sid] = s = conn.streams[sid] = _Stream(conn, sid)
            await conn.send_headers(s, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"),
                                        (b":authority", b"x")])

        async def send(sid):
            s = streams[sid]
            data = payload[sid]
            for off in range(0, len(data), 100_000):
                await conn.send_data(s, data[off:off + 100_000], end=off + 100_000 >= len(data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            nursery.start_soon(read_peer)
            with trio.fail_after(30):
                async with trio.open_nursery() as senders:
                    for sid in payload:
                        senders.start_soon(send, sid)
                while len(ended) < len(payload):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert {sid: bytes(b) for sid, b in got.items()} == payload
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_stream_next_waits_with_or_without_a_timeout():
    async def main():
        client, server = await tcp_pair()
        s = _Stream(H2Conn(client, client_side=True), 1)
        s.put(("data", b"a", 1))
        assert await s.next(5.0) == ("data", b"a", 1)  # already here: returned, no timer
        t0 = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await s.next(5.0)
        assert trio.current_time() - t0 == pytest.approx(5.0)
        s.put(("end",))
        with pytest.raises(trio.TooSlowError):
            await s.next(0)  # a deadline already gone is a timeout, item or not (as fail_after)
        assert await s.next() == ("end",)
        with trio.move_on_after(100) as scope:  # no timeout of its own: only the caller's cancels it
            await s.next()
        assert scope.cancelled_caught
        s.gone(8)
        with pytest.raises(Exception, match="reset"):
            await s.next()
        await client.aclose()
        await server.aclose()

    run_on_mock_clock(main)


def test_fail_at_as_trio_s_without_a_scope_for_no_deadline():
    async def main():
        t0 = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with _FailAt(t0 + 3):
                await trio.sleep(10)
        assert trio.current_time() - t0 == pytest.approx(3)
        with _FailAt(trio.current_time() + 3):
            await trio.sleep(1)  # in time: nothing raised
        with pytest.raises(KeyError):
            with _FailAt(trio.current_time() + 3):
                raise KeyError("passes through")
        with pytest.raises(KeyError):
            with _FailAt(math.inf):
                raise KeyError("passes through")
        with trio.move_on_after(50) as outer:
            with _FailAt(math.inf):
                await trio.sleep(100)
        assert outer.cancelled_caught  # the outer scope's cancellation is not turned into TooSlowError

    run_on_mock_clock(main)
