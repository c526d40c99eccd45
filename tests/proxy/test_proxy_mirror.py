"""Request mirroring (Istio's mirror + mirrorPercentage) through a real sidecar to real apps: every
request at 100 %, about 30 % at 30 %, the copy's Host ``-shadow``-suffixed and its own span, and a
mirror that hangs or is down never slows or fails the request it copies; copies past the bound
are dropped and counted. HTTP/2 request bodies are teed to the copy as they stream (a bidirectional
gRPC stream included); a mirror that falls behind loses its copy, never slows the request."""

from __future__ import annotations

import hashlib
import http.client
import queue
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
from h2_helpers import GrpcApp, H2App, grpc_channel, stub
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import SidecarProc, StatusApp, Upstream, write_mesh

from rawio import H2EventServer
from tracemesh.net import Addr, free_port
from tracemesh.proxy._http1 import MAX_MIRRORS, MAX_RETRY_BODY
from tracemesh.proxy._translate import MIRROR_LAG_BYTES


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


class StalledH2App(H2EventServer):
    """An h2c app that takes streams and never reads them: no WINDOW_UPDATE, no answer (a mirror
    that cannot keep up); it records the streams reset (``resets``)."""

    def __init__(self) -> None:
        self.opened = 0
        self.resets = 0
        super().__init__()

    def on_event(self, conn, ev) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self.opened += 1
        elif isinstance(ev, h2.events.StreamReset):
            self.resets += 1

    def close(self) -> None:
        self.sock.close()


def ep(addr, version="v1"):
    return {"address": str(addr), "version": version}


@pytest.fixture(scope="module")
def mirrored(otlp, tmp_path_factory):
    work = tmp_path_factory.mktemp("mirror")
    primary, shadow, held = Upstream("primary"), Upstream("shadowapp"), HeldApp()
    h2shadow, stalled, grpc_app = H2App(), StalledH2App(), GrpcApp()
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
            # declared HTTP/2: copies go as HTTP/2 streams, their bodies streamed
            "h2shadow": {"endpoints": [ep(h2shadow.addr)], "ports": [{"port": 80, "protocol": "http2"}]},
            "stalled": {"endpoints": [ep(stalled.addr)], "ports": [{"port": 80, "protocol": "http2"}]},
            "echo": {"endpoints": [ep(grpc_app.addr)], "ports": [{"port": 80, "protocol": "grpc"}]},
        },
        "routes": [
            route("all", {"service": "shadow", "version": "v2", "percent": 100}),
            route("some", {"service": "shadow", "percent": 30}),
            route("held", {"service": "held"}),
            route("gone", {"service": "gone", "percent": 100}),
            route("h2all", {"service": "h2shadow", "percent": 100}),
            route("stalled", {"service": "stalled", "percent": 100}),
            {"service": "shop", "destinations": [{"version": "v1"}]},
            {"service": "echo", "destinations": [{"version": "v1"}], "mirror": {"service": "h2shadow"}},
        ],
    }
    path = write_mesh(work / "mesh.yaml", config)
    admin = Addr("127.0.0.1", free_port())
    sc = SidecarProc(work, "mirrorer", primary.addr, otlp.addr, config=path, extra=("--admin", str(admin))).start()
    try:
        yield sc, admin, primary, shadow, held, h2shadow, stalled
        assert sc.proc.poll() is None, f"the sidecar died:\n{sc.stderr()}"
    finally:
        sc.close()
        for app in (primary, shadow, held, stalled, h2shadow):
            app.close()
        grpc_app.close()


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
    sc, _, primary, shadow, _, *_ = mirrored
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

    # this request's copy (other tests' copies to the shadow are in the same receiver)
    span = otlp.wait(1, service="mirrorer", **{"mesh.mirror": True, "mesh.destination.service": "shadow",
                                               "url.path": "/all/post/3"})[0]
    assert (span.kind, span.name, span.attrs["http.response.status_code"]) == ("CLIENT", "POST shadow", 200)
    assert span.attrs["mesh.destination.version"] == "v2" and span.attrs["server.address"] == "shop-shadow"
    main = otlp.wait(1, service="mirrorer", **{"url.path": "/all/post/3", "mesh.destination.service": "shop"})[0]
    assert span.parent_span_id == main.span_id and span.trace_id == main.trace_id
    assert "mesh.mirror" not in main.attrs
    # the copy's traceparent names the mirror span, not the main one
    seen = next(s for s in shadow.requests("/all/post/3"))
    assert seen.headers["traceparent"].split("-")[2] == span.span_id


