"""Reading h11 events from a Trio stream, shared by the sidecar and the control-endpoint server."""

from __future__ import annotations

import h11
import trio

from tracemesh._sockio import COARSE_MIN_S, FastStream, coarse_timer

READ_CHUNK = 64 * 1024


async def next_event(conn: h11.Connection, stream: trio.abc.Stream, timeout: float, chunk: int = READ_CHUNK):
    """The next event of *conn*, reading from *stream* as needed, within *timeout* seconds for the
    whole event: a peer trickling a head byte by byte must not renew the deadline (slowloris).

    Raises trio.TooSlowError, h11.RemoteProtocolError, or the stream's errors.
    """
    event = conn.next_event()
    if event is not h11.NEED_DATA:
        return event  # already received (a bodyless request's end, pipelining): no timer needed
    if timeout >= COARSE_MIN_S and type(stream) is FastStream:
        # plain TCP and a long timeout: the run's CoarseTimer keeps it, without a cancel scope
        timer = coarse_timer()
        timer.arm(stream, timeout)
        try:
            while True:
                conn.receive_data(await stream.receive_some(chunk))
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
        finally:
            timer.disarm(stream)
    # a bare CancelScope, not trio.fail_after (a generator context manager around one): this runs
    # for every read of the sidecar's HTTP/1.1 path
    scope = trio.CancelScope(deadline=trio.current_time() + timeout)
    with scope:
        while True:
            conn.receive_data(await stream.receive_some(chunk))
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
    raise trio.TooSlowError
