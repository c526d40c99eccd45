"""gRPC through two real sidecars (outbound, then inbound) with grpcio on both ends: the four kinds
of call, trailers, status codes, deadlines, authorization (PERMISSION_DENIED), faults, routing
failures and retries as gRPC statuses, and the spans' ``rpc.*`` attributes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from h2_helpers import SERVICE, GrpcApp, grpc_channel, stub
from mtls_helpers import MeshCaEnv, sid
from sidecar_harness import SidecarProc, distinct_ports, serving, start_all, write_mesh

from tracemesh.net import Addr, free_port
from tracemesh.proxy._http2 import format_grpc_timeout, grpc_message, grpc_status_for, parse_grpc_timeout


@pytest.fixture(scope="module")
def gmesh(otlp, tmp_path_factory):
    """``front`` (whose app calls out through it) and ``greeter`` (in front of the grpcio app).
    Mesh config: greeter's routes abort ``Aborted`` (503), retry on ``unavailable`` when the call
    carries ``x-retry: yes``, delay calls with ``x-delay: yes`` by 500 ms; a policy denies
    ``/test.Echo/Secret`` at greeter; ``dead`` is a port nothing listens on."""
    work = tmp_path_factory.mktemp("grpc")
    app = GrpcApp()
    cfg = work / "mesh.yaml"
    admin = Addr("127.0.0.1", distinct_ports(1)[0])
    greeter = SidecarProc(work, "greeter", app.addr, otlp.addr, config=cfg)
    front = SidecarProc(work, "front", app.addr, otlp.addr, config=cfg, extra=("--admin", str(admin)))
    write_mesh(cfg, {
        "services": {
            "greeter": {"endpoints": [{"address": str(greeter.inbound), "version": "v1"}]},
            "front": {"endpoints": [{"address": str(front.inbound), "version": "v1"}]},
            "dead": {"endpoints": [{"address": f"127.0.0.1:{free_port()}", "version": "v1"}]},
        },
        "routes": [
            {"service": "greeter", "name": "aborted", "match": [{"path": {"prefix": f"/{SERVICE}/Aborted"}}],
             "destinations": [{"version": "v1"}], "fault": {"abort": {"percent": 100, "http_status": 503}}},
            {"service": "greeter", "name": "grpc-aborted",
             "match": [{"path": {"prefix": f"/{SERVICE}/Exhausted"}}], "destinations": [{"version": "v1"}],
             "fault": {"abort": {"percent": 100, "grpc_status": "RESOURCE_EXHAUSTED"}}},
            {"service": "greeter", "name": "delayed", "match": [{"headers": {"x-delay": {"exact": "yes"}}}],
             "destinations": [{"version": "v1"}], "fault": {"delay": {"percent": 100, "fixed_delay": "500ms"}}},
            {"service": "greeter", "name": "retried", "match": [{"headers": {"x-retry": {"exact": "yes"}}}],
             "destinations": [{"version": "v1"}], "retries": {"attempts": 2, "retry_on": "unavailable"}},
            {"service": "greeter", "name": "default", "destinations": [{"version": "v1"}]},
        ],
        "policies": [{"name": "no-secrets", "service": "greeter", "action": "DENY",
                      "rules": [{"to": {"paths": [f"/{SERVICE}/Secret"]}}]}],
    })
    channel = grpc_channel(front.outbound, "greeter")
    with serving(start_all([greeter, front]), channel, app):
        yield front, greeter, channel, admin


def _rid() -> str:
    return f"grpc-{uuid.uuid4()}"


def _spans(otlp, rid: str, count: int = 2):
    spans = otlp.wait(count, **{"guid:x-request-id": rid})
    client = next(s for s in spans if s.kind == "CLIENT")
    server = next(s for s in spans if s.kind == "SERVER")
    return client, server


def test_unary_call_crosses_both_sidecars_with_one_trace(gmesh, otlp):
    front, greeter, channel, _ = gmesh
    rid = _rid()
    answer = stub(channel, "Unary")(b"metadata", timeout=10, metadata=(("x-request-id", rid),))
    md = json.loads(answer)
    assert md["x-request-id"] == rid
    assert md["traceparent"].startswith("00-")
    assert "x-tracemesh-peer" not in md  # the mesh's own header stops at the inbound sidecar
    client, server = _spans(otlp, rid)
    assert client.trace_id == server.trace_id and server.parent_span_id == client.span_id
    assert md["traceparent"].split("-")[2] == server.span_id  # the app is the inbound span's child
    for span in (client, server):
        a = span.attrs
        assert span.name == f"{SERVICE}/Unary"
        assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", SERVICE, "Unary")
        assert a["rpc.grpc.status_code"] == 0 and a["http.response.status_code"] == 200
        assert a["network.protocol.version"] == "2" and a["mesh.response_flags"] == "-"
        assert span.status == "UNSET"
    assert client.attrs["mesh.destination.service"] == "greeter" and client.attrs["mesh.route"] == "default"


def test_server_client_and_bidi_streaming(gmesh):
    _, _, channel, _ = gmesh
    assert list(stub(channel, "ServerStream", "server")(b"200", timeout=10)) == [
        f"item {i}".encode() for i in range(200)]
    msgs = [bytes([i % 256]) * (i * 100) for i in range(60)]
    assert stub(channel, "ClientStream", "client")(iter(msgs), timeout=10) == \
        f"60 messages, {sum(map(len, msgs))} bytes".encode()
    # bidi in lock step: each message is sent only after the answer to the previous one came back,
    # which only works if neither side is buffered until the end of the stream
    import queue
    q: queue.Queue = queue.Queue()
    q.put(b"m0")

    def requests():
        for _ in range(20):
            item = q.get(timeout=10)
            if item is None:
                return
            yield item

    got = []
    for answer in stub(channel, "Bidi", "bidi")(requests(), timeout=20):
        got.append(answer)
        q.put(b"m%d" % len(got) if len(got) < 20 else None)
    assert got == [b"re:m%d" % i for i in range(20)]


def test_trailing_metadata_and_status_codes_arrive_as_the_server_sent_them(gmesh, otlp):
    _, _, channel, _ = gmesh
    answer, call = stub(channel, "Unary").with_call(b"trailers", timeout=10)
    assert answer == b"echo:trailers"
    assert ("x-custom-trailer", "kept") in tuple(call.trailing_metadata())
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:
        stub(channel, "Unary")(b"not-found", timeout=10, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no such thing"
    client, server = _spans(otlp, rid)
    assert client.attrs["rpc.grpc.status_code"] == server.attrs["rpc.grpc.status_code"] == 5
    assert client.status == "ERROR"  # any non-OK status fails a client span (OTel semconv)
    assert server.status == "UNSET"  # NOT_FOUND is the caller's doing, not the server's failure


def test_deadline_shorter_than_a_slow_server_is_deadline_exceeded(gmesh, otlp):
    _, _, channel, _ = gmesh
    # grpc-timeout reaches the app less the time spent on the way (here an injected 500 ms delay)
    remaining = float(stub(channel, "Unary")(b"time-remaining", timeout=8, metadata=(("x-delay", "yes"),)))
    assert 4.0 < remaining < 7.6
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:
        stub(channel, "Unary")(b"sleep:3", timeout=0.5, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client, server = _spans(otlp, rid)
    for span in (client, server):
        assert span.attrs["rpc.grpc.status_code"] == 4, span.attrs
        assert span.status == "ERROR"


def test_authorization_denial_is_permission_denied(gmesh, otlp):
    _, _, channel, _ = gmesh
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:
        stub(channel, "Secret")(b"metadata", timeout=10, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "RBAC: access denied"
    client, server = _spans(otlp, rid)
    assert server.attrs["mesh.response_flags"] == "RBAC" and server.attrs["rpc.grpc.status_code"] == 7
    assert server.attrs["http.response.status_code"] == 200  # trailers-only: HTTP 200, the status in grpc-status
    assert server.attrs["mesh.authz.policy"] == "no-secrets"
    assert client.attrs["rpc.grpc.status_code"] == 7


def test_local_failures_are_grpc_statuses(gmesh, otlp):
    front, _, channel, _ = gmesh
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:  # fault abort 503 -> UNAVAILABLE
        stub(channel, "Aborted")(b"x", timeout=10, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    span = otlp.wait(**{"guid:x-request-id": rid})[0]
    assert span.attrs["mesh.response_flags"] == "FI" and span.attrs["rpc.grpc.status_code"] == 14
    for authority, code, flag in (("nowhere", grpc.StatusCode.UNIMPLEMENTED, "NR"),
                                  ("dead", grpc.StatusCode.UNAVAILABLE, "UF")):
        ch = grpc_channel(front.outbound, authority)
        rid = _rid()
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub(ch, "Unary")(b"x", timeout=10, metadata=(("x-request-id", rid),))
        finally:
            ch.close()
        assert err.value.code() == code, err.value
        span = otlp.wait(**{"guid:x-request-id": rid})[0]
        assert span.attrs["mesh.response_flags"] == flag


def test_fault_abort_with_a_grpc_status(gmesh, otlp):
    front, _, channel, _ = gmesh
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:  # the route's abort: {grpc_status: RESOURCE_EXHAUSTED}
        stub(channel, "Exhausted")(b"x", timeout=10, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details() == "fault filter abort"
    span = otlp.wait(**{"guid:x-request-id": rid})[0]
    assert span.attrs["mesh.response_flags"] == "FI" and span.attrs["rpc.grpc.status_code"] == 8
    # an HTTP/1.1 request on that route gets the HTTP status gRPC maps RESOURCE_EXHAUSTED to
    req = urllib.request.Request(f"http://{front.outbound}/{SERVICE}/Exhausted", headers={"Host": "greeter"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=10)
    assert http_err.value.code == 429


def test_unavailable_is_retried_by_the_route(gmesh, otlp):
    _, _, channel, _ = gmesh
    rid = _rid()
    answer = stub(channel, "Unary")(b"unavailable-once", timeout=10,
                                    metadata=(("x-request-id", rid), ("x-retry", "yes"), ("x-attempt-key", rid)))
    assert answer == b"attempt 2"
    client = otlp.wait(service="front", **{"guid:x-request-id": rid, "mesh.route": "retried"})[0]
    assert client.attrs["mesh.retries"] == 1 and client.attrs["rpc.grpc.status_code"] == 0


def test_metrics_carry_the_grpc_status(gmesh):
    front, _, channel, admin = gmesh
    with pytest.raises(grpc.RpcError):
        stub(channel, "Unary")(b"not-found", timeout=10)
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert any('grpc_response_status="5"' in ln and 'request_protocol="grpc"' in ln for ln in lines), lines


@pytest.fixture(scope="module")
def grpc_tls(tmp_path_factory):
    """``caller`` (PERMISSIVE) and ``rpc`` (STRICT, in front of the grpcio app), whose policy lets
    only caller's identity call ``Unary``."""
    work = tmp_path_factory.mktemp("grpc-tls")
    env = MeshCaEnv(work)
    app = GrpcApp()
    cfg = work / "mesh.yaml"
    rpc = SidecarProc(work, "rpc", app.addr, env.addr, config=cfg, extra=env.sidecar_args(sid("rpc"), "strict"))
    caller = SidecarProc(work, "caller", app.addr, env.addr, config=cfg, extra=env.sidecar_args(sid("caller")))
    write_mesh(cfg, {
        "services": {
            "rpc": {"endpoints": [{"address": str(rpc.inbound)}], "mtls": "strict", "identity": str(sid("rpc"))},
            "caller": {"endpoints": [{"address": str(caller.inbound)}], "identity": str(sid("caller"))},
        },
        "policies": [{"name": "caller-only", "service": "rpc", "action": "ALLOW",
                      "rules": [{"from": {"principals": [str(sid("caller"))]},
                                 "to": {"paths": [f"/{SERVICE}/Unary"]}}]}],
    })
    channel = grpc_channel(caller.outbound, "rpc")
    with serving(start_all([rpc, caller]), channel, app, env):
        yield env, channel


