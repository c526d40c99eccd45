"""The sidecar's HTTP/2 and gRPC data path: h2 state machines on both sides, thin Trio drivers.

A downstream connection comes here from :meth:`Sidecar.handle` when its TLS ALPN chose ``h2``, or
when its first bytes are the HTTP/2 client preface (h2c with prior knowledge; :func:`sniff` reads
them within the header timeout and hands what it read to whichever parser gets the connection).
Each request stream is one exchange with the mesh semantics of HTTP/1.1 (:mod:`._http1`): the
same :meth:`Sidecar._admit` (identity, authorization, routing), :meth:`Sidecar._outbound` (fault
injection, circuit breaker) and :meth:`Sidecar._record` (span and RED metrics), with this
module's :meth:`H2Server.forward` in place of the HTTP/1.1 one. The next hop (the app inbound,
the destination's sidecar outbound) is spoken to in HTTP/2 as well: h2c with prior knowledge in
plaintext, ALPN ``h2`` over mesh mTLS. Upstream connections are multiplexed: :class:`H2Pool`
keeps them per address and security, as :class:`._pool.Pool` does, one carrying many streams, and
opens another when a peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` is reached or after GOAWAY.

**Flow control, not buffers.** :class:`H2Conn` gives each stream an inbox; the reader task puts
what arrives there without waiting, which is bounded by the windows we advertise
(:data:`STREAM_WINDOW` per stream, :data:`CONNECTION_WINDOW` per connection): received data is
acknowledged (``WINDOW_UPDATE``) only once it has been handed to the other side, so a slow reader
on one side slows the writer on the other and nothing accumulates. Sends wait for the peer's
window. A request body is kept (up to :data:`MAX_RETRY_BODY`) while it streams, so that a
retry can send it again; past that the request is no longer retried.

**gRPC** (``content-type: application/grpc*``): trailers pass through; a local answer (a refusal
by policy, an injected abort, no route, an upstream that failed) is a trailers-only response,
HTTP 200 with ``grpc-status``: flags map as Envoy's local replies do (UT DEADLINE_EXCEEDED,
NR UNIMPLEMENTED, UF/UH/UO/UC UNAVAILABLE), other statuses by the gRPC spec's "HTTP to gRPC Status
Code Mapping" (403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, ...).
``grpc-timeout`` bounds the exchange like a route timeout (the smaller wins) and is forwarded
decreased by the time spent here. Retries read ``grpc-status`` of a trailers-only answer
(Istio's retryOn names). Spans carry ``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``; metrics the ``grpc_response_status`` label.

The next hop's HTTP version follows the client unless the config (a service's declared port
protocol) or ``--app-protocol`` says otherwise; :mod:`._translate` then runs an attempt over
HTTP/1.1 (``_Req.h1``), and a gRPC call that would need HTTP/1.1 is refused. A route's ``mirror``
copies a stream as HTTP/1.1's does, its body teed as it streams (:func:`._translate.mirror_from_h2`).

**Hostile input.** h2 turns protocol errors into GOAWAY (we send it, then close); header lists
over :data:`MAX_HEADER_BYTES` are a protocol error to h2 as well (ENHANCE_YOUR_CALM); a frame
header announcing more than SETTINGS_MAX_FRAME_SIZE is refused on sight (h2 itself would buffer
up to 16 MiB before it looks); a client that does not send the preface and its SETTINGS within
the header timeout is cut; at most :data:`MAX_CONCURRENT_STREAMS` streams per connection. A
client that resets most of the streams it opens before their responses (the "rapid reset" attack,
CVE-2023-44487: each reset stream still costs us an exchange and an upstream request) gets GOAWAY
ENHANCE_YOUR_CALM once its premature resets reach :data:`PREMATURE_RESETS_MIN` and half of its
streams, as Envoy's overload protection does; a CONTINUATION flood is bounded by h2 (64 frames, a
PROTOCOL_ERROR past them). Resets propagate: a downstream RST_STREAM cancels its exchange (which resets the upstream stream; flag
DC); an upstream reset before the response head is 503 UC (gRPC: UNAVAILABLE), after it the
downstream stream is reset (gRPC: ended with UNAVAILABLE trailers). A new upstream connection is
used only once the peer's SETTINGS arrived, so that a burst never opens streams past its limit.

Cancellation and resources: a downstream connection's streams run in a nursery owned by
:func:`serve`; when the connection ends, its exchanges are cancelled and still record their spans.
An upstream connection's reader is a Trio system task (the connection is shared by exchanges of
many downstream connections, so no one of them can own it); it ends when the connection closes,
and :meth:`H2Pool.aclose` closes them all. Writes to a connection are serialised and shielded
(bounded by :data:`BODY_IDLE_TIMEOUT_S`): a cancelled exchange must not leave half a frame on a
connection other streams share.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import trio

from tracemesh._release import release
from tracemesh.net import Addr
from tracemesh.proxy import _hpack, _translate
from tracemesh.proxy._http1 import (
    BODY_IDLE_TIMEOUT_S, HEADER_TIMEOUT_S, HOP_BY_HOP, IDLE_TIMEOUT_S, MAX_HEADER_BYTES, MAX_RETRY_BODY,
    ROUTE_TIMEOUT_S, ProxyError, _header, _Span, _start_span, _Target,
)
from tracemesh.proxy._mtls import PLAINTEXT as PLAINTEXT_PEER
from tracemesh.proxy._mtls import Peer
from tracemesh.proxy._pool import CONNECT_TIMEOUT_S, PLAINTEXT, ConnectError, Security
from tracemesh.proxy._recorder import KIND_CLIENT, KIND_SERVER
from tracemesh.proxy._resilience import Outcome
from tracemesh.proxy._router import Selection
from tracemesh._sockio import FastStream

log = logging.getLogger("tracemesh.sidecar.h2")

#: RFC 9113 3.4: what an HTTP/2 client sends first, before its SETTINGS.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Streams one downstream connection may have open (Envoy allows 2^31; a bound keeps memory bounded).
MAX_CONCURRENT_STREAMS = 128
#: A downstream connection whose client reset at least this many of its streams before their
#: responses ended, and at least half of all it opened, is closed (GOAWAY ENHANCE_YOUR_CALM).
PREMATURE_RESETS_MIN = 100
#: What a peer may send on one stream before we acknowledge (and so what we may hold for it).
STREAM_WINDOW = 256 * 1024
#: ... and on one connection, all streams together.
CONNECTION_WINDOW = 1024 * 1024
READ_CHUNK = 64 * 1024
#: An upstream connection without streams for this long is closed (as the HTTP/1.1 pool's).
UPSTREAM_IDLE_S = 30.0
#: A gRPC client cancels at its own deadline, which started a network hop before ours: a reset
#: arriving this close to our deadline is the deadline, and the span says DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.2

CANCEL = h2.errors.ErrorCodes.CANCEL
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
#: Not an HTTP/2 code: the stream's connection is gone.
CONNECTION_LOST = -1

#: Forwarded on neither side: connection-specific (RFC 9113 8.2.2; ``te: trailers`` is allowed and
#: gRPC needs it), and ``host``, which ``:authority`` carries.
_DROP = (HOP_BY_HOP - {b"te"}) | {b"host"}
#: ... and in a trailer section, ``trailer`` too (it announces trailers; it cannot be one)
_DROP_TRAILERS = _DROP | {b"trailer"}

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
GRPC_OK, GRPC_UNKNOWN, GRPC_DEADLINE_EXCEEDED, GRPC_PERMISSION_DENIED = 0, 2, 4, 7
GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE, GRPC_UNAUTHENTICATED = 12, 13, 14, 16
#: The gRPC spec's "HTTP to gRPC Status Code Mapping" (doc/http-grpc-status-mapping.md), as
#: Envoy's Grpc::Utility::httpToGrpcStatus; anything else is UNKNOWN.
HTTP_TO_GRPC = {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
                404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE,
                503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE}
_GRPC_TIMEOUT = re.compile(rb"\s*(\d{1,8})([HMSmun])\s*")
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """``grpc-timeout`` (at most 8 digits and a unit, H M S m u n) in seconds; None if absent or bad."""
    m = _GRPC_TIMEOUT.fullmatch(value) if value else None
    return int(m[1]) * _GRPC_UNITS[m[2]] if m else None


def format_grpc_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for *seconds* (rounded up to a whole millisecond, at least 1 ms)."""
    ms = max(1, math.ceil(seconds * 1000))
    return f"{ms}m".encode() if ms < 10**8 else f"{min(math.ceil(seconds), 10**8 - 1)}S".encode()


