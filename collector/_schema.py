"""The tables we write: those of the OpenTelemetry Collector's ClickHouse exporter, column for column.

Grafana's ClickHouse data source in OTel mode reads these names and types as they are, so any
change here must keep them. Mesh-specific data goes into attributes prefixed ``mesh.``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRACES_TABLE = "otel_traces"

#: Columns we insert into ``otel_traces``, in table order (the ALIAS columns are computed).
TRACE_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode",
    "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId",
    "Links.TraceState", "Links.Attributes",
)


@dataclass(frozen=True)
class SchemaOptions:
    #: Days to keep data; 0 keeps it forever (the exporter's default).
    ttl_days: int = 0
    engine: str = "MergeTree()"

    def ttl(self, column_expr: str) -> str:
        return f"TTL {column_expr} + toIntervalDay({self.ttl_days})" if self.ttl_days > 0 else ""


def trace_tables(opts: SchemaOptions = SchemaOptions()) -> list[str]:
    """DDL for ``otel_traces``, ``otel_traces_trace_id_ts`` and its materialized view, idempotent."""
    return [
        f"""CREATE TABLE IF NOT EXISTS otel_traces (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    ResourceAttributeItems Array(String) ALIAS arrayMap((k, v) -> concat(k, '=', v), mapKeys(ResourceAttributes), mapValues(ResourceAttributes)),
    SpanAttributeItems Array(String) ALIAS arrayMap((k, v) -> concat(k, '=', v), mapKeys(SpanAttributes), mapValues(SpanAttributes)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1,
    INDEX idx_lower_span_name lower(SpanName) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1
) ENGINE = {opts.engine}
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
{opts.ttl('toDateTime(Timestamp)')}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
        f"""CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta(4), ZSTD(1)),
    End DateTime CODEC(Delta(4), ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = {opts.engine}
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
{opts.ttl('Start')}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv TO otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM otel_traces
WHERE TraceId != ''
GROUP BY TraceId""",
    ]


# -- metrics and logs -------------------------------------------------------------------------
# As the exporter's internal/sqltemplates/metrics_*_table.sql and logs_table.sql where REFERENCE.md
# pins them: metric times DateTime64(9); otel_logs with TimestampTime and both the token and the
# ngram Body index (added upstream in Oct 2025). Exporter versions differ here (some templates use
# DateTime metric times, the newest drop TimestampTime); Grafana's plugin reads either.

METRICS_GAUGE_TABLE = "otel_metrics_gauge"
METRICS_SUM_TABLE = "otel_metrics_sum"
METRICS_HISTOGRAM_TABLE = "otel_metrics_histogram"
METRICS_EXP_HISTOGRAM_TABLE = "otel_metrics_exp_histogram"
METRICS_SUMMARY_TABLE = "otel_metrics_summary"
LOGS_TABLE = "otel_logs"

_METRIC_COMMON_COLUMNS = (
    "ResourceAttributes", "ResourceSchemaUrl", "ScopeName", "ScopeVersion", "ScopeAttributes",
    "ScopeDroppedAttrCount", "ScopeSchemaUrl", "ServiceName", "MetricName", "MetricDescription", "MetricUnit",
    "Attributes", "StartTimeUnix", "TimeUnix",
)
_EXEMPLAR_COLUMNS = (
    "Exemplars.FilteredAttributes", "Exemplars.TimeUnix", "Exemplars.Value", "Exemplars.SpanId", "Exemplars.TraceId",
)

#: Columns we insert into each metrics table, in table order.
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    METRICS_GAUGE_TABLE: _METRIC_COMMON_COLUMNS + ("Value", "Flags") + _EXEMPLAR_COLUMNS,
    METRICS_SUM_TABLE: _METRIC_COMMON_COLUMNS + ("Value", "Flags") + _EXEMPLAR_COLUMNS
    + ("AggregationTemporality", "IsMonotonic"),
    METRICS_HISTOGRAM_TABLE: _METRIC_COMMON_COLUMNS + ("Count", "Sum", "BucketCounts", "ExplicitBounds")
    + _EXEMPLAR_COLUMNS + ("Flags", "Min", "Max", "AggregationTemporality"),
    METRICS_EXP_HISTOGRAM_TABLE: _METRIC_COMMON_COLUMNS
    + ("Count", "Sum", "Scale", "ZeroCount", "PositiveOffset", "PositiveBucketCounts", "NegativeOffset",
       "NegativeBucketCounts") + _EXEMPLAR_COLUMNS + ("Flags", "Min", "Max", "AggregationTemporality"),
    METRICS_SUMMARY_TABLE: _METRIC_COMMON_COLUMNS
    + ("Count", "Sum", "ValueAtQuantiles.Quantile", "ValueAtQuantiles.Value", "Flags"),
}

#: Columns we insert into ``otel_logs``, in table order; ``TimestampTime`` is left to its DEFAULT.
LOG_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "TraceFlags", "SeverityText", "SeverityNumber", "ServiceName", "Body",
    "ResourceSchemaUrl", "ResourceAttributes", "ScopeSchemaUrl", "ScopeName", "ScopeVersion", "ScopeAttributes",
    "LogAttributes",
)

_METRIC_HEAD = """    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ResourceSchemaUrl String CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeDroppedAttrCount UInt32 CODEC(ZSTD(1)),
    ScopeSchemaUrl String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    MetricName String CODEC(ZSTD(1)),
    MetricDescription String CODEC(ZSTD(1)),
    MetricUnit String CODEC(ZSTD(1)),
    Attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    StartTimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
    TimeUnix DateTime64(9) CODEC(Delta, ZSTD(1)),
"""

