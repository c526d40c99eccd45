"""The mesh CA: a root (made here or the operator's), join tokens, X.509-SVIDs for workload CSRs,
and root rotation with an overlap.

Everything lives in one directory (the CA dir), so the ``tracemesh`` commands of an operator and
a running collector share it; the collector notices changes (a rotation, new tokens) on its next
call without a restart::

    state.json          trust domain, workload TTL, the authorities and which one signs
    bundle.pem          the trust bundle: every root currently trusted (public; give it to sidecars)
    tokens.json         join tokens, sha256-hashed, with identity, expiry, uses left (0600)
    authorities/<id>.cert.pem   a signing CA certificate, then its issuers up to the root
    authorities/<id>.key.pem    its private key (0600; the CA refuses to start otherwise)
    authorities/<id>.cross.pem  during a rotation: the new root, cross-signed by the old one
    .lock               flock(2) serialising writers across processes

Every file is replaced atomically (written beside, fsynced, renamed), and ``state.json`` is
written last, so a reader sees either the old or the new CA, never a mix.

**Root rotation** (``rotate`` then ``finish_rotation``): a new root is made and signs from then
on; the old root stays in the bundle. Certificates from the new root carry, in their chain, the
new root cross-signed by the old one, so a peer that has not yet fetched the new bundle still
verifies them (leaf -> cross-signed new root -> old root), while a peer with the new bundle stops
at the new root. Once every workload has renewed (one workload TTL after the rotation at least)
``finish_rotation`` drops the old root from the bundle, and its key is deleted.

Public surface: :class:`MeshCA`, :class:`CaError`, :class:`IssueRefused`, :class:`TokenRefused`,
:class:`CaStatus`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tracemesh._fs import write_atomic
from tracemesh.identity import (
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TTL,
    SpiffeId,
    SpiffeIdError,
    cert_fingerprint,
)

#: A root outlives many workload rotations, and its expiry is the mesh's "doomsday" if nobody
#: rotates it: ten years, with ``ca status`` warning well before.
DEFAULT_ROOT_TTL = timedelta(days=3650)
#: notBefore is set this far in the past, so a peer whose clock is a little behind the CA's does
#: not see a certificate from the future.
CLOCK_SKEW_BACKDATE = timedelta(minutes=5)
DEFAULT_TOKEN_TTL = timedelta(hours=1)
#: A used-up or expired token is kept this long so that a second use is told "already used"
#: rather than "unknown"; then it is pruned.
TOKEN_KEEP_AFTER_END = timedelta(days=1)
#: Warn in ``ca status`` when the signing CA expires within this.
EXPIRY_WARNING = timedelta(days=90)
MIN_RSA_BITS = 2048
#: Above this, an RSA CSR is refused: verifying it would cost the CA seconds of CPU.
MAX_RSA_BITS = 8192
#: A CSR is a few hundred bytes; bound what we parse.
MAX_CSR_BYTES = 16 * 1024
MAX_TOKEN_USES = 1_000_000
TOKEN_PREFIX = "tmj."

_STATE = "state.json"
_BUNDLE = "bundle.pem"
_TOKENS = "tokens.json"
_LOCK = ".lock"
_AUTH_DIR = "authorities"


class CaError(Exception):
    """The CA itself is unusable or misused locally: files, permissions, configuration."""


class KeyPermissionError(CaError):
    """A private key file is readable or writable by someone other than its owner."""


class IssueRefused(Exception):
    """A certificate request is refused: the requester's fault (bad CSR, wrong identity, token)."""


class TokenRefused(IssueRefused):
    """The join token is unknown, expired, used up, or bound to another identity."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).isoformat()


def _from_iso(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# -- files -----------------------------------------------------------------------------------------


def check_private_file(path: Path) -> None:
    """Refuse a secret file that group or others may read or write (``chmod 600`` fixes it)."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise CaError(f"{path} is missing") from exc
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: a private key must be readable by its "
            f"owner only; run `chmod 600 {path}` after checking who may have read it")


# -- certificate building --------------------------------------------------------------------------


