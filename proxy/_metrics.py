"""The sidecar's RED metrics, with Istio's names and labels: sans-I/O, no sockets, no SDK.

:meth:`MeshMetrics.observe` is called once per request by the data path with the span's
attribute dict. It keys a series by the raw tuple of the attributes it reads (one dict look-up),
so turning attributes into Istio's labels (``unknown`` for what is missing, the namespace out of
a SPIFFE ID, truncation of long values) happens once per new series, not once per request. Bucket
bounds are fixed tuples searched with :func:`bisect.bisect_left`; buckets are kept per bucket
(not cumulative) and made cumulative when exported.

The number of label sets is bounded by *max_series*; observations of a label set beyond that go
into one overflow series labelled ``otel_metric_overflow="true"`` (as the OpenTelemetry SDK's
cardinality limit does) and are counted in :attr:`MeshMetrics.overflowed`. Label values come
partly from the network (an unauthenticated caller's ``x-tracemesh-peer`` claim), hence the bound
and the truncation.

Everything here runs in the thread that calls :meth:`observe` (the sidecar's Trio thread);
:meth:`MeshMetrics.snapshot` copies the counts there, and :func:`render_prometheus` /
:func:`encode_otlp` format a snapshot anywhere, e.g. in a worker thread.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import struct

from tracemesh.proxy._recorder import _ld, _resource_bytes, _scope_bytes, any_value

SCOPE_NAME = "tracemesh.proxy"

#: Istio's default buckets of istio_request_duration_milliseconds (ms).
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                       300000, 600000, 1800000, 3600000)
#: Istio's buckets of istio_request_bytes and istio_response_bytes.
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

#: Label sets kept at most; beyond it, observations go to the overflow series. A busy sidecar has a
#: few hundred (callers or destinations x versions x codes x flags). Measured per series: ~2.5 KB
#: held (4 KB with the export caches), 27 KB of /metrics text (19 labels on 44 lines) and ~40 us of
#: OTLP encoding every 10 s. So 2000 series hold ~8 MB of the sidecar's 60 MB RSS budget and a
#: scrape at the bound is ~55 MB of text (~0.1 s to render); 10 000 would make it 275 MB.
MAX_SERIES = 2_000
#: A label value longer than this is cut: values can come from a caller's header (up to 64 KiB).
MAX_LABEL_VALUE = 256
UNKNOWN = "unknown"

REQUESTS_TOTAL = "istio_requests_total"
REQUEST_DURATION = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"

#: Istio's label names, in the order of its stats config (clusters left out: one mesh, one cluster).
LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
          "source_version", "destination_workload", "destination_workload_namespace", "destination_principal",
          "destination_app", "destination_version", "destination_service", "destination_service_name",
          "destination_service_namespace", "request_protocol", "response_code", "grpc_response_status",
          "response_flags", "connection_security_policy")
OVERFLOW_LABELS = (("otel_metric_overflow", "true"),)

_HELP = {
    REQUESTS_TOTAL: "Requests handled by the sidecar, counted once by each reporter.",
    REQUEST_DURATION: "Duration of requests, from the request head to the end of the response, in milliseconds.",
    REQUEST_BYTES: "Sizes of HTTP request bodies, in bytes.",
    RESPONSE_BYTES: "Sizes of HTTP response bodies, in bytes.",
}


def _value(v) -> str:
    """A label value: ``unknown`` for a missing or empty one, long ones cut."""
    if v is None:
        return UNKNOWN
    s = v if isinstance(v, str) else str(v)
    if not s:
        return UNKNOWN
    return s if len(s) <= MAX_LABEL_VALUE else s[:MAX_LABEL_VALUE]


def _namespace(principal) -> str:
    """``ns`` of ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``, else ``unknown``."""
    if isinstance(principal, str) and principal.startswith("spiffe://"):
        parts = principal[len("spiffe://"):].split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2]:
            return _value(parts[2])
    return UNKNOWN


def istio_labels(direction, src_svc, src_ver, src_principal, dst_svc, dst_ver, dst_principal, security,
                 grpc_status, status, flags) -> tuple[str, ...]:
    """The values of :data:`LABELS` for one request's attributes (``None`` where absent).

    The service name stands for Istio's workload, app and service (a tracemesh workload is one
    service at one version); ``response_code`` is ``0`` when no response was sent, as Envoy's is;
    ``grpc_response_status`` is empty (so absent in Prometheus) for a request that is not gRPC.
    """
    src, dst = _value(src_svc), _value(dst_svc)
    src_ns, dst_ns = _namespace(src_principal), _namespace(dst_principal)
    if security is None:
        policy = UNKNOWN
    else:
        policy = "mutual_tls" if security == "mutual_tls" else "none"
    grpc = "" if grpc_status is None else _value(grpc_status)
    return (
        "destination" if direction == "inbound" else "source",
        src, src_ns, _value(src_principal), src, _value(src_ver),
        dst, dst_ns, _value(dst_principal), dst, _value(dst_ver), dst, dst, dst_ns,
        "grpc" if grpc else "http",
        "0" if status is None else _value(status),
        grpc,
        _value(flags) if flags is not None else "-",
        policy,
    )


class Series:
    """The counts of one label set. Buckets are per bucket, the last one past the last bound."""

    __slots__ = ("_otlp", "_text", "count", "dur", "dur_sum", "labels", "req", "req_sum", "resp", "resp_sum")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.count = 0
        self.dur_sum = 0.0
        self.dur = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.req_sum = 0
        self.req = [0] * (len(BYTES_BUCKETS) + 1)
        self.resp_sum = 0
        self.resp = [0] * (len(BYTES_BUCKETS) + 1)
        self._text: str | None = None
        self._otlp: tuple[bytes, bytes] | None = None

    def label_text(self) -> str:
        """``name="value",...`` for the Prometheus text format, built once (empty values left out)."""
        if self._text is None:
            self._text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in self.labels if v != "")
        return self._text

    def otlp_attributes(self) -> tuple[bytes, bytes]:
        """The labels as the serialized attributes of a HistogramDataPoint and of a NumberDataPoint
        (fields 9 and 7), built once: making the KeyValues was most of an export's cost."""
        if self._otlp is None:
            kvs = [_ld(b"\x0a", k.encode()) + _ld(b"\x12", _ld(b"\x0a", v.encode())) for k, v in self.labels if v != ""]
            self._otlp = (b"".join(_ld(b"\x4a", kv) for kv in kvs), b"".join(_ld(b"\x3a", kv) for kv in kvs))
        return self._otlp