def grpc_message(text: str) -> bytes:
    """``grpc-message``: UTF-8, percent-encoded outside printable ASCII and ``%`` (gRPC over HTTP/2)."""
    return "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
                   for c in text).encode("ascii")


def grpc_status_for(flag: str, status: int) -> int:
    """The gRPC status of a local answer with response flags *flag* and HTTP *status*."""
    flags = flag.split(",")
    if "UT" in flags:
        return GRPC_DEADLINE_EXCEEDED
    if "NR" in flags:
        return GRPC_UNIMPLEMENTED
    if any(f in flags for f in ("UF", "UH", "UO", "UC")):
        return GRPC_UNAVAILABLE
    return HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)


def _is_grpc(headers) -> bool:
    return (_header(headers, b"content-type") or b"").startswith(b"application/grpc")


def _single(group: BaseExceptionGroup) -> BaseException:
    """One exception of a nursery's group to re-raise: the first that is not Cancelled, if any."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(group)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


async def sniff(stream: trio.abc.Stream, timeout: float) -> tuple[bytes, bool]:
    """Read the start of a connection until it is, or cannot be, the HTTP/2 preface, within
    *timeout*. Returns the bytes read (for whichever parser takes the connection) and whether they
    open with the preface. A peer that went silent or away gets what it sent so far, and False."""
    buf = b""
    with trio.move_on_after(timeout):
        while len(buf) < len(PREFACE) and PREFACE.startswith(buf):
            try:
                data = await stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                break
            if not data:
                break
            buf += data
    return buf, buf.startswith(PREFACE)


class _Gone(Exception):
    """A stream ended abnormally: reset by the peer with ``code``, or its connection was lost."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or (f"stream reset (h2 error {code})" if code >= 0 else "connection lost"))
        self.code = code


_NO_SCOPE = contextlib.nullcontext()


class _FailAt:
    """``trio.fail_at(deadline)`` as a class (no generator per use), and no cancel scope at all
    for an infinite deadline: both run for every stream."""

    __slots__ = ("_deadline", "_scope")

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._scope = None

    def __enter__(self) -> None:
        if self._deadline != math.inf:
            self._scope = trio.CancelScope(deadline=self._deadline)
            self._scope.__enter__()

    def __exit__(self, *exc) -> bool:
        scope = self._scope
        if scope is None:
            return False
        handled = scope.__exit__(*exc)
        if scope.cancelled_caught:
            raise trio.TooSlowError
        return handled


