"""Opaque TCP through the sidecar, for ports declared TCP: bytes both ways, one span per connection.

There is no iptables here: an app reaches the sidecar explicitly, so a TCP port is a listener of
its own on each side (``tracemesh sidecar --tcp-outbound LISTEN=SERVICE --tcp-inbound
LISTEN=APP``):

- **Outbound** (:meth:`TcpProxy.serve_outbound`): a connection to the listener goes to an endpoint
  of SERVICE, the one the router's balancer picks among the service's endpoints (routes are HTTP's
  and do not apply). That endpoint is the peer sidecar's TCP inbound listener, or its HTTP inbound
  port (see below), or any plain TCP server. Over mesh mTLS when the service's mode is not
  ``disable`` and this sidecar has an identity, exactly as HTTP is: the peer verified by SPIFFE ID,
  and ALPN offering only :data:`TCP_ALPN`, which the peer must select (a sidecar that does not
  know it would speak HTTP to our bytes).
- **Inbound** (:meth:`TcpProxy.serve_inbound`): a connection to a TCP inbound listener is taken by
  the sidecar's mTLS mode (STRICT, PERMISSIVE, DISABLE, as the HTTP inbound takes it) and piped to
  its app port. PERMISSIVE peeks at the first byte to tell TLS from plaintext; a client that waits
  for the server to speak first (SMTP, MySQL, ...) sends nothing, so after :data:`PEEK_WAIT_S` of
  silence the connection is taken as plaintext (as Envoy's listener-filter timeout with
  ``continue_on_listener_filters_timeout`` does). In STRICT mode a server-first protocol still
  works through the mesh: the calling sidecar's TLS ClientHello is the first byte.
- The **HTTP inbound port** also takes opaque TCP: an mTLS connection whose ALPN selected
  :data:`TCP_ALPN` is piped to the app port of the sidecar's single ``--tcp-inbound`` listener
  (and refused when there is none, or several: ALPN carries no port, and a header would make the
  stream no longer opaque). So a service with one TCP port can list its sidecar's usual inbound
  address as its endpoint.

**Half-close.** An EOF one way is passed on (``shutdown(SHUT_WR)``) and the other way keeps
flowing until it ends too. TLS as Python's ``ssl`` gives it has no half-close (close_notify ends
both ways), so between sidecars over mTLS the bytes travel in frames (:class:`FrameDecoder`: a
4-byte length, then that many bytes; a length of 0 is the end of that direction). The frames are
what :data:`TCP_ALPN` stands for. A TLS client that did not negotiate it (``openssl s_client``)
gets the bytes unframed, and its close ends both ways.

**Telemetry.** One span per connection and side (CLIENT outbound, SERVER inbound), named ``tcp
SERVICE``, with ``network.transport=tcp``, the bytes of each direction
(``mesh.tcp.received_bytes``: from the downstream, Istio's request direction;
``mesh.tcp.sent_bytes``: to it), ``mesh.response_flags`` (``UF`` connect failure, ``UH`` no
endpoint, ``NR`` unknown service, ``UT`` idle timeout, ``UC``/``DC`` the upstream/downstream
reset mid-stream, ``RBAC`` denied by an authorization policy: inbound connections are judged as
Istio judges TCP, see :mod:`tracemesh.proxy._authz`) and the mesh attributes of HTTP spans.
There is no trace context in opaque bytes, so each span starts a trace. Istio's TCP metrics count
opened and closed connections, and bytes as they flow; each connection also gets one access log
record (:mod:`._accesslog`) naming its span.

Cancellation: cancelling a connection task closes both connections (shielded, within
:data:`CLOSE_TIMEOUT_S`, then forcefully) and still records its span and its closed count.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from tracemesh.identity import PeerIdentityError, authenticate_peer
from tracemesh.net import Addr
from tracemesh.proxy._accesslog import AccessEntry
from tracemesh.proxy._authz import DENIED_BODY, RBAC_FLAG, Authorizer
from tracemesh.proxy._authz import Request as AuthzRequest
from tracemesh.proxy._config import DEFAULT_MTLS, MTLS_DISABLE, MTLS_PERMISSIVE, MTLS_STRICT
from tracemesh.proxy._mtls import PLAINTEXT as PLAINTEXT_PEER
from tracemesh.proxy._mtls import TCP_ALPN, MeshTls, Peer
from tracemesh.proxy._pool import CONNECT_TIMEOUT_S, ConnectError, open_tcp
from tracemesh.proxy._recorder import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, SpanRecord, SpanRecorder
from tracemesh.proxy._resilience import Outcome
from tracemesh.proxy._router import NoHealthyUpstream, NoRoute, Router
from tracemesh.proxy._tracecontext import new_span_id, new_trace_id

#: One read's worth; also the largest frame (a frame is never bigger than a read).
CHUNK = 64 * 1024
MAX_FRAME = CHUNK
#: A connection with no byte either way this long is closed (Envoy's tcp_proxy idle_timeout: 1 h).
IDLE_TIMEOUT_S = 3600.0
#: PERMISSIVE: silence this long before the first byte means a server-first plaintext client.
PEEK_WAIT_S = 1.0
#: Closing a connection (TLS close_notify included) never takes longer than this.
CLOSE_TIMEOUT_S = 1.0

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


# -- frames (sans-I/O) -----------------------------------------------------------------------


class FrameError(Exception):
    """The peer's frames are not frames: the connection is broken."""


