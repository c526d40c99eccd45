"""What the sidecar's HTTP/2 connection costs per received frame, against h2's own (the baseline,
same run): ``_http2._H2Connection`` receives frames without h2's eager ``repr(frame)`` for its
trace log. A server connection receives a gRPC request's HEADERS, then DATA frames of one 1 KB
message each (acknowledged as they come, as the sidecar does once it has passed them on), and
``data_to_send`` after each; also a unary call's frames (HEADERS, DATA, trailers-less end).
CPU time of this process per frame, best of several rounds (alternated), so a busy machine
inflates it less. Prints JSON. ``python benchmarks/h2_receive.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from tracemesh.proxy import _http2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEAD = [(":method", "POST"), (":scheme", "http"), (":authority", "server"), (":path", "/test.Echo/Stream"),
        ("content-type", "application/grpc"), ("te", "trailers")]


class _H2s(_http2._H2Connection):
    """The sidecar's connection with h2's own _receive_frame: the baseline."""

    _receive_frame = h2.connection.H2Connection._receive_frame


def _server(cls):
    conn = cls(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    conn.receive_data(PREFACE + SettingsFrame(0).serialize())
    conn.data_to_send()
    return conn


def _headers(sid: int, enc: hpack.Encoder, end: bool = False) -> bytes:
    f = HeadersFrame(sid)
    f.data = enc.encode(HEAD)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def streamed(cls, frames: int) -> float:
    """µs of CPU per DATA frame received on one stream."""
    conn = _server(cls)
    conn.receive_data(_headers(1, hpack.Encoder()))
    frame = DataFrame(1, b"\0\0\0\4\0" + b"x" * 1024).serialize()
    t = time.process_time()
    for _ in range(frames):
        for ev in conn.receive_data(frame):
            conn.acknowledge_received_data(ev.flow_controlled_length, 1)
        conn.data_to_send()
    return (time.process_time() - t) / frames * 1e6


def unary(cls, calls: int) -> float:
    """µs of CPU per unary call's request frames (HEADERS, DATA with END_STREAM) received."""
    conn = _server(cls)
    enc = hpack.Encoder()
    requests = []  # built before the clock starts: the client's encoding is not the server's cost
    for i in range(calls):
        body = DataFrame(2 * i + 1, b"\0\0\0\4\0" + b"x" * 1024)
        body.flags.add("END_STREAM")
        requests.append(_headers(2 * i + 1, enc) + body.serialize())
    t = time.process_time()
    for i, request in enumerate(requests):
        sid = 2 * i + 1
        for ev in conn.receive_data(request):
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        conn.reset_stream(sid)  # as the sidecar ends an exchange: the stream is closed, not kept open
        conn.data_to_send()
    return (time.process_time() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, n = (3, 1000) if args.quick else (7, 4000)
    best = {k: float("inf") for k in ("ours_stream", "h2_stream", "ours_unary", "h2_unary")}
    for _ in range(rounds):
        best["h2_stream"] = min(best["h2_stream"], streamed(_H2s, n))
        best["ours_stream"] = min(best["ours_stream"], streamed(_http2._H2Connection, n))
        best["h2_unary"] = min(best["h2_unary"], unary(_H2s, n // 4))
        best["ours_unary"] = min(best["ours_unary"], unary(_http2._H2Connection, n // 4))
    print(json.dumps({
        "benchmark": "h2_receive", "quick": args.quick, "h2": h2.__version__,
        "copy_in_use": _http2._H2Connection._receive_frame is _http2._H2Connection._receive_frame_without_repr,
        "data_frame_us": round(best["ours_stream"], 2), "h2_data_frame_us": round(best["h2_stream"], 2),
        "data_frame_ratio": round(best["ours_stream"] / best["h2_stream"], 3),
        "unary_request_us": round(best["ours_unary"], 2), "h2_unary_request_us": round(best["h2_unary"], 2),
        "unary_request_ratio": round(best["ours_unary"] / best["h2_unary"], 3),
    }))


if __name__ == "__main__":
    main()
