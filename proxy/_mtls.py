"""The sidecar's side of mesh mTLS: getting and renewing its certificate from the collector's CA,
taking connections in STRICT / PERMISSIVE / DISABLE mode, and opening verified connections to
other sidecars.

**Certificates.** :class:`CaClient` is the ``obtain`` function of
:class:`tracemesh.identity.RotatingCredentials`: the first certificate (and one after an expiry)
comes from the collector's OTLP/gRPC port against the join token; every renewal goes to the CA's
mTLS port (learnt from the first answer), authenticated by the current certificate, and the CA
port must prove the collector's own SPIFFE ID (see :mod:`tracemesh.collector._ca_service` for why
the transport is split this way). The renewal call is a small gRPC client over ``h2`` and
``ssl``: grpcio's client checks the server's *hostname*, and a mesh peer has only a SPIFFE URI,
which this module verifies instead, as the data path does. Both calls block (they run in a
worker thread of ``RotatingCredentials.run``) and are bounded by :data:`CA_CALL_TIMEOUT_S`.

**Inbound** (:meth:`MeshTls.accept`). DISABLE: plaintext as before. PERMISSIVE: the first byte of
the connection is peeked (``MSG_PEEK``, nothing consumed): 0x16 opens a TLS handshake record, so
the connection is served over mTLS, anything else as plaintext, on the same port. STRICT: only
mTLS; a plaintext connection is closed without an answer and counted. A TLS client must present a
certificate that chains to the trust bundle (checked by OpenSSL inside the handshake; no
certificate, a self-signed one, an expired one or one under another root fails there) and whose
SPIFFE ID is in our trust domain. The whole of it, peek included, must finish within
:data:`HANDSHAKE_TIMEOUT_S`. Failures are counted in :class:`TlsStats` and logged, at most one
line per :data:`LOG_EVERY_S` per kind, so a scan cannot flood the log; they never reach the app.

**ALPN.** The server side selects ``h2`` (the connection is served by :mod:`._http2`) or
``http/1.1``, in that order of preference. As a client, the data path offers exactly the protocol
of the exchange it is forwarding (``h2`` for HTTP/2 and gRPC, ``http/1.1`` for HTTP/1.1: a
context per list, :meth:`RotatingCredentials.client_context_alpn`), and refuses an upstream that
selects another; ``http/1.1`` also takes a server that selects none.

**Outbound** (:meth:`MeshTls.connect`). TLS with the workload's client context, the peer verified
by chain (the bundle) and then by SPIFFE ID: in our trust domain, and exactly the destination
service's identity when the mesh config names one.

Cancellation: both directions run under Trio deadlines; a cancelled handshake closes its TCP
connection (``aclose_forcefully``). The contexts are read from :class:`RotatingCredentials` at
every handshake, so a renewal applies to the next connection and never to one in flight.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import trio

from tracemesh.identity import (
    Issued,
    PeerIdentityError,
    RotatingCredentials,
    SpiffeId,
    authenticate_peer,
)
from tracemesh.net import Addr
from tracemesh.proxy._otlp import ExportError, unary_answer
from tracemesh._ca_protocol import PATH as CA_PATH
from tracemesh._ca_protocol import MessageError, SignResponse, collector_id, decode_response, encode_request

# The CA client speaks gRPC with h2 over plain sockets (bootstrap) and TLS (renewal): grpcio
# (~20 MB resident) is never loaded by a sidecar.

log = logging.getLogger("tracemesh.sidecar.mtls")

MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE = "strict", "permissive", "disable"
#: The first byte of every TLS connection: a handshake record (RFC 8446 5.1, content type 22).
TLS_HANDSHAKE_RECORD = 0x16
#: A new inbound connection must show its first byte and finish the TLS handshake within this.
HANDSHAKE_TIMEOUT_S = 10.0
#: One log line per kind of refusal at most this often; the counters keep the exact numbers.
LOG_EVERY_S = 1.0
#: A call to the CA (connect, handshake, answer) gives up after this; the caller retries.
CA_CALL_TIMEOUT_S = 10.0
#: A Sign answer is a few KiB (a chain and a bundle); bound what we buffer.
MAX_CA_ANSWER_BYTES = 1024 * 1024
#: The application protocols of the data path over TLS: HTTP/1.1 and HTTP/2.
DATA_ALPN = "http/1.1"
H2_ALPN = "h2"
#: Opaque TCP between sidecars (:mod:`tracemesh.proxy._tcp`): offered alone by the outbound TCP
#: proxy, so the inbound sidecar knows the stream is not HTTP; selected after the HTTP protocols.
TCP_ALPN = "tracemesh-tcp"


# -- the CA client ---------------------------------------------------------------------------


class CaCallError(Exception):
    """A Sign call failed; ``code`` is the gRPC status name (``UNAVAILABLE`` for transport)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _connect(addr: Addr, timeout: float) -> tuple[socket.socket, Callable[[], float]]:
    """A connection to the CA at *addr*, and a function that gives the time left of *timeout*
    (raising DEADLINE_EXCEEDED once it is spent)."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CaCallError("DEADLINE_EXCEEDED", f"no answer from {addr} within {timeout:.0f}s")
        return remaining

    try:
        return socket.create_connection((addr.host, addr.port), timeout=left()), left
    except OSError as exc:
        raise CaCallError("UNAVAILABLE", f"cannot connect to the CA at {addr}: {exc.strerror or exc}") from None


def grpc_unary(addr: Addr, path: str, payload: bytes, timeout: float = CA_CALL_TIMEOUT_S) -> bytes:
    """One unary gRPC call in plaintext (``h2`` with prior knowledge), blocking, bounded by
    ``timeout``: the response message's bytes, or :class:`CaCallError`."""
    raw, left = _connect(addr, timeout)
    try:
        return _h2_exchange(raw, addr, path, payload, left, "http")
    except OSError as exc:
        raise CaCallError("UNAVAILABLE", f"the call to the CA at {addr} broke: {exc}") from None
    finally:
        raw.close()