def test_http2_streams_are_mirrored_too(mirrored, otlp):
    sc, _, primary, shadow, _, *_ = mirrored
    body = b"h2 mirror " * 100
    with httpx.Client(http1=False, http2=True, base_url=f"http://{sc.outbound}", timeout=10,
                      headers={"host": "shop", "x-mirror": "all"}) as client:
        for i in range(5):
            assert client.get(f"/h2/{i}").status_code == 200
            r = client.post(f"/h2/post/{i}", content=body)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            # no content-length (a streamed body): teed as it streams, sent whole to the HTTP/1.1 mirror
            assert client.post(f"/h2/streamed/{i}", content=iter([body[:500], body[500:]])).status_code == 200
    assert len(primary.requests("/h2/")) == 15
    wait_until(lambda: len(shadow.requests("/h2/")) == 15)
    assert {s.body_sha256 for s in shadow.requests("/h2/post/") + shadow.requests("/h2/streamed/")} == {
        hashlib.sha256(body).hexdigest()}
    assert {s.headers["content-length"] for s in shadow.requests("/h2/streamed/")} == {str(len(body))}
    assert {s.headers["host"] for s in shadow.requests("/h2/")} == {"shop-shadow"}
    span = otlp.wait(1, service="mirrorer", **{"mesh.mirror": True, "url.path": "/h2/post/2"})[0]
    main = otlp.wait(1, service="mirrorer", **{"url.path": "/h2/post/2", "mesh.destination.service": "shop"})[0]
    assert span.kind == "CLIENT" and span.parent_span_id == main.span_id and span.trace_id == main.trace_id
    assert span.attrs["http.response.status_code"] == 200 and span.attrs["server.address"] == "shop-shadow"
    assert main.attrs["network.protocol.version"] == "2" and span.attrs["network.protocol.version"] == "1.1"


def test_percent_30_within_statistical_tolerance(mirrored):
    sc, _, primary, shadow, _, *_ = mirrored
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
    sc, admin, primary, _, held, *_ = mirrored
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


def mirror_stats(admin: Addr) -> dict:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("tracemesh_sidecar_mirror")}


def chunks(data: bytes, size: int = 16384):
    for off in range(0, len(data), size):
        yield data[off:off + size]


