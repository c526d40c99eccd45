"""Real parts for the sidecar's mTLS and authorization tests: a mesh CA served the way the
collector serves it (the renewal door on its own mTLS port, the bootstrap door beside an OTLP
receiver), workload credentials as files for curl and openssl, and the clients themselves.

Imported by the tests of this folder (pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from sidecar_harness import OTLPReceiver

from tracemesh.collector._ca import MeshCA
from tracemesh.collector._ca_service import start_ca
from tracemesh.identity import (
    SpiffeId,
    client_context,
    generate_key,
    make_csr,
    private_key_pem,
    spiffe_id_of,
)
from tracemesh.net import Addr

NS = "shop"


def sid(account: str, namespace: str = NS, trust_domain: str = "cluster.local") -> SpiffeId:
    return SpiffeId.workload(namespace, account, trust_domain)


@dataclass
class Cred:
    """A workload's key and chain, in memory and as files (curl, openssl)."""

    identity: SpiffeId
    key_pem: bytes
    chain_pem: bytes
    key_file: Path
    chain_file: Path


def write_cred(directory: Path, name: str, identity, key_pem: bytes, chain_pem: bytes) -> Cred:
    directory.mkdir(parents=True, exist_ok=True)
    key_file, chain_file = directory / f"{name}.key.pem", directory / f"{name}.pem"
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    chain_file.write_bytes(chain_pem)
    return Cred(identity, key_pem, chain_pem, key_file, chain_file)


def issue(ca: MeshCA, identity: SpiffeId, directory: Path, name: str, **kw) -> Cred:
    """A credential the way a sidecar gets one: its own key, a CSR, a join token."""
    key = generate_key()
    chain = ca.issue(make_csr(key, identity), ca.create_token(identity), **kw)
    return write_cred(directory, name, identity, private_key_pem(key), chain)


class MeshCaEnv:
    """A mesh CA as ``tracemesh collector --ca`` serves it, without the store: the same
    :func:`start_ca` for the mTLS renewal port, and its bootstrap handler on an OTLP receiver,
    which is what sidecars get as ``--collector``."""

    def __init__(self, directory: Path, workload_ttl: timedelta | None = None,
                 trust_domain: str = "cluster.local") -> None:
        self.dir = directory
        kw = {"workload_ttl": workload_ttl} if workload_ttl else {}
        self.ca = MeshCA.init(directory / "ca", trust_domain=trust_domain, **kw)
        self.service, self.server, self.renew_port = start_ca(str(directory / "ca"), "127.0.0.1:0")
        self.otlp = OTLPReceiver(handlers=(self.service.handler(renewal=False),))
        self.bundle_file = directory / "bundle.pem"
        self.bundle_file.write_bytes(self.ca.bundle_pem())
        self._n = 0

    @property
    def addr(self) -> Addr:
        return self.otlp.addr

    def token_file(self, identity: SpiffeId, **kw) -> Path:
        self._n += 1
        path = self.dir / f"token-{identity.service_account}-{self._n}"
        path.write_text(self.ca.create_token(identity, **kw) + "\n")
        path.chmod(0o600)
        return path

    def sidecar_args(self, identity: SpiffeId, mtls: str | None = None) -> tuple[str, ...]:
        args = ("--identity", str(identity), "--token-file", str(self.token_file(identity)))
        return args + (("--mtls", mtls) if mtls else ())

    def cred(self, identity: SpiffeId, name: str | None = None, **kw) -> Cred:
        self._n += 1
        return issue(self.ca, identity, self.dir / "creds", name or f"{identity.service_account}-{self._n}", **kw)

    def close(self) -> None:
        self.server.stop(None)
        self.otlp.close()


# -- clients ---------------------------------------------------------------------------------


def tls_context(cred: Cred, bundle_pem: bytes) -> ssl.SSLContext:
    """A mesh client context that offers only HTTP/1.1 (http.client speaks nothing else)."""
    ctx = client_context(cred.chain_pem, cred.key_pem, bundle_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https_get(addr: Addr, ctx: ssl.SSLContext, path: str = "/", headers: dict | None = None,
              method: str = "GET", timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(addr.host, addr.port, context=ctx, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(addr: Addr, path: str = "/", headers: dict | None = None, method: str = "GET",
             timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def curl_mtls(curl: str, addr: Addr, path: str, cred: Cred | None, bundle: Path,
              extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """curl over mTLS, in HTTP/1.1 (the sidecar would select h2 for curl's default offer, and then
    speak HTTP/2 to the app too). ``-k``: curl cannot check a SPIFFE URI as a host name, and -k
    turns off its whole server check, so :func:`s_client` is what proves the server's chain and
    identity; the sidecar checks *our* certificate either way."""
    cmd = [curl, "-sS", "-v", "-k", "--http1.1", "--cacert", str(bundle), "--max-time", "10",
           "-w", "\\n%{http_code}", f"https://{addr}{path}", *extra]
    if cred is not None:
        cmd += ["--cert", str(cred.chain_file), "--key", str(cred.key_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


def s_client(openssl: str, addr: Addr, *, bundle: Path, cred: Cred | None = None, send: bytes = b"",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``openssl s_client`` verifying the server against the bundle (``-verify_return_error``:
    a server that does not chain to it fails the handshake), presenting ``cred`` or no
    certificate; it sends ``send`` and reads until the server closes."""
    cmd = [openssl, "s_client", "-connect", str(addr), "-CAfile", str(bundle), "-verify_return_error",
           "-showcerts", "-ign_eof", *extra]
    if cred is not None:
        cmd += ["-cert", str(cred.chain_file), "-key", str(cred.key_file)]
    return subprocess.run(cmd, input=send, capture_output=True, timeout=30)


def presented_identity(s_client_stdout: bytes) -> SpiffeId:
    """The SPIFFE ID of the first certificate ``s_client -showcerts`` printed."""
    start = s_client_stdout.index(b"-----BEGIN CERTIFICATE-----")
    end = s_client_stdout.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    return spiffe_id_of(x509.load_pem_x509_certificate(s_client_stdout[start:end]))


def echo(body: bytes) -> dict:
    """The test upstream's JSON echo of the request it got."""
    return json.loads(body)


def plaintext_refused(addr: Addr, timeout: float = 5.0) -> bytes:
    """Send a plaintext request; return what came back before the close (b"" when refused)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out