class _Stream:
    """One stream of an :class:`H2Conn`: an inbox of what arrived for it, in order —
    ``("headers", headers, ended)``, ``("data", bytes, flow_controlled_length)``,
    ``("trailers", headers)``, ``("end",)``, ``("reset", code)`` — and what we sent.

    The inbox is a deque with one parked reader, not a Trio memory channel: a channel costs a
    send and a receive channel with their state to make for every stream, a statistics object
    for every look, and a trip through the scheduler for every item taken even when it is
    already here (~4 % of a sidecar's CPU under gRPC load). Taking an item that is here only
    checks for cancellation (as ``FastStream`` does for bytes the kernel already has); waiting
    is a real checkpoint. One task reads a stream at a time (a second one waiting is
    ``trio.BusyResourceError``)."""

    __slots__ = ("conn", "id", "_inbox", "_reader", "reset_code", "scope", "headers_sent", "ended_local")

    def __init__(self, conn: "H2Conn", sid: int) -> None:
        self.conn, self.id = conn, sid
        # unbounded in items, bounded in bytes by the flow-control windows we advertise
        self._inbox: deque[tuple] = deque()
        self._reader: trio.lowlevel.Task | None = None  # the task parked until an item arrives
        self.reset_code: int | None = None
        self.scope = trio.CancelScope()  # a downstream stream's exchange, cancelled by a reset
        self.headers_sent = self.ended_local = False

    def put(self, item: tuple) -> None:
        self._inbox.append(item)
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def has_next(self) -> bool:
        """An item is already here: :meth:`next` will not wait."""
        return bool(self._inbox)

    def body_here(self) -> int | None:
        """The request body's bytes when all of what is left of it is already here (its end or
        trailers are in the inbox), else None."""
        size = 0
        for item in self._inbox:
            kind = item[0]
            if kind == "data":
                size += len(item[1])
            elif kind == "end" or kind == "trailers":
                return size
            else:
                return None
        return None

    def next_nowait(self) -> tuple | None:
        """The next item if one is already here, else None; a reset is returned as it is (the
        caller raises it when it gets to it, as :meth:`next` would)."""
        return self._inbox.popleft() if self._inbox else None

    def gone(self, code: int) -> None:
        if self.reset_code is None:
            self.reset_code = code
            self.put(("reset", code))

    async def _take(self) -> tuple:
        inbox = self._inbox
        if inbox:
            await trio.lowlevel.checkpoint_if_cancelled()
        while not inbox:
            if self._reader is not None:
                raise trio.BusyResourceError("another task is already reading this HTTP/2 stream")
            task = self._reader = trio.lowlevel.current_task()

            def abort(_raise_cancel, task=task) -> trio.lowlevel.Abort:
                if self._reader is task:
                    self._reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return inbox.popleft()

    async def next(self, timeout: float = math.inf) -> tuple:
        """The next item; TooSlowError after *timeout*; _Gone for a reset."""
        if timeout > 0 and self._inbox:
            item = await self._take()  # already here: no timer needed (a cancel scope costs ~5 µs)
        else:
            with _FailAt(trio.current_time() + timeout):  # no scope for no timeout
                item = await self._take()
        if item[0] == "reset":
            raise _Gone(item[1])
        return item

    def ack(self, n: int) -> None:
        """*n* flow-controlled bytes were passed on: the peer may send that much more."""
        if n:
            try:
                self.conn.h2.acknowledge_received_data(n, self.id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing

    async def finish(self, code: int = CANCEL) -> None:
        """Forget the stream; reset it with *code* if it is still open. Never raises, shielded.
        Data that arrived for it and was never passed on is acknowledged: it still counts
        against the connection's window, which would otherwise shrink for good."""
        c = self.conn
        c.streams.pop(self.id, None)
        if c.dead is not None:
            return
        unread = sum(item[2] for item in self._inbox if item[0] == "data")
        self._inbox.clear()
        self.ack(unread)
        try:
            c.h2.reset_stream(self.id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return  # closed cleanly (or never opened): nothing to say
        with trio.CancelScope(shield=True):
            try:
                await c.flush()
            except _Gone:
                pass


@dataclass
class H2Stats:
    """This process's HTTP/2 connections that ended because the peer broke the protocol (we sent
    GOAWAY with the error's code), by side, and downstream connections closed for resetting most of
    their streams (CVE-2023-44487's pattern): on the admin endpoint's ``/metrics``."""

    downstream_protocol_errors: int = 0
    upstream_protocol_errors: int = 0
    rapid_reset_closes: int = 0


STATS = H2Stats()


#: h2 releases whose ``H2Connection._receive_frame`` is the one :class:`_H2Connection` repeats
#: (checked against 4.1.0 and 4.4.1); on others h2's own runs, repr and all.
H2_RECEIVE_FRAME_TESTED = ((4, 1), (4, 4))


def _h2_version() -> tuple[int, int]:
    return release(getattr(h2, "__version__", ""))


class _H2Connection(h2.connection.H2Connection):
    """h2's state machine, ending a connection whose header block cannot be decoded with
    COMPRESSION_ERROR, as RFC 9113 4.3 says (h2 sends PROTOCOL_ERROR). A client whose HPACK encoder
    went wrong (say, one shared between threads without a lock) is then told what it did.

    And receiving a frame without h2's ``repr(frame)`` for its trace log, which h2 builds for every
    frame whether or not anything logs it (hyperframe's repr of the flags and of the body's first
    bytes): 2 % of a sidecar's busy CPU for unary gRPC calls, 4-5 % for streamed messages."""

    def _terminate_connection(self, error_code) -> None:
        # called from h2's handler of the exception that ends the connection; a header block that
        # cannot be decoded is h2's ProtocolError "Error decoding header block: ...", raised while
        # handling hpack's error (or an IndexError, TypeError or UnicodeDecodeError, which h2 catches
        # with it); h2 4.1 chains it implicitly, later versions explicitly
        exc = sys.exc_info()[1]
        if (error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR and isinstance(exc, h2.exceptions.ProtocolError)
                and str(exc).startswith("Error decoding header block")
                and isinstance(exc.__cause__ or exc.__context__,
                               (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError))):
            error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR
        super()._terminate_connection(error_code)

    def _receive_frame_without_repr(self, frame):
        # h2's _receive_frame (4.1-4.4), less its first line: the trace log's repr(frame)
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # closed by RST_STREAM: a stream error (RST_STREAM back); else a connection error
            if self._stream_is_closed_by_reset(e.stream_id):
                f = h2.connection.RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            # a stream already cleaned up, or closed implicitly by a newer one: closed by RST_STREAM
            # is a stream error, by END_STREAM a connection error, implicitly a PROTOCOL_ERROR
            if self._stream_is_closed_by_reset(e.stream_id):
                f = h2.connection.RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    if H2_RECEIVE_FRAME_TESTED[0] <= _h2_version() <= H2_RECEIVE_FRAME_TESTED[1]:
        _receive_frame = _receive_frame_without_repr


class H2Conn:
    """One HTTP/2 connection, either side: the h2 state machine, its streams' inboxes, serialised
    writes, and waits for the peer's flow-control window. :meth:`run` is its reader."""

    def __init__(self, stream: trio.abc.Stream, client_side: bool) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True)
        self.h2 = _H2Connection(config)
        self.h2.encoder = _hpack.Encoder()  # no dynamic table, field encodings kept (proxy/_hpack.py)
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        # plain TCP: no trip through the scheduler per read and write (tracemesh._sockio); safe here, as
        # sends are serialised by flush's lock and one task reads
        self.stream = FastStream.wrap(stream)
        self._try_send = getattr(self.stream, "try_send", None)  # plain TCP only: flush's fast path
        self.streams: dict[int, _Stream] = {}
        self._lock = trio.StrictFIFOLock()
        self._window = trio.Event()
        self.dead: str | None = None  # why nothing more can be sent or received here
        self.draining = False  # GOAWAY: the streams under way go on, no new one starts
        self.settled = False  # the peer's first SETTINGS arrived
        self.settled_event = trio.Event()
        self.on_request = None  # server side: called with (stream, headers, ended)
        self.peer = None  # upstream: its verified SPIFFE ID, for mTLS
        self.idle_since = time.monotonic()
        self.opened = 0  # server side: streams the client opened
        self.premature_resets = 0  # ... and reset before we ended them

    async def flush(self) -> None:
        """Send what h2 has queued. Serialised (the bytes of frames must not interleave) and
        shielded, bounded by BODY_IDLE_TIMEOUT_S; _Gone when the connection is broken."""
        lock = self._lock
        try_send = self._try_send
        if try_send is not None and not lock.locked() and self.dead is None:
            # Plain TCP and nobody sending: what the kernel takes at once goes without the lock,
            # the timer or a trip through the scheduler (no await between taking the bytes and
            # sending them, so nothing can interleave); only a remainder takes the slow path.
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self.h2.data_to_send()
            if not data:
                return
            try:
                sent = try_send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.lost(f"send failed: {exc}")
                raise _Gone(CONNECTION_LOST) from None
            if sent == len(data):
                return
            lock.acquire_nowait()  # free: no await since the check; held while the rest goes
            try:
                await self._send_rest(memoryview(data)[sent:])
            finally:
                lock.release()
            return
        async with lock:
            data = self.h2.data_to_send()
            if data:
                await self._send_rest(data)

    async def _send_rest(self, data) -> None:
        """Send *data* (the lock held), shielded, bounded by BODY_IDLE_TIMEOUT_S."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + BODY_IDLE_TIMEOUT_S
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.lost(f"send failed: {exc}")
                raise _Gone(CONNECTION_LOST) from None
        if scope.cancelled_caught:
            self.lost("the peer stopped reading")
            await trio.aclose_forcefully(self.stream)
            raise _Gone(CONNECTION_LOST)

    def lost(self, why: str) -> None:
        """The connection can carry nothing more: every stream is told."""
        if self.dead is None:
            self.dead = why
        for s in list(self.streams.values()):
            s.gone(CONNECTION_LOST)
            s.scope.cancel()
        self.streams.clear()
        self._wake()

    def _wake(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def _check(self, s: _Stream) -> None:
        if s.reset_code is not None:
            raise _Gone(s.reset_code)
        if self.dead is not None:
            raise _Gone(CONNECTION_LOST, f"connection lost: {self.dead}")

    async def send_headers(self, s: _Stream, headers, end: bool = False, flush: bool = True) -> None:
        """*flush* False: leave the frame queued for the next flush, which the caller is about to
        make (one send for a head and the body after it, not one per frame)."""
        self._check(s)
        try:
            self.h2.send_headers(s.id, headers, end_stream=end)
        except h2.exceptions.StreamClosedError:
            raise _Gone(CANCEL, "stream closed") from None
        s.headers_sent = True
        s.ended_local = end
        if flush:
            await self.flush()

    async def send_data(self, s: _Stream, data: bytes, end: bool = False, flush: bool = True) -> None:
        """Send *data* as the peer's windows allow; waits (at most BODY_IDLE_TIMEOUT_S at a time,
        then TooSlowError) for window updates. *flush* False: the last frame stays queued for the
        caller's next flush (frames that must wait for a window are always sent first)."""
        off = 0
        while True:
            self._check(s)
            try:
                n = min(self.h2.local_flow_control_window(s.id), self.h2.max_outbound_frame_size, len(data) - off)
                if n > 0 or off == len(data):
                    last = off + n == len(data)
                    self.h2.send_data(s.id, data[off:off + n], end_stream=end and last)
                    off += n
                    s.ended_local = end and last
                    if last and not flush:
                        return
                    await self.flush()
                    if last:
                        return
                    continue
            except h2.exceptions.StreamClosedError:
                raise _Gone(CANCEL, "stream closed") from None
            window = self._window
            # frames left queued (flush=False) must reach the peer before we wait for it to open the
            # window: it opens it only for what it has received
            await self.flush()
            with trio.fail_after(BODY_IDLE_TIMEOUT_S):
                await window.wait()

    async def run(self, idle_timeout: float | None = None, settings_timeout: float | None = None) -> None:
        """Read until the peer closes or breaks the protocol (h2 queues a GOAWAY, which is sent),
        dispatching events to streams. *settings_timeout*: the peer's preface and SETTINGS must
        arrive by then; *idle_timeout*: without open streams for that long, GOAWAY and stop."""
        deadline = trio.current_time() + settings_timeout if settings_timeout else math.inf
        try:
            while True:
                if not self.settled:
                    wait_until = deadline
                elif idle_timeout is not None:  # looked at again after each quiet spell
                    wait_until = trio.current_time() + idle_timeout
                else:
                    wait_until = math.inf
                # an upstream connection, settled, has no deadline: no cancel scope on its reads
                with trio.move_on_at(wait_until) if wait_until != math.inf else _NO_SCOPE:
                    data = await self.stream.receive_some(READ_CHUNK)
                    if not data or not await self.receive(data):
                        return
                    continue
                if not self.settled:
                    return  # no preface or no SETTINGS in time: cut
                if not self.streams:  # nothing under way for a whole idle timeout: say goodbye
                    self.h2.close_connection(NO_ERROR)
                    self.dead = "idle"
                    await self.flush()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, _Gone):
            return
        finally:
            self.lost("closed")

    async def receive(self, data: bytes) -> bool:
        """Feed *data* to h2, dispatch its events, send what it answers; False when the peer broke
        the protocol (h2 queued a GOAWAY with the error's code, which is sent) and we must close."""
        try:
            events = self.h2.receive_data(data)
            buf = self.h2.incoming_buffer._data  # h2 checks a frame's length only once it has it all
            if len(buf) >= 9 and int.from_bytes(buf[:3], "big") > self.h2.max_inbound_frame_size:
                self.h2.close_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                raise h2.exceptions.FrameTooLargeError("a frame over SETTINGS_MAX_FRAME_SIZE")
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from the peer: %s", exc)
            if self.h2.config.client_side:
                STATS.upstream_protocol_errors += 1
            else:
                STATS.downstream_protocol_errors += 1
            self.dead = f"protocol error: {exc}"
            await self.flush()
            return False
        for ev in events:
            self._dispatch(ev)
        if self.premature_resets >= PREMATURE_RESETS_MIN and 2 * self.premature_resets >= self.opened:
            log.warning("HTTP/2 client reset %d of its %d streams before their responses: closing the connection",
                        self.premature_resets, self.opened)
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            STATS.rapid_reset_closes += 1
            self.dead = "rapid resets"
            await self.flush()
            return False
        await self.flush()
        return True

    def _dispatch(self, ev) -> None:
        E = h2.events
        sid = getattr(ev, "stream_id", 0)
        s = self.streams.get(sid) if sid else None
        if isinstance(ev, E.RequestReceived):
            s = self.streams[sid] = _Stream(self, sid)
            self.opened += 1
            self.on_request(s, ev.headers, ev.stream_ended is not None)
        elif isinstance(ev, E.ResponseReceived):
            if s is not None:
                s.put(("headers", ev.headers, ev.stream_ended is not None))
        elif isinstance(ev, E.DataReceived):
            if s is not None:
                s.put(("data", ev.data, ev.flow_controlled_length))
            else:  # a stream we gave up on: its bytes still count against the connection window
                try:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                except h2.exceptions.ProtocolError:
                    pass
        elif isinstance(ev, E.TrailersReceived):
            if s is not None:
                s.put(("trailers", ev.headers))
        elif isinstance(ev, E.StreamEnded):
            if s is not None:
                s.put(("end",))
        elif isinstance(ev, E.StreamReset):
            if s is not None:
                self.streams.pop(sid, None)
                if not self.h2.config.client_side:
                    self.premature_resets += 1
                s.gone(ev.error_code)
                s.scope.cancel()  # a downstream stream: its exchange ends (an upstream's is not cancelled)
            self._wake()
        elif isinstance(ev, E.RemoteSettingsChanged):
            self.settled = True
            self.settled_event.set()
            self._wake()
        elif isinstance(ev, E.WindowUpdated):
            self._wake()
        elif isinstance(ev, E.ConnectionTerminated):
            # GOAWAY: no new stream here; from a server, streams above last_stream_id were never
            # processed (safe to retry elsewhere). A client's GOAWAY names our (no) pushed streams.
            self.draining = True
            if not self.h2.config.client_side:
                return
            last = ev.last_stream_id if ev.last_stream_id is not None else 2**31
            for i, st in list(self.streams.items()):
                if i > last:
                    self.streams.pop(i, None)
                    st.gone(REFUSED_STREAM)
            self._wake()


