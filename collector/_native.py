"""Native trace ingest (embedded store only): trace exports go from their protobuf bytes to stored rows
without a Python object per span.

With the C extension (``_otlpc``, collector/_otlpc.c, built at install when a compiler is there):
the receiver checks each request on its bytes (``_otlpc.check``: the same refusals and messages as
:func:`_span_problem`, ~0.33 µs a span against ~2.6-3 µs for upb and Python; measured on
benchmarks/collector.py's spans), and the writer turns a whole batch into one ClickHouse ``Native``
block (``_otlpc.encode``, ~0.9 µs a span, as the payloads were checked on arrival; ~1.05 µs when it
validates them again) that chdb inserts into ``otel_traces`` as it is: no planning, no SQL
rendering, whatever the batch size. The block's LowCardinality columns (span names, kinds, service
names, status codes, event names, every attribute map's keys) arrive dictionary-encoded, as
ClickHouse's own Native output has them, so ClickHouse does not hash every value into a dictionary
again (a fifth to a third of its insert; see _otlpc.c).

Without it, the earlier path: Python parses the request with upb and checks its ids; for batches of
:data:`NATIVE_MIN_SPANS` or more, the write-ahead log's payloads are handed to ClickHouse as they
are, in its ``Protobuf`` input format with a schema generated from the OTLP descriptors, and one
``INSERT ... SELECT`` flattens, renders and stores them (measured here: ~15 µs a span for all of
it, against ~45 µs for the Python encoder plus the same insert). Values the SQL does not render
(arrays or maps nested in arrays or maps, doubles inside arrays or maps, JSON strings with rare
control characters, duplicate attribute keys, unknown value kinds) are not guessed at: such a span
is routed, inside the same insert, to ``tracemesh_deep_spans`` instead of ``otel_traces`` (a Null
staging table with two materialized views), and the Python encoder stores just those spans
afterwards with the same batch's token. The schema for ClickHouse is written next to the log
(``otlp_trace.proto``).

Either way the rows must be exactly those the Python encoder (:func:`encode_traces`) produces; the
test suite checks every path against it on random requests. Exactly-once holds as for the Python
path: each insert carries the batch token (the staging insert's views deduplicate by it too).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor as _F
from google.protobuf.internal.encoder import _VarintBytes
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracemesh.collector._encode import Rejections, SpanColumns, _span_problem, encode_traces
from tracemesh.collector._schema import DEFER_INDEXES_SETTING, DEFERRED_INDEXES, TRACES_TABLE

log = logging.getLogger(__name__)

try:  # the C extension; optional (an install without a compiler falls back to the path below)
    from tracemesh.collector import _otlpc
except ImportError:  # pragma: no cover - exercised by installs without a compiler
    _otlpc = None
if os.environ.get("TRACEMESH_NO_OTLPC"):  # as if it were not built (to compare the two paths)
    _otlpc = None

STAGING = "tracemesh_otlp_staging"
#: Below this many spans a batch goes through the Python encoder. Measured here: planning the
#: native INSERT costs ~260 ms of CPU whatever the batch size, then ~15 us a span; the Python
#: encoder ~15 ms, then ~45 us a span. They cross near 8,000 spans; a quiet mesh's 0.2 s flushes
#: would otherwise keep a core busy planning.
NATIVE_MIN_SPANS = 8_000
DEEP = "tracemesh_deep_spans"
_MESSAGE = "opentelemetry_proto_collector_trace_v1_ExportTraceServiceRequest"


#: What a span takes as Python objects in the pipeline (see _pipeline.weight); a NativeTraces batch
#: weighs its protobuf bytes in such rows, so its inserts are ~3x larger and planning is amortised
#: (measured here: 25k-span inserts cost ~22 us a span of CPU, ~67k-span ones ~16 us).
PY_ROW_BYTES = 2400
#: Batches checked by the C extension weigh this many times less again: their insert has no fixed
#: cost to amortise, but the larger an insert the fewer parts ClickHouse merges afterwards (measured
#: here, inserting the same 480k spans into chdb as Native blocks, merges included: ~77k rows per
#: CPU-second in 25k-row inserts, ~120k in 75k-100k-row ones), so runs grow to the pipeline's
#: MAX_RUN_ROWS (a Native block is ~0.5 KB a span of benchmarks/collector.py's).
C_WEIGHT_FACTOR = 4
#: Requests ClickHouse parses per block: without a limit one block holds the whole batch (~7 KB of
#: memory a span); blocks are squashed again before the part is written, so it is still one part.
READ_BLOCK_REQUESTS = 8


class NativeTraces:
    """A batch of trace export requests kept as their protobuf bytes; ``len`` is the valid spans."""

    __slots__ = ("payloads", "rows", "row_bytes")

    def __init__(self, payloads: list[bytes], rows: int, row_bytes: int = PY_ROW_BYTES) -> None:
        #: row_bytes: payload bytes per unit of weight (see weight)
        self.payloads, self.rows, self.row_bytes = payloads, rows, row_bytes

    def __len__(self) -> int:
        return self.rows

    def extend(self, other: "NativeTraces") -> None:
        self.payloads = self.payloads + other.payloads
        self.rows += other.rows

    def spooled(self):
        """When the pipeline keeps this batch only in the log: rebuild it from the logged request
        without parsing and checking it again (its valid spans are counted already)."""
        if len(self.payloads) != 1:
            return None
        rows, row_bytes = self.rows, self.row_bytes
        return lambda payload: NativeTraces([payload], rows, row_bytes)

    @property
    def weight(self) -> int:
        return max(1, sum(map(len, self.payloads)) // self.row_bytes)


def validate_traces(req: ExportTraceServiceRequest, payload: bytes) -> tuple[dict, Rejections]:
    """The receiver's work for the native path: the same refusals as encode_traces, no encoding."""
    rej = Rejections()
    valid = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                problem = _span_problem(span)
                if problem:
                    rej.add(problem)
                else:
                    valid += 1
    return {"otel_traces": NativeTraces([payload], valid)}, rej


