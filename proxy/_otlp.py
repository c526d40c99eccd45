"""The sidecar's OTLP/gRPC client: unary ``Export`` calls on one plaintext HTTP/2 connection (h2
prior knowledge), driven from the Trio thread with ``h2``, as :mod:`._control` speaks its stream.

Why not grpcio: its sync client needs a worker thread per call (a thread hand-off per batch, and a
Python thread that holds the GIL while the event loop waits for it, up to the switch interval), it
starts threads of its own, and its core library is ~10 MB of the sidecar's resident memory. An
export is one request message and one small answer, so the part of gRPC it needs is small:
headers, one length-prefixed message, HTTP/2 flow control, the ``grpc-status`` trailer.

One call at a time per client (a lock: the exporter's loop and its shutdown flush may overlap).
The connection is opened by the first call and kept; a call that fails for the transport drops it
and the next call opens a new one. A call on a kept connection that the server had already left
(GOAWAY naming an earlier stream, or closed before answering anything) is tried once more on a new
connection. Failures raise :class:`ExportError` with the gRPC status name (``UNAVAILABLE`` for
the transport, ``DEADLINE_EXCEEDED`` past the timeout).

Cancellation: a cancelled call closes the connection (its state is unknown); the next call opens
a new one.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

from tracemesh.net import Addr, parse_addr

CONNECT_TIMEOUT_S = 5.0
#: The answer to an Export is small (a partial-success count); more is refused.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: What the server may send before we acknowledge (answers are small; this only avoids stalls).
_WINDOW = 1 << 20
#: Gather DATA frames up to this much before a send.
_SEND_CHUNK = 256 * 1024

#: grpc-status codes by number (the names grpcio's StatusCode uses).
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class ExportError(Exception):
    """A failed call: ``code`` is the gRPC status name, ``details`` the message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


def unary_answer(meta: dict[bytes, bytes], body: bytes | bytearray, who: str = "the answer") -> bytes:
    """The message of a unary gRPC answer, from its headers and trailers (*meta*) and its DATA
    (*body*); :class:`ExportError` with the status name and message when it is not OK, and when
    it is not one uncompressed message."""
    status = meta.get(b"grpc-status")
    if status is None:
        raise ExportError("UNKNOWN" if meta.get(b":status", b"200") == b"200" else "UNAVAILABLE",
                          f"no grpc-status in {who} (HTTP {meta.get(b':status', b'?').decode('latin-1')})")
    if status != b"0":
        code = int(status) if status.isdigit() else -1
        name = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else f"status {status.decode('latin-1')}"
        raise ExportError(name, unquote(meta.get(b"grpc-message", b"").decode("latin-1")))
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise ExportError("INTERNAL", f"{who} is not one uncompressed gRPC message")
    return bytes(body[5:])


class _Retry(Exception):
    """The server never took the call (it left the kept connection first): safe to send again."""


class _Stream:
    __slots__ = ("body", "ended", "meta", "reset")

    def __init__(self) -> None:
        self.body = bytearray()
        self.meta: dict[bytes, bytes] = {}
        self.ended = False
        self.reset: str | None = None


