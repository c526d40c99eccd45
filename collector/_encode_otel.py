"""OTLP metrics and logs to the exporter's columns. Pure: no I/O, no ClickHouse.

One row per data point (metrics) or log record (logs), rendered as the OpenTelemetry Collector's
ClickHouse exporter renders them (``pcommon.Value.AsString`` for attributes and bodies, see
:mod:`._encode`). What the OTLP spec calls invalid is rejected, counted and described, never
stored half-right; everything else is stored as sent:

- a trace or span id of the wrong length (a log record's, an exemplar's: 16 and 8 bytes, or none);
- a time the store cannot hold (``DateTime64(9)`` ends with int64 nanoseconds, in 2262);
- a number data point with no value, unless flagged ``NO_RECORDED_VALUE`` (then 0, as the exporter);
- a histogram whose ``bucket_counts`` is neither empty nor one longer than ``explicit_bounds``, or
  whose bounds are not strictly increasing;
- a summary quantile outside [0, 1] or quantiles not strictly increasing;
- a log record whose severity number is outside the spec's 0..24;
- a metric with no data at all is dropped with a warning (it has no data points to count).

Counts that disagree with their buckets, negative quantile values and unknown aggregation
temporalities are stored as sent: the point is still what the sender measured.
"""

from __future__ import annotations

import pyarrow as pa
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from tracemesh.collector._encode import Rejections, attrs, value_str
from tracemesh.collector._schema import (
    LOG_COLUMNS,
    LOGS_TABLE,
    METRIC_COLUMNS,
    METRICS_EXP_HISTOGRAM_TABLE,
    METRICS_GAUGE_TABLE,
    METRICS_HISTOGRAM_TABLE,
    METRICS_SUM_TABLE,
    METRICS_SUMMARY_TABLE,
)

#: The last nanosecond ``DateTime64(9)`` (and Arrow's ``timestamp('ns')``) can hold: 2262-04-11.
MAX_TIME_NS = 2**63 - 1
#: ``DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK``
FLAG_NO_RECORDED_VALUE = 1
#: ``LogRecordFlags.LOG_RECORD_FLAGS_TRACE_FLAGS_MASK``: the W3C trace flags, all ``TraceFlags`` holds.
TRACE_FLAGS_MASK = 0xFF
#: The log data model's severity numbers; 0 is unspecified.
MAX_SEVERITY_NUMBER = 24
# The exporter hex-encodes an exemplar's fixed-size id arrays, so an absent id is stored as zeros.
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

_MAP = pa.map_(pa.string(), pa.string())
_TS = pa.timestamp("ns")
_STR = pa.string()
_F64 = pa.float64()

_COMMON_FIELDS = [
    ("ResourceAttributes", _MAP), ("ResourceSchemaUrl", _STR), ("ScopeName", _STR), ("ScopeVersion", _STR),
    ("ScopeAttributes", _MAP), ("ScopeDroppedAttrCount", pa.uint32()), ("ScopeSchemaUrl", _STR),
    ("ServiceName", _STR), ("MetricName", _STR), ("MetricDescription", _STR), ("MetricUnit", _STR),
    ("Attributes", _MAP), ("StartTimeUnix", _TS), ("TimeUnix", _TS),
]
_EXEMPLAR_FIELDS = [
    ("Exemplars.FilteredAttributes", pa.list_(_MAP)), ("Exemplars.TimeUnix", pa.list_(_TS)),
    ("Exemplars.Value", pa.list_(_F64)), ("Exemplars.SpanId", pa.list_(_STR)), ("Exemplars.TraceId", pa.list_(_STR)),
]
_TAIL_FIELDS = [("Flags", pa.uint32()), ("Min", _F64), ("Max", _F64), ("AggregationTemporality", pa.int32())]