# -- upstream connections --------------------------------------------------------------------


class H2Pool:
    """Multiplexed upstream HTTP/2 connections per (address, security); *pool* (the sidecar's
    HTTP/1.1 :class:`._pool.Pool`) opens them (TCP, and mTLS with ALPN ``h2``)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self._conns: dict[tuple[Addr, Security], list[H2Conn]] = {}
        self._locks: dict[tuple[Addr, Security], trio.Lock] = {}
        self.opened = 0

    def _usable(self, c: H2Conn) -> bool:
        h = c.h2
        return (c.dead is None and not c.draining
                and h.open_outbound_streams < h.remote_settings.max_concurrent_streams)

    async def connection(self, addr: Addr, security: Security = PLAINTEXT) -> H2Conn:
        """A connection with room for one more stream; ConnectError if a new one cannot be made."""
        key = (addr, security)
        conns = self._conns.setdefault(key, [])
        now = time.monotonic()
        for c in list(conns):
            if c.dead is not None or (not c.streams and (c.draining or now - c.idle_since > UPSTREAM_IDLE_S)):
                conns.remove(c)
                if c.dead is None:
                    c.dead = "idle"
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(c.stream)
            elif self._usable(c):
                return c
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one new connection at a time per key: the others then share it
            for c in conns:
                if self._usable(c):
                    return c
            stream, peer = await self.pool.connect(addr, security, alpn="h2")
            c = H2Conn(stream, client_side=True)
            c.peer = peer
            try:
                await c.flush()
            except _Gone:
                raise ConnectError(f"connection to {addr} closed at once") from None
            trio.lowlevel.spawn_system_task(self._read, c, name=f"h2 upstream {addr}")
            # its SETTINGS first: until then h2 assumes no stream limit, and a burst of streams past
            # the peer's would be a protocol error that ends the connection and all its streams
            with trio.move_on_after(CONNECT_TIMEOUT_S):
                await c.settled_event.wait()
            if not c.settled:
                c.dead = c.dead or "no SETTINGS"
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(c.stream)
                raise ConnectError(f"{addr} sent no HTTP/2 SETTINGS within {CONNECT_TIMEOUT_S:g}s")
            conns.append(c)
            self.opened += 1
            return c

    @staticmethod
    async def _read(c: H2Conn) -> None:
        try:
            await c.run()
        except Exception:  # noqa: BLE001 (a system task must not raise: it would end the sidecar)
            log.exception("HTTP/2 upstream reader failed")
            c.lost("reader failed")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(c.stream)

    async def aclose(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.dead = c.dead or "pool closed"
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(c.stream)
        self._conns.clear()


# -- one exchange ----------------------------------------------------------------------------


class _Cut(Exception):
    """The response had started when the exchange failed: the downstream stream was reset."""


@dataclass
class _Req:
    """A downstream request stream as the exchange sees it."""

    ds: _Stream
    method: bytes
    authority: bytes
    ended: bool  # no body (END_STREAM on the headers)
    grpc: bool
    grpc_deadline: float | None = None  # trio time
    kept: list[bytes] | None = field(default_factory=list)  # the body so far, for a retry; None past MAX_RETRY_BODY
    kept_size: int = 0
    trailers: list | None = None
    trailer_names: bytes | None = None  # the head's ``trailer`` field: trailers announced (see _translate._h1_framing)
    failure: BaseException | None = None  # from the body pump
    pump: trio.CancelScope | None = None  # the current attempt's body pump
    h1: bool = False  # the next hop speaks HTTP/1.1: attempts go through _translate.try_h1
    tee: _translate._Tee | None = None  # a mirrored copy of the body, fed by next_data

    @property
    def replayable(self) -> bool:
        return self.kept is not None

    async def next_item(self):
        """The next item of the request stream's inbox; a body stalled past BODY_IDLE_TIMEOUT_S is
        the downstream's fault (408 DC). Cancellation leaves the inbox as it was."""
        try:
            return await self.ds.next(BODY_IDLE_TIMEOUT_S)
        except trio.TooSlowError:
            raise ProxyError(408, "DC", "request body stalled") from None

    async def next_data(self, span) -> tuple[bytes, int] | None:
        """The request body's next DATA and its flow-controlled length, counted on *span* and kept
        for a retry (:meth:`keep`) and teed to a mirrored copy (``tee``); None once the body ended
        (its trailers, if any, in ``trailers``). The caller acknowledges the length once the data
        is passed on."""
        while not self.ended:
            item = await self.next_item()
            if item[0] == "data":
                span.req_bytes += len(item[1])
                self.keep(item[1])
                if self.tee is not None:
                    self.tee.feed(item[1])
                return item[1], item[2]
            if item[0] == "trailers":
                self.trailers = item[1]
            elif item[0] == "end":
                self.ended = True
                if self.tee is not None:
                    self.tee.end()
        return None

    def keep(self, data: bytes) -> None:
        """Keep *data* for a retry while the body so far fits MAX_RETRY_BODY; past it, keep nothing
        (too big to send twice: no retry from now on)."""
        if self.kept is not None:
            self.kept_size += len(data)
            if self.kept_size <= MAX_RETRY_BODY:
                self.kept.append(data)
            else:
                self.kept = None