def test_http2_bodies_are_teed_to_the_mirror_as_they_stream(mirrored, otlp):
    sc, admin, _, shadow, _, h2shadow, _ = mirrored
    # more than a copy may keep whole (MAX_RETRY_BODY), less than it may lag (MIRROR_LAG_BYTES): the
    # test's HTTP/2 mirror opens a window of 64 KiB at a time, slower than the primary app reads
    big = bytes(range(256)) * 800
    assert MAX_RETRY_BODY < len(big) < MIRROR_LAG_BYTES
    before = mirror_stats(admin)
    with httpx.Client(http1=False, http2=True, base_url=f"http://{sc.outbound}", timeout=20,
                      headers={"host": "shop"}) as client:
        # an HTTP/2 mirror: the copy streams beside the request, a body of any size
        for path, content in (("/tee/streamed", chunks(big)), ("/tee/length", big)):
            r = client.post(path, content=content, headers={"x-mirror": "h2all"})
            assert r.status_code == 200 and r.json()["body_sha256"] == hashlib.sha256(big).hexdigest()
        # an HTTP/1.1 mirror takes a copy whole, so at most MAX_RETRY_BODY of it: this one is skipped
        r = client.post("/tee/too-big", content=chunks(big), headers={"x-mirror": "all"})
        assert r.status_code == 200 and r.json()["body_len"] == len(big)
    wait_until(lambda: {"/tee/streamed", "/tee/length"} <= {s["path"] for s in h2shadow.seen})
    copies = {s["path"]: s for s in h2shadow.seen if s["path"].startswith("/tee/")}
    assert copies["/tee/streamed"]["body_len"] == copies["/tee/length"]["body_len"] == len(big)
    assert copies["/tee/streamed"]["headers"][":authority"] == "shop-shadow"
    assert not shadow.requests("/tee/")
    after = mirror_stats(admin)
    assert after["tracemesh_sidecar_mirror_skipped_total"] == before["tracemesh_sidecar_mirror_skipped_total"] + 1
    span = otlp.wait(1, service="mirrorer", **{"mesh.mirror": True, "url.path": "/tee/streamed"})[0]
    assert span.attrs["http.request.body.size"] == len(big) and span.attrs["mesh.response_flags"] == "-"
    assert span.attrs["network.protocol.version"] == "2"


def test_http1_chunked_bodies_are_teed_and_copied_once_they_end(mirrored):
    """An HTTP/1.1 request body without a Content-Length streams upstream as it comes; the mirror
    gets a copy once it ended, whole with its length, up to MAX_RETRY_BODY (a longer one is skipped,
    counted, and the request is not affected)."""
    sc, admin, primary, shadow, *_ = mirrored
    body = b"chunked mirror " * 1000
    big = b"b" * (MAX_RETRY_BODY + 1)
    before = mirror_stats(admin)
    with httpx.Client(base_url=f"http://{sc.outbound}", timeout=20, headers={"host": "shop", "x-mirror": "all"}) as client:
        for i in range(3):
            r = client.post(f"/h1tee/{i}", content=chunks(body, 4000))  # an iterator: sent chunked
            assert r.status_code == 200 and r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        r = client.post("/h1tee-big/", content=chunks(big))
        assert r.status_code == 200 and r.json()["body_len"] == len(big)
    assert {s.headers.get("transfer-encoding") for s in primary.requests("/h1tee/")} == {"chunked"}
    wait_until(lambda: len(shadow.requests("/h1tee/")) == 3)
    copies = shadow.requests("/h1tee/")
    assert {s.body_sha256 for s in copies} == {hashlib.sha256(body).hexdigest()}
    assert {s.headers["host"] for s in copies} == {"shop-shadow"}
    after = mirror_stats(admin)
    assert after["tracemesh_sidecar_mirror_skipped_total"] == before["tracemesh_sidecar_mirror_skipped_total"] + 1
    assert not shadow.requests("/h1tee-big/")


def test_a_mirror_that_falls_behind_loses_its_copy_never_slows_the_request(mirrored, otlp):
    sc, admin, *_, stalled = mirrored
    big = b"s" * (4 << 20)
    before = mirror_stats(admin)
    with httpx.Client(http1=False, http2=True, base_url=f"http://{sc.outbound}", timeout=20,
                      headers={"host": "shop", "x-mirror": "stalled"}) as client:
        t0 = time.monotonic()
        r = client.post("/stalled/big", content=chunks(big))
        assert r.status_code == 200 and r.json()["body_len"] == len(big)
        assert time.monotonic() - t0 < 5  # not the mirror's 10 s timeout: the copy was let go
    wait_until(lambda: stalled.resets >= 1)  # its stream reset, not left hanging
    after = mirror_stats(admin)
    assert after["tracemesh_sidecar_mirror_skipped_total"] == before["tracemesh_sidecar_mirror_skipped_total"] + 1
    assert after["tracemesh_sidecar_mirror_failed_total"] == before["tracemesh_sidecar_mirror_failed_total"]
    span = otlp.wait(1, service="mirrorer", **{"mesh.mirror": True, "url.path": "/stalled/big"})[0]
    assert span.attrs["mesh.response_flags"] == "DC" and "abandoned" in span.status_message
    main = otlp.wait(1, service="mirrorer", **{"url.path": "/stalled/big", "mesh.destination.service": "shop"})[0]
    assert main.attrs["mesh.response_flags"] == "-" and main.attrs["http.request.body.size"] == len(big)


