"""Mesh identity: SPIFFE IDs, workload keys and CSRs, X.509-SVID helpers, mTLS contexts, rotation.

Shared by the sidecar (which generates its key, asks the mesh CA for a certificate, and terminates
and originates mTLS) and by the collector's CA (which parses CSRs and issues certificates).

Public surface:

- :class:`SpiffeId` (``SpiffeId.parse``, ``SpiffeId.workload``): a validated SPIFFE ID.
- :func:`generate_key`, :func:`private_key_pem`, :func:`make_csr`: a workload's own key (ECDSA
  P-256, it never leaves the process that made it) and its certificate signing request.
- :func:`load_pem_certs`, :func:`spiffe_id_of`, :func:`cert_not_after`, :func:`cert_fingerprint`.
- :func:`server_context`, :func:`client_context`: ``ssl.SSLContext`` objects for mesh mTLS.
- :func:`peer_spiffe_id`, :func:`authenticate_peer`: who is on the other end of a handshake.
- :class:`RotatingCredentials` and :class:`Issued`: a workload credential that renews itself;
  where it makes its keys and checks certificates: :class:`InProcessCrypto`, or
  :class:`ChildProcessCrypto` (a short-lived child: the sidecar's choice).

Peers are verified by chain (against the trust bundle, inside the TLS handshake) and by SPIFFE ID
(after it, with :func:`authenticate_peer`); never by hostname. A root made by the mesh CA also
carries a URI name constraint for its trust domain, so OpenSSL already refuses, inside the
handshake, a certificate for another trust domain signed under that root.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from tracemesh._fs import write_all

if TYPE_CHECKING:  # cryptography is imported where keys and certificates are made (not by every sidecar)
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography (~9 MB resident) is imported by the functions that use it. A sidecar never does: it
# runs them in a short-lived child (ChildProcessCrypto, tracemesh/_credhelper.py).

log = logging.getLogger("tracemesh.identity")

#: Trust domain when none is configured: Kubernetes' cluster domain, as Istio uses.
DEFAULT_TRUST_DOMAIN = "cluster.local"
#: Workload certificates live a day (Istio's default): long enough to ride out a control plane
#: outage of hours, short enough that a leaked key is worth little for long.
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
#: Renew when this fraction of a certificate's life has passed (Istio: half-life), leaving the
#: other half for retries when the CA is unreachable.
DEFAULT_RENEW_FRACTION = 0.5
#: The SPIFFE spec's limits: a SPIFFE ID is at most 2048 bytes, a trust domain at most 255.
MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
#: ALPN, in preference order: h2 first so gRPC and HTTP/2 stay multiplexed across the mesh.
ALPN_PROTOCOLS = ("h2", "http/1.1")
#: TLS 1.2 suites allowed: forward secret AEAD only (RFC 7540 9.2.2 forbids the rest for h2).
#: TLS 1.3 suites are all AEAD and are left to OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_SCHEME = "spiffe://"
_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TD_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


# -- errors ----------------------------------------------------------------------------------------


class IdentityError(Exception):
    """Base of the errors of this module."""


class SpiffeIdError(IdentityError, ValueError):
    """A string is not a valid SPIFFE ID; the message says which rule it breaks."""


class CredentialError(IdentityError):
    """Local certificate or key material is unusable (malformed, mismatched, wrong identity)."""


class PeerIdentityError(IdentityError):
    """The peer of a verified handshake has no acceptable SPIFFE ID (the remote side's fault)."""


# -- SPIFFE IDs ------------------------------------------------------------------------------------


def _check_trust_domain(td: str) -> None:
    if not td:
        raise SpiffeIdError("trust domain is missing")
    if "@" in td:
        raise SpiffeIdError("a SPIFFE ID has no userinfo ('@' in the trust domain)")
    if ":" in td:
        raise SpiffeIdError("a SPIFFE ID has no port (':' in the trust domain)")
    if len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    for ch in td:
        if ch not in _TD_CHARS:
            if ch.lower() in _TD_CHARS:
                raise SpiffeIdError(f"trust domain must be lowercase, got {td!r}")
            if ch == "%":
                raise SpiffeIdError("percent-encoding is not allowed in a SPIFFE ID")
            raise SpiffeIdError(
                f"trust domain characters are limited to a-z, 0-9, '.', '-' and '_', got {ch!r}")


def _check_path(path: str) -> None:
    """``path`` is ``""`` or ``/seg(/seg)*``."""
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError("path must start with '/'")
    segments = path[1:].split("/")
    for i, seg in enumerate(segments):
        if not seg:
            if i == len(segments) - 1:
                raise SpiffeIdError("path cannot have a trailing slash")
            raise SpiffeIdError("path cannot contain empty segments")
        if seg in (".", ".."):
            raise SpiffeIdError("path cannot contain dot segments")
        for ch in seg:
            if ch not in _PATH_CHARS:
                if ch == "%":
                    raise SpiffeIdError("percent-encoding is not allowed in a SPIFFE ID")
                raise SpiffeIdError(
                    f"path segment characters are limited to letters, digits, '.', '-' and '_', got {ch!r}")


@dataclass(frozen=True)
class SpiffeId:
    """A SPIFFE ID, ``spiffe://<trust-domain><path>``, validated as the SPIFFE spec requires.

    Construction validates (so does :meth:`parse`); ``str()`` gives the URI back unchanged.
    The mesh's workload IDs have the path ``/ns/<namespace>/sa/<service-account>``.
    """

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_path(self.path)
        if len(self.uri.encode()) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeIdError(f"a SPIFFE ID is at most {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse and validate; raise :class:`SpiffeIdError` naming the broken rule."""
        if not isinstance(text, str):
            raise TypeError(f"a SPIFFE ID is a str, got {type(text).__name__}")
        if not text:
            raise SpiffeIdError("empty SPIFFE ID")
        if len(text.encode()) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeIdError(f"a SPIFFE ID is at most {MAX_SPIFFE_ID_BYTES} bytes")
        if not text.startswith(_SCHEME):
            if text[: len(_SCHEME)].lower() == _SCHEME:
                raise SpiffeIdError("scheme must be lowercase 'spiffe'")
            raise SpiffeIdError(f"scheme is missing or invalid: a SPIFFE ID starts with {_SCHEME!r}")
        if "?" in text:
            raise SpiffeIdError("a SPIFFE ID has no query")
        if "#" in text:
            raise SpiffeIdError("a SPIFFE ID has no fragment")
        rest = text[len(_SCHEME):]
        td, slash, path = rest.partition("/")
        return cls(td, slash + path)

    @classmethod
    def workload(cls, namespace: str, service_account: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        """The mesh's workload ID ``spiffe://<td>/ns/<namespace>/sa/<service_account>``."""
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    def __str__(self) -> str:
        return self.uri

    @property
    def _ns_sa(self) -> tuple[str, str] | None:
        seg = self.path.split("/")[1:]
        if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa":
            return seg[1], seg[3]
        return None

    @property
    def is_workload(self) -> bool:
        """Whether the path has the mesh's ``/ns/<ns>/sa/<sa>`` form."""
        return self._ns_sa is not None

    @property
    def namespace(self) -> str | None:
        ns_sa = self._ns_sa
        return ns_sa[0] if ns_sa else None

    @property
    def service_account(self) -> str | None:
        ns_sa = self._ns_sa
        return ns_sa[1] if ns_sa else None

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


# -- keys, CSRs, certificates ----------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: the mesh's workload key type (fast handshakes, small certs)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM. Whoever writes it to a file owns making that file 0600."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(key, spiffe_id: SpiffeId | str) -> bytes:
    """A PEM CSR signed by ``key`` whose only subject alternative name is the URI ``spiffe_id``.

    The subject is empty, as in Istio's and SPIRE's SVIDs (the identity is the URI SAN alone), so
    the SAN is marked critical (RFC 5280 4.2.1.6).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
                              critical=True))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def load_pem_certs(pem: bytes | str) -> list[x509.Certificate]:
    """All certificates of a PEM blob, in order; :class:`CredentialError` if there is none."""
    from cryptography import x509

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CredentialError(f"no valid PEM certificate: {exc}") from exc


def _uri_sans(ext_source) -> list[str]:
    from cryptography import x509

    try:
        san = ext_source.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN. :class:`CredentialError` otherwise."""
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise CredentialError(f"an X.509-SVID has exactly one URI SAN, this certificate has {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise CredentialError(f"URI SAN {uris[0]!r} is not a SPIFFE ID: {exc}") from exc


def cert_not_after(cert: x509.Certificate) -> datetime:
    """Expiry as an aware UTC datetime."""
    return cert.not_valid_after_utc


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, as ``openssl x509 -fingerprint -sha256`` prints it (AB:CD:...)."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


@dataclass(frozen=True)
class LeafFacts:
    """What a credential's checks found out about its leaf certificate (epoch seconds)."""

    not_before: float
    not_after: float


def new_key_and_csr(spiffe_id: SpiffeId | str) -> tuple[bytes, bytes]:
    """A fresh key (PEM) and a CSR for it naming *spiffe_id*."""
    key = generate_key()
    return private_key_pem(key), make_csr(key, spiffe_id)


def check_credential(key_pem: bytes, chain_pem: bytes, spiffe_id: SpiffeId, now: float, *,
                     issued: bool) -> LeafFacts:
    """Check a key and certificate chain before they are installed: the leaf is for *spiffe_id*,
    for this key, and not expired at *now*. :class:`CredentialError` says what is wrong, worded
    for a CA's answer (*issued*) or for a credential handed over."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = load_pem_certs(chain_pem)[0]
    except (ValueError, TypeError, IndexError) as exc:
        raise CredentialError(f"unusable key or certificate chain: {exc}") from exc
    got = spiffe_id_of(leaf)
    if got != spiffe_id:
        raise CredentialError(f"the CA issued a certificate for {got}, not {spiffe_id}" if issued
                              else f"the certificate is for {got}, not {spiffe_id}")
    if leaf.public_key() != key.public_key():
        raise CredentialError("the CA issued a certificate for another key" if issued
                              else "the certificate is for another key")
    not_after = cert_not_after(leaf)
    if not_after.timestamp() <= now:
        raise CredentialError(f"the CA issued a certificate that expired at {not_after}" if issued
                              else f"the certificate expired at {not_after}")
    return LeafFacts(leaf.not_valid_before_utc.timestamp(), not_after.timestamp())


class InProcessCrypto:
    """Keys, CSRs and certificate checks in this process (loads cryptography: ~9 MB resident)."""

    new_key_and_csr = staticmethod(new_key_and_csr)
    check_credential = staticmethod(check_credential)


class ChildProcessCrypto:
    """The same work in a short-lived child (``python -m tracemesh._credhelper``), so that this
    process never loads cryptography: a sidecar's only use for it is its own key, CSR and
    certificate checks, once per certificate, and its resident pages stayed for the process's life
    (~8 MB of a 57-64 MB mTLS sidecar). Istio splits it the same way: its agent makes the key and
    CSR, Envoy only receives certificates. A child costs ~0.15 s; the key crosses a pipe, never a
    file."""

    timeout_s = 60.0

    def _run(self, op: str, doc: dict) -> dict:
        import json
        import subprocess
        import sys

        try:
            done = subprocess.run([sys.executable, "-m", "tracemesh._credhelper", op], input=json.dumps(doc).encode(),
                                  capture_output=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CredentialError(f"the credential helper did not run: {exc}") from exc
        try:
            out = json.loads(done.stdout)
        except ValueError:
            out = None
        if done.returncode != 0 or not isinstance(out, dict):
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise CredentialError(f"the credential helper failed: {tail[0]}")
        if "error" in out:
            raise CredentialError(out["error"])
        return out

    def new_key_and_csr(self, spiffe_id: SpiffeId | str) -> tuple[bytes, bytes]:
        out = self._run("new", {"spiffe_id": str(spiffe_id)})
        return out["key"].encode(), out["csr"].encode()

    def check_credential(self, key_pem: bytes, chain_pem: bytes, spiffe_id: SpiffeId, now: float, *,
                         issued: bool) -> LeafFacts:
        out = self._run("check", {"key": key_pem.decode(), "chain": chain_pem.decode(), "spiffe_id": str(spiffe_id),
                                  "now": now, "issued": issued})
        return LeafFacts(float(out["not_before"]), float(out["not_after"]))


# -- mTLS contexts ---------------------------------------------------------------------------------


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from memory. ssl only reads files, so the PEM goes into anonymous
    memory files (memfd, never on disk) where Linux has them, else into a 0700 temporary
    directory that is removed before returning."""
    try:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            fds = [os.memfd_create("tracemesh-cert", os.MFD_CLOEXEC),
                   os.memfd_create("tracemesh-key", os.MFD_CLOEXEC)]
            try:
                write_all(fds[0], chain_pem)
                write_all(fds[1], key_pem)
                ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            finally:
                for fd in fds:
                    os.close(fd)
        else:
            with tempfile.TemporaryDirectory(prefix="tracemesh-tls-") as tmp:
                cert_path, key_path = Path(tmp, "chain.pem"), Path(tmp, "key.pem")
                for path, data in ((cert_path, chain_pem), (key_path, key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        write_all(fd, data)
                    finally:
                        os.close(fd)
                ctx.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        raise CredentialError(f"certificate chain and key are unusable: {exc}") from exc


def _mesh_context(purpose: int, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # 1.3 is negotiated whenever both sides have it
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # h2 forbids renegotiation (RFC 7540 9.2.1); compression invites CRIME.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.check_hostname = False  # peers are verified by SPIFFE ID, not hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        bundle = bundle_pem.decode() if isinstance(bundle_pem, bytes) else bundle_pem
        ctx.load_verify_locations(cadata=bundle)
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialError(f"trust bundle is unusable: {exc}") from exc
    if not ctx.get_ca_certs():
        raise CredentialError("trust bundle holds no certificate")
    _load_chain(ctx, chain_pem, key_pem)
    return ctx


def server_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """A server-side mesh mTLS context.

    TLS 1.2 at least (1.3 preferred), ALPN ``h2`` then ``http/1.1``, a client certificate is
    required and its chain verified against ``bundle_pem`` (one or more roots) inside the
    handshake: a client without one, or with one that does not chain to the bundle, or an expired
    one, fails the handshake. Hostnames are not checked; call :func:`authenticate_peer` on the
    connection afterwards. ``chain_pem`` is the leaf followed by any intermediates.
    """
    return _mesh_context(ssl.PROTOCOL_TLS_SERVER, chain_pem, key_pem, bundle_pem)


def client_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """A client-side mesh mTLS context: presents ``chain_pem``, verifies the server's chain
    against ``bundle_pem``; no hostname check (:func:`authenticate_peer` after the handshake).
    Pass no ``server_hostname`` when wrapping, or any: it is used for SNI only."""
    return _mesh_context(ssl.PROTOCOL_TLS_CLIENT, chain_pem, key_pem, bundle_pem)


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID of the verified peer of a completed handshake.

    Only meaningful with ``CERT_REQUIRED`` (as the contexts above set): without verification
    ``getpeercert()`` is empty and this raises. :class:`PeerIdentityError` when the peer's
    certificate does not carry exactly one URI SAN that is a valid SPIFFE ID.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        raise PeerIdentityError("the peer presented no verified certificate")
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1:
        raise PeerIdentityError(f"the peer's certificate has {len(uris)} URI SANs, an X.509-SVID has one")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise PeerIdentityError(f"the peer's URI SAN {uris[0]!r} is not a SPIFFE ID: {exc}") from exc


def authenticate_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket,
                      trust_domain: str | Iterable[str]) -> SpiffeId:
    """The peer's SPIFFE ID if it belongs to ``trust_domain`` (or one of several, for federation);
    else :class:`PeerIdentityError`. Call it right after the handshake and close the connection
    on error: the chain was already verified against the bundle by the handshake itself."""
    allowed = {trust_domain} if isinstance(trust_domain, str) else set(trust_domain)
    sid = peer_spiffe_id(ssl_object)
    if sid.trust_domain not in allowed:
        raise PeerIdentityError(
            f"peer {sid} is not in the trust domain {' or '.join(sorted(allowed))}")
    return sid


# -- rotating credentials --------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """What the CA answers a CSR with: the certificate chain (leaf first) and the trust bundle."""

    chain_pem: bytes
    bundle_pem: bytes


@dataclass(frozen=True)
class _Snapshot:
    key_pem: bytes
    chain_pem: bytes
    bundle_pem: bytes
    not_after: float  # epoch seconds
    renew_at: float  # epoch seconds
    server: ssl.SSLContext = field(repr=False)
    client: ssl.SSLContext = field(repr=False)


class RotatingCredentials:
    """A workload's key, certificate chain and trust bundle, and the mTLS contexts built from
    them, renewed before expiry.

    ``obtain(csr_pem) -> Issued`` asks the CA for a certificate; it is called with a CSR for a key
    generated here for every renewal (the key never leaves this object). Renewal is due when
    ``renew_fraction`` of the certificate's life, counted from when it was received, has passed
    (half-life by default). A failed renewal keeps the current certificate and is retried with a
    backoff that never waits past expiry.

    **How the swap is atomic.** Every renewal builds *new* ``SSLContext`` objects and then
    replaces one reference; :attr:`server_context` and :attr:`client_context` read that
    reference. Handshakes that start afterwards use the new certificate; connections already
    made keep theirs (an ``SSLObject`` holds its own context and copy of the certificate).
    Calling ``load_cert_chain`` on the context in use instead is not safe: CPython releases the
    GIL while OpenSSL replaces the certificate and then the key, and OpenSSL drops the old
    private key as soon as a certificate that does not match it is set, so a handshake started
    by another thread in that window finds a certificate without its key; worse, OpenSSL does not
    lock a context's certificate store against concurrent ``SSL_new``: here (CPython 3.11,
    OpenSSL 3.0) reloading one context in a loop while another thread handshook crashed the
    process (segmentation fault, "double free") in three runs out of three, where swapping fresh
    contexts ran ~1,200 handshakes without a failure. And a failed load (a bad PEM, a mismatched
    key) would leave the live context half-replaced. A fresh context either builds completely or
    is thrown away, and the live one is never touched. In a single-threaded Trio program an
    in-place reload would not race, but the sidecar also runs blocking work in threads.

    Thread safety: properties may be read from any thread; :meth:`renew` serialises itself.
    """

    def __init__(self, spiffe_id: SpiffeId | str, obtain: Callable[[bytes], Issued], *,
                 renew_fraction: float = DEFAULT_RENEW_FRACTION, max_retry_s: float = 30.0,
                 clock: Callable[[], float] = time.time, crypto=None) -> None:
        if not 0.0 < renew_fraction < 1.0:
            raise ValueError(f"renew_fraction must be between 0 and 1, got {renew_fraction}")
        self.spiffe_id = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        self._obtain = obtain
        self._fraction = renew_fraction
        self._max_retry_s = max_retry_s
        self._clock = clock
        #: where keys are made and certificates checked (InProcessCrypto or ChildProcessCrypto)
        self.crypto = crypto if crypto is not None else InProcessCrypto()
        self._current: _Snapshot | None = None
        self._alpn_contexts: tuple[_Snapshot, dict] | None = None  # see client_context_alpn
        self._renew_lock = threading.Lock()
        self.generation = 0  # count of certificates installed
        self.failures = 0  # count of failed renewals
        self.last_error: BaseException | None = None

    # -- reading the current credential (any thread) --

    def _snap(self) -> _Snapshot:
        snap = self._current
        if snap is None:
            raise CredentialError("no certificate yet: call renew() or run() first")
        return snap

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def server_context(self) -> ssl.SSLContext:
        return self._snap().server

    @property
    def client_context(self) -> ssl.SSLContext:
        return self._snap().client

    def client_context_alpn(self, protocols: tuple[str, ...]) -> ssl.SSLContext:
        """A client context of the current certificate that offers only *protocols* by ALPN (a
        protocol other than HTTP, say); a fresh context, built once per certificate and list,
        since the ALPN a client offers belongs to its context and the shared one is never changed."""
        snap = self._snap()
        cached = self._alpn_contexts
        if cached is None or cached[0] is not snap:
            cached = self._alpn_contexts = (snap, {})
        ctx = cached[1].get(protocols)
        if ctx is None:
            ctx = cached[1][protocols] = client_context(snap.chain_pem, snap.key_pem, snap.bundle_pem)
            ctx.set_alpn_protocols(list(protocols))
        return ctx

    @property
    def chain_pem(self) -> bytes:
        return self._snap().chain_pem

    @property
    def bundle_pem(self) -> bytes:
        return self._snap().bundle_pem

    @property
    def not_after(self) -> float:
        """Expiry of the current certificate, epoch seconds."""
        return self._snap().not_after

    @property
    def renew_at(self) -> float:
        """When the next renewal is due, epoch seconds."""
        return self._snap().renew_at

    def export_pem(self) -> tuple[bytes, bytes, bytes]:
        """``(key, chain, bundle)`` PEM of the current credential, from one snapshot. Only for
        handing to this workload's own worker processes over a private channel (``sidecar
        --workers``): the key must never leave them."""
        snap = self._snap()
        return snap.key_pem, snap.chain_pem, snap.bundle_pem

    # -- changing it --

    def renew(self) -> None:
        """Get a new certificate for a new key now (blocking: calls ``obtain``) and install it.

        Raises whatever ``obtain`` raises, or :class:`CredentialError` when the answer is not a
        certificate for this identity and key; the current credential then stays in place.
        """
        with self._renew_lock:
            key_pem, csr_pem = self.crypto.new_key_and_csr(self.spiffe_id)
            issued = self._obtain(csr_pem)
            received = self._clock()
            facts = self.crypto.check_credential(key_pem, issued.chain_pem, self.spiffe_id, received, issued=True)
            self._install(key_pem, issued.chain_pem, issued.bundle_pem, facts, received=received)

    def install(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        """Install a key and certificate obtained elsewhere: the supervisor of ``sidecar --workers``
        hands its credential to its workers this way. Checked as :meth:`renew` checks the CA's
        answer (identity, key, expiry); :class:`CredentialError` leaves the current one in place."""
        with self._renew_lock:
            received = self._clock()
            facts = self.crypto.check_credential(key_pem, chain_pem, self.spiffe_id, received, issued=False)
            self._install(key_pem, chain_pem, bundle_pem, facts, received=received)

    def update_bundle(self, bundle_pem: bytes) -> None:
        """Install a new trust bundle (say, pushed by the control plane during a root rotation)
        with the current key and certificate."""
        with self._renew_lock:
            snap = self._snap()
            server = server_context(snap.chain_pem, snap.key_pem, bundle_pem)
            client = client_context(snap.chain_pem, snap.key_pem, bundle_pem)
            self._current = _Snapshot(snap.key_pem, snap.chain_pem, bundle_pem, snap.not_after,
                                      snap.renew_at, server, client)

    def _install(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, facts: LeafFacts,
                 received: float) -> None:
        not_after = facts.not_after
        # Counted from receipt, not from notBefore: the CA backdates notBefore for clock skew,
        # and with short lifetimes that backdating would be most of the certificate's life.
        start = min(max(received, facts.not_before), not_after)
        renew_at = start + (not_after - start) * self._fraction
        server = server_context(chain_pem, key_pem, bundle_pem)
        client = client_context(chain_pem, key_pem, bundle_pem)
        self._current = _Snapshot(key_pem, chain_pem, bundle_pem, not_after, renew_at, server, client)
        self.generation += 1
        log.info("installed certificate %d for %s, expires %s, renewal due %s", self.generation,
                 self.spiffe_id, datetime.fromtimestamp(not_after, timezone.utc).isoformat(),
                 datetime.fromtimestamp(renew_at, timezone.utc).isoformat())

    def _retry_delay(self, attempt: int) -> float:
        delay = min(self._max_retry_s, 0.5 * 2 ** min(attempt, 16))
        if self._current is not None:
            # Before expiry, try at least a few more times; after it, keep trying at the cap.
            remaining = self._current.not_after - self._clock()
            if remaining > 0:
                delay = min(delay, max(0.1, remaining / 4))
        return delay

    async def run(self, *, task_status=None) -> None:
        """Trio task: obtain the first certificate (retrying until it succeeds), report started,
        then renew whenever due, forever.

        ``obtain`` runs in a worker thread; cancellation waits for a call in progress to return,
        so ``obtain`` must bound its own time (a network call with a timeout). A cancellation
        never leaves a half-installed credential.
        """
        import trio

        attempt = 0
        while self._current is None:
            try:
                await trio.to_thread.run_sync(self.renew)
            except Exception as exc:  # noqa: BLE001 - any failure of obtain is retried
                self._note_failure(exc)
                await trio.sleep(self._retry_delay(attempt))
                attempt += 1
        if task_status is not None:
            task_status.started()
        attempt = 0
        while True:
            await trio.sleep(max(0.0, self._current.renew_at - self._clock()))
            try:
                await trio.to_thread.run_sync(self.renew)
                attempt = 0
            except Exception as exc:  # noqa: BLE001
                self._note_failure(exc)
                await trio.sleep(self._retry_delay(attempt))
                attempt += 1

    def _note_failure(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = exc
        log.warning("certificate renewal for %s failed: %s", self.spiffe_id, exc)

