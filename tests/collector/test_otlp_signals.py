"""Traces, metrics and logs through both receivers, sent by the OpenTelemetry SDK's own exporters
(gRPC and HTTP), plus OTLP/HTTP's edges: JSON, gzip, content types, limits, partial success."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from google.rpc import status_pb2

from conftest import Collector


@pytest.fixture(scope="module")
def col(tmp_path_factory, tracemesh_cmd):
    base = tmp_path_factory.mktemp("signals")
    c = Collector(tracemesh_cmd, base / "store", base / "collector.log", otlp_http=True).start()
    yield c
    c.stop()


def _resource(name):
    return Resource.create({"service.name": name, "service.version": "9"})


def _metrics_via(exporter, service):
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=_resource(service), metric_readers=[reader])
    meter = provider.get_meter("signals.test", "1.2")
    meter.create_counter("requests", unit="1", description="served").add(5, {"route": "/a"})
    meter.create_histogram("latency", unit="ms").record(12.5, {"route": "/a"})
    meter.create_up_down_counter("inflight").add(-2)
    data = reader.get_metrics_data()
    assert exporter.export(data) == MetricExportResult.SUCCESS
    provider.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_metrics_land_in_the_exporter_tables(col, transport):
    service = f"metrics-{transport}"
    exporter = (GrpcMetricExporter(endpoint=col.grpc_addr, insecure=True) if transport == "grpc"
                else HttpMetricExporter(endpoint=f"{col.http_url}/v1/metrics"))
    _metrics_via(exporter, service)
    sums = col.wait_rows(f"SELECT MetricName, Value, IsMonotonic, Attributes['route'] AS route, ScopeName, ScopeVersion "
                         f"FROM otel_metrics_sum WHERE ServiceName = '{service}' ORDER BY MetricName", 2)
    assert [(r["MetricName"], r["Value"], r["IsMonotonic"]) for r in sums] == [("inflight", -2, False), ("requests", 5, True)]
    assert sums[1]["route"] == "/a" and sums[1]["ScopeName"] == "signals.test" and sums[1]["ScopeVersion"] == "1.2"
    hist = col.wait_rows(f"SELECT Count, Sum, Min, Max, length(BucketCounts) = length(ExplicitBounds) + 1 AS shape "
                         f"FROM otel_metrics_histogram WHERE ServiceName = '{service}'", 1)
    assert [{**h, "Count": int(h["Count"])} for h in hist] == [{"Count": 1, "Sum": 12.5, "Min": 12.5, "Max": 12.5, "shape": 1}]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_logs_land_in_otel_logs_with_their_trace(col, transport):
    service = f"logs-{transport}"
    exporter = (GrpcLogExporter(endpoint=col.grpc_addr, insecure=True) if transport == "grpc"
                else HttpLogExporter(endpoint=f"{col.http_url}/v1/logs"))
    provider = LoggerProvider(resource=_resource(service))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    # the Logs API as the SDK's logging bridges call it (the SDK's own LoggingHandler is deprecated);
    # the record takes the current span's context
    logger = provider.get_logger(f"signals.{transport}")
    tracer = TracerProvider(resource=_resource(service)).get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        logger.emit(LogRecord(body="disk /var is 93% full", severity_text="WARN", severity_number=SeverityNumber.WARN))
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()
    rows = col.wait_rows(f"SELECT Body, SeverityText, SeverityNumber, TraceId, TimestampTime > 0 AS t "
                         f"FROM otel_logs WHERE ServiceName = '{service}'", 1)
    assert rows == [{"Body": "disk /var is 93% full", "SeverityText": "WARN", "SeverityNumber": 13,
                     "TraceId": trace_id, "t": 1}]


def test_sdk_http_span_exporter(col):
    provider = TracerProvider(resource=_resource("http-traces"))
    provider.add_span_processor(SimpleSpanProcessor(HttpSpanExporter(endpoint=f"{col.http_url}/v1/traces")))
    with provider.get_tracer("t").start_as_current_span("hello", attributes={"n": 3}):
        pass
    provider.shutdown()
    rows = col.wait_rows("SELECT SpanName, SpanAttributes['n'] AS n FROM otel_traces WHERE ServiceName = 'http-traces'", 1)
    assert rows == [{"SpanName": "hello", "n": "3"}]


def _json_traces(trace_id="5b8efff798038103d269b633813fc60c", span_id="eee19b7ec3c1b174"):
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
        "scopeSpans": [{"scope": {"name": "j"}, "spans": [
            {"traceId": trace_id, "spanId": span_id, "name": "json-span", "kind": 2,
             "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": 1544712661000000000,
             "attributes": [{"key": "flag", "value": {"boolValue": True}},
                            {"key": "big", "value": {"intValue": "9007199254740993"}}],
             "unknownFutureField": {"x": 1}},
            {"traceId": "00ff", "spanId": span_id, "name": "bad-id"},
        ]}],
    }]}


def test_otlp_json_with_hex_ids_partial_success_and_gzip(col):
    body = json.dumps(_json_traces()).encode()
    for headers, content in (({"content-type": "application/json"}, body),
                             ({"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(body))):
        r = httpx.post(f"{col.http_url}/v1/traces", content=content, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        partial = r.json()["partialSuccess"]
        assert partial["rejectedSpans"] == "1" and "trace_id must be 16 bytes" in partial["errorMessage"]
    rows = col.wait_rows("SELECT TraceId, SpanId, SpanAttributes AS a, toUnixTimestamp64Nano(Timestamp) AS ts, Duration "
                         "FROM otel_traces WHERE SpanName = 'json-span'", 2)
    assert len(rows) == 2  # the same export twice: two acknowledged exports, both stored
    r = rows[0]
    assert (r["TraceId"], r["SpanId"]) == ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")
    assert r["a"] == {"flag": "true", "big": "9007199254740993"}
    assert (int(r["ts"]), int(r["Duration"])) == (1544712660000000000, 1_000_000_000)


def test_protobuf_answer_and_errors_are_google_rpc_status(col, otlp):
    r = httpx.post(f"{col.http_url}/v1/traces", content=b"\xff\xff\xff", headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/x-protobuf"
    assert "malformed" in status_pb2.Status.FromString(r.content).message
    req = otlp.request(otlp.span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8))
    r = httpx.post(f"{col.http_url}/v1/traces", content=req.SerializeToString(), headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 200
    assert ExportTraceServiceResponse.FromString(r.content) == ExportTraceServiceResponse()


@pytest.mark.parametrize("headers,content,status,words", [
    ({"content-type": "text/plain"}, b"hi", 415, "unsupported content type"),
    ({"content-type": "application/json", "content-encoding": "br"}, b"{}", 415, "content encoding"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, b"not gzip", 400, "gzip"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(b"{}")[:-4], 400, "gzip"),
    ({"content-type": "application/json"}, b"[1, 2]", 400, "JSON object"),
    ({"content-type": "application/json"}, b"{" * 100_000, 400, "JSON"),
    ({"content-type": "application/json"}, json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}).encode(),
     400, "not hex"),
])
def test_bad_http_exports_get_a_clear_error_and_the_receiver_goes_on(col, headers, content, status, words):
    r = httpx.post(f"{col.http_url}/v1/traces", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.text
    assert httpx.post(f"{col.http_url}/v1/traces", content=b"{}", headers={"content-type": "application/json"}).status_code == 200


def test_a_gzip_bomb_is_cut_off_at_the_limit(col):
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB inflated, ~64 KB sent
    assert len(bomb) < 200_000
    t = time.monotonic()
    r = httpx.post(f"{col.http_url}/v1/logs", content=bomb,
                   headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"}, timeout=30)
    assert r.status_code == 413 and "limit" in status_pb2.Status.FromString(r.content).message
    assert time.monotonic() - t < 10
    assert col.stats()["pipeline"]["exports_refused"] >= 0  # still answering


def test_unknown_paths_and_methods(col):
    assert httpx.post(f"{col.http_url}/v1/profiles", content=b"", headers={"content-type": "application/x-protobuf"}).status_code == 404
    assert httpx.get(f"{col.http_url}/v1/traces").status_code == 405


def test_metrics_endpoint_and_status_command(col, run_tracemesh):
    # a stored span of its own, so that the test also passes when it runs alone
    provider = TracerProvider(resource=_resource("metrics-endpoint"))
    provider.add_span_processor(SimpleSpanProcessor(HttpSpanExporter(endpoint=f"{col.http_url}/v1/traces")))
    with provider.get_tracer("t").start_as_current_span("counted"):
        pass
    provider.shutdown()
    col.wait_rows("SELECT 1 FROM otel_traces WHERE ServiceName = 'metrics-endpoint'", 1)
    text = httpx.get(f"{col.api_url}/metrics").text
    for name in ("tracemesh_collector_exports_total", "tracemesh_collector_rows_received_total",
                 "tracemesh_collector_wal_bytes", 'tracemesh_collector_rows_stored_total{table="otel_traces"}',
                 "tracemesh_collector_storage_up 1", "tracemesh_collector_records_read_back_total"):
        assert name in text, name
    r = run_tracemesh("collector", "status", "--api", col.api_url)
    assert r.returncode == 0, r.stderr
    assert "storage     up" in r.stdout and "otel_traces" in r.stdout and "read back from it" in r.stdout
