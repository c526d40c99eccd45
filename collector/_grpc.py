"""The OTLP/gRPC receiver (grpcio): TraceService, MetricsService and LogsService ``Export``.

Requests arrive as raw bytes and are parsed here, so a malformed message gets INVALID_ARGUMENT
with the parser's reason instead of grpcio's generic deserialization failure. Malformed items
inside a well-formed message are refused through OTLP partial success; the rest is stored. An
export is answered only once it is in the write-ahead log; when the log is full the answer is
RESOURCE_EXHAUSTED with gRPC retry info (``google.rpc.RetryInfo`` in the status details), which
the OpenTelemetry exporters honour.

Two servers, the same answers (tests/collector/test_receiver.py runs its gRPC tests on both):

- :class:`CoreServer`, the default: grpcio's core (``grpc._cython.cygrpc``, what ``grpc.server``
  is built on) driven directly. A few worker threads poll one completion queue and each takes
  whatever comes next: a new call, a request message, a finished answer. A worker checks an
  export and writes it to the log, then goes back to polling; the answer is sent by whichever
  thread's sync made the record durable (``Pipeline.submit(on_durable=...)``). ``grpc.server``
  instead has one thread poll and hand every call to a pool thread, which sleeps until the poller
  wakes it with the message, then sleeps again in the log until its sync: ~30 context switches an
  export against ~8. Measured on benchmarks/collector.py's exports (``--layers``, 2026-11-28,
  3 alternated rounds): receiving, checking and logging cost 1.43-1.95 us a span against 2.39-2.75.
- :func:`grpc.server` with a thread pool, when grpcio's core is not as this module expects, or
  ``TRACEMESH_GRPC_SERVER=grpcio``.

``grpc._cython.cygrpc`` is not grpcio's public API, so CoreServer is chosen by itself only on the
grpcio releases it has been tested with (:data:`CORE_TESTED`: tests/collector/test_receiver.py passes
on 1.63.2, the OpenTelemetry exporters' floor, and on 1.85.3); a newer grpcio gets the thread-pool
server, with a warning, until it has been tried. ``TRACEMESH_GRPC_SERVER=core`` forces CoreServer.

Other unary methods given as ``extra_handlers`` (the mesh CA's bootstrap door) are served on the
same port by either.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures

import grpc

from tracemesh._proc import name_os_thread
from tracemesh._release import release
from tracemesh.collector._otlp import SIGNALS, OTLPError, Signal
from tracemesh.collector._pipeline import Backpressure, Pipeline

log = logging.getLogger(__name__)

#: OTLP's gRPC default is 4 MiB; collectors commonly allow more. Configurable with --max-message.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: grpc.server's pool: its exports wait in these threads for the WAL's group commit.
WORKER_THREADS = 16
#: CoreServer's workers: none of them waits for a sync, so a few keep up with any disk; more only
#: add wake-ups (16 cost 0.2-0.3 us a span more than 4 in the measurements above; 2 about the same).
CORE_WORKERS = 4
_OPTIONS = (("grpc.max_send_message_length", 4 * 1024 * 1024), ("grpc.so_reuseport", 0))

try:  # grpcio's core, as grpc.server drives it; checked once, CoreServer is not used without it
    from grpc._cython import cygrpc as _cy

    _CORE_API = (_cy.Server, _cy.CompletionQueue, _cy.CompletionType.queue_shutdown, _cy.CompletionType.queue_timeout,
                 _cy.ReceiveMessageOperation, _cy.SendInitialMetadataOperation, _cy.SendMessageOperation,
                 _cy.SendStatusFromServerOperation, _cy.ReceiveCloseOnServerOperation, _cy.StatusCode.ok)
except (ImportError, AttributeError):  # pragma: no cover - a grpcio whose core differs
    _cy = None

#: grpcio releases (major, minor) whose core CoreServer has been run against, first and last.
CORE_TESTED = ((1, 63), (1, 85))


def _grpcio_version() -> tuple[int, int]:
    return release(grpc.__version__)


def server_kind() -> str:
    """Which server :func:`start_grpc` starts: ``"core"`` or ``"grpcio"`` (see the module's doc)."""
    chosen = os.environ.get("TRACEMESH_GRPC_SERVER", "")
    if chosen not in ("", "core", "grpcio"):
        raise ValueError(f"TRACEMESH_GRPC_SERVER must be core or grpcio, not {chosen!r}")
    if chosen == "grpcio" or _cy is None:
        if chosen == "core":
            log.warning("TRACEMESH_GRPC_SERVER=core, but grpcio %s's core is not as expected: using grpc.server",
                        grpc.__version__)
        return "grpcio"
    if chosen == "core" or CORE_TESTED[0] <= _grpcio_version() <= CORE_TESTED[1]:
        return "core"
    log.warning("grpcio %s is newer than the releases the OTLP/gRPC receiver's core server was tested with "
                "(up to %d.%d): using grpc.server's thread pool (TRACEMESH_GRPC_SERVER=core to try the core server)",
                grpc.__version__, *CORE_TESTED[1])
    return "grpcio"


def _retry_info_trailer(seconds: int):
    """grpc-status-details-bin carrying google.rpc.Status with a RetryInfo, as OTLP specifies."""
    try:
        from google.rpc import code_pb2, error_details_pb2, status_pb2
    except ImportError:  # googleapis-common-protos ships with the OTLP exporters; without it, no details
        return None
    from google.protobuf import any_pb2, duration_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))
    st = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="collector is pushing back", details=[detail])
    return ("grpc-status-details-bin", st.SerializeToString())