def check_traces(payload: bytes) -> tuple[dict, Rejections]:
    """validate_traces on the request's bytes, in C (raises ``_otlpc.DecodeError`` where upb would
    raise DecodeError)."""
    valid, rejected, reasons = _otlpc.check(payload)
    return {"otel_traces": NativeTraces([payload], valid, PY_ROW_BYTES * C_WEIGHT_FACTOR)}, Rejections(rejected, reasons)


# -- the schema ClickHouse reads the requests with -------------------------------------------

_SCALARS = {_F.TYPE_STRING: "string", _F.TYPE_BYTES: "bytes", _F.TYPE_BOOL: "bool", _F.TYPE_INT64: "int64",
            _F.TYPE_UINT64: "uint64", _F.TYPE_INT32: "int32", _F.TYPE_UINT32: "uint32", _F.TYPE_FIXED64: "fixed64",
            _F.TYPE_FIXED32: "fixed32", _F.TYPE_DOUBLE: "double", _F.TYPE_FLOAT: "float", _F.TYPE_ENUM: "int32",
            _F.TYPE_SFIXED64: "sfixed64", _F.TYPE_SFIXED32: "sfixed32", _F.TYPE_SINT64: "sint64", _F.TYPE_SINT32: "sint32"}


def proto_schema() -> str:
    """The OTLP trace messages as a .proto for ClickHouse, generated from the descriptors we parse
    with (so field numbers cannot drift). AnyValue nests one level deep; below that, arrays and maps
    are opaque bytes (such spans take the Python path)."""
    done: set[str] = set()
    out: list[str] = []

    def name(d) -> str:
        return d.full_name.replace(".", "_")

    def emit(d, depth1: bool = False) -> str:
        msg = name(d) + ("_1" if depth1 else "")
        if msg in done:
            return msg
        done.add(msg)
        lines, oneofs = [f"message {msg} {{"], {}
        for f in d.fields:
            if f.type == _F.TYPE_MESSAGE:
                if d.name == "AnyValue" and depth1:
                    typ = "bytes"  # a value nested below the first level: opaque
                else:
                    typ = emit(f.message_type, depth1 or d.name == "AnyValue")
            else:
                typ = _SCALARS[f.type]
            line = f"  {'repeated ' if f.is_repeated else ''}{typ} {f.name} = {f.number};"
            if f.containing_oneof is not None:
                oneofs.setdefault(f.containing_oneof.name, []).append(line)
            else:
                lines.append(line)
        for o, ls in oneofs.items():
            lines += [f"  oneof {o} {{", *("  " + x for x in ls), "  }"]
        out.append("\n".join(lines + ["}"]))
        return msg

    emit(ExportTraceServiceRequest.DESCRIPTOR)
    return 'syntax = "proto3";\n\n' + "\n\n".join(out) + "\n"


