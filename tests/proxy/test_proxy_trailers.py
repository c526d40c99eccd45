"""Trailers through real sidecars, both ways: HTTP/1.1 chunked trailers from a client through two
sidecars to an HTTP/1.1 app and back; an HTTP/1.0 client, whose body cannot carry them, gets the
response without them; HTTP/2 trailers translated to HTTP/1.1 chunked trailers for an app declared
``http`` and back; HTTP/1.1 chunked trailers translated to HTTP/2 trailers for an app declared
``http2`` and back. Fields that must not travel as trailers (hop-by-hop ones, ``host``,
``content-length``, those named in ``Connection``) never arrive.

The apps are written on h11 and h2 directly (blocking sockets, a thread per connection), since the
stdlib server and curl do not show trailers; the HTTP/1.1 clients are h11 on a raw socket."""

from __future__ import annotations

import json
import socket
import uuid

import h2.config
import h2.connection
import h2.events
import h11
import pytest
from h2_helpers import H2Client
from sidecar_harness import SidecarProc, read_until_closed, serving, start_all, write_mesh

from rawio import H2EventServer, ThreadedServer
from tracemesh.net import Addr

#: What the apps put after a chunked response body at ``/trailers``: the first passes, the others
#: must not (``x-secret`` is named in the response head's ``Connection``).
H1_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
               b"Trailer: x-checksum\r\nConnection: close, x-secret\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n"
               b"x-checksum: sha256=abc\r\nhost: evil\r\ncontent-length: 99\r\nkeep-alive: 1\r\n"
               b"x-secret: hush\r\n\r\n")
#: ... and at ``/trailers-only``: no body at all, then trailers.
H1_RESPONSE_EMPTY = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     b"0\r\nx-checksum: none\r\n\r\n")


class H1TrailerApp(ThreadedServer):
    """An HTTP/1.1 app on h11 that records each request with its trailers (``seen``); ``/trailers``
    and ``/trailers-only`` answer chunked with trailers, anything else a JSON echo (with a length).
    Every answer closes its connection (``Connection: close``), so no reuse can race a close."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        super().__init__()

    def serve(self, s: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        req, body, trailers = None, b"", []
        try:
            with s:
                s.settimeout(10)
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(s.recv(65536))
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        trailers = [(k.decode(), v.decode()) for k, v in ev.headers]
                        break
                    else:
                        return
                path = req.target.decode()
                seen = {"method": req.method.decode(), "path": path,
                        "headers": [(k.decode(), v.decode()) for k, v in req.headers],
                        "body": body.decode(errors="replace"), "trailers": trailers}
                self.seen.append(seen)
                if path.startswith("/trailers-only"):
                    s.sendall(H1_RESPONSE_EMPTY)
                elif path.startswith("/trailers"):
                    s.sendall(H1_RESPONSE)
                else:
                    out = json.dumps(seen).encode()
                    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(out), out))
                s.shutdown(socket.SHUT_WR)
                read_until_closed(s, 2)
        except (OSError, h11.ProtocolError):
            pass


class H2TrailerApp(H2EventServer):
    """An h2c app that records each stream with its trailers (``seen``); ``/trailers`` answers a
    body and trailers, anything else a JSON echo."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.streams: dict = {}  # h2 connection -> its streams in progress
        super().__init__()

    header_encoding = "utf-8"

    def on_event(self, conn, ev) -> None:
        streams = self.streams.setdefault(conn, {})  # per connection: stream ids repeat across them
        if isinstance(ev, h2.events.RequestReceived):
            streams[ev.stream_id] = {"headers": list(ev.headers), "body": "", "trailers": []}
        elif isinstance(ev, h2.events.DataReceived):
            streams[ev.stream_id]["body"] += ev.data.decode(errors="replace")
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            streams[ev.stream_id]["trailers"] = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self._respond(conn, ev.stream_id, streams.pop(ev.stream_id))

    def _respond(self, conn, sid: int, st: dict) -> None:
        path = dict(st["headers"])[":path"]
        st["path"] = path
        self.seen.append(st)
        if path.startswith("/trailers"):
            conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain"), ("trailer", "x-checksum, x-count")])
            conn.send_data(sid, b"hello world")
            conn.send_headers(sid, [("x-checksum", "sha256=abc"), ("x-count", "2")], end_stream=True)
        else:
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json")])
            conn.send_data(sid, json.dumps(st).encode(), end_stream=True)


