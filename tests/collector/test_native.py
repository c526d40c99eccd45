"""ClickHouse's own OTLP parsing and the C encoder (_otlpc) store exactly what the Python encoder stores.

Hypothesis builds requests full of the awkward cases (nested arrays and maps, doubles at the edges
of formatting, duplicate keys, control characters and HTML-sensitive characters in strings, zero
and malformed ids, unknown kinds, timestamps past 2262); both paths store them into real
ClickHouse and every column of every row must match.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from tracemesh.collector import _native
from tracemesh.collector._native import proto_schema

#: the C encoder (_otlpc) is built: every comparison covers it too
HAVE_C = _native._otlpc is not None

PROBE = Path(__file__).with_name("native_probe.py")

_text = st.text(alphabet=st.sampled_from(list("ab <>&\"\\/é€\u2028\u2029\n\t\r\x01\x1f\x7f") + ["x", "Ω"]), max_size=6)
_double = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1.0, 1e21, 1e-7, 123456789.125, 1e16, 5e-324, 1.7976931348623157e308]))


def _scalar():
    return st.one_of(
        st.builds(lambda s: AnyValue(string_value=s), _text),
        st.builds(lambda b: AnyValue(bool_value=b), st.booleans()),
        st.builds(lambda i: AnyValue(int_value=i), st.integers(-2**63, 2**63 - 1)),
        st.builds(lambda d: AnyValue(double_value=d), _double),
        st.builds(lambda b: AnyValue(bytes_value=b), st.binary(max_size=5)),
        st.just(AnyValue()),
    )


_value = st.recursive(
    _scalar(),
    lambda inner: st.one_of(
        st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(inner, max_size=3)),
        st.builds(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=kvs)),
                  st.lists(st.builds(lambda k, v: KeyValue(key=k, value=v), st.sampled_from(["a", "b", "z", "<"]), inner),
                           max_size=3)),
    ),
    max_leaves=3,
)
_kvs = st.lists(st.builds(lambda k, v: KeyValue(key=k, value=v), st.sampled_from(["k", "service.name", "http.x", "é", "k2"]),
                          _value), max_size=4)
_tid = st.one_of(st.binary(min_size=16, max_size=16), st.just(b"\0" * 16), st.binary(max_size=17))
_sid = st.one_of(st.binary(min_size=8, max_size=8), st.just(b"\0" * 8), st.binary(max_size=9))
_time = st.one_of(st.integers(0, 2**63 - 1), st.just(2**64 - 1), st.just(0))
_span = st.builds(
    lambda tid, sid, psid, name, kind, t0, t1, attrs, events, links, code, msg: Span(
        trace_id=tid, span_id=sid, parent_span_id=psid, name=name, kind=kind, start_time_unix_nano=t0,
        end_time_unix_nano=t1, attributes=attrs, events=events, links=links, status=Status(code=code, message=msg)),
    _tid, _sid, st.one_of(st.just(b""), _sid), _text, st.integers(-1, 7), _time, _time, _kvs,
    st.lists(st.builds(lambda t, n, a: Span.Event(time_unix_nano=t, name=n, attributes=a), _time, _text, _kvs), max_size=2),
    st.lists(st.builds(lambda t, s, a: Span.Link(trace_id=t, span_id=s, attributes=a), _tid, _sid, _kvs), max_size=2),
    st.integers(-1, 4), _text,
)
_request = st.builds(
    lambda res, scope, spans: ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=res), scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope[0], version=scope[1]),
                                                                   spans=spans)])]),
    _kvs, st.tuples(_text, _text), st.lists(_span, min_size=1, max_size=4))


def _run(cases: list[list[ExportTraceServiceRequest]], separately: bool = False) -> list[dict]:
    if separately:
        return [_run([case])[0] for case in cases]
    payload = json.dumps([[r.SerializeToString().hex() for r in case] for case in cases])
    r = subprocess.run([sys.executable, str(PROBE)], input=payload, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _same(results):
    for res in results:
        assert len(set(res["rejected"])) == 1, res["rejected"]
        if HAVE_C:
            assert "c" in res, "the probe did not run the C encoder"
            assert res["reasons"][0] == res["reasons"][1]
        py = [json.loads(x) for x in res["python"]]
        for path in ("native", "c") if HAVE_C else ("native",):
            nat = [json.loads(x) for x in res[path]]
            assert len(py) == len(nat), path
            for a, b in zip(py, nat):
                for k in a:
                    x, y = a[k], b[k]
                    if isinstance(x, float) and math.isnan(x):
                        assert isinstance(y, float) and math.isnan(y), (path, k)
                    else:
                        assert x == y, (path, k, x, y)


@given(st.lists(_request, min_size=8, max_size=12))
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_native_rows_equal_python_rows(requests):
    _same(_run([requests]))


def test_plain_spans_stay_native_and_nested_values_take_the_python_path():
    plain = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[Span(
        trace_id=b"\1" * 16, span_id=b"\2" * 8, name="plain",
        attributes=[KeyValue(key="tags", value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a<b")]))),
                    KeyValue(key="ratio", value=AnyValue(double_value=1e-7))])])])])
    nested = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[Span(
        trace_id=b"\3" * 16, span_id=b"\4" * 8, name="nested",
        attributes=[KeyValue(key="m", value=AnyValue(array_value=ArrayValue(values=[
            AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)]))])))])])])])
    [plain_res, nested_res] = _run([[plain], [nested]], separately=True)
    _same([plain_res, nested_res])
    assert plain_res["deep"] == 0 and nested_res["deep"] == 1, (plain_res, nested_res)
    attrs = json.loads(plain_res["native"][0])["SpanAttributes"]
    assert attrs == {"tags": '["a\\u003cb"]', "ratio": "0.0000001"}
    assert json.loads(nested_res["native"][0])["SpanAttributes"] == {"m": "[[1]]"}


def test_generated_schema_carries_the_descriptor_field_numbers():
    text = proto_schema()
    assert "fixed64 start_time_unix_nano = 7;" in text and "repeated opentelemetry_proto_trace_v1_Span spans = 2;" in text
    assert "bytes array_value = 5;" in text  # the second level of nesting is opaque


def _kv(k, v):
    return KeyValue(key=k, value=v)


def test_the_zoo_of_awkward_values():
    doubles = [0.0, -0.0, 1.0, 0.1, 1 / 3, 1e-4, 9.99e-5, 1e-7, -8.1e-7, 123456789.125, 1e15, 1e16, 1.5e20, 1e21, 2.5e300,
               5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf]
    strings = ["", "plain", "quote\" back\\slash", "tab\tnew\nline\rcr", "<b>&amp;</b>", "\u2028\u2029", "é€Ω", "\x01ctl", "\x7fdel"]
    attrs = [_kv(f"d{i}", AnyValue(double_value=d)) for i, d in enumerate(doubles)]
    attrs += [_kv(f"s{i}", AnyValue(string_value=s)) for i, s in enumerate(strings)]
    attrs += [_kv("arr", AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=s) for s in strings[:7]]
                                                        + [AnyValue(int_value=-2**63), AnyValue(bool_value=False),
                                                           AnyValue(bytes_value=b"\0\xff"), AnyValue()]))),
              _kv("map", AnyValue(kvlist_value=KeyValueList(values=[_kv("z", AnyValue(int_value=1)), _kv("a", AnyValue(bool_value=True)),
                                                                     _kv("<", AnyValue(string_value=">"))]))),
              _kv("b", AnyValue(bool_value=False)), _kv("i", AnyValue(int_value=2**63 - 1)), _kv("none", AnyValue()),
              _kv("raw", AnyValue(bytes_value=b"\x00\x01\xfe"))]
    deep = [_kv("dup", AnyValue(int_value=1)), _kv("dup", AnyValue(int_value=2))]
    spans = [
        Span(trace_id=b"\1" * 16, span_id=b"\1" * 8, parent_span_id=b"\0" * 8, name="zoo", kind=7, status=Status(code=5),
             start_time_unix_nano=1_700_000_000_123_456_789, end_time_unix_nano=1_700_000_000_000_000_000, attributes=attrs,
             events=[Span.Event(time_unix_nano=5, name="e", attributes=attrs[:5])],
             links=[Span.Link(trace_id=b"\0" * 16, span_id=b"\0" * 8, trace_state="k=v", attributes=attrs[20:25])]),
        Span(trace_id=b"\2" * 16, span_id=b"\2" * 8, name="dup keys", kind=-1, attributes=deep),
        Span(trace_id=b"\3" * 16, span_id=b"\3" * 8, name="in arrays", attributes=[
            _kv("f", AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=d) for d in doubles[:14]]))),
            _kv("c", AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="\x02")])))]),
        Span(trace_id=b"\4" * 16, span_id=b"\4" * 8, name="far future", start_time_unix_nano=2**63),
        Span(trace_id=b"\0" * 16, span_id=b"\5" * 8, name="zero trace"),
    ]
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[_kv("service.name", AnyValue(string_value="zoo")), _kv("r", AnyValue(double_value=1e22))]),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name="s", version="1"), spans=spans)])])
    [res] = _run([[req]])
    _same([res])
    assert len(res["native"]) == 3 and set(res["rejected"]) == {2}
    assert res["deep"] == 2  # the duplicate keys and the doubles/control characters inside arrays


_ROUTING = """
import sys, tempfile
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tracemesh.collector._native import validate_traces
from tracemesh.collector._store import EmbeddedStore
req = ExportTraceServiceRequest.FromString(bytes.fromhex(sys.argv[1]))
d = tempfile.mkdtemp(); st = EmbeddedStore(d); st.ensure_schema(); st.enable_native(d + "/n", min_spans=3, c_encoder=False)
small, _ = validate_traces(req, req.SerializeToString())  # 2 spans: under the threshold
st.insert_rows("otel_traces", small["otel_traces"], "small")
calls = []
real = st.native.insert
st.native.insert = lambda b, t: calls.append(t) or real(b, t)
st.insert_rows("otel_traces", small["otel_traces"], "small-2")
big = small["otel_traces"]; big.extend(validate_traces(req, req.SerializeToString())[0]["otel_traces"])
st.insert_rows("otel_traces", big, "big")  # 4 spans: native
print(calls, st.query_write("SELECT count() FROM otel_traces").decode().strip())
"""


def test_without_the_c_encoder_small_batches_take_the_python_encoder_large_ones_the_native_path():
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[
        Span(trace_id=bytes([1] * 16), span_id=bytes([i + 1] * 8), name="s") for i in range(2)])])])
    r = subprocess.run([sys.executable, "-c", _ROUTING, req.SerializeToString().hex()], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["['big']", "8"]  # 2 + 2 through Python, 4 natively


_C_ROUTING = """
import sys, tempfile
from tracemesh.collector._native import check_traces
from tracemesh.collector._store import EmbeddedStore
payload = bytes.fromhex(sys.argv[1])
d = tempfile.mkdtemp(); st = EmbeddedStore(d); st.ensure_schema(); st.enable_native(d + "/n")
assert st.native.c_encoder and st.native.min_spans == 0
blocks = []
real = st.insert_block
st.insert_block = lambda table, data, fmt, token: blocks.append((fmt, token)) or real(table, data, fmt, token)
small, _ = check_traces(payload)
st.insert_rows("otel_traces", small["otel_traces"], "small")
st.insert_rows("otel_traces", small["otel_traces"], "small")  # the same token again: dropped
print(blocks, st.query_write("SELECT count() FROM otel_traces").decode().strip(),
      st.query_write("SELECT count() FROM otel_traces_trace_id_ts").decode().strip())
