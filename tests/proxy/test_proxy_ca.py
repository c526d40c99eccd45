"""The mesh CA over gRPC, as sidecars use it: the bootstrap door (join token, plaintext OTLP port)
called with grpcio, the renewal door (mTLS, identity from the handshake) called with the sidecar's
own client and refused to openssl without a certificate, and the errors as gRPC statuses."""

from __future__ import annotations

import json
import ssl
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from mtls_helpers import MeshCaEnv, s_client, sid

from tracemesh.collector._ca_service import PATH, collector_id, decode_response, encode_request
from tracemesh.identity import (
    RotatingCredentials,
    authenticate_peer,
    client_context,
    generate_key,
    load_pem_certs,
    make_csr,
    private_key_pem,
    spiffe_id_of,
)
from tracemesh.net import Addr
from tracemesh.proxy._mtls import CaCallError, CaClient, grpc_unary_tls


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = MeshCaEnv(tmp_path_factory.mktemp("ca-service"))
    yield e
    e.close()


def bootstrap(env: MeshCaEnv, payload: bytes) -> bytes:
    with grpc.insecure_channel(str(env.addr)) as ch:
        return ch.unary_unary(PATH, request_serializer=None, response_deserializer=None)(payload, timeout=10)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def renew(env: MeshCaEnv, ctx: ssl.SSLContext, csr: bytes) -> bytes:
    def check(tls):
        assert authenticate_peer(tls, "cluster.local") == collector_id("cluster.local")

    return grpc_unary_tls(Addr("127.0.0.1", env.renew_port), ctx, PATH, encode_request(csr), check_peer=check)


def test_bootstrap_then_renewal_over_mtls(env):
    me = sid("web")
    key = generate_key()
    answer = decode_response(bootstrap(env, encode_request(make_csr(key, me), env.ca.create_token(me))))
    leaf = load_pem_certs(answer.chain_pem)[0]
    assert spiffe_id_of(leaf) == me and leaf.public_key() == key.public_key()
    assert answer.bundle_pem == env.ca.bundle_pem() and answer.trust_domain == "cluster.local"
    assert answer.renew_port == env.renew_port
    assert datetime.fromisoformat(answer.not_after) == leaf.not_valid_after_utc

    ctx = client_context(answer.chain_pem, private_key_pem(key), answer.bundle_pem)
    key2 = generate_key()
    renewed = decode_response(renew(env, ctx, make_csr(key2, me)))
    leaf2 = load_pem_certs(renewed.chain_pem)[0]
    assert spiffe_id_of(leaf2) == me and leaf2.public_key() == key2.public_key()
    assert leaf2.serial_number != leaf.serial_number