#: Istio's TCP metrics (counters), for connections of ports declared TCP (:mod:`tracemesh.proxy._tcp`).
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_CLOSED = "istio_tcp_connections_closed_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"
#: As Istio's TCP metrics: the request labels without a response code or gRPC status.
TCP_LABELS = tuple(n for n in LABELS if n not in ("response_code", "grpc_response_status"))
_TCP_HELP = {
    TCP_OPENED: "TCP connections opened, counted once by each reporter.",
    TCP_CLOSED: "TCP connections closed, counted once by each reporter.",
    TCP_SENT: "Bytes sent in the response direction (server to client) of TCP connections.",
    TCP_RECEIVED: "Bytes received in the request direction (client to server) of TCP connections.",
}


class TcpSeries(Series):
    """The counts of one label set of the TCP metrics; the data path adds to them as bytes flow,
    so a long-lived connection shows its traffic before it closes."""

    __slots__ = ("opened", "closed", "sent", "received")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        super().__init__(labels)
        self.opened = self.closed = self.sent = self.received = 0


@dataclass
class Row:
    """One series' counts, copied: what a snapshot holds."""

    series: Series
    count: int
    dur_sum: float
    dur: list[int]
    req_sum: int
    req: list[int]
    resp_sum: int
    resp: list[int]


