"""The mesh CA over gRPC: ``/tracemesh.ca.v1.CertificateAuthority/Sign``.

**Transport: two doors, one method.**

- *Bootstrap* is served on the OTLP/gRPC port, as it is (plaintext): a sidecar with no certificate
  yet sends its CSR and its join token; the token is what authenticates it (single use or time
  bound, bound to one identity, checked and used up by :meth:`MeshCA.issue`).
- *Renewal* is served on a second port, ``--ca-mtls`` (default ``<OTLP host>:15012``, istiod's
  port for the same job), where grpcio's TLS server *requires* a client certificate and verifies
  its chain against the trust bundle inside the handshake. The caller's identity is the SPIFFE
  ID of that verified certificate (never a field of the request), and the CSR must ask for that
  same identity (:meth:`MeshCA.renew`). No token is sent, so a join token can be single use and
  short lived, and nothing long lived ever crosses the plaintext port. The server presents an
  SVID of its own (:data:`COLLECTOR_ID`, issued by the CA to itself and renewed at half-life),
  which the sidecar verifies against its bundle *and* by exact SPIFFE ID, so no other workload of
  the mesh can pose as the CA and hand out a trust bundle.

Why not renew over the plaintext port with the token again: that needs a multi-use token that
lives as long as the workload, a bearer secret sent in the clear twice a day. Why not one TLS port
for both: grpcio's TLS server either requires a client certificate or asks for none, and a
bootstrapping sidecar has none. The first answer tells the sidecar the renewal port
(``renew_port``), so a sidecar is configured with the collector's address alone. A sidecar whose
certificate expired (asleep past its expiry) cannot pass the handshake and bootstraps again, if
its token still allows it.

**Messages** are JSON (no generated stubs, no ``.proto`` compiled at install time), UTF-8, at
most :data:`MAX_REQUEST_BYTES`::

    request:  {"csr": "<PEM CSR>", "token": "tmj...."}          # token only for bootstrap
    response: {"chain": "<PEM: leaf, then intermediates>", "bundle": "<PEM: trusted roots>",
               "trust_domain": "cluster.local", "renew_port": 15012, "not_after": "<ISO 8601>"}

**Errors** are gRPC statuses: ``INVALID_ARGUMENT`` for a malformed request or a CSR the CA will
not sign (bad key, bad signature, not one SPIFFE URI SAN, another trust domain), ``UNAUTHENTICATED``
for a bootstrap without a token, ``PERMISSION_DENIED`` for a token that is unknown, expired, used
up or bound to another identity, and for a renewal whose CSR names another identity than the
caller's certificate; ``INTERNAL`` when the CA itself is broken (logged).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from cryptography import x509

from tracemesh._ca_protocol import (  # the protocol's names and messages, shared with the sidecar's client
    COLLECTOR_ACCOUNT,
    collector_id,
    COLLECTOR_NAMESPACE,
    decode_request,
    decode_response,
    DEFAULT_MTLS_PORT,
    encode_request,
    encode_response,
    MAX_REQUEST_BYTES,
    MessageError,
    METHOD,
    PATH,
    SERVICE,
    SignResponse,
)
from tracemesh._proc import name_os_thread
from tracemesh.collector._ca import CaError, IssueRefused, MeshCA, TokenRefused
from tracemesh.identity import (
    CredentialError,
    SpiffeId,
    SpiffeIdError,
    cert_not_after,
    generate_key,
    load_pem_certs,
    make_csr,
    private_key_pem,
    spiffe_id_of,
)

log = logging.getLogger("tracemesh.collector.ca")

__all__ = [  # with the protocol's names, re-exported from tracemesh._ca_protocol
    "COLLECTOR_ACCOUNT", "COLLECTOR_NAMESPACE", "DEFAULT_MTLS_PORT", "MAX_REQUEST_BYTES", "METHOD", "PATH",
    "SERVICE", "WORKER_THREADS", "CaService", "MessageError", "SignResponse", "collector_id", "decode_request",
    "decode_response", "encode_request", "encode_response", "open_ca", "start_ca",
]

#: A renewal waits for the CA's file lock and an fsync at worst; a few threads are plenty.
WORKER_THREADS = 4


# -- the service -----------------------------------------------------------------------------


def _csr_identity(csr_pem: bytes) -> SpiffeId | None:
    """The SPIFFE ID a CSR asks for, if it reads as one; None leaves the verdict to the CA."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return SpiffeId.parse(uris[0]) if len(uris) == 1 else None
    except (ValueError, x509.ExtensionNotFound, SpiffeIdError, IndexError):
        return None