@pytest.fixture(scope="module")
def trmesh(otlp, tmp_path_factory):
    """``edge`` (outbound only); ``h1app`` (its sidecar in front of :class:`H1TrailerApp`, declared
    ``http``); ``h2app`` (its sidecar in front of :class:`H2TrailerApp`, declared ``http2``)."""
    work = tmp_path_factory.mktemp("trailers")
    h1, h2app = H1TrailerApp(), H2TrailerApp()
    cfg = work / "mesh.yaml"
    h1side = SidecarProc(work, "h1app", h1.addr, otlp.addr, config=cfg)
    h2side = SidecarProc(work, "h2app", h2app.addr, otlp.addr, config=cfg)
    edge = SidecarProc(work, "edge", h1.addr, otlp.addr, config=cfg)
    write_mesh(cfg, {"services": {
        "h1app": {"endpoints": [{"address": str(h1side.inbound)}],
                  "ports": [{"port": h1.addr.port, "protocol": "http"}]},
        "h2app": {"endpoints": [{"address": str(h2side.inbound)}],
                  "ports": [{"port": h2app.addr.port, "protocol": "http2"}]},
        "edge": {"endpoints": [{"address": str(edge.inbound)}]},
    }})
    with serving(start_all([h1side, h2side, edge]), h1, h2app):
        yield edge, h1side, h2side, h1, h2app


def h1_exchange(addr: Addr, method: str, path: str, headers: list, body: list[bytes] | None = None,
                trailers: list | None = None, version: bytes = b"1.1") -> tuple[h11.Response, bytes, list]:
    """One request on a fresh connection, with h11 on a raw socket (chunked when *trailers* is not
    None): the response head, its body and its trailers."""
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(addr, timeout=15) as s:
        if version == b"1.0":  # h11 speaks HTTP/1.1 only: an HTTP/1.0 client by hand
            s.sendall(f"{method} {path} HTTP/1.0\r\n".encode()
                      + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n")
            raw = read_until_closed(s, 15)
            head, _, data = raw.partition(b"\r\n\r\n")
            return head, data, []
        if trailers is not None:
            headers = [*headers, ("transfer-encoding", "chunked")]
        data = conn.send(h11.Request(method=method, target=path, headers=headers))
        for chunk in body or ():
            data += conn.send(h11.Data(data=chunk))
        data += conn.send(h11.EndOfMessage(headers=trailers or []))
        s.sendall(data)
        resp, out = None, b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(s.recv(65536))
            elif isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                out += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return resp, out, [(k.decode(), v.decode()) for k, v in ev.headers]
            else:
                raise AssertionError(f"unexpected {ev!r}")


def h2_exchange(addr: Addr, path: str, authority: str, headers: list, body: bytes = b"",
                trailers: list | None = None, method: str = "POST") -> dict:
    """One stream with h2 on a raw socket: the body as one DATA, then *trailers* (HEADERS with
    END_STREAM) if given; the response as :meth:`H2Client.response` gives it."""
    client = H2Client(addr)
    try:
        c = client.conn
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path),
                             *headers], end_stream=not body and trailers is None)
        if body:
            c.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            c.send_headers(sid, trailers, end_stream=True)
        client.sock.sendall(c.data_to_send())
        return client.response(sid)
    finally:
        client.close()


def seen_at(app, path: str) -> dict:
    return next(s for s in reversed(app.seen) if s["path"] == path)


#: Request trailers a client sends: one to pass, three that must not.
REQ_TRAILERS = [("x-sum", "42"), ("host", "evil"), ("content-length", "5"), ("keep-alive", "5")]