@dataclass
class Snapshot:
    rows: list[Row]
    stats: dict = field(default_factory=dict)  # name -> value or (value, help)
    tcp: list = field(default_factory=list)  # (TcpSeries, opened, closed, sent, received)


class MeshMetrics:
    """The registry of Istio's request metrics for one sidecar.

    *stats*, when given, is called at each snapshot and returns the sidecar's own numbers:
    ``{name: value}`` or ``{name: (value, help)}``; a name ending in ``_total`` is a counter, any
    other a gauge.
    """

    def __init__(self, max_series: int = MAX_SERIES, stats: Callable[[], Mapping] | None = None) -> None:
        self.max_series = max_series
        self.stats = stats
        self._by_key: dict[tuple, Series] = {}  # raw attribute tuple -> series (several keys may share one)
        self._max_keys = 2 * max_series
        self._by_labels: dict[tuple, Series] = {}
        self._overflow = Series(OVERFLOW_LABELS)
        #: observations counted into the overflow series because the label sets ran out
        self.overflowed = 0
        self._tcp: dict[tuple, TcpSeries] = {}
        self._tcp_overflow = TcpSeries(OVERFLOW_LABELS)

    def __len__(self) -> int:
        """Label sets held (the overflow series not included)."""
        return len(self._by_labels)

    def observe(self, attrs: Mapping, duration_s: float, request_bytes: int, response_bytes: int,
                status: int | None = None, flags: str | None = None) -> None:
        """Count one request. *status* and *flags*, when given, stand for the attributes
        ``http.response.status_code`` and ``mesh.response_flags`` (so the data path can call
        this before it writes them into the span). Never raises on odd attribute values."""
        g = attrs.get
        if status is None:
            status = g("http.response.status_code")
        if flags is None:
            flags = g("mesh.response_flags")
        key = (g("mesh.direction"), g("mesh.source.service"), g("mesh.source.version"),
               g("mesh.source.principal"), g("mesh.destination.service"), g("mesh.destination.version"),
               g("mesh.destination.principal"), g("mesh.connection_security_policy"),
               g("rpc.grpc.status_code"), status, flags)
        try:
            s = self._by_key[key]
        except KeyError:
            s = self._series_for(key)
        except TypeError:  # an unhashable attribute value (a list): labels are strings anyway
            key = tuple(None if v is None else str(v) for v in key)
            s = self._by_key.get(key) or self._series_for(key)
        s.count += 1
        ms = duration_s * 1000.0
        s.dur_sum += ms
        s.dur[bisect_left(DURATION_BUCKETS_MS, ms)] += 1
        s.req_sum += request_bytes
        s.req[bisect_left(BYTES_BUCKETS, request_bytes)] += 1
        s.resp_sum += response_bytes
        s.resp[bisect_left(BYTES_BUCKETS, response_bytes)] += 1

    def _series_for(self, key: tuple) -> Series:
        """The slow path: a raw key seen for the first time (or not cached)."""
        labels = tuple(zip(LABELS, istio_labels(*key)))
        s = self._by_labels.get(labels)
        if s is None:
            if len(self._by_labels) >= self.max_series:
                self.overflowed += 1
                return self._overflow  # not cached: each overflowing observation is counted here
            s = self._by_labels[labels] = Series(labels)
        # a key holding a value that was cut is not cached: it would pin up to 64 KiB per key
        if len(self._by_key) < self._max_keys and not any(
                isinstance(v, str) and len(v) > MAX_LABEL_VALUE for v in key):
            self._by_key[key] = s
        return s

    def series(self) -> list[Series]:
        """The live series (the overflow one last, if it counted anything); for tests."""
        out = list(self._by_labels.values())
        if self._overflow.count:
            out.append(self._overflow)
        return out

    def snapshot(self) -> Snapshot:
        """A consistent copy of the counts and of the sidecar's own stats; call it in the thread
        that calls :meth:`observe`. About 2 us per series."""
        rows = [Row(s, s.count, s.dur_sum, s.dur[:], s.req_sum, s.req[:], s.resp_sum, s.resp[:])
                for s in self.series()]
        stats = {
            "tracemesh_sidecar_metric_series": (len(self._by_labels), "Label sets of the istio_* metrics held."),
            "tracemesh_sidecar_metric_overflow_total": (
                self.overflowed, f"Requests counted into the overflow series (beyond {self.max_series} label sets)."),
        }
        if self.stats is not None:
            stats.update(self.stats())
        tcp = [(t, t.opened, t.closed, t.sent, t.received) for t in self.tcp_series_all()]
        return Snapshot(rows, stats, tcp)

    def tcp_series(self, attrs: Mapping, flags: str = "-") -> TcpSeries:
        """The TCP series of a connection with these span attributes (as :meth:`observe` reads
        them) and response flags; the caller adds to its counters. Bounded by *max_series*."""
        g = attrs.get
        key = (g("mesh.direction"), g("mesh.source.service"), g("mesh.source.version"),
               g("mesh.source.principal"), g("mesh.destination.service"), g("mesh.destination.version"),
               g("mesh.destination.principal"), g("mesh.connection_security_policy"), flags)
        key = tuple(None if v is None else str(v) for v in key)
        s = self._tcp.get(key)
        if s is None:
            if len(self._tcp) >= self.max_series:
                self.overflowed += 1
                return self._tcp_overflow
            d, ss, sv, sp, ds, dv, dp, sec, fl = key
            values = dict(zip(LABELS, istio_labels(
                direction=d, src_svc=ss, src_ver=sv, src_principal=sp, dst_svc=ds, dst_ver=dv, dst_principal=dp,
                security=sec, grpc_status=None, status=None, flags=fl)))
            values["request_protocol"] = "tcp"
            s = self._tcp[key] = TcpSeries(tuple((n, values[n]) for n in TCP_LABELS))
        return s

    def tcp_series_all(self) -> list[TcpSeries]:
        out = list(self._tcp.values())
        if self._tcp_overflow.opened:
            out.append(self._tcp_overflow)
        return out

    def render_prometheus(self, snap: Snapshot | None = None) -> bytes:
        return render_prometheus(snap if snap is not None else self.snapshot())

    def to_otlp(self, resource: Mapping, start_ns: int, now_ns: int, snap: Snapshot | None = None,
                scope_version: str = "") -> bytes:
        return encode_otlp(snap if snap is not None else self.snapshot(), resource, start_ns, now_ns, scope_version)