class OtlpClient:
    """Unary gRPC calls to *target* (``host:port``)."""

    def __init__(self, target: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.target = target
        self.addr: Addr = parse_addr(target)
        self.connect_timeout = connect_timeout
        self._lock = trio.Lock()
        self._sock: trio.SocketStream | None = None
        self._conn: h2.connection.H2Connection | None = None
        self._streams: dict[int, _Stream] = {}
        self._goaway: int | None = None  # the last stream id the server said it would process
        self._heads: dict[str, list] = {}
        self.connects = 0
        self.calls = 0

    async def call(self, path: str, payload: bytes, timeout: float) -> bytes:
        """The answer message's bytes; ExportError when the call fails or takes over *timeout*."""
        async with self._lock:
            with trio.move_on_after(timeout) as scope:
                try:
                    return await self._call(path, payload, timeout)
                except _Retry:
                    try:
                        return await self._call(path, payload, timeout)
                    except _Retry as exc:
                        raise ExportError("UNAVAILABLE", str(exc) or "the collector closed the connection") from None
            await self._drop()
            if scope.cancelled_caught:
                raise ExportError("DEADLINE_EXCEEDED", f"no answer from {self.target} within {timeout:g}s")
            raise ExportError("UNAVAILABLE", "call abandoned")  # pragma: no cover (unreachable)

    async def _call(self, path: str, payload: bytes, timeout: float) -> bytes:
        done = False
        reused = self._conn is not None
        try:
            if self._conn is None:
                await self._connect()
            try:
                answer = await self._exchange(path, payload, timeout, reused)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ExportError("UNAVAILABLE", f"connection to {self.target} broke: {exc or type(exc).__name__}") \
                    from None
            except h2.exceptions.ProtocolError as exc:
                raise ExportError("UNAVAILABLE", f"HTTP/2 protocol error with {self.target}: {exc}") from None
            done = True  # the call ended cleanly (an error status too): the connection stays
            if isinstance(answer, ExportError):
                raise answer
            return answer
        finally:
            if not done:  # failed, retried or cancelled: the connection's state is unknown
                await self._drop()

    async def _connect(self) -> None:
        with trio.move_on_after(self.connect_timeout) as scope:
            try:
                sock = await trio.open_tcp_stream(self.addr.host, self.addr.port)
            except OSError as exc:
                raise ExportError("UNAVAILABLE", f"cannot connect to {self.target}: {exc.strerror or exc}") from None
        if scope.cancelled_caught:
            raise ExportError("UNAVAILABLE", f"cannot connect to {self.target} within {self.connect_timeout:g}s")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False, normalize_inbound_headers=False))
        conn.initiate_connection()
        conn.increment_flow_control_window(_WINDOW)
        self._sock, self._conn, self._streams, self._goaway = sock, conn, {}, None
        self.connects += 1
        await self._flush()

    async def _drop(self) -> None:
        sock, self._sock, self._conn = self._sock, None, None
        self._streams = {}
        if sock is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(sock)

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            await self._sock.send_all(data)

    def _headers(self, path: str, timeout: float) -> list:
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = [
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                (b":authority", self.target.encode()), (b"content-type", b"application/grpc"),
                (b"te", b"trailers"), (b"user-agent", b"tracemesh-sidecar")]
        return head + [(b"grpc-timeout", f"{max(1, int(timeout * 1000))}m".encode())]

    async def _exchange(self, path: str, payload: bytes, timeout: float, reused: bool) -> bytes | ExportError:
        """The answer, or the error status the call ended with (the connection is still good)."""
        conn = self._conn
        if self._goaway is not None:
            raise _Retry("the collector is closing the connection")
        sid = conn.get_next_available_stream_id()
        st = self._streams[sid] = _Stream()
        conn.send_headers(sid, self._headers(path, timeout))
        # the message's gRPC prefix (uncompressed, length) in a frame of its own: no copy of the payload
        pending = 0
        for data, last in ((b"\x00" + len(payload).to_bytes(4, "big"), not payload), (payload, True)):
            off, end = 0, len(data)
            while off < end:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, end - off)
                if n < min(end - off, 5):  # wait for the server to open its window (the prefix goes whole)
                    await self._flush()
                    pending = 0
                    await self._receive(sid, st, reused)
                    if st.ended or st.reset is not None:
                        break  # answered (an error) before taking the whole request
                    continue
                conn.send_data(sid, data[off:off + n] if off or n < end else data, end_stream=last and off + n == end)
                off += n
                pending += n
                if pending >= _SEND_CHUNK:
                    await self._flush()
                    pending = 0
            if last or st.ended or st.reset is not None:
                break
        await self._flush()
        while not st.ended and st.reset is None:
            await self._receive(sid, st, reused)
        self._streams.pop(sid, None)
        self.calls += 1
        if st.reset is not None:
            return ExportError("UNAVAILABLE", st.reset)
        try:
            return unary_answer(st.meta, st.body)
        except ExportError as exc:
            return exc

    async def _receive(self, sid: int, st: _Stream, reused: bool) -> None:
        data = await self._sock.receive_some(65536)
        if not data:
            if reused and not st.meta and not st.body:
                raise _Retry("the collector closed the kept connection")
            raise ExportError("UNAVAILABLE", f"{self.target} closed the connection before answering")
        conn = self._conn
        for ev in conn.receive_data(data):
            t = type(ev)
            if t is h2.events.DataReceived:
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    s.body += ev.data
                    if len(s.body) > MAX_ANSWER_BYTES:
                        raise ExportError("RESOURCE_EXHAUSTED", f"an answer over {MAX_ANSWER_BYTES} bytes")
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif t is h2.events.ResponseReceived or t is h2.events.TrailersReceived:
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    s.meta.update(ev.headers)
            elif t is h2.events.StreamEnded:
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    s.ended = True
            elif t is h2.events.StreamReset:
                s = self._streams.get(ev.stream_id)
                if s is not None:
                    if reused and ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM and not s.meta:
                        raise _Retry("the collector refused the stream")
                    s.reset = f"the collector reset the call (HTTP/2 error {ev.error_code})"
            elif t is h2.events.ConnectionTerminated:
                self._goaway = ev.last_stream_id if ev.last_stream_id is not None else 0
                if sid > self._goaway and not st.meta:
                    if reused:
                        raise _Retry("the collector is closing the connection")
                    raise ExportError("UNAVAILABLE", f"the collector closed the connection (HTTP/2 error {ev.error_code})")
        await self._flush()

    async def aclose(self) -> None:
        await self._drop()

    def close(self) -> None:
        """Close the connection now (also outside the event loop, e.g. after ``trio.run``)."""
        sock, self._sock, self._conn = self._sock, None, None
        if sock is not None:
            try:
                sock.socket.close()
            except RuntimeError:  # no Trio run active: close the file descriptor itself
                fd = sock.socket.detach()
                if fd >= 0:
                    os.close(fd)
