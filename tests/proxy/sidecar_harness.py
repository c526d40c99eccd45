"""Real parts for the sidecar's integration tests: an OTLP/gRPC trace receiver, stdlib upstream
apps with scripted behaviours, and the sidecar itself as a ``tracemesh sidecar`` subprocess.

Imported by the tests of this folder (pytest puts the folder on ``sys.path``); fixtures live in
``conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from rawio import read_until_closed  # noqa: F401 (theirs too, for the tests of this folder)

from tracemesh._proc import DIE_WITH_PARENT
from tracemesh.net import Addr, free_port, wait_for_port

START_TIMEOUT_S = 20.0


# -- OTLP receiver ---------------------------------------------------------------------------

def any_value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


@dataclass
class RecvSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str  # SERVER, CLIENT, ...
    start_ns: int
    end_ns: int
    attrs: dict
    status: str  # UNSET, OK, ERROR
    status_message: str
    resource: dict
    scope: tuple[str, str]
    trace_state: str = ""


@dataclass
class RecvLog:
    trace_id: str
    span_id: str
    flags: int
    time_ns: int
    observed_ns: int
    severity: tuple[int, str]
    body: str
    attrs: dict
    resource: dict
    scope: tuple[str, str]


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: "OTLPReceiver") -> None:
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        got = []
        for rl in request.resource_logs:
            resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    got.append(RecvLog(r.trace_id.hex(), r.span_id.hex(), r.flags, r.time_unix_nano,
                                       r.observed_time_unix_nano, (r.severity_number, r.severity_text),
                                       any_value(r.body), {kv.key: any_value(kv.value) for kv in r.attributes},
                                       resource, (sl.scope.name, sl.scope.version)))
        rec = self.receiver
        with rec._cond:
            rec.logs.extend(got)
            rec._cond.notify_all()
        return ExportLogsServiceResponse()


class OTLPReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A grpcio TraceService that keeps every span it is sent, and a LogsService that keeps every
    log record (:attr:`logs`). *handlers* are served beside them on the same port, as the collector
    serves the mesh CA's bootstrap door beside OTLP."""

    def __init__(self, handlers: tuple = (), port: int = 0) -> None:
        self.spans: list[RecvSpan] = []
        self.logs: list[RecvLog] = []
        self.requests = 0
        self._cond = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(self), self.server)
        if handlers:
            self.server.add_generic_rpc_handlers(tuple(handlers))
        port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.addr = Addr("127.0.0.1", port)
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        got = []
        for rs in request.resource_spans:
            resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(RecvSpan(
                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                        Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        s.start_time_unix_nano, s.end_time_unix_nano,
                        {kv.key: any_value(kv.value) for kv in s.attributes},
                        Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"), s.status.message,
                        resource, (ss.scope.name, ss.scope.version), s.trace_state,
                    ))
        with self._cond:
            self.requests += 1
            self.spans.extend(got)
            self._cond.notify_all()
        return ExportTraceServiceResponse()

    def _match(self, service: str | None, attrs: dict) -> list[RecvSpan]:
        return [s for s in self.spans if (service is None or s.resource.get("service.name") == service)
                and all(s.attrs.get(k) == v for k, v in attrs.items())]

    def find(self, service: str | None = None, **attrs) -> list[RecvSpan]:
        """Spans (of *service*, if given) whose attributes include *attrs*."""
        with self._cond:
            return self._match(service, attrs)

    def wait(self, count: int = 1, timeout: float = 10.0, service: str | None = None, **attrs) -> list[RecvSpan]:
        """Spans as :meth:`find` finds them, once there are at least *count* of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._match(service, attrs)
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    break
                self._cond.wait(left)
        assert len(found) >= count, f"expected {count} span(s) of {service or 'any service'} with {attrs}, got {len(found)}: {found}"
        return found

    def wait_logs(self, count: int = 1, timeout: float = 10.0, service: str | None = None, **attrs) -> list[RecvLog]:
        """Log records (of *service*, if given) whose attributes include *attrs*, once there are at
        least *count* of them."""
        def match():
            return [r for r in self.logs if (service is None or r.resource.get("service.name") == service)
                    and all(r.attrs.get(k) == v for k, v in attrs.items())]
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(found := match()) < count and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        assert len(found) >= count, f"expected {count} log record(s) with {attrs}, got {len(found)}: {found}"
        return found

    def close(self) -> None:
        self.server.stop(grace=None)


# -- upstream apps ---------------------------------------------------------------------------

PATTERN = bytes(range(256)) * 256  # 64 KiB, repeated for large bodies


def pattern_bytes(n: int):
    """The deterministic body of ``/bytes/N``, in chunks."""
    while n > 0:
        chunk = PATTERN[:min(n, len(PATTERN))]
        n -= len(chunk)
        yield chunk


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern_bytes(n):
        h.update(chunk)
    return h.hexdigest()


@dataclass
class Seen:
    method: str
    target: str
    headers: dict  # lowercased names; the last value of a repeated header
    header_list: list
    body_len: int
    body_sha256: str
    client: tuple  # (host, port) of the connection it arrived on


class _AppHandler(BaseHTTPRequestHandler):
    """Scripted behaviours, chosen by path:

    ``/status/N``   answer N with no body
    ``/bytes/N``    N pattern bytes with a Content-Length
    ``/stream/N``   N pattern bytes, close-delimited (no length, no chunking)
    ``/sleep/S``    answer after S seconds
    ``/close``      close the connection without answering
    ``/garbage``    answer with a head that is not HTTP, then close
    ``/banner``     answer with a line of another protocol (an SSH banner), then close
    ``/half-head``  send half a response head, then close
    ``/truncate``   promise 100000 bytes, send 1000, close
    anything else   200 with a JSON echo of the request (method, target, headers, body digest)
    """

    protocol_version = "HTTP/1.1"
    server_version = "test-upstream"

    def setup(self) -> None:
        self.timeout = self.server.upstream.idle_timeout  # read by StreamRequestHandler.setup
        super().setup()

    def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's signature)
        pass

    def _read_body(self) -> tuple[int, str]:
        """Length and SHA-256 of the request body; ConnectionError when it is cut short."""
        h = hashlib.sha256()
        n = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError("body cut")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        raise ConnectionError("body cut")
                    h.update(chunk)
                    left -= len(chunk)
                n += size
                self.rfile.readline()  # CRLF after the chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("body cut")
                h.update(chunk)
                n += len(chunk)
                left -= len(chunk)
        return n, h.hexdigest()

    def _handle(self) -> None:
        up = self.server.upstream
        try:
            n, sha = self._read_body()
        except ConnectionError:
            n, sha = -1, "cut"  # recorded as such; nothing to answer on a broken connection
            self.close_connection = True
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                    [(k.lower(), v) for k, v in self.headers.items()], n, sha, self.client_address)
        up.record(seen)
        path = self.path.split("?")[0]
        if n < 0:
            return
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            self.send_response(code)
            if code == 304:
                self.send_header("ETag", '"v1"')
            elif code != 204:
                self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/bytes/") or path.startswith("/stream/"):
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if path.startswith("/bytes/"):
                self.send_header("Content-Length", str(size))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                for chunk in pattern_bytes(size):
                    self.wfile.write(chunk)
        elif path.startswith("/sleep/"):
            time.sleep(float(path.split("/")[2]))
            self._json(200, {"slept": True})
        elif path == "/close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif path in ("/garbage", "/banner", "/half-head"):
            self.wfile.write({"/garbage": b"this is not an HTTP response\r\n\r\n",
                              "/banner": b"SSH-2.0-OpenSSH_9.2\r\n",
                              "/half-head": b"HTTP/1.1 200 OK\r\nContent-Le"}[path])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif path == "/truncate":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._json(200, {"service": up.name, "method": self.command, "target": self.path,
                             "headers": seen.headers, "body_len": n, "body_sha256": sha})

    def _json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # peers going away is what some tests are about
            super().handle_error(request, client_address)


class StatusApp:
    """An app that answers every request (GET, POST) with one empty *status* response and counts
    the requests; :meth:`hold` runs before each answer (a subclass makes the app hang there)."""

    def __init__(self, status: int) -> None:
        app = self
        self.hits = 0
        self.status = status  # a test may heal (or break) the app while it runs
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with app._lock:
                    app.hits += 1
                app.hold()
                self.send_response(app.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = Addr("127.0.0.1", self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def hold(self) -> None:
        pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Upstream:
    """A real HTTP/1.1 app (stdlib ThreadingHTTPServer) in a thread of the test process.

    *idle_timeout*: close a kept-alive connection idle this long (as many servers do).
    """

    def __init__(self, name: str = "app", idle_timeout: float | None = 30.0) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _AppHandler)
        self.server.daemon_threads = True
        self.server.upstream = self
        self.addr = Addr("127.0.0.1", self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"upstream-{name}", daemon=True)
        self._thread.start()

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def requests(self, path_prefix: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.target.startswith(path_prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the sidecar -----------------------------------------------------------------------------

def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def sidecar_cmd(*, service: str, version: str, app: Addr, inbound: Addr, outbound: Addr,
                collector: Addr, config: Path | None, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "tracemesh", "sidecar", "--service", service, "--version", version,
           "--app", str(app), "--inbound", str(inbound), "--outbound", str(outbound),
           "--collector", str(collector)]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd + list(extra)


@dataclass
class SidecarProc:
    """``tracemesh sidecar`` as a child process, its output in files under *workdir*."""

    workdir: Path
    service: str
    app: Addr
    collector: Addr
    config: Path | None = None
    version: str = "v1"
    extra: tuple[str, ...] = ()  # more flags: --identity, --token-file, --mtls
    inbound: Addr = field(init=False)
    outbound: Addr = field(init=False)
    proc: subprocess.Popen | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        p_in, p_out = distinct_ports(2)
        self.inbound, self.outbound = Addr("127.0.0.1", p_in), Addr("127.0.0.1", p_out)
        self.stdout_path = self.workdir / f"sidecar-{self.service}-{self.version}-{p_in}.out"
        self.stderr_path = self.workdir / f"sidecar-{self.service}-{self.version}-{p_in}.err"

    def start(self) -> "SidecarProc":
        return self.spawn().wait_ready()

    def spawn(self) -> "SidecarProc":
        cmd = sidecar_cmd(service=self.service, version=self.version, app=self.app, inbound=self.inbound,
                          outbound=self.outbound, collector=self.collector, config=self.config, extra=self.extra)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT, *cmd[1:]], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        return self

    def wait_ready(self) -> "SidecarProc":
        # the banner is printed once both listeners are open and the signal handler is next
        deadline = time.monotonic() + START_TIMEOUT_S
        while "tracemesh sidecar" not in self.stdout():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not start in {START_TIMEOUT_S}s:\n{self.stderr()}")
            time.sleep(0.02)
        wait_for_port(self.inbound)
        wait_for_port(self.outbound)
        return self

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (err := self.stderr()):
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s:\n{err}"
            time.sleep(0.05)
        return err

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"sidecar did not stop within {timeout}s of SIGTERM:\n{self.stderr()}") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def children(self) -> list[int]:
        """Pids of the sidecar's live child processes (its workers, with ``--workers``)."""
        return live_children(self.proc.pid)