# -- Prometheus text exposition format 0.0.4 ------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _le(bound) -> str:
    return f"{bound:g}"  # as Go's client writes them: 0.5, 1, 100000, 1e+06


_DUR_LE = tuple(_le(b) for b in DURATION_BUCKETS_MS) + ("+Inf",)
_BYTES_LE = tuple(_le(b) for b in BYTES_BUCKETS) + ("+Inf",)


def _histogram_lines(out: list[bytes], name: str, rows: list[Row], attr: str, les: tuple[str, ...]) -> None:
    out.append(f"# HELP {name} {_escape_help(_HELP[name])}\n# TYPE {name} histogram\n".encode())
    bucket, total_attr = f"{name}_bucket{{", attr + "_sum"
    for r in rows:
        labels = r.series.label_text()
        head = f'{bucket}{labels},le="' if labels else f'{bucket}le="'
        body = f"{{{labels}}}" if labels else ""
        lines = []
        total = 0
        for le, n in zip(les, getattr(r, attr)):
            total += n
            lines.append(f'{head}{le}"}} {total}\n')
        lines.append(f"{name}_sum{body} {_num(getattr(r, total_attr))}\n{name}_count{body} {r.count}\n")
        out.append("".join(lines).encode())  # bytes per series: the text is never held twice whole