def test_grpc_over_mesh_mtls_with_policies_by_principal(grpc_tls):
    env, channel = grpc_tls
    rid = _rid()
    md = json.loads(stub(channel, "Unary")(b"metadata", timeout=10, metadata=(("x-request-id", rid),)))
    assert md["x-forwarded-client-cert"] == f"By={sid('rpc')};URI={sid('caller')}"
    server = env.otlp.wait(service="rpc", **{"guid:x-request-id": rid})[0].attrs
    assert server["mesh.connection_security_policy"] == "mutual_tls" and server["network.protocol.version"] == "2"
    assert server["mesh.source.principal"] == str(sid("caller")) and server["mesh.authz.decision"] == "allow"
    rid = _rid()
    with pytest.raises(grpc.RpcError) as err:  # no ALLOW rule takes Secret
        stub(channel, "Secret")(b"x", timeout=10, metadata=(("x-request-id", rid),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    server = env.otlp.wait(service="rpc", **{"guid:x-request-id": rid})[0].attrs
    assert server["mesh.authz.decision"] == "deny" and server["rpc.grpc.status_code"] == 7
    assert server["mesh.response_flags"] == "RBAC"


@pytest.mark.parametrize("value,seconds", [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25),
                                           (b"7u", 7e-6), (b"9n", 9e-9), (b"123456789S", None), (b"1x", None),
                                           (b"", None), (None, None)])
def test_grpc_timeout_parsing(value, seconds):
    assert parse_grpc_timeout(value) == (None if seconds is None else pytest.approx(seconds))


def test_grpc_helpers():
    assert format_grpc_timeout(0.0001) == b"1m" and format_grpc_timeout(2.5) == b"2500m"
    assert grpc_message("50% off: café") == b"50%25 off: caf%C3%A9"
    assert grpc_status_for("UT", 504) == 4 and grpc_status_for("NR", 404) == 12
    assert grpc_status_for("UF,URX", 503) == 14 and grpc_status_for("RBAC", 403) == 7
    assert grpc_status_for("FI", 404) == 12 and grpc_status_for("FI", 429) == 14
    assert grpc_status_for("FI", 401) == 16 and grpc_status_for("FI", 418) == 2
