"""Failure mapping (Envoy response flags and statuses) and hostile downstreams."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
import uuid

import httpx
import pytest

from sidecar_harness import raw_exchange


def outbound_get(mesh, service, path, headers=None, timeout=10.0):
    rid = f"fail-{uuid.uuid4()}"
    conn = http.client.HTTPConnection(mesh.frontend.outbound.host, mesh.frontend.outbound.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"host": service, "x-request-id": rid, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), rid
    finally:
        conn.close()


def client_span(otlp, rid):
    [span] = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "outbound"})
    return span


def test_unknown_service_is_404_nr(mesh, otlp):
    status, body, rid = outbound_get(mesh, "nosuchservice", "/x")
    assert status == 404 and b"no route" in body
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "NR" and span.attrs["http.response.status_code"] == 404
    assert span.status == "ERROR" and "nosuchservice" in span.status_message
    assert span.name == "GET unknown"


def test_service_without_endpoints_is_503_uh(mesh, otlp):
    status, body, rid = outbound_get(mesh, "empty", "/x")
    assert status == 503
    assert client_span(otlp, rid).attrs["mesh.response_flags"] == "UH"


def test_nothing_listening_is_503_uf(mesh, otlp):
    status, body, rid = outbound_get(mesh, "dead", "/x")
    assert status == 503 and b"connect" in body
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "UF" and span.attrs["http.response.status_code"] == 503
    assert span.attrs["mesh.upstream.endpoint"] == str(mesh.dead) and span.status == "ERROR"


def test_upstream_closing_without_an_answer_is_503_uc(mesh, otlp):
    status, body, rid = outbound_get(mesh, "direct", "/close")
    assert status == 503
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "UC" and span.attrs["http.response.status_code"] == 503


def test_upstream_closing_inside_the_response_head_is_503_uc(mesh, otlp):
    status, body, rid = outbound_get(mesh, "direct", "/half-head")
    assert status == 503
    assert client_span(otlp, rid).attrs["mesh.response_flags"] == "UC"


@pytest.mark.parametrize("path", ["/garbage", "/banner"])
def test_garbage_response_is_502_upe(mesh, otlp, path):
    """Not HTTP, whether or not the bytes end like a head before the upstream closes."""
    status, body, rid = outbound_get(mesh, "direct", path)
    assert status == 502
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "UPE" and span.attrs["http.response.status_code"] == 502
    assert span.status == "ERROR"


def test_failures_behind_the_callee_sidecar_reach_the_caller(mesh, otlp):
    """Two hops: the catalog sidecar maps its app's garbage to 502, the frontend relays the 502."""
    status, _, rid = outbound_get(mesh, "catalog", "/garbage")
    assert status == 502
    [inn] = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "inbound"})
    out = client_span(otlp, rid)
    assert inn.attrs["mesh.response_flags"] == "UPE" and inn.status == "ERROR"
    assert out.attrs["mesh.response_flags"] == "-" and out.attrs["http.response.status_code"] == 502


def test_upstream_dying_mid_body_cuts_the_downstream(mesh, otlp):
    rid = f"cut-{uuid.uuid4()}"
    conn = http.client.HTTPConnection(mesh.frontend.outbound.host, mesh.frontend.outbound.port, timeout=10)
    try:
        conn.request("GET", "/truncate", headers={"host": "direct", "x-request-id": rid})
        resp = conn.getresponse()
        assert resp.status == 200  # the head had already gone out
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert len(info.value.partial) == 1000
    finally:
        conn.close()
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "UC" and span.status == "ERROR"
    assert span.attrs["http.response.status_code"] == 200 and span.attrs["http.response.body.size"] == 1000


def test_curl_sees_the_cut_body(mesh, curl):
    r = subprocess.run([curl, "-sS", "--max-time", "10", "-x", f"http://{mesh.frontend.outbound}", "-o", "/dev/null",
                        "http://direct/truncate"], capture_output=True, timeout=20)
    assert r.returncode == 18, r.stderr  # CURLE_PARTIAL_FILE: the transfer ended early


def test_stale_kept_alive_upstream_connection_is_retried(mesh, otlp):
    app = mesh.apps["stale"]  # closes connections idle for 0.3 s
    before = len(app.requests())
    status, _, _ = outbound_get(mesh, "stale", "/one")
    assert status == 200
    time.sleep(0.8)  # the app has closed the pooled connection by now; the sidecar does not know yet
    status, body, rid = outbound_get(mesh, "stale", "/two")
    assert status == 200, body
    seen = app.requests()[before:]
    assert [s.target for s in seen] == ["/one", "/two"]
    assert seen[0].client != seen[1].client  # the second went on a fresh connection
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "-" and span.status == "UNSET"