#: Arrow schema of each table we insert into, columns in table order (as ``_schema`` lists them).
ARROW_SCHEMAS: dict[str, pa.Schema] = {
    METRICS_GAUGE_TABLE: pa.schema(
        _COMMON_FIELDS + [("Value", _F64), ("Flags", pa.uint32())] + _EXEMPLAR_FIELDS),
    METRICS_SUM_TABLE: pa.schema(
        _COMMON_FIELDS + [("Value", _F64), ("Flags", pa.uint32())] + _EXEMPLAR_FIELDS
        + [("AggregationTemporality", pa.int32()), ("IsMonotonic", pa.bool_())]),
    METRICS_HISTOGRAM_TABLE: pa.schema(
        _COMMON_FIELDS + [("Count", pa.uint64()), ("Sum", _F64), ("BucketCounts", pa.list_(pa.uint64())),
                          ("ExplicitBounds", pa.list_(_F64))] + _EXEMPLAR_FIELDS + _TAIL_FIELDS),
    METRICS_EXP_HISTOGRAM_TABLE: pa.schema(
        _COMMON_FIELDS + [("Count", pa.uint64()), ("Sum", _F64), ("Scale", pa.int32()), ("ZeroCount", pa.uint64()),
                          ("PositiveOffset", pa.int32()), ("PositiveBucketCounts", pa.list_(pa.uint64())),
                          ("NegativeOffset", pa.int32()), ("NegativeBucketCounts", pa.list_(pa.uint64()))]
        + _EXEMPLAR_FIELDS + _TAIL_FIELDS),
    METRICS_SUMMARY_TABLE: pa.schema(
        _COMMON_FIELDS + [("Count", pa.uint64()), ("Sum", _F64), ("ValueAtQuantiles.Quantile", pa.list_(_F64)),
                          ("ValueAtQuantiles.Value", pa.list_(_F64)), ("Flags", pa.uint32())]),
    LOGS_TABLE: pa.schema([
        ("Timestamp", _TS), ("TraceId", _STR), ("SpanId", _STR), ("TraceFlags", pa.uint8()), ("SeverityText", _STR),
        ("SeverityNumber", pa.uint8()), ("ServiceName", _STR), ("Body", _STR), ("ResourceSchemaUrl", _STR),
        ("ResourceAttributes", _MAP), ("ScopeSchemaUrl", _STR), ("ScopeName", _STR), ("ScopeVersion", _STR),
        ("ScopeAttributes", _MAP), ("LogAttributes", _MAP),
    ]),
}
for _table, _cols in {**METRIC_COLUMNS, LOGS_TABLE: LOG_COLUMNS}.items():
    assert tuple(ARROW_SCHEMAS[_table].names) == _cols, _table
del _table, _cols
METRIC_TABLES = tuple(METRIC_COLUMNS)


