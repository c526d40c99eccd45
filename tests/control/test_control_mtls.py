"""Config distribution over mTLS on the mesh CA's port: the sidecar proves its identity, the
control plane proves the collector's; a trust bundle is pushed between renewals; the CA's
renewals keep working on the same port (now served beside the discovery stream)."""

from __future__ import annotations

import ssl
import time

import pytest
from control_harness import ControlCollector, Upstream, all_synced, control_sidecar

from tracemesh.collector._ca import MeshCA
from tracemesh.identity import (
    RotatingCredentials,
    SpiffeId,
    client_context,
    generate_key,
    load_pem_certs,
    make_csr,
    private_key_pem,
)
from tracemesh.net import Addr, free_port
from tracemesh.proxy._mtls import CaClient

pytestmark = pytest.mark.timeout(120)

TD = "cluster.local"


def ident(sa: str) -> str:
    return f"spiffe://{TD}/ns/shop/sa/{sa}"


def leaf_only_context(ca: MeshCA, identity: str) -> ssl.SSLContext:
    """A client credential issued now, presenting its leaf alone (no intermediate or cross-signed
    root that could chain it to an older root): only a peer that trusts the signing root takes it."""
    key = generate_key()
    chain = ca.issue(make_csr(key, identity), ca.create_token(identity))
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = load_pem_certs(chain)[0].public_bytes(Encoding.PEM)
    ctx = client_context(leaf, private_key_pem(key), ca.bundle_pem())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def get(addr: Addr, ctx: ssl.SSLContext) -> int:
    import http.client

    conn = http.client.HTTPSConnection(addr.host, addr.port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def test_mtls_stream_bundle_push_and_renewal_on_the_ca_port(tmp_path):
    ca = MeshCA.init(tmp_path / "ca", trust_domain=TD)
    token = tmp_path / "catalog.token"
    token.write_text(ca.create_token(ident("catalog")))
    token.chmod(0o600)
    other_token = tmp_path / "pricing.token"
    other_token.write_text(ca.create_token(ident("pricing")))
    other_token.chmod(0o600)
    mtls = Addr("127.0.0.1", free_port())
    col = ControlCollector(tmp_path, extra=("--ca", str(tmp_path / "ca"), "--ca-mtls", str(mtls))).start()
    app = Upstream("catalog")
    sc = control_sidecar(tmp_path, col, "catalog", app.addr)
    sc.extra = ("--control", str(mtls), "--identity", ident("catalog"), "--token-file", str(token), "--mtls", "strict")
    # the control group: a sidecar without the control plane learns of new roots only when it renews
    alone = control_sidecar(tmp_path, col, "pricing", app.addr)
    alone.extra = ("--identity", ident("pricing"), "--token-file", str(other_token), "--mtls", "strict")
    try:
        sc.spawn(), alone.spawn()
        sc.wait_ready(), alone.wait_ready()
        doc = col.wait_proxies(all_synced(1, endpoints=1))
        p = doc["proxies"][0]
        assert p["verified"] and p["identity"] == ident("catalog") and p["namespace"] == "shop"
        assert "connected (mTLS)" in sc.stderr()

        # a root rotation: the new root signs from now on; the sidecar trusts it at once, from
        # the pushed bundle, though its own certificate is good for hours
        MeshCA.open(tmp_path / "ca").rotate()
        ca = MeshCA.open(tmp_path / "ca")
        sc.wait_log("trust bundle from the control plane installed", timeout=15)
        new_root_peer = leaf_only_context(ca, ident("frontend"))
        assert get(sc.inbound, new_root_peer) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(alone.inbound, new_root_peer)
        assert "installed certificate 2" not in sc.stderr()  # no renewal happened

        # renewals go to the same port, now the control plane's server
        client = CaClient(col.otlp, SpiffeId.parse(ident("reviews")), ca.create_token(ident("reviews")))
        creds = RotatingCredentials(ident("reviews"), client.obtain)
        client.creds = creds
        creds.renew()  # bootstrap, with the token, on the OTLP port
        assert client.renew_port == mtls.port
        first = creds.not_after
        time.sleep(1.1)
        creds.renew()  # renewal, over mTLS
        assert (client.bootstraps, client.renewals) == (1, 1) and creds.not_after > first
    finally:
        sc.close()
        alone.close()
        col.stop()
        app.close()