def test_downstream_giving_up_mid_upload_is_dc(mesh, otlp):
    rid = f"dc-{uuid.uuid4()}"
    s = socket.create_connection(mesh.frontend.outbound, timeout=10)
    s.sendall(b"POST /abandoned HTTP/1.1\r\nHost: direct\r\nx-request-id: " + rid.encode()
              + b"\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 100_000)
    time.sleep(0.3)
    s.close()
    span = client_span(otlp, rid)
    assert span.attrs["mesh.response_flags"] == "DC" and span.attrs["http.request.body.size"] == 100_000
    # the upstream saw a cut body, not a complete request
    deadline = time.monotonic() + 5
    while not mesh.apps["catalog"].requests("/abandoned") and time.monotonic() < deadline:
        time.sleep(0.05)
    [seen] = mesh.apps["catalog"].requests("/abandoned")
    assert seen.body_len == -1


# -- hostile downstreams ---------------------------------------------------------------------

def test_malformed_request_line_is_400_and_the_sidecar_goes_on(mesh):
    for addr in (mesh.frontend.inbound, mesh.frontend.outbound):
        for junk in (b"GARBAGE\r\n\r\n", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n"):
            out = raw_exchange(addr, junk)
            assert out.startswith(b"HTTP/1.1 400 "), (junk, out)
            assert b"connection: close" in out.lower()
    status, _, _ = outbound_get(mesh, "direct", "/still-serving")
    assert status == 200


def test_headers_over_64k_are_431(mesh):
    # heads the app itself would take (few headers, each line < 64 KiB): only the sidecar's limit applies
    heads = [
        b"GET /big HTTP/1.1\r\nHost: direct\r\n" + b"".join(b"X-Big%d: %s\r\n" % (i, b"a" * 30_000) for i in range(3)) + b"\r\n",
        b"GET /big HTTP/1.1\r\nHost: direct\r\nX-Big: " + b"a" * (65 * 1024) + b"\r\n\r\n",
        b"GET /big HTTP/1.1\r\nHost: direct\r\n" + b"X-Huge: " + b"a" * (200 * 1024) + b"\r\n\r\n",
    ]
    for addr in (mesh.frontend.outbound, mesh.frontend.inbound):
        for head in heads:
            assert len(head) > 64 * 1024
            out = raw_exchange(addr, head)
            assert out.startswith(b"HTTP/1.1 431 "), out[:200]
            assert b"test-upstream" not in out  # the sidecar answered, nothing was forwarded
    assert mesh.apps["catalog"].requests("/big") == [] and mesh.apps["frontend"].requests("/big") == []
    # just under the limit goes through
    ok = b"GET /near-limit HTTP/1.1\r\nHost: direct\r\nConnection: close\r\nX-Big: " + b"a" * (60 * 1024) + b"\r\n\r\n"
    out = raw_exchange(mesh.frontend.outbound, ok)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]


def test_outbound_request_naming_no_service_is_400(mesh):
    out = raw_exchange(mesh.frontend.outbound, b"GET /x HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") or out.startswith(b"HTTP/1.0 400 "), out


def test_slowloris_is_dropped_after_the_header_timeout_while_others_are_served(mesh):
    """A client trickling its head a byte at a time is cut at the 10 s header deadline, not
    kept forever by each byte resetting a per-read timer."""
    s = socket.create_connection(mesh.frontend.inbound, timeout=20)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
    t0 = time.monotonic()
    closed = threading.Event()
    answer = []

    def trickle():
        try:
            while not closed.is_set() and time.monotonic() - t0 < 18:
                s.sendall(b"X")
                closed.wait(1.0)
        except OSError:
            pass

    def read():
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        answer.append((time.monotonic() - t0, data))
        closed.set()

    threads = [threading.Thread(target=trickle), threading.Thread(target=read)]
    for t in threads:
        t.start()
    try:
        served = 0
        with httpx.Client(timeout=5) as client:
            while not closed.is_set() and time.monotonic() - t0 < 18:
                r = client.get(f"http://{mesh.frontend.inbound}/meanwhile")
                assert r.status_code == 200
                served += 1
                closed.wait(0.5)
        assert served >= 10  # served all along, on the same sidecar
    finally:
        closed.wait(20)
        s.close()
        for t in threads:
            t.join(5)
    elapsed, data = answer[0]
    assert 9.0 < elapsed < 13.0, (elapsed, data)
    assert data.startswith(b"HTTP/1.1 408 "), data