def grpc_unary_tls(addr: Addr, context: ssl.SSLContext, path: str, payload: bytes, *,
                   check_peer: Callable[[ssl.SSLSocket], None], timeout: float = CA_CALL_TIMEOUT_S) -> bytes:
    """One unary gRPC call over TLS (``h2``), blocking, bounded by ``timeout``: the response
    message's bytes, or :class:`CaCallError`. ``check_peer`` runs right after the handshake and
    before anything is sent; it raises to refuse the server."""
    raw, left = _connect(addr, timeout)
    try:
        with context.wrap_socket(raw, server_side=False, do_handshake_on_connect=False) as tls:
            try:
                tls.settimeout(left())
                tls.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                raise CaCallError("UNAVAILABLE", f"TLS handshake with the CA at {addr} failed: {exc}") from None
            try:
                check_peer(tls)
            except PeerIdentityError as exc:
                raise CaCallError("UNAVAILABLE", f"the CA at {addr} is not who it should be: {exc}") from None
            if tls.selected_alpn_protocol() != "h2":
                raise CaCallError("UNAVAILABLE", f"the CA at {addr} did not negotiate h2 "
                                                 f"(got {tls.selected_alpn_protocol()!r})")
            return _h2_exchange(tls, addr, path, payload, left, "https")
    except (OSError, ssl.SSLError) as exc:
        raise CaCallError("UNAVAILABLE", f"the call to the CA at {addr} broke: {exc}") from None
    finally:
        raw.close()


