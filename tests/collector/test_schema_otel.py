"""The metrics and logs tables as ClickHouse itself reports them, against REFERENCE.md (the
OpenTelemetry Collector ClickHouse exporter's schema, what Grafana's plugin reads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from tracemesh.collector._schema import LOG_COLUMNS, METRIC_COLUMNS, SchemaOptions, log_tables, metric_tables

PROBE = Path(__file__).with_name("otel_chdb_probe.py")
MAP = "Map(LowCardinality(String), String)"
LC = "LowCardinality(String)"
DT = "DateTime64(9)"

COMMON = [
    ("ResourceAttributes", MAP), ("ResourceSchemaUrl", "String"), ("ScopeName", "String"), ("ScopeVersion", "String"),
    ("ScopeAttributes", MAP), ("ScopeDroppedAttrCount", "UInt32"), ("ScopeSchemaUrl", "String"), ("ServiceName", LC),
    ("MetricName", "String"), ("MetricDescription", "String"), ("MetricUnit", "String"), ("Attributes", MAP),
    ("StartTimeUnix", DT), ("TimeUnix", DT),
]
EXEMPLARS = [
    ("Exemplars.FilteredAttributes", f"Array({MAP})"), ("Exemplars.TimeUnix", f"Array({DT})"),
    ("Exemplars.Value", "Array(Float64)"), ("Exemplars.SpanId", "Array(String)"), ("Exemplars.TraceId", "Array(String)"),
]
TAIL = [("Flags", "UInt32"), ("Min", "Float64"), ("Max", "Float64"), ("AggregationTemporality", "Int32")]

#: ``system.columns`` (name, type) per table, in table order.
EXPECTED = {
    "otel_metrics_gauge": COMMON + [("Value", "Float64"), ("Flags", "UInt32")] + EXEMPLARS,
    "otel_metrics_sum": COMMON + [("Value", "Float64"), ("Flags", "UInt32")] + EXEMPLARS
    + [("AggregationTemporality", "Int32"), ("IsMonotonic", "Bool")],
    "otel_metrics_histogram": COMMON + [("Count", "UInt64"), ("Sum", "Float64"), ("BucketCounts", "Array(UInt64)"),
                                        ("ExplicitBounds", "Array(Float64)")] + EXEMPLARS + TAIL,
    "otel_metrics_exp_histogram": COMMON + [
        ("Count", "UInt64"), ("Sum", "Float64"), ("Scale", "Int32"), ("ZeroCount", "UInt64"), ("PositiveOffset", "Int32"),
        ("PositiveBucketCounts", "Array(UInt64)"), ("NegativeOffset", "Int32"), ("NegativeBucketCounts", "Array(UInt64)"),
    ] + EXEMPLARS + TAIL,
    "otel_metrics_summary": COMMON + [("Count", "UInt64"), ("Sum", "Float64"), ("ValueAtQuantiles.Quantile", "Array(Float64)"),
                                      ("ValueAtQuantiles.Value", "Array(Float64)"), ("Flags", "UInt32")],
    "otel_logs": [
        ("Timestamp", DT), ("TimestampTime", "DateTime"), ("TraceId", "String"), ("SpanId", "String"),
        ("TraceFlags", "UInt8"), ("SeverityText", LC), ("SeverityNumber", "UInt8"), ("ServiceName", LC), ("Body", "String"),
        ("ResourceSchemaUrl", LC), ("ResourceAttributes", MAP), ("ScopeSchemaUrl", LC), ("ScopeName", "String"),
        ("ScopeVersion", LC), ("ScopeAttributes", MAP), ("LogAttributes", MAP),
    ],
}
METRIC_INDEXES = [
    ["idx_attr_key", "bloom_filter(0.01)", "mapKeys(Attributes)", 1],
    ["idx_attr_value", "bloom_filter(0.01)", "mapValues(Attributes)", 1],
    ["idx_res_attr_key", "bloom_filter(0.01)", "mapKeys(ResourceAttributes)", 1],
    ["idx_res_attr_value", "bloom_filter(0.01)", "mapValues(ResourceAttributes)", 1],
    ["idx_scope_attr_key", "bloom_filter(0.01)", "mapKeys(ScopeAttributes)", 1],
    ["idx_scope_attr_value", "bloom_filter(0.01)", "mapValues(ScopeAttributes)", 1],
]
LOG_INDEXES = [
    ["idx_body", "tokenbf_v1(32768, 3, 0)", "Body", 8],
    ["idx_body_ngrambf", "ngrambf_v1(4, 32768, 3, 0)", "Body", 1],
    ["idx_log_attr_key", "bloom_filter(0.01)", "mapKeys(LogAttributes)", 1],
    ["idx_log_attr_value", "bloom_filter(0.01)", "mapValues(LogAttributes)", 1],
    ["idx_res_attr_key", "bloom_filter(0.01)", "mapKeys(ResourceAttributes)", 1],
    ["idx_res_attr_value", "bloom_filter(0.01)", "mapValues(ResourceAttributes)", 1],
    ["idx_scope_attr_key", "bloom_filter(0.01)", "mapKeys(ScopeAttributes)", 1],
    ["idx_scope_attr_value", "bloom_filter(0.01)", "mapValues(ScopeAttributes)", 1],
    ["idx_trace_id", "bloom_filter(0.001)", "TraceId", 1],
]


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    """The tables created (twice, and a TTL variant) in a fresh chdb store in a child process."""
    work = tmp_path_factory.mktemp("otel_schema")
    (work / "metrics.pb").write_bytes(ExportMetricsServiceRequest().SerializeToString())
    (work / "logs.pb").write_bytes(ExportLogsServiceRequest().SerializeToString())
    proc = subprocess.run([sys.executable, str(PROBE), str(work)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_ddl_is_idempotent_and_names_its_tables():
    ddl = metric_tables() + log_tables()
    assert [d.split("(")[0].split()[-1] for d in ddl] == list(EXPECTED)
    assert all(d.startswith("CREATE TABLE IF NOT EXISTS ") for d in ddl)
    assert not any("TTL" in d for d in ddl)
    ttl = metric_tables(SchemaOptions(ttl_days=3)) + log_tables(SchemaOptions(ttl_days=3))
    assert all("TTL toDateTime(TimeUnix) + toIntervalDay(3)" in d for d in ttl[:5])
    assert "TTL TimestampTime + toIntervalDay(3)" in ttl[5]
    assert "ENGINE = ReplicatedMergeTree()" in metric_tables(SchemaOptions(engine="ReplicatedMergeTree()"))[0]


@pytest.mark.parametrize("table", list(EXPECTED))
def test_columns_as_clickhouse_reports_them(created, table):
    assert [(c[0], c[1]) for c in created["columns"][table]] == EXPECTED[table]


def test_inserted_columns_are_the_table_minus_defaults(created):
    for table, cols in {**METRIC_COLUMNS, "otel_logs": LOG_COLUMNS}.items():
        assert tuple(c[0] for c in created["columns"][table] if c[2] == "") == cols
    ts_time = next(c for c in created["columns"]["otel_logs"] if c[0] == "TimestampTime")
    assert ts_time[2:4] == ["DEFAULT", "toDateTime(Timestamp)"]


def test_codecs(created):
    codecs = {t: {c[0]: c[4] for c in cols} for t, cols in created["columns"].items()}
    for table in METRIC_COLUMNS:
        assert codecs[table]["TimeUnix"] == "CODEC(Delta(8), ZSTD(1))"  # Delta's width follows the type
        assert codecs[table]["ResourceAttributes"] == "CODEC(ZSTD(1))"
    assert codecs["otel_metrics_sum"]["IsMonotonic"] == "CODEC(Delta(1), ZSTD(1))"
    assert codecs["otel_metrics_histogram"]["Count"] == "CODEC(Delta(8), ZSTD(1))"
    assert codecs["otel_logs"]["Timestamp"] == "CODEC(Delta(8), ZSTD(1))"
    assert codecs["otel_logs"]["TraceFlags"] == codecs["otel_logs"]["SeverityNumber"] == ""


def test_keys_partitions_and_settings(created):
    for table in METRIC_COLUMNS:
        t = created["tables"][table]
        assert t["partition_key"] == "toDate(TimeUnix)"
        assert t["sorting_key"] == "ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix)"
        assert "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1" in t["engine_full"]
    logs = created["tables"]["otel_logs"]
    assert logs["partition_key"] == "toDate(TimestampTime)"
    assert logs["sorting_key"] == "ServiceName, TimestampTime, Timestamp"
    assert logs["primary_key"] == "ServiceName, TimestampTime"
    assert "SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1" in logs["engine_full"]


def test_indexes(created):
    for table in METRIC_COLUMNS:
        assert created["indexes"][table] == METRIC_INDEXES
    assert created["indexes"]["otel_logs"] == LOG_INDEXES


def test_ttl_variant(created):
    assert set(created["ttl"]) == set(EXPECTED)
    for table in METRIC_COLUMNS:
        assert "TTL toDateTime(TimeUnix) + toIntervalDay(7)" in created["ttl"][table]
    assert "TTL TimestampTime + toIntervalDay(7)" in created["ttl"]["otel_logs"]