"""


@pytest.mark.skipif(not HAVE_C, reason="the C extension _otlpc is not built")
def test_with_the_c_encoder_every_batch_is_one_native_block_deduplicated_by_its_token():
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[
        Span(trace_id=bytes([1] * 16), span_id=bytes([i + 1] * 8), name="s") for i in range(2)])])])
    r = subprocess.run([sys.executable, "-c", _C_ROUTING, req.SerializeToString().hex()], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # two inserts of one block each, the second dropped by its token; the materialized view is fed
    assert r.stdout.split() == ["[('Native',", "'small'),", "('Native',", "'small')]", "2", "1"]


def test_low_cardinality_dictionaries_of_every_index_width_store_the_same_rows():
    """The C encoder hands LowCardinality columns over dictionary-encoded, with indexes as narrow as
    the batch's dictionary allows: over 65,536 distinct span names need UInt32 indexes, 300 distinct
    attribute keys UInt16, the kinds and status codes UInt8; stored, every row is the Python encoder's."""
    spans = [Span(trace_id=(i + 1).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name=f"op-{i}",
                  kind=i % 6, status=Status(code=i % 3), start_time_unix_nano=i,
                  attributes=[_kv(f"key.{i % 300}", AnyValue(int_value=i)), _kv("same", AnyValue(string_value="v"))])
             for i in range(66_000)]
    reqs = [ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[_kv("service.name", AnyValue(string_value=f"svc-{n}"))]),
        scope_spans=[ScopeSpans(spans=spans[n::4])])]) for n in range(4)]
    [res] = _run([reqs])
    _same([res])
    assert len(res["python"]) == len(spans)