def render_prometheus(snap: Snapshot) -> bytes:
    """The Prometheus text format (0.0.4) of *snap*: the istio_* families, then the sidecar's own.

    Size: about 27 KB a series (19 labels on each of 44 lines), so 50 MB at 2000 series."""
    rows = snap.rows
    out: list[bytes] = [f"# HELP {REQUESTS_TOTAL} {_escape_help(_HELP[REQUESTS_TOTAL])}\n"
                        f"# TYPE {REQUESTS_TOTAL} counter\n".encode()]
    out.append("".join(f"{REQUESTS_TOTAL}{{{labels}}} {r.count}\n" if (labels := r.series.label_text())
                       else f"{REQUESTS_TOTAL} {r.count}\n" for r in rows).encode())
    _histogram_lines(out, REQUEST_DURATION, rows, "dur", _DUR_LE)
    _histogram_lines(out, REQUEST_BYTES, rows, "req", _BYTES_LE)
    _histogram_lines(out, RESPONSE_BYTES, rows, "resp", _BYTES_LE)
    if snap.tcp:
        for k, name in enumerate((TCP_OPENED, TCP_CLOSED, TCP_SENT, TCP_RECEIVED), start=1):
            out.append(f"# HELP {name} {_escape_help(_TCP_HELP[name])}\n# TYPE {name} counter\n".encode())
            out.append("".join(f"{name}{{{t[0].label_text()}}} {t[k]}\n" for t in snap.tcp).encode())
    tail = []
    for name, (value, help_text) in _stat_items(snap.stats):
        kind = "counter" if name.endswith("_total") else "gauge"
        if help_text:
            tail.append(f"# HELP {name} {_escape_help(help_text)}\n")
        tail.append(f"# TYPE {name} {kind}\n{name} {_num(value)}\n")
    out.append("".join(tail).encode())
    return b"".join(out)


def _stat_items(stats: Mapping):
    for name, v in stats.items():
        yield name, (v if isinstance(v, tuple) else (v, ""))


# -- OTLP ------------------------------------------------------------------------------------

CUMULATIVE = 2  # AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
_DUR_BOUNDS = tuple(float(b) for b in DURATION_BUCKETS_MS)
_BYTES_BOUNDS = tuple(float(b) for b in BYTES_BUCKETS)


def _packed(tag: bytes, fmt: str, values) -> bytes:
    return _ld(tag, struct.pack(f"<{len(values)}{fmt}", *values))


_DUR_BOUNDS_FIELD = _packed(b"\x3a", "d", _DUR_BOUNDS)  # HistogramDataPoint.explicit_bounds = 7
_BYTES_BOUNDS_FIELD = _packed(b"\x3a", "d", _BYTES_BOUNDS)
_SUM_TAIL = b"\x10\x02\x18\x01"  # Sum.aggregation_temporality = 2 (cumulative), is_monotonic = 3
_HIST_TAIL = b"\x10\x02"  # Histogram.aggregation_temporality = 2
_pack_qq = struct.Struct("<BQBQ").pack  # two fixed64 fields (start, time), with their tags
_pack_q = struct.Struct("<Q").pack
_pack_sq = struct.Struct("<q").pack
_pack_d = struct.Struct("<d").pack


def _metric_head(name: str, description: str, unit: str) -> bytes:
    """Metric.name = 1, description = 2, unit = 3 (empty ones left out, as proto3 does)."""
    return ((_ld(b"\x0a", name.encode()) if name else b"") + (_ld(b"\x12", description.encode()) if description else b"")
            + (_ld(b"\x1a", unit.encode()) if unit else b""))


