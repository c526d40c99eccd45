"""The span contract and trace propagation of the HTTP/1.1 data path, with real sidecar processes,
real apps and a real OTLP receiver."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import uuid

import httpx


def request(addr, method, target, headers=None, body=None, timeout=10.0):
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tp_parts(value: str):
    version, trace, parent, flags = value.split("-")
    return version, trace, parent, flags


def test_inbound_server_span_is_a_child_of_the_caller(mesh, otlp):
    trace, parent, rid = secrets.token_hex(16), secrets.token_hex(8), f"rid-{uuid.uuid4()}"
    status, _, body = request(mesh.frontend.inbound, "GET", "/orders/7?expand=items&x=%20y", {
        "traceparent": f"00-{trace}-{parent}-01", "tracestate": "vendor=abc", "x-request-id": rid,
        "user-agent": "inbound-test/1"})
    assert status == 200, body
    seen = json.loads(body)
    assert seen["service"] == "frontend" and seen["target"] == "/orders/7?expand=items&x=%20y"
    h = seen["headers"]
    assert h["x-request-id"] == rid and h["tracestate"] == "vendor=abc"
    assert h["host"] == str(mesh.frontend.inbound)
    version, got_trace, got_parent, flags = tp_parts(h["traceparent"])
    assert (version, got_trace, flags) == ("00", trace, "01")
    assert got_parent != parent  # the app's parent is the sidecar's span, not the caller's

    [span] = otlp.wait(**{"guid:x-request-id": rid})
    assert (span.kind, span.trace_id, span.parent_span_id, span.span_id) == ("SERVER", trace, parent, got_parent)
    assert span.name == "GET frontend"
    assert span.status == "UNSET" and span.end_ns >= span.start_ns > 0
    a = span.attrs
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/orders/7" and a["url.query"] == "expand=items&x=%20y"
    assert a["http.response.status_code"] == 200
    assert a["mesh.direction"] == "inbound"
    assert (a["mesh.destination.service"], a["mesh.destination.version"]) == ("frontend", "v1")
    assert "mesh.source.service" not in a  # nobody vouched for the caller
    assert a["mesh.response_flags"] == "-"
    assert a["mesh.upstream.endpoint"] == str(mesh.apps["frontend"].addr)
    assert a["user_agent.original"] == "inbound-test/1"
    assert a["http.response.body.size"] == len(body)
    assert span.resource["service.name"] == "frontend" and span.resource["service.version"] == "v1"
    assert span.scope[0] == "tracemesh.proxy"


def test_outbound_client_span_then_the_callee_inbound_span(mesh, otlp):
    trace, parent, rid = secrets.token_hex(16), secrets.token_hex(8), f"rid-{uuid.uuid4()}"
    status, _, body = request(mesh.frontend.outbound, "POST", "/items?page=2", {
        "host": "catalog", "traceparent": f"00-{trace}-{parent}-01", "x-request-id": rid,
        "content-type": "application/json",
        "x-tracemesh-peer": "admin;v666",  # an app may not claim to be someone else
    }, body=b'{"name": "lamp"}')
    assert status == 200, body
    seen = json.loads(body)
    assert seen["service"] == "catalog" and seen["method"] == "POST" and seen["target"] == "/items?page=2"
    assert seen["body_len"] == 16
    h = seen["headers"]
    assert "x-tracemesh-peer" not in h  # the catalog sidecar strips it before its app
    assert h["host"] == "catalog" and h["x-request-id"] == rid

    out = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "outbound"})[0]
    inn = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "inbound"})[0]
    # one trace: caller -> frontend CLIENT -> catalog SERVER -> catalog app
    assert (out.kind, out.trace_id, out.parent_span_id) == ("CLIENT", trace, parent)
    assert (inn.kind, inn.trace_id, inn.parent_span_id) == ("SERVER", trace, out.span_id)
    assert h["traceparent"] == f"00-{trace}-{inn.span_id}-01"
    assert out.name == "POST catalog" and inn.name == "POST catalog"
    assert out.resource["service.name"] == "frontend" and inn.resource["service.name"] == "catalog"

    a = out.attrs
    assert a["peer.service"] == "catalog"
    assert (a["mesh.source.service"], a["mesh.source.version"]) == ("frontend", "v1")
    assert (a["mesh.destination.service"], a["mesh.destination.version"]) == ("catalog", "v1")
    assert a["mesh.upstream.endpoint"] == str(mesh.catalog.inbound)
    assert a["http.response.status_code"] == 200 and a["mesh.response_flags"] == "-"
    assert (a["http.request.method"], a["url.path"], a["url.query"]) == ("POST", "/items", "page=2")
    assert a["http.request.body.size"] == 16
    assert a["server.address"] == "catalog"

    b = inn.attrs
    # the frontend sidecar replaced the app's claim with its own identity
    assert (b["mesh.source.service"], b["mesh.source.version"]) == ("frontend", "v1")
    assert (b["mesh.destination.service"], b["mesh.destination.version"]) == ("catalog", "v1")
    assert b["mesh.upstream.endpoint"] == str(mesh.apps["catalog"].addr)


def test_absolute_form_target_as_an_http_proxy(mesh, otlp):
    rid = f"rid-{uuid.uuid4()}"
    with httpx.Client(proxy=f"http://{mesh.frontend.outbound}", timeout=10) as client:
        r = client.get("http://catalog.default.svc.cluster.local:8080/items/lamp?currency=eur",
                       headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["service"] == "catalog"
    assert seen["target"] == "/items/lamp?currency=eur"  # origin form towards the service
    [span] = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "outbound"})
    assert span.attrs["peer.service"] == "catalog"
    assert span.attrs["url.path"] == "/items/lamp" and span.attrs["url.query"] == "currency=eur"
    assert span.attrs["server.address"] == "catalog.default.svc.cluster.local"


def test_absolute_form_authority_wins_over_the_host_header(mesh):
    """RFC 9112 3.2.2: a proxy ignores Host when the target is absolute, and sends the target's."""
    with httpx.Client(proxy=f"http://{mesh.frontend.outbound}", timeout=10) as client:
        r = client.get("http://direct:8080/vhost", headers={"host": "elsewhere.example"})
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["host"] == "direct:8080"


