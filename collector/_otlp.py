"""The three OTLP signals as the receivers see them: parse, validate, encode, answer.

Shared by the gRPC and HTTP receivers and by write-ahead log replay, so a record is decoded the
same way when it arrives and when it is replayed. The log always holds the binary protobuf form
(OTLP/JSON is converted on arrival).

OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding) differs from
protobuf's canonical JSON in one way that matters: trace and span ids are hex, not base64. Unknown
fields are ignored, as the spec requires of receivers.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Callable

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb

from tracemesh.collector._encode import encode_traces
from tracemesh.collector._pipeline import KIND_LOGS, KIND_METRICS, KIND_TRACES

#: JSON nesting deeper than this is refused before parsing (a stack-exhaustion guard; OTLP needs ~12).
MAX_JSON_DEPTH = 64
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


class OTLPError(ValueError):
    """The request as a whole is malformed (the sender's fault: gRPC INVALID_ARGUMENT, HTTP 400)."""


@dataclass
class Accepted:
    request: object
    batches: dict
    rows: int
    rejected: int
    message: str


#: When on, trace exports are only validated here and stored natively (see _native.py).
_native_traces = False
#: With native traces and the C extension built: _native.check_traces, which checks the request's
#: bytes without parsing them into Python objects (see Signal.accept).
_check_bytes = None


def use_native_traces(on: bool) -> None:
    """Switch the traces signal between the Python encoder and native ingest (_native.py)."""
    global _native_traces, _check_bytes
    _native_traces = on
    _check_bytes = None
    if on:
        from tracemesh.collector import _native

        if _native._otlpc is not None:
            _check_bytes = _native.check_traces


def _traces(req, payload: bytes):
    if _native_traces:
        from tracemesh.collector._native import validate_traces

        if _check_bytes is not None:
            return _check_bytes(payload)
        return validate_traces(req, payload)
    cols, rej = encode_traces(req)
    return {"otel_traces": cols}, rej


def _metrics(req, payload: bytes):
    from tracemesh.collector._encode_otel import encode_metrics

    return encode_metrics(req)


def _logs(req, payload: bytes):
    from tracemesh.collector._encode_otel import encode_logs

    rows, rej = encode_logs(req)
    return {rows.table: rows}, rej


@dataclass(frozen=True)
class Signal:
    name: str
    kind: int
    grpc_service: str
    http_path: str
    request_cls: type
    response_cls: type
    partial_cls: type
    partial_field: str
    encode: Callable

    def _encode(self, req, payload: bytes) -> Accepted:
        batches, rej = self.encode(req, payload)
        rows = sum(len(b) for b in batches.values())
        return Accepted(req, batches, rows, rej.count, rej.message)

    def accept(self, data: bytes) -> Accepted:
        """Parse binary protobuf and encode; raise OTLPError when the message does not parse."""
        if self.kind == KIND_TRACES and _check_bytes is not None:
            # checked on its bytes, in C: the same refusals as upb's parse and the Python checks
            try:  # no parse tree: _traces hands the bytes to _check_bytes
                return self._encode(None, data)
            except ValueError as exc:  # _otlpc.DecodeError
                raise OTLPError(f"malformed {self.request_cls.__name__}: {exc}") from None
        req = self.request_cls()
        try:
            req.ParseFromString(data)
        except DecodeError as exc:
            raise OTLPError(f"malformed {self.request_cls.__name__}: {exc}") from None
        return self._encode(req, data)

    def accept_json(self, data: bytes) -> Accepted:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise OTLPError(f"malformed JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise OTLPError(f"an OTLP/JSON {self.name} request is a JSON object")
        _check_depth(doc)
        _hex_ids_to_base64(doc)
        req = self.request_cls()
        try:
            json_format.ParseDict(doc, req, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise OTLPError(f"malformed OTLP/JSON {self.name} request: {exc}") from None
        return self._encode(req, req.SerializeToString())

    def decode(self, payload: bytes) -> dict:
        """Rows of a logged record (replay): the same as when it arrived."""
        return self.accept(payload).batches

    def response(self, result: Accepted | None = None) -> bytes:
        return self._response_msg(result).SerializeToString()

    def response_json(self, result: Accepted | None = None) -> bytes:
        return json_format.MessageToJson(self._response_msg(result), indent=None).encode()

    def _response_msg(self, result):
        if result is None or not result.rejected:
            return self.response_cls()
        partial = self.partial_cls(error_message=result.message)
        setattr(partial, self.partial_field, result.rejected)
        return self.response_cls(partial_success=partial)


def _check_depth(doc) -> None:
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OTLPError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def _hex_ids_to_base64(node) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _ID_KEYS and isinstance(v, str):
                try:
                    node[k] = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError:
                    raise OTLPError(f"{k} {v[:40]!r} is not hex (OTLP/JSON ids are hex strings)") from None
            elif isinstance(v, (dict, list)):
                _hex_ids_to_base64(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _hex_ids_to_base64(v)


SIGNALS: dict[int, Signal] = {
    KIND_TRACES: Signal("traces", KIND_TRACES, "opentelemetry.proto.collector.trace.v1.TraceService", "/v1/traces",
                        trace_pb.ExportTraceServiceRequest, trace_pb.ExportTraceServiceResponse,
                        trace_pb.ExportTracePartialSuccess, "rejected_spans", _traces),
    KIND_METRICS: Signal("metrics", KIND_METRICS, "opentelemetry.proto.collector.metrics.v1.MetricsService",
                         "/v1/metrics", metrics_pb.ExportMetricsServiceRequest, metrics_pb.ExportMetricsServiceResponse,
                         metrics_pb.ExportMetricsPartialSuccess, "rejected_data_points", _metrics),
    KIND_LOGS: Signal("logs", KIND_LOGS, "opentelemetry.proto.collector.logs.v1.LogsService", "/v1/logs",
                      logs_pb.ExportLogsServiceRequest, logs_pb.ExportLogsServiceResponse,
                      logs_pb.ExportLogsPartialSuccess, "rejected_log_records", _logs),
}


def decode_record(kind: int, payload: bytes) -> dict:
    return SIGNALS[kind].decode(payload)
