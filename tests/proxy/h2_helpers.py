"""Real HTTP/2 and gRPC parts for the sidecar's tests: an h2c app (the ``h2`` library on blocking
sockets, one thread per connection, independent of the sidecar's own HTTP/2 code), a grpcio
server with generic handlers (raw bytes, no generated code), and a mesh of two sidecars in front
of each.

Imported by the tests of this folder (pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions

from sidecar_harness import read_until_closed

from rawio import ThreadedServer
from tracemesh.net import Addr

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2App(ThreadedServer):
    """An h2c (prior knowledge) app. Behaviours by path:

    ``/bytes/N``     N bytes of ``x`` (flow control respected)
    ``/status/N``    answer N, no body
    ``/trailers``    200, a body, and trailers ``x-trailer: yes``
    ``/sleep/S``     answer after S seconds
    ``/reset``       RST_STREAM (INTERNAL_ERROR) instead of an answer
    anything else    200, a JSON echo: method, path, authority, headers, body length and SHA-256
    """

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.resets: list[int] = []  # stream resets received from the sidecar (error codes)
        super().__init__()

    def serve(self, s: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        lock = threading.Lock()
        window = threading.Condition(lock)
        streams: dict[int, dict] = {}

        def send() -> None:
            data = conn.data_to_send()
            if data:
                s.sendall(data)

        def respond(sid: int) -> None:
            st = streams[sid]
            path = st["headers"][":path"]
            with lock:
                self.seen.append({"path": path, "headers": st["headers"], "body_len": len(st["body"])})
            if path.startswith("/sleep/"):
                time.sleep(float(path.split("/")[2]))
            with lock:
                try:
                    if path == "/reset":
                        conn.reset_stream(sid, 2)
                        send()
                        return
                    if path.startswith("/status/"):
                        conn.send_headers(sid, [(":status", path.split("/")[2])], end_stream=True)
                        send()
                        return
                    trailers = path == "/trailers"
                    if path.startswith("/bytes/"):
                        body, ctype = b"x" * int(path.split("/")[2]), "application/octet-stream"
                    else:
                        body = json.dumps({"method": st["headers"][":method"], "path": path,
                                           "authority": st["headers"].get(":authority"),
                                           "headers": st["headers"], "body_len": len(st["body"]),
                                           "body_sha256": hashlib.sha256(st["body"]).hexdigest()}).encode()
                        ctype = "application/json"
                    conn.send_headers(sid, [(":status", "200"), ("content-type", ctype)])
                    send()
                    off = 0
                    while off < len(body) or not body:
                        while conn.local_flow_control_window(sid) <= 0:
                            window.wait(10)
                        n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - off)
                        last = off + n == len(body)
                        conn.send_data(sid, body[off:off + n], end_stream=last and not trailers)
                        off += n
                        send()
                        if last:
                            break
                    if trailers:
                        conn.send_headers(sid, [("x-trailer", "yes")], end_stream=True)
                        send()
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
                    pass

        try:
            with lock:
                send()
            while True:
                data = s.recv(65536)
                if not data:
                    return
                with lock:
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            streams[ev.stream_id] = {"headers": dict(ev.headers), "body": b""}
                        elif isinstance(ev, h2.events.DataReceived):
                            streams[ev.stream_id]["body"] += ev.data
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        elif isinstance(ev, h2.events.StreamEnded):
                            threading.Thread(target=respond, args=(ev.stream_id,), daemon=True).start()
                        elif isinstance(ev, h2.events.StreamReset):
                            self.resets.append(ev.error_code)
                        window.notify_all()
                    send()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            s.close()


# -- gRPC ------------------------------------------------------------------------------------

SERVICE = "test.Echo"


class ScriptedH2App(ThreadedServer):
    """An h2c app (h2 for the connection's own frames) that answers each request with raw bytes:
    ``answer(stream_id)``, whatever they are. ``requests`` counts the requests it received,
    ``goaway_codes`` are the codes of the GOAWAYs it received."""

    def __init__(self, answer=lambda sid: b"") -> None:
        super().__init__()
        self.answer = answer
        self.requests = 0
        self.goaway_codes: list[int] = []

    def serve(self, s: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        try:
            with s:
                s.sendall(conn.data_to_send())
                while data := s.recv(65536):
                    raw = b""
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            self.requests += 1
                            raw += self.answer(ev.stream_id)
                        elif isinstance(ev, h2.events.ConnectionTerminated):
                            self.goaway_codes.append(int(ev.error_code))
                    s.sendall(conn.data_to_send() + raw)
        except (OSError, h2.exceptions.ProtocolError):
            pass


class BadHpackApp(ScriptedH2App):
    """Answers every request with a header block that cannot be decoded: ``:status 200``, then an
    indexed field past the static table, the dynamic table being empty. Its peer must end the
    connection with COMPRESSION_ERROR."""

    def __init__(self) -> None:  # HEADERS, END_HEADERS | END_STREAM
        super().__init__(lambda sid: frame(0x1, 0x5, sid, b"\x88\xe4"))


def _unary(request: bytes, context) -> bytes:
    md = dict(context.invocation_metadata())
    if request == b"not-found":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request.startswith(b"sleep:"):
        time.sleep(float(request[6:]))
    if request == b"trailers":
        context.set_trailing_metadata((("x-custom-trailer", "kept"),))
    if request == b"metadata":
        return json.dumps(md).encode()
    if request == b"time-remaining":
        return f"{context.time_remaining()}".encode()
    if request == b"unavailable-once":
        # fails the first call per x-attempt-key, then succeeds: for retries
        key = md.get("x-attempt-key", "")
        with _attempts_lock:
            _attempts[key] = _attempts.get(key, 0) + 1
            n = _attempts[key]
        if n == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return f"attempt {n}".encode()
    return b"echo:" + request


_attempts: dict[str, int] = {}
_attempts_lock = threading.Lock()


def _server_stream(request: bytes, context):
    n = int(request or b"3")
    for i in range(n):
        yield f"item {i}".encode()


def _client_stream(requests, context) -> bytes:
    total = 0
    count = 0
    for r in requests:
        total += len(r)
        count += 1
    return f"{count} messages, {total} bytes".encode()


def _bidi(requests, context):
    for r in requests:
        yield b"re:" + r


class GrpcApp:
    """A grpcio server with ``test.Echo``'s Unary, ServerStream, ClientStream and Bidi methods."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc-app"))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Secret": grpc.unary_unary_rpc_method_handler(_unary),  # denied by the tests' policy
            "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        })
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = Addr("127.0.0.1", port)
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)