class TableRows:
    """Rows for one table, held as one list per column in table order (``columns``)."""

    __slots__ = ("table", "columns", "schema")

    def __init__(self, table: str) -> None:
        self.table = table
        self.schema: pa.Schema = ARROW_SCHEMAS[table]
        self.columns: dict[str, list] = {name: [] for name in self.schema.names}

    def __len__(self) -> int:
        return len(self.columns[self.schema.names[0]])

    def __repr__(self) -> str:
        return f"<TableRows {self.table} rows={len(self)}>"

    def extend(self, other: "TableRows") -> None:
        if other.table != self.table:
            raise ValueError(f"cannot extend {self.table} rows with {other.table} rows")
        for name, col in self.columns.items():
            col.extend(other.columns[name])

    def arrow(self) -> pa.Table:
        """The rows as an Arrow table whose schema matches the table's DDL (maps, ns timestamps, widths)."""
        arrays = [pa.array(self.columns[f.name], type=f.type) for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def insert_sql(self) -> str:
        """``INSERT INTO table (columns...)``: names the columns, so DEFAULT columns are filled."""
        names = ", ".join(f"`{n}`" for n in self.schema.names)
        return f"INSERT INTO {self.table} ({names})"


def new_metric_rows() -> dict[str, TableRows]:
    return {t: TableRows(t) for t in METRIC_TABLES}


# -- metrics -------------------------------------------------------------------------------------


def _exemplars(exemplars, where: str):
    """The five Exemplars.* lists, or a problem string."""
    fa, tu, va, sp, tr = [], [], [], [], []
    for e in exemplars:
        if len(e.trace_id) not in (0, 16) or len(e.span_id) not in (0, 8):
            return (f"{where}: an exemplar's trace_id/span_id must be 16/8 bytes or empty "
                    f"(got {len(e.trace_id)}/{len(e.span_id)})")
        if e.time_unix_nano > MAX_TIME_NS:
            return f"{where}: an exemplar's time_unix_nano {e.time_unix_nano} is beyond 2262"
        fa.append(attrs(e.filtered_attributes))
        tu.append(e.time_unix_nano)
        which = e.WhichOneof("value")
        va.append(e.as_double if which == "as_double" else float(e.as_int) if which == "as_int" else 0.0)
        sp.append(e.span_id.hex() if e.span_id else _ZERO_SPAN_ID)
        tr.append(e.trace_id.hex() if e.trace_id else _ZERO_TRACE_ID)
    return fa, tu, va, sp, tr


def _times_problem(dp, where: str) -> str | None:
    if dp.time_unix_nano > MAX_TIME_NS or dp.start_time_unix_nano > MAX_TIME_NS:
        return f"{where}: a data point's time is beyond 2262"
    return None


class _Metric:
    """What every row of one metric shares: resource, scope and the metric's own fields."""

    __slots__ = ("values", "where")

    def __init__(self, scope_head: tuple, metric) -> None:
        self.values = scope_head + (metric.name, metric.description, metric.unit)
        self.where = f"metric {metric.name!r}"

    def append(self, cols: dict[str, list], dp) -> None:
        c = cols
        (res, res_url, sname, sver, sattrs, sdropped, surl, service, name, desc, unit) = self.values
        c["ResourceAttributes"].append(res)
        c["ResourceSchemaUrl"].append(res_url)
        c["ScopeName"].append(sname)
        c["ScopeVersion"].append(sver)
        c["ScopeAttributes"].append(sattrs)
        c["ScopeDroppedAttrCount"].append(sdropped)
        c["ScopeSchemaUrl"].append(surl)
        c["ServiceName"].append(service)
        c["MetricName"].append(name)
        c["MetricDescription"].append(desc)
        c["MetricUnit"].append(unit)
        c["Attributes"].append(attrs(dp.attributes))
        c["StartTimeUnix"].append(dp.start_time_unix_nano)
        c["TimeUnix"].append(dp.time_unix_nano)


def _append_exemplars(c: dict[str, list], ex) -> None:
    fa, tu, va, sp, tr = ex
    c["Exemplars.FilteredAttributes"].append(fa)
    c["Exemplars.TimeUnix"].append(tu)
    c["Exemplars.Value"].append(va)
    c["Exemplars.SpanId"].append(sp)
    c["Exemplars.TraceId"].append(tr)


def _number_points(rows: TableRows, meta: _Metric, points, rej: Rejections, sum_info=None) -> None:
    c = rows.columns
    for dp in points:
        problem = _times_problem(dp, meta.where)
        if problem is None:
            which = dp.WhichOneof("value")
            if which == "as_double":
                value = dp.as_double
            elif which == "as_int":
                value = float(dp.as_int)
            elif dp.flags & FLAG_NO_RECORDED_VALUE:
                value = 0.0
            else:
                problem = f"{meta.where}: a data point has no value (neither as_double nor as_int)"
        ex = problem or _exemplars(dp.exemplars, meta.where)
        if isinstance(ex, str):
            rej.add(ex)
            continue
        meta.append(c, dp)
        c["Value"].append(value)
        c["Flags"].append(dp.flags)
        _append_exemplars(c, ex)
        if sum_info is not None:
            c["AggregationTemporality"].append(sum_info[0])
            c["IsMonotonic"].append(sum_info[1])


def _histogram_problem(dp, where: str) -> str | None:
    bounds, counts = dp.explicit_bounds, dp.bucket_counts
    if (len(counts) != len(bounds) + 1) if counts else bool(bounds):
        return (f"{where}: bucket_counts must be empty or one longer than explicit_bounds "
                f"(got {len(counts)} counts, {len(bounds)} bounds)")
    if any(not a < b for a, b in zip(bounds, bounds[1:])):
        return f"{where}: explicit_bounds must be strictly increasing"
    return None


def _histogram_points(rows: TableRows, meta: _Metric, hist, rej: Rejections) -> None:
    c = rows.columns
    temporality = hist.aggregation_temporality
    for dp in hist.data_points:
        problem = _times_problem(dp, meta.where) or _histogram_problem(dp, meta.where)
        ex = problem or _exemplars(dp.exemplars, meta.where)
        if isinstance(ex, str):
            rej.add(ex)
            continue
        meta.append(c, dp)
        c["Count"].append(dp.count)
        c["Sum"].append(dp.sum)
        c["BucketCounts"].append(list(dp.bucket_counts))
        c["ExplicitBounds"].append(list(dp.explicit_bounds))
        _append_exemplars(c, ex)
        c["Flags"].append(dp.flags)
        c["Min"].append(dp.min)
        c["Max"].append(dp.max)
        c["AggregationTemporality"].append(temporality)


def _exp_histogram_points(rows: TableRows, meta: _Metric, hist, rej: Rejections) -> None:
    c = rows.columns
    temporality = hist.aggregation_temporality
    for dp in hist.data_points:
        ex = _times_problem(dp, meta.where) or _exemplars(dp.exemplars, meta.where)
        if isinstance(ex, str):
            rej.add(ex)
            continue
        meta.append(c, dp)
        c["Count"].append(dp.count)
        c["Sum"].append(dp.sum)
        c["Scale"].append(dp.scale)
        c["ZeroCount"].append(dp.zero_count)
        c["PositiveOffset"].append(dp.positive.offset)
        c["PositiveBucketCounts"].append(list(dp.positive.bucket_counts))
        c["NegativeOffset"].append(dp.negative.offset)
        c["NegativeBucketCounts"].append(list(dp.negative.bucket_counts))
        _append_exemplars(c, ex)
        c["Flags"].append(dp.flags)
        c["Min"].append(dp.min)
        c["Max"].append(dp.max)
        c["AggregationTemporality"].append(temporality)


def _summary_problem(dp, where: str) -> str | None:
    qs = [q.quantile for q in dp.quantile_values]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        return f"{where}: a quantile must be in [0, 1]"
    if any(not a < b for a, b in zip(qs, qs[1:])):
        return f"{where}: quantiles must be strictly increasing"
    return None


def _summary_points(rows: TableRows, meta: _Metric, points, rej: Rejections) -> None:
    c = rows.columns
    for dp in points:
        problem = _times_problem(dp, meta.where) or _summary_problem(dp, meta.where)
        if problem:
            rej.add(problem)
            continue
        meta.append(c, dp)
        c["Count"].append(dp.count)
        c["Sum"].append(dp.sum)
        c["ValueAtQuantiles.Quantile"].append([q.quantile for q in dp.quantile_values])
        c["ValueAtQuantiles.Value"].append([q.value for q in dp.quantile_values])
        c["Flags"].append(dp.flags)


def encode_metrics(
    req: ExportMetricsServiceRequest, out: dict[str, TableRows] | None = None
) -> tuple[dict[str, TableRows], Rejections]:
    """Append the data points of *req* to *out* (new, one TableRows per metrics table, if None).

    Returns the rows by table name (all five tables, some maybe empty) and what was rejected,
    counted in data points as OTLP's ``rejected_data_points`` is.
    """
    tables = out if out is not None else new_metric_rows()
    gauge, sum_, hist, exp_hist, summary = (tables[t] for t in METRIC_TABLES)
    rej = Rejections()
    for rm in req.resource_metrics:
        res = attrs(rm.resource.attributes)
        service = res.get("service.name", "")
        for sm in rm.scope_metrics:
            scope = sm.scope
            head = (res, rm.schema_url, scope.name, scope.version, attrs(scope.attributes),
                    scope.dropped_attributes_count, sm.schema_url, service)
            for metric in sm.metrics:
                meta = _Metric(head, metric)
                which = metric.WhichOneof("data")
                if which == "gauge":
                    _number_points(gauge, meta, metric.gauge.data_points, rej)
                elif which == "sum":
                    s = metric.sum
                    _number_points(sum_, meta, s.data_points, rej, (s.aggregation_temporality, s.is_monotonic))
                elif which == "histogram":
                    _histogram_points(hist, meta, metric.histogram, rej)
                elif which == "exponential_histogram":
                    _exp_histogram_points(exp_hist, meta, metric.exponential_histogram, rej)
                elif which == "summary":
                    _summary_points(summary, meta, metric.summary.data_points, rej)
                else:
                    # no data points to count: OTLP's way to say so is a warning with 0 rejected
                    rej.add(f"{meta.where}: no data (gauge, sum, histogram, exponential_histogram or summary)", 0)
    return tables, rej


# -- logs ----------------------------------------------------------------------------------------


def _log_problem(r, ts: int) -> str | None:
    if len(r.trace_id) not in (0, 16) or len(r.span_id) not in (0, 8):
        return (f"log record: trace_id/span_id must be 16/8 bytes or empty "
                f"(got {len(r.trace_id)}/{len(r.span_id)})")
    if not 0 <= r.severity_number <= MAX_SEVERITY_NUMBER:
        return f"log record: severity_number must be 0..{MAX_SEVERITY_NUMBER} (got {r.severity_number})"
    if ts > MAX_TIME_NS:
        return f"log record: time {ts} is beyond 2262"
    return None


def encode_logs(req: ExportLogsServiceRequest, out: TableRows | None = None) -> tuple[TableRows, Rejections]:
    """Append the log records of *req* to *out* (new ``otel_logs`` rows if None); return it and what was rejected."""
    rows = out if out is not None else TableRows(LOGS_TABLE)
    c = rows.columns
    rej = Rejections()
    ts_, tid_, sid_, flags_ = c["Timestamp"].append, c["TraceId"].append, c["SpanId"].append, c["TraceFlags"].append
    stext_, snum_, svc_, body_ = c["SeverityText"].append, c["SeverityNumber"].append, c["ServiceName"].append, c["Body"].append
    rurl_, res_, surl_ = c["ResourceSchemaUrl"].append, c["ResourceAttributes"].append, c["ScopeSchemaUrl"].append
    sname_, sver_, sattr_, lattr_ = c["ScopeName"].append, c["ScopeVersion"].append, c["ScopeAttributes"].append, c["LogAttributes"].append
    for rl in req.resource_logs:
        res = attrs(rl.resource.attributes)
        service = res.get("service.name", "")
        res_url = rl.schema_url
        for sl in rl.scope_logs:
            scope_url, scope_name, scope_version = sl.schema_url, sl.scope.name, sl.scope.version
            scope_attrs = attrs(sl.scope.attributes)
            for r in sl.log_records:
                # as the exporter: the event time, or when the collector first saw it if unknown
                ts = r.time_unix_nano or r.observed_time_unix_nano
                problem = _log_problem(r, ts)
                if problem:
                    rej.add(problem)
                    continue
                ts_(ts)
                tid_(r.trace_id.hex() if any(r.trace_id) else "")
                sid_(r.span_id.hex() if any(r.span_id) else "")
                flags_(r.flags & TRACE_FLAGS_MASK)
                stext_(r.severity_text)
                snum_(r.severity_number)
                svc_(service)
                body_(value_str(r.body))
                rurl_(res_url)
                res_(res)
                surl_(scope_url)
                sname_(scope_name)
                sver_(scope_version)
                sattr_(scope_attrs)
                lattr_(attrs(r.attributes))
    return rows, rej
