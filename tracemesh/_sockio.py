"""A plain TCP stream for the HTTP/1.1 hot path, cheaper per operation than ``trio.SocketStream``.

``trio.SocketStream`` makes every ``send_all`` and ``receive_some`` a full checkpoint: a trip
through the scheduler (and so one more ``epoll_wait``) even when the kernel had the bytes ready
or took them at once. On a proxied request that is four round trips through the run loop per
sidecar for nothing. :class:`FastStream` calls the socket's non-blocking ``recv``/``send``
directly and waits (``trio.lowlevel.wait_readable`` / ``wait_writable``, real checkpoints) only
when the kernel says it would block.

Trio's guarantees are kept where they matter:

- cancellation: every operation first checks whether its task is cancelled (no yield, no
  syscall; a deadline that passed raises ``trio.Cancelled`` there, as at a checkpoint), and any
  wait is a checkpoint;
- fairness: after :data:`YIELD_EVERY` operations in a row that did not wait, one yields to the
  scheduler, so a connection whose peer always has data ready cannot starve the others;
- errors: as ``trio.SocketStream``'s (``ClosedResourceError`` once closed, else
  ``BrokenResourceError`` from the ``OSError``).

Read deadlines without a cancel scope (:class:`CoarseTimer`): a Trio cancel scope costs ~6 µs to
enter and leave even when nothing is cancelled (more in a busy process), and the HTTP/1.1 path
needs two per request on each side (the next request's head, the response's head), ~9 % of a
sidecar's CPU at 1,000 req/s. Deadlines of at least :data:`COARSE_MIN_S` (the sidecar's own header,
idle and default route timeouts: seconds long, where a tenth of a second of lateness does not
matter) are kept instead by one timer task per Trio run that wakes a timed-out read with
``trio.lowlevel.notify_closing``; the read raises ``trio.TooSlowError``, as a deadline's cancel
scope would have made it. Arming and disarming are a dict write and a dict delete.

Everything else (``send_eof``, ``aclose``, ``wait_send_all_might_not_block``, ``socket``) is the
wrapped stream's. TLS connections (``trio.SSLStream``) are not wrapped. Unlike trio's, two tasks
sending at once are caught only when both wait (``trio.BusyResourceError``): the HTTP/1.1 path
never sends from two tasks on one connection (an upgraded tunnel sends from one, receives in
another, which is fine).
"""

from __future__ import annotations

import errno

import trio
from trio.lowlevel import checkpoint, checkpoint_if_cancelled, wait_readable, wait_writable

#: Timeouts at least this long may be kept by the CoarseTimer (shorter ones need a cancel scope).
COARSE_MIN_S = 5.0
#: The most a CoarseTimer deadline fires late.
COARSE_TICK_S = 0.1