def test_without_traceparent_a_new_trace_and_a_request_id(mesh, otlp):
    path = f"/fresh/{uuid.uuid4().hex}"
    status, _, body = request(mesh.frontend.inbound, "GET", path)
    assert status == 200
    h = json.loads(body)["headers"]
    rid = h["x-request-id"]
    assert uuid.UUID(rid)  # generated, and forwarded to the app
    version, trace, parent, flags = tp_parts(h["traceparent"])
    assert (version, flags) == ("00", "01") and re.fullmatch(r"[0-9a-f]{32}", trace) and trace != "0" * 32
    [span] = otlp.wait(**{"url.path": path})
    assert span.attrs["guid:x-request-id"] == rid
    assert (span.trace_id, span.span_id, span.parent_span_id) == (trace, parent, "")


def test_unsampled_requests_are_proxied_but_not_recorded(mesh, otlp):
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    quiet, loud = f"/quiet/{uuid.uuid4().hex}", f"/loud/{uuid.uuid4().hex}"
    status, _, body = request(mesh.frontend.inbound, "GET", quiet, {"traceparent": f"00-{trace}-{parent}-00"})
    assert status == 200
    version, got_trace, got_parent, flags = tp_parts(json.loads(body)["headers"]["traceparent"])
    assert (got_trace, flags) == (trace, "00")  # the decision travels on
    status, _, _ = request(mesh.frontend.inbound, "GET", loud, {"traceparent": f"00-{trace}-{parent}-01"})
    assert status == 200
    otlp.wait(**{"url.path": loud})  # spans leave in order: the quiet one would be here by now
    assert otlp.find(**{"url.path": quiet}) == []


def test_invalid_traceparent_starts_a_new_trace(mesh, otlp):
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    sent = []
    for bad in (f"00-{trace.upper()}-{parent}-01", f"00-{'0' * 32}-{parent}-01", f"ff-{trace}-{parent}-01",
                f"00-{trace}-{parent}-01-extra", f"00-{trace}-{parent[:-1]}-01", "garbage"):
        path = f"/bad-tp/{uuid.uuid4().hex}"
        status, _, body = request(mesh.frontend.inbound, "GET", path, {"traceparent": bad})
        assert status == 200
        _, got_trace, got_parent, flags = tp_parts(json.loads(body)["headers"]["traceparent"])
        assert got_trace != trace.lower() and flags == "01", bad
        sent.append((bad, path, got_trace, got_parent))
    for bad, path, got_trace, got_parent in sent:
        [span] = otlp.wait(**{"url.path": path})
        assert (span.trace_id, span.span_id, span.parent_span_id) == (got_trace, got_parent, ""), bad


def test_future_traceparent_version_is_continued(mesh, otlp):
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    path = f"/future/{uuid.uuid4().hex}"
    status, _, body = request(mesh.frontend.inbound, "GET", path, {"traceparent": f"cc-{trace}-{parent}-01-more"})
    assert status == 200
    [span] = otlp.wait(**{"url.path": path})
    assert (span.trace_id, span.parent_span_id) == (trace, parent)
    assert json.loads(body)["headers"]["traceparent"] == f"00-{trace}-{span.span_id}-01"


def test_inbound_peer_header_from_outside_is_stripped_before_the_app(mesh, otlp):
    path = f"/peer/{uuid.uuid4().hex}"
    status, _, body = request(mesh.catalog.inbound, "GET", path, {"x-tracemesh-peer": "frontend;v9"})
    assert status == 200
    assert "x-tracemesh-peer" not in json.loads(body)["headers"]
    [span] = otlp.wait(**{"url.path": path})
    # informational until mTLS: recorded as claimed, never passed on
    assert (span.attrs["mesh.source.service"], span.attrs["mesh.source.version"]) == ("frontend", "v9")


def test_hop_by_hop_headers_are_not_forwarded(mesh):
    status, _, body = request(mesh.frontend.outbound, "GET", "/hop", {
        "host": "direct", "connection": "keep-alive, x-secret", "x-secret": "1", "keep-alive": "timeout=5",
        "proxy-authorization": "Basic Zm9vOmJhcg==", "te": "trailers", "x-kept": "yes"})
    assert status == 200
    h = json.loads(body)["headers"]
    assert h["x-kept"] == "yes"
    for name in ("x-secret", "keep-alive", "proxy-authorization", "te"):
        assert name not in h, name
