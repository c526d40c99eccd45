"""The sidecar's access log: one record per request (HTTP/1.1, HTTP/2, gRPC) and per opaque TCP
connection, as OTLP logs to the collector (``otel_logs``) or JSON lines on stdout.

The request path pays for one small tuple (:class:`AccessEntry`, holding a reference to the
request's span attributes, which are final by then) appended to a bounded queue (the span
recorder's :class:`~tracemesh.proxy._recorder.SpanRecorder`, reused as is): it never blocks, and
past :data:`MAX_QUEUED_LOGS` an entry is dropped and counted. Everything else (the attributes
named as Envoy's access-log operators, the Envoy default-format line, the protobuf bytes, written
directly as :mod:`._recorder` writes spans) happens in a worker thread of the exporter.

Each record carries the request's ``trace_id`` and ``span_id`` (and the W3C flags), so Grafana
links a log line to its trace; a request that was not sampled still gets its record (its flags say
so), as Envoy logs every request.

Cancellation: as the span exporter's; cancelling ``run`` stops exporting, ``flush`` (shielded,
bounded) sends what is still queued at shutdown and counts the rest as dropped.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from typing import NamedTuple

import trio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from tracemesh.proxy._recorder import (
    EXPORT_INTERVAL_S, OTLPExporter, RecorderStats, SpanRecorder, _any_value, _KEY_CACHE, _KEY_CACHE_MAX, _ld,
    _pack_q, _resource_bytes, _scope_bytes,
)

log = logging.getLogger(__name__)

MODES = ("otlp", "stdout", "off")
#: the collector stores OTLP logs in otel_logs, next to the spans they link to
DEFAULT_MODE = "otlp"
SCOPE_NAME = "tracemesh.proxy.access_log"
#: Entries held for export at most (as many as spans); beyond this they are dropped and counted.
MAX_QUEUED_LOGS = 16_384
LOGS_EXPORT_PATH = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
SEVERITY_INFO = 9  # the log data model's INFO: an access log records, it does not complain

_pack_i = struct.Struct("<I").pack
_PROTOCOLS = {"1.1": "HTTP/1.1", "2": "HTTP/2", "1.0": "HTTP/1.0"}


class AccessEntry(NamedTuple):
    start_ns: int
    duration_ns: int
    trace_id: bytes
    span_id: bytes
    trace_flags: int
    attrs: dict  # the request's span attributes: read here, never changed
    status: int  # 0: no response was sent
    flags: str  # Envoy's response flags, "-" for none
    received: int  # bytes from the downstream (request body; TCP: all it sent)
    sent: int  # bytes to the downstream
    authority: str  # the request's :authority / Host ("" for TCP)


class AccessLog(SpanRecorder):
    """The bounded queue of :class:`AccessEntry` (``record`` never blocks; drops are counted)."""

    def __init__(self, max_queued: int = MAX_QUEUED_LOGS) -> None:
        super().__init__(max_queued)


_second: list = [-1, ""]  # the last second formatted: records come in time order, mostly in the same one


def _start_time(ns: int) -> str:
    """Envoy's %START_TIME% (``%Y-%m-%dT%H:%M:%S.%3fZ``, UTC)."""
    s, rest = divmod(ns, 1_000_000_000)
    last = _second
    if last[0] != s:
        last[1], last[0] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)), s
    return f"{last[1]}.{rest // 1_000_000:03d}Z"


def fields(e: AccessEntry) -> dict:
    """The record's attributes: Envoy's default access-log fields, named as Istio's JSON access log
    names them, and the peers' principals (absent values are left out). The rest of what is known
    about the request is on its span, which the record's ids name."""
    a = e.attrs
    tcp = a.get("network.transport") == "tcp"
    out = {"start_time": _start_time(e.start_ns)}
    if not tcp:
        path = a.get("url.path", "")
        query = a.get("url.query")
        out["method"] = a.get("http.request.method", "")
        out["path"] = f"{path}?{query}" if query else path
        out["protocol"] = _PROTOCOLS.get(a.get("network.protocol.version"), "HTTP/1.1")
    else:
        out["protocol"] = "TCP"
    out["response_code"] = e.status
    out["response_flags"] = e.flags
    out["bytes_received"] = e.received
    out["bytes_sent"] = e.sent
    out["duration"] = e.duration_ns // 1_000_000  # ms, as Envoy's %DURATION%
    for key, attr in (("user_agent", "user_agent.original"), ("request_id", "guid:x-request-id")):
        v = a.get(attr)
        if v is not None:
            out[key] = v
    if e.authority:
        out["authority"] = e.authority
    upstream = a.get("mesh.upstream.endpoint")
    direction = a.get("mesh.direction", "")
    if upstream is not None:
        out["upstream_host"] = upstream
        port = str(upstream).rpartition(":")[2]
        if direction == "inbound":  # Istio's cluster names: inbound|port||, outbound|port|subset|service
            out["upstream_cluster"] = f"inbound|{port}||"
        else:
            out["upstream_cluster"] = (f"outbound|{port}|{a.get('mesh.destination.version', '')}|"
                                       f"{a.get('mesh.destination.service', '')}")
    for key, attr in (("route_name", "mesh.route"), ("grpc_status", "rpc.grpc.status_code"),
                      ("source_principal", "mesh.source.principal"),
                      ("destination_principal", "mesh.destination.principal")):
        v = a.get(attr)
        if v is not None:
            out[key] = v
    return out