_KINDS = "Enum8('none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4, " \
         "'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7, 'string_value_strindex' = 8)"
_AV1 = (f"Tuple(string_value String, bool_value Bool, int_value Int64, double_value Float64, array_value String, "
        f"kvlist_value String, bytes_value String, string_value_strindex Int32, value {_KINDS})")
_AV0 = (f"Tuple(string_value String, bool_value Bool, int_value Int64, double_value Float64, "
        f"array_value Tuple(values Array({_AV1})), kvlist_value Tuple(values Array(Tuple(key String, value {_AV1}))), "
        f"bytes_value String, string_value_strindex Int32, value {_KINDS})")
_KV = f"Array(Tuple(key String, value {_AV0}))"
STRUCTURE = (
    f"resource_spans Array(Tuple(resource Tuple(attributes {_KV}), scope_spans Array(Tuple("
    f"scope Tuple(name String, version String), spans Array(Tuple(trace_id String, span_id String, "
    f"trace_state String, parent_span_id String, name String, kind Int32, start_time_unix_nano UInt64, "
    f"end_time_unix_nano UInt64, attributes {_KV}, events Array(Tuple(time_unix_nano UInt64, name String, "
    f"attributes {_KV})), links Array(Tuple(trace_id String, span_id String, trace_state String, "
    f"attributes {_KV})), status Tuple(message String, code Int32)))))))"
)