def _check_key_type(key, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1)):
            raise CaError(f"{what}: ECDSA keys must be P-256 or P-384, got {key.curve.name}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CaError(f"{what}: RSA keys must have {MIN_RSA_BITS} bits at least, got {key.key_size}")
    else:
        raise CaError(f"{what}: the CA signs with ECDSA or RSA keys, got {type(key).__name__}")


def _sign_hash(key):
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384 \
        else hashes.SHA256()


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(issuer))


def _name_constraints(trust_domain: str) -> x509.NameConstraints:
    # RFC 5280 4.2.1.10: a URI constraint is a host; OpenSSL compares it with the host part of
    # every URI SAN below this CA, so spiffe://other.domain/... fails the handshake.
    return x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                                excluded_subtrees=None)


def _ca_extensions(builder: x509.CertificateBuilder, public_key, trust_domain: str,
                   path_length: int) -> x509.CertificateBuilder:
    return (builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_name_constraints(trust_domain), critical=True))


def make_root(trust_domain: str, ttl: timedelta = DEFAULT_ROOT_TTL, now: datetime | None = None):
    """A self-signed root: ECDSA P-256, CA:true pathlen 1 (room for one intermediate, such as a
    per-cluster issuer, below it), keyCertSign|cRLSign, URI name constraint to the trust domain.
    Returns ``(certificate, private_key)``."""
    now = now or _utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tracemesh"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
        # A distinct name per root keeps chain building unambiguous while two roots overlap.
        x509.NameAttribute(NameOID.COMMON_NAME, f"tracemesh root {now:%Y-%m-%d} {secrets.token_hex(4)}"),
    ])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW_BACKDATE).not_valid_after(now + ttl))
    builder = _ca_extensions(builder, key.public_key(), trust_domain, path_length=1)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def _cross_sign(new_root: x509.Certificate, old_cert: x509.Certificate, old_key, trust_domain: str,
                now: datetime) -> x509.Certificate:
    """The new root's name and key, issued by the old root: the bridge for peers that still
    trust only the old root. pathlen 0: it may sign workload certificates and nothing more."""
    not_after = min(new_root.not_valid_after_utc, old_cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder().subject_name(new_root.subject).issuer_name(old_cert.subject)
               .public_key(new_root.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW_BACKDATE).not_valid_after(not_after))
    builder = _ca_extensions(builder, new_root.public_key(), trust_domain, path_length=0)
    builder = builder.add_extension(_aki_for(old_cert), critical=False)
    return builder.sign(old_key, _sign_hash(old_key))


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _validate_ca_import(certs: list[x509.Certificate], key, trust_domain: str, now: datetime) -> None:
    """An operator's root or intermediate must be a usable CA for this trust domain."""
    signer = certs[0]
    _check_key_type(signer.public_key(), "the CA certificate")
    if key.public_key() != signer.public_key():
        raise CaError("the CA key does not belong to the CA certificate (the first one in the file)")
    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaError("the CA certificate is not a CA (basicConstraints CA:TRUE is missing)")
    try:
        ku = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CaError("the CA certificate may not sign certificates (keyUsage lacks keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    try:
        nc = signer.extensions.get_extension_for_class(x509.NameConstraints).value
        uris = [g.value for g in (nc.permitted_subtrees or []) if isinstance(g, x509.UniformResourceIdentifier)]
        if uris and not any(u == trust_domain or (u.startswith(".") and trust_domain.endswith(u))
                            for u in uris):
            raise CaError(f"the CA certificate's name constraints do not permit the trust domain {trust_domain}")
    except x509.ExtensionNotFound:
        pass
    for cert in certs:
        if cert.not_valid_after_utc <= now:
            raise CaError(f"certificate {cert.subject.rfc4514_string()} expired on {cert.not_valid_after_utc}")
    for child, parent in zip(certs, certs[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CaError(f"{child.subject.rfc4514_string()} is not issued by the next certificate "
                          f"in the file, {parent.subject.rfc4514_string()}") from exc
    if not _self_signed(certs[-1]):
        raise CaError("the CA certificate file must end with the self-signed root: put the issuers of "
                      "an intermediate after it, up to and including the root")


# -- state -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A signing CA of this mesh: its certificate (then issuers up to a root) and key file."""

    id: str
    certs: tuple[x509.Certificate, ...]
    key_file: Path | None  # None once its rotation is finished
    added_at: datetime
    retiring_since: datetime | None  # set when a newer authority took over signing
    retire_after: datetime | None  # the old root leaves the bundle at this time, if set
    cross: x509.Certificate | None  # the next authority's root cross-signed by this one

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]

    def trusted(self, now: datetime) -> bool:
        return self.retire_after is None or now < self.retire_after


@dataclass(frozen=True)
class AuthorityStatus:
    id: str
    role: str  # "signing" or "retiring"
    subject: str
    root_subject: str
    fingerprint: str  # SHA-256 of the root certificate (the bundle entry)
    not_before: datetime
    not_after: datetime
    retire_after: datetime | None
    in_bundle: bool


@dataclass(frozen=True)
class CaStatus:
    directory: Path
    trust_domain: str
    workload_ttl: timedelta
    authorities: tuple[AuthorityStatus, ...]
    tokens_active: int
    tokens_used: int
    tokens_expired: int
    warnings: tuple[str, ...]


class MeshCA:
    """The mesh certificate authority over one CA directory.

    Safe to share between threads; several processes may use the same directory (the collector
    issuing, an operator's ``tracemesh token create`` or ``ca rotate``): writers take an
    exclusive ``flock`` and every call re-reads what another process changed.
    """

    def __init__(self, directory: Path) -> None:
        """Use :meth:`open` or :meth:`init`."""
        self.dir = Path(directory)
        self._mutex = threading.RLock()
        self._stamp: tuple[int, int] | None = None
        self.trust_domain = DEFAULT_TRUST_DOMAIN
        self.workload_ttl = DEFAULT_WORKLOAD_TTL
        self._authorities: list[Authority] = []
        self._signer_id = ""
        self._signer_key = None

    # -- creation and loading --

    @classmethod
    def init(cls, directory: str | os.PathLike, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
             root_ttl: timedelta = DEFAULT_ROOT_TTL, workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL,
             ca_cert_pem: bytes | None = None, ca_key_pem: bytes | None = None) -> MeshCA:
        """Create a CA directory with a new root, or with the operator's root or intermediate
        (``ca_cert_pem``: the CA certificate, then its issuers up to the self-signed root;
        ``ca_key_pem``: its unencrypted key). Refuses a directory that already holds a CA."""
        SpiffeId(trust_domain)  # validates the trust domain
        if workload_ttl <= timedelta(0):
            raise CaError("the workload certificate lifetime must be positive")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = cls(directory)
        with ca._locked():
            if (directory / _STATE).exists():
                raise CaError(f"{directory} already holds a CA (state.json); use `tracemesh ca status`")
            authority = ca._new_authority(trust_domain, root_ttl, ca_cert_pem, ca_key_pem, _utcnow())
            ca.trust_domain, ca.workload_ttl = trust_domain, workload_ttl
            ca._authorities, ca._signer_id = [authority], authority.id
            ca._save()
            if not (directory / _TOKENS).exists():
                write_atomic(directory / _TOKENS, _dump_tokens({}), 0o600)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> MeshCA:
        """Load a CA directory; :class:`KeyPermissionError` if a key or the token file is not
        private to its owner."""
        ca = cls(Path(directory))
        if not (ca.dir / _STATE).exists():
            raise CaError(f"{ca.dir} holds no CA: run `tracemesh ca init --dir {ca.dir}` first")
        ca._reload()
        return ca

    def _new_authority(self, trust_domain: str, root_ttl: timedelta, cert_pem: bytes | None,
                       key_pem: bytes | None, now: datetime) -> Authority:
        if (cert_pem is None) != (key_pem is None):
            raise CaError("an imported CA needs both its certificate and its key")
        if cert_pem is None:
            cert, key = make_root(trust_domain, root_ttl, now)
            certs = [cert]
        else:
            try:
                certs = x509.load_pem_x509_certificates(cert_pem)
            except ValueError as exc:
                raise CaError(f"the CA certificate file holds no valid PEM certificate: {exc}") from exc
            try:
                key = serialization.load_pem_private_key(key_pem, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise CaError(f"the CA key is not an unencrypted PEM private key: {exc}") from exc
            _validate_ca_import(certs, key, trust_domain, now)
        auth_id = certs[0].fingerprint(hashes.SHA256()).hex()[:16]
        adir = self.dir / _AUTH_DIR
        adir.mkdir(mode=0o700, exist_ok=True)
        key_file = adir / f"{auth_id}.key.pem"
        if key_file.exists():
            raise CaError(f"this CA certificate is already in use here ({key_file})")
        write_atomic(key_file, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
        write_atomic(adir / f"{auth_id}.cert.pem",
                      b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644)
        return Authority(auth_id, tuple(certs), key_file, now, None, None, None)

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive across threads (mutex) and processes (flock on the CA dir's lock file)."""
        with self._mutex:
            fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _state_stamp(self) -> tuple[int, int]:
        st = (self.dir / _STATE).stat()
        return st.st_ino, st.st_mtime_ns

    def _maybe_reload(self) -> None:
        with self._mutex:
            if self._stamp != self._state_stamp():
                self._reload()

    def _reload(self) -> None:
        with self._mutex:
            stamp = self._state_stamp()
            state = json.loads((self.dir / _STATE).read_text())
            if state.get("version") != 1:
                raise CaError(f"{self.dir / _STATE}: unknown state version {state.get('version')!r}")
            authorities = []
            for a in state["authorities"]:
                key_file = self.dir / a["key"] if a.get("key") else None
                if key_file is not None:
                    check_private_file(key_file)
                cross = None
                if a.get("cross"):
                    cross = x509.load_pem_x509_certificate((self.dir / a["cross"]).read_bytes())
                authorities.append(Authority(
                    a["id"], tuple(x509.load_pem_x509_certificates((self.dir / a["cert"]).read_bytes())),
                    key_file, _from_iso(a["added_at"]), _from_iso(a.get("retiring_since")),
                    _from_iso(a.get("retire_after")), cross))
            signer = next((a for a in authorities if a.id == state["signer"]), None)
            if signer is None or signer.key_file is None:
                raise CaError(f"{self.dir / _STATE}: the signing authority {state['signer']} is missing")
            tokens = self.dir / _TOKENS
            if tokens.exists():
                check_private_file(tokens)
            key = serialization.load_pem_private_key(signer.key_file.read_bytes(), password=None)
            self.trust_domain = state["trust_domain"]
            self.workload_ttl = timedelta(seconds=state["workload_ttl_seconds"])
            self._authorities, self._signer_id, self._signer_key = authorities, signer.id, key
            self._stamp = stamp

    def _save(self) -> None:
        """Write bundle.pem then state.json (last: it names the files). Caller holds the lock."""
        rel = lambda p: str(p.relative_to(self.dir))  # noqa: E731
        entries = []
        for a in self._authorities:
            cross_rel = None
            if a.cross is not None:
                cross_path = self.dir / _AUTH_DIR / f"{a.id}.cross.pem"
                if not cross_path.exists():
                    write_atomic(cross_path, a.cross.public_bytes(serialization.Encoding.PEM), 0o644)
                cross_rel = rel(cross_path)
            entries.append({
                "id": a.id, "cert": f"{_AUTH_DIR}/{a.id}.cert.pem",
                "key": rel(a.key_file) if a.key_file else None, "cross": cross_rel,
                "added_at": _iso(a.added_at), "retiring_since": _iso(a.retiring_since),
                "retire_after": _iso(a.retire_after)})
        state = {"version": 1, "trust_domain": self.trust_domain,
                 "workload_ttl_seconds": int(self.workload_ttl.total_seconds()),
                 "signer": self._signer_id, "authorities": entries}
        write_atomic(self.dir / _BUNDLE, self._bundle(_utcnow()), 0o644)
        write_atomic(self.dir / _STATE, (json.dumps(state, indent=2) + "\n").encode(), 0o644)
        self._stamp = self._state_stamp()

    # -- the trust bundle --

    def _signer(self) -> Authority:
        return next(a for a in self._authorities if a.id == self._signer_id)

    def _bundle(self, now: datetime) -> bytes:
        roots: list[x509.Certificate] = []
        for a in sorted(self._authorities, key=lambda a: a.id != self._signer_id):  # signer first
            if a.trusted(now) and a.root not in roots:
                roots.append(a.root)
        return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)

    def bundle_pem(self, now: datetime | None = None) -> bytes:
        """Every root trusted now (a retiring root drops out once its ``retire_after`` passes)."""
        self._maybe_reload()
        with self._mutex:
            return self._bundle(now or _utcnow())

    @property
    def bundle_path(self) -> Path:
        """``bundle.pem``, rewritten on every change. It is not rewritten when a scheduled
        ``retire_after`` passes: :meth:`bundle_pem` is the live answer."""
        return self.dir / _BUNDLE

    # -- join tokens --

    def create_token(self, identity: SpiffeId | str, *, ttl: timedelta = DEFAULT_TOKEN_TTL,
                     uses: int = 1, now: datetime | None = None) -> str:
        """A new join token bound to ``identity`` (a workload ID in this trust domain), valid for
        ``ttl`` and ``uses`` CSRs. Only its SHA-256 is stored; the token itself is returned once."""
        self._maybe_reload()
        sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
        if sid.trust_domain != self.trust_domain:
            raise CaError(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        if not sid.is_workload:
            raise CaError(f"{sid} is not a workload identity spiffe://{self.trust_domain}/ns/<ns>/sa/<sa>")
        if ttl <= timedelta(0):
            raise CaError("a token's lifetime must be positive")
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise CaError(f"a token's uses must be between 1 and {MAX_TOKEN_USES}")
        now = now or _utcnow()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            tokens = self._load_tokens()
            _prune(tokens, now)
            tokens[_token_hash(token)] = {"identity": str(sid), "created_at": _iso(now),
                                          "expires_at": _iso(now + ttl), "uses": uses, "uses_left": uses}
            write_atomic(self.dir / _TOKENS, _dump_tokens(tokens), 0o600)
        return token

    def _load_tokens(self) -> dict:
        path = self.dir / _TOKENS
        if not path.exists():
            return {}
        check_private_file(path)
        data = json.loads(path.read_text())
        return data.get("tokens", {})

    def _consume_token(self, token: str, sid: SpiffeId, now: datetime) -> None:
        """Check the token against ``sid`` and use it up by one, atomically; a refused token is
        left as it was."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            raise TokenRefused("unknown join token")
        with self._locked():
            tokens = self._load_tokens()
            entry = tokens.get(_token_hash(token))
            if entry is None:
                raise TokenRefused("unknown join token")
            if now >= _from_iso(entry["expires_at"]):
                raise TokenRefused(f"join token expired at {entry['expires_at']}")
            if entry["uses_left"] <= 0:
                raise TokenRefused("join token already used")
            if entry["identity"] != str(sid):
                raise TokenRefused(f"the CSR asks for {sid}, but the join token is for {entry['identity']}")
            entry["uses_left"] -= 1
            if entry["uses_left"] == 0:
                entry["used_up_at"] = _iso(now)
            _prune(tokens, now)
            write_atomic(self.dir / _TOKENS, _dump_tokens(tokens), 0o600)

    # -- issuing --

    def issue(self, csr_pem: bytes | str, token: str, *, ttl: timedelta | None = None,
              _now: datetime | None = None) -> bytes:
        """Sign a workload CSR authenticated by a join token; return the certificate chain PEM
        (the leaf, then any intermediates and, during a root rotation, the new root cross-signed
        by the old one; never the root itself, which peers take from the bundle).

        The CSR must be validly self-signed, hold an ECDSA P-256 or RSA (2048 to 8192 bits) key,
        and carry exactly one subject alternative name: a URI that is a SPIFFE ID in this trust
        domain and equal to the token's identity. The token is used up by one only when all of
        that holds. :class:`IssueRefused` / :class:`TokenRefused` otherwise.

        ``ttl`` overrides the configured workload lifetime. ``_now`` (tests only) pretends the
        certificate is issued at another time, e.g. in the past to get an expired certificate.
        """
        now = _utcnow()
        public_key, sid = self._check_csr(csr_pem)
        self._consume_token(token, sid, now)
        return self._issue_for(public_key, sid, ttl, _now or now)

    def renew(self, csr_pem: bytes | str, peer: SpiffeId, *, ttl: timedelta | None = None) -> bytes:
        """Sign a CSR for ``peer``, a workload already holding a certificate from this CA.

        ``peer`` must come from an mTLS handshake verified against :meth:`bundle_pem`
        (:func:`tracemesh.identity.authenticate_peer`): the handshake is the proof that the
        caller holds the current key. No token is used.
        """
        public_key, sid = self._check_csr(csr_pem)
        if sid != peer:
            raise IssueRefused(f"the CSR asks for {sid}, but the caller is {peer}")
        return self._issue_for(public_key, sid, ttl, _utcnow())

    def _check_csr(self, csr_pem: bytes | str):
        self._maybe_reload()
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(data) > MAX_CSR_BYTES:
            raise IssueRefused(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise IssueRefused(f"not a PEM certificate signing request: {exc}") from exc
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IssueRefused(f"the CSR's public key is unusable: {exc}") from exc
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1):
                raise IssueRefused(f"workload keys must be ECDSA P-256, got {public_key.curve.name}")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
                raise IssueRefused(f"RSA workload keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, "
                                   f"got {public_key.key_size}")
        else:
            raise IssueRefused(f"workload keys must be ECDSA P-256 or RSA, got {type(public_key).__name__}")
        try:
            valid = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IssueRefused(f"the CSR's signature cannot be checked: {exc}") from exc
        if not valid:
            raise IssueRefused("the CSR's signature is invalid")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise IssueRefused("the CSR has no subject alternative name; it needs one URI SAN") from None
        except ValueError as exc:  # a malformed or duplicated extension
            raise IssueRefused(f"the CSR's extensions are malformed: {exc}") from exc
        names = list(san)
        uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
        if len(uris) != 1 or len(names) != 1:
            raise IssueRefused(f"the CSR must carry exactly one subject alternative name, a URI; "
                               f"it has {len(uris)} URI and {len(names) - len(uris)} other names")
        try:
            sid = SpiffeId.parse(uris[0])
        except SpiffeIdError as exc:
            raise IssueRefused(f"the CSR's URI SAN {uris[0]!r} is not a SPIFFE ID: {exc}") from exc
        if sid.trust_domain != self.trust_domain:
            raise IssueRefused(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        return public_key, sid

    def _issue_for(self, public_key, sid: SpiffeId, ttl: timedelta | None, now: datetime) -> bytes:
        ttl = self.workload_ttl if ttl is None else ttl
        if ttl <= timedelta(0):
            raise CaError("a certificate lifetime must be positive")
        with self._mutex:
            signer, key = self._signer(), self._signer_key
            chain = [c for c in signer.certs if not _self_signed(c)]
            if signer.certs and _self_signed(signer.certs[0]):
                # Issued by a root: during a rotation, bridge to the roots that still overlap.
                chain += [a.cross for a in self._authorities
                          if a.cross is not None and a.id != signer.id and a.trusted(now)
                          and a.cross.public_key() == signer.certs[0].public_key()]
            issuer = signer.certs[0]
        # A leaf never outlives its issuer: the signer's expiry caps it.
        not_after = min(now + ttl, issuer.not_valid_after_utc)
        # keyEncipherment only for RSA: RFC 5480 3 does not allow it with an EC key.
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(issuer.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW_BACKDATE)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=is_rsa, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                # Empty subject, so the SAN is critical (RFC 5280 4.2.1.6).
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(_aki_for(issuer), critical=False)
                .sign(key, _sign_hash(key)))
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain])

    # -- root rotation --

    def rotate(self, *, root_ttl: timedelta = DEFAULT_ROOT_TTL, retire_after: datetime | None = None,
               ca_cert_pem: bytes | None = None, ca_key_pem: bytes | None = None, force: bool = False,
               now: datetime | None = None) -> str:
        """Start a root rotation: a new root (or the operator's new CA) signs from now on; the old
        root stays in the bundle until :meth:`finish_rotation` or until ``retire_after``.

        ``retire_after`` earlier than one workload lifetime from now would drop the old root
        while certificates it issued are still in use; refused unless ``force``. Returns the new
        authority's id. :class:`CaError` if a rotation is already in progress.
        """
        now = now or _utcnow()
        with self._locked():
            self._reload()
            if len(self._authorities) > 1:
                raise CaError("a root rotation is already in progress: finish it first "
                              "(`tracemesh ca rotate --finish`)")
            if retire_after is not None and retire_after < now + self.workload_ttl and not force:
                raise CaError(f"the old root would leave the bundle at {_iso(retire_after)}, before the "
                              f"certificates it issued expire (workload lifetime {self.workload_ttl}); "
                              f"pass --force to do it anyway")
            old = self._signer()
            new = self._new_authority(self.trust_domain, root_ttl, ca_cert_pem, ca_key_pem, now)
            cross = None
            if len(new.certs) == 1 and len(old.certs) == 1:  # both self-signed roots
                cross = _cross_sign(new.root, old.root, self._signer_key, self.trust_domain, now)
            old = Authority(old.id, old.certs, old.key_file, old.added_at, now, retire_after, cross)
            self._authorities = [old, new]
            self._signer_id = new.id
            self._signer_key = serialization.load_pem_private_key(new.key_file.read_bytes(), password=None)
            self._save()
        return new.id

    def finish_rotation(self, *, force: bool = False, now: datetime | None = None) -> list[str]:
        """End a rotation: drop the retiring roots from the bundle and delete their keys.

        Certificates the old root issued stop verifying everywhere the new bundle arrives, so
        this is refused less than one workload lifetime after :meth:`rotate` unless ``force``.
        Returns the ids removed (none if no rotation is in progress).
        """
        now = now or _utcnow()
        with self._locked():
            self._reload()
            retiring = [a for a in self._authorities if a.id != self._signer_id]
            for a in retiring:
                safe_at = (a.retiring_since or now) + self.workload_ttl
                if now < safe_at and not force:
                    raise CaError(f"certificates from the old root may be in use until {_iso(safe_at)} "
                                  f"(one workload lifetime after the rotation); pass --force to finish now")
            for a in retiring:
                if a.key_file is not None:
                    a.key_file.unlink(missing_ok=True)
            self._authorities = [a for a in self._authorities if a.id == self._signer_id]
            self._save()
        return [a.id for a in retiring]

    # -- status --

    def status(self, now: datetime | None = None) -> CaStatus:
        now = now or _utcnow()
        self._maybe_reload()
        with self._mutex:
            authorities = tuple(AuthorityStatus(
                id=a.id, role="signing" if a.id == self._signer_id else "retiring",
                subject=a.certs[0].subject.rfc4514_string(), root_subject=a.root.subject.rfc4514_string(),
                fingerprint=cert_fingerprint(a.root), not_before=a.root.not_valid_before_utc,
                not_after=min(c.not_valid_after_utc for c in a.certs), retire_after=a.retire_after,
                in_bundle=a.trusted(now)) for a in self._authorities)
        with self._locked():
            tokens = self._load_tokens()
        active = used = expired = 0
        for t in tokens.values():
            if t["uses_left"] <= 0:
                used += 1
            elif now >= _from_iso(t["expires_at"]):
                expired += 1
            else:
                active += 1
        warnings = []
        signer = next(a for a in authorities if a.role == "signing")
        if signer.not_after - now < EXPIRY_WARNING:
            warnings.append(f"the signing CA expires on {_iso(signer.not_after)}: rotate it "
                            f"(`tracemesh ca rotate`) well before then")
        if signer.not_after - now < self.workload_ttl:
            warnings.append("workload certificates are cut short by the signing CA's expiry")
        for a in authorities:
            if a.role == "retiring" and a.in_bundle:
                warnings.append(f"root rotation in progress: the old root {a.id} stays trusted until "
                                + (_iso(a.retire_after) if a.retire_after else "`tracemesh ca rotate --finish`"))
        return CaStatus(self.dir, self.trust_domain, self.workload_ttl, authorities, active, used, expired,
                        tuple(warnings))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _dump_tokens(tokens: dict) -> bytes:
    return (json.dumps({"version": 1, "tokens": tokens}, indent=2, sort_keys=True) + "\n").encode()


def _prune(tokens: dict, now: datetime) -> None:
    """Forget tokens that ended (expired or used up) more than TOKEN_KEEP_AFTER_END ago."""
    for h, t in list(tokens.items()):
        end = _from_iso(t["expires_at"])
        if t.get("used_up_at"):
            end = min(end, _from_iso(t["used_up_at"]))
        if now >= end + TOKEN_KEEP_AFTER_END:
            del tokens[h]
