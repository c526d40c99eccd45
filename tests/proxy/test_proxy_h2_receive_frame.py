"""The sidecar's h2 connection receives frames without h2's eager ``repr(frame)``
(``_http2._H2Connection._receive_frame``, a copy of h2's less that line). Held to h2's own:
the same frame sequences (well-formed, on closed and reset streams, out of order, random) give
the same events, the same bytes to send and the same errors from both."""

import h2.config
import h2.connection
import h2.exceptions
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hyperframe.frame import (DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

from tracemesh.proxy import _http2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_the_copy_is_in_use_on_the_h2_release_installed():
    # the installed h2 is one the copy was checked against (else h2's own runs; see the module)
    lo, hi = _http2.H2_RECEIVE_FRAME_TESTED
    assert lo <= _http2._h2_version() <= hi, f"h2 {h2.__version__}: check _receive_frame against it"
    assert _http2._H2Connection._receive_frame is _http2._H2Connection._receive_frame_without_repr


def _headers(sid: int, end: bool, enc: hpack.Encoder) -> bytes:
    f = HeadersFrame(sid)
    f.data = enc.encode([(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/x")])
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def _frame(kind: str, sid: int, enc: hpack.Encoder) -> bytes:
    if kind == "headers":
        return _headers(sid, False, enc)
    if kind == "headers_end":
        return _headers(sid, True, enc)
    if kind == "data":
        f = DataFrame(sid, b"xyz")
        return f.serialize()
    if kind == "data_end":
        f = DataFrame(sid, b"xyz")
        f.flags.add("END_STREAM")
        return f.serialize()
    if kind == "rst":
        f = RstStreamFrame(sid)
        f.error_code = 8
        return f.serialize()
    if kind == "window":
        f = WindowUpdateFrame(sid)
        f.window_increment = 100
        return f.serialize()
    if kind == "ping":
        return PingFrame(0, b"12345678").serialize()
    raise AssertionError(kind)


def _feed(conn_cls, chunks: list[bytes]) -> list:
    """What a server connection of *conn_cls* makes of *chunks*: per chunk, its events (as reprs)
    and the bytes it queued, or the error it raised (after which it gets nothing more)."""
    conn = conn_cls(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    out = [conn.data_to_send()]
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except h2.exceptions.ProtocolError as exc:
            out.append(("error", type(exc).__name__, str(exc), conn.data_to_send()))
            break
        out.append(([repr(e) for e in events], conn.data_to_send()))
    return out


class _WithH2sReceiveFrame(_http2._H2Connection):
    """The sidecar's connection (its COMPRESSION_ERROR included) with h2's own _receive_frame."""

    _receive_frame = h2.connection.H2Connection._receive_frame


def _both(chunks: list[bytes]) -> None:
    assert _feed(_http2._H2Connection, chunks) == _feed(_WithH2sReceiveFrame, chunks)


@pytest.mark.parametrize("frames", [
    [("headers", 1), ("data_end", 1)],  # a request
    [("headers", 1), ("rst", 1), ("data", 1)],  # data after a reset: RST_STREAM STREAM_CLOSED back
    [("headers_end", 1), ("data", 1)],  # data after END_STREAM: a connection error
    [("headers", 5), ("data", 3)],  # a lower id, never opened (closed implicitly)
    [("headers", 3), ("rst", 3), ("headers", 7), ("window", 3)],
    [("headers", 3), ("headers_end", 1)],  # a new stream below the highest: PROTOCOL_ERROR
    # data on a reset stream that h2 has since cleaned up (a newer stream opened): STREAM_CLOSED back
    [("headers", 1), ("rst", 1), ("headers", 3), ("data", 1)],
])
def test_a_request_and_frames_on_reset_closed_and_implicitly_closed_streams(frames):
    enc = hpack.Encoder()
    _both([PREFACE + SettingsFrame(0).serialize()] + [_frame(k, sid, enc) for k, sid in frames])


_KINDS = st.sampled_from(["headers", "headers_end", "data", "data_end", "rst", "window", "ping"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(_KINDS, st.sampled_from([1, 3, 5, 7])), max_size=12), st.booleans())
def test_random_frame_sequences_get_what_h2_gives_them(frames, one_write):
    enc = hpack.Encoder()
    chunks = [PREFACE + SettingsFrame(0).serialize()] + [_frame(k, sid, enc) for k, sid in frames]
    if one_write:
        chunks = [b"".join(chunks)]
    _both(chunks)


def test_h2_still_builds_the_repr_we_skip():
    # the reason for the copy: if h2 stops building repr(frame) eagerly, the copy can go
    import inspect

    assert "repr(frame)" in inspect.getsource(h2.connection.H2Connection._receive_frame)


def test_the_benchmark_measures_both_in_one_run():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "h2_receive.py"
    out = json.loads(subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                                    check=True, timeout=120).stdout)
    assert out["copy_in_use"] is True
    for key in ("data_frame_us", "h2_data_frame_us", "unary_request_us", "h2_unary_request_us"):
        assert out[key] > 0, out