# SQL functions (macros, expanded where used). Each mirrors a Python function in _encode.py.
FUNCTIONS = {
    # format_double: Go's FormatFloat(x, 'f', -1, 64) from ClickHouse's shortest round-trip digits
    "tm_f64": r"""(x) -> multiIf(isNaN(x), 'NaN', isInfinite(x), if(x > 0, '+Inf', '-Inf'),
        position(toString(x), 'e') = 0, toString(x),
        tm_f64_exp(startsWith(toString(x), '-'),
                   replaceAll(splitByChar('e', ltrim(toString(x), '-'))[1], '.', ''),
                   if(position(splitByChar('e', toString(x))[1], '.') > 0,
                      position(ltrim(splitByChar('e', toString(x))[1], '-'), '.') - 1,
                      length(ltrim(splitByChar('e', toString(x))[1], '-')))
                   + toInt32(splitByChar('e', toString(x))[2])))""",
    "tm_f64_exp": r"""(neg, digits, point) -> concat(if(neg, '-', ''), multiIf(
        point <= 0, concat('0.', repeat('0', toUInt64(-point)), digits),
        point >= length(digits), concat(digits, repeat('0', toUInt64(point - length(digits)))),
        concat(substring(digits, 1, point), '.', substring(digits, point + 1))))""",
    # json.dumps(str, ensure_ascii=False) with Go's HTML escapes; other control characters go deep
    "tm_jstr": r"""(s) -> concat('"', replaceAll(replaceAll(replaceAll(replaceAll(replaceAll(replaceAll(replaceAll(
        replaceAll(replaceAll(replaceAll(replaceAll(replaceAll(s, '\\', '\\\\'), '"', '\\"'), '\n', '\\n'), '\r', '\\r'),
        '\t', '\\t'), '\b', '\\b'), '\f', '\\f'), '<', '\\u003c'), '>', '\\u003e'), '&', '\\u0026'),
        ' ', '\\u2028'), ' ', '\\u2029'), '"')""",
    "tm_ctrl": r"""(s) -> match(s, '[\\x00-\\x07\\x0B\\x0E-\\x1F]')""",
    # one value nested in an array or map, as JSON (what _json_value renders)
    "tm_j1": r"""(e) -> multiIf(e.value = 'string_value', tm_jstr(e.string_value),
        e.value = 'bool_value', if(e.bool_value, 'true', 'false'), e.value = 'int_value', toString(e.int_value),
        e.value = 'bytes_value', concat('"', base64Encode(e.bytes_value), '"'), 'null')""",
    "tm_deep1": r"""(e) -> e.value IN ('double_value', 'array_value', 'kvlist_value', 'string_value_strindex')
        OR (e.value = 'string_value' AND tm_ctrl(e.string_value))""",
    # value_str: one attribute value as the OTel Collector renders it
    "tm_av": r"""(v) -> multiIf(v.value = 'string_value', v.string_value,
        v.value = 'bool_value', if(v.bool_value, 'true', 'false'), v.value = 'int_value', toString(v.int_value),
        v.value = 'double_value', tm_f64(v.double_value), v.value = 'bytes_value', base64Encode(v.bytes_value),
        v.value = 'array_value', concat('[', arrayStringConcat(arrayMap(e -> tm_j1(e), v.array_value.values), ','), ']'),
        v.value = 'kvlist_value', concat('{', arrayStringConcat(arrayMap(kv -> concat(tm_jstr(kv.1), ':', tm_j1(kv.2)),
            arraySort(kv -> kv.1, v.kvlist_value.values)), ','), '}'),
        '')""",
    "tm_deep_av": r"""(v) -> v.value = 'string_value_strindex'
        OR (v.value = 'array_value' AND arrayExists(e -> tm_deep1(e), v.array_value.values))
        OR (v.value = 'kvlist_value' AND (arrayExists(kv -> tm_deep1(kv.2) OR tm_ctrl(kv.1), v.kvlist_value.values)
            OR length(arrayDistinct(arrayMap(kv -> kv.1, v.kvlist_value.values))) != length(v.kvlist_value.values)))""",
    "tm_map": r"""(kvs) -> mapFromArrays(arrayMap(kv -> kv.1, kvs), arrayMap(kv -> tm_av(kv.2), kvs))""",
    "tm_deep_kvs": r"""(kvs) -> arrayExists(kv -> tm_deep_av(kv.2), kvs)
        OR length(arrayDistinct(arrayMap(kv -> kv.1, kvs))) != length(kvs)""",
    "tm_hexid": r"""(b) -> if(b = repeat('\0', length(b)), '', lower(hex(b)))""",
    "tm_ns": r"""(t) -> fromUnixTimestamp64Nano(toInt64(t))""",
}

_OTEL_SELECT = """
    tm_ns(sp.start_time_unix_nano) AS Timestamp,
    lower(hex(sp.trace_id)) AS TraceId,
    lower(hex(sp.span_id)) AS SpanId,
    tm_hexid(sp.parent_span_id) AS ParentSpanId,
    sp.trace_state AS TraceState,
    sp.name AS SpanName,
    if(sp.kind BETWEEN 0 AND 5, ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][sp.kind + 1], 'Unspecified') AS SpanKind,
    res['service.name'] AS ServiceName,
    res AS ResourceAttributes,
    sc.scope.name AS ScopeName,
    sc.scope.version AS ScopeVersion,
    tm_map(sp.attributes) AS SpanAttributes,
    if(sp.end_time_unix_nano > sp.start_time_unix_nano, sp.end_time_unix_nano - sp.start_time_unix_nano, 0) AS Duration,
    if(sp.status.code BETWEEN 0 AND 2, ['Unset', 'Ok', 'Error'][sp.status.code + 1], 'Unset') AS StatusCode,
    sp.status.message AS StatusMessage,
    arrayMap(e -> tm_ns(e.time_unix_nano), sp.events) AS `Events.Timestamp`,
    arrayMap(e -> e.name, sp.events) AS `Events.Name`,
    arrayMap(e -> tm_map(e.attributes), sp.events) AS `Events.Attributes`,
    arrayMap(l -> tm_hexid(l.trace_id), sp.links) AS `Links.TraceId`,
    arrayMap(l -> tm_hexid(l.span_id), sp.links) AS `Links.SpanId`,
    arrayMap(l -> l.trace_state, sp.links) AS `Links.TraceState`,
    arrayMap(l -> tm_map(l.attributes), sp.links) AS `Links.Attributes`"""