class CaService:
    """The Sign method's two handlers over one :class:`MeshCA`. Thread-safe (grpcio calls the
    handlers from its worker threads; the CA serialises itself)."""

    def __init__(self, ca: MeshCA, renew_port: int = 0) -> None:
        self.ca = ca
        self.renew_port = renew_port
        self.issued = 0
        self.renewed = 0
        self.refused = 0

    def _answer(self, chain: bytes) -> bytes:
        leaf = load_pem_certs(chain)[0]
        return encode_response(SignResponse(chain, self.ca.bundle_pem(), self.ca.trust_domain, self.renew_port,
                                            cert_not_after(leaf).isoformat()))

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, how: str):
        self.refused += 1
        log.warning("refused a certificate %s from %s: %s", how, context.peer(), message)
        context.abort(code, message)

    def bootstrap(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """The plaintext door: a CSR authenticated by a join token."""
        try:
            csr, token = decode_request(data)
        except MessageError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "bootstrap")
        if not token:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         "a join token is required for a first certificate; renewals go to the CA's mTLS "
                         f"port {self.renew_port} with the current certificate", "bootstrap")
        try:
            chain = self.ca.issue(csr, token)
        except TokenRefused as exc:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(exc), "bootstrap")
        except IssueRefused as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "bootstrap")
        except CaError as exc:
            log.error("the CA cannot issue: %s", exc)
            context.abort(grpc.StatusCode.INTERNAL, f"the CA cannot issue: {exc}")
        self.issued += 1
        answer = self._answer(chain)
        log.info("issued a first certificate for %s to %s", _csr_identity(csr), context.peer())
        return answer

    def renew(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """The mTLS door: the caller is the SPIFFE ID of its verified client certificate."""
        try:
            csr, _token = decode_request(data)
        except MessageError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "renewal")
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            peer = spiffe_id_of(load_pem_certs(pem)[0])
        except CredentialError as exc:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, f"no usable client certificate: {exc}", "renewal")
        if peer.trust_domain != self.ca.trust_domain:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{peer} is not in the trust domain {self.ca.trust_domain}", "renewal")
        wanted = _csr_identity(csr)
        if wanted is not None and wanted != peer:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"the CSR asks for {wanted}, but the caller is {peer}", "renewal")
        try:
            chain = self.ca.renew(csr, peer)
        except IssueRefused as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if "but the caller is" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
            self._refuse(context, code, str(exc), "renewal")
        except CaError as exc:
            log.error("the CA cannot issue: %s", exc)
            context.abort(grpc.StatusCode.INTERNAL, f"the CA cannot issue: {exc}")
        self.renewed += 1
        log.info("renewed the certificate of %s", peer)
        return self._answer(chain)

    def handler(self, *, renewal: bool) -> grpc.GenericRpcHandler:
        fn = self.renew if renewal else self.bootstrap
        return grpc.method_handlers_generic_handler(SERVICE, {
            METHOD: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=None, response_serializer=None),
        })


class ServingCert:
    """The CA port's own SVID, issued by the CA to itself, renewed at half-life, and the trust
    bundle it verifies clients against; both handed to grpcio through
    :func:`grpc.dynamic_ssl_server_credentials`, whose fetcher runs before each handshake, so a
    renewal or a root rotation takes effect on the next connection without a restart."""

    def __init__(self, ca: MeshCA, clock=time.time) -> None:
        self.ca = ca
        self.sid = collector_id(ca.trust_domain)
        self._clock = clock
        self._lock = threading.Lock()
        self._key_pem = self._chain_pem = self._bundle_pem = b""
        self._renew_at = 0.0
        self._refresh()

    def _refresh(self) -> None:
        key = generate_key()
        chain = self.ca.renew(make_csr(key, self.sid), self.sid)
        leaf = load_pem_certs(chain)[0]
        now = self._clock()
        start = min(max(now, leaf.not_valid_before_utc.timestamp()), cert_not_after(leaf).timestamp())
        self._key_pem, self._chain_pem = private_key_pem(key), chain
        self._renew_at = start + (cert_not_after(leaf).timestamp() - start) / 2
        self._bundle_pem = self.ca.bundle_pem()

    def configuration(self):
        return grpc.ssl_server_certificate_configuration([(self._key_pem, self._chain_pem)],
                                                         root_certificates=self._bundle_pem)

    def fetch(self):
        """grpcio's fetcher: a new configuration when the certificate is due or the bundle
        changed, else None (keep the current one). Never raises: a failure keeps the old one."""
        try:
            with self._lock:
                changed = False
                if self._clock() >= self._renew_at:
                    self._refresh()
                    changed = True
                bundle = self.ca.bundle_pem()
                if bundle != self._bundle_pem:
                    self._bundle_pem, changed = bundle, True
                return self.configuration() if changed else None
        except Exception:  # noqa: BLE001 - grpcio would only log it; keep serving the current certificate
            log.exception("could not renew the CA port's own certificate; keeping the current one")
            return None


def open_ca(ca_dir: str) -> tuple[CaService, ServingCert]:
    """Open the CA at ``ca_dir`` with its serving certificate, for a caller that serves the
    renewal method itself (the control plane's server does, beside the discovery stream); it
    sets ``renew_port`` once listening. Raises :class:`~tracemesh.collector._ca.CaError`."""
    ca = MeshCA.open(ca_dir)
    return CaService(ca), ServingCert(ca)


def start_ca(ca_dir: str, mtls_addr: str) -> tuple[CaService, grpc.Server, int]:
    """Open the CA at ``ca_dir`` and start its mTLS renewal port on ``mtls_addr``; the service's
    bootstrap handler is for the caller to add to the OTLP/gRPC server. Raises
    :class:`~tracemesh.collector._ca.CaError` (no CA there, unsafe key files) or OSError."""
    ca = MeshCA.open(ca_dir)
    serving = ServingCert(ca)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="mesh-ca", initializer=name_os_thread),
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  ("grpc.so_reuseport", 0)])
    service = CaService(ca)
    server.add_generic_rpc_handlers((service.handler(renewal=True),))
    creds = grpc.dynamic_ssl_server_credentials(serving.configuration(), serving.fetch,
                                                require_client_authentication=True)
    port = server.add_secure_port(mtls_addr, creds)
    if port == 0:
        raise OSError(f"cannot listen for the mesh CA on {mtls_addr}")
    service.renew_port = port
    server.start()
    return service, server, port
