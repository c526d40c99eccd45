"""The OTLP/gRPC receiver (grpcio): TraceService, MetricsService and LogsService ``Export``.

Requests arrive as raw bytes and are parsed here, so a malformed message gets INVALID_ARGUMENT
with the parser's reason instead of grpcio's generic deserialization failure. Malformed items
inside a well-formed message are refused through OTLP partial success; the rest is stored. An
export is answered only once it is in the write-ahead log; when the log is full the answer is
RESOURCE_EXHAUSTED with gRPC retry info (``google.rpc.RetryInfo`` in the status details), which
the OpenTelemetry exporters honour.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc

from tracemesh._proc import name_os_thread
from tracemesh.collector._otlp import SIGNALS, OTLPError, Signal
from tracemesh.collector._pipeline import Backpressure, Pipeline

log = logging.getLogger(__name__)

#: OTLP's gRPC default is 4 MiB; collectors commonly allow more. Configurable with --max-message.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Exports wait in these threads for the WAL's group commit; many waiters share one fsync.
WORKER_THREADS = 16


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


def _handler(signal: Signal, pipeline: Pipeline):
    def export(data: bytes, context: grpc.ServicerContext):
        try:
            result = signal.accept(data)
        except OTLPError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            pipeline.submit(signal.kind, data, result.batches, result.rejected)
        except Backpressure as exc:
            md = _retry_info_trailer(exc.retry_after_s)
            if md is not None:
                context.set_trailing_metadata((md,))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry in {exc.retry_after_s}s")
        return signal.response(result)

    return export


def start_grpc(addr: str, pipeline: Pipeline, *, max_message: int = MAX_MESSAGE_BYTES,
               extra_handlers: tuple[grpc.GenericRpcHandler, ...] = (), handler=_handler) -> tuple[grpc.Server, int]:
    """Start the receiver on *addr* (``host:port``); return the server and the bound port.
    *extra_handlers* are served on the same port (the mesh CA's bootstrap door). *handler(signal,
    pipeline)* makes each signal's Export function (benchmarks/collector.py --layers swaps it)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="otlp-grpc", initializer=name_os_thread),
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    for signal in SIGNALS.values():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(signal.grpc_service, {
            "Export": grpc.unary_unary_rpc_method_handler(
                handler(signal, pipeline), request_deserializer=None, response_serializer=lambda b: b),
        }),))
    if extra_handlers:
        server.add_generic_rpc_handlers(tuple(extra_handlers))
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {addr}")
    server.start()
    return server, port
