"""Protocol translation through real sidecars: an HTTP/2 client (curl ``--http2-prior-knowledge``,
httpx) in front of a stdlib HTTP/1.1 app declared ``protocol: http``, an HTTP/1.1 client (curl
``--http1.1``) in front of an h2c app declared ``http2``, ``--app-protocol`` when the config says
nothing, a gRPC call to a service declared HTTP/1.1 (a clear gRPC error), and mirrored copies
leaving in the mirror service's protocol."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
import uuid

import grpc
import httpx
import pytest
from h2_helpers import H2App, grpc_channel, stub
from sidecar_harness import SidecarProc, Upstream, pattern_sha256, serving, start_all, write_mesh

from tracemesh.proxy._translate import H1, H2, declared


@pytest.fixture(scope="module")
def tmesh(otlp, tmp_path_factory):
    """``front`` (outbound only); ``plain`` (inbound -> a stdlib HTTP/1.1 app, declared ``http``);
    ``h2svc`` (inbound -> an h2c app, declared ``http2``); ``bare`` (-> the HTTP/1.1 app, not in
    the config's ports: ``--app-protocol http1``); ``h2shadow`` (the h2c app itself, declared
    ``http2``): the mirror of ``plain`` and ``h2svc`` requests with ``x-mirror: yes``."""
    work = tmp_path_factory.mktemp("translate")
    happ, h2app, shadow = Upstream("plain"), H2App(), H2App()
    cfg = work / "mesh.yaml"
    plain = SidecarProc(work, "plain", happ.addr, otlp.addr, config=cfg)
    h2svc = SidecarProc(work, "h2svc", h2app.addr, otlp.addr, config=cfg)
    bare = SidecarProc(work, "bare", happ.addr, otlp.addr, config=cfg, extra=("--app-protocol", "http1"))
    front = SidecarProc(work, "front", happ.addr, otlp.addr, config=cfg)

    def mirrored(service):
        return {"service": service, "name": "mirrored", "match": [{"headers": {"x-mirror": {"exact": "yes"}}}],
                "destinations": [{"version": "v1"}], "mirror": {"service": "h2shadow", "percent": 100}}

    write_mesh(cfg, {
        "services": {
            "plain": {"endpoints": [{"address": str(plain.inbound)}],
                      "ports": [{"port": happ.addr.port, "protocol": "http", "name": "web"}]},
            "h2svc": {"endpoints": [{"address": str(h2svc.inbound)}],
                      "ports": [{"port": h2app.addr.port, "protocol": "http2"}]},
            "bare": {"endpoints": [{"address": str(bare.inbound)}]},
            "front": {"endpoints": [{"address": str(front.inbound)}]},
            "h2shadow": {"endpoints": [{"address": str(shadow.addr)}], "ports": [{"port": 80, "protocol": "grpc"}]},
        },
        "routes": [mirrored("plain"), mirrored("h2svc"), {"service": "plain", "destinations": [{"version": "v1"}]},
                   {"service": "h2svc", "destinations": [{"version": "v1"}]}],
    })
    with serving(start_all([plain, h2svc, bare, front]), happ, h2app, shadow):
        yield front, plain, h2svc, bare, happ, h2app, shadow


def _curl(curl: str, version: str, url: str, *extra: str) -> tuple[bytes, str]:
    r = subprocess.run([curl, "-sS", version, "--max-time", "20", "-w", "\n%{http_version} %{http_code}",
                        *extra, url], capture_output=True, timeout=30)
    body, _, status = r.stdout.rpartition(b"\n")
    assert r.returncode == 0, r.stderr
    return body, status.decode()


def test_declared_protocol_rule():
    from tracemesh.proxy._config import Port, Service

    svc = Service("s", (), ports=(Port(8080, "http"), Port(9090, "grpc"), Port(5432, "tcp")))
    assert declared(svc, 8080) == H1 and declared(svc, 9090) == H2
    assert declared(svc, 1) is None  # two HTTP versions and no entry for the port: undecided
    assert declared(Service("s", (), ports=(Port(80, "http2"), Port(5432, "tcp"))), 1) == H2
    assert declared(Service("s", ()), 80) is None and declared(None) is None


def test_next_hop_rule():
    from types import SimpleNamespace

    from tracemesh.net import Addr
    from tracemesh.proxy._config import MeshConfig, Port, Service
    from tracemesh.proxy._translate import next_hop

    services = {"web": Service("web", (), ports=(Port(8080, "http"),)),
                "api": Service("api", (), ports=(Port(9090, "grpc"),)), "any": Service("any", ())}
    sc = SimpleNamespace(router=SimpleNamespace(config=MeshConfig(services, {}, (), ())), service="web",
                         app=Addr("127.0.0.1", 8080), app_protocol="http2")
    assert next_hop(sc, H2, None, False) == H1  # inbound: the config beats --app-protocol
    sc.service = "any"
    assert next_hop(sc, H1, None, False) == H2  # no declaration: --app-protocol
    sc.app_protocol = "auto"
    assert next_hop(sc, H1, None, False) == H1 and next_hop(sc, H2, None, False) == H2  # as the client
    assert next_hop(sc, H2, "web", False) == H1  # plaintext: the endpoint may be the app itself
    assert next_hop(sc, H2, "web", True) == H2  # mTLS: a sidecar, HTTP/2 multiplexing kept
    assert next_hop(sc, H1, "web", True) == H1
    assert next_hop(sc, H1, "api", False) == H2 and next_hop(sc, H1, "api", True) == H2
    assert next_hop(sc, H1, "any", False) == H1 and next_hop(sc, H2, "nowhere", False) == H2


def test_curl_h2c_through_two_sidecars_to_an_http1_app(tmesh, curl, otlp):
    front, plain, *_ = tmesh
    rid = f"tr-{uuid.uuid4()}"
    h2 = "--http2-prior-knowledge"
    for target in (front.outbound, plain.inbound):  # translated at the outbound sidecar, then at the inbound one
        body, status = _curl(curl, h2, f"http://{target}/echo?q=1", "-H", "Host: plain",
                             "-H", f"x-request-id: {rid}", "-H", "Cookie: a=1", "-H", "Cookie: b=2")
        assert status == "2 200"
        seen = json.loads(body)
        assert seen["target"] == "/echo?q=1" and seen["headers"]["host"] == "plain"
        assert seen["headers"]["cookie"] == "a=1; b=2"
    # bodies up: with a content-length, and without one (stdin: chunked to the app)
    payload = bytes(range(256)) * 1000
    r = subprocess.run([curl, "-sS", h2, "--max-time", "20", "-H", "Host: plain", "--data-binary", "@-",
                        "-H", "Content-Type: application/octet-stream", f"http://{front.outbound}/up-len"],
                       input=payload, capture_output=True, timeout=30)
    seen = json.loads(r.stdout)
    assert seen["body_len"] == len(payload) and seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    r = subprocess.run([curl, "-sS", h2, "--max-time", "20", "-H", "Host: plain", "-T", "-",
                        f"http://{front.outbound}/up-chunked"], input=payload, capture_output=True, timeout=30)
    seen = json.loads(r.stdout)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert seen["headers"].get("transfer-encoding") == "chunked"
    # bodies down: a 5 MB download with a length, and a close-delimited one
    for path, n in (("/bytes/5000000", 5_000_000), ("/stream/300000", 300_000)):
        r = subprocess.run([curl, "-sS", h2, "--max-time", "20", "-H", "Host: plain", "-o", "-",
                            "-w", "%{http_version}", f"http://{front.outbound}{path}"], capture_output=True, timeout=30)
        assert r.stdout.endswith(b"2"), r.stderr
        data = r.stdout[:-1]
        assert len(data) == n and hashlib.sha256(data).hexdigest() == pattern_sha256(n)
    spans = otlp.wait(3, **{"guid:x-request-id": rid})
    assert {s.attrs["network.protocol.version"] for s in spans if s.kind == "CLIENT"} == {"2"}
    assert all(s.attrs["mesh.response_flags"] == "-" for s in spans)


def test_curl_http1_through_two_sidecars_to_an_h2c_app(tmesh, curl):
    front, _, h2svc, *_ = tmesh
    for target in (front.outbound, h2svc.inbound):
        body, status = _curl(curl, "--http1.1", f"http://{target}/items/7?x=y", "-H", "Host: h2svc",
                             "-H", "Connection: keep-alive, x-hop", "-H", "x-hop: gone")
        assert status == "1.1 200"
        seen = json.loads(body)
        assert seen["path"] == "/items/7?x=y" and seen["authority"] == "h2svc"
        assert "x-hop" not in seen["headers"] and "connection" not in seen["headers"]
    payload = b"z" * 300_000
    for extra in (("--data-binary", "@-"), ("-T", "-")):  # content-length, then chunked
        r = subprocess.run([curl, "-sS", "--http1.1", "--max-time", "20", "-H", "Host: h2svc", *extra,
                            f"http://{front.outbound}/post"], input=payload, capture_output=True, timeout=30)
        seen = json.loads(r.stdout)
        assert seen["body_len"] == len(payload) and seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    # a large body down (HTTP/2 DATA under flow control, chunked to the HTTP/1.1 client); trailers, which
    # end a chunked body, in test_proxy_trailers.py
    r = subprocess.run([curl, "-sS", "--http1.1", "--max-time", "20", "-H", "Host: h2svc", "-D", "-", "-o", "-",
                        f"http://{front.outbound}/bytes/3000000"], capture_output=True, timeout=30)
    head, _, data = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and data == b"x" * 3_000_000
    body, status = _curl(curl, "--http1.1", f"http://{front.outbound}/trailers", "-H", "Host: h2svc")
    assert status == "1.1 200" and json.loads(body)["path"] == "/trailers"


def test_httpx_http2_concurrent_requests_to_an_http1_app(tmesh):
    front, _, _, bare, *_ = tmesh

    # httpx's async client: its sync client shares one HPACK encoder between threads without a lock,
    # and under 16 threads now and then sends a header block that cannot be decoded (our sidecar
    # then rightly ends the connection: "Invalid table index"; see encode/httpx#3324)
    async def run(target, host):
        async with httpx.AsyncClient(http1=False, http2=True, base_url=f"http://{target}", headers={"host": host},
                                     timeout=20) as client:
            t0 = time.monotonic()
            rs = await asyncio.gather(*(client.get(f"/sleep/0.5?i={i}") for i in range(16)))
            elapsed = time.monotonic() - t0
            assert {r.status_code for r in rs} == {200} and {r.http_version for r in rs} == {"HTTP/2"}
            assert elapsed < 4, elapsed  # concurrent over one HTTP/2 connection, not one at a time
            assert len({r.extensions["network_stream"].get_extra_info("client_addr") for r in rs}) == 1
            r = await client.post("/post", content=b"q" * 100_000)
            assert r.json()["body_len"] == 100_000

    # bare: the config declares nothing for it, --app-protocol http1 decides
    for target, host in ((bare.inbound, "bare"), (front.outbound, "plain")):
        asyncio.run(run(target, host))


def test_grpc_to_a_service_declared_http1_is_a_clear_grpc_error(tmesh, otlp):
    front, plain, *_ = tmesh
    for target in (front.outbound, plain.inbound):
        channel = grpc_channel(target, "plain")
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub(channel, "Unary")(b"hi", timeout=10)
        finally:
            channel.close()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "gRPC needs HTTP/2" in info.value.details() and "http2 or grpc" in info.value.details()


def test_mirrored_copies_leave_in_the_mirror_services_protocol(tmesh, curl, otlp):
    front, *_, shadow = tmesh
    rid = f"trm-{uuid.uuid4()}"
    body = b"m" * 1000
    # an HTTP/1.1 client to an http2 service, an HTTP/2 client to an http service: copies go as HTTP/2
    for version, host in (("--http1.1", "h2svc"), ("--http2-prior-knowledge", "plain")):
        r = subprocess.run([curl, "-sS", version, "--max-time", "20", "-H", f"Host: {host}", "-H", "x-mirror: yes",
                            "-H", f"x-request-id: {rid}", "--data-binary", "@-", f"http://{front.outbound}/m/{host}"],
                           input=body, capture_output=True, timeout=30)
        assert json.loads(r.stdout)["body_len"] == len(body)
    deadline = time.monotonic() + 10
    while len([s for s in shadow.seen if s["path"].startswith("/m/")]) < 2:
        assert time.monotonic() < deadline, shadow.seen
        time.sleep(0.05)
    copies = {s["path"]: s for s in shadow.seen if s["path"].startswith("/m/")}
    assert copies["/m/h2svc"]["headers"][":authority"] == "h2svc-shadow"
    assert copies["/m/plain"]["headers"][":authority"] == "plain-shadow"
    assert {c["body_len"] for c in copies.values()} == {len(body)}
    spans = otlp.wait(2, service="front", **{"mesh.mirror": True, "mesh.destination.service": "h2shadow"})
    assert {s.attrs["network.protocol.version"] for s in spans} == {"2"}
    assert all(s.kind == "CLIENT" and s.attrs["http.response.status_code"] == 200 for s in spans)
