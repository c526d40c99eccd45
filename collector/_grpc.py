"""The OTLP/gRPC receiver (grpcio): TraceService/Export.

Requests arrive as raw bytes and are parsed here, so a malformed message gets INVALID_ARGUMENT
with the parser's reason instead of grpcio's generic deserialization failure. Malformed spans
inside a well-formed message are rejected through OTLP partial success; the rest is stored.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tracemesh.collector._encode import encode_traces
from tracemesh.collector._pipeline import SpanPipeline

log = logging.getLogger(__name__)

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
#: OTLP's recommended limit is 4 MiB by default in gRPC; collectors commonly allow more.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Parsing and encoding run in these threads (they hold the GIL most of the time: few suffice).
WORKER_THREADS = 8
#: Told to a sender that we pushed back, as gRPC retry info would say it.
RETRY_AFTER_S = 1


def _export_traces(pipeline: SpanPipeline):
    def export(data: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(data)
        except DecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ExportTraceServiceRequest: {exc}")
        cols, rej = encode_traces(req)
        pipeline.stats.rejected += rej.count
        if len(cols) and not pipeline.offer(cols):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"collector queue is full ({pipeline.queued} spans waiting for storage); retry in {RETRY_AFTER_S}s",
            )
        if rej.count:
            return ExportTraceServiceResponse(
                partial_success=ExportTracePartialSuccess(rejected_spans=rej.count, error_message=rej.message)
            )
        return ExportTraceServiceResponse()

    return export


def start_grpc(addr: str, pipeline: SpanPipeline, *, max_message: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """Start the receiver on *addr* (``host:port``); return the server and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="otlp-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {
        "Export": grpc.unary_unary_rpc_method_handler(
            _export_traces(pipeline),
            request_deserializer=None,
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        ),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {addr}")
    server.start()
    return server, port