#: _span_problem, in SQL: the spans the receiver refused are not stored here either
_VALID = """length(sp.trace_id) = 16 AND sp.trace_id != repeat('\\0', 16)
    AND length(sp.span_id) = 8 AND sp.span_id != repeat('\\0', 8)
    AND length(sp.parent_span_id) IN (0, 8)
    AND arrayAll(l -> length(l.trace_id) = 16 AND length(l.span_id) = 8, sp.links)
    AND sp.start_time_unix_nano <= 9223372036854775807 AND sp.end_time_unix_nano <= 9223372036854775807
    AND arrayAll(e -> e.time_unix_nano <= 9223372036854775807, sp.events)"""

_DEEP = """tm_deep_kvs(rs.resource.attributes) OR tm_deep_kvs(sp.attributes)
    OR arrayExists(e -> tm_deep_kvs(e.attributes), sp.events) OR arrayExists(l -> tm_deep_kvs(l.attributes), sp.links)"""


def setup_statements(otel_columns_ddl: str) -> list[str]:
    """Functions, the Null staging table and its two views; idempotent."""
    out = [f"CREATE OR REPLACE FUNCTION {n} AS {body}" for n, body in FUNCTIONS.items()]
    out.append(f"""CREATE TABLE IF NOT EXISTS {DEEP} (
    Batch String, Rec UInt32, RsI UInt32, ScI UInt32, SpI UInt32, At DateTime DEFAULT now()
) ENGINE = MergeTree ORDER BY (Batch, Rec, RsI, ScI, SpI) TTL At + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 1000""")
    out.append(f"""CREATE TABLE IF NOT EXISTS {STAGING} (
{otel_columns_ddl},
    Deep UInt8, Batch String, Rec UInt32, RsI UInt32, ScI UInt32, SpI UInt32
) ENGINE = Null""")
    out.append(f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {STAGING}_stored TO otel_traces AS
SELECT * EXCEPT (Deep, Batch, Rec, RsI, ScI, SpI) FROM {STAGING} WHERE Deep = 0""")
    out.append(f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {STAGING}_deep TO {DEEP} AS
SELECT Batch, Rec, RsI, ScI, SpI FROM {STAGING} WHERE Deep = 1""")
    return out


def _quote(text: str) -> str:
    """*text* inside a ClickHouse string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def insert_sql(batch_file: str, schema_file: str, token: str) -> str:
    q = _quote(token)
    structure = STRUCTURE.replace("'", "\\'")
    return f"""INSERT INTO {STAGING}
SETTINGS insert_deduplication_token = '{q}', deduplicate_blocks_in_dependent_materialized_views = 1,
    {DEFER_INDEXES_SETTING} = '{DEFERRED_INDEXES[TRACES_TABLE]}'
SELECT {_OTEL_SELECT},
    {_DEEP} AS Deep, '{q}' AS Batch, rec AS Rec, rs_i AS RsI, sc_i AS ScI, sp_i AS SpI