def _number_point(times: bytes, attrs: bytes, value) -> bytes:
    """NumberDataPoint: start 2, time 3 (*times*), as_double 4 or as_int 6 (a oneof: written even
    when zero), attributes 7."""
    v = b"\x21" + _pack_d(value) if isinstance(value, float) else b"\x31" + _pack_sq(int(value))
    return _ld(b"\x0a", times + v + attrs)  # Sum/Gauge.data_points = 1


def encode_otlp(snap: Snapshot, resource: Mapping, start_ns: int, now_ns: int, scope_version: str = "") -> bytes:
    """A serialized ExportMetricsServiceRequest of *snap*, cumulative since *start_ns*: a monotonic
    Sum for istio_requests_total (and the sidecar's ``*_total`` stats), Histograms with explicit
    bounds, Gauges for the other stats. Written straight to protobuf's wire format, byte for byte
    what the message encoder writes (:func:`encode_otlp_reference`; the tests compare), with each
    series' attributes encoded once (:meth:`Series.otlp_attributes`): no protobuf runtime in the
    sidecar."""
    times = (_pack_qq(0x11, start_ns, 0x19, now_ns) if start_ns and now_ns
             else (b"\x11" + _pack_q(start_ns) if start_ns else b"") + (b"\x19" + _pack_q(now_ns) if now_ns else b""))
    now_only = b"\x19" + _pack_q(now_ns) if now_ns else b""
    metrics: list[bytes] = []
    if snap.rows:  # a metric without data points is not sent
        counts = []
        hists: tuple[list, list, list] = ([], [], [])
        for r in snap.rows:
            hist_attrs, num_attrs = r.series.otlp_attributes()
            counts.append(_number_point(times, num_attrs, r.count))
            count = b"\x21" + _pack_q(r.count) if r.count else b""  # HistogramDataPoint.count = 4
            for points, buckets, total, bounds in ((hists[0], r.dur, r.dur_sum, _DUR_BOUNDS_FIELD),
                                                    (hists[1], r.req, r.req_sum, _BYTES_BOUNDS_FIELD),
                                                    (hists[2], r.resp, r.resp_sum, _BYTES_BOUNDS_FIELD)):
                # sum 5 (optional: always written), bucket_counts 6 and explicit_bounds 7 (packed), attributes 9
                points.append(_ld(b"\x0a", b"".join((times, count, b"\x29", _pack_d(float(total)),
                                                      _packed(b"\x32", "Q", buckets), bounds, hist_attrs))))
        metrics.append(_metric_head(REQUESTS_TOTAL, _HELP[REQUESTS_TOTAL], "{request}")
                       + _ld(b"\x3a", b"".join(counts) + _SUM_TAIL))  # Metric.sum = 7
        for (name, unit), points in zip(((REQUEST_DURATION, "ms"), (REQUEST_BYTES, "By"), (RESPONSE_BYTES, "By")),
                                        hists):
            metrics.append(_metric_head(name, _HELP[name], unit)
                           + _ld(b"\x4a", b"".join(points) + _HIST_TAIL))  # Metric.histogram = 9
    if snap.tcp:
        for k, (name, unit) in enumerate(((TCP_OPENED, "{connection}"), (TCP_CLOSED, "{connection}"),
                                          (TCP_SENT, "By"), (TCP_RECEIVED, "By")), start=1):
            points = b"".join(_number_point(times, t[0].otlp_attributes()[1], t[k]) for t in snap.tcp)
            metrics.append(_metric_head(name, _TCP_HELP[name], unit) + _ld(b"\x3a", points + _SUM_TAIL))
    for name, (value, help_text) in _stat_items(snap.stats):
        value = value if isinstance(value, float) else int(value)
        if name.endswith("_total"):
            metrics.append(_metric_head(name, help_text, "") + _ld(b"\x3a", _number_point(times, b"", value) + _SUM_TAIL))
        else:  # Metric.gauge = 5: a point with its time only
            metrics.append(_metric_head(name, help_text, "") + _ld(b"\x2a", _number_point(now_only, b"", value)))
    scope = _scope_bytes(SCOPE_NAME, scope_version)
    body = b"".join([scope] + [_ld(b"\x12", m) for m in metrics])  # ScopeMetrics.metrics = 2
    resource_metrics = _resource_bytes(dict(resource)) + _ld(b"\x12", body)  # ResourceMetrics.scope_metrics = 2
    return _ld(b"\x0a", resource_metrics)  # ExportMetricsServiceRequest.resource_metrics = 1


