"""The sidecar's HTTP/1.1 data path: one Trio task per downstream connection, h11 on both sides.
A connection that speaks HTTP/2 (TLS ALPN ``h2``, or the client preface first) goes to
:mod:`._http2` instead, which shares :meth:`Sidecar._admit`, :meth:`Sidecar._outbound` and
:meth:`Sidecar._record` with this module.

Inbound (a request to this workload): forward to the local app. Outbound (the app calling another
service): the service comes from the absolute-form target (``GET http://catalog/x``, as clients
send it to an ``HTTP_PROXY``) or from the ``Host`` header; the :class:`Router` picks version and
endpoint. Bodies stream through in both directions; nothing is buffered beyond one read.

Each request yields one span: SERVER inbound, CLIENT outbound, a child of the caller's
``traceparent`` (else its B3 context); the upstream gets a ``traceparent`` naming our span as its
parent, the caller's ``tracestate``, and B3 headers naming our span where B3 came in
(:func:`_context_headers`). :meth:`Sidecar._record` ends every request: RED metrics, one access
log record (:mod:`._accesslog`), the span. Failures map to
Envoy's response flags and statuses: NR 404 (no route), UH 503 (no endpoint), UF 503 (connect
failure), UT 504 (timeout), UC 503 (upstream closed before the response head; after it, the
downstream connection is cut), DC (the downstream went away), UPE 502 (upstream protocol error).
A stale kept-alive upstream connection that fails before any response is retried once on a new
connection, when the request has no body (so nothing is sent twice that cannot be sent again).

Outbound, the router picks the route (first match), version and endpoint; then, in this order: the
route's fault injection (delay: flag DI; abort: its status, flag FI, nothing sent), the destination's
circuit breaker (503 UO at once past max_requests, or past max_pending_requests waiting for one of
max_connections), and the attempts: the route's timeout (default 15 s) bounds them all, a retry
policy's per-try timeout each; a retriable outcome is retried (jittered backoff, another endpoint,
within the service's retry budget) up to the policy's attempts, after which the last answer is
relayed with URX. Only a request without a body, or with a Content-Length body of at most
MAX_RETRY_BODY (read whole first), is retried. Each attempt's outcome feeds outlier detection.
Span attributes ``mesh.route`` and ``mesh.retries``.

Mesh mTLS (:mod:`tracemesh.proxy._mtls`): an inbound connection is first accepted by the
sidecar's mode (STRICT, PERMISSIVE, DISABLE), which yields the stream to speak HTTP over and the
peer's verified SPIFFE ID, if any. That principal, and nothing the request says, is the caller's
identity: it is on the span (``mesh.source.principal``, ``mesh.connection_security_policy``), it
names the source service when the mesh config maps it to one (else its service account does), and
authorization policies (:mod:`tracemesh.proxy._authz`) judge it; a denied request gets 403
``RBAC: access denied`` with the response flag ``RBAC``. ``x-tracemesh-peer`` from a caller then
only contributes the version of the service its certificate proves; ``x-forwarded-client-cert``
from a caller is always dropped, and set (Envoy's ``By=...;URI=...``) for an mTLS caller.
Outbound, a destination whose mode is not DISABLE is reached over mTLS and verified by SPIFFE ID.

Upgrade (WebSocket): a request with ``Connection: upgrade`` and an ``Upgrade`` token other than
``h2c`` is forwarded with both; an upstream's 101 is relayed and the connection becomes a byte
tunnel both ways (:func:`tracemesh.proxy._tcp.splice`) until both sides close; its span covers the
whole tunnel, body sizes counting the tunnelled bytes. Any other answer is relayed as usual.

Mirroring: a route's ``mirror`` sends a copy of its percentage of requests (bodiless, or with a
body of at most MAX_RETRY_BODY: read whole first when its Content-Length says so, else teed as it
streams upstream and copied once it ended; a longer one is skipped, counted) to an endpoint of the mirror
service, host ``-shadow``-suffixed, from a task group of the sidecar's own (:meth:`Sidecar.run`):
never waited for, at most MAX_MIRRORS in flight (more are dropped, counted), each with its own
CLIENT span (``mesh.mirror``), a child of the request's.

Cancellation: cancelling a connection task closes both connections of the exchange in flight and
still records its span (flag DC).
"""

from __future__ import annotations

import random
import time
import weakref
from binascii import hexlify
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from h11._writers import ChunkedWriter as _ChunkedWriter

from tracemesh import _h1fast
from tracemesh._h11io import next_event as _next_event
from tracemesh.net import Addr
from tracemesh.proxy._authz import DENIED_BODY, RBAC_FLAG, Authorizer
from tracemesh.proxy._authz import Request as AuthzRequest
from tracemesh.proxy._config import DEFAULT_MTLS, MTLS_DISABLE, MTLS_STRICT, MeshConfig
from tracemesh.proxy._mtls import PLAINTEXT as PLAINTEXT_PEER
from tracemesh.proxy._mtls import MeshTls, Peer
from tracemesh.proxy._pool import PLAINTEXT, ConnectError, Pool, Security, UpstreamConn
from tracemesh.proxy._recorder import (
    KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, SpanRecord, SpanRecorder,
)
from tracemesh.proxy._resilience import Outcome, RetryPolicy
from tracemesh.proxy._router import NoHealthyUpstream, NoRoute, Router, Selection, ServiceState
from tracemesh._sockio import FastStream
from tracemesh.proxy._tcp import RawEnd, TcpProxy, is_tcp_alpn, splice
from tracemesh.proxy._accesslog import AccessEntry
from tracemesh.proxy._tracecontext import (
    B3, B3_HEADERS, Incoming, extract, new_request_id, new_span_id, new_trace_id,
)

#: Request heads larger than this get 431 (Envoy's default max_request_headers_kb is 60).
MAX_HEADER_BYTES = 64 * 1024
#: A new connection must deliver its first request head within this time (slowloris).
HEADER_TIMEOUT_S = 10.0
#: A kept-alive downstream connection idle this long is closed (Envoy: 1 h; apps reconnect cheaply).
IDLE_TIMEOUT_S = 60.0
#: The upstream must answer with a response head within this time (Envoy's default route timeout).
ROUTE_TIMEOUT_S = 15.0
#: Between two reads of a streaming body, on either side.
BODY_IDLE_TIMEOUT_S = 60.0
#: A request body up to this size (with a Content-Length) is read whole before it is sent, when its
#: route retries, so that a retry can send it again; a larger or chunked body streams, untried twice.
MAX_RETRY_BODY = 64 * 1024
#: Writes are gathered up to this size before a send (one syscall for a small exchange).
COALESCE_BYTES = 64 * 1024

#: An upgraded connection (WebSocket) with no byte either way this long is closed (Envoy: 1 h).
UPGRADE_IDLE_TIMEOUT_S = 3600.0
#: Mirrored requests in flight at most; past it a copy is dropped (counted), never queued.
MAX_MIRRORS = 64
#: A mirrored copy's whole exchange ends within this (or the route's timeout, if shorter).
MIRROR_TIMEOUT_S = 10.0