def encode_frames(data: bytes) -> bytes:
    """*data* as frames of at most MAX_FRAME bytes (nothing for empty data: that is the EOF frame)."""
    if len(data) <= MAX_FRAME:
        return len(data).to_bytes(4, "big") + data
    return b"".join(len(c).to_bytes(4, "big") + c
                    for c in (data[i:i + MAX_FRAME] for i in range(0, len(data), MAX_FRAME)))


EOF_FRAME = (0).to_bytes(4, "big")


class FrameDecoder:
    """Bytes in, payloads out: :meth:`feed` received bytes, then :meth:`payload` gives what whole
    frames carried (b"" when nothing yet) and :attr:`eof` says the end frame came. Holds at most
    one partial frame (MAX_FRAME bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof and data:
            raise FrameError("bytes after the end frame")
        self._buf += data

    def payload(self) -> bytes:
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4 and not self.eof:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if n > MAX_FRAME:
                raise FrameError(f"a frame of {n} bytes (at most {MAX_FRAME})")
            if n == 0:
                self.eof = True
                pos += 4
                if pos != len(buf):
                    raise FrameError("bytes after the end frame")
                break
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return b"".join(out)


# -- the two ends of a splice ----------------------------------------------------------------


class RawEnd:
    """A stream as it is; *early* bytes (read past an HTTP head, say) come first."""

    def __init__(self, stream: trio.abc.Stream, early: bytes = b"", closed: bool = False) -> None:
        self.stream, self._early, self._closed = stream, early, closed

    async def receive(self) -> bytes:
        """The next bytes; b"" at EOF."""
        if self._early:
            data, self._early = self._early, b""
            return data
        if self._closed:
            return b""
        return await self.stream.receive_some(CHUNK)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_eof(self) -> bool:
        """Half-close, if the stream can (a socket can, TLS cannot); False when it cannot."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
            return True
        return False