def encode_otlp_reference(snap: Snapshot, resource: Mapping, start_ns: int, now_ns: int,
                          scope_version: str = "") -> bytes:
    """:func:`encode_otlp` with the OpenTelemetry protobuf messages (the reference the tests hold
    the wire encoder to; imported here only)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import HistogramDataPoint, NumberDataPoint

    def attributes(series) -> tuple[bytes, bytes]:
        attrs = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in series.labels if v != ""]
        return (HistogramDataPoint(attributes=attrs).SerializeToString(),
                NumberDataPoint(attributes=attrs).SerializeToString())

    req_msg = ExportMetricsServiceRequest()
    rm = req_msg.resource_metrics.add()
    rm.resource.attributes.extend(KeyValue(key=k, value=any_value(v)) for k, v in resource.items())
    sm = rm.scope_metrics.add()
    sm.scope.name = SCOPE_NAME
    if scope_version:
        sm.scope.version = scope_version
    metrics = sm.metrics
    if snap.rows:  # a metric without data points is not sent
        total = metrics.add(name=REQUESTS_TOTAL, description=_HELP[REQUESTS_TOTAL], unit="{request}")
        total.sum.aggregation_temporality = CUMULATIVE
        total.sum.is_monotonic = True
        hists = []
        for name, unit in ((REQUEST_DURATION, "ms"), (REQUEST_BYTES, "By"), (RESPONSE_BYTES, "By")):
            m = metrics.add(name=name, description=_HELP[name], unit=unit)
            m.histogram.aggregation_temporality = CUMULATIVE
            hists.append(m.histogram.data_points)
        counts, (dur, req, resp) = total.sum.data_points, hists
        for r in snap.rows:
            hist_attrs, num_attrs = attributes(r.series)
            p = counts.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns, as_int=r.count)
            p.MergeFromString(num_attrs)
            for points, buckets, total_value, bounds in ((dur, r.dur, r.dur_sum, _DUR_BOUNDS),
                                                         (req, r.req, r.req_sum, _BYTES_BOUNDS),
                                                         (resp, r.resp, r.resp_sum, _BYTES_BOUNDS)):
                p = points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=r.count)
                p.MergeFromString(hist_attrs)
                p.sum = total_value
                p.bucket_counts.extend(buckets)
                p.explicit_bounds.extend(bounds)
    if snap.tcp:
        for k, (name, unit) in enumerate(((TCP_OPENED, "{connection}"), (TCP_CLOSED, "{connection}"),
                                          (TCP_SENT, "By"), (TCP_RECEIVED, "By")), start=1):
            m = metrics.add(name=name, description=_TCP_HELP[name], unit=unit)
            m.sum.aggregation_temporality = CUMULATIVE
            m.sum.is_monotonic = True
            for t in snap.tcp:
                p = m.sum.data_points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns, as_int=t[k])
                p.MergeFromString(attributes(t[0])[1])
    for name, (value, help_text) in _stat_items(snap.stats):
        m = metrics.add(name=name, description=help_text)
        if name.endswith("_total"):
            m.sum.aggregation_temporality = CUMULATIVE
            m.sum.is_monotonic = True
            point = m.sum.data_points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns)
        else:
            point = m.gauge.data_points.add(time_unix_nano=now_ns)
        if isinstance(value, float):
            point.as_double = value
        else:
            point.as_int = int(value)
    return req_msg.SerializeToString()
