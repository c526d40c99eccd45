"""The HTTP/2 stream inbox (``_http2._Stream``): items in order, one parked reader woken by an
arrival, cancellation and timeouts that leave no stale reader, and ``body_here``, which decides
whether a request body goes out with its head (no pump task)."""

import math

import pytest
import trio
import trio.testing

from tracemesh.proxy._http2 import _Gone, _Stream


class _Conn:  # _Stream only keeps its connection (for ack/finish, not used here)
    pass


def _stream() -> _Stream:
    return _Stream(_Conn(), 1)


def test_items_come_out_in_order_and_a_reset_raises():
    async def main():
        s = _stream()
        s.put(("data", b"ab", 2))
        s.put(("end",))
        assert s.has_next()
        assert await s.next() == ("data", b"ab", 2)
        assert s.next_nowait() == ("end",)
        assert not s.has_next() and s.next_nowait() is None
        s.gone(8)
        s.gone(2)  # only the first reset counts
        with pytest.raises(_Gone) as e:
            await s.next()
        assert e.value.code == 8 and not s.has_next()

    trio.run(main)


def test_a_parked_reader_is_woken_by_an_arrival():
    async def main():
        s = _stream()
        got = []

        async def reader():
            got.append(await s.next())
            got.append(await s.next())

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            s.put(("data", b"x", 1))
            s.put(("end",))
        assert got == [("data", b"x", 1), ("end",)]

    trio.run(main)


def test_a_timed_out_or_cancelled_reader_leaves_the_stream_readable():
    async def main():
        s = _stream()
        with pytest.raises(trio.TooSlowError):
            await s.next(timeout=0.01)
        with trio.CancelScope() as scope:
            scope.cancel()
            await s.next()
        assert scope.cancelled_caught
        s.put(("end",))  # no stale reader to wake: the next read gets it
        assert await s.next(timeout=1) == ("end",)
        # an item already here is still taken under a cancelled scope only if not cancelled
        s.put(("end",))
        with trio.CancelScope() as scope:
            scope.cancel()
            await s.next()
        assert scope.cancelled_caught and s.has_next()

    trio.run(main)


def test_two_readers_at_once_are_refused():
    async def main():
        s = _stream()
        async with trio.open_nursery() as n:
            n.start_soon(s.next)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await s.next()
            s.put(("end",))  # the first reader still gets what comes

    trio.run(main)


@pytest.mark.parametrize("items, expected", [
    ([], None),  # nothing yet: the body may be long
    ([("data", b"abc", 3)], None),  # no end yet
    ([("data", b"abc", 3), ("data", b"de", 2), ("end",)], 5),
    ([("end",)], 0),
    ([("data", b"abc", 3), ("trailers", [(b"x", b"y")])], 3),
    ([("reset", 8)], None),
])
def test_body_here_is_the_body_size_only_when_its_end_has_arrived(items, expected):
    s = _stream()
    for item in items:
        s.put(item)
    assert s.body_here() == expected
    assert s.has_next() is bool(items)  # looking takes nothing


def test_waiting_with_no_timeout_sets_no_deadline():
    async def main():
        s = _stream()
        with trio.move_on_after(0.05) as scope:
            await s.next(timeout=math.inf)
        assert scope.cancelled_caught

    trio.run(main)