class H2Server:
    """The HTTP/2 side of one downstream connection of *sidecar*: one exchange per stream."""

    def __init__(self, sidecar, conn: H2Conn, direction: str, peer: Peer, port: int) -> None:
        self.sc, self.conn, self.direction, self.peer, self.port = sidecar, conn, direction, peer, port

    # -- a stream ---------------------------------------------------------------------------

    async def exchange(self, ds: _Stream, headers: list, ended: bool) -> None:
        sc = self.sc
        start_ns, t0 = time.time_ns(), time.perf_counter_ns()
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        headers = [(k, v) for k, v in headers if not k.startswith(b":")]
        method = pseudo.get(b":method", b"GET").decode("ascii", "replace")
        target = pseudo.get(b":path", b"/").decode("ascii", "replace")
        authority_b = pseudo.get(b":authority") or _header(headers, b"host") or b""
        span, request_id = _start_span(start_ns, headers)
        req = _Req(ds, pseudo.get(b":method", b"GET"), authority_b, ended, _is_grpc(headers))
        req.trailer_names = _header(headers, b"trailer")
        a = span.attrs
        rpc_name = None
        if req.grpc:
            timeout = parse_grpc_timeout(_header(headers, b"grpc-timeout"))
            if timeout is not None:
                req.grpc_deadline = trio.current_time() + timeout
            service, _, rpc_method = target.partition("?")[0].lstrip("/").rpartition("/")
            a["rpc.system"] = "grpc"
            a["rpc.service"], a["rpc.method"] = service, rpc_method
            rpc_name = f"{service}/{rpc_method}"
        t = _Target(f"{method} {sc.service}", [(k, v) for k, v in headers if k not in _DROP], target)
        kind = KIND_SERVER if self.direction == "inbound" else KIND_CLIENT
        code = NO_ERROR
        try:
            with ds.scope:
                try:
                    sc._admit(t, span, self.direction, self.peer, self.port, method, target,
                              authority_b.decode("ascii", "replace"), "2", request_id)
                    if t.sel is None:
                        await self.forward(ds, None, req, t.headers, t.path, t.upstream, span, t.security)
                    else:
                        await sc._outbound(ds, None, req, t.headers, t.path, t.sel, t.hash_key, span, t.security,
                                           forward=self.forward)
                except ProxyError as exc:
                    span.flag = exc.flag if span.flag == "-" else f"{span.flag},{exc.flag}"
                    span.message = str(exc)
                    if not await self._local_reply(req, exc.status, span, t):
                        code = CANCEL
                except _Cut:
                    code = CANCEL
                except _Gone:
                    span.flag, span.message = "DC", "downstream stream closed before the response was complete"
                    code = CANCEL
                except Exception as exc:  # noqa: BLE001 (one broken stream must not end the connection's others)
                    log.exception("HTTP/2 exchange failed")
                    span.flag, span.message = "UPE", f"internal error: {exc!r}"
                    code = h2.errors.ErrorCodes.INTERNAL_ERROR
            if ds.scope.cancelled_caught:  # the client reset the stream or the connection went
                code = CANCEL
                span.flag, span.message = "DC", "downstream reset the stream or closed the connection"
                if req.grpc_deadline is not None and trio.current_time() >= req.grpc_deadline - DEADLINE_SLACK_S:
                    a["rpc.grpc.status_code"] = GRPC_DEADLINE_EXCEEDED
                    span.message = "the client's deadline (grpc-timeout) passed"
        except trio.Cancelled:
            span.flag, span.message = "DC", "sidecar shutting down"
            raise
        finally:
            await ds.finish(code)
            self.sc._record(span, rpc_name or t.name, kind, t0)

    async def _local_reply(self, req: _Req, status: int, span: _Span, t: _Target) -> bool:
        """A small answer of our own, when the response has not started; False if it could not be."""
        ds = req.ds
        if ds.headers_sent:
            return False
        try:
            if req.grpc:
                code = grpc_status_for(span.flag, status)
                fault = t.sel.route.fault if t.sel is not None and t.sel.route is not None else None
                fault_grpc = getattr(fault, "abort_grpc_status", None)
                if "FI" in span.flag.split(",") and fault_grpc is not None:
                    code = fault_grpc
                span.attrs["rpc.grpc.status_code"] = code  # the call's outcome, even if the client is gone
                await self.conn.send_headers(ds, [
                    (b":status", b"200"), (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(code).encode()), (b"grpc-message", grpc_message(span.message)),
                ], end=True)
                span.status = 200
            else:
                body = (span.message + "\n").encode()
                await self.conn.send_headers(ds, [(b":status", str(status).encode()),
                                                  (b"content-type", b"text/plain"),
                                                  (b"content-length", str(len(body)).encode())])
                await self.conn.send_data(ds, body, end=True)
                span.status = status
        except (_Gone, trio.TooSlowError):
            return False
        return True

    # -- forwarding --------------------------------------------------------------------------

    async def forward(self, ds: _Stream, _unused, req: _Req, headers, target: str, upstream: Addr | None,
                      span: _Span, security: Security = PLAINTEXT, sel: Selection | None = None,
                      hash_key: str | None = None) -> None:
        """Send the request to *upstream*, or to endpoints the router picks for *sel*, retrying by
        the route's policy; relay the response. The signature is :meth:`Sidecar._forward`'s."""
        sc = self.sc
        route = sel.route if sel is not None else None
        timeout = route.timeout_s if route is not None and route.timeout_s else ROUTE_TIMEOUT_S
        deadline = trio.current_time() + timeout
        why = f"upstream request timeout: no response within {timeout:g}s"
        if req.grpc_deadline is not None and req.grpc_deadline < deadline:
            deadline, why = req.grpc_deadline, "deadline exceeded (grpc-timeout)"
        policy = route.retries if route is not None else None
        if policy is not None and policy.attempts <= 0:
            policy = None
        dest = sel.service if sel is not None else None
        req.h1 = _translate.next_hop(sc, _translate.H2, dest, security.mtls) == _translate.H1
        if req.h1 and req.grpc:
            raise _translate.grpc_refusal(dest, sc)
        if route is not None and route.mirror is not None:
            _translate.mirror_from_h2(self, req, headers, target, route, span, timeout)
        state = sel.state if sel is not None else None
        tried: list = []
        retries = 0
        in_retry = False  # a retry counted in the budget is under way
        if sel is not None:
            span.attrs["mesh.retries"] = 0
        try:
            while True:
                ep = None
                if sel is not None:
                    ep = sc._endpoint(sel, tried, hash_key, span)
                    upstream = ep.address
                try_deadline = deadline
                if policy is not None and policy.per_try_timeout_s is not None:
                    try_deadline = min(deadline, trio.current_time() + policy.per_try_timeout_s)

                reported: list = []  # the attempt's end is told to the endpoint's state exactly once

                def decide(outcome: Outcome | None, ep=ep, retries=retries, reported=reported) -> str:
                    reported.append(outcome)
                    if state is not None:
                        state.finished(ep, outcome)
                    return self._retry_wanted(outcome, policy, state, retries, deadline, req)

                try:
                    retry = await self._try(req, upstream, security, headers, target, span, try_deadline,
                                            why if try_deadline == deadline else "upstream per-try timeout", decide)
                finally:
                    if state is not None and not reported:  # failed or cancelled before the answer
                        state.finished(ep, None)
                    if in_retry:
                        state.budget.retry_done()
                        in_retry = False
                if not retry:
                    return
                in_retry = True
                retries += 1
                span.attrs["mesh.retries"] = retries
                tried.append(ep)
                with trio.move_on_at(deadline):
                    await trio.sleep(policy.backoff_s(retries, sc._rng))
        finally:
            if in_retry:
                state.budget.retry_done()
            if req.tee is not None:
                req.tee.close()  # a mirrored copy still waiting for the body's end would wait forever

    def _retry_wanted(self, outcome: Outcome | None, policy, state, retries: int, deadline: float, req: _Req) -> str:
        """"retry", "no" or "exhausted" (retriable, but no retry is left or allowed)."""
        if policy is None or outcome is None or not policy.retriable(outcome) or not req.replayable:
            return "no"
        if retries >= policy.attempts or trio.current_time() >= deadline or not state.budget.try_retry():
            return "exhausted"
        return "retry"

    async def _try(self, req: _Req, upstream: Addr, security: Security, headers, target: str, span: _Span,
                   deadline: float, why: str, decide) -> bool:
        """One attempt: its upstream stream, the request body pumped beside it, the response head;
        *decide* (given the attempt's Outcome) says whether a retry takes its place (True),
        else the response is relayed downstream."""
        if req.h1:
            return await _translate.try_h1(self, req, upstream, security, headers, target, span, deadline, why, decide)
        us: _Stream | None = None
        error: ProxyError | None = None
        try:
            try:
                async with trio.open_nursery() as n:
                    outcome: Outcome | None = None
                    try:
                        us, resp, ended = await self._open(n, req, upstream, security, headers, target, span,
                                                           deadline, why)
                        grpc = _header(resp, b"grpc-status") if ended else None
                        outcome = Outcome(int(_header(resp, b":status") or b"0"),
                                          grpc_status=int(grpc) if grpc and grpc.isdigit() else None)
                    except ProxyError as exc:
                        error = exc
                        if exc.flag in ("UF", "UC", "UT"):
                            outcome = Outcome(None, exc.flag)
                    verdict = decide(outcome)
                    if verdict == "retry":
                        if req.pump is not None:
                            req.pump.cancel()
                        return True
                    if verdict == "exhausted":
                        if error is not None:
                            error = ProxyError(error.status, f"{error.flag},URX", f"{error} (retries exhausted)")
                        else:
                            span.flag = "URX"
                    if error is None:
                        await self._relay(req, us, resp, ended, span)
                    if req.pump is not None:
                        req.pump.cancel()  # the response is complete: the rest of the request is not wanted
            except BaseExceptionGroup as group:
                raise _single(group) from None
        finally:
            if us is not None:
                await us.finish(CANCEL)
        if req.failure is not None:
            raise req.failure
        if error is not None:
            raise error
        return False

    async def _open(self, n, req: _Req, upstream: Addr, security: Security, headers, target: str, span: _Span,
                    deadline: float, why: str):
        """The upstream stream (a connection that fails at once is replaced once, when the request
        can be sent again) and its response head: (stream, headers, ended). ProxyError if none."""
        sc = self.sc
        pool = getattr(sc, "h2pool", None)
        if pool is None:
            pool = sc.h2pool = H2Pool(sc.pool)
        for attempt in (1, 2):
            try:
                conn = await pool.connection(upstream, security)
            except ConnectError as exc:
                raise ProxyError(503, "UF", f"upstream connect error: {exc}") from None
            if conn.peer is not None:
                span.attrs["mesh.connection_security_policy"] = "mutual_tls"
                span.attrs["mesh.source.principal"] = str(sc.tls.identity)
                span.attrs["mesh.destination.principal"] = str(conn.peer)
            out = [(b":method", req.method), (b":scheme", b"https" if security.mtls else b"http"),
                   (b":authority", req.authority or str(upstream).encode()), (b":path", target.encode())]
            out += [(k, v) for k, v in headers if k != b"grpc-timeout"]
            if req.grpc_deadline is not None:
                out.append((b"grpc-timeout", format_grpc_timeout(req.grpc_deadline - trio.current_time())))
            body_done = req.ended and not req.kept_size and req.trailers is None
            us = None
            try:
                us = _Stream(conn, conn.h2.get_next_available_stream_id())
                conn.streams[us.id] = us
                conn.idle_since = time.monotonic()
                # the body pump sends right away what is already here (and the end or the trailers, once
                # the body ended): the head can wait for its send; the pump may otherwise wait for the client
                await conn.send_headers(us, out, end=body_done,
                                        flush=body_done or not (req.ended or req.kept or req.ds.has_next()))
                # A body already here in full (a unary gRPC call's message, a small POST) that the
                # upstream's window takes without waiting goes in the head's write, with no pump task
                # (nor its cancel scope): sending it cannot hold up the wait for the response.
                here = None if body_done else req.ds.body_here()  # (the stream's window exists once opened)
                inline = here is not None and req.kept_size + here <= conn.h2.local_flow_control_window(us.id)
                req.pump = None
                if inline:
                    try:
                        await self._send_body(req, us, span)
                    except _Gone:
                        pass  # the upstream stream went away: the response head's wait reports it
                elif not body_done:
                    req.pump = trio.CancelScope()
                    n.start_soon(self._pump, req.pump, req, us, span)
                with _FailAt(deadline):
                    while True:
                        item = await us.next()
                        if item[0] == "headers":
                            return us, item[1], item[2]
            except trio.TooSlowError:
                await us.finish(CANCEL)
                raise ProxyError(504, "UT", why) from None
            except (_Gone, h2.exceptions.ProtocolError) as exc:
                if req.pump is not None:
                    req.pump.cancel()
                if us is not None:
                    await us.finish(CANCEL)
                code = exc.code if isinstance(exc, _Gone) else CONNECTION_LOST
                # refused, or the connection was gone: nothing was processed, safe to send again
                if attempt == 1 and req.replayable and code in (REFUSED_STREAM, CONNECTION_LOST):
                    continue
                raise ProxyError(503, "UC", f"upstream disconnect/reset before headers: {exc}") from None
            except BaseException:  # cancelled (the downstream reset, say): the upstream stream is reset too
                if us is not None:
                    await us.finish(CANCEL)
                raise
        raise AssertionError("unreachable")

    async def _pump(self, scope: trio.CancelScope, req: _Req, us: _Stream, span: _Span) -> None:
        """The request body to *us*: what was kept first (a retry), then the rest as it arrives,
        acknowledged to the downstream once passed on; then the trailers or the end. A failure is
        left in ``req.failure`` and ends the attempt; an upstream that went away is the relay's."""
        try:
            with scope:
                await self._send_body(req, us, span)
        except _Gone:
            pass  # the upstream stream went away: the relay reports it
        except (ProxyError, trio.TooSlowError) as exc:
            req.failure = exc if isinstance(exc, ProxyError) else ProxyError(
                504, "UT", "upstream stopped reading the request body")
            raise req.failure from None

    async def _send_body(self, req: _Req, us: _Stream, span: _Span) -> None:
        """What :meth:`_pump` sends: the kept body, the rest as it arrives (each DATA acknowledged to
        the downstream once passed on), then the trailers or the end."""
        conn = us.conn
        for chunk in list(req.kept or ()):
            await conn.send_data(us, chunk, flush=False)
        while (got := await req.next_data(span)) is not None:
            data, n = got
            try:  # flushed with what follows when that is already here
                await conn.send_data(us, data, flush=not req.ds.has_next())
            finally:
                req.ds.ack(n)
                await self.conn.flush()
        if req.trailers is not None:
            await conn.send_headers(us, req.trailers, end=True)
        else:
            await conn.send_data(us, b"", end=True)

    async def _relay(self, req: _Req, us: _Stream, resp, ended: bool, span: _Span) -> None:
        """The response, head to end, downstream; each upstream DATA acknowledged once sent on."""
        ds, conn = req.ds, self.conn
        status = int(_header(resp, b":status") or b"0")
        span.status = status
        out = [(b":status", str(status).encode())]
        out += [(k, v) for k, v in resp if not k.startswith(b":") and k not in _DROP]
        grpc = _header(resp, b"grpc-status")
        if grpc is not None and grpc.isdigit():
            span.attrs["rpc.grpc.status_code"] = int(grpc)
        # What already arrived goes on in one send (a small response's head, body and end arrive
        # in one read): a frame is flushed only when nothing more is waiting behind it.
        nxt = None if ended else us.next_nowait()
        try:
            await conn.send_headers(ds, out, end=ended, flush=nxt is None)
        except _Gone:
            raise
        if ended:
            return
        limit = req.grpc_deadline if req.grpc_deadline is not None else math.inf
        try:
            with _FailAt(limit):
                while True:
                    item, nxt = (nxt, None) if nxt is not None else (await us.next(BODY_IDLE_TIMEOUT_S), None)
                    if item[0] == "reset":
                        raise _Gone(item[1])
                    if item[0] == "data":
                        span.resp_bytes += len(item[1])
                        nxt = us.next_nowait()
                        if nxt is not None and nxt[0] == "end":
                            # the last frame: the upstream is told first, so that the response's end
                            # is our last act on the exchange, as it is when the end comes on its own
                            us.ack(item[2])
                            await us.conn.flush()
                            await conn.send_data(ds, item[1], end=True)
                            return
                        try:
                            await conn.send_data(ds, item[1], flush=nxt is None)
                        finally:
                            us.ack(item[2])
                            await us.conn.flush()
                    elif item[0] == "trailers":
                        grpc = _header(item[1], b"grpc-status")
                        if grpc is not None and grpc.isdigit():
                            span.attrs["rpc.grpc.status_code"] = int(grpc)
                        await conn.send_headers(ds, [(k, v) for k, v in item[1] if k not in _DROP_TRAILERS], end=True)
                        return
                    elif item[0] == "end":
                        await conn.send_data(ds, b"", end=True)
                        return
        except trio.TooSlowError:
            if req.grpc and limit <= trio.current_time():
                span.flag, span.message = "UT", "deadline exceeded (grpc-timeout) mid-response"
                await self._end_grpc(req, span, GRPC_DEADLINE_EXCEEDED)
                return
            span.flag, span.message = "UT", "upstream response body stalled"
            raise _Cut() from None
        except _Gone as exc:
            if ds.reset_code is not None:
                raise  # ours went away
            span.flag, span.message = "UC", f"upstream reset mid-response: {exc}"
            if req.grpc:
                await self._end_grpc(req, span, GRPC_UNAVAILABLE)
                return
            raise _Cut() from None

    async def _end_grpc(self, req: _Req, span: _Span, code: int) -> None:
        """End a started gRPC response with trailers of our own (else reset it)."""
        span.attrs["rpc.grpc.status_code"] = code
        try:
            await self.conn.send_headers(req.ds, [(b"grpc-status", str(code).encode()),
                                                  (b"grpc-message", grpc_message(span.message))], end=True)
        except (_Gone, h2.exceptions.ProtocolError):
            raise _Cut() from None


async def serve(sidecar, stream: trio.abc.Stream, direction: str, peer: Peer = PLAINTEXT_PEER, port: int = 0,
                initial: bytes = b"") -> None:
    """Serve one downstream HTTP/2 connection (*initial*: bytes already read from it) until it
    closes, breaks the protocol or idles; its exchanges run in a nursery of their own and are
    cancelled when the connection ends. Closes *stream*."""
    conn = H2Conn(stream, client_side=False)
    server = H2Server(sidecar, conn, direction, peer, port)
    try:
        async with trio.open_nursery() as n:
            def on_request(s: _Stream, headers, ended: bool) -> None:
                n.start_soon(server.exchange, s, headers, ended)

            conn.on_request = on_request
            try:
                # our SETTINGS go before anything is read: the server's preface must be its first
                # frame (RFC 9113 3.4), and h2 drops what it has queued when the client's GOAWAY
                # arrives, so a client that ends at once would get our GOAWAY without it
                await conn.flush()
                if initial and not await conn.receive(initial):
                    return
                await conn.flush()
                await conn.run(IDLE_TIMEOUT_S, HEADER_TIMEOUT_S)
            except _Gone:
                pass
            finally:
                conn.lost("closed")  # cancels the exchanges still running (their spans say DC)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