class FramedEnd:
    """A stream carrying :class:`FrameDecoder` frames (between sidecars over mTLS)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._dec = FrameDecoder()

    async def receive(self) -> bytes:
        while True:
            data = self._dec.payload()
            if data or self._dec.eof:
                return data
            got = await self.stream.receive_some(CHUNK + 4)
            if not got:  # closed without the end frame: cut, not finished
                raise trio.BrokenResourceError("the peer closed without ending the stream")
            self._dec.feed(got)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(encode_frames(data))

    async def send_eof(self) -> bool:
        await self.stream.send_all(EOF_FRAME)
        return True


@dataclass
class Spliced:
    """How a splice went: bytes each way, and who ended it abnormally (None: nobody)."""

    a_to_b: int = 0
    b_to_a: int = 0
    broken: str | None = None  # "a" or "b": that side's connection failed (reset, bad frames)
    idle: bool = False


async def splice(a, b, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 count: Callable[[int, int], None] | None = None) -> Spliced:
    """Copy bytes a -> b and b -> a until both ways ended (an EOF is passed on as a half-close;
    where the other side cannot half-close, or a side fails, both ways end at once), or until
    nothing moved for *idle_timeout_s*. *count(a_to_b, b_to_a)* is called as bytes move.
    Closes nothing: the caller owns both streams."""
    res = Spliced()
    idle = trio.CancelScope(deadline=trio.current_time() + idle_timeout_s)

    async def pump(src, dst, forward: bool, cancel: trio.CancelScope) -> None:
        src_name, dst_name = ("a", "b") if forward else ("b", "a")
        while True:
            try:
                data = await src.receive()
            except (*_GONE, FrameError):
                res.broken = res.broken or src_name
                cancel.cancel()
                return
            try:
                if not data:
                    if not await dst.send_eof():
                        cancel.cancel()  # no half-close on that side: the whole connection ends
                    return
                await dst.send(data)
            except _GONE:
                res.broken = res.broken or dst_name
                cancel.cancel()
                return
            n = len(data)
            if forward:
                res.a_to_b += n
            else:
                res.b_to_a += n
            if count is not None:
                count(n, 0) if forward else count(0, n)
            idle.deadline = trio.current_time() + idle_timeout_s

    with idle:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, True, nursery.cancel_scope)
            nursery.start_soon(pump, b, a, False, nursery.cancel_scope)
    res.idle = idle.cancelled_caught
    return res


async def _close(stream) -> None:
    if stream is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
        try:
            await stream.aclose()
        except _GONE:
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


def _alpn(stream) -> str | None:
    selected = getattr(stream, "selected_alpn_protocol", None)
    try:
        return selected() if selected is not None else None
    except (ssl.SSLError, ValueError):
        return None


def is_tcp_alpn(stream) -> bool:
    """Did this (TLS) stream's handshake select :data:`TCP_ALPN`?"""
    return _alpn(stream) == TCP_ALPN


# -- the proxy -------------------------------------------------------------------------------


class _Conn:
    """One proxied connection's span and counts."""

    def __init__(self, name: str, kind: int, attrs: dict) -> None:
        self.start_ns = time.time_ns()
        self.t0 = time.perf_counter_ns()
        self.name, self.kind, self.attrs = name, kind, attrs
        self.flag = "-"
        self.message = ""
        self.received = self.sent = 0  # from / to the downstream
        self.series = None