#: Operations in a row that completed without waiting, after which one yields to the scheduler.
YIELD_EVERY = 16
#: receive_some's size when the caller gives none (as trio's).
DEFAULT_RECEIVE_SIZE = 65536

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def _translate(exc: OSError) -> Exception:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class FastStream(trio.abc.HalfCloseableStream):
    """*stream*, a ``trio.SocketStream``, with ``send_all`` and ``receive_some`` that do not yield
    when the kernel does not make them wait (see the module's docstring)."""

    __slots__ = ("_stream", "socket", "_sock", "_streak", "_expired")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._sock = stream.socket._sock  # the stdlib socket (non-blocking) under trio's
        self._streak = 0
        self._expired = False  # a CoarseTimer deadline passed while armed

    @classmethod
    def wrap(cls, stream):
        """*stream* as a FastStream when it is a plain ``trio.SocketStream`` (whose socket can be
        reached); else *stream* itself."""
        if type(stream) is trio.SocketStream and hasattr(stream.socket, "_sock"):
            return cls(stream)
        return stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await checkpoint_if_cancelled()
        if self._expired:
            raise trio.TooSlowError
        sock = self._sock
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _translate(exc) from None if exc.errno in _CLOSED_ERRNOS else exc
        else:
            self._streak += 1
            if self._streak >= YIELD_EVERY:
                self._streak = 0
                await checkpoint()
            return data
        self._streak = 0
        while True:
            try:
                await wait_readable(sock)
            except trio.ClosedResourceError:
                if self._expired:  # woken by the CoarseTimer
                    raise trio.TooSlowError from None
                raise trio.ClosedResourceError("this socket was closed") from None
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _translate(exc) from None if exc.errno in _CLOSED_ERRNOS else exc

    async def send_all(self, data) -> None:
        sock = self._sock
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await checkpoint_if_cancelled()
        if not data:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("socket was already closed")
            await checkpoint()
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _translate(exc) from None if exc.errno in _CLOSED_ERRNOS else exc
        if sent == len(data):
            self._streak += 1
            if self._streak >= YIELD_EVERY:
                self._streak = 0
                await checkpoint()
            return
        self._streak = 0
        with memoryview(data) as view:
            while sent < len(view):
                try:
                    await wait_writable(sock)
                except trio.ClosedResourceError:
                    raise trio.ClosedResourceError("this socket was closed") from None
                try:
                    with view[sent:] as rest:
                        sent += sock.send(rest)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _translate(exc) from None if exc.errno in _CLOSED_ERRNOS else exc

    def try_send(self, data) -> int:
        """Send what the kernel takes of *data* now, without waiting (and without a checkpoint:
        the caller's next operation has one); how many bytes went. 0 also when this stream has
        gone YIELD_EVERY operations without yielding, so that the caller's ``send_all`` does."""
        if self._streak >= YIELD_EVERY - 1 or self.socket.did_shutdown_SHUT_WR:
            return 0  # send_all yields, or raises ClosedResourceError
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _translate(exc) from None if exc.errno in _CLOSED_ERRNOS else exc
        self._streak += 1
        return sent

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def setsockopt(self, *args) -> None:
        self._stream.setsockopt(*args)

    def getsockopt(self, *args):
        return self._stream.getsockopt(*args)


class CoarseTimer:
    """Read deadlines for FastStreams, kept by one task instead of a cancel scope per read (see the
    module's docstring). ``arm(stream, timeout)`` before reading, ``disarm(stream)`` after, in a
    ``finally``; in between, a read past the deadline raises ``trio.TooSlowError``, at most
    :data:`COARSE_TICK_S` late. Only for timeouts of at least :data:`COARSE_MIN_S`, and only for
    streams that one task uses at a time (the timer wakes every waiter on the socket). A read
    timed out this way leaves the stream unusable for reading, as a cancelled read does: the
    caller answers (a send still works) and closes it."""

    __slots__ = ("_armed", "_earliest", "_wake", "_idle")

    def __init__(self) -> None:
        self._armed: dict[FastStream, float] = {}
        self._earliest = float("inf")  # no later than the earliest armed deadline (may be stale: earlier)
        self._wake: trio.Event | None = None  # set while the task waits for something to be armed
        self._idle = False

    def arm(self, stream: FastStream, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        self._armed[stream] = deadline
        if deadline < self._earliest:
            self._earliest = deadline
        if self._idle:
            self._idle = False
            self._wake.set()

    def disarm(self, stream: FastStream) -> None:
        self._armed.pop(stream, None)
        stream._expired = False

    async def run(self) -> None:
        armed = self._armed
        while True:
            if not armed:
                self._earliest = float("inf")
                self._wake, self._idle = trio.Event(), True
                await self._wake.wait()
            now = trio.current_time()
            if now >= self._earliest:
                earliest = float("inf")
                for stream, deadline in list(armed.items()):
                    if deadline <= now:
                        del armed[stream]
                        stream._expired = True
                        if stream._sock.fileno() != -1:
                            trio.lowlevel.notify_closing(stream._sock)
                    elif deadline < earliest:
                        earliest = deadline
                self._earliest = earliest
            # A deadline armed while this sleeps is at least COARSE_MIN_S away, so sleeping at most
            # half of that never oversleeps one by more than a tick.
            await trio.sleep(max(COARSE_TICK_S, min(self._earliest - now, COARSE_MIN_S / 2)))


_TIMER: trio.lowlevel.RunVar = trio.lowlevel.RunVar("tracemesh_coarse_timer")


def coarse_timer() -> CoarseTimer:
    """This Trio run's CoarseTimer, its task started (a system task) on first use."""
    try:
        return _TIMER.get()
    except LookupError:
        timer = CoarseTimer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="tracemesh coarse read timer")
        return timer