def _pushed_back(exc: Backpressure) -> tuple[str, tuple]:
    md = _retry_info_trailer(exc.retry_after_s)
    return f"{exc}; retry in {exc.retry_after_s}s", ((md,) if md is not None else ())


# -- grpc.server ------------------------------------------------------------------------------

def _handler(signal: Signal, pipeline: Pipeline, bare: bool = False):
    def export(data: bytes, context: grpc.ServicerContext):
        if bare:
            return b""
        try:
            result = signal.accept(data)
        except OTLPError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            pipeline.submit(signal.kind, data, result.batches, result.rejected)
        except Backpressure as exc:
            message, trailers = _pushed_back(exc)
            context.set_trailing_metadata(trailers)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return signal.response(result)

    return export


def _start_pool_server(addr: str, pipeline: Pipeline, max_message: int, extra_handlers, bare: bool):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="otlp-grpc", initializer=name_os_thread),
        options=[("grpc.max_receive_message_length", max_message), *_OPTIONS],
    )
    for signal in SIGNALS.values():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(signal.grpc_service, {
            "Export": grpc.unary_unary_rpc_method_handler(
                _handler(signal, pipeline, bare), request_deserializer=None, response_serializer=lambda b: b),
        }),))
    if extra_handlers:
        server.add_generic_rpc_handlers(tuple(extra_handlers))
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {addr}")
    server.start()
    return server, port


# -- grpcio's core, driven directly -----------------------------------------------------------

class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, invocation_metadata: tuple) -> None:
        self.method, self.invocation_metadata = method, invocation_metadata


class _Context:
    """What an extra handler may ask of its ``grpc.ServicerContext`` (the CA's: peer, abort)."""

    def __init__(self, call, metadata: tuple) -> None:
        self._call, self._metadata = call, metadata
        self.trailers: tuple = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return self._call.peer().decode(errors="replace")

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)

    def set_trailing_metadata(self, trailers) -> None:
        self.trailers = tuple(trailers)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


_REQUEST, _SHUTDOWN = "request_call", "shutdown"
_E = 0  # no write flags