class TcpProxy:
    """The TCP side of one sidecar; :meth:`serve_outbound` and :meth:`serve_inbound` each serve
    one downstream connection and close it."""

    metrics = None  # a tracemesh.proxy._metrics.MeshMetrics, set by _serve.py
    access_log = None  # a tracemesh.proxy._accesslog.AccessLog, set by _serve.py

    def __init__(self, *, service: str, version: str, router: Router, recorder: SpanRecorder,
                 tls: MeshTls | None = None, authorizer: Callable[[], Authorizer] | None = None) -> None:
        self.service, self.version = service, version
        self.router, self.recorder = router, recorder
        self.tls = tls if tls is not None else MeshTls(None, MTLS_DISABLE)
        self.authorizer = authorizer  # the current config's (the HTTP path's, shared)
        #: the app port of the single --tcp-inbound listener: where TCP over the HTTP inbound port goes
        self.default_app: Addr | None = None
        self.refused = 0  # opaque TCP on the HTTP inbound port without a single --tcp-inbound
        self.denied = 0  # connections refused by authorization policy

    # -- outbound -----------------------------------------------------------------------------

    async def serve_outbound(self, stream: trio.SocketStream, service: str) -> None:
        a = {"network.transport": "tcp", "mesh.direction": "outbound",
             "mesh.source.service": self.service, "mesh.source.version": self.version,
             "mesh.destination.service": service, "peer.service": service}
        c = _Conn(f"tcp {service}", KIND_CLIENT, a)
        upstream = None
        try:
            try:
                sel = self.router.subset(service)
                ep = self.router.endpoint(sel)
            except NoRoute as exc:
                c.flag, c.message = "NR", f"no route: {exc}"
                return
            except NoHealthyUpstream as exc:
                c.flag, c.message = "UH", f"no healthy upstream: {exc}"
                return
            a["mesh.upstream.endpoint"] = str(ep.address)
            a["mesh.destination.version"] = ep.version
            a["server.address"], a["server.port"] = ep.address.host, ep.address.port
            state = sel.state
            state.started(ep)
            outcome = None
            try:
                upstream, framed = await self._connect(ep.address, service, c)
                outcome = Outcome(200)  # connected: the endpoint is up
            except _ConnectFailed as exc:
                c.flag, c.message = "UF", f"upstream connect error: {exc}"
                outcome = Outcome(None, "UF")
                return
            finally:
                state.finished(ep, outcome)
            up_end = FramedEnd(upstream) if framed else RawEnd(upstream)
            await self._pipe(c, RawEnd(stream), up_end)
        except trio.Cancelled:
            c.flag, c.message = "DC", "sidecar shutting down"
            raise
        finally:
            await self._finish(c, upstream, stream)

    async def _connect(self, addr: Addr, service: str, c: _Conn):
        """A connection to *addr*: (stream, framed). mTLS with TCP_ALPN by the service's mode."""
        svc = self.router.config.services.get(service)
        mode = svc.mtls if svc is not None else DEFAULT_MTLS
        mtls = mode != MTLS_DISABLE and self.tls.can_originate
        if mode == MTLS_STRICT and not self.tls.can_originate:
            raise _ConnectFailed(f"service {service!r} takes mTLS only (strict) and this sidecar has no "
                                 f"workload identity (--identity)")
        c.attrs["mesh.connection_security_policy"] = "mutual_tls" if mtls else "none"
        deadline = trio.current_time() + CONNECT_TIMEOUT_S
        try:
            tcp = await open_tcp(addr, deadline)
        except ConnectError as exc:
            raise _ConnectFailed(str(exc)) from None
        if not mtls:
            return tcp, False
        expected = svc.identity if svc is not None else None
        tls = trio.SSLStream(tcp, self.tls.creds.client_context_alpn((TCP_ALPN,)), server_hostname=None,
                             https_compatible=True)
        try:
            with trio.fail_at(deadline):
                await tls.do_handshake()
            peer = authenticate_peer(tls, self.tls.trust_domain)
            if expected is not None and peer != expected:
                raise PeerIdentityError(f"the upstream is {peer}, not {expected} as the mesh config says")
            if _alpn(tls) != TCP_ALPN:
                raise PeerIdentityError(f"the upstream did not take opaque TCP (ALPN {_alpn(tls)!r}, "
                                        f"not {TCP_ALPN!r})")
        except BaseException as exc:
            await trio.aclose_forcefully(tls)
            self.tls.stats.upstream_failures += 1
            if isinstance(exc, trio.TooSlowError):
                raise _ConnectFailed(f"mTLS to {addr}: handshake not done within {CONNECT_TIMEOUT_S:.0f}s") from None
            if isinstance(exc, (PeerIdentityError, *_GONE)):
                raise _ConnectFailed(f"mTLS to {addr} failed: {exc}") from None
            raise
        self.tls.stats.upstream_handshakes += 1
        c.attrs["mesh.source.principal"] = str(self.tls.identity)
        c.attrs["mesh.destination.principal"] = str(peer)
        return tls, True

    # -- inbound ------------------------------------------------------------------------------

    async def serve_inbound(self, stream: trio.SocketStream, app: Addr) -> None:
        """A connection to a TCP inbound listener: taken by the mTLS mode, then piped to *app*."""
        try:
            port = stream.socket.getsockname()[1]
        except OSError:
            port = 0
        accepted = await self._accept(stream)
        if accepted is None:
            return
        await self.serve_accepted(*accepted, app=app, port=port)

    async def _accept(self, stream: trio.SocketStream):
        if self.tls.mode == MTLS_PERMISSIVE:
            with trio.move_on_after(PEEK_WAIT_S) as waited:
                await trio.lowlevel.wait_readable(stream.socket)
            if waited.cancelled_caught:  # a client that waits for the server to speak first
                self.tls.stats.plaintext += 1
                return stream, PLAINTEXT_PEER
        return await self.tls.accept(stream)

    async def serve_accepted(self, stream: trio.abc.Stream, peer: Peer, app: Addr | None = None,
                             port: int = 0) -> None:
        """Pipe an accepted connection (plain, or mTLS: framed when ALPN chose TCP_ALPN) to *app*,
        by default the single --tcp-inbound app port, if the service's authorization policies
        allow it (judged as Istio judges TCP: by the caller's principal and the *port* it reached);
        a denied connection is closed (flag RBAC)."""
        a = {"network.transport": "tcp", "mesh.direction": "inbound",
             "mesh.destination.service": self.service, "mesh.destination.version": self.version,
             "mesh.connection_security_policy": peer.security}
        if peer.principal is not None:
            a["mesh.source.principal"] = str(peer.principal)
            a["mesh.destination.principal"] = str(self.tls.identity)
            source = self.router.config.service_of(peer.principal) or peer.principal.service_account
            if source:
                a["mesh.source.service"] = source
        c = _Conn(f"tcp {self.service}", KIND_SERVER, a)
        upstream = None
        try:
            if app is None:
                app = self.default_app
            if app is None:
                self.refused += 1
                c.flag, c.message = "NR", "opaque TCP on the HTTP inbound port needs exactly one --tcp-inbound"
                return
            a["mesh.upstream.endpoint"] = str(app)
            a["server.address"], a["server.port"] = app.host, app.port
            authz = self.authorizer() if self.authorizer is not None else None
            if authz is not None and authz.enforces(self.service):
                decision = authz.check(self.service, AuthzRequest(
                    str(peer.principal) if peer.principal else None, None, None, port))
                a["mesh.authz.decision"] = decision.decision
                if decision.policy:
                    a["mesh.authz.policy"] = decision.policy
                if not decision.allowed:
                    self.denied += 1
                    c.flag, c.message = RBAC_FLAG, DENIED_BODY
                    return
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    upstream = await trio.open_tcp_stream(app.host, app.port)
            except (trio.TooSlowError, OSError) as exc:
                c.flag, c.message = "UF", f"app connect error: {getattr(exc, 'strerror', None) or exc or 'timeout'}"
                return
            down = FramedEnd(stream) if is_tcp_alpn(stream) else RawEnd(stream)
            await self._pipe(c, down, RawEnd(upstream))
        except trio.Cancelled:
            c.flag, c.message = "DC", "sidecar shutting down"
            raise
        finally:
            await self._finish(c, upstream, stream)

    # -- both ---------------------------------------------------------------------------------

    async def _finish(self, c: _Conn, upstream, stream) -> None:
        """Close both ends of *c* (each shielded and bounded by CLOSE_TIMEOUT_S), then record it."""
        await _close(upstream)
        await _close(stream)
        self._record(c)

    async def _pipe(self, c: _Conn, down, up) -> None:
        if self.metrics is not None:
            c.series = self.metrics.tcp_series(c.attrs)
            c.series.opened += 1
        series = c.series

        def count(received: int, sent: int) -> None:
            c.received += received
            c.sent += sent
            if series is not None:
                series.received += received
                series.sent += sent

        res = await splice(down, up, IDLE_TIMEOUT_S, count)
        if res.idle:
            c.flag, c.message = "UT", f"idle for {IDLE_TIMEOUT_S:g}s"
        elif res.broken == "a":
            c.flag, c.message = "DC", "the downstream connection broke"
        elif res.broken == "b":
            c.flag, c.message = "UC", "the upstream connection broke"

    def _record(self, c: _Conn) -> None:
        a = c.attrs
        a["mesh.response_flags"] = c.flag
        a["mesh.tcp.received_bytes"] = c.received
        a["mesh.tcp.sent_bytes"] = c.sent
        if self.metrics is not None:
            if c.series is None:  # never connected: count it opened and closed, with its flag
                c.series = self.metrics.tcp_series(a, c.flag)
                c.series.opened += 1
            c.series.closed += 1
        failed = c.flag not in ("-", "DC", RBAC_FLAG)  # a policy's denial is the mesh working
        duration_ns = time.perf_counter_ns() - c.t0
        trace_id, span_id = new_trace_id(), new_span_id()
        if self.access_log is not None:  # one record per connection, linked to its span
            self.access_log.record(AccessEntry(c.start_ns, duration_ns, trace_id, span_id, 0x01, a, 0, c.flag,
                                               c.received, c.sent, ""))
        self.recorder.record(SpanRecord(trace_id, span_id, b"", c.name, c.kind, c.start_ns, c.start_ns + duration_ns,
                                        a, STATUS_ERROR if failed else STATUS_UNSET, c.message if failed else ""))


class _ConnectFailed(Exception):
    pass
