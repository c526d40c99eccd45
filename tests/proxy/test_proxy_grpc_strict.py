"""grpcio against a STRICT sidecar: a plaintext gRPC client (h2c, as grpcio's insecure channel
speaks) is refused before any call reaches the app, while the same call through the caller's own
sidecar (mesh mTLS) succeeds. The handshake refusals of clients with no, self-signed, foreign or
expired certificates are shown with openssl and curl in test_proxy_mtls.py: grpcio cannot be one of
those clients, since it checks the server's DNS name and a mesh certificate carries a SPIFFE URI only.
"""

from __future__ import annotations

import grpc
import pytest
from h2_helpers import GrpcApp, grpc_channel, stub
from mtls_helpers import MeshCaEnv, sid
from sidecar_harness import SidecarProc, serving, start_all, write_mesh


@pytest.fixture(scope="module")
def strict_pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("grpc-strict")
    env = MeshCaEnv(work)
    app = GrpcApp()
    cfg = work / "mesh.yaml"
    rpc = SidecarProc(work, "rpc", app.addr, env.addr, config=cfg, extra=env.sidecar_args(sid("rpc"), "strict"))
    caller = SidecarProc(work, "caller", app.addr, env.addr, config=cfg, extra=env.sidecar_args(sid("caller")))
    write_mesh(cfg, {"services": {
        "rpc": {"endpoints": [{"address": str(rpc.inbound)}], "mtls": "strict", "identity": str(sid("rpc"))},
        "caller": {"endpoints": [{"address": str(caller.inbound)}], "identity": str(sid("caller"))},
    }})
    with serving(start_all([rpc, caller]), app, env):
        yield rpc, caller


def test_plaintext_grpc_is_refused_by_strict_and_mesh_mtls_is_served(strict_pair):
    rpc, caller = strict_pair
    direct = grpc.insecure_channel(str(rpc.inbound))
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(direct, "Unary")(b"hello", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        direct.close()
    through = grpc_channel(caller.outbound, "rpc")
    try:
        assert stub(through, "Unary")(b"hello", timeout=10)
    finally:
        through.close()