def _h2_exchange(tls: socket.socket, addr: Addr, path: str, payload: bytes, left, scheme: str) -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", scheme), (":path", path),
                            (":authority", str(addr)), ("content-type", "application/grpc"),
                            ("te", "trailers"), ("grpc-timeout", f"{max(1, int(left() * 1000))}m")])
    conn.send_data(sid, b"\x00" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
    tls.sendall(conn.data_to_send())
    meta: dict[bytes, bytes] = {}
    body = bytearray()
    ended = False
    while not ended:
        tls.settimeout(left())
        data = tls.recv(65536)
        if not data:
            raise CaCallError("UNAVAILABLE", f"the CA at {addr} closed the connection before answering")
        for ev in conn.receive_data(data):
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                meta.update(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                if len(body) > MAX_CA_ANSWER_BYTES:
                    raise CaCallError("RESOURCE_EXHAUSTED", f"the CA's answer is over {MAX_CA_ANSWER_BYTES} bytes")
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                raise CaCallError("UNAVAILABLE", f"the CA reset the call (h2 error {ev.error_code})")
            elif isinstance(ev, h2.events.ConnectionTerminated):
                raise CaCallError("UNAVAILABLE", f"the CA closed the connection (h2 error {ev.error_code})")
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        out = conn.data_to_send()
        if out:
            tls.sendall(out)
    try:
        return unary_answer(meta, body, "the CA's answer")
    except ExportError as exc:
        raise CaCallError(exc.code, exc.details) from None


class CaClient:
    """``obtain(csr_pem) -> Issued`` for :class:`RotatingCredentials`: bootstrap with the join token
    on the collector's OTLP/gRPC port; renew over mTLS on the CA port the first answer named.
    Blocking; called from one worker thread at a time (``RotatingCredentials.renew`` serialises)."""

    def __init__(self, collector: Addr, identity: SpiffeId, token: str | None,
                 timeout: float = CA_CALL_TIMEOUT_S, clock: Callable[[], float] = time.time) -> None:
        self.collector = collector
        self._clock = clock
        self.identity = identity
        self.token = token
        self.timeout = timeout
        self.renew_port = 0
        self.creds: RotatingCredentials | None = None  # set once the credentials exist
        self.bootstraps = 0
        self.renewals = 0

    def _bootstrap(self, csr: bytes) -> SignResponse:
        if not self.token:
            raise CaCallError("UNAUTHENTICATED", "no valid certificate to renew with, and no join token")
        # a connection per call: bootstraps are rare, and our caller backs off between them
        data = grpc_unary(self.collector, CA_PATH, encode_request(csr, self.token), timeout=self.timeout)
        self.bootstraps += 1
        return decode_response(data)

    def _renew(self, csr: bytes, context: ssl.SSLContext) -> SignResponse:
        expected = collector_id(self.identity.trust_domain)

        def check(tls: ssl.SSLSocket) -> None:
            got = authenticate_peer(tls, self.identity.trust_domain)
            if got != expected:
                raise PeerIdentityError(f"the CA port presented {got}, not {expected}")

        data = grpc_unary_tls(Addr(self.collector.host, self.renew_port), context, CA_PATH,
                              encode_request(csr), check_peer=check, timeout=self.timeout)
        self.renewals += 1
        return decode_response(data)

    def obtain(self, csr: bytes) -> Issued:
        creds = self.creds
        try:
            if (creds is not None and creds.ready and self.renew_port
                    and creds.not_after > self._clock() + 1.0):
                answer = self._renew(csr, creds.client_context)
            else:
                answer = self._bootstrap(csr)
        except MessageError as exc:
            raise CaCallError("INTERNAL", str(exc)) from None
        if answer.trust_domain != self.identity.trust_domain:
            raise CaCallError("FAILED_PRECONDITION", f"the CA is for the trust domain {answer.trust_domain}, "
                                                     f"not {self.identity.trust_domain}")
        if answer.renew_port:
            self.renew_port = answer.renew_port
        return Issued(answer.chain_pem, answer.bundle_pem)

    def close(self) -> None:
        """Nothing stays open between calls; kept so that owners can treat it as a resource."""


# -- the data path ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as far as the handshake proved it."""

    principal: SpiffeId | None
    security: str  # "mutual_tls" or "none" (Istio's connection_security_policy)


PLAINTEXT = Peer(None, "none")


@dataclass
class TlsStats:
    handshakes: int = 0  # inbound mTLS connections accepted
    plaintext: int = 0  # inbound plaintext connections accepted (PERMISSIVE, DISABLE)
    refused_plaintext: int = 0  # plaintext closed in STRICT
    refused_handshake: int = 0  # failed handshakes: no/bad/expired certificate, protocol errors
    refused_identity: int = 0  # verified chain, but not a SPIFFE ID of our trust domain
    timeouts: int = 0  # no first byte or no handshake within HANDSHAKE_TIMEOUT_S
    upstream_handshakes: int = 0
    upstream_failures: int = 0

    @property
    def refused(self) -> int:
        return self.refused_plaintext + self.refused_handshake + self.refused_identity + self.timeouts


@dataclass
class _Throttle:
    """At most one log line per kind per LOG_EVERY_S; the rest are summed into the next one."""

    last: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)

    def warn(self, kind: str, msg: str, *args) -> None:
        """``kind`` should tell reasons apart (a scan repeats one reason; a real problem shows a
        new one at once) while staying a small set."""
        now = time.monotonic()
        if now - self.last.get(kind, -LOG_EVERY_S) < LOG_EVERY_S:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        self.last[kind] = now
        more = self.held.pop(kind, 0)
        log.warning(msg + (f" ({more} more like it not logged)" if more else ""), *args)


class UpstreamTlsError(Exception):
    """The upstream's handshake or identity failed (Envoy: UF, a TLS connection failure)."""


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"{cause.reason}: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause) or type(cause).__name__


class MeshTls:
    """The workload's credential and mTLS mode, as the data path uses them. ``creds`` is None
    only in DISABLE mode without an identity (then every connection is plaintext). With
    ``--workers N`` it is a worker's :class:`tracemesh.proxy._workers.WorkerCredentials`, a
    ``RotatingCredentials`` fed by the supervisor instead of the CA."""

    def __init__(self, creds: RotatingCredentials | None, mode: str) -> None:
        if mode not in (MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE):
            raise ValueError(f"unknown mTLS mode {mode!r}")
        if creds is None and mode != MTLS_DISABLE:
            raise ValueError(f"mTLS mode {mode} needs a workload identity")
        self.creds = creds
        self.mode = mode
        self.stats = TlsStats()
        self._throttle = _Throttle()
        self._server_ctx: ssl.SSLContext | None = None

    @property
    def identity(self) -> SpiffeId | None:
        return self.creds.spiffe_id if self.creds is not None else None

    @property
    def trust_domain(self) -> str | None:
        return self.creds.spiffe_id.trust_domain if self.creds is not None else None

    @property
    def can_originate(self) -> bool:
        return self.creds is not None and self.creds.ready

    def _server_context(self) -> ssl.SSLContext:
        ctx = self.creds.server_context
        if ctx is not self._server_ctx:
            # A fresh context from a renewal, not yet used by any handshake (only this thread
            # wraps server connections): select h2, else HTTP/1.1 (or the opaque-TCP token, which
            # only the TCP proxy offers).
            ctx.set_alpn_protocols([H2_ALPN, DATA_ALPN, TCP_ALPN])
            self._server_ctx = ctx
        return ctx

    async def accept(self, stream: trio.SocketStream) -> tuple[trio.abc.Stream, Peer] | None:
        """Decide how to serve a new inbound connection: ``(stream, peer)`` to serve it (an
        ``SSLStream`` after a verified handshake, or the plain stream), or None when it was
        refused (and closed)."""
        if self.mode == MTLS_DISABLE:
            self.stats.plaintext += 1
            return stream, PLAINTEXT
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT_S
        first = b""
        with trio.move_on_at(deadline):
            try:
                first = await stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                first = b""
            if not first:  # the peer went away before saying anything: nothing to count
                await trio.aclose_forcefully(stream)
                return None
        if not first:
            self.stats.timeouts += 1
            self._throttle.warn("timeout", "inbound connection from %s refused: nothing sent within %.0fs",
                                _peer_name(stream), HANDSHAKE_TIMEOUT_S)
            await trio.aclose_forcefully(stream)
            return None
        if first[0] != TLS_HANDSHAKE_RECORD:
            if self.mode == MTLS_PERMISSIVE:
                self.stats.plaintext += 1
                return stream, PLAINTEXT
            self.stats.refused_plaintext += 1
            self._throttle.warn("plaintext", "inbound plaintext connection from %s refused: mTLS is STRICT",
                                _peer_name(stream))
            await trio.aclose_forcefully(stream)
            return None
        peer_addr = _peer_name(stream)
        tls = trio.SSLStream(stream, self._server_context(), server_side=True, https_compatible=True)
        try:
            with trio.fail_at(deadline):
                await tls.do_handshake()
            principal = authenticate_peer(tls, self.trust_domain)
        except trio.TooSlowError:
            self.stats.timeouts += 1
            self._throttle.warn("timeout", "inbound TLS handshake from %s refused: not done within %.0fs",
                                peer_addr, HANDSHAKE_TIMEOUT_S)
        except PeerIdentityError as exc:
            self.stats.refused_identity += 1
            self._throttle.warn("identity", "inbound mTLS connection from %s refused: %s", peer_addr, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            self.stats.refused_handshake += 1
            reason = _reason(exc)
            self._throttle.warn(f"handshake {reason}", "inbound TLS handshake from %s refused: %s", peer_addr, reason)
        else:
            self.stats.handshakes += 1
            return tls, Peer(principal, "mutual_tls")
        await trio.aclose_forcefully(tls)
        return None

    async def connect(self, tcp: trio.SocketStream, expected: SpiffeId | None,
                      timeout: float, alpn: str = DATA_ALPN) -> tuple[trio.SSLStream, SpiffeId]:
        """Run the client handshake on ``tcp``, offering only *alpn*, and verify the upstream;
        UpstreamTlsError (the connection closed) if it fails."""
        tls = trio.SSLStream(tcp, self.creds.client_context_alpn((alpn,)), server_hostname=None,
                             https_compatible=True)
        try:
            with trio.fail_after(timeout):
                await tls.do_handshake()
            peer = authenticate_peer(tls, self.trust_domain)
            if expected is not None and peer != expected:
                raise PeerIdentityError(f"the upstream is {peer}, not {expected} as the mesh config says")
            chosen = tls.selected_alpn_protocol()
            if chosen != alpn and not (chosen is None and alpn == DATA_ALPN):
                raise PeerIdentityError(f"the upstream chose ALPN {chosen!r}, not {alpn!r}")
        except BaseException as exc:
            await trio.aclose_forcefully(tls)
            self.stats.upstream_failures += 1
            if isinstance(exc, trio.TooSlowError):
                raise UpstreamTlsError(f"TLS handshake not done within {timeout:.0f}s") from None
            if isinstance(exc, PeerIdentityError):
                raise UpstreamTlsError(str(exc)) from None
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)):
                raise UpstreamTlsError(f"TLS handshake failed: {_reason(exc)}") from None
            raise
        self.stats.upstream_handshakes += 1
        return tls, peer
