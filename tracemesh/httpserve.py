"""A small HTTP/1.1 server for control endpoints (query API, /ready, /metrics), on Trio and h11.

Not the sidecar's data path: handlers get whole (bounded) request bodies and return whole
responses. Every connection is bounded in header size, body size, header time and idle time, so
a slow or hostile client costs one task and a few kilobytes, never a thread.

Cancellation: :func:`serve_http` runs until cancelled; cancelling it closes every connection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from tracemesh import _h1fast
from tracemesh._h11io import next_event as _next_event

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
#: Bodies of control requests are SQL text or small JSON documents; 16 MiB is generous.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: A client must send its request head within this time (slowloris protection).
HEADER_TIMEOUT_S = 10.0
#: A kept-alive connection that sends nothing for this long is closed.
IDLE_TIMEOUT_S = 60.0
#: A body must keep arriving: at most this long between two reads.
BODY_READ_TIMEOUT_S = 30.0


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: str = ""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.target).query, keep_blank_values=True).items()}

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj, status: int = 200) -> "Response":
        return cls(status, json.dumps(obj).encode() + b"\n", "application/json")

    @classmethod
    def error(cls, status: int, message: str) -> "Response":
        return cls.json({"error": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


class _ClientGone(Exception):
    pass


async def _send(conn: h11.Connection, stream: trio.abc.Stream, event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _respond(conn: h11.Connection, stream: trio.abc.Stream, resp: Response, close: bool = False,
                   head: bool = False) -> None:
    headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body))), *resp.headers]
    if close:
        headers.append(("connection", "close"))
    await _send(conn, stream, h11.Response(status_code=resp.status, headers=headers))
    if resp.body and not head:  # the answer to HEAD has the headers of GET's and no body (h11 refuses one)
        await _send(conn, stream, h11.Data(data=resp.body))
    await _send(conn, stream, h11.EndOfMessage())


async def _serve_connection(stream: trio.SocketStream, handler: Handler, max_body: int) -> None:
    conn = _h1fast.connection(h11.SERVER, MAX_HEADER_BYTES)  # h11, hostile heads refused in linear time
    try:
        peer = "%s:%s" % stream.socket.getpeername()[:2]
    except OSError:
        peer = ""
    first = True
    try:
        while True:
            try:
                event = await _next_event(conn, stream, HEADER_TIMEOUT_S if first else IDLE_TIMEOUT_S)
            except trio.TooSlowError:
                return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(conn, stream, Response.error(exc.error_status_hint, f"bad request: {exc}"), close=True)
                return
            first = False
            if isinstance(event, (h11.ConnectionClosed, h11.EndOfMessage)) or event is h11.PAUSED:
                return
            assert isinstance(event, h11.Request), event
            headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
            if {"transfer-encoding", "content-length"} <= {k for k, _ in headers}:
                # RFC 9112 6.1: framing is ambiguous (a smuggling vector); refuse, and close
                await _respond(conn, stream, Response.error(400, "bad request: both Transfer-Encoding and "
                                                                 "Content-Length"), close=True)
                return
            body = bytearray()
            too_big = False
            if conn.client_is_waiting_for_100_continue:
                await _send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
            while True:
                try:
                    ev = await _next_event(conn, stream, BODY_READ_TIMEOUT_S)
                except trio.TooSlowError:
                    return
                except h11.RemoteProtocolError as exc:
                    await _respond(conn, stream, Response.error(400, f"bad request body: {exc}"), close=True)
                    return
                if isinstance(ev, h11.Data):
                    if len(body) + len(ev.data) > max_body:
                        too_big = True
                        break
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            if too_big:
                await _respond(conn, stream, Response.error(413, f"request body larger than {max_body} bytes"), close=True)
                return
            req = Request(event.method.decode("ascii", "replace"), event.target.decode("ascii", "replace"),
                          headers, bytes(body), peer)
            try:
                resp = await handler(req)
            except Exception as exc:  # a handler bug answers 500 and is logged; the server keeps serving
                log.exception("handler failed for %s %s", req.method, req.target)
                resp = Response.error(500, f"internal error: {type(exc).__name__}: {exc}")
            await _respond(conn, stream, resp, head=req.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        return
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()


async def serve_http(
    listeners: list[trio.SocketListener],
    handler: Handler,
    *,
    max_body: int = MAX_BODY_BYTES,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *handler* on *listeners* until cancelled."""

    async def one(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(stream, handler, max_body)
        except Exception:  # one connection's bug must not take the server (and the process) down
            log.exception("connection failed")

    await trio.serve_listeners(one, listeners, task_status=task_status)
