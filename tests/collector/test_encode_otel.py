"""Metrics and logs to the exporter's columns: requests built by the real OpenTelemetry SDK (as
users' apps send them) or by hand where the SDK cannot say it (summaries, malformed input)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs as sdk_encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics as sdk_encode_metrics
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1 import metrics_pb2 as mpb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import AlwaysOnExemplarFilter, Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from tracemesh.collector._encode_otel import (
    ARROW_SCHEMAS,
    MAX_TIME_NS,
    TableRows,
    encode_logs,
    encode_metrics,
)
from tracemesh.collector._schema import LOG_COLUMNS, METRIC_COLUMNS

PROBE = Path(__file__).with_name("otel_chdb_probe.py")
T0 = 1_700_000_000_123_456_789
TRACE = bytes(range(1, 17))
SPAN = bytes(range(1, 9))


# -- request builders ------------------------------------------------------------------------------


def sdk_metrics_request(temporality: AggregationTemporality | None = None) -> tuple[ExportMetricsServiceRequest, str, str]:
    """Every instrument kind, recorded inside a sampled span so exemplars carry its ids."""
    prefs = {Counter: temporality, Histogram: temporality} if temporality is not None else {}
    reader = InMemoryMetricReader(preferred_temporality=prefs)
    provider = MeterProvider(
        resource=Resource.create({"service.name": "checkout", "deployment.environment": "test"}),
        metric_readers=[reader],
        exemplar_filter=AlwaysOnExemplarFilter(),
        views=[View(instrument_name="payload*", aggregation=ExponentialBucketHistogramAggregation())],
    )
    meter = provider.get_meter("mesh.sidecar", "1.2.3", attributes={"scope.n": 7})
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        meter.create_counter("requests", unit="1", description="requests seen").add(
            3, {"code": 200, "ok": True, "ratio": 0.5, "route": "/pay"})
        meter.create_up_down_counter("inflight").add(-2)
        meter.create_histogram("latency", unit="ms").record(12.5, {"route": "/pay"})
        meter.create_histogram("payload_bytes", unit="By").record(3.0)
        meter.create_gauge("temperature").set(21.25)
    meter.create_observable_gauge("queue_depth", [lambda _o: [Observation(7, {"q": "spans"})]])
    req = sdk_encode_metrics(reader.get_metrics_data())
    provider.shutdown()
    return req, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def sdk_logs_request() -> tuple[ExportLogsServiceRequest, str, str, int]:
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    log = provider.get_logger("tracemesh.test.otel")
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        log.emit(severity_number=SeverityNumber.WARN, severity_text="WARN", body="payment declined for order-7",
                 attributes={"order.total": 12.5, "retry": False})
    log.emit(severity_number=SeverityNumber.INFO, severity_text="INFO", body="outside any span")
    provider.get_logger("mesh.events", "0.1").emit(body={"event": "deploy", "n": 3}, severity_text="INFO")
    req = sdk_encode_logs(exporter.get_finished_logs())
    provider.shutdown()
    return req, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), int(ctx.trace_flags)


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def metrics_req(*metrics: mpb.Metric, service: str = "svc") -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(resource_metrics=[mpb.ResourceMetrics(
        resource=PbResource(attributes=[kv("service.name", service)]),
        schema_url="https://opentelemetry.io/schemas/1.26.0",
        scope_metrics=[mpb.ScopeMetrics(
            scope=InstrumentationScope(name="lib", version="2.0", attributes=[kv("k", 1)], dropped_attributes_count=4),
            schema_url="https://opentelemetry.io/schemas/1.25.0",
            metrics=list(metrics),
        )],
    )])


def gauge(name: str, *points: mpb.NumberDataPoint) -> mpb.Metric:
    return mpb.Metric(name=name, gauge=mpb.Gauge(data_points=list(points)))


def number(value: float | None = 1.0, **kw) -> mpb.NumberDataPoint:
    kw.setdefault("time_unix_nano", T0)
    if value is not None:
        kw["as_double"] = value
    return mpb.NumberDataPoint(**kw)


def histogram(name: str, *points: mpb.HistogramDataPoint) -> mpb.Metric:
    return mpb.Metric(name=name, histogram=mpb.Histogram(data_points=list(points), aggregation_temporality=1))


def hpoint(counts, bounds, **kw) -> mpb.HistogramDataPoint:
    kw.setdefault("count", sum(counts))
    return mpb.HistogramDataPoint(time_unix_nano=T0, bucket_counts=counts, explicit_bounds=bounds, **kw)


def summary(name: str, *quantiles: tuple[float, float]) -> mpb.Metric:
    return mpb.Metric(name=name, summary=mpb.Summary(data_points=[mpb.SummaryDataPoint(
        time_unix_nano=T0, start_time_unix_nano=T0 - 10**9, count=10, sum=55.5, flags=0,
        quantile_values=[mpb.SummaryDataPoint.ValueAtQuantile(quantile=q, value=v) for q, v in quantiles],
    )]))


def logs_req(*records: LogRecord) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=PbResource(attributes=[kv("service.name", "svc"), kv("host.cores", 2)]),
        schema_url="https://opentelemetry.io/schemas/1.26.0",
        scope_logs=[ScopeLogs(scope=InstrumentationScope(name="logger", version="9", attributes=[kv("a", True)]),
                              schema_url="https://opentelemetry.io/schemas/1.25.0", log_records=list(records))],
    )])


def rows_of(rows: TableRows) -> list[dict]:
    return [dict(zip(rows.columns, vals)) for vals in zip(*rows.columns.values())]


def by_name(rows: TableRows) -> dict[str, dict]:
    return {r["MetricName"]: r for r in rows_of(rows)}


# -- metrics from the SDK --------------------------------------------------------------------------


def test_sdk_metrics_land_in_their_tables():
    req, trace_id, span_id = sdk_metrics_request()
    tables, rej = encode_metrics(req)
    assert rej.count == 0 and rej.reasons == []
    assert set(tables) == set(METRIC_COLUMNS)
    assert {t: len(r) for t, r in tables.items()} == {
        "otel_metrics_gauge": 2, "otel_metrics_sum": 2, "otel_metrics_histogram": 1,
        "otel_metrics_exp_histogram": 1, "otel_metrics_summary": 0,
    }

    sums = by_name(tables["otel_metrics_sum"])
    req_row = sums["requests"]
    assert req_row["ServiceName"] == "checkout"
    assert req_row["ResourceAttributes"]["deployment.environment"] == "test"
    assert (req_row["ScopeName"], req_row["ScopeVersion"], req_row["ScopeAttributes"]) == ("mesh.sidecar", "1.2.3", {"scope.n": "7"})
    assert (req_row["MetricDescription"], req_row["MetricUnit"]) == ("requests seen", "1")
    # attribute values rendered as the Collector renders them
    assert req_row["Attributes"] == {"code": "200", "ok": "true", "ratio": "0.5", "route": "/pay"}
    assert req_row["Value"] == 3.0 and req_row["Flags"] == 0
    assert (req_row["AggregationTemporality"], req_row["IsMonotonic"]) == (2, True)  # cumulative counter
    assert 0 < req_row["StartTimeUnix"] <= req_row["TimeUnix"]
    assert req_row["Exemplars.TraceId"] == [trace_id] and req_row["Exemplars.SpanId"] == [span_id]
    assert req_row["Exemplars.Value"] == [3.0]
    assert sums["inflight"]["Value"] == -2.0 and sums["inflight"]["IsMonotonic"] is False

    hist = by_name(tables["otel_metrics_histogram"])["latency"]
    assert hist["Count"] == 1 and hist["Sum"] == 12.5 and hist["Min"] == hist["Max"] == 12.5
    assert len(hist["BucketCounts"]) == len(hist["ExplicitBounds"]) + 1 and sum(hist["BucketCounts"]) == 1
    assert hist["Exemplars.TraceId"] == [trace_id] and hist["AggregationTemporality"] == 2

    exp = by_name(tables["otel_metrics_exp_histogram"])["payload_bytes"]
    assert exp["Count"] == 1 and exp["Sum"] == 3.0 and exp["ZeroCount"] == 0 and exp["MetricUnit"] == "By"
    assert isinstance(exp["Scale"], int) and exp["PositiveBucketCounts"] and sum(exp["PositiveBucketCounts"]) == 1

    gauges = by_name(tables["otel_metrics_gauge"])
    assert gauges["temperature"]["Value"] == 21.25
    assert gauges["queue_depth"]["Value"] == 7.0 and gauges["queue_depth"]["Attributes"] == {"q": "spans"}
    # recorded outside any span: the exporter hex-encodes the absent ids as zeros
    assert gauges["queue_depth"]["Exemplars.TraceId"] == ["0" * 32]
    assert gauges["queue_depth"]["Exemplars.SpanId"] == ["0" * 16]


def test_delta_temporality_is_kept():
    req, _, _ = sdk_metrics_request(AggregationTemporality.DELTA)
    tables, _ = encode_metrics(req)
    assert by_name(tables["otel_metrics_sum"])["requests"]["AggregationTemporality"] == 1
    assert by_name(tables["otel_metrics_histogram"])["latency"]["AggregationTemporality"] == 1


def test_resource_and_scope_fields_and_summary():
    tables, rej = encode_metrics(metrics_req(summary("rpc_seconds", (0.0, 0.1), (0.5, 0.2), (1.0, 0.9))))
    assert rej.count == 0
    (row,) = rows_of(tables["otel_metrics_summary"])
    assert row["ResourceSchemaUrl"] == "https://opentelemetry.io/schemas/1.26.0"
    assert row["ScopeSchemaUrl"] == "https://opentelemetry.io/schemas/1.25.0"
    assert row["ScopeDroppedAttrCount"] == 4 and row["ScopeAttributes"] == {"k": "1"}
    assert row["ValueAtQuantiles.Quantile"] == [0.0, 0.5, 1.0]
    assert row["ValueAtQuantiles.Value"] == [0.1, 0.2, 0.9]
    assert (row["Count"], row["Sum"], row["StartTimeUnix"], row["TimeUnix"]) == (10, 55.5, T0 - 10**9, T0)


def test_service_name_is_rendered_and_empty_when_absent():
    req = metrics_req(gauge("g", number()))
    req.resource_metrics[0].resource.attributes[0].value.CopyFrom(AnyValue(int_value=42))
    tables, _ = encode_metrics(req)
    assert rows_of(tables["otel_metrics_gauge"])[0]["ServiceName"] == "42"
    del req.resource_metrics[0].resource.attributes[:]
    tables, _ = encode_metrics(req)
    assert rows_of(tables["otel_metrics_gauge"])[0]["ServiceName"] == ""


def test_values_exemplars_and_flags_as_the_exporter_stores_them():
    ex_full = mpb.Exemplar(time_unix_nano=T0, as_int=5, trace_id=TRACE, span_id=SPAN,
                           filtered_attributes=[kv("user", "u1")])
    ex_bare = mpb.Exemplar(time_unix_nano=T0, as_double=0.25)
    ex_empty = mpb.Exemplar(time_unix_nano=T0)
    tables, rej = encode_metrics(metrics_req(
        gauge("int", mpb.NumberDataPoint(time_unix_nano=T0, as_int=-(2**53) - 1)),
        gauge("ex", number(1.0, exemplars=[ex_full, ex_bare, ex_empty])),
        gauge("stale", number(None, flags=1)),  # NO_RECORDED_VALUE: valid, value absent
        gauge("nan", number(math.nan)),
    ))
    assert rej.count == 0
    g = by_name(tables["otel_metrics_gauge"])
    assert g["int"]["Value"] == float(-(2**53) - 1)
    assert g["ex"]["Exemplars.Value"] == [5.0, 0.25, 0.0]
    assert g["ex"]["Exemplars.TraceId"] == [TRACE.hex(), "0" * 32, "0" * 32]
    assert g["ex"]["Exemplars.SpanId"] == [SPAN.hex(), "0" * 16, "0" * 16]
    assert g["ex"]["Exemplars.FilteredAttributes"] == [{"user": "u1"}, {}, {}]
    assert g["ex"]["Exemplars.TimeUnix"] == [T0] * 3
    assert (g["stale"]["Value"], g["stale"]["Flags"]) == (0.0, 1)
    assert math.isnan(g["nan"]["Value"])


def test_histograms_the_spec_allows_are_stored_as_sent():
    tables, rej = encode_metrics(metrics_req(
        histogram("no_buckets", hpoint([], [], count=4, sum=2.0)),
        histogram("one_bucket", hpoint([4], [])),
        histogram("count_disagrees", hpoint([1, 2], [10.0], count=7)),
        histogram("with_min", hpoint([1, 0], [1.0], sum=0.5, min=0.5, max=0.5)),
    ))
    assert rej.count == 0
    h = by_name(tables["otel_metrics_histogram"])
    assert (h["no_buckets"]["BucketCounts"], h["no_buckets"]["ExplicitBounds"], h["no_buckets"]["Count"]) == ([], [], 4)
    assert h["count_disagrees"]["Count"] == 7
    assert (h["with_min"]["Min"], h["with_min"]["Max"], h["no_buckets"]["Min"]) == (0.5, 0.5, 0.0)
    assert h["with_min"]["AggregationTemporality"] == 1


BAD_EXEMPLAR_TRACE = mpb.Exemplar(time_unix_nano=T0, as_double=1.0, trace_id=TRACE[:15], span_id=SPAN)
BAD_EXEMPLAR_SPAN = mpb.Exemplar(time_unix_nano=T0, as_double=1.0, trace_id=TRACE, span_id=SPAN + b"\x00")


@pytest.mark.parametrize("metric, reason", [
    (gauge("m", number(exemplars=[BAD_EXEMPLAR_TRACE])), "exemplar's trace_id/span_id must be 16/8 bytes"),
    (gauge("m", number(exemplars=[BAD_EXEMPLAR_SPAN])), "(got 16/9)"),
    (gauge("m", number(None)), "has no value"),
    (gauge("m", number(time_unix_nano=MAX_TIME_NS + 1)), "beyond 2262"),
    (gauge("m", number(start_time_unix_nano=2**64 - 1)), "beyond 2262"),
    (gauge("m", number(exemplars=[mpb.Exemplar(time_unix_nano=2**64 - 1)])), "beyond 2262"),
    (mpb.Metric(name="m", sum=mpb.Sum(data_points=[number(None)], is_monotonic=True)), "has no value"),
    (histogram("m", hpoint([1, 2, 3], [1.0])), "(got 3 counts, 1 bounds)"),
    (histogram("m", hpoint([], [1.0])), "bucket_counts must be empty or one longer"),
    (histogram("m", hpoint([1, 1, 1], [2.0, 1.0])), "strictly increasing"),
    (histogram("m", hpoint([1, 1, 1], [1.0, 1.0])), "strictly increasing"),
    (histogram("m", hpoint([1, 1], [math.nan])), ""),  # one NaN bound is alone, so ordered; stored
    (histogram("m", hpoint([1, 1, 1], [math.nan, 1.0])), "strictly increasing"),
    (histogram("m", hpoint([1, 0], [1.0], exemplars=[BAD_EXEMPLAR_TRACE])), "exemplar"),
    (mpb.Metric(name="m", exponential_histogram=mpb.ExponentialHistogram(data_points=[mpb.ExponentialHistogramDataPoint(
        time_unix_nano=T0, exemplars=[BAD_EXEMPLAR_SPAN])])), "exemplar"),
    (summary("m", (1.5, 1.0)), "quantile must be in [0, 1]"),
    (summary("m", (-0.1, 1.0)), "quantile must be in [0, 1]"),
    (summary("m", (math.nan, 1.0)), "quantile must be in [0, 1]"),
    (summary("m", (0.9, 1.0), (0.5, 2.0)), "quantiles must be strictly increasing"),
])
def test_invalid_points_are_rejected_with_a_reason_and_the_rest_stored(metric, reason):
    good = gauge("good", number(2.0))
    tables, rej = encode_metrics(metrics_req(good, metric, good))
    stored = sum(len(r) for r in tables.values())
    if not reason:
        assert (rej.count, stored) == (0, 3)
        return
    assert rej.count == 1 and stored == 2
    assert len(rej.reasons) == 1 and reason in rej.reasons[0] and "metric 'm'" in rej.reasons[0]
    assert [r["MetricName"] for r in rows_of(tables["otel_metrics_gauge"])] == ["good", "good"]


def test_a_metric_without_data_is_a_warning_not_a_count():
    tables, rej = encode_metrics(metrics_req(mpb.Metric(name="empty"), gauge("g", number())))
    assert rej.count == 0 and "metric 'empty': no data" in rej.message
    assert len(tables["otel_metrics_gauge"]) == 1


def test_negative_quantile_values_are_stored():
    tables, rej = encode_metrics(metrics_req(summary("s", (0.5, -1.0))))
    assert rej.count == 0 and rows_of(tables["otel_metrics_summary"])[0]["ValueAtQuantiles.Value"] == [-1.0]


def test_encoding_appends_to_out():
    req = metrics_req(gauge("g", number()))
    tables, _ = encode_metrics(req)
    again, _ = encode_metrics(req, out=tables)
    assert again is tables and len(tables["otel_metrics_gauge"]) == 2


# -- logs ----------------------------------------------------------------------------------------


def test_sdk_logs():
    req, trace_id, span_id, trace_flags = sdk_logs_request()
    rows, rej = encode_logs(req)
    assert rej.count == 0 and rows.table == "otel_logs" and len(rows) == 3
    r = {row["Body"]: row for row in rows_of(rows)}
    warn = r["payment declined for order-7"]
    assert (warn["TraceId"], warn["SpanId"], warn["TraceFlags"]) == (trace_id, span_id, trace_flags)
    assert trace_flags & 1  # sampled
    assert (warn["SeverityText"], warn["SeverityNumber"]) == ("WARN", 13)
    assert warn["ServiceName"] == "checkout" and warn["ScopeName"] == "tracemesh.test.otel"
    assert warn["LogAttributes"]["order.total"] == "12.5" and warn["LogAttributes"]["retry"] == "false"
    assert warn["Timestamp"] > 1_600_000_000 * 10**9
    info = r["outside any span"]
    assert (info["TraceId"], info["SpanId"], info["TraceFlags"], info["SeverityNumber"]) == ("", "", 0, 9)
    event = r['{"event":"deploy","n":3}']  # a map body is rendered as JSON
    assert (event["ScopeName"], event["ScopeVersion"], event["SeverityText"]) == ("mesh.events", "0.1", "INFO")


def test_log_fields_by_hand():
    body = AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(string_value="x")]))
    rows, rej = encode_logs(logs_req(
        LogRecord(time_unix_nano=T0, observed_time_unix_nano=T0 + 5, trace_id=TRACE, span_id=SPAN, flags=0x0101,
                  severity_number=17, severity_text="ERROR", body=body, attributes=[kv("n", 1.0)]),
        LogRecord(observed_time_unix_nano=T0 + 7, body=AnyValue(bytes_value=b"\x00\xff")),
        LogRecord(trace_id=bytes(16), span_id=bytes(8), body=AnyValue(kvlist_value=KeyValueList(values=[kv("a", "b")]))),
    ))
    assert rej.count == 0
    first, second, third = rows_of(rows)
    assert first["Timestamp"] == T0  # the event time wins over the observed time
    assert (first["TraceId"], first["SpanId"], first["TraceFlags"]) == (TRACE.hex(), SPAN.hex(), 1)
    assert (first["SeverityText"], first["SeverityNumber"], first["Body"]) == ("ERROR", 17, '[1,"x"]')
    assert first["LogAttributes"] == {"n": "1"}
    assert first["ResourceAttributes"] == {"service.name": "svc", "host.cores": "2"}
    assert (first["ResourceSchemaUrl"], first["ScopeSchemaUrl"]) == (
        "https://opentelemetry.io/schemas/1.26.0", "https://opentelemetry.io/schemas/1.25.0")
    assert (first["ScopeName"], first["ScopeVersion"], first["ScopeAttributes"]) == ("logger", "9", {"a": "true"})
    assert second["Timestamp"] == T0 + 7  # no event time: when it was observed
    assert second["Body"] == "AP8=" and second["TraceId"] == "" and second["SpanId"] == ""
    assert (third["Timestamp"], third["TraceId"], third["SpanId"], third["Body"]) == (0, "", "", '{"a":"b"}')


@pytest.mark.parametrize("record, reason", [
    (LogRecord(time_unix_nano=T0, trace_id=TRACE[:8]), "(got 8/0)"),
    (LogRecord(time_unix_nano=T0, trace_id=TRACE, span_id=TRACE), "(got 16/16)"),
    (LogRecord(time_unix_nano=T0, span_id=SPAN[:4]), "trace_id/span_id must be 16/8 bytes or empty"),
    (LogRecord(time_unix_nano=T0, severity_number=25), "severity_number must be 0..24"),
    (LogRecord(time_unix_nano=T0, severity_number=-1), "severity_number must be 0..24"),
    (LogRecord(time_unix_nano=MAX_TIME_NS + 1), "beyond 2262"),
    (LogRecord(observed_time_unix_nano=2**64 - 1), "beyond 2262"),
])
def test_malformed_log_records_are_rejected(record, reason):
    good = LogRecord(time_unix_nano=T0, body=AnyValue(string_value="ok"))
    rows, rej = encode_logs(logs_req(good, record, good))
    assert rej.count == 1 and len(rows) == 2 and reason in rej.message
    assert rows.columns["Body"] == ["ok", "ok"]


def test_rejection_reasons_are_bounded():
    records = [LogRecord(time_unix_nano=T0, severity_number=100 + i) for i in range(10)]
    rows, rej = encode_logs(logs_req(*records))
    assert rej.count == 10 and len(rows) == 0 and len(rej.reasons) == 3


# -- TableRows -----------------------------------------------------------------------------------


def test_table_rows_arrow_types_match_the_ddl():
    tables, _ = encode_metrics(sdk_metrics_request()[0])
    logs, _ = encode_logs(sdk_logs_request()[0])
    for rows in [*tables.values(), logs]:
        t = rows.arrow()
        assert t.num_rows == len(rows)
        assert t.schema == ARROW_SCHEMAS[rows.table]
        assert tuple(t.schema.names) == (LOG_COLUMNS if rows.table == "otel_logs" else METRIC_COLUMNS[rows.table])
    s = ARROW_SCHEMAS["otel_metrics_sum"]
    assert s.field("ResourceAttributes").type == pa.map_(pa.string(), pa.string())
    assert s.field("TimeUnix").type == pa.timestamp("ns")
    assert s.field("Exemplars.TimeUnix").type == pa.list_(pa.timestamp("ns"))
    assert s.field("IsMonotonic").type == pa.bool_() and s.field("AggregationTemporality").type == pa.int32()
    assert s.field("ScopeDroppedAttrCount").type == pa.uint32() and s.field("Flags").type == pa.uint32()
    h = ARROW_SCHEMAS["otel_metrics_exp_histogram"]
    assert h.field("Count").type == pa.uint64() and h.field("PositiveOffset").type == pa.int32()
    assert h.field("NegativeBucketCounts").type == pa.list_(pa.uint64())
    lg = ARROW_SCHEMAS["otel_logs"]
    assert lg.field("TraceFlags").type == pa.uint8() and lg.field("SeverityNumber").type == pa.uint8()


def test_table_rows_extend_and_insert_sql():
    a, _ = encode_logs(logs_req(LogRecord(time_unix_nano=T0)))
    b, _ = encode_logs(logs_req(LogRecord(time_unix_nano=T0 + 1), LogRecord(time_unix_nano=T0 + 2)))
    a.extend(b)
    assert len(a) == 3 and a.columns["Timestamp"] == [T0, T0 + 1, T0 + 2]
    assert a.arrow().num_rows == 3
    with pytest.raises(ValueError):
        a.extend(TableRows("otel_metrics_gauge"))
    assert len(TableRows("otel_metrics_summary")) == 0 and TableRows("otel_metrics_summary").arrow().num_rows == 0
    sql = TableRows("otel_metrics_gauge").insert_sql()
    assert sql.startswith("INSERT INTO otel_metrics_gauge (`ResourceAttributes`, ") and "`Exemplars.TraceId`)" in sql


# -- random requests never raise -----------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
times = st.one_of(st.integers(0, MAX_TIME_NS), st.integers(0, MAX_TIME_NS), u64)
i32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
# mostly well-formed, so that most examples reach the columns; sometimes any length
trace_ids = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary(max_size=20))
span_ids = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8), st.binary(max_size=20))
text = st.text(max_size=8)
scalar = st.one_of(
    st.builds(lambda v: AnyValue(string_value=v), text),
    st.builds(lambda v: AnyValue(int_value=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: AnyValue(double_value=v), floats),
    st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
    st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=8)),
    st.just(AnyValue()),
)
any_value = st.recursive(scalar, lambda inner: st.one_of(
    st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(inner, max_size=3)),
    st.builds(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=kvs)),
              st.lists(st.builds(lambda k, v: KeyValue(key=k, value=v), text, inner), max_size=3)),
), max_leaves=6)
kvs = st.lists(st.builds(lambda k, v: KeyValue(key=k, value=v), st.sampled_from(["service.name", "a", "b", ""]) | text, any_value), max_size=3)
exemplar = st.builds(
    lambda t, v, which, tid, sid, fa: mpb.Exemplar(time_unix_nano=t, trace_id=tid, span_id=sid, filtered_attributes=fa,
                                                   **({which: v if which == "as_double" else int(v) if math.isfinite(v) and abs(v) < 2**63 else 0} if which else {})),
    times, floats, st.sampled_from(["as_double", "as_int", None]), trace_ids, span_ids, kvs)
common = dict(attributes=kvs, start_time_unix_nano=times, time_unix_nano=times, flags=st.integers(0, 2**32 - 1),
              exemplars=st.lists(exemplar, max_size=2))
number_point = st.builds(
    lambda which, v, **kw: mpb.NumberDataPoint(**kw, **({which: v} if which else {})),
    st.sampled_from(["as_double", None]), floats, **common)
int_point = st.builds(lambda v, **kw: mpb.NumberDataPoint(as_int=v, **kw), st.integers(-(2**63), 2**63 - 1), **common)
hist_point = st.builds(
    lambda counts, bounds, count, s, mn, mx, **kw: mpb.HistogramDataPoint(
        bucket_counts=counts, explicit_bounds=bounds, count=count, **kw,
        **({"sum": s} if s is not None else {}), **({"min": mn, "max": mx} if mn is not None else {})),
    st.lists(u64, max_size=4), st.lists(floats, max_size=3), u64, st.none() | floats, st.none() | floats, floats, **common)
buckets = st.builds(lambda off, counts: mpb.ExponentialHistogramDataPoint.Buckets(offset=off, bucket_counts=counts),
                    i32, st.lists(u64, max_size=3))
exp_point = st.builds(
    lambda scale, zc, pos, neg, count, s, **kw: mpb.ExponentialHistogramDataPoint(
        scale=scale, zero_count=zc, positive=pos, negative=neg, count=count, sum=s, **kw),
    i32, u64, buckets, buckets, u64, floats, **common)
summary_point = st.builds(
    lambda qs, count, s, attributes, start_time_unix_nano, time_unix_nano, flags, exemplars: mpb.SummaryDataPoint(
        quantile_values=[mpb.SummaryDataPoint.ValueAtQuantile(quantile=q, value=v) for q, v in qs], count=count, sum=s,
        attributes=attributes, start_time_unix_nano=start_time_unix_nano, time_unix_nano=time_unix_nano, flags=flags),
    st.lists(st.tuples(floats, floats), max_size=3), u64, floats, **common)
metric = st.one_of(
    st.builds(lambda n, ps: mpb.Metric(name=n, gauge=mpb.Gauge(data_points=ps)), text, st.lists(number_point | int_point, max_size=3)),
    st.builds(lambda n, ps, t, m: mpb.Metric(name=n, sum=mpb.Sum(data_points=ps, aggregation_temporality=t, is_monotonic=m)),
              text, st.lists(number_point | int_point, max_size=3), st.integers(0, 5), st.booleans()),
    st.builds(lambda n, ps, t: mpb.Metric(name=n, histogram=mpb.Histogram(data_points=ps, aggregation_temporality=t)),
              text, st.lists(hist_point, max_size=3), i32),
    st.builds(lambda n, ps: mpb.Metric(name=n, exponential_histogram=mpb.ExponentialHistogram(data_points=ps)),
              text, st.lists(exp_point, max_size=3)),
    st.builds(lambda n, ps: mpb.Metric(name=n, summary=mpb.Summary(data_points=ps)), text, st.lists(summary_point, max_size=3)),
    st.builds(lambda n: mpb.Metric(name=n), text),
)
scope = st.builds(lambda n, v, a, d: InstrumentationScope(name=n, version=v, attributes=a, dropped_attributes_count=d),
                  text, text, kvs, st.integers(0, 2**32 - 1))
metrics_request = st.builds(
    lambda rms: ExportMetricsServiceRequest(resource_metrics=rms),
    st.lists(st.builds(lambda a, url, sms: mpb.ResourceMetrics(resource=PbResource(attributes=a), schema_url=url, scope_metrics=sms),
                       kvs, text, st.lists(st.builds(lambda s, url, ms: mpb.ScopeMetrics(scope=s, schema_url=url, metrics=ms),
                                                     scope, text, st.lists(metric, max_size=3)), max_size=2)), max_size=2))
log_record = st.builds(
    lambda t, o, sev, stext, body, a, tid, sid, flags: LogRecord(
        time_unix_nano=t, observed_time_unix_nano=o, severity_number=sev, severity_text=stext, body=body, attributes=a,
        trace_id=tid, span_id=sid, flags=flags),
    st.sampled_from([0]) | times, times, st.integers(0, 24) | st.integers(-3, 30) | i32, text, any_value, kvs,
    trace_ids, span_ids, st.integers(0, 2**32 - 1))
logs_request = st.builds(
    lambda rls: ExportLogsServiceRequest(resource_logs=rls),
    st.lists(st.builds(lambda a, url, sls: ResourceLogs(resource=PbResource(attributes=a), schema_url=url, scope_logs=sls),
                       kvs, text, st.lists(st.builds(lambda s, url, rs: ScopeLogs(scope=s, schema_url=url, log_records=rs),
                                                     scope, text, st.lists(log_record, max_size=4)), max_size=2)), max_size=2))


def _points(req: ExportMetricsServiceRequest) -> int:
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                n += len(getattr(m, which).data_points) if which else 0
    return n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics_request)
def test_random_metrics_never_raise(req):
    # round-trip through the wire form, as the receiver sees it
    req = ExportMetricsServiceRequest.FromString(req.SerializeToString())
    tables, rej = encode_metrics(req)
    assert sum(len(r) for r in tables.values()) + rej.count == _points(req)
    assert len(rej.reasons) <= 3
    for rows in tables.values():
        assert rows.arrow().num_rows == len(rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs_request)
def test_random_logs_never_raise(req):
    req = ExportLogsServiceRequest.FromString(req.SerializeToString())
    rows, rej = encode_logs(req)
    total = sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
    assert len(rows) + rej.count == total
    assert rows.arrow().num_rows == len(rows)
    assert all(len(t) in (0, 32) for t in rows.columns["TraceId"])
    assert all(0 <= f <= 255 for f in rows.columns["TraceFlags"])


# -- into ClickHouse and back --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Encode SDK and hand-built requests, insert them into a fresh chdb store in a child process."""
    work = tmp_path_factory.mktemp("otel_store")
    mreq, trace_id, span_id = sdk_metrics_request()
    extra = metrics_req(summary("rpc_seconds", (0.0, 0.1), (0.5, 0.2), (1.0, 0.9)),
                        gauge("ex", number(4.0, exemplars=[mpb.Exemplar(time_unix_nano=T0, as_int=5, trace_id=TRACE,
                                                                      span_id=SPAN, filtered_attributes=[kv("u", 1)])])),
                        gauge("bad", number(None)))
    mreq.MergeFrom(extra)
    lreq, ltrace, lspan, lflags = sdk_logs_request()
    lreq.MergeFrom(logs_req(LogRecord(observed_time_unix_nano=T0, severity_number=5, severity_text="DEBUG",
                                      body=AnyValue(string_value="by hand"), trace_id=TRACE, span_id=SPAN, flags=1)))
    (work / "metrics.pb").write_bytes(mreq.SerializeToString())
    (work / "logs.pb").write_bytes(lreq.SerializeToString())
    proc = subprocess.run([sys.executable, str(PROBE), str(work)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), trace_id, ltrace, lspan, lflags


def test_rows_read_back_from_clickhouse(stored):
    result, trace_id, ltrace, lspan, lflags = stored
    assert result["rejected"] == {"metrics": 1, "logs": 0}
    assert {t: len(rows) for t, rows in result["rows"].items()} == result["inserted"] == {
        "otel_metrics_gauge": 3, "otel_metrics_sum": 2, "otel_metrics_histogram": 1,
        "otel_metrics_exp_histogram": 1, "otel_metrics_summary": 1, "otel_logs": 4,
    }
    sums = {r["MetricName"]: r for r in result["rows"]["otel_metrics_sum"]}
    req_row = sums["requests"]
    assert req_row["Attributes"] == {"code": "200", "ok": "true", "ratio": "0.5", "route": "/pay"}
    assert (req_row["IsMonotonic"], sums["inflight"]["IsMonotonic"], req_row["AggregationTemporality"]) == (True, False, 2)
    assert req_row["Exemplars.TraceId"] == [trace_id] and req_row["ServiceName"] == "checkout"

    gauges = {r["MetricName"]: r for r in result["rows"]["otel_metrics_gauge"]}
    ex = gauges["ex"]
    assert ex["TimeUnix"] == "2023-11-14 22:13:20.123456789"  # nanoseconds survive
    assert (ex["Exemplars.TimeUnix"], ex["Exemplars.Value"]) == (["2023-11-14 22:13:20.123456789"], [5])
    assert (ex["Exemplars.TraceId"], ex["Exemplars.SpanId"]) == ([TRACE.hex()], [SPAN.hex()])
    assert ex["Exemplars.FilteredAttributes"] == [{"u": "1"}]
    assert (ex["ScopeDroppedAttrCount"], ex["ResourceSchemaUrl"]) == (4, "https://opentelemetry.io/schemas/1.26.0")

    (summ,) = result["rows"]["otel_metrics_summary"]
    assert (summ["ValueAtQuantiles.Quantile"], summ["ValueAtQuantiles.Value"]) == ([0, 0.5, 1], [0.1, 0.2, 0.9])
    (hist,) = result["rows"]["otel_metrics_histogram"]
    assert sum(hist["BucketCounts"]) == hist["Count"] == 1 and hist["Sum"] == 12.5
    (exp,) = result["rows"]["otel_metrics_exp_histogram"]
    assert exp["Count"] == 1 and sum(exp["PositiveBucketCounts"]) == 1

    logs = {r["Body"]: r for r in result["rows"]["otel_logs"]}
    warn = logs["payment declined for order-7"]
    assert (warn["TraceId"], warn["SpanId"], warn["TraceFlags"], warn["SeverityNumber"]) == (ltrace, lspan, lflags, 13)
    by_hand = logs["by hand"]
    assert by_hand["Timestamp"] == "2023-11-14 22:13:20.123456789"
    assert by_hand["TimestampTime"] == "2023-11-14 22:13:20"  # filled by its DEFAULT
    assert (by_hand["ServiceName"], by_hand["ScopeName"], by_hand["ScopeAttributes"]) == ("svc", "logger", {"a": "true"})
