"""Request mirroring (Istio's mirror + mirrorPercentage) through a real sidecar to real apps: every
request at 100 %, about 30 % at 30 %, the copy's Host ``-shadow``-suffixed and its own span, and a
mirror that hangs or is down never slows or fails the request it copies; copies past the bound
are dropped and counted."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import SidecarProc, StatusApp, Upstream, write_mesh

from tracemesh.net import Addr, free_port
from tracemesh.proxy._http1 import MAX_MIRRORS


class HeldApp(StatusApp):
    """Answers every request only once :attr:`release` is set (or after 30 s): a mirror that hangs."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__(200)
        self.server.request_queue_size = 128

    def hold(self) -> None:
        self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        super().close()


def ep(addr, version="v1"):
    return {"address": str(addr), "version": version}


@pytest.fixture(scope="module")
def mirrored(otlp, tmp_path_factory):
    work = tmp_path_factory.mktemp("mirror")
    primary, shadow, held = Upstream("primary"), Upstream("shadowapp"), HeldApp()
    dead = Addr("127.0.0.1", free_port())

    def route(name, mirror):
        return {"service": "shop", "name": name, "match": [{"headers": {"x-mirror": {"exact": name}}}],
                "destinations": [{"version": "v1"}], "mirror": mirror}

    config = {
        "services": {
            # declared HTTP/1.1 (the stdlib apps): HTTP/2 clients' requests and copies are translated
            "shop": {"endpoints": [ep(primary.addr)], "ports": [{"port": 80, "protocol": "http"}]},
            "shadow": {"endpoints": [ep(shadow.addr, "v2")], "ports": [{"port": 80, "protocol": "http"}]},
            "held": {"endpoints": [ep(held.addr)]},
            "gone": {"endpoints": [ep(dead)]},
        },
        "routes": [
            route("all", {"service": "shadow", "version": "v2", "percent": 100}),
            route("some", {"service": "shadow", "percent": 30}),
            route("held", {"service": "held"}),
            route("gone", {"service": "gone", "percent": 100}),
            {"service": "shop", "destinations": [{"version": "v1"}]},
        ],
    }
    path = write_mesh(work / "mesh.yaml", config)
    admin = Addr("127.0.0.1", free_port())
    sc = SidecarProc(work, "mirrorer", primary.addr, otlp.addr, config=path, extra=("--admin", str(admin))).start()
    try:
        yield sc, admin, primary, shadow, held
        assert sc.proc.poll() is None, f"the sidecar died:\n{sc.stderr()}"
    finally:
        sc.close()
        for app in (primary, shadow, held):
            app.close()


def request(conn, mode: str, path: str, body: bytes | None = None, rid: str | None = None) -> int:
    headers = {"host": "shop", "x-mirror": mode, "x-request-id": rid or str(uuid.uuid4())}
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_percent_100_delivers_every_request_to_both(mirrored, otlp):
    sc, _, primary, shadow, _ = mirrored
    conn = http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=10)
    body = b"mirror me " * 100
    for i in range(10):
        assert request(conn, "all", f"/all/{i}") == 200
        assert request(conn, "all", f"/all/post/{i}", body) == 200
    conn.close()
    assert len(primary.requests("/all/")) == 20
    wait_until(lambda: len(shadow.requests("/all/")) == 20)
    copies = shadow.requests("/all/post/")
    assert {s.body_sha256 for s in copies} == {hashlib.sha256(body).hexdigest()}
    assert {s.headers["host"] for s in shadow.requests("/all/")} == {"shop-shadow"}
    assert all("host" in s.headers and s.headers["host"] == "shop" for s in primary.requests("/all/"))

    mirror = otlp.wait(20, service="mirrorer", **{"mesh.mirror": True, "mesh.destination.service": "shadow"})
    span = next(s for s in mirror if s.attrs["url.path"] == "/all/post/3")
    assert (span.kind, span.name, span.attrs["http.response.status_code"]) == ("CLIENT", "POST shadow", 200)
    assert span.attrs["mesh.destination.version"] == "v2" and span.attrs["server.address"] == "shop-shadow"
    main = otlp.wait(1, service="mirrorer", **{"url.path": "/all/post/3", "mesh.destination.service": "shop"})[0]
    assert span.parent_span_id == main.span_id and span.trace_id == main.trace_id
    assert "mesh.mirror" not in main.attrs
    # the copy's traceparent names the mirror span, not the main one
    seen = next(s for s in shadow.requests("/all/post/3"))
    assert seen.headers["traceparent"].split("-")[2] == span.span_id


