"""Helpers of the identity tests: workload credentials, openssl s_client, and a real TLS server on
loopback that reports, connection by connection, what its handshake decided."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from tracemesh.collector._ca import MeshCA
from tracemesh.identity import SpiffeId, generate_key, make_csr, private_key_pem

WEB = SpiffeId.workload("default", "web")
API = SpiffeId.workload("default", "api")


@dataclass
class Cred:
    """A workload's key and chain, in memory and as files (for openssl)."""

    key_pem: bytes
    chain_pem: bytes
    key_file: Path
    chain_file: Path


def write_cred(directory: Path, name: str, key_pem: bytes, chain_pem: bytes) -> Cred:
    directory.mkdir(parents=True, exist_ok=True)
    key_file, chain_file = directory / f"{name}.key.pem", directory / f"{name}.pem"
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    chain_file.write_bytes(chain_pem)
    return Cred(key_pem, chain_pem, key_file, chain_file)


def issue(ca: MeshCA, sid: SpiffeId, tmp_path: Path, name: str | None = None, **kw) -> Cred:
    """A credential the way a sidecar gets one: own key, CSR, join token."""
    key = generate_key()
    token = ca.create_token(sid)
    chain = ca.issue(make_csr(key, sid), token, **kw)
    return write_cred(tmp_path / "creds", name or sid.service_account, private_key_pem(key), chain)


class TLSServer:
    """A threaded TLS server over an ``SSLContext`` (swappable with :attr:`context`). Each
    connection's handshake outcome goes to :attr:`outcomes`: ``("ok", peer_spiffe_id, alpn,
    version)`` or ``("refused", reason)``; an accepted peer is sent ``ok <id>\\n``."""

    def __init__(self, context: ssl.SSLContext, on_accept=None) -> None:
        self.context = context
        self.on_accept = on_accept
        self.outcomes: queue.Queue = queue.Queue()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from tracemesh.identity import peer_spiffe_id

        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(10)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    peer = peer_spiffe_id(tls)
                    if self.on_accept is not None:
                        self.on_accept(tls)
                    self.outcomes.put(("ok", str(peer), tls.selected_alpn_protocol(), tls.version()))
                    tls.sendall(f"ok {peer}\n".encode())
                    try:
                        tls.unwrap()
                    except (OSError, ssl.SSLError):
                        pass
            except Exception as exc:  # noqa: BLE001 - every refusal is an outcome to report
                self.outcomes.put(("refused", f"{type(exc).__name__}: {exc}"))
                raw.close()

    def next_outcome(self, timeout: float = 10.0):
        return self.outcomes.get(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


def s_client(openssl: str, port: int, *, bundle: Path, cred: Cred | None = None,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``openssl s_client`` to the port, presenting ``cred`` (or no certificate), verifying the
    server against ``bundle``; it reads what the server sends until the server closes."""
    cmd = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(bundle),
           "-verify_return_error", "-alpn", "h2,http/1.1", "-ign_eof", *extra]
    if cred is not None:
        cmd += ["-cert", str(cred.chain_file), "-key", str(cred.key_file)]
        if cred.chain_pem.count(b"BEGIN CERTIFICATE") > 1:
            cmd += ["-cert_chain", str(cred.chain_file)]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