def line(f: dict) -> str:
    """Envoy's default access-log format, filled from :func:`fields` (``-`` for what is unknown):
    ``[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"``
    (TCP: method, path and protocol ``-``, as Envoy prints them)."""
    g = f.get
    proto = f["protocol"]
    return (f'[{f["start_time"]}] "{g("method", "-")} {g("path", "-")} {"-" if proto == "TCP" else proto}" '
            f'{f["response_code"]} {f["response_flags"]} {f["bytes_received"]} {f["bytes_sent"]} {f["duration"]} - '
            f'"-" "{g("user_agent", "-")}" "{g("request_id", "-")}" "{g("authority", "-")}" '
            f'"{g("upstream_host", "-")}"')


# -- OTLP, written straight to protobuf's wire format (as _recorder does for spans) -------------


def _attr(k: str, v) -> bytes:
    prefix = _KEY_CACHE.get(k)
    if prefix is None:
        prefix = _ld(b"\x0a", k.encode()) if k else b""
        if len(_KEY_CACHE) < _KEY_CACHE_MAX:
            _KEY_CACHE[k] = prefix
    if v.__class__ is str:
        b = v.encode()
        n = len(b)
        if n + len(prefix) < 120:  # every length below fits one varint byte: no _ld calls
            return (b"\x32" + bytes((len(prefix) + n + 4,)) + prefix
                    + b"\x12" + bytes((n + 2,)) + b"\x0a" + bytes((n,)) + b)
    return _ld(b"\x32", prefix + _ld(b"\x12", _any_value(v)))  # LogRecord.attributes = 6


def _record_bytes(e: AccessEntry) -> bytes:
    f = fields(e)
    parts = [b"\x09", _pack_q(e.start_ns), b"\x10\x09\x1a\x04INFO",  # time 1, severity_number 2, severity_text 3
             _ld(b"\x2a", _ld(b"\x0a", line(f).encode()))]  # body 5: AnyValue.string_value
    parts += [_attr(k, v) for k, v in f.items()]
    if e.trace_flags:
        parts += [b"\x45", _pack_i(e.trace_flags & 0xFF)]  # flags 8 (fixed32): the W3C trace flags
    parts += [b"\x4a\x10", e.trace_id, b"\x52\x08", e.span_id,  # trace_id 9, span_id 10
              b"\x59", _pack_q(e.start_ns + e.duration_ns)]  # observed_time_unix_nano 11: when it ended
    return _ld(b"\x12", b"".join(parts))  # ScopeLogs.log_records = 2


def encode_logs_fast(resource: dict, scope_version: str, entries: list[AccessEntry]) -> bytes:
    """A serialized ExportLogsServiceRequest of *entries* under one resource and scope."""
    scope_logs = _scope_bytes(SCOPE_NAME, scope_version) + b"".join(map(_record_bytes, entries))
    return _ld(b"\x0a", _resource_bytes(resource) + _ld(b"\x12", scope_logs))


class LogsExporter(OTLPExporter):
    """OTLP/gRPC ``LogsService/Export`` of an :class:`AccessLog`: batched, retried with backoff,
    then dropped (counted), exactly as spans are."""

    export_path = LOGS_EXPORT_PATH
    response_type = ExportLogsServiceResponse
    what = "access log"

    def encode(self, batch: list) -> bytes:
        return encode_logs_fast(self.resource, self.scope_version, batch)


def json_line(e: AccessEntry) -> str:
    f = fields(e)
    f["trace_id"], f["span_id"] = e.trace_id.hex(), e.span_id.hex()
    return json.dumps(f, separators=(",", ":"), ensure_ascii=False)


class StdoutWriter:
    """``--access-log stdout``: JSON lines (the :func:`fields`, ``trace_id`` and ``span_id``),
    written by a worker thread, so a slow reader of stdout never stalls a request (the queue fills
    and drops, counted, instead)."""

    def __init__(self, queue: AccessLog, out=None) -> None:
        self.recorder = queue
        self.out = out

    def _write(self, batch: list[AccessEntry]) -> None:
        out = self.out or sys.stdout
        out.write("".join(json_line(e) + "\n" for e in batch))
        out.flush()

    async def _drain(self) -> None:
        while batch := self.recorder.take():
            try:
                await trio.to_thread.run_sync(self._write, batch, abandon_on_cancel=True)
            except (OSError, ValueError):  # stdout closed: nothing more can be written
                self.recorder.stats.export_dropped += len(batch)
                self.recorder.stats.export_failures += 1
                continue
            self.recorder.stats.exported += len(batch)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(EXPORT_INTERVAL_S):
                await self.recorder.wakeup.wait()
            self.recorder.wakeup = trio.Event()
            await self._drain()

    async def flush(self, deadline_s: float = 3.0) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
            await self._drain()
        self.recorder.stats.export_dropped += len(self.recorder)

    def close(self) -> None:
        pass


def stats_lines(stats: RecorderStats, queued: int) -> dict:
    """The access log's own numbers for the sidecar's ``/metrics``."""
    return {
        "tracemesh_sidecar_access_logs_recorded_total": (stats.recorded, "Access log records queued for export."),
        "tracemesh_sidecar_access_logs_dropped_total": (
            stats.dropped + stats.export_dropped, "Access log records dropped: queue full, or export failed for good."),
        "tracemesh_sidecar_access_logs_exported_total": (stats.exported, "Access log records exported."),
        "tracemesh_sidecar_access_log_export_failures_total": (stats.export_failures,
                                                               "Failed access log export calls."),
        "tracemesh_sidecar_access_logs_queued": (queued, "Access log records waiting for export."),
    }