_METRIC_EXEMPLARS = """    Exemplars Nested (
        FilteredAttributes Map(LowCardinality(String), String),
        TimeUnix DateTime64(9),
        Value Float64,
        SpanId String,
        TraceId String
    ) CODEC(ZSTD(1)),
"""

_METRIC_INDEXES = """    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1"""

_METRIC_BODIES = {
    METRICS_GAUGE_TABLE: """    Value Float64 CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
""" + _METRIC_EXEMPLARS,
    METRICS_SUM_TABLE: """    Value Float64 CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
""" + _METRIC_EXEMPLARS + """    AggregationTemporality Int32 CODEC(ZSTD(1)),
    IsMonotonic Boolean CODEC(Delta, ZSTD(1)),
""",
    METRICS_HISTOGRAM_TABLE: """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    BucketCounts Array(UInt64) CODEC(ZSTD(1)),
    ExplicitBounds Array(Float64) CODEC(ZSTD(1)),
""" + _METRIC_EXEMPLARS + """    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
""",
    METRICS_EXP_HISTOGRAM_TABLE: """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    Scale Int32 CODEC(ZSTD(1)),
    ZeroCount UInt64 CODEC(ZSTD(1)),
    PositiveOffset Int32 CODEC(ZSTD(1)),
    PositiveBucketCounts Array(UInt64) CODEC(ZSTD(1)),
    NegativeOffset Int32 CODEC(ZSTD(1)),
    NegativeBucketCounts Array(UInt64) CODEC(ZSTD(1)),
""" + _METRIC_EXEMPLARS + """    Flags UInt32 CODEC(ZSTD(1)),
    Min Float64 CODEC(ZSTD(1)),
    Max Float64 CODEC(ZSTD(1)),
    AggregationTemporality Int32 CODEC(ZSTD(1)),
""",
    METRICS_SUMMARY_TABLE: """    Count UInt64 CODEC(Delta, ZSTD(1)),
    Sum Float64 CODEC(ZSTD(1)),
    ValueAtQuantiles Nested (
        Quantile Float64,
        Value Float64
    ) CODEC(ZSTD(1)),
    Flags UInt32 CODEC(ZSTD(1)),
""",
}


def metric_tables(opts: SchemaOptions = SchemaOptions()) -> list[str]:
    """DDL for the five ``otel_metrics_*`` tables, idempotent."""
    # The exporter puts its TTL between ENGINE and PARTITION BY here; ClickHouse takes either order.
    return [
        f"""CREATE TABLE IF NOT EXISTS {table} (
{_METRIC_HEAD}{body}{_METRIC_INDEXES}
) ENGINE = {opts.engine}
{opts.ttl('toDateTime(TimeUnix)')}
PARTITION BY toDate(TimeUnix)
ORDER BY (ServiceName, MetricName, Attributes, toUnixTimestamp64Nano(TimeUnix))
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1"""
        for table, body in _METRIC_BODIES.items()
    ]


def log_tables(opts: SchemaOptions = SchemaOptions()) -> list[str]:
    """DDL for ``otel_logs``, idempotent."""
    return [
        f"""CREATE TABLE IF NOT EXISTS otel_logs (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TimestampTime DateTime DEFAULT toDateTime(Timestamp),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    TraceFlags UInt8,
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    SeverityNumber UInt8,
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1)),
    ResourceSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion LowCardinality(String) CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    LogAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8,
    INDEX idx_body_ngrambf Body TYPE ngrambf_v1(4, 32768, 3, 0) GRANULARITY 1
) ENGINE = {opts.engine}
PARTITION BY toDate(TimestampTime)
PRIMARY KEY (ServiceName, TimestampTime)
ORDER BY (ServiceName, TimestampTime, Timestamp)
{opts.ttl('TimestampTime')}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
    ]


#: The insert setting that leaves the indexes named below to merges (ClickHouse 25.x and newer).
DEFER_INDEXES_SETTING = "exclude_materialize_skip_indexes_on_insert"
_INDEX_ON_MAP = re.compile(r"^\s*INDEX (\w+) map(?:Keys|Values)\(", re.MULTILINE)
_TABLE_NAME = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")


def _deferred_indexes() -> dict[str, str]:
    out = {}
    for ddl in (*trace_tables(), *metric_tables(), *log_tables()):
        table = _TABLE_NAME.search(ddl)
        names = _INDEX_ON_MAP.findall(ddl)
        if table and names:
            out[table.group(1)] = ", ".join(names)
    return out


#: Per table, the skip indexes an insert does not build: the bloom filters over the keys and values
#: of attribute maps. ClickHouse builds every skip index again for each part a merge writes, so what
#: an insert built for these was thrown away at its part's first merge; and they were the insert's
#: largest cost: inserting benchmarks/collector.py's spans into otel_traces took 4.41-4.43 µs a row
#: with them and 2.90-2.94 without (chdb 26.9, background merges stopped, 800k rows, 2 runs each;
#: all skip indexes off: 2.70-2.88). Until a part's first merge, a filter on an attribute reads its
#: granules instead of skipping them; answers are the same. The other indexes (trace id, duration,
#: span name, log body) are built on insert: cheap, or what recent data is searched by.
DEFERRED_INDEXES: dict[str, str] = _deferred_indexes()


def insert_settings(table: str, token: str = "", *, defer: bool = True) -> dict[str, str]:
    """The settings of an insert into *table*: its deduplication token (when given) and the indexes
    left to merges (unless *defer* is false: a server too old to know the setting)."""
    settings = {}
    if token:
        settings["insert_deduplication_token"] = token
    if defer and table in DEFERRED_INDEXES:
        settings[DEFER_INDEXES_SETTING] = DEFERRED_INDEXES[table]
    return settings