def live_children(ppid: int) -> list[int]:
    """Pids of the live (not zombie) children of *ppid*, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z" and int(fields[1]) == ppid:
            out.append(int(entry.name))
    return sorted(out)


def http_get_text(addr: Addr, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET http://addr/path on a fresh connection (an admin endpoint): (status, body)."""
    import http.client

    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_all(sidecars: list[SidecarProc]) -> list[SidecarProc]:
    """Start several sidecars at once (their imports and first certificates overlap)."""
    for sc in sidecars:
        sc.spawn()
    for sc in sidecars:
        sc.wait_ready()
    return sidecars


def write_config(path: Path, services: dict[str, list[tuple[Addr, str]]],
                 routes: dict[str, dict[str, int]] | None = None) -> Path:
    """A mesh config file for *services* ({name: [(address, version), ...]}) and weighted *routes*."""
    lines = ["services:"]
    for name, eps in services.items():
        lines.append(f"  {name}:")
        lines.append("    endpoints:" + ("" if eps else " []"))
        for addr, version in eps:
            lines.append(f"      - {{address: '{addr}', version: {version}}}")
    if routes:
        lines.append("routes:")
        for svc, weights in routes.items():
            lines.append(f"  - service: {svc}")
            lines.append("    destinations:")
            for version, weight in weights.items():
                lines.append(f"      - {{version: {version}, weight: {weight}}}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # the sidecar never reads half a file
    return path


def write_mesh(path: Path, config: dict) -> Path:
    """Any mesh config, written as JSON (which is YAML) and replaced whole."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def raw_exchange(addr: Addr, data: bytes, timeout: float = 5.0) -> bytes:
    """Send *data* on a fresh connection and read until the peer closes (or *timeout*)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        return read_until_closed(s)


def run_load(threads: list[threading.Thread], seconds: float, stop: threading.Event, join_s: float = 15.0) -> None:
    """Start *threads* (load loops that end once *stop* is set), let them run *seconds*, set *stop*
    and wait for each (at most *join_s*)."""
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(join_s)


@contextmanager
def serving(sidecars: list[SidecarProc], *others):
    """For a fixture: yield while *sidecars* serve; then they must still be alive (nothing the tests
    threw at them killed them); finally close them and *others* (apps: anything with ``close()``)."""
    try:
        yield
        for sc in sidecars:
            assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
    finally:
        for sc in sidecars:
            sc.close()
        for other in others:
            other.close()
