"""Request smuggling: a request framed two ways (Content-Length and Transfer-Encoding) is refused on
both listeners, never forwarded (RFC 9112 6.1), and the upstream never sees it."""

from __future__ import annotations

from sidecar_harness import raw_exchange

SMUGGLE = (b"POST /x HTTP/1.1\r\nHost: direct\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: direct\r\n\r\n")


def test_cl_te_conflict_is_refused_and_nothing_reaches_the_upstream(mesh):
    app = mesh.apps["catalog"]
    for addr in (mesh.frontend.outbound, mesh.catalog.inbound):
        out = raw_exchange(addr, SMUGGLE)
        assert out.startswith(b"HTTP/1.1 400 "), out
        assert b"Transfer-Encoding and Content-Length" in out and b"connection: close" in out.lower()
        assert out.count(b"HTTP/1.1 ") == 1  # the request hidden in the body was never served
    assert app.requests("/smuggled") == [] and app.requests("/x") == []
