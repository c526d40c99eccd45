"""Fuzz the sidecar's HTTP/1.1 edge with hypothesis: whatever bytes arrive, the answer is a
well-formed HTTP/1.1 response or a closed connection, never a crash, and the sidecar goes on."""

from __future__ import annotations

import re
import socket

from hypothesis import HealthCheck, given, settings, strategies as st
from rawio import read_until_closed

_TEMPLATES = [
    b"GET /items/lamp?x=1 HTTP/1.1\r\nHost: direct\r\nUser-Agent: fuzz\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: direct\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: direct\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://direct/abs HTTP/1.1\r\nHost: direct\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
]
_JUNK = st.sampled_from([b"\r", b"\n", b"\0", b" ", b":", b"\r\n\r\n", b"\xff", b"Content-Length: 99999999999\r\n",
                         b"Transfer-Encoding: gzip, chunked\r\n", b"Host: \r\n", b"X" * 70_000, b"HTTP/2.0", b"\t"])


@st.composite
def _mutated(draw):
    data = bytearray(draw(st.sampled_from(_TEMPLATES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[i:i] = draw(_JUNK)
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] [1-5]\d\d [^\r\n]*\r\n")


def _exchange(addr, data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # end of input: an incomplete request must not wait out the header timeout
        except OSError:
            pass  # the sidecar may already have refused and closed
        return read_until_closed(s)


@given(_mutated(), st.booleans())
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_bytes_get_a_well_formed_answer_or_a_close(mesh, data, outbound):
    addr = mesh.frontend.outbound if outbound else mesh.frontend.inbound
    out = _exchange(addr, data)
    if out:
        assert _STATUS_LINE.match(out), (data[:200], out[:200])
    for sc in (mesh.frontend, mesh.catalog):
        assert sc.proc.poll() is None, sc.stderr()


def test_still_serving_after_the_fuzz(mesh):
    out = _exchange(mesh.frontend.outbound, _TEMPLATES[0])
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
