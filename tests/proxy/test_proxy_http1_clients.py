"""Real clients through the sidecar: curl as an HTTP proxy client, keep-alive, chunked uploads,
large bodies both ways, Expect: 100-continue, HEAD, 204 and 304."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import uuid

from sidecar_harness import pattern_bytes, pattern_sha256, raw_exchange

BIG = 20 * 1024 * 1024


def run_curl(curl, *args, stdin=None, timeout=60):
    r = subprocess.run([curl, "-sS", "--max-time", str(timeout), *args], input=stdin, capture_output=True,
                       timeout=timeout + 10)
    return r


def test_curl_absolute_form_proxy(mesh, curl, otlp):
    rid = f"curl-{uuid.uuid4()}"
    r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "-H", f"x-request-id: {rid}",
                 "http://catalog/search?q=lamp")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["service"] == "catalog" and seen["target"] == "/search?q=lamp"
    assert seen["headers"]["host"] == "catalog" and seen["headers"]["user-agent"].startswith("curl/")
    [span] = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "outbound"})
    assert span.attrs["peer.service"] == "catalog" and span.attrs["user_agent.original"].startswith("curl/")


def test_curl_host_header_form(mesh, curl):
    r = run_curl(curl, "-H", "Host: direct:80", f"http://{mesh.frontend.outbound}/by-host")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["service"] == "catalog" and seen["headers"]["host"] == "direct:80"


def test_keep_alive_across_requests_both_sides(mesh, curl):
    app = mesh.apps["keepalive"]
    before = len(app.requests())
    urls = [f"http://keepalive/ka/{i}" for i in range(4)]
    r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "-w", "%{http_code} %{num_connects}\n",
                 *[arg for url in urls for arg in ("-o", "/dev/null", url)])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split()
    # downstream: curl opened one connection to the sidecar and reused it
    assert lines == ["200", "1", "200", "0", "200", "0", "200", "0"], lines
    # upstream: the sidecar's pool kept one connection to the app for all four
    seen = app.requests()[before:]
    assert [s.target for s in seen] == [f"/ka/{i}" for i in range(4)]
    assert len({s.client for s in seen}) == 1


def test_keep_alive_http_client_on_both_listeners(mesh):
    for addr, host in ((mesh.frontend.inbound, "frontend"), (mesh.frontend.outbound, "catalog")):
        conn = http.client.HTTPConnection(addr.host, addr.port, timeout=10)
        try:
            for i in range(5):
                conn.request("GET", f"/again/{i}", headers={"host": host})
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["target"] == f"/again/{i}"
                assert resp.getheader("connection", "").lower() != "close"
        finally:
            conn.close()


def test_chunked_upload_from_stdin(mesh, curl):
    data = b"".join(pattern_bytes(300_000))
    r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "-T", "-", "http://catalog/upload/chunked", stdin=data)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["method"] == "PUT"
    assert seen["headers"].get("transfer-encoding") == "chunked"  # stays chunked through both sidecars
    assert (seen["body_len"], seen["body_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


def test_chunked_request_with_explicit_header(mesh, curl):
    r = run_curl(curl, "-H", "Transfer-Encoding: chunked", "--data-binary", "hello chunks", "-H", "Host: direct",
                 f"http://{mesh.frontend.outbound}/upload/explicit")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["body_len"] == 12 and seen["body_sha256"] == hashlib.sha256(b"hello chunks").hexdigest()


def test_large_bodies_stream_both_ways_intact(mesh, curl, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for chunk in pattern_bytes(BIG):
            f.write(chunk)
    # upload, with a Content-Length, through two sidecars (frontend outbound, catalog inbound)
    r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "--data-binary", f"@{src}",
                 "-H", "Content-Type: application/octet-stream", "http://catalog/upload/big")
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert (seen["body_len"], seen["body_sha256"]) == (BIG, pattern_sha256(BIG))
    # download with a Content-Length, and close-delimited (the sidecar re-frames it as chunked)
    for path in (f"/bytes/{BIG}", f"/stream/{BIG}"):
        dst = tmp_path / "down.bin"
        r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "-o", str(dst), "-w", "%{http_code}",
                     f"http://catalog{path}")
        assert r.returncode == 0 and r.stdout == b"200", r.stderr
        with open(dst, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == pattern_sha256(BIG), path


def test_expect_100_continue(mesh, curl, tmp_path):
    src = tmp_path / "body.bin"
    src.write_bytes(b"".join(pattern_bytes(200_000)))
    # a long --expect100-timeout: if nobody answered 100, curl would sit and wait, not send the body
    r = run_curl(curl, "-v", "--expect100-timeout", "30", "-H", "Expect: 100-continue", "--data-binary", f"@{src}",
                 "-x", f"http://{mesh.frontend.outbound}", "http://catalog/upload/expect", timeout=20)
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode(errors="replace")
    assert "< HTTP/1.1 100" in err and "< HTTP/1.1 200" in err, err
    seen = json.loads(r.stdout)
    assert (seen["body_len"], seen["body_sha256"]) == (200_000, pattern_sha256(200_000))
    assert "expect" not in seen["headers"]  # answered by the sidecar, not relayed


def test_head_has_headers_but_no_body_and_keeps_the_connection(mesh):
    conn = http.client.HTTPConnection(mesh.frontend.outbound.host, mesh.frontend.outbound.port, timeout=10)
    try:
        conn.request("HEAD", "/bytes/12345", headers={"host": "catalog"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-length") == "12345"
        assert resp.read() == b""
        conn.request("GET", "/after-head", headers={"host": "catalog"})  # framing intact after HEAD
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["target"] == "/after-head"
    finally:
        conn.close()


def test_curl_head(mesh, curl):
    r = run_curl(curl, "-I", "-x", f"http://{mesh.frontend.outbound}", "http://catalog/bytes/4096")
    assert r.returncode == 0, r.stderr
    head = r.stdout.decode().lower()
    assert head.startswith("http/1.1 200") and "content-length: 4096" in head


def test_204_and_304_have_no_body(mesh, curl):
    conn = http.client.HTTPConnection(mesh.frontend.outbound.host, mesh.frontend.outbound.port, timeout=10)
    try:
        for code in (204, 304, 204, 304):
            conn.request("GET", f"/status/{code}", headers={"host": "catalog", "if-none-match": '"v1"'})
            resp = conn.getresponse()
            assert resp.status == code and resp.read() == b""
            assert resp.getheader("transfer-encoding") is None
        conn.request("GET", "/after-304", headers={"host": "catalog"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["target"] == "/after-304"
    finally:
        conn.close()
    r = run_curl(curl, "-x", f"http://{mesh.frontend.outbound}", "-w", "%{http_code}", "http://catalog/status/304")
    assert r.returncode == 0 and r.stdout == b"304", r.stderr


def test_http10_client(mesh):
    """An HTTP/1.0 client without Host gets its answer close-delimited, body intact."""
    out = raw_exchange(mesh.frontend.inbound, b"GET /stream/100000 HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    assert b"chunked" not in head.lower()
    assert body == b"".join(pattern_bytes(100_000))


def test_pipelined_requests_are_answered_in_order(mesh):
    out = raw_exchange(mesh.frontend.outbound, b"".join(
        b"GET /pipe/%d HTTP/1.1\r\nHost: direct\r\n%s\r\n" % (i, b"Connection: close\r\n" if i == 2 else b"")
        for i in range(3)))
    assert out.count(b"HTTP/1.1 200 ") == 3
    assert [out.index(b'"/pipe/%d"' % i) for i in range(3)] == sorted(out.index(b'"/pipe/%d"' % i) for i in range(3))
