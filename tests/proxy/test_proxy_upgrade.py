"""HTTP/1.1 Upgrade (WebSocket) through real sidecars, with a real WebSocket client and server (the
``websockets`` library): the 101 is relayed, then bytes flow both ways until the close handshake,
plaintext and over mesh mTLS; a refused upgrade is an ordinary response; h2c is never passed on;
one span covers the whole upgraded connection."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from mtls_helpers import MeshCaEnv, sid
from sidecar_harness import SidecarProc, Upstream, serving, start_all, write_mesh

from tracemesh.net import Addr

websockets = pytest.importorskip("websockets")
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402
from websockets.sync.server import serve  # noqa: E402


class WsApp:
    """A websockets server: says hello first, then echoes every message; ``/headers`` sends the
    handshake's request headers as JSON instead."""

    def __init__(self) -> None:
        def handler(ws) -> None:
            if ws.request.path == "/headers":
                ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
                return
            ws.send("hello")  # the server speaks first: bytes right behind the 101
            for message in ws:
                ws.send(message)

        self.server = serve(handler, "127.0.0.1", 0, compression=None, max_size=4 * 1024 * 1024)
        self.addr = Addr("127.0.0.1", self.server.socket.getsockname()[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def ws_connect(via: Addr, service: str, path: str = "/chat"):
    """A WebSocket client that reaches *service* through the sidecar listener *via*."""
    sock = socket.create_connection(via, timeout=10)
    return connect(f"ws://{service}{path}", sock=sock, proxy=None, compression=None,
                   max_size=4 * 1024 * 1024, open_timeout=10, close_timeout=5)


def chat(via: Addr, service: str) -> int:
    """A conversation of text and binary messages (one of 1 MiB); the bytes the client sent."""
    big = os.urandom(1024 * 1024)
    with ws_connect(via, service) as ws:
        assert ws.recv(timeout=10) == "hello"
        for i in range(20):
            ws.send(f"message {i}")
            assert ws.recv(timeout=10) == f"message {i}"
        ws.send(big)
        assert ws.recv(timeout=20) == big
    return len(big)


@pytest.fixture(scope="module")
def ws_mesh(otlp, tmp_path_factory):
    """``wsapp``: a sidecar in front of the WebSocket app; ``wsclient``: a sidecar whose outbound
    reaches wsapp's sidecar (``wsapp``), the app itself (``wsdirect``) and an HTTP app that does not
    upgrade (``plainhttp``)."""
    work = tmp_path_factory.mktemp("upgrade")
    app, http_app = WsApp(), Upstream("plainhttp")
    scs = []
    with serving(scs, app, http_app):
        cfg = work / "mesh.yaml"
        server = SidecarProc(work, "wsapp", app.addr, otlp.addr)
        client = SidecarProc(work, "wsclient", http_app.addr, otlp.addr, config=cfg)
        scs += [server, client]
        write_mesh(cfg, {"services": {
            "wsapp": {"endpoints": [{"address": str(server.inbound)}], "mtls": "disable"},
            "wsdirect": {"endpoints": [{"address": str(app.addr)}], "mtls": "disable"},
            "plainhttp": {"endpoints": [{"address": str(http_app.addr)}], "mtls": "disable"},
        }})
        start_all(scs)
        yield client, server, http_app


def test_websocket_through_two_sidecars_and_one_span_per_side(ws_mesh, otlp):
    client, server, _ = ws_mesh
    sent = chat(client.outbound, "wsapp")
    out = otlp.wait(1, service="wsclient", **{"mesh.destination.service": "wsapp", "url.path": "/chat"})[0]
    a = out.attrs
    assert (out.kind, out.status, a["http.response.status_code"], a["mesh.response_flags"]) == ("CLIENT", "UNSET", 101, "-")
    assert a["http.request.body.size"] > sent  # frames: the payloads plus their (masked) headers
    assert a["http.response.body.size"] > sent
    inb = otlp.wait(1, service="wsapp", **{"url.path": "/chat", "mesh.direction": "inbound"})[0]
    assert (inb.kind, inb.attrs["http.response.status_code"]) == ("SERVER", 101)
    assert inb.trace_id == out.trace_id and inb.parent_span_id == out.span_id
    assert inb.attrs["http.request.body.size"] == a["http.request.body.size"]
    assert out.end_ns > inb.end_ns - 10**9  # the span ends with the connection, not at the 101


def test_websocket_one_hop_and_the_headers_the_app_sees(ws_mesh):
    client, _, _ = ws_mesh
    chat(client.outbound, "wsdirect")
    with ws_connect(client.outbound, "wsdirect", "/headers") as ws:
        seen = json.loads(ws.recv(timeout=10))
    assert seen["upgrade"].lower() == "websocket" and "upgrade" in seen["connection"].lower()
    assert seen["host"] == "wsdirect" and "sec-websocket-key" in seen and "traceparent" in seen


def test_refused_upgrade_is_relayed_as_a_plain_response(ws_mesh, otlp):
    client, _, http_app = ws_mesh
    with pytest.raises(InvalidStatus) as info:
        ws_connect(client.outbound, "plainhttp", "/status/426")
    assert info.value.response.status_code == 426
    # the same connection stays an HTTP connection: keep-alive after a refused upgrade
    with socket.create_connection(client.outbound, timeout=10) as s:
        s.sendall(b"GET /status/403 HTTP/1.1\r\nHost: plainhttp\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                  b"GET /again HTTP/1.1\r\nHost: plainhttp\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 403 ") and b"\r\n\r\nHTTP/1.1 200 " in data
    seen = http_app.requests("/status/403")[-1]
    assert seen.headers["upgrade"] == "websocket"  # it was asked, and said no


def test_h2c_upgrade_is_not_passed_on(ws_mesh):
    client, _, http_app = ws_mesh
    with socket.create_connection(client.outbound, timeout=10) as s:
        s.sendall(b"GET /h2c HTTP/1.1\r\nHost: plainhttp\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        data = b""
        while not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    headers = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
    assert "upgrade" not in headers and "http2-settings" not in headers


def test_websocket_over_mesh_mtls(tmp_path):
    env = MeshCaEnv(tmp_path)
    app = WsApp()
    scs = []
    with serving(scs, app, env):
        cfg = tmp_path / "mesh.yaml"
        server = SidecarProc(tmp_path, "wsapp", app.addr, env.addr, extra=env.sidecar_args(sid("wsapp"), "strict"))
        client = SidecarProc(tmp_path, "wsclient", Addr("127.0.0.1", 9), env.addr, config=cfg,
                             extra=env.sidecar_args(sid("wsclient")))
        scs += [server, client]
        write_mesh(cfg, {"services": {"wsapp": {"endpoints": [{"address": str(server.inbound)}], "mtls": "strict",
                                                "identity": str(sid("wsapp"))}}})
        start_all(scs)
        chat(client.outbound, "wsapp")
        with ws_connect(client.outbound, "wsapp", "/headers") as ws:
            seen = json.loads(ws.recv(timeout=10))
        assert seen["x-forwarded-client-cert"] == f"By={sid('wsapp')};URI={sid('wsclient')}"
        out = env.otlp.wait(1, service="wsclient", **{"url.path": "/chat"})[0]
        assert out.attrs["http.response.status_code"] == 101
        assert out.attrs["mesh.connection_security_policy"] == "mutual_tls"
        inb = env.otlp.wait(1, service="wsapp", **{"url.path": "/chat"})[0]
        assert inb.attrs["mesh.source.principal"] == str(sid("wsclient"))