def grpc_channel(addr: Addr, authority: str) -> grpc.Channel:
    """A plaintext channel (h2c prior knowledge) to *addr* that names *authority* (how the outbound
    sidecar knows the service)."""
    return grpc.insecure_channel(str(addr), options=[("grpc.default_authority", authority),
                                                     ("grpc.enable_retries", 0)])


def stub(channel: grpc.Channel, method: str, kind: str = "unary"):
    path = f"/{SERVICE}/{method}"
    return {"unary": channel.unary_unary, "server": channel.unary_stream, "client": channel.stream_unary,
            "bidi": channel.stream_stream}[kind](path)


# -- raw HTTP/2 ------------------------------------------------------------------------------


def read_frames(s: socket.socket, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every frame until the peer closes or *timeout*."""
    return split_frames(read_until_closed(s, timeout))


def split_frames(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of the HTTP/2 frames in *buf*."""
    frames = []
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        ftype, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        frames.append((ftype, flags, sid, buf[9:9 + length]))
        buf = buf[9 + length:]
    return frames


GOAWAY = 0x7


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    """One HTTP/2 frame's bytes, whatever its fields say (for what a real peer would not send)."""
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


class H2Client:
    """A raw HTTP/2 client (h2 on a blocking socket, prior knowledge) for what real clients hide:
    trailers, resetting a stream, frames after an error."""

    def __init__(self, addr: Addr, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self._out: dict[int, dict] = {}  # per stream, as its frames arrive
        self._done: set[int] = set()
        settled = False
        while not settled:  # the server's SETTINGS (its windows) before anything is sent
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            settled = any(isinstance(ev, h2.events.RemoteSettingsChanged) for ev in self.conn.receive_data(data))
            self.sock.sendall(self.conn.data_to_send())

    def start(self, path: str, authority: str, headers: tuple = (), body: bytes | None = None,
              method: str = "GET") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", authority),
                                     (":path", path), *headers], end_stream=body is None)
        if body is not None:  # at most the windows we have (callers keep bodies under them)
            step = self.conn.max_outbound_frame_size
            for off in range(0, max(1, len(body)), step):
                self.conn.send_data(sid, body[off:off + step], end_stream=off + step >= len(body))
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, 8)  # CANCEL
        self.sock.sendall(self.conn.data_to_send())

    def response(self, sid: int) -> dict:
        """Headers, body, trailers (and reset code, if reset) of stream *sid*, once it ended
        (what arrives for other streams meanwhile is kept for them)."""
        while sid not in self._done:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            for ev in self.conn.receive_data(data):
                i = getattr(ev, "stream_id", None)
                if not i:
                    continue
                out = self._out.setdefault(i, {"headers": None, "body": b"", "trailers": None, "reset": None})
                if isinstance(ev, h2.events.ResponseReceived):
                    out["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    out["body"] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, i)
                elif isinstance(ev, h2.events.TrailersReceived):
                    out["trailers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamReset):
                    out["reset"] = ev.error_code
                    self._done.add(i)
                elif isinstance(ev, h2.events.StreamEnded):
                    self._done.add(i)
            self.sock.sendall(self.conn.data_to_send())
        return self._out[sid]

    def close(self) -> None:
        self.sock.close()