class CoreServer:
    """The OTLP receiver on grpcio's core (see the module's docstring). ``stop(grace)`` returns an
    event set once every worker has ended, as ``grpc.Server.stop`` does."""

    def __init__(self, pipeline: Pipeline, *, max_message: int = MAX_MESSAGE_BYTES, extra_handlers=(),
                 workers: int = CORE_WORKERS, bare: bool = False) -> None:
        self._pipeline = pipeline
        self._bare = bare
        self._exports = {f"/{s.grpc_service}/Export".encode(): s for s in SIGNALS.values()}
        self._extra = tuple(extra_handlers)
        self._server = _cy.Server((("grpc.max_receive_message_length", max_message), *_OPTIONS), False)
        self._cq = _cy.CompletionQueue()
        self._server.register_completion_queue(self._cq)
        self._n_workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._calls = 0  # started, their last batch not yet finished
        self._idle = threading.Condition(self._lock)
        self._closed = False  # after stop's grace: no batch may start any more
        self._stopping = False
        self._stopped = threading.Event()

    def add_insecure_port(self, addr: str) -> int:
        try:
            return self._server.add_http2_port(addr.encode())
        except RuntimeError:  # some grpcio releases raise where others return 0
            return 0

    def start(self) -> None:
        self._server.start()
        for _ in range(self._n_workers):  # as many calls matched at once as there are workers
            self._server.request_call(self._cq, self._cq, _REQUEST)
        for i in range(self._n_workers):
            t = threading.Thread(target=self._work, name=f"otlp-grpc_{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float | None) -> threading.Event:
        with self._lock:
            if self._stopping:
                return self._stopped
            self._stopping = True
        threading.Thread(target=self._shutdown, args=(grace or 0,), name="otlp-grpc-stop", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _shutdown(self, grace: float) -> None:
        self._server.shutdown(self._cq, _SHUTDOWN)  # no new calls; the waiting request_calls end
        with self._lock:
            self._idle.wait_for(lambda: self._calls == 0, timeout=grace)
            self._closed = True
        self._server.cancel_all_calls()
        for t in self._threads:
            t.join()
        self._stopped.set()

    # -- the workers ----------------------------------------------------------------------------

    def _work(self) -> None:
        name_os_thread()
        cq = self._cq
        while True:
            ev = cq.poll()
            kind = ev.completion_type
            if kind == _cy.CompletionType.queue_shutdown:
                return
            if kind == _cy.CompletionType.queue_timeout:
                continue
            tag = ev.tag
            try:
                if tag is _REQUEST:
                    self._new_call(ev)
                elif tag is _SHUTDOWN:
                    self._cq.shutdown()  # the workers end once what is queued is taken
                elif tag[0] == "message":
                    self._message(tag[1], tag[2], ev)
                else:  # "finished": the call's last batch is done
                    self._finished()
            except Exception:
                log.exception("OTLP/gRPC receiver: unexpected error")

    def _new_call(self, ev) -> None:
        if not ev.success:  # the server is shutting down
            return
        with self._lock:
            if not self._stopping:
                self._server.request_call(self._cq, self._cq, _REQUEST)
            self._calls += 1
        call = ev.call
        method = ev.call_details.method
        call.start_server_batch((_cy.ReceiveMessageOperation(_E),), ("message", call, (method, ev.invocation_metadata)))

    def _finished(self) -> None:
        with self._lock:
            self._calls -= 1
            if not self._calls:
                self._idle.notify_all()

    def _answer(self, call, response: bytes | None, status: grpc.StatusCode = grpc.StatusCode.OK,
                details: str = "", trailers: tuple = ()) -> None:
        ops = [_cy.SendInitialMetadataOperation((), _E)]
        if response is not None:
            ops.append(_cy.SendMessageOperation(response, _E))
        ops += [_cy.SendStatusFromServerOperation(trailers, status.value[0], details.encode(errors="replace"), _E),
                _cy.ReceiveCloseOnServerOperation(_E)]
        with self._lock:
            if not self._closed:  # else past stop's grace: the call was cancelled, its queue may be gone
                try:
                    call.start_server_batch(ops, ("finished",))
                    return
                except Exception as exc:  # the call already ended
                    log.debug("OTLP/gRPC receiver: cannot answer a call: %s", exc)
            self._calls -= 1
            if not self._calls:
                self._idle.notify_all()

    def _message(self, call, details, ev) -> None:
        method, metadata = details
        data = ev.batch_operations[0].message() if ev.success else None
        if data is None:  # cancelled, or the client sent no message
            if ev.success:
                self._answer(call, None, grpc.StatusCode.UNIMPLEMENTED,
                             f'"{method.decode(errors="replace")}" requires exactly one request message.')
            else:
                self._finished()
            return
        signal = self._exports.get(method)
        try:
            if signal is not None:
                self._export(call, signal, data)
            else:
                self._other(call, method.decode(errors="replace"), metadata, data)
        except Exception:
            log.exception("OTLP/gRPC receiver: %s failed", method.decode(errors="replace"))
            self._answer(call, None, grpc.StatusCode.UNKNOWN, "Exception calling application")

    def _export(self, call, signal: Signal, data: bytes) -> None:
        if self._bare:
            self._answer(call, b"")
            return
        try:
            result = signal.accept(data)
        except OTLPError as exc:
            self._answer(call, None, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        response = signal.response(result)

        def durable(error: Exception | None) -> None:
            if error is None:
                self._answer(call, response)
            else:
                self._answer(call, None, grpc.StatusCode.UNAVAILABLE, f"the write-ahead log could not sync: {error}")

        try:
            self._pipeline.submit(signal.kind, data, result.batches, result.rejected, on_durable=durable)
        except Backpressure as exc:
            message, trailers = _pushed_back(exc)
            self._answer(call, None, grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailers)

    def _other(self, call, method: str, metadata: tuple, data: bytes) -> None:
        """An extra handler's unary method, run in this worker; anything else is UNIMPLEMENTED."""
        handler = None
        for h in self._extra:
            handler = h.service(_Details(method, metadata))
            if handler is not None:
                break
        if handler is None or handler.request_streaming or handler.response_streaming:
            self._answer(call, None, grpc.StatusCode.UNIMPLEMENTED,
                         "Method not found!" if handler is None else "only unary methods are served here")
            return
        ctx = _Context(call, metadata)
        try:
            request = handler.request_deserializer(data) if handler.request_deserializer else data
            response = handler.unary_unary(request, ctx)
            if handler.response_serializer:
                response = handler.response_serializer(response)
        except _Abort as exc:
            self._answer(call, None, exc.code, exc.details, ctx.trailers)
            return
        if ctx.code not in (None, grpc.StatusCode.OK):
            self._answer(call, None, ctx.code, ctx.details, ctx.trailers)
        else:
            self._answer(call, response, trailers=ctx.trailers)


def start_grpc(addr: str, pipeline: Pipeline, *, max_message: int = MAX_MESSAGE_BYTES,
               extra_handlers: tuple[grpc.GenericRpcHandler, ...] = (), bare: bool = False):
    """Start the receiver on *addr* (``host:port``); return the server and the bound port.
    *extra_handlers* are served on the same port (the mesh CA's bootstrap door). *bare*: answer
    every export at once, unread (benchmarks/collector.py --layers measures the server alone)."""
    if server_kind() == "grpcio":
        return _start_pool_server(addr, pipeline, max_message, extra_handlers, bare)
    server = CoreServer(pipeline, max_message=max_message, extra_handlers=extra_handlers, bare=bare)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {addr}")
    server.start()
    return server, port