#: Headers of one hop only (RFC 9110 7.6.1), never forwarded; h11 writes the framing we need.
#: ``trailer`` is not one (RFC 9110 6.6.2: it announces end-to-end fields): it is passed on where the
#: next hop's framing can carry trailers, and dropped where it cannot (:func:`_announce_trailers`).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"expect",
})
#: The caller's service and version, set by the calling sidecar and stripped before the app sees
#: it. A claim, not an identity: with mTLS the service comes from the peer certificate, and only
#: the version of that service is taken from here; without mTLS it is informational only.
PEER_HEADER = b"x-tracemesh-peer"
#: Envoy's header for the caller's verified certificate identity; never taken from a caller.
XFCC_HEADER = b"x-forwarded-client-cert"
#: gRPC statuses that fail a SERVER span (OTel semconv): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
#: INTERNAL, UNAVAILABLE, DATA_LOSS; the others are the caller's doing.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


class ProxyError(Exception):
    def __init__(self, status: int, flag: str, message: str) -> None:
        super().__init__(message)
        self.status, self.flag = status, flag


class _DownstreamGone(Exception):
    pass


class _DownstreamCut(_DownstreamGone):
    """The upstream failed after the response head was sent: the only honest move is to cut."""


class _UpstreamGone(Exception):
    pass


@dataclass
class _Span:
    start_ns: int
    trace_id: bytes
    span_id: bytes
    parent: bytes
    flags: int
    sampled: bool
    attrs: dict = field(default_factory=dict)
    status: int | None = None
    flag: str = "-"
    message: str = ""
    req_bytes: int = 0
    resp_bytes: int = 0
    trace_state: str = ""  # the caller's W3C tracestate, passed on and recorded
    incoming: Incoming | None = None  # set when B3 headers came: they are replaced by ones naming this span
    authority: str = ""  # for the access log


#: The trace-context headers the sidecar replaces with its own (:func:`_context_headers`).
CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate"}) | B3_HEADERS
#: ``-flags`` of a traceparent, by the flags' value (a byte)
_FLAGS_HEX = tuple(b"-%02x" % i for i in range(256))
#: What :meth:`Sidecar._admit` drops from a request (and sets anew): one set, one lookup per header
_REPLACED_HEADERS = CONTEXT_HEADERS | {PEER_HEADER, XFCC_HEADER}


def _context_headers(span: _Span) -> list[tuple[bytes, bytes]]:
    """What the next hop gets to continue the trace: ``traceparent`` naming *span*, the
    ``tracestate`` received, and, when B3 came in, B3 headers of the same form(s) naming *span*
    (as Envoy rewrites x-b3-* with its own span), so a B3-only app keeps a connected trace."""
    # TraceParent(...).header().encode() made as bytes directly: a third of its cost, per request
    out = [(b"traceparent", b"00-" + hexlify(span.trace_id) + b"-" + hexlify(span.span_id) + _FLAGS_HEX[span.flags])]
    if span.trace_state:
        out.append((b"tracestate", span.trace_state.encode()))
    inc = span.incoming
    if inc is not None:
        got = inc.b3
        b3 = B3(span.trace_id, span.span_id, span.sampled, got is not None and got.debug, span.parent or None,
                got is not None and got.short)
        if inc.b3_single:
            out.append((b"b3", b3.single().encode()))
        if inc.b3_multi:
            out += b3.multi()
    return out


@dataclass
class _Target:
    """Where an exchange goes, as :meth:`Sidecar._admit` works it out (HTTP/1.1 and HTTP/2 alike)."""

    name: str  # the span's name so far
    headers: list  # to forward
    path: str  # path and query to forward
    upstream: Addr | None = None  # inbound: the app
    sel: Selection | None = None  # outbound: the route and version
    hash_key: str | None = None
    security: Security = PLAINTEXT


