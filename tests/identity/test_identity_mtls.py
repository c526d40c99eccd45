"""Mesh mTLS with real peers: ``openssl s_client`` against our server context, and our client
context against ``openssl s_server``. What must be refused is refused inside the handshake."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from idhelpers import API, WEB, Cred, issue, s_client, write_cred

from tracemesh.collector._ca import MeshCA
from tracemesh.identity import (
    CredentialError,
    PeerIdentityError,
    SpiffeId,
    authenticate_peer,
    client_context,
    generate_key,
    private_key_pem,
    server_context,
)


def self_signed(openssl, tmp_path, sid: SpiffeId) -> Cred:
    """A self-signed certificate carrying a mesh identity, made with openssl."""
    d = tmp_path / "creds"
    d.mkdir(exist_ok=True)
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(d / "ss.key"), "-out", str(d / "ss.pem"), "-days", "1", "-subj", "/CN=impostor",
                    "-addext", f"subjectAltName=URI:{sid}"], check=True, capture_output=True)
    return Cred((d / "ss.key").read_bytes(), (d / "ss.pem").read_bytes(), d / "ss.key", d / "ss.pem")


def signed_by_root_for_other_domain(ca: MeshCA, tmp_path) -> Cred:
    """What a CA bug or a stolen signing path could produce: our root's signature on an identity of
    another trust domain. The root's name constraint must make the handshake refuse it."""
    root = ca._signer().root
    key = generate_key()
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/web")]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()), critical=False)
            .sign(ca._signer_key, hashes.SHA256()))
    return write_cred(tmp_path / "creds", "evil", private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def server_cred(ca, tmp_path) -> Cred:
    return issue(ca, API, tmp_path)


@pytest.fixture
def mesh_server(ca, server_cred, tls_server):
    return tls_server(server_context(server_cred.chain_pem, server_cred.key_pem, ca.bundle_pem()))


# -- our server, openssl s_client as the client -----------------------------------------------------


def test_proper_client_is_accepted_with_tls13_and_h2(ca, tmp_path, openssl, bundle_file, mesh_server):
    cred = issue(ca, WEB, tmp_path)
    out = s_client(openssl, mesh_server.port, bundle=bundle_file, cred=cred)
    assert mesh_server.next_outcome() == ("ok", str(WEB), "h2", "TLSv1.3")
    assert b"ok spiffe://cluster.local/ns/default/sa/web" in out.stdout
    assert b"ALPN protocol: h2" in out.stdout
    assert b"Verify return code: 0 (ok)" in out.stdout  # s_client verified our server by the bundle too


def test_tls12_is_still_accepted(ca, tmp_path, openssl, bundle_file, mesh_server):
    cred = issue(ca, WEB, tmp_path)
    s_client(openssl, mesh_server.port, bundle=bundle_file, cred=cred, extra=("-tls1_2", "-alpn", "http/1.1"))
    assert mesh_server.next_outcome() == ("ok", str(WEB), "http/1.1", "TLSv1.2")


def test_client_without_certificate_is_refused(openssl, bundle_file, mesh_server):
    out = s_client(openssl, mesh_server.port, bundle=bundle_file)
    verdict, reason = mesh_server.next_outcome()
    assert verdict == "refused" and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason
    assert b"ok spiffe" not in out.stdout


def test_self_signed_client_is_refused(openssl, tmp_path, bundle_file, mesh_server):
    out = s_client(openssl, mesh_server.port, bundle=bundle_file, cred=self_signed(openssl, tmp_path, WEB))
    verdict, reason = mesh_server.next_outcome()
    assert verdict == "refused" and "self-signed certificate" in reason, reason
    assert b"ok spiffe" not in out.stdout


def test_client_from_another_trust_domain_is_refused(openssl, tmp_path, bundle_file, mesh_server):
    other = MeshCA.init(tmp_path / "other-ca", trust_domain="other.example")
    cred = issue(other, SpiffeId.workload("default", "web", "other.example"), tmp_path, name="other")
    out = s_client(openssl, mesh_server.port, bundle=bundle_file, cred=cred)
    verdict, reason = mesh_server.next_outcome()
    assert verdict == "refused" and "unable to get local issuer certificate" in reason, reason
    assert b"ok spiffe" not in out.stdout


def test_other_trust_domain_under_our_root_fails_the_name_constraint(ca, openssl, tmp_path, bundle_file,
                                                                      mesh_server):
    out = s_client(openssl, mesh_server.port, bundle=bundle_file, cred=signed_by_root_for_other_domain(ca, tmp_path))
    verdict, reason = mesh_server.next_outcome()
    assert verdict == "refused" and "permitted subtree violation" in reason
    assert b"ok spiffe" not in out.stdout


def test_expired_client_is_refused(ca, openssl, tmp_path, bundle_file, mesh_server):
    past = datetime.now(timezone.utc) - timedelta(days=2)
    cred = issue(ca, WEB, tmp_path, ttl=timedelta(hours=1), _now=past)
    out = s_client(openssl, mesh_server.port, bundle=bundle_file, cred=cred)
    verdict, reason = mesh_server.next_outcome()
    assert verdict == "refused" and "certificate has expired" in reason
    assert b"ok spiffe" not in out.stdout


def test_federated_peer_passes_the_chain_but_not_the_trust_domain_check(ca, tmp_path, openssl, server_cred,
                                                                        tls_server):
    """A bundle holding a second trust domain's root (federation) lets its workloads through the
    handshake; authenticate_peer is what keeps them out of this trust domain."""
    other = MeshCA.init(tmp_path / "other-ca", trust_domain="other.example")
    bundle = ca.bundle_pem() + other.bundle_pem()
    (tmp_path / "fed.pem").write_bytes(bundle)
    server = tls_server(server_context(server_cred.chain_pem, server_cred.key_pem, bundle),
                        on_accept=lambda tls: authenticate_peer(tls, "cluster.local"))
    cred = issue(other, SpiffeId.workload("default", "web", "other.example"), tmp_path, name="other")
    s_client(openssl, server.port, bundle=tmp_path / "fed.pem", cred=cred)
    verdict, reason = server.next_outcome()
    assert verdict == "refused" and reason.startswith("PeerIdentityError") and "other.example" in reason
    s_client(openssl, server.port, bundle=tmp_path / "fed.pem", cred=issue(ca, WEB, tmp_path))
    assert server.next_outcome()[:2] == ("ok", str(WEB))


# -- our client, openssl s_server as the server ---------------------------------------------------


class SServer:
    """``openssl s_server`` requiring and verifying a client certificate against the bundle."""

    def __init__(self, openssl, cred: Cred, bundle) -> None:
        self.proc = subprocess.Popen(
            [openssl, "s_server", "-accept", "127.0.0.1:0", "-cert", str(cred.chain_file), "-key", str(cred.key_file),
             "-CAfile", str(bundle), "-Verify", "1", "-verify_return_error", "-alpn", "h2,http/1.1", "-naccept", "1"],
            # stdin stays open: s_server shuts down at end of its input.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while True:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError("s_server exited before listening")
            m = re.match(r"ACCEPT .*:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def s_server(openssl):
    servers: list[SServer] = []

    def start(cred, bundle) -> SServer:
        s = SServer(openssl, cred, bundle)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def connect(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def test_client_context_verifies_the_server_by_spiffe_id(ca, tmp_path, bundle_file, server_cred, s_server):
    server = s_server(server_cred, bundle_file)
    me = issue(ca, WEB, tmp_path)
    with connect(client_context(me.chain_pem, me.key_pem, ca.bundle_pem()), server.port) as tls:
        assert authenticate_peer(tls, "cluster.local") == API
        assert tls.selected_alpn_protocol() == "h2"
        assert tls.version() == "TLSv1.3"
        with pytest.raises(PeerIdentityError, match="not in the trust domain"):
            authenticate_peer(tls, "other.example")


@pytest.mark.parametrize("bad", ["self-signed", "other-domain", "expired"])
def test_client_context_refuses_bad_servers(ca, tmp_path, openssl, bundle_file, s_server, bad):
    if bad == "self-signed":
        cred = self_signed(openssl, tmp_path, API)
    elif bad == "other-domain":
        other = MeshCA.init(tmp_path / "other-ca", trust_domain="other.example")
        cred = issue(other, SpiffeId.workload("default", "api", "other.example"), tmp_path, name="other")
    else:
        cred = issue(ca, API, tmp_path, ttl=timedelta(hours=1), _now=datetime.now(timezone.utc) - timedelta(days=2))
    server = s_server(cred, bundle_file)
    me = issue(ca, WEB, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(client_context(me.chain_pem, me.key_pem, ca.bundle_pem()), server.port)


def test_contexts_refuse_unusable_material(ca, tmp_path):
    cred = issue(ca, WEB, tmp_path)
    with pytest.raises(CredentialError, match="unusable"):
        server_context(cred.chain_pem, private_key_pem(generate_key()), ca.bundle_pem())
    with pytest.raises(CredentialError, match="bundle"):
        client_context(cred.chain_pem, cred.key_pem, b"")
    ctx = server_context(cred.chain_pem, cred.key_pem, ca.bundle_pem())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