def test_http2_streams_are_mirrored_too(mirrored, otlp):
    sc, _, primary, shadow, _ = mirrored
    body = b"h2 mirror " * 100
    with httpx.Client(http1=False, http2=True, base_url=f"http://{sc.outbound}", timeout=10,
                      headers={"host": "shop", "x-mirror": "all"}) as client:
        for i in range(5):
            assert client.get(f"/h2/{i}").status_code == 200
            r = client.post(f"/h2/post/{i}", content=body)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            # no content-length (a streamed body): not mirrored, as for HTTP/1.1
            assert client.post(f"/h2/streamed/{i}", content=iter([body])).status_code == 200
    assert len(primary.requests("/h2/")) == 15
    wait_until(lambda: len(shadow.requests("/h2/")) == 10)
    assert not shadow.requests("/h2/streamed/")
    assert {s.body_sha256 for s in shadow.requests("/h2/post/")} == {hashlib.sha256(body).hexdigest()}
    assert {s.headers["host"] for s in shadow.requests("/h2/")} == {"shop-shadow"}
    span = otlp.wait(1, service="mirrorer", **{"mesh.mirror": True, "url.path": "/h2/post/2"})[0]
    main = otlp.wait(1, service="mirrorer", **{"url.path": "/h2/post/2", "mesh.destination.service": "shop"})[0]
    assert span.kind == "CLIENT" and span.parent_span_id == main.span_id and span.trace_id == main.trace_id
    assert span.attrs["http.response.status_code"] == 200 and span.attrs["server.address"] == "shop-shadow"
    assert main.attrs["network.protocol.version"] == "2" and span.attrs["network.protocol.version"] == "1.1"


def test_percent_30_within_statistical_tolerance(mirrored):
    sc, _, primary, shadow, _ = mirrored
    n, clients = 400, 8

    def client(k: int) -> list[int]:  # several keep-alive connections at once: the stdlib apps are slow alone
        conn = http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=10)
        try:
            return [request(conn, "some", f"/some/{k}/{i}") for i in range(n // clients)]
        finally:
            conn.close()

    with ThreadPoolExecutor(clients) as pool:
        statuses = [st for got in pool.map(client, range(clients)) for st in got]
    assert statuses == [200] * n
    assert len(primary.requests("/some/")) == n
    time.sleep(1.0)  # copies still in flight land
    got = len(shadow.requests("/some/"))
    # binomial(400, 0.3): mean 120, sd 9.2; +-5 sd
    assert 74 <= got <= 166, got


def test_hanging_or_down_mirror_never_slows_or_fails_the_request(mirrored, otlp):
    sc, admin, primary, _, held = mirrored
    conn = http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=10)
    t0 = time.monotonic()
    for i in range(10):
        assert request(conn, "gone", f"/gone/{i}") == 200
        assert request(conn, "held", f"/held/{i}") == 200  # while its copy hangs at the mirror
    elapsed = time.monotonic() - t0
    assert elapsed < 8, elapsed  # a copy waited for would take 30 s each
    wait_until(lambda: held.hits == 10)
    assert len(primary.requests("/held/")) == 10
    down = otlp.wait(10, service="mirrorer", **{"mesh.mirror": True, "mesh.destination.service": "gone"})
    assert {s.attrs["mesh.response_flags"] for s in down} == {"UF"}
    assert all(s.status == "ERROR" for s in down)
    main = otlp.wait(10, service="mirrorer", **{"mesh.route": "gone", "mesh.destination.service": "shop"})
    assert {s.attrs["http.response.status_code"] for s in main} == {200}

    # past MAX_MIRRORS copies in flight, more are dropped (and counted), the requests unharmed
    for i in range(MAX_MIRRORS + 5):
        assert request(conn, "held", f"/held/more/{i}") == 200
    conn.close()
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    stats = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert stats["tracemesh_sidecar_mirror_dropped_total"] >= 15
    assert stats["tracemesh_sidecar_mirror_failed_total"] >= 10  # the ones to the port nothing listens on
    held.release.set()
    wait_until(lambda: held.hits >= MAX_MIRRORS)


@pytest.mark.parametrize("host, shadow", [
    (b"shop", b"shop-shadow"), (b"shop:8080", b"shop-shadow:8080"),
    (b"shop.default.svc.cluster.local", b"shop.default.svc.cluster.local-shadow"),
    (b"[::1]:80", b"[::1]-shadow:80"),
])
def test_shadow_host_is_envoys(host, shadow):
    from tracemesh.proxy._http1 import _shadow_host

    assert _shadow_host(host) == shadow