async def _body_event(dconn: h11.Connection, dstream, before_wait=None):
    """The downstream's next request-body event, its failures mapped to the client's fault.

    *before_wait* runs before waiting on the network (to flush what is pending upstream); its own
    errors are the upstream's and pass through unmapped.
    """
    try:
        ev = dconn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProxyError(400, "DC", f"bad request body: {exc}") from None
    if ev is not h11.NEED_DATA:
        return ev
    if before_wait is not None:
        await before_wait()
    try:
        return await _next_event(dconn, dstream, BODY_IDLE_TIMEOUT_S)
    except trio.TooSlowError:
        raise ProxyError(408, "DC", "request body stalled") from None
    except h11.RemoteProtocolError as exc:
        raise ProxyError(400, "DC", f"bad request body: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise _DownstreamGone() from None


def _start_span(start_ns: int, headers: list) -> tuple[_Span, bytes]:
    """The exchange's span, a child of the caller's context (``traceparent``, else B3: see
    :func:`extract`), and its request id: the caller's ``x-request-id``, or a new one added to *headers*."""
    ctx, request_id = extract(headers)
    tp = ctx.parent
    span = _Span(start_ns, tp.trace_id if tp else new_trace_id(), new_span_id(), tp.span_id if tp else b"",
                 tp.flags if tp else int(ctx.sampled), ctx.sampled, trace_state=ctx.tracestate,
                 incoming=ctx if ctx.b3_single or ctx.b3_multi else None)
    if not request_id:
        request_id = new_request_id()
        headers.append((b"x-request-id", request_id))
    return span, request_id


def _header_list(headers) -> list[tuple[bytes, bytes]]:
    """An h11 event's headers as a list of (lowercased name, value): taken from h11's own list
    (h11.Headers is a Sequence whose iteration calls ``__getitem__`` per header and builds a tuple
    each time), falling back to iterating it."""
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return [(n, v) for _, n, v in full]
    return list(headers)


def _header(headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _connection_tokens(headers) -> set[bytes]:
    named = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return named


def _forwardable(headers, named=None) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, and any header named in ``Connection`` (*named*, when the caller
    has the tokens already)."""
    if named is None:
        named = _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


#: Fields never passed on as trailers, whatever a sender put there: hop-by-hop ones, and those a
#: recipient needs before the body or that route, frame, authenticate or describe the content
#: (RFC 9110 6.5.1; the names Go's net/http refuses as trailers).
NOT_TRAILERS = HOP_BY_HOP | frozenset({
    b"trailer", b"authorization", b"cache-control", b"content-encoding", b"content-length", b"content-range",
    b"content-type", b"host", b"max-forwards", b"pragma", b"range", b"realm", b"www-authenticate",
})


def _announce_trailers(headers, chunked: bool) -> list[tuple[bytes, bytes]]:
    """*headers* with their ``trailer`` announcement only when the message they head goes out
    *chunked*: after a Content-Length or close-delimited body no trailer can follow (RFC 9112 7.1.2),
    so announcing one would be false."""
    return headers if chunked else [(k, v) for k, v in headers if k != b"trailer"]


def _trailer_fields(trailers, named=frozenset()) -> list[tuple[bytes, bytes]]:
    """The fields of a trailer section that may be passed on: not :data:`NOT_TRAILERS`, no
    pseudo-header, none named in ``Connection`` (the message head's, *named*, or the section's)."""
    if not trailers:
        return []
    named = named | _connection_tokens(trailers)
    return [(k, v) for k, v in trailers if k not in NOT_TRAILERS and k not in named and not k.startswith(b":")]


def _end_of_message(conn: h11.Connection, trailers=(), head=(), named=frozenset()) -> h11.EndOfMessage:
    """The end of the message *conn* is sending, with *trailers* (as :func:`_trailer_fields` lets
    them pass, *head* being the message's header fields as received, or *named* the tokens of its
    ``Connection``) when its body is chunked; else they are
    dropped: RFC 9112 has no place for them after a Content-Length body or an HTTP/1.0 peer's
    close-delimited one, and h11 (which raises then, breaking the connection) has no public way
    to ask which framing it chose: its writer says."""
    if trailers and isinstance(getattr(conn, "_writer", None), _ChunkedWriter):
        fields = _trailer_fields(trailers, _connection_tokens(head) if head else named)
        if fields:
            return h11.EndOfMessage(headers=fields)
    return _END


#: h11's events are frozen: one bare EndOfMessage serves every message (h11 validates the headers
#: of each new one, ~0.5 us, twice per proxied request)
_END = h11.EndOfMessage()


def _upgrade_token(headers) -> bytes | None:
    """The ``Upgrade`` value of a request that asks for one (``Connection: upgrade``), to be passed
    through; None otherwise, and for ``h2c`` (HTTP/2 is this sidecar's business, not the app's)."""
    upgrade = _header(headers, b"upgrade")
    if not upgrade or b"upgrade" not in _connection_tokens(headers):
        return None
    if any(t.strip().lower().startswith(b"h2c") for t in upgrade.split(b",")):
        return None
    return upgrade


def _shadow_host(host: bytes) -> bytes:
    """Envoy's host of a mirrored request: ``-shadow`` after the host name, before any port."""
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit() and (b":" not in name or name.endswith(b"]")):
        return name + b"-shadow:" + port
    return host + b"-shadow"


@dataclass
class MirrorStats:
    sent: int = 0  # copies started
    dropped: int = 0  # not started: MAX_MIRRORS in flight, or no mirror task group (not serving)
    skipped: int = 0  # not mirrored: a body too large to copy whole, or one that did not end; an HTTP/2 copy that fell behind
    failed: int = 0  # no answer from the mirror (connect failure, timeout, reset)
    active: int = 0


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _is_chunked(headers) -> bool:
    te = _header(headers, b"transfer-encoding")
    return te is not None and te.strip().lower().endswith(b"chunked")


async def _acquire(sc, upstream: Addr, security: Security, span: _Span) -> UpstreamConn:
    """A kept-alive or new connection of *sc*'s pool to *upstream*, its mTLS identities on *span*;
    ProxyError 503 UF when none can be opened."""
    try:
        uc = await sc.pool.acquire(upstream, security)
    except ConnectError as exc:
        raise ProxyError(503, "UF", f"upstream connect error: {exc}") from None
    if uc.peer is not None:
        span.attrs["mesh.connection_security_policy"] = "mutual_tls"
        span.attrs["mesh.source.principal"] = str(sc.tls.identity)  # what the upstream verified
        span.attrs["mesh.destination.principal"] = str(uc.peer)
    return uc


async def read_response_head(uc: UpstreamConn, deadline: float):
    """The upstream's response head on an h11 connection: an ``h11.Response``, or the 101 that h11
    yields only when the request asked for an upgrade; 100s are skipped (the downstream's Expect
    was answered by us). trio.TooSlowError past *deadline* (the caller words the 504); a
    connection that closed before or inside the head is _UpstreamGone (a kept-alive one may be
    retried), any other malformed head 502 UPE."""
    u = uc.h11
    while True:
        try:
            # the shared reader: no timer when the head is here, the CoarseTimer for a far deadline, else a scope
            ev = await _next_event(u, uc.stream, min(deadline - trio.current_time(), ROUTE_TIMEOUT_S + 3600))
        except h11.RemoteProtocolError as exc:
            data, closed = u.trailing_data
            if closed and data[:5] == b"HTTP/"[:len(data)]:  # the peer closed before or inside a response head
                raise _UpstreamGone("the connection closed") from None
            raise ProxyError(502, "UPE", f"upstream protocol error: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _UpstreamGone(str(exc) or "connection reset") from None
        if isinstance(ev, h11.Response):
            return ev
        if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
            return ev  # h11 took it only because we asked for an upgrade
        if isinstance(ev, h11.ConnectionClosed):
            raise _UpstreamGone("the connection closed")


async def _send_request_bytes(uc, data: bytes) -> None:
    """Send *data* of a request on the upstream connection *uc*; an upstream that stops reading
    for BODY_IDLE_TIMEOUT_S is a 504 UT. Cancelled or failed, part of *data* may have gone."""
    stream = uc.stream
    try_send = getattr(stream, "try_send", None)
    if try_send is not None:  # plain TCP: what the kernel takes at once needs no timer
        sent = try_send(data)
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    with trio.CancelScope(deadline=trio.current_time() + BODY_IDLE_TIMEOUT_S) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise ProxyError(504, "UT", "upstream stopped reading the request body")


def _mirror_attrs(sc, span: _Span, mirror, method: str, target: str, version: str) -> dict:
    """Put on a mirrored copy's CLIENT span of *sc* what is known before its endpoint is picked;
    return the span's attributes. *version* is the HTTP version the copy is sent in."""
    path, _, query = target.partition("?")
    a = span.attrs
    a.update({"http.request.method": method, "url.path": path, "url.scheme": "http",
              "network.protocol.version": version, "mesh.direction": "outbound", "mesh.mirror": True,
              "mesh.source.service": sc.service, "mesh.source.version": sc.version,
              "mesh.destination.service": mirror.service, "peer.service": mirror.service})
    if query:
        a["url.query"] = query
    if mirror.version is not None:
        a["mesh.destination.version"] = mirror.version
    return a


def _mirror_endpoint(sc, mirror, a: dict):
    """The endpoint a mirrored copy goes to, put on its span's attributes *a*; ProxyError 503 UH
    when the mirror service has none."""
    try:
        sel = sc.router.subset(mirror.service, mirror.version)
        ep = sc.router.endpoint(sel)
    except (NoRoute, NoHealthyUpstream) as exc:  # a config reload took the service away
        raise ProxyError(503, "UH", f"no healthy upstream: {exc}") from None
    a["mesh.upstream.endpoint"] = str(ep.address)
    a["mesh.destination.version"] = ep.version
    return ep


class Sidecar:
    """The data path of one sidecar; :meth:`handle` serves one downstream connection."""

    metrics = None  # a tracemesh.proxy._metrics.MeshMetrics, set by _serve.py
    access_log = None  # a tracemesh.proxy._accesslog.AccessLog, set by _serve.py (None: --access-log off)
    #: how to speak to the app when the mesh config does not say: auto (as the client), http1, http2
    app_protocol = "auto"

    def __init__(self, *, service: str, version: str, app: Addr, router: Router, recorder: SpanRecorder,
                 tls: MeshTls | None = None) -> None:
        self.service, self.version, self.app = service, version, app
        self.router, self.recorder = router, recorder
        self.tls = tls if tls is not None else MeshTls(None, MTLS_DISABLE)
        self.pool = Pool(self.tls)
        self._peer_value = f"{service};{version}".encode()
        self._authz_config: MeshConfig | None = None
        self._authz = Authorizer()
        self.denied = 0
        self._rng = random.Random()
        #: per destination service (state): slots for its connection_pool.max_connections
        self._slots: weakref.WeakKeyDictionary[ServiceState, trio.Semaphore] = weakref.WeakKeyDictionary()
        #: opaque TCP: its own listeners (wired by _serve.py), and mTLS connections here that chose its ALPN
        self.tcp = TcpProxy(service=service, version=version, router=router, recorder=recorder, tls=self.tls,
                            authorizer=self._authorizer)
        self.mirrors = MirrorStats()
        self._mirror_nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the task group of mirrored requests (fire-and-forget, so they outlive the request
        that made them) until cancelled, which cancels the copies in flight. Without it running,
        mirrored copies are dropped (counted)."""
        async with trio.open_nursery() as nursery:
            self._mirror_nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._mirror_nursery = None

    def _authorizer(self) -> Authorizer:
        config = self.router.config
        if config is not self._authz_config:  # rebuilt once per config (re)load
            self._authz, self._authz_config = Authorizer(config.policies), config
        return self._authz

    async def handle(self, stream: trio.SocketStream, direction: str) -> None:
        peer, port = PLAINTEXT_PEER, 0
        if direction == "inbound":
            try:
                port = stream.socket.getsockname()[1]
            except OSError:
                pass
            accepted = await self.tls.accept(stream)
            if accepted is None:
                return  # refused (and closed): counted and logged by the acceptor
            stream, peer = accepted
            if is_tcp_alpn(stream):  # a sidecar's opaque TCP, not HTTP (see _tcp.py)
                await self.tcp.serve_accepted(stream, peer, port=port)
                return
        from tracemesh.proxy import _http2  # not at the top: _http2 builds on this module

        if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() == "h2":
            await _http2.serve(self, stream, direction, peer, port)
            return
        deadline = trio.current_time() + HEADER_TIMEOUT_S
        initial, is_h2 = await _http2.sniff(stream, HEADER_TIMEOUT_S)  # h2c with prior knowledge?
        if is_h2:
            await _http2.serve(self, stream, direction, peer, port, initial)
            return
        await self._serve_connection(stream, direction, peer, port, initial, deadline - trio.current_time())

    async def _serve_connection(self, stream, direction: str, peer: Peer, port: int, initial: bytes = b"",
                                first_timeout: float = HEADER_TIMEOUT_S) -> None:
        """HTTP/1.1 on *stream*, *initial* being what was read from it already; the first request
        head must be complete within *first_timeout*."""
        stream = FastStream.wrap(stream)  # plain TCP: no trip through the scheduler per read and write
        conn = _h1fast.connection(h11.SERVER, MAX_HEADER_BYTES)
        if initial:
            conn.receive_data(initial)
        first = True
        try:
            while True:
                try:
                    event = await _next_event(conn, stream, max(0.0, first_timeout) if first else IDLE_TIMEOUT_S)
                except trio.TooSlowError:
                    if conn.their_state is h11.SEND_BODY or (conn.their_state is h11.IDLE and not first):
                        return
                    await self._local_reply(conn, stream, 408, "request head not received in time", close=True)
                    return
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._local_reply(conn, stream, exc.error_status_hint, f"bad request: {exc}", close=True)
                    return
                first = False
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed, or PAUSED after a request we could not finish
                # h11 bounds only an incomplete head; one that completes in the read past the limit gets here
                items = _header_list(event.headers)
                if len(event.target) + sum(len(k) + len(v) + 4 for k, v in items) > MAX_HEADER_BYTES:
                    await self._local_reply(conn, stream, 431, "request header fields too large", close=True)
                    return
                names = {k for k, _ in items}
                if b"transfer-encoding" in names and b"content-length" in names:
                    # RFC 9112 6.1: ambiguous framing is how requests are smuggled past a proxy; refuse, close
                    await self._local_reply(conn, stream, 400, "bad request: both Transfer-Encoding and Content-Length",
                                            close=True)
                    return
                await self._exchange(conn, stream, event, direction, peer, port)
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _local_reply(self, conn: h11.Connection, stream, status: int, message: str, close: bool = False) -> bool:
        """Answer with a small text body, when the response has not started. True if sent."""
        if conn.our_state is not h11.SEND_RESPONSE and conn.our_state is not h11.IDLE:
            return False
        body = (message + "\n").encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        if close or conn.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))  # an unread request body makes the connection unusable
        try:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
                                  + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))  # one send
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return False
        return True

    # -- one request -------------------------------------------------------------------------

    async def _exchange(self, dconn: h11.Connection, dstream, req: h11.Request, direction: str,
                        peer: Peer = PLAINTEXT_PEER, port: int = 0) -> None:
        start_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        headers = _header_list(req.headers)
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("ascii", "replace")
        span, request_id = _start_span(start_ns, headers)
        authority = (_header(headers, b"host") or b"").decode("ascii", "replace")
        path_and_query = target
        if target.startswith(("http://", "https://")):
            parts = urlsplit(target)
            authority = parts.netloc or authority
            path_and_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = [(k, v) for k, v in headers if k != b"host"]  # RFC 9112 3.2.2: the target's authority wins
        t = _Target(f"{method} {self.service}", headers, path_and_query)
        kind = KIND_SERVER if direction == "inbound" else KIND_CLIENT
        try:
            self._admit(t, span, direction, peer, port, method, target, authority,
                        req.http_version.decode("ascii", "replace"), request_id)
            headers, path_and_query, upstream, sel = t.headers, t.path, t.upstream, t.sel
            hash_key, security = t.hash_key, t.security
            if _header(headers, b"host") is None:  # (a plain loop: no generator per request)
                headers.insert(0, (b"host", (authority or str(upstream)).encode()))
            if sel is None:
                await self._forward(dconn, dstream, req, headers, path_and_query, upstream, span, security)
            else:
                await self._outbound(dconn, dstream, req, headers, path_and_query, sel, hash_key, span, security)
        except ProxyError as exc:
            span.flag = exc.flag if span.flag == "-" else f"{span.flag},{exc.flag}"
            span.message = str(exc)
            if dconn.their_state is h11.SEND_BODY:
                try:  # a bodiless request's end is already parsed: take it, so keep-alive survives
                    dconn.next_event()
                except h11.RemoteProtocolError:
                    pass
            if await self._local_reply(dconn, dstream, exc.status, str(exc)):
                span.status = exc.status
        except _DownstreamCut:
            pass  # the flag says what the upstream did
        except _DownstreamGone:
            span.flag, span.message = "DC", "downstream connection closed before the response was complete"
        except trio.Cancelled:
            span.flag, span.message = "DC", "sidecar shutting down"
            raise
        finally:
            self._record(span, t.name, kind, t0)

    def _admit(self, t: _Target, span: _Span, direction: str, peer: Peer, port: int, method: str, target: str,
               authority: str, version: str, request_id: bytes) -> None:
        """What HTTP/1.1 and HTTP/2 exchanges share before forwarding: the request's span
        attributes; inbound, the caller's identity (and XFCC) and the authorization policies'
        verdict; outbound, the route. Fills *t* as it goes (so a refusal, a ProxyError, leaves the
        span name reached so far) and adds ``traceparent`` (naming our span) to ``t.headers``."""
        headers = t.headers
        path, _, query = t.path.partition("?")
        a = span.attrs
        a["http.request.method"] = method
        a["url.path"] = path
        if query:
            a["url.query"] = query
        a["url.scheme"] = "http"
        a["network.protocol.version"] = version
        a["mesh.direction"] = direction
        a["guid:x-request-id"] = request_id.decode("latin-1")
        ua = _header(headers, b"user-agent")
        if ua:
            a["user_agent.original"] = ua.decode("latin-1")
        claimed = _header(headers, PEER_HEADER)
        headers = t.headers = [(k, v) for k, v in headers if k not in _REPLACED_HEADERS]
        span.authority = authority
        a["mesh.connection_security_policy"] = peer.security
        if direction == "inbound":
            t.upstream = self.app
            a["mesh.destination.service"], a["mesh.destination.version"] = self.service, self.version
            claim_service, _, claim_version = (claimed or b"").decode("latin-1").partition(";")
            if peer.principal is not None:
                a["mesh.source.principal"] = str(peer.principal)
                a["mesh.destination.principal"] = str(self.tls.identity)  # what the caller verified
                source = self.router.config.service_of(peer.principal) or peer.principal.service_account
                if source:
                    a["mesh.source.service"] = source
                    if claim_service == source and claim_version:
                        a["mesh.source.version"] = claim_version
                headers.append((XFCC_HEADER, f"By={self.tls.identity};URI={peer.principal}".encode()))
            elif claimed:
                a["mesh.source.service"], a["mesh.source.version"] = claim_service, claim_version
            authz = self._authorizer()
            if authz.enforces(self.service):
                areq = AuthzRequest(str(peer.principal) if peer.principal else None, method, path, port)
                decision = authz.check(self.service, areq)
                a["mesh.authz.decision"] = decision.decision
                if decision.policy:
                    a["mesh.authz.policy"] = decision.policy
                if not decision.allowed:
                    self.denied += 1
                    raise ProxyError(403, RBAC_FLAG, DENIED_BODY)
                normalized = areq.normalized_path
                if normalized != path and path.startswith("/"):
                    # as Envoy's normalize_path: the app gets the path the policy judged
                    t.path = normalized + (f"?{query}" if query else "")
        else:
            a["mesh.source.service"], a["mesh.source.version"] = self.service, self.version
            t.name = f"{method} unknown"
            if method == "CONNECT":
                raise ProxyError(501, "NR", "CONNECT tunnels are not supported by the outbound listener")
            if target.startswith("https://"):
                raise ProxyError(501, "NR", "https:// targets cannot be proxied in plain HTTP; let the sidecar do TLS")
            if not authority:
                raise ProxyError(400, "NR", "no Host header and no absolute-form target: cannot tell which service")
            def header(n: str, _h=headers) -> str | None:
                v = _header(_h, n.encode("latin-1"))
                return None if v is None else v.decode("latin-1")
            try:
                sel = t.sel = self.router.select(authority, method, path, header,
                                                 dict(reversed(parse_qsl(query, keep_blank_values=True)))
                                                 if query else {})
            except NoRoute as exc:
                raise ProxyError(404, "NR", f"no route: {exc}") from None
            t.name = f"{method} {sel.service}"
            a["peer.service"] = a["mesh.destination.service"] = sel.service
            if sel.route is not None:
                a["mesh.route"] = sel.route.name
            if sel.version is not None:
                a["mesh.destination.version"] = sel.version
            if sel.state.hash_header:
                t.hash_key = header(sel.state.hash_header)
            t.security = self._security_to(sel.service)
            headers.append((PEER_HEADER, self._peer_value))
        if t.upstream is not None:
            a["mesh.upstream.endpoint"] = str(t.upstream)
        if authority:
            a["server.address"] = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
        headers += _context_headers(span)

    def _security_to(self, service: str) -> Security:
        """mTLS to a destination whose mode is not DISABLE, when this sidecar has a certificate."""
        svc = self.router.config.services.get(service)
        mode = svc.mtls if svc is not None else DEFAULT_MTLS
        if mode == MTLS_DISABLE:
            return PLAINTEXT
        if not self.tls.can_originate:
            if mode == MTLS_STRICT:
                raise ProxyError(503, "UF", f"service {service!r} takes mTLS only (strict) and this sidecar "
                                            f"has no workload identity (--identity)")
            return PLAINTEXT
        return Security(True, svc.identity if svc is not None else None)

    def _record(self, span: _Span, name: str, kind: int, t0: int) -> None:
        """The one place a request ends: its RED metrics, access log record and span."""
        duration_ns = time.perf_counter_ns() - t0
        if self.metrics is not None:  # RED metrics count every request, sampled or not
            self.metrics.observe(span.attrs, duration_ns / 1e9, span.req_bytes, span.resp_bytes,
                                 span.status, span.flag)
        if self.access_log is not None:  # as are access logs; the span's attributes are final below
            self.access_log.record(AccessEntry(span.start_ns, duration_ns, span.trace_id, span.span_id, span.flags,
                                               span.attrs, span.status or 0, span.flag, span.req_bytes,
                                               span.resp_bytes, span.authority))
        if not span.sampled:
            return
        a = span.attrs
        if span.status is not None:
            a["http.response.status_code"] = span.status
        a["mesh.response_flags"] = span.flag
        a["http.request.body.size"] = span.req_bytes
        a["http.response.body.size"] = span.resp_bytes
        limit = 500 if kind == KIND_SERVER else 400  # OTel semconv: a 4xx is the client's error, not the server's
        # a policy's 403 is the mesh working, not failing: a server error only for a client span
        ok_flags = ("-", "DC", RBAC_FLAG) if kind == KIND_SERVER else ("-", "DC")
        # an injected delay (DI) is the config working: it alone does not fail a request
        failed = span.status is None or span.status >= limit or (span.flag != "-" and any(
            f not in ok_flags for f in span.flag.split(",") if f != "DI"))  # "-": the usual, nothing to split
        if span.flag == "DC" and span.status is None:
            failed = kind == KIND_CLIENT
        grpc = a.get("rpc.grpc.status_code")
        if grpc is not None and not failed:  # OTel semconv for gRPC: any non-OK fails a client span
            failed = grpc != 0 if kind == KIND_CLIENT else grpc in GRPC_SERVER_ERRORS
        status = STATUS_ERROR if failed else STATUS_UNSET
        message = span.message if failed else ""
        end_ns = span.start_ns + (time.perf_counter_ns() - t0)
        self.recorder.record(SpanRecord(span.trace_id, span.span_id, span.parent, name, kind,
                                        span.start_ns, end_ns, a, status, message, span.trace_state))

    async def _outbound(self, dconn, dstream, req: h11.Request, headers, target: str, sel: Selection,
                        hash_key: str | None, span: _Span, security: Security, forward=None) -> None:
        """Fault injection, then the destination's circuit breaker, then :meth:`_forward` (or
        *forward*, HTTP/2's)."""
        route = sel.route
        fault = route.fault if route is not None else None
        if fault is not None:
            if fault.delay_s and self._rng.random() * 100 < fault.delay_percent:
                span.flag = "DI"
                await trio.sleep(fault.delay_s)
            if fault.abort_status and self._rng.random() * 100 < fault.abort_percent:
                raise ProxyError(fault.abort_status, "FI", "fault filter abort")
        state = sel.state
        state.budget.active_requests += 1
        try:
            await self._guarded(dconn, dstream, req, headers, target, sel, hash_key, span, security, forward)
        finally:
            state.budget.active_requests -= 1

    async def _guarded(self, dconn, dstream, req, headers, target: str, sel: Selection, hash_key: str | None,
                       span: _Span, security: Security, forward=None) -> None:
        """Through the circuit breaker of the destination service: max_requests, max_connections
        (a request waits for a connection as a pending one), max_pending_requests; past one, 503 UO.
        *forward*: what sends it then, :meth:`_forward` or HTTP/2's (same signature)."""
        route, state = sel.route, sel.state
        if not state.breaker.try_request():
            raise ProxyError(503, "UO", f"upstream overflow: {state.breaker.limits.max_requests} requests "
                                        f"to {sel.service!r} already in flight (max_requests)")
        try:
            slots = None
            if state.limits is not None:
                slots = self._slots.get(state)
                if slots is None:
                    slots = self._slots[state] = trio.Semaphore(state.limits.max_connections)
                if slots.value == 0:  # every connection busy: wait as a pending request, if there is room
                    if not state.breaker.try_pending():
                        raise ProxyError(503, "UO", f"upstream overflow: {state.limits.max_pending_requests} requests "
                                                    f"to {sel.service!r} already pending (max_pending_requests)")
                    try:
                        timeout = route.timeout_s if route is not None and route.timeout_s else ROUTE_TIMEOUT_S
                        with trio.fail_after(timeout):
                            await slots.acquire()
                    except trio.TooSlowError:
                        raise ProxyError(504, "UT", "upstream request timeout: no connection came free") from None
                    finally:
                        state.breaker.pending_done()
                else:
                    slots.acquire_nowait()
            try:
                await (forward or self._forward)(dconn, dstream, req, headers, target, None, span, security, sel,
                                                 hash_key)
            finally:
                if slots is not None:
                    slots.release()
        finally:
            state.breaker.request_done()

    async def _read_body(self, dconn, dstream, span: _Span) -> bytes:
        """The whole request body (at most MAX_RETRY_BODY by its Content-Length), for retries."""
        parts = []
        while True:
            ev = await _body_event(dconn, dstream)
            if isinstance(ev, h11.Data):
                span.req_bytes += len(ev.data)
                parts.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _DownstreamGone()

    async def _forward(self, dconn, dstream, req: h11.Request, headers, target: str, upstream: Addr | None,
                       span: _Span, security: Security = PLAINTEXT, sel: Selection | None = None,
                       hash_key: str | None = None) -> None:
        """Send the request to *upstream*, or (outbound) to endpoints the router picks for *sel*,
        retrying by the route's policy; relay the response. An HTTP/2 next hop (by the config or
        ``--app-protocol``, :mod:`._translate`) gets it translated instead."""
        if self.router.config.services or self.app_protocol != "auto":
            from tracemesh.proxy import _translate

            if _translate.next_hop(self, _translate.H1, sel.service if sel is not None else None,
                                   security.mtls) == _translate.H2 and _upgrade_token(headers) is None:
                await _translate.h1_to_h2(self, dconn, dstream, req, headers, target, upstream, span, security,
                                          sel, hash_key)
                return
        chunked = _is_chunked(headers)
        length = _header(headers, b"content-length")
        has_body = chunked or (length is not None and length.strip() not in (b"", b"0"))
        upgrade = _upgrade_token(headers)
        named = _connection_tokens(headers)  # fields these name stay out of the trailers too
        headers = _announce_trailers(_forwardable(headers, named), chunked)
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if upgrade is not None:  # passed through: the upstream's 101 turns the connection into a tunnel
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        if dconn.client_is_waiting_for_100_continue:
            # as Envoy does by default: answer 100 ourselves rather than relaying the upstream's
            await dstream.send_all(dconn.send(h11.InformationalResponse(status_code=100, headers=[])))
        # as h11.Request(..., _parsed=True): the headers are the parsed request's (checked by h11's
        # parser) and our own (trace context, request id, peer, XFCC, Host), which are valid by
        # construction; the method and the target are still checked
        out_req = _h1fast.request(req.method, target.encode("ascii"), headers)
        route = sel.route if sel is not None else None
        timeout = route.timeout_s if route is not None and route.timeout_s else ROUTE_TIMEOUT_S
        deadline = trio.current_time() + timeout
        policy: RetryPolicy | None = route.retries if route is not None else None
        if policy is not None and policy.attempts <= 0:
            policy = None
        mirror = route.mirror if route is not None and upgrade is None else None
        if mirror is not None and not self._rng.random() * 100 < mirror.percent:
            mirror = None
        body = None
        tee = None  # a streamed body's copy for the mirror (_translate._Tee), fed as it goes upstream
        if has_body and (policy is not None or mirror is not None):
            try:
                size = int(length) if not chunked and length is not None else -1
            except ValueError:
                size = -1
            if 0 <= size <= MAX_RETRY_BODY:
                body = await self._read_body(dconn, dstream, span)
            else:
                policy = None  # a streamed body cannot be sent twice
                if mirror is not None:
                    tee = self._mirror_tee(mirror, out_req, span, timeout)
                    mirror = None
        if mirror is not None:
            self._start_mirror(mirror, out_req, body or b"", span, timeout)
        replayable = not has_body or body is not None
        state = sel.state if sel is not None else None
        tried: list = []
        retries = 0
        in_retry = False
        if sel is not None:
            span.attrs["mesh.retries"] = 0
        while True:
            ep = None
            if sel is not None:
                try:
                    ep = self._endpoint(sel, tried, hash_key, span)
                except ProxyError:
                    if in_retry:
                        state.budget.retry_done()
                    raise
                upstream = ep.address
            attempt_deadline = deadline
            if policy is not None and policy.per_try_timeout_s is not None:
                attempt_deadline = min(deadline, trio.current_time() + policy.per_try_timeout_s)
            outcome: Outcome | None = None
            resp = uc = None
            error: ProxyError | None = None
            try:
                resp, uc = await self._attempt(upstream, security, dconn, dstream, out_req, has_body, body, replayable,
                                               span, attempt_deadline, timeout if attempt_deadline == deadline else None,
                                               tee, named)
                outcome = Outcome(resp.status_code)
            except ProxyError as exc:
                error = exc
                if exc.flag in ("UF", "UC", "UT"):
                    outcome = Outcome(None, exc.flag)
            finally:
                if state is not None:
                    state.finished(ep, outcome)
                if in_retry:
                    state.budget.retry_done()
                    in_retry = False
            if policy is None or outcome is None or not policy.retriable(outcome):
                break
            if retries >= policy.attempts or trio.current_time() >= deadline or not state.budget.try_retry():
                # retries exhausted (or the budget says no) and this attempt failed too
                if error is not None:
                    error = ProxyError(error.status, f"{error.flag},URX", f"{error} (after {retries} retries)")
                else:
                    span.flag = "URX"
                break
            in_retry = True
            if uc is not None:
                await uc.aclose()  # the response is not wanted: a retry takes its place
            retries += 1
            span.attrs["mesh.retries"] = retries
            tried.append(ep)
            try:
                with trio.move_on_at(deadline):
                    await trio.sleep(policy.backoff_s(retries, self._rng))
            except BaseException:
                state.budget.retry_done()
                raise
        if error is not None:
            raise error
        if resp.status_code == 101:
            try:
                await self._splice_upgraded(uc, dconn, dstream, resp, span)
            finally:
                await uc.aclose()
            return
        try:
            await self._relay_response(uc, dconn, dstream, resp, span)
        except BaseException:
            await uc.aclose()
            raise
        await self.pool.release(uc)

    def _mirror_tee(self, mirror, out_req: h11.Request, parent: _Span, route_timeout: float):
        """A mirror copy of a body that streams (chunked, or longer than MAX_RETRY_BODY by its
        Content-Length): teed as it goes to the request's upstream, never read ahead of it; the
        copy leaves whole once the body ended (:meth:`_start_mirror`), unless the body grew past
        MAX_RETRY_BODY or did not end (then it is skipped, counted)."""
        from tracemesh.proxy._translate import _Tee

        return _Tee(self.mirrors, MAX_RETRY_BODY,
                    on_end=lambda body: self._start_mirror(mirror, out_req, body, parent, route_timeout))

    def _start_mirror(self, mirror, out_req: h11.Request, body: bytes, parent: _Span, route_timeout: float) -> None:
        """Send a copy of *out_req* to the mirror, fire-and-forget: never waited for, never failing
        the request; dropped (counted) past MAX_MIRRORS in flight. Over HTTP/2 when the mirror
        service's next hop is (:mod:`._translate`)."""
        svc = self.router.config.services.get(mirror.service)
        if svc is not None and svc.ports:
            from tracemesh.proxy import _translate

            if _translate.mirror_version(self, mirror, _translate.H1) == _translate.H2:
                _translate.start_h2_from_h1(self, mirror, out_req, body, parent, route_timeout)
                return
        nursery = self._mirror_nursery
        if nursery is None or self.mirrors.active >= MAX_MIRRORS:
            self.mirrors.dropped += 1
            return
        self.mirrors.active += 1
        self.mirrors.sent += 1
        nursery.start_soon(self._mirror_one, mirror, out_req, body, parent, min(route_timeout, MIRROR_TIMEOUT_S))

    async def _mirror_one(self, mirror, out_req: h11.Request, body: bytes, parent: _Span, timeout: float) -> None:
        """One mirrored copy: its own CLIENT span (``mesh.mirror``), a child of the request's; the
        answer read and discarded. Bounded by *timeout*; cancelled with the sidecar."""
        t0 = time.perf_counter_ns()
        span = _Span(time.time_ns(), parent.trace_id, new_span_id(), parent.span_id, parent.flags, parent.sampled,
                     trace_state=parent.trace_state, incoming=parent.incoming)
        method = out_req.method.decode("ascii", "replace")
        a = _mirror_attrs(self, span, mirror, method, out_req.target.decode("ascii", "replace"), "1.1")
        host = _shadow_host(_header(out_req.headers, b"host") or mirror.service.encode())
        a["server.address"] = host.decode("latin-1")
        # (no ``trailer``: a copy's trailers are not sent)
        headers = [(b"host", host)] + [(k, v) for k, v in out_req.headers
                                       if k not in (b"host", b"trailer") and k not in CONTEXT_HEADERS]
        headers += _context_headers(span)
        span.authority = host.decode("latin-1")
        req = h11.Request(method=out_req.method, target=out_req.target, headers=headers)
        name = f"{method} {mirror.service}"
        uc = None
        try:
            with trio.fail_after(timeout):
                ep = _mirror_endpoint(self, mirror, a)
                security = self._security_to(mirror.service)
                for attempt in (1, 2):  # a stale kept-alive connection is replaced once, as in _attempt
                    try:
                        uc = await self.pool.acquire(ep.address, security)
                    except ConnectError as exc:
                        raise ProxyError(503, "UF", f"upstream connect error: {exc}") from None
                    u = uc.h11
                    try:
                        data = u.send(req) + (u.send(h11.Data(data=body)) if body else b"") + u.send(h11.EndOfMessage())
                        span.req_bytes = len(body)
                        await uc.stream.send_all(data)
                        ev = await _next_event(u, uc.stream, timeout)
                        while not isinstance(ev, h11.Response):
                            if isinstance(ev, h11.ConnectionClosed):
                                raise trio.BrokenResourceError("the connection closed")
                            ev = await _next_event(u, uc.stream, timeout)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        stale, uc = uc, None
                        await stale.aclose()
                        if stale.reused and attempt == 1:
                            continue
                        raise ProxyError(503, "UC", f"upstream disconnect/reset before headers: {exc}") from None
                    break
                span.status = ev.status_code
                while not isinstance(ev := await _next_event(u, uc.stream, timeout),
                                     (h11.EndOfMessage, h11.ConnectionClosed)):
                    if isinstance(ev, h11.Data):  # read to the end (so the connection can be reused), not kept
                        span.resp_bytes += len(ev.data)
                await self.pool.release(uc)
                uc = None
        except trio.TooSlowError:
            span.flag, span.message = "UT", f"mirror request timeout after {timeout:g}s"
        except ProxyError as exc:
            span.flag, span.message = exc.flag, str(exc)
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            span.flag, span.message = ("UPE" if isinstance(exc, h11.ProtocolError) else "UC"), f"mirror: {exc}"
        except trio.Cancelled:
            span.flag, span.message = "DC", "sidecar shutting down"
            raise
        finally:
            self.mirrors.active -= 1
            if uc is not None:
                await uc.aclose()
            if span.flag != "-":
                self.mirrors.failed += 1
            self._record(span, name, KIND_CLIENT, t0)

    def _endpoint(self, sel: Selection, tried: list, hash_key: str | None, span: _Span):
        """The endpoint of the next attempt (not one of *tried*, if another is left), on the span
        and counted in flight; ProxyError 503 UH when the service has none."""
        try:
            ep = self.router.endpoint(sel, tried, hash_key)
        except NoHealthyUpstream as exc:
            raise ProxyError(503, "UH", f"no healthy upstream: {exc}") from None
        span.attrs["mesh.upstream.endpoint"] = str(ep.address)
        span.attrs["mesh.destination.version"] = ep.version
        sel.state.started(ep)
        return ep

    async def _attempt(self, upstream: Addr, security: Security, dconn, dstream, out_req, has_body: bool,
                       body: bytes | None, replayable: bool, span: _Span, deadline: float, route_timeout: float | None,
                       tee=None, named=frozenset()):
        """One try: a connection (a stale kept-alive one is replaced once), the request, the response
        head. Returns (response head, connection); ProxyError when it failed. *tee* (a streamed
        body's mirror copy) is fed as the body goes; a body that did not end here never will for it."""
        try:
            for attempt in (1, 2):
                uc = await _acquire(self, upstream, security, span)
                try:
                    return await self._send_request(uc, dconn, dstream, out_req, has_body, span, deadline,
                                                    body, route_timeout, tee, named), uc
                except _UpstreamGone as exc:
                    await uc.aclose()
                    if uc.reused and replayable and attempt == 1:
                        continue
                    raise ProxyError(503, "UC", f"upstream disconnect/reset before headers: {exc}") from None
                except BaseException:
                    await uc.aclose()
                    raise
            raise AssertionError("unreachable")
        finally:
            if tee is not None:
                tee.close()  # counted skipped unless the body ended (then its copy has left)

    async def _send_request(self, uc: UpstreamConn, dconn, dstream, out_req, has_body: bool, span: _Span, deadline,
                            body: bytes | None = None, route_timeout: float | None = ROUTE_TIMEOUT_S, tee=None,
                            named=frozenset()):
        """Send the request head and body (streamed from the downstream, or *body* when it was read
        whole) upstream; return the response head. *route_timeout* None: the deadline is a per-try one.
        *named*: the tokens of the request's ``Connection`` (its fields stay out of the trailers)."""
        u = uc.h11
        # Writes are coalesced: what h11 hands over without waiting for the network (the head, a
        # small body, the end) goes out in one send; a wait for the downstream flushes first.
        pending = u.send(out_req)
        if body:
            pending += u.send(h11.Data(data=body))

        async def flush() -> None:
            nonlocal pending
            if pending:
                data, pending = pending, b""
                await _send_request_bytes(uc, data)

        trailers = ()
        try:
            while body is None and dconn.their_state is h11.SEND_BODY:  # a bodiless request still has its EndOfMessage to read
                ev = await _body_event(dconn, dstream, before_wait=flush)
                if isinstance(ev, h11.Data):
                    span.req_bytes += len(ev.data)
                    pending += u.send(ev)
                    if tee is not None:
                        tee.feed(ev.data)
                    if len(pending) >= COALESCE_BYTES:
                        await flush()
                elif isinstance(ev, h11.EndOfMessage):
                    trailers = ev.headers  # passed on when the request goes chunked (_end_of_message)
                    if tee is not None:
                        tee.end()  # the mirror's copy leaves now, whole
                    break
                else:
                    raise _DownstreamGone()
            pending += u.send(_end_of_message(u, trailers, named=named))
            await flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _UpstreamGone(f"sending the request failed ({exc})") from None
        try:
            return await read_response_head(uc, deadline)
        except trio.TooSlowError:
            raise ProxyError(504, "UT", f"upstream request timeout: no response within {route_timeout:g}s"
                             if route_timeout is not None else "upstream per-try timeout") from None

    async def _splice_upgraded(self, uc: UpstreamConn, dconn, dstream, resp: h11.InformationalResponse,
                               span: _Span) -> None:
        """Relay the upstream's 101, then copy raw bytes both ways (what either side sent past the
        HTTP heads first) until both ends closed, or one broke, or UPGRADE_IDLE_TIMEOUT_S of silence.
        The span covers the whole upgraded connection; its body sizes count the tunnelled bytes."""
        span.status = 101
        headers = _forwardable(resp.headers) + [(b"connection", b"upgrade")]
        token = _header(resp.headers, b"upgrade")
        if token:
            headers.append((b"upgrade", token))
        try:
            await dstream.send_all(dconn.send(h11.InformationalResponse(status_code=101, headers=headers,
                                                                         reason=resp.reason)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _DownstreamGone() from None
        down_early, down_closed = dconn.trailing_data
        up_early, up_closed = uc.h11.trailing_data

        def count(to_upstream: int, to_downstream: int) -> None:
            span.req_bytes += to_upstream
            span.resp_bytes += to_downstream

        res = await splice(RawEnd(dstream, down_early, down_closed), RawEnd(uc.stream, up_early, up_closed),
                           UPGRADE_IDLE_TIMEOUT_S, count)
        if res.idle:
            span.flag, span.message = "UT", f"upgraded connection idle for {UPGRADE_IDLE_TIMEOUT_S:g}s"
        elif res.broken == "b":
            span.flag, span.message = "UC", "upstream closed the upgraded connection abruptly"

    async def _relay_response(self, uc: UpstreamConn, dconn, dstream, resp: h11.Response, span: _Span) -> None:
        # h11 re-frames a body of unknown length: chunked to HTTP/1.1 downstreams, close-delimited to 1.0
        headers = _header_list(resp.headers)
        # chunked again only when it came chunked (no length) and the downstream speaks HTTP/1.1
        headers = _announce_trailers(_forwardable(headers), _is_chunked(headers) and dconn.their_http_version == b"1.1")
        span.status = resp.status_code
        # as h11.Response(..., _parsed=True): every header, the status and the reason came out of
        # h11's parser, which checked them; h11 need not run its regexes over them again
        out = dconn.send(_h1fast.response(resp.status_code, headers, resp.reason))
        u = uc.h11
        # Coalesced as in _send_request: a small response that arrived in one read leaves in one send.
        while True:
            try:
                ev = u.next_event()
                if ev is h11.NEED_DATA:
                    if out:
                        try:
                            await dstream.send_all(out)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            raise _DownstreamGone() from None
                        out = b""
                    ev = await _next_event(u, uc.stream, BODY_IDLE_TIMEOUT_S)
            except trio.TooSlowError:
                span.flag, span.message = "UT", "upstream response body stalled"
                raise _DownstreamCut() from None
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                span.flag, span.message = "UC", f"upstream closed mid-response: {exc}"
                raise _DownstreamCut() from None
            try:
                if isinstance(ev, h11.Data):
                    span.resp_bytes += len(ev.data)
                    out += dconn.send(ev)
                    if len(out) >= COALESCE_BYTES:
                        await dstream.send_all(out)
                        out = b""
                elif isinstance(ev, h11.EndOfMessage):  # its trailers too, if the downstream's body is chunked
                    await dstream.send_all(out + dconn.send(_end_of_message(dconn, ev.headers, resp.headers)))
                    return
                else:
                    span.flag, span.message = "UC", "upstream closed mid-response"
                    if out:  # what did arrive still reaches the client before the cut
                        await dstream.send_all(out)
                    raise _DownstreamCut()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _DownstreamGone() from None
