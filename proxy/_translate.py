"""Which HTTP version the next hop is spoken to in, and translation between the two when it is not
the client's: an HTTP/2 stream to an HTTP/1.1 upstream, an HTTP/1.1 request to an HTTP/2 one.

**The rule.** Inbound, the sidecar's own service's declared protocol decides how its app is
spoken to: the ``ports`` entry for the app's port (else the service's one non-TCP entry, or the
entries' common protocol) — ``http`` is HTTP/1.1, ``http2`` and ``grpc`` are HTTP/2; with none,
``--app-protocol http1|http2``; else (``auto``) the client's protocol, as before. Outbound, the
destination service's declared protocol decides, with one exception that keeps HTTP/2
multiplexing between sidecars: a destination declared ``http`` reached over mesh mTLS is a sidecar
(only sidecars hold mesh certificates), which speaks both and translates for its own app, so an
HTTP/2 client's streams stay HTTP/2 to it; in plaintext the next hop may be the app itself, so
``http`` means HTTP/1.1 there. Declared ``http2``/``grpc`` always means HTTP/2 (an HTTP/1.1
client's requests are then multiplexed on the upstream connection). Undeclared: the client's.
Upgrade requests (WebSocket) always stay HTTP/1.1. Mirrored copies follow the same rule for the
mirror service.

**Translation** reuses both upstream paths. HTTP/2 -> HTTP/1.1 (:func:`try_h1`, one attempt of
:meth:`._http2.H2Server.forward` in place of its ``_try``): the stream's pseudo-headers become
the request line and ``Host`` (``cookie`` crumbs joined), the body streams from the stream's
inbox to a kept-alive h11 connection of :class:`._pool.Pool`, kept for a retry as HTTP/2's pump
keeps it; the response head and body go back as HEADERS and DATA under the downstream's flow
control. **Trailers** cross both ways where HTTP/1.1 can carry them, after a chunked body (RFC
9112 7.1.2), less the fields that must not travel as trailers (:func:`._http1._trailer_fields`):
request trailers follow a chunked request body, which is what a body without a
``content-length`` gets, and one with trailers announced (``trailer``) or already received
(:func:`_h1_framing`; a body that keeps its ``content-length`` loses trailers that come
unannounced); an upstream's chunked-response trailers become HTTP/2 trailers. gRPC still needs
HTTP/2 end to end (its framing, trailers-only answers and ``te: trailers`` are HTTP/2's, and an
app declared ``http`` does not serve it): a gRPC call whose next hop would be HTTP/1.1 is refused
(502 UPE, gRPC ``UNAVAILABLE`` with a message that says why) before anything is sent.
HTTP/1.1 -> HTTP/2 (:func:`h1_to_h2`): the request line and ``Host`` become pseudo-headers
(``:authority``), hop-by-hop headers go, and the exchange runs through
:meth:`._http2.H2Server.forward` with :class:`_H1Down` standing in for the downstream stream: it
reads the h11 request body as that stream's inbox (a chunked body's trailers as its trailers) and
writes the response with h11 (chunked when the upstream gave no length, HTTP/2 trailers then
ending it; an HTTP/1.0 client's close-delimited body has no room for them, they are dropped).

**Mirroring** an HTTP/2 (or translated) exchange (:func:`mirror_from_h2`) never reads the body
ahead of the request's own upstream: a client may wait for the response before it ends its body
(a bidirectional gRPC stream), and a mirror must not make it wait. The body is teed
(:class:`_Tee`) as it streams: an HTTP/2 copy leaves at once and streams it behind the request,
at most MIRROR_LAG_BYTES behind; an HTTP/1.1 copy leaves once the body ended, whole with its
length, so with at most MAX_RETRY_BODY of it. A copy that falls further behind, or whose body the
exchange ends without, is abandoned (its stream reset) and counted skipped.

Cancellation and resources: as the paths they reuse — an attempt's h11 connection is closed
unless its exchange ended cleanly (then pooled); an HTTP/2 upstream stream is reset when its
exchange is cancelled. Mirrored HTTP/2 copies run in the sidecar's mirror task group, bounded by
the mirror timeout, counted as HTTP/1.1 copies are; what a tee holds is let go when its copy is
abandoned or ends.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import h11
import trio

from tracemesh._h11io import next_event as _next_event
from tracemesh.proxy._http1 import (
    BODY_IDLE_TIMEOUT_S, COALESCE_BYTES, MAX_MIRRORS, MAX_RETRY_BODY, ProxyError, _acquire,
    _announce_trailers, _body_event, _connection_tokens, _DownstreamCut, _DownstreamGone, _end_of_message,
    _forwardable, _header, _is_chunked, _mirror_attrs, _mirror_endpoint, _send_request_bytes, _shadow_host, _Span,
    _trailer_fields, _UpstreamGone, read_response_head,
)
from tracemesh.proxy._pool import PLAINTEXT, ConnectError
from tracemesh.proxy._recorder import KIND_CLIENT
from tracemesh.proxy._resilience import Outcome
from tracemesh.proxy._tracecontext import TraceParent, new_span_id

log = logging.getLogger("tracemesh.sidecar.translate")

H1, H2 = "1.1", "2"
#: A declared port protocol as the HTTP version spoken; ``tcp`` says nothing about HTTP.
_VERSION = {"http": H1, "http2": H2, "grpc": H2}
#: ``--app-protocol`` (``auto``: as the client)
_FLAG = {"http1": H1, "http2": H2}
#: How far a mirrored HTTP/2 copy may lag the body it copies (bytes taken from the client, not yet
#: sent to the mirror) before it is abandoned: one stream's window (the sidecar's STREAM_WINDOW),
#: so that a client's burst does not cost a healthy mirror its copy; one stream's worth of memory.
MIRROR_LAG_BYTES = 256 * 1024


def declared(service, port: int | None = None) -> str | None:
    """The HTTP version *service* (a config Service, or None) declares: its ``ports`` entry for
    *port*, else the version all its non-TCP entries agree on; None if it does not say."""
    if service is None or not service.ports:
        return None
    ports = service.ports
    if port is not None:
        exact = [p for p in ports if p.port == port]
        if exact:
            return _VERSION.get(exact[0].protocol)
    versions = {_VERSION[p.protocol] for p in ports if p.protocol in _VERSION}
    return versions.pop() if len(versions) == 1 else None


def app_version(sc) -> str | None:
    """How the inbound side speaks to the app: declared by the config, else ``--app-protocol``."""
    config = sc.router.config
    if config.services:
        v = declared(config.services.get(sc.service), sc.app.port)
        if v is not None:
            return v
    return _FLAG.get(getattr(sc, "app_protocol", "auto"))


def next_hop(sc, client: str, service: str | None, mtls: bool) -> str:
    """The HTTP version of the next hop for a *client* (H1 or H2) request: to the app when
    *service* is None, else to that destination service (reached over mTLS or not)."""
    if service is None:
        return app_version(sc) or client
    config = sc.router.config
    if not config.services:
        return client
    want = declared(config.services.get(service))
    if want == H1 and mtls:
        return client  # a sidecar: keep HTTP/2 multiplexing between sidecars, it translates for its app
    return want or client


def _mtls_to(sc, service: str) -> bool:
    try:
        return sc._security_to(service).mtls
    except ProxyError:
        return False


def grpc_refusal(service: str | None, sc) -> ProxyError:
    what = f"service {service!r} is declared protocol http" if service else \
        f"the app of {sc.service!r} speaks HTTP/1.1 (protocol http, or --app-protocol http1)"
    return ProxyError(502, "UPE", f"gRPC needs HTTP/2 end to end: {what}, which cannot carry gRPC; "
                                  f"declare it http2 or grpc")


# -- HTTP/2 downstream, HTTP/1.1 upstream --------------------------------------------------------


def _h1_headers(authority: bytes, headers, framing: list) -> list:
    cookies = [v for k, v in headers if k == b"cookie"]
    out = [(b"host", authority)]
    out += [(k, v) for k, v in headers if k not in (b"host", b"te", b"cookie", b"transfer-encoding")]
    if cookies:  # RFC 9113 8.2.3: crumbs are joined again for HTTP/1.1
        out.append((b"cookie", b"; ".join(cookies)))
    return out + framing


async def try_h1(server, req, upstream, security, headers, target: str, span: _Span, deadline: float, why: str,
                 decide) -> bool:
    """One attempt of :meth:`._http2.H2Server.forward` over HTTP/1.1 (its ``_try``'s contract):
    True when a retry takes its place, else the response was relayed downstream."""
    sc = server.sc
    uc = None
    error: ProxyError | None = None
    outcome: Outcome | None = None
    try:
        resp = None
        try:
            uc, resp = await _h1_open(server, req, upstream, security, headers, target, span, deadline, why)
            outcome = Outcome(resp.status_code)
        except ProxyError as exc:
            error = exc
            if exc.flag in ("UF", "UC", "UT"):
                outcome = Outcome(None, exc.flag)
        verdict = decide(outcome)
        if verdict == "retry":
            return True
        if verdict == "exhausted":
            if error is not None:
                error = ProxyError(error.status, f"{error.flag},URX", f"{error} (retries exhausted)")
            else:
                span.flag = "URX"
        if error is not None:
            raise error
        await _h1_relay(server, req, uc, resp, span)
        c, uc = uc, None
        await sc.pool.release(c)
        return False
    finally:
        if uc is not None:
            await uc.aclose()


async def _h1_open(server, req, upstream, security, headers, target: str, span: _Span, deadline: float, why: str):
    sc = server.sc
    for attempt in (1, 2):
        uc = await _acquire(sc, upstream, security, span)
        fields, framing = _h1_framing(req, headers)
        out = h11.Request(method=req.method, target=target.encode("ascii"),
                          headers=_h1_headers(req.authority or str(upstream).encode(), fields, framing))
        try:
            await _h1_send(server, req, uc, out, span)
            return uc, await _h1_head(uc, deadline, why)
        except _UpstreamGone as exc:
            await uc.aclose()
            if uc.reused and req.replayable and attempt == 1:
                continue
            raise ProxyError(503, "UC", f"upstream disconnect/reset before headers: {exc}") from None
        except h11.LocalProtocolError as exc:  # the stream's body disagreed with its content-length
            await uc.aclose()
            raise ProxyError(400, "DC", f"bad request body: {exc}") from None
        except BaseException:
            await uc.aclose()
            raise
    raise AssertionError("unreachable")


def _h1_framing(req, headers) -> tuple[list, list]:
    """The request's fields and framing fields for HTTP/1.1. RFC 9112 puts trailers only after a
    chunked body, and whether an HTTP/2 stream brings any is known only at its end; so a body goes
    chunked when it has no ``content-length``, or when trailers are known to come: announced in
    the head (``trailer``) or here already. A body with a ``content-length`` keeps it otherwise (the
    app may need it, and most such requests carry no trailers); trailers that come unannounced on
    it are dropped, as Envoy's HTTP/1.1 codec drops them without chunked encoding. The stream's own
    ``trailer`` announcement goes out only with a chunked body (as a framing field)."""
    headers = [(k, v) for k, v in headers if k != b"trailer"]
    if req.ended and not req.kept_size and req.trailers is None:
        return headers, []  # no body
    if _header(headers, b"content-length") is not None and req.trailers is None and req.trailer_names is None:
        return headers, []
    framing = [(b"transfer-encoding", b"chunked")]
    if req.trailer_names is not None:
        framing.append((b"trailer", req.trailer_names))
    return [(k, v) for k, v in headers if k != b"content-length"], framing


async def _h1_send(server, req, uc, out: h11.Request, span: _Span) -> None:
    """The request head, the kept body, then the rest as the stream delivers it (acknowledged once
    sent on), then its trailers when the body went chunked (:func:`_h1_framing`)."""
    u = uc.h11
    pending = u.send(out)

    async def flush() -> None:
        nonlocal pending
        if pending:
            data, pending = pending, b""
            try:
                await _send_request_bytes(uc, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _UpstreamGone(f"sending the request failed ({exc})") from None

    for chunk in list(req.kept or ()):
        pending += u.send(h11.Data(data=chunk))
        if len(pending) >= COALESCE_BYTES:
            await flush()
    if not req.ended:  # a bodiless request's head leaves with its end, in one send
        await flush()
    while (got := await req.next_data(span)) is not None:
        data, n = got
        if data:
            pending += u.send(h11.Data(data=data))
        try:
            await flush()
        finally:
            req.ds.ack(n)
            await server.conn.flush()
    pending += u.send(_end_of_message(u, req.trailers))
    await flush()


async def _h1_head(uc, deadline: float, why: str) -> h11.Response:
    try:
        return await read_response_head(uc, deadline)
    except trio.TooSlowError:
        raise ProxyError(504, "UT", why) from None


async def _h1_relay(server, req, uc, resp: h11.Response, span: _Span) -> None:
    from tracemesh.proxy._http2 import _DROP, _Cut

    conn, ds, u = server.conn, req.ds, uc.h11
    span.status = resp.status_code
    head = [(b":status", str(resp.status_code).encode())]
    head += [(k, v) for k, v in _forwardable(resp.headers) if k not in _DROP]

    async def read():
        try:
            return await _next_event(u, uc.stream, BODY_IDLE_TIMEOUT_S)
        except trio.TooSlowError:
            span.flag, span.message = "UT", "upstream response body stalled"
            raise _Cut() from None
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            span.flag, span.message = "UC", f"upstream closed mid-response: {exc}"
            raise _Cut() from None

    def ready():
        """The next event if h11 has it without reading (so the last DATA can carry END_STREAM:
        a client that got its Content-Length may close before a separate end arrives)."""
        try:
            ev = u.next_event()
        except h11.RemoteProtocolError:
            return None  # read() raises it again
        return None if ev is h11.NEED_DATA else ev

    def trailers(eom) -> list:
        """What of a chunked body's trailers goes on, as HTTP/2 trailers (HEADERS with END_STREAM)."""
        return _trailer_fields(eom.headers, _connection_tokens(resp.headers)) if eom.headers else []

    started = False
    ev = await read()
    while True:
        if isinstance(ev, h11.EndOfMessage):
            fields = trailers(ev)
            if not started:
                await conn.send_headers(ds, head, end=not fields)
            elif not fields:
                await conn.send_data(ds, b"", end=True)
            if fields:
                await conn.send_headers(ds, fields, end=True)
            return
        if not isinstance(ev, h11.Data):
            span.flag, span.message = "UC", "upstream closed mid-response"
            raise _Cut()
        if not started:
            await conn.send_headers(ds, head)
            started = True
        nxt = ready()
        end = isinstance(nxt, h11.EndOfMessage) and not trailers(nxt)
        span.resp_bytes += len(ev.data)
        await conn.send_data(ds, ev.data, end=end)
        if end:
            return
        ev = nxt if nxt is not None else await read()


# -- HTTP/1.1 downstream, HTTP/2 upstream --------------------------------------------------------


class _H1Down:
    """An HTTP/1.1 downstream exchange dressed as an HTTP/2 server stream and its connection, for
    :meth:`._http2.H2Server.forward`: :meth:`next` reads the h11 request body, ``send_*`` write
    the response with h11. A broken downstream is ``_Gone`` with ``reset_code`` set, as a reset.
    Trailers pass both ways: a chunked request's become the stream's ``("trailers", ...)`` item;
    HTTP/2 response trailers end a chunked response (dropped when h11 frames it otherwise)."""

    def __init__(self, dconn: h11.Connection, dstream, head=()) -> None:
        self.dconn, self.dstream = dconn, dstream
        self.head = head  # the request's header fields: what its Connection names is no trailer either
        self.reset_code: int | None = None
        self.headers_sent = False
        self.ended_local = False
        self._ended = False  # the request's trailers were handed over: its end is next
        self._pending = b""  # written with flush=False, sent with the next flush

    # the stream side
    async def next(self, timeout: float = BODY_IDLE_TIMEOUT_S) -> tuple:
        """The next body item; a stall (BODY_IDLE_TIMEOUT_S, whatever *timeout*) is the client's
        408, a bad or cut body its 400, both flag DC."""
        if self._ended:
            return ("end",)
        try:
            ev = await _body_event(self.dconn, self.dstream)
        except _DownstreamGone:
            self.reset_code = -1
            raise ProxyError(400, "DC", "downstream closed the connection mid-body") from None
        if isinstance(ev, h11.Data):
            return ("data", ev.data, 0)
        if isinstance(ev, h11.EndOfMessage):
            fields = _trailer_fields(ev.headers, _connection_tokens(self.head)) if ev.headers else []
            if fields:
                self._ended = True
                return ("trailers", fields)
            return ("end",)
        self.reset_code = -1
        raise ProxyError(400, "DC", "downstream closed the connection mid-body")

    def ack(self, n: int) -> None:
        pass  # TCP is HTTP/1.1's flow control: reading is acknowledging

    def has_next(self) -> bool:
        """As :meth:`._http2._Stream.has_next`; False: the body is read from h11 only when asked for."""
        return False

    def body_here(self) -> None:
        """As :meth:`._http2._Stream.body_here`; None: the body is read from h11 only when asked for."""
        return None

    # the connection side
    async def flush(self) -> None:
        await self._send(b"")

    async def _send(self, data: bytes, flush: bool = True) -> None:
        from tracemesh.proxy._http2 import CANCEL, _Gone

        if self.reset_code is not None:
            raise _Gone(self.reset_code)
        self._pending += data
        if not flush or not self._pending:
            return
        data, self._pending = self._pending, b""
        try:
            await self.dstream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.reset_code = CANCEL
            raise _Gone(CANCEL, "downstream connection closed") from None

    async def send_headers(self, _s, headers, end: bool = False, flush: bool = True) -> None:
        """As :meth:`H2Conn.send_headers`: *flush* False leaves the bytes for the next flush."""
        from tracemesh.proxy._http2 import _DROP

        if self.headers_sent:  # trailers: after a chunked body (else dropped), see _end_of_message
            if end:
                data = self.dconn.send(_end_of_message(self.dconn, headers))
                self.ended_local = True
                await self._send(data, True)
            return
        status = int(_header(headers, b":status") or b"502")
        out = [(k, v) for k, v in headers if not k.startswith(b":") and k not in _DROP]
        # h11 frames it: by its content-length, else chunked to HTTP/1.1 (where trailers can follow)
        out = _announce_trailers(out, _header(out, b"content-length") is None
                                 and self.dconn.their_http_version == b"1.1")
        self.headers_sent = True
        data = self.dconn.send(h11.Response(status_code=status, headers=out))
        if end:
            data += self.dconn.send(h11.EndOfMessage())
            self.ended_local = True
        await self._send(data, flush or end)

    async def send_data(self, _s, data: bytes, end: bool = False, flush: bool = True) -> None:
        out = self.dconn.send(h11.Data(data=data)) if data else b""
        if end:
            out += self.dconn.send(h11.EndOfMessage())
            self.ended_local = True
        await self._send(out, flush or end)


async def h1_to_h2(sc, dconn: h11.Connection, dstream, req: h11.Request, headers, target: str, upstream,
                   span: _Span, security=PLAINTEXT, sel=None, hash_key=None, direction: str = "inbound") -> None:
    """:meth:`Sidecar._forward`'s job for an HTTP/2 next hop: through HTTP/2's forward (retries,
    mirroring, timeouts), the HTTP/1.1 downstream adapted by :class:`_H1Down`."""
    from tracemesh.proxy import _http2 as h2m

    chunked = _is_chunked(headers)
    length = _header(headers, b"content-length")
    has_body = chunked or (length is not None and length.strip() not in (b"", b"0"))
    authority = _header(headers, b"host") or str(upstream or (sel.service if sel else "")).encode()
    out = [(k, v) for k, v in _forwardable(headers) if k != b"host"]
    if dconn.client_is_waiting_for_100_continue:
        await dstream.send_all(dconn.send(h11.InformationalResponse(status_code=100, headers=[])))
    if not has_body:  # its end is parsed already: take it, so that keep-alive survives
        while dconn.their_state is h11.SEND_BODY:
            ev = await _body_event(dconn, dstream)
            if not isinstance(ev, (h11.Data, h11.EndOfMessage)):
                raise _DownstreamGone()
    down = _H1Down(dconn, dstream, headers)
    # grpc False: an HTTP/1.1 client's application/grpc-web is not gRPC over HTTP/2
    r = h2m._Req(down, req.method, authority, not has_body, False)
    server = h2m.H2Server(sc, down, direction, None, 0)
    try:
        await server.forward(down, None, r, out, target, upstream, span, security, sel, hash_key)
    except h2m._Cut:
        raise _DownstreamCut() from None
    except h2m._Gone:
        raise _DownstreamGone() from None
    except (ProxyError, _DownstreamGone):
        raise
    except Exception as exc:  # noqa: BLE001 (as HTTP/2's exchange: a bug here must not end the sidecar)
        log.exception("translated HTTP/1.1 -> HTTP/2 exchange failed")
        span.flag, span.message = "UPE", f"internal error: {exc!r}"
        if down.headers_sent:
            raise _DownstreamCut() from None
        raise ProxyError(502, "UPE", f"internal error: {exc!r}") from None


# -- mirroring -----------------------------------------------------------------------------------


def mirror_version(sc, mirror, client: str) -> str:
    return next_hop(sc, client, mirror.service, _mtls_to(sc, mirror.service))


class _Abandoned(Exception):
    """A mirrored copy's body could not be copied (:meth:`_Tee.abandon` says why)."""


class _Tee:
    """A request body's copy for a mirror, fed as the body streams to the request's own upstream
    (:meth:`._http2._Req.next_data`), never read ahead of it: :meth:`feed` and :meth:`end` never
    wait. An HTTP/2 copy drains it as it comes (:meth:`next`); for an HTTP/1.1 copy, *on_end* gets
    the whole body at its end. Past *limit* bytes fed and not drained (the mirror fell behind, or
    the body outgrew what a whole copy may keep), or when the exchange ends before the body does
    (:meth:`close`), the copy is abandoned: what is held is let go, counted in *stats* as skipped,
    and :attr:`scope` (the sender's body part) cancelled."""

    def __init__(self, stats, limit: int, on_end=None) -> None:
        self.stats, self.limit, self.on_end = stats, limit, on_end
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.abandoned: str | None = None
        self.scope = trio.CancelScope()
        self._more = trio.Event()

    def feed(self, data: bytes) -> None:
        if self.abandoned is not None or self.ended or not data:
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self.limit:
            self.abandon(f"the mirror fell {self.limit} bytes behind the request body" if self.on_end is None
                         else f"a request body over {self.limit} bytes")
        else:
            self._more.set()

    def end(self) -> None:
        if self.abandoned is not None or self.ended:
            return
        self.ended = True
        self._more.set()
        if self.on_end is not None:
            body = b"".join(self.chunks)
            self.chunks.clear()
            self.buffered = 0
            self.on_end(body)

    def abandon(self, why: str, count: bool = True) -> None:
        """Let the copy go (*count*: as skipped; not when its sender ended first, counted by it)."""
        if self.abandoned is None and not self.ended:
            self.abandoned = why
            self.chunks.clear()
            self.buffered = 0
            if count:
                self.stats.skipped += 1
            self.scope.cancel()
            self._more.set()

    def close(self) -> None:
        """The exchange is over: a body that has not ended never will for the copy."""
        self.abandon("the exchange ended before the request body did")

    async def next(self) -> bytes | None:
        """The next part of the body; None at its end or once abandoned."""
        while not self.chunks:
            if self.ended or self.abandoned is not None:
                return None
            self._more = trio.Event()
            await self._more.wait()
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        return chunk


def mirror_from_h2(server, req, headers, target: str, route, span: _Span, route_timeout: float) -> None:
    """The route's mirror for an HTTP/2 (or translated) exchange: a copy that leaves
    fire-and-forget, as HTTP/1.1 or HTTP/2 by :func:`next_hop`. A body is teed (:class:`_Tee`) as
    it streams to the request's own upstream, never read ahead of it: a client may wait for the
    response before it ends its body (a bidirectional stream), and a mirror must not make it wait.
    An HTTP/2 copy leaves at once and streams the body as it comes, MIRROR_LAG_BYTES behind at
    most; an HTTP/1.1 copy leaves when the body ended, sent whole with its length by
    :meth:`Sidecar._mirror_one`, so at most MAX_RETRY_BODY of it (as HTTP/1.1's own mirroring).
    Trailers are not copied."""
    sc = server.sc
    mirror = route.mirror if route is not None else None
    if mirror is None or not sc._rng.random() * 100 < mirror.percent:
        return
    version = mirror_version(sc, mirror, H2)
    if version == H1 and req.grpc:  # gRPC cannot go over HTTP/1.1 (see grpc_refusal)
        sc.mirrors.skipped += 1
        return
    method = req.method
    authority = req.authority or mirror.service.encode()

    def h1_copy(body: bytes) -> None:
        framing = [(b"content-length", str(len(body)).encode())] if body else []
        fields = [(k, v) for k, v in headers if k != b"content-length"]
        out_req = h11.Request(method=method, target=target.encode("ascii"),
                              headers=_h1_headers(authority, fields, framing))
        sc._start_mirror(mirror, out_req, body, span, route_timeout)

    if req.ended and not req.kept_size:  # no body
        if version == H1:
            h1_copy(b"")
        else:
            start_h2(sc, mirror, method, target, authority, headers, b"", span, route_timeout)
        return
    if req.kept is None:  # some of the body went by already, not kept: a copy would lack it
        sc.mirrors.skipped += 1
        return
    if version == H1:
        tee = _Tee(sc.mirrors, MAX_RETRY_BODY, on_end=h1_copy)
    else:
        tee = _Tee(sc.mirrors, MIRROR_LAG_BYTES)
        if not start_h2(sc, mirror, method, target, authority, headers, tee, span, route_timeout):
            return
    req.tee = tee
    for chunk in req.kept:
        tee.feed(chunk)
    if req.ended:
        tee.end()


def start_h2_from_h1(sc, mirror, out_req: h11.Request, body: bytes, parent: _Span, route_timeout: float) -> None:
    """An HTTP/1.1 request's mirrored copy, for a mirror service whose next hop is HTTP/2."""
    authority = _header(out_req.headers, b"host") or mirror.service.encode()
    fields = [(k, v) for k, v in _forwardable(out_req.headers) if k != b"host"]
    start_h2(sc, mirror, out_req.method, out_req.target.decode("ascii", "replace"), authority, fields, body,
             parent, route_timeout)


def start_h2(sc, mirror, method: bytes, target: str, authority: bytes, headers, body: bytes | _Tee, parent: _Span,
             route_timeout: float) -> bool:
    """Start a copy over HTTP/2 in the mirror task group; False when it was dropped (counted)."""
    from tracemesh.proxy._http1 import MIRROR_TIMEOUT_S

    nursery = sc._mirror_nursery
    if nursery is None or sc.mirrors.active >= MAX_MIRRORS:
        sc.mirrors.dropped += 1
        return False
    sc.mirrors.active += 1
    sc.mirrors.sent += 1
    nursery.start_soon(_mirror_one_h2, sc, mirror, method, target, authority, list(headers), body, parent,
                       min(route_timeout, MIRROR_TIMEOUT_S))
    return True


async def _mirror_one_h2(sc, mirror, method: bytes, target: str, authority: bytes, headers, body: bytes | _Tee,
                         parent: _Span, timeout: float) -> None:
    """One mirrored copy over HTTP/2, as :meth:`Sidecar._mirror_one` is over HTTP/1.1; *body* whole,
    or a :class:`_Tee` streamed (its stream reset if the copy is abandoned: counted skipped by the
    tee, not failed)."""
    from tracemesh.proxy import _http2 as h2m

    t0 = time.perf_counter_ns()
    span = _Span(time.time_ns(), parent.trace_id, new_span_id(), parent.span_id, parent.flags, parent.sampled)
    m = method.decode("ascii", "replace")
    a = _mirror_attrs(sc, span, mirror, m, target, H2)
    host = _shadow_host(authority)
    a["server.address"] = host.decode("latin-1")
    name = f"{m} {mirror.service}"
    us = None
    try:
        with trio.fail_after(timeout):
            ep = _mirror_endpoint(sc, mirror, a)
            security = sc._security_to(mirror.service)
            pool = getattr(sc, "h2pool", None)
            if pool is None:
                pool = sc.h2pool = h2m.H2Pool(sc.pool)
            try:
                conn = await pool.connection(ep.address, security)
            except ConnectError as exc:
                raise ProxyError(503, "UF", f"upstream connect error: {exc}") from None
            out = [(b":method", method), (b":scheme", b"https" if security.mtls else b"http"),
                   (b":authority", host), (b":path", target.encode("ascii"))]
            # (no ``trailer``: a copy's trailers are not sent)
            out += [(k, v) for k, v in headers if k not in (b"traceparent", b"host", b"trailer") and k not in h2m._DROP]
            out.append((b"traceparent", TraceParent(span.trace_id, span.span_id, span.flags).header().encode()))
            us = h2m._Stream(conn, conn.h2.get_next_available_stream_id())
            conn.streams[us.id] = us
            tee = body if isinstance(body, _Tee) else None
            await conn.send_headers(us, out, end=tee is None and not body)
            if tee is not None:
                with tee.scope:
                    while (chunk := await tee.next()) is not None:
                        span.req_bytes += len(chunk)
                        await conn.send_data(us, chunk)
                if tee.abandoned is not None:
                    raise _Abandoned(tee.abandoned)
                await conn.send_data(us, b"", end=True)
            elif body:
                await conn.send_data(us, body, end=True)
                span.req_bytes = len(body)
            while True:
                item = await us.next()
                if item[0] == "headers":
                    span.status = int(_header(item[1], b":status") or b"0")
                    if item[2]:
                        break
                elif item[0] == "data":  # read to the end, not kept
                    span.resp_bytes += len(item[1])
                    us.ack(item[2])
                    await conn.flush()
                elif item[0] in ("trailers", "end"):
                    break
    except trio.TooSlowError:
        span.flag, span.message = "UT", f"mirror request timeout after {timeout:g}s"
    except ProxyError as exc:
        span.flag, span.message = exc.flag, str(exc)
    except (h2m._Gone, h2m.h2.exceptions.ProtocolError) as exc:
        span.flag, span.message = "UC", f"mirror: {exc}"
    except _Abandoned as exc:
        span.flag, span.message = "DC", f"mirrored copy abandoned: {exc}"
    except trio.Cancelled:
        span.flag, span.message = "DC", "sidecar shutting down"
        raise
    finally:
        sc.mirrors.active -= 1
        tee = body if isinstance(body, _Tee) else None
        if span.flag != "-" and (tee is None or tee.abandoned is None):  # an abandoned copy is skipped
            sc.mirrors.failed += 1
        if tee is not None:  # the copy is over (a timeout, a reset): nothing more is kept for it
            tee.abandon("the copy ended", count=False)
        if us is not None:
            await us.finish(h2m.CANCEL)
        sc._record(span, name, KIND_CLIENT, t0)
