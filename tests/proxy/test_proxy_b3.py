"""B3 and tracestate through a pair of real sidecars (frontend's outbound, then catalog's inbound,
then the catalog app), as a real OTLP receiver gets the spans."""

from __future__ import annotations

import http.client
import json
import secrets
import uuid


def _get(addr, headers: dict) -> dict:
    """GET http://catalog/b3 through *addr* (frontend's outbound); the catalog app's echo."""
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=10)
    try:
        conn.request("GET", "/b3", headers={"host": "catalog", **headers})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return json.loads(body)
    finally:
        conn.close()


def _hops(otlp, rid: str):
    """The frontend sidecar's CLIENT span and catalog sidecar's SERVER span of request *rid*."""
    spans = otlp.wait(2, **{"guid:x-request-id": rid})
    client = next(s for s in spans if s.resource["service.name"] == "frontend")
    server = next(s for s in spans if s.resource["service.name"] == "catalog")
    assert (client.kind, server.kind) == ("CLIENT", "SERVER")
    return client, server


def test_b3_single_header_makes_one_connected_trace(mesh, otlp):
    trace, caller, grand, rid = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(8), str(uuid.uuid4())
    seen = _get(mesh.frontend.outbound, {"b3": f"{trace}-{caller}-1-{grand}", "x-request-id": rid})
    client, server = _hops(otlp, rid)
    assert client.trace_id == server.trace_id == trace  # the B3 trace, not a new one
    assert client.parent_span_id == caller and server.parent_span_id == client.span_id
    h = seen["headers"]
    # the app gets B3 in the form that came in, naming the catalog sidecar's span (as Envoy does)
    assert h["b3"] == f"{trace}-{server.span_id}-1-{client.span_id}"
    assert h["traceparent"] == f"00-{trace}-{server.span_id}-01"
    assert not any(k.startswith("x-b3-") for k in h)


def test_b3_multi_headers_64_bit_make_one_connected_trace(mesh, otlp):
    trace64, caller, rid = secrets.token_hex(8), secrets.token_hex(8), str(uuid.uuid4())
    seen = _get(mesh.frontend.outbound, {"X-B3-TraceId": trace64, "X-B3-SpanId": caller, "X-B3-Sampled": "1",
                                          "x-request-id": rid})
    client, server = _hops(otlp, rid)
    assert client.trace_id == server.trace_id == "0" * 16 + trace64  # left-padded to 128 bits
    assert client.parent_span_id == caller and server.parent_span_id == client.span_id
    h = seen["headers"]
    assert (h["x-b3-traceid"], h["x-b3-spanid"], h["x-b3-parentspanid"], h["x-b3-sampled"]) == (
        trace64, server.span_id, client.span_id, "1")  # the width it came in, our spans
    assert "b3" not in h


def test_traceparent_wins_over_b3_and_b3_still_names_our_span(mesh, otlp):
    trace, parent, rid = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
    seen = _get(mesh.frontend.outbound, {"traceparent": f"00-{trace}-{parent}-01", "x-request-id": rid,
                                          "b3": f"{secrets.token_hex(16)}-{secrets.token_hex(8)}-1"})
    client, server = _hops(otlp, rid)
    assert client.trace_id == trace and client.parent_span_id == parent
    assert seen["headers"]["b3"] == f"{trace}-{server.span_id}-1-{client.span_id}"


def test_b3_deny_is_not_recorded(mesh, otlp):
    rid = str(uuid.uuid4())
    seen = _get(mesh.frontend.outbound, {"b3": "0", "x-request-id": rid})
    assert seen["headers"]["traceparent"].endswith("-00")  # the decision travels on, in both forms
    assert seen["headers"]["b3"].split("-")[2] == "0"
    # a later request's spans arrive, this one's never do
    rid2 = str(uuid.uuid4())
    _get(mesh.frontend.outbound, {"x-request-id": rid2})
    otlp.wait(2, **{"guid:x-request-id": rid2})
    assert otlp.find(**{"guid:x-request-id": rid}) == []


def test_tracestate_reaches_the_app_and_both_spans(mesh, otlp):
    trace, parent, rid = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
    state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    seen = _get(mesh.frontend.outbound, {"traceparent": f"00-{trace}-{parent}-01", "x-request-id": rid,
                                          "tracestate": state.replace(",", " , ")})
    assert seen["headers"]["tracestate"] == state
    client, server = _hops(otlp, rid)
    assert client.trace_state == server.trace_state == state  # Span.trace_state, as OTLP carries it
    # an invalid tracestate is dropped, not passed on
    rid = str(uuid.uuid4())
    seen = _get(mesh.frontend.outbound, {"traceparent": f"00-{trace}-{parent}-01", "x-request-id": rid,
                                          "tracestate": "Bad Key=1"})
    assert "tracestate" not in seen["headers"]
    client, server = _hops(otlp, rid)
    assert client.trace_state == server.trace_state == ""