def test_a_bidirectional_grpc_stream_is_mirrored_while_it_streams(mirrored):
    sc, *_, h2shadow, _ = mirrored
    channel = grpc_channel(sc.outbound, "echo")
    answers = queue.Queue()
    sent = [b"first", b"second", b"third"]

    def requests():  # each message only once the answer to the one before came: a conversation
        for i, msg in enumerate(sent):
            if i:
                answers.get(timeout=10)
            yield msg

    try:
        got = []
        for reply in stub(channel, "Bidi", "bidi")(requests(), timeout=15):
            got.append(reply)
            answers.put(reply)
        assert got == [b"re:" + m for m in sent]
    except grpc.RpcError as exc:
        pytest.fail(f"the bidirectional stream failed: {exc}")
    finally:
        channel.close()
    wait_until(lambda: any(s["path"] == "/test.Echo/Bidi" for s in h2shadow.seen))
    copy = next(s for s in h2shadow.seen if s["path"] == "/test.Echo/Bidi")
    assert copy["body_len"] == sum(5 + len(m) for m in sent)  # every gRPC message, framed
    assert copy["headers"]["content-type"] == "application/grpc"


def test_tee_never_waits_and_lets_a_copy_go_past_its_bound():
    import trio
    import trio.testing

    from tracemesh.proxy._http1 import MirrorStats
    from tracemesh.proxy._translate import _Tee

    async def main() -> None:
        stats = MirrorStats()
        whole: list[bytes] = []
        tee = _Tee(stats, 10, on_end=whole.append)  # an HTTP/1.1 copy: the body whole at its end
        tee.feed(b"abc")
        tee.feed(b"defg")
        tee.end()
        tee.close()  # the exchange ends after the body: nothing to abandon
        assert whole == [b"abcdefg"] and stats.skipped == 0
        tee = _Tee(stats, 10, on_end=whole.append)
        tee.feed(b"x" * 11)  # past the bound: let go, counted
        tee.end()
        assert tee.abandoned and not tee.chunks and whole == [b"abcdefg"] and stats.skipped == 1

        tee = _Tee(stats, 10)  # an HTTP/2 copy, drained as it comes by a sender that gets stuck
        taken: list[bytes] = []

        async def sender(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with tee.scope:
                task_status.started()
                while (chunk := await tee.next()) is not None:
                    taken.append(chunk)
                    if chunk == b"stuck":  # the mirror stopped reading
                        await trio.sleep_forever()

        async with trio.open_nursery() as n:
            await n.start(sender)
            for chunk in (b"one", b"stuck", b"a" * 6):
                tee.feed(chunk)  # never waits, whatever the sender does
                await trio.testing.wait_all_tasks_blocked()
            assert taken == [b"one", b"stuck"] and tee.buffered == 6 and not tee.abandoned
            tee.feed(b"b" * 6)  # 12 bytes behind: the copy goes, the sender is cancelled
        assert "fell 10 bytes behind" in tee.abandoned and stats.skipped == 2 and tee.buffered == 0

        tee = _Tee(stats, 10)
        tee.feed(b"part")
        tee.close()  # the exchange ended before the body: the copy could never complete
        assert tee.abandoned and stats.skipped == 3

    trio.run(main)