def test_http1_chunked_trailers_cross_two_sidecars_both_ways(trmesh, otlp):
    edge, *_, h1, _ = trmesh
    rid = f"tr1-{uuid.uuid4()}"
    resp, body, trailers = h1_exchange(edge.outbound, "POST", "/echo/1",
                                       [("host", "h1app"), ("x-request-id", rid), ("trailer", "x-sum")],
                                       [b"hello ", b"world"], REQ_TRAILERS)
    assert resp.status_code == 200
    seen = seen_at(h1, "/echo/1")
    assert seen["body"] == "hello world" and seen["trailers"] == [("x-sum", "42")]
    # the announcement is end to end (RFC 9110 6.6.2), not a hop's: it crosses both sidecars
    assert ("transfer-encoding", "chunked") in seen["headers"] and ("trailer", "x-sum") in seen["headers"]
    assert json.loads(body)["trailers"] == [["x-sum", "42"]]  # the answer had a length: no trailers there
    # a field the request's head names in Connection is that hop's alone, in its trailers too
    h1_exchange(edge.outbound, "POST", "/echo/hop", [("host", "h1app"), ("connection", "x-hop")], [b"abc"],
                [("x-sum", "1"), ("x-hop", "gone")])
    assert seen_at(h1, "/echo/hop")["trailers"] == [("x-sum", "1")]
    # a body with a length cannot carry trailers: its announcement is not passed on
    h1_exchange(edge.outbound, "POST", "/echo/cl", [("host", "h1app"), ("trailer", "x-sum"), ("content-length", "2")],
                [b"ok"])
    assert "trailer" not in [k for k, _ in seen_at(h1, "/echo/cl")["headers"]]

    resp, body, trailers = h1_exchange(edge.outbound, "GET", "/trailers", [("host", "h1app"), ("x-request-id", rid)])
    assert resp.status_code == 200 and body == b"hello world"
    assert trailers == [("x-checksum", "sha256=abc")]  # not host, content-length, keep-alive, x-secret
    assert (b"trailer", b"x-checksum") in list(resp.headers)
    resp, body, trailers = h1_exchange(edge.outbound, "GET", "/trailers-only", [("host", "h1app")])
    assert resp.status_code == 200 and body == b"" and trailers == [("x-checksum", "none")]
    spans = otlp.wait(4, **{"guid:x-request-id": rid})  # edge CLIENT and h1app SERVER, twice
    assert {s.attrs["mesh.response_flags"] for s in spans} == {"-"}


def test_an_http10_client_gets_the_body_without_trailers(trmesh, otlp):
    edge, *_ = trmesh
    for host in ("h1app", "h2app"):  # relayed HTTP/1.1, translated from HTTP/2
        rid = f"tr10-{uuid.uuid4()}"
        head, body, _ = h1_exchange(edge.outbound, "GET", "/trailers", [("Host", host), ("x-request-id", rid)],
                                    version=b"1.0")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding" not in head.lower() and b"\r\ntrailer:" not in head.lower()
        assert body == b"hello world"  # close-delimited: nowhere for trailers to go (nor to announce them)
        span = otlp.wait(1, service="edge", **{"guid:x-request-id": rid})[0]
        assert span.attrs["mesh.response_flags"] == "-" and span.attrs["http.response.status_code"] == 200