FROM (
    SELECT rowNumberInAllBlocks() AS rec, resource_spans
    FROM file('{batch_file}', 'Protobuf', '{structure}')
    SETTINGS format_schema = '{schema_file}:{_MESSAGE}', input_format_protobuf_oneof_presence = 1, max_threads = 1,
        max_block_size = {READ_BLOCK_REQUESTS}
)
ARRAY JOIN resource_spans AS rs, arrayEnumerate(resource_spans) AS rs_i
ARRAY JOIN rs.scope_spans AS sc, arrayEnumerate(rs.scope_spans) AS sc_i
ARRAY JOIN sc.spans AS sp, arrayEnumerate(sc.spans) AS sp_i
LEFT ARRAY JOIN [tm_map(rs.resource.attributes)] AS res
WHERE {_VALID}"""


def encode_payloads(batch: NativeTraces) -> SpanColumns:
    """The rows of *batch* through the Python encoder (exactly what the native path stores)."""
    cols = SpanColumns()
    for payload in batch.payloads:
        req = ExportTraceServiceRequest()
        req.ParseFromString(payload)
        encode_traces(req, cols)
    return cols


class NativeIngest:
    """Stores NativeTraces batches into an embedded store; files live in *workdir*."""

    def __init__(self, store, workdir: str | os.PathLike, min_spans: int = NATIVE_MIN_SPANS,
                 c_encoder: bool | None = None) -> None:
        self.store = store
        #: encode batches with _otlpc (default: when it is built); then every batch takes this path
        self.c_encoder = _otlpc is not None if c_encoder is None else c_encoder
        if self.c_encoder and _otlpc is None:
            raise RuntimeError("the C extension tracemesh.collector._otlpc is not built")
        self.min_spans = 0 if self.c_encoder else min_spans
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema_file = self.dir / "otlp_trace.proto"
        self.schema_file.write_text(proto_schema())
        self.batch_file = self.dir / "native-batch.bin"
        self.deep_spans = 0

    def setup(self) -> None:
        if self.c_encoder:
            return
        cols = self.store.query_write(
            "SELECT concat('    `', name, '` ', type) FROM system.columns WHERE database = currentDatabase() "
            "AND table = 'otel_traces' AND default_kind != 'ALIAS' ORDER BY position").decode()
        for sql in setup_statements(",\n".join(cols.splitlines())):
            self.store.execute(sql)

    def insert(self, batch: NativeTraces, token: str) -> int:
        if self.c_encoder:
            # every payload passed _otlpc.check (or upb) on arrival or replay: not validated again
            rows, block = _otlpc.encode(batch.payloads, checked=True)
            if rows:
                self.store.insert_block("otel_traces", block, "Native", token)
            return rows
        tmp = self.batch_file.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for p in batch.payloads:
                f.write(_VarintBytes(len(p)))
                f.write(p)
        os.replace(tmp, self.batch_file)
        self.store.execute(insert_sql(str(self.batch_file), str(self.schema_file), token))
        deep = self.store.query_write(
            f"SELECT Rec, RsI, ScI, SpI FROM {DEEP} WHERE Batch = '{_quote(token)}' ORDER BY Rec, RsI, ScI, SpI"
        ).decode().split()
        if deep:
            self._store_deep(batch, token, [tuple(map(int, deep[i:i + 4])) for i in range(0, len(deep), 4)])
        return len(batch)

    def _store_deep(self, batch: NativeTraces, token: str, where: list[tuple[int, int, int, int]]) -> None:
        """The spans SQL left alone, through the Python encoder, under a token of their own."""
        picked = ExportTraceServiceRequest()
        by_rec: dict[int, list[tuple[int, int, int]]] = {}
        for rec, rs_i, sc_i, sp_i in where:
            by_rec.setdefault(rec, []).append((rs_i - 1, sc_i - 1, sp_i - 1))
        for rec, spots in by_rec.items():
            req = ExportTraceServiceRequest()
            req.ParseFromString(batch.payloads[rec])
            for rs_i, sc_i, sp_i in spots:
                rs = req.resource_spans[rs_i]
                sc = rs.scope_spans[sc_i]
                out_rs = picked.resource_spans.add(resource=rs.resource, schema_url=rs.schema_url)
                out_rs.scope_spans.add(scope=sc.scope, schema_url=sc.schema_url).spans.append(sc.spans[sp_i])
        cols, _ = encode_traces(picked, SpanColumns())
        self.store.insert_rows("otel_traces", cols, token + ":deep")
        self.deep_spans += len(cols)