def test_bootstrap_refusals_are_grpc_statuses(env):
    me, other = sid("web"), sid("api")
    csr = make_csr(generate_key(), me)
    used = env.ca.create_token(me)
    bootstrap(env, encode_request(csr, used))
    cases = [
        (encode_request(csr, used), grpc.StatusCode.PERMISSION_DENIED, "join token already used"),
        (encode_request(csr, env.ca.create_token(other)), grpc.StatusCode.PERMISSION_DENIED,
         f"the CSR asks for {me}, but the join token is for {other}"),
        (encode_request(csr, "tmj.not-a-token"), grpc.StatusCode.PERMISSION_DENIED, "unknown join token"),
        (encode_request(csr), grpc.StatusCode.UNAUTHENTICATED, "a join token is required"),
        (b"{not json", grpc.StatusCode.INVALID_ARGUMENT, "request is not JSON"),
        (json.dumps({"csr": "x", "token": "t", "extra": 1}).encode(), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown request field(s): extra"),
        (encode_request(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                        env.ca.create_token(me)), grpc.StatusCode.INVALID_ARGUMENT, "not a PEM certificate signing request"),
        (encode_request(make_csr(ec.generate_private_key(ec.SECP384R1()), me), env.ca.create_token(me)),
         grpc.StatusCode.INVALID_ARGUMENT, "workload keys must be ECDSA P-256"),
        (encode_request(make_csr(generate_key(), sid("web", trust_domain="other.example")), env.ca.create_token(me)),
         grpc.StatusCode.INVALID_ARGUMENT, "is not in this CA's trust domain cluster.local"),
    ]
    for payload, code, message in cases:
        got = status_of(lambda p=payload: bootstrap(env, p))
        assert got[0] == code and message in got[1], (message, got)
    # a refused CSR did not use up its token
    token = env.ca.create_token(me)
    status_of(lambda: bootstrap(env, encode_request(make_csr(ec.generate_private_key(ec.SECP384R1()), me), token)))
    bootstrap(env, encode_request(csr, token))


def test_renewal_is_for_the_callers_own_identity_only(env):
    me = sid("web")
    cred = env.cred(me)
    ctx = client_context(cred.chain_pem, cred.key_pem, env.ca.bundle_pem())
    with pytest.raises(CaCallError) as err:
        renew(env, ctx, make_csr(generate_key(), sid("admin")))
    assert err.value.code == "PERMISSION_DENIED" and f"asks for {sid('admin')}, but the caller is {me}" in str(err.value)
    with pytest.raises(CaCallError) as err:
        renew(env, ctx, b"garbage")
    assert err.value.code == "INVALID_ARGUMENT"


def test_renewal_port_refuses_callers_without_a_valid_certificate(env, openssl, tmp_path):
    out = s_client(openssl, Addr("127.0.0.1", env.renew_port), bundle=env.bundle_file, extra=("-alpn", "h2"))
    assert b"Verify return code: 0 (ok)" in out.stdout  # the CA port's own chain verifies
    assert b"ALPN protocol: h2" in out.stdout
    # ... but without a client certificate nothing gets through (the renewal needs the handshake)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=env.ca.bundle_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    with pytest.raises(CaCallError) as err:
        renew(env, ctx, make_csr(generate_key(), sid("web")))
    assert err.value.code == "UNAVAILABLE"
    # and an expired certificate is refused at the handshake too: it has to bootstrap again
    expired = env.cred(sid("web"), ttl=timedelta(hours=1), _now=datetime.now(timezone.utc) - timedelta(days=2))
    ctx = client_context(expired.chain_pem, expired.key_pem, env.ca.bundle_pem())
    with pytest.raises(CaCallError) as err:
        renew(env, ctx, make_csr(generate_key(), sid("web")))
    assert err.value.code == "UNAVAILABLE"


def test_the_sidecar_client_verifies_who_serves_the_renewal_port(env, tmp_path):
    """A workload of the mesh posing as the CA's renewal port is not believed."""
    from tracemesh.identity import server_context

    pose = env.cred(sid("evil"))
    ctx = server_context(pose.chain_pem, pose.key_pem, env.ca.bundle_pem())
    import socket
    import threading

    lsock = socket.create_server(("127.0.0.1", 0))

    def serve():
        raw, _ = lsock.accept()
        try:
            with ctx.wrap_socket(raw, server_side=True) as tls:
                tls.recv(100)
        except (OSError, ssl.SSLError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    me = sid("web")
    client = CaClient(env.addr, me, env.ca.create_token(me))
    creds = RotatingCredentials(me, client.obtain)
    client.creds = creds
    creds.renew()  # bootstrap
    client.renew_port = lsock.getsockname()[1]
    with pytest.raises(CaCallError) as err:
        creds.renew()
    assert f"presented {sid('evil')}, not {collector_id('cluster.local')}" in str(err.value)
    lsock.close()


def test_the_sidecar_client_bootstraps_once_then_renews_and_bootstraps_again_after_expiry(env):
    me = sid("web")
    now = [time.time()]
    client = CaClient(env.addr, me, env.ca.create_token(me, uses=2), clock=lambda: now[0])
    creds = RotatingCredentials(me, client.obtain)
    client.creds = creds
    creds.renew()
    creds.renew()
    creds.renew()
    assert (client.bootstraps, client.renewals, creds.generation) == (1, 2, 3)
    # asleep past the certificate's expiry: the handshake cannot be passed, the token is used again
    now[0] = creds.not_after + 10
    creds.renew()
    assert (client.bootstraps, client.renewals) == (2, 2)


def test_the_ca_ports_own_certificate_renews_itself(tmp_path):
    env = MeshCaEnv(tmp_path, workload_ttl=timedelta(seconds=2))
    try:
        cred = env.cred(sid("web"), ttl=timedelta(hours=1))
        ctx = client_context(cred.chain_pem, cred.key_pem, env.ca.bundle_pem())
        seen = set()

        def check(tls):
            seen.add(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number)
            assert authenticate_peer(tls, "cluster.local") == collector_id("cluster.local")

        for pause in (1.1, 0):
            grpc_unary_tls(Addr("127.0.0.1", env.renew_port), ctx, PATH, encode_request(make_csr(generate_key(), sid("web"))),
                           check_peer=check)
            time.sleep(pause)
        assert len(seen) == 2  # renewed at half-life, on the next handshake
    finally:
        env.close()