def test_http2_trailers_to_an_http1_app_and_back(trmesh, otlp):
    edge, h1side, _, h1, _ = trmesh
    # no content-length: chunked to the app, with the trailers
    r = h2_exchange(edge.outbound, "/echo/h2-chunked", "h1app", [], b"streamed", [("x-sum", "7"), ("x-more", "yes")])
    assert r["headers"][":status"] == "200"
    seen = seen_at(h1, "/echo/h2-chunked")
    assert seen["body"] == "streamed" and seen["trailers"] == [("x-sum", "7"), ("x-more", "yes")]
    assert ("transfer-encoding", "chunked") in seen["headers"]
    # a content-length and trailers announced (``trailer``): chunked instead, the trailers delivered,
    # straight to the app's sidecar and through both (the HTTP/1.1 hop between keeps the announcement)
    for via, path in ((h1side.inbound, "/echo/h2-announced"), (edge.outbound, "/echo/h2-announced-2")):
        r = h2_exchange(via, path, "h1app", [("content-length", "5"), ("trailer", "x-sum")], b"12345", [("x-sum", "8")])
        assert r["headers"][":status"] == "200"
        seen = seen_at(h1, path)
        names = [k for k, _ in seen["headers"]]
        assert seen["body"] == "12345" and seen["trailers"] == [("x-sum", "8")]
        assert "content-length" not in names and ("transfer-encoding", "chunked") in seen["headers"]
        assert names.count("trailer") == 1 and ("trailer", "x-sum") in seen["headers"]
    # a content-length and unannounced trailers: the length is kept, the trailers dropped
    r = h2_exchange(edge.outbound, "/echo/h2-length", "h1app", [("content-length", "5")], b"12345", [("x-sum", "9")])
    assert r["headers"][":status"] == "200"
    seen = seen_at(h1, "/echo/h2-length")
    assert seen["body"] == "12345" and seen["trailers"] == [] and ("content-length", "5") in seen["headers"]
    # trailers without a body
    r = h2_exchange(edge.outbound, "/echo/h2-no-body", "h1app", [], b"", [("x-sum", "0")])
    assert r["headers"][":status"] == "200" and seen_at(h1, "/echo/h2-no-body")["trailers"] == [("x-sum", "0")]

    # the app's chunked trailers come back as HTTP/2 trailers
    rid = f"tr2-{uuid.uuid4()}"
    r = h2_exchange(edge.outbound, "/trailers", "h1app", [("x-request-id", rid)], method="GET")
    assert r["headers"][":status"] == "200" and r["body"] == b"hello world" and r["reset"] is None
    assert r["trailers"] == {"x-checksum": "sha256=abc"} and r["headers"]["trailer"] == "x-checksum"
    r = h2_exchange(edge.outbound, "/trailers-only", "h1app", [], method="GET")
    assert r["headers"][":status"] == "200" and r["body"] == b"" and r["trailers"] == {"x-checksum": "none"}
    span = otlp.wait(1, service="edge", **{"guid:x-request-id": rid})[0]
    assert span.attrs["mesh.response_flags"] == "-" and span.attrs["network.protocol.version"] == "2"


def test_http1_trailers_to_an_http2_app_and_back(trmesh):
    edge, *_, h2app = trmesh
    resp, body, _ = h1_exchange(edge.outbound, "POST", "/echo/h1", [("host", "h2app"), ("connection", "x-hop")],
                                [b"abc", b"def"], [*REQ_TRAILERS, ("x-hop", "gone")])
    assert resp.status_code == 200
    seen = seen_at(h2app, "/echo/h1")
    assert seen["body"] == "abcdef" and seen["trailers"] == [("x-sum", "42")]
    resp, body, trailers = h1_exchange(edge.outbound, "GET", "/trailers", [("host", "h2app")])
    assert resp.status_code == 200 and body == b"hello world"
    assert trailers == [("x-checksum", "sha256=abc"), ("x-count", "2")]
    assert (b"trailer", b"x-checksum, x-count") in list(resp.headers)  # chunked to this client: announced


def test_trailer_fields_pass_only_where_the_framing_has_room():
    from tracemesh.proxy._http1 import _end_of_message, _trailer_fields

    sent = [(b"x-sum", b"1"), (b"host", b"h"), (b"content-length", b"3"), (b"te", b"trailers"),
            (b"connection", b"x-other"), (b"x-other", b"o"), (b"x-named", b"n"), (b"authorization", b"a")]
    assert _trailer_fields(sent, frozenset({b"x-named"})) == [(b"x-sum", b"1")]
    assert _trailer_fields(None) == [] and _trailer_fields([(b":status", b"200")]) == []

    def answering(request: bytes, headers: list) -> h11.Connection:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(request)
        assert isinstance(conn.next_event(), h11.Request)
        conn.send(h11.Response(status_code=200, headers=headers))
        return conn

    v11, v10 = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"
    conn = answering(v11, [])  # no length, an HTTP/1.1 client: h11 chunks the body
    assert conn.send(_end_of_message(conn, sent, [(b"connection", b"x-named")])) == b"0\r\nx-sum: 1\r\n\r\n"
    conn = answering(v10, [])  # close-delimited for HTTP/1.0: nowhere for trailers (h11 would raise)
    assert conn.send(_end_of_message(conn, sent)) == b""
    conn = answering(v11, [(b"content-length", b"0")])  # a length: neither
    assert conn.send(_end_of_message(conn, sent)) == b""
    conn = answering(v11, [])
    assert conn.send(_end_of_message(conn, [(b"host", b"h")])) == b"0\r\n\r\n"  # nothing left to pass
