"""OTLP protobuf -> otel_traces columns (collector/_encode.py). Pure: no sockets, no ClickHouse.

Values must read as the OpenTelemetry Collector's ClickHouse exporter writes them
(``pcommon.Value.AsString``), so that dashboards and queries written for it work on our data.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from decimal import Decimal

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from tracemesh.collector._encode import MAX_REASONS, SpanColumns, _span_problem, encode_traces, format_double, value_str
from tracemesh.collector._schema import TRACE_COLUMNS

TID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SID = bytes.fromhex("eee19b7ec3c1b174")
PARENT = bytes.fromhex("eee19b7ec3c1b173")
T0 = 1_700_000_000_123_456_789


def one(otlp, value) -> str:
    """How *value* renders as a span attribute after encoding."""
    cols, rej = encode_traces(otlp.request(otlp.span(trace_id=TID, span_id=SID, attrs={"k": value})))
    assert rej.count == 0
    return cols.SpanAttributes[0]["k"]


# -- value rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, text", [
    ("plain", "plain"),
    ("", ""),
    ("ünïcødé ✓", "ünïcødé ✓"),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (-42, "-42"),
    (2**63 - 1, "9223372036854775807"),
    (-(2**63), "-9223372036854775808"),
    (1.5, "1.5"),
    (-2.25, "-2.25"),
    (0.1, "0.1"),
    (100.0, "100"),  # no ".0": Go drops it
    (0.0, "0"),
    (123456789.125, "123456789.125"),
    (1e20, "100000000000000000000"),  # no exponent in 'f' form
    (0.000001, "0.000001"),
    (3.0e-5, "0.00003"),
    (b"\x00\xffhi", base64.b64encode(b"\x00\xffhi").decode()),  # standard alphabet, padded
    (b"\xfb\xff", "+/8="),
    (b"", ""),
    (None, ""),  # an AnyValue with nothing set
])
def test_scalar_values_render_as_the_otel_collector_does(otlp, value, text):
    assert one(otlp, value) == text


@pytest.mark.parametrize("value, text", [
    (["a", 1, True, None], '["a",1,true,null]'),
    ([], "[]"),
    ({}, "{}"),
    ({"k": "v", "n": {"x": 1}}, '{"k":"v","n":{"x":1}}'),
    ([{"a": [1, 2]}, "s"], '[{"a":[1,2]},"s"]'),
    ([b"\x01\x02"], '["AQI="]'),  # bytes inside JSON: base64 strings, as Go's json does with []byte
    (["é", "✓"], '["é","✓"]'),  # UTF-8 as is, not \u-escaped
    (["line\nbreak", 'q"uote', "back\\slash"], '["line\\nbreak","q\\"uote","back\\\\slash"]'),
])
def test_arrays_and_maps_render_as_compact_json(otlp, value, text):
    out = one(otlp, value)
    assert out == text
    assert json.loads(out) == json.loads(text)


def test_map_keys_are_sorted_as_go_json_marshal_sorts_them(otlp):
    # pcommon renders a map with json.Marshal(map[string]any): keys come out sorted, at every depth
    assert one(otlp, {"b": 1, "a": {"z": 1, "y": 2}}) == '{"a":{"y":2,"z":1},"b":1}'


def test_doubles_inside_json_render_as_go_json_does(otlp):
    # Go's encoding/json writes 1.0 as 1, not 1.0 as Python's json module does
    assert one(otlp, [1.0, 2.5, -3.0]) == "[1,2.5,-3]"
    assert one(otlp, {"d": 100.0}) == '{"d":100}'


def test_html_characters_in_json_are_escaped_as_go_json_does(otlp):
    # json.Marshal escapes <, > and & (HTML-safe output) by default
    assert one(otlp, ["<a href='x'>&</a>"]) == '["\\u003ca href=\'x\'\\u003e\\u0026\\u003c/a\\u003e"]'
    assert one(otlp, {"k<": "a\u2028b\u2029"}) == '{"k\\u003c":"a\\u2028b\\u2029"}'


def test_non_finite_doubles_inside_json_do_not_break_it(otlp):
    out = one(otlp, [math.nan, math.inf])
    assert json.loads(out)  # still valid JSON


@pytest.mark.parametrize("value, text", [
    # strconv.FormatFloat(v, 'f', -1, 64): shortest digits that read back, never an exponent
    (1e21, "1000000000000000000000"),
    (1.5e22, "15000000000000000000000"),
    (1e-7, "0.0000001"),
    (1.5e-10, "0.00000000015"),
    (-0.0, "-0"),
    (5e-324, "0." + "0" * 323 + "5"),
    (math.nan, "NaN"),
    (math.inf, "+Inf"),
    (-math.inf, "-Inf"),
])
def test_format_double_is_go_formatfloat_f_minus_1(value, text):
    assert format_double(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_format_double_reads_back_exactly_and_has_no_exponent(x):
    s = format_double(x)
    assert "e" not in s and "E" not in s
    assert float(s) == x
    # the shortest digits, as Go (and Python's repr) choose them
    assert Decimal(s) == Decimal(repr(x))


# -- the columns of a span -----------------------------------------------------------------------


def test_a_full_span_fills_every_column(otlp):
    other_tid, other_sid = bytes(range(1, 17)), bytes(range(1, 9))
    span = otlp.span(
        "GET /cart", trace_id=TID, span_id=SID, parent=PARENT, kind=Span.SPAN_KIND_CLIENT, start=T0, duration=2_500_000,
        attrs={"http.status_code": 503, "retry": True}, status=(Status.STATUS_CODE_ERROR, "upstream said no"),
        events=[(T0 + 10, "exception", {"exception.type": "Timeout"}), (T0 + 20, "retry", {})],
        links=[(other_tid, other_sid, "k=v", {"link.kind": "follows"})], trace_state="vendor=1",
    )
    req = otlp.request(span, service="checkout", resource={"host.name": "h1", "pid": 7}, scope=("lib.http", "2.3.4"))
    cols, rej = encode_traces(req)
    assert rej.count == 0 and rej.message == ""
    assert len(cols) == 1
    row = {name: col[0] for name, col in zip(TRACE_COLUMNS, cols.columns())}
    assert row == {
        "Timestamp": T0,
        "TraceId": "5b8efff798038103d269b633813fc60c",
        "SpanId": "eee19b7ec3c1b174",
        "ParentSpanId": "eee19b7ec3c1b173",
        "TraceState": "vendor=1",
        "SpanName": "GET /cart",
        "SpanKind": "Client",
        "ServiceName": "checkout",
        "ResourceAttributes": {"host.name": "h1", "pid": "7", "service.name": "checkout"},
        "ScopeName": "lib.http",
        "ScopeVersion": "2.3.4",
        "SpanAttributes": {"http.status_code": "503", "retry": "true"},
        "Duration": 2_500_000,
        "StatusCode": "Error",
        "StatusMessage": "upstream said no",
        "Events.Timestamp": [T0 + 10, T0 + 20],
        "Events.Name": ["exception", "retry"],
        "Events.Attributes": [{"exception.type": "Timeout"}, {}],
        "Links.TraceId": [other_tid.hex()],
        "Links.SpanId": [other_sid.hex()],
        "Links.TraceState": ["k=v"],
        "Links.Attributes": [{"link.kind": "follows"}],
    }


def test_column_model_matches_the_insert_columns():
    cols = SpanColumns()
    assert len(cols.columns()) == len(TRACE_COLUMNS)
    assert [n.replace(".", "") for n in TRACE_COLUMNS] == list(SpanColumns.__dataclass_fields__)


def test_root_span_has_empty_parent_and_ids_are_lowercase_hex(otlp):
    cols, _ = encode_traces(otlp.request(otlp.span(trace_id=bytes([0xAB] * 16), span_id=bytes([0xCD] * 8))))
    assert cols.ParentSpanId == [""]
    assert cols.TraceId == ["ab" * 16] and cols.SpanId == ["cd" * 8]


def test_all_zero_parent_and_link_ids_are_written_empty(otlp):
    # some senders (and translations from other formats) send eight zero bytes for "no parent";
    # the exporter writes '' for an all-zero id, so the span is a root in Grafana
    span = otlp.span(trace_id=TID, span_id=SID, parent=bytes(8), links=[(bytes(16), bytes(8), "", {})])
    cols, rej = encode_traces(otlp.request(span))
    assert rej.count == 0
    assert cols.ParentSpanId == [""]
    assert cols.LinksTraceId == [[""]] and cols.LinksSpanId == [[""]]


@pytest.mark.parametrize("kind, name", [
    (Span.SPAN_KIND_UNSPECIFIED, "Unspecified"),
    (Span.SPAN_KIND_INTERNAL, "Internal"),
    (Span.SPAN_KIND_SERVER, "Server"),
    (Span.SPAN_KIND_CLIENT, "Client"),
    (Span.SPAN_KIND_PRODUCER, "Producer"),
    (Span.SPAN_KIND_CONSUMER, "Consumer"),
    (42, "Unspecified"),  # proto3 enums are open: a newer sender may send a kind we do not know
])
def test_span_kinds(otlp, kind, name):
    cols, _ = encode_traces(otlp.request(otlp.span(trace_id=TID, span_id=SID, kind=kind)))
    assert cols.SpanKind == [name]


@pytest.mark.parametrize("code, name", [
    (None, "Unset"),
    (Status.STATUS_CODE_UNSET, "Unset"),
    (Status.STATUS_CODE_OK, "Ok"),
    (Status.STATUS_CODE_ERROR, "Error"),
    (9, "Unset"),
])
def test_status_codes(otlp, code, name):
    status = None if code is None else (code, "msg")
    cols, _ = encode_traces(otlp.request(otlp.span(trace_id=TID, span_id=SID, status=status)))
    assert cols.StatusCode == [name]
    assert cols.StatusMessage == ["" if code is None else "msg"]


@pytest.mark.parametrize("start, end, duration", [
    (T0, T0 + 1, 1),
    (T0, T0, 0),
    (T0, T0 - 5, 0),  # clock skew must not wrap around to 2**64 - 5
    (T0, 0, 0),  # never ended
])
def test_duration_is_nanoseconds_and_never_negative(otlp, start, end, duration):
    span = otlp.span(trace_id=TID, span_id=SID, start=start)
    span.end_time_unix_nano = end
    cols, _ = encode_traces(otlp.request(span))
    assert cols.Duration == [duration] and cols.Timestamp == [start]


def test_span_without_events_or_links_has_empty_arrays(otlp):
    cols, _ = encode_traces(otlp.request(otlp.span(trace_id=TID, span_id=SID)))
    for name in ("EventsTimestamp", "EventsName", "EventsAttributes", "LinksTraceId", "LinksSpanId",
                 "LinksTraceState", "LinksAttributes"):
        assert getattr(cols, name) == [[]], name


def test_resources_and_scopes_apply_to_their_own_spans(otlp):
    a = otlp.request(otlp.span("a", trace_id=TID, span_id=SID), service="alpha", scope=("s1", "1"))
    b = otlp.request(otlp.span("b", trace_id=TID, span_id=PARENT), service=None, resource={"x": "y"}, scope=("s2", ""))
    req = ExportTraceServiceRequest(resource_spans=[*a.resource_spans, *b.resource_spans])
    cols, _ = encode_traces(req)
    assert cols.SpanName == ["a", "b"]
    assert cols.ServiceName == ["alpha", ""]  # no service.name: empty, as the exporter writes it
    assert cols.ResourceAttributes == [{"service.name": "alpha"}, {"x": "y"}]
    assert cols.ScopeName == ["s1", "s2"] and cols.ScopeVersion == ["1", ""]


def test_non_string_service_name_is_rendered(otlp):
    cols, _ = encode_traces(otlp.request(otlp.span(trace_id=TID, span_id=SID), service=None, resource={"service.name": 7}))
    assert cols.ServiceName == ["7"]


def test_repeated_attribute_key_keeps_the_last_value(otlp):
    span = otlp.span(trace_id=TID, span_id=SID, attrs=[("k", "first"), ("k", "last")])
    cols, _ = encode_traces(otlp.request(span))
    assert cols.SpanAttributes == [{"k": "last"}]


def test_encode_appends_to_given_columns(otlp):
    cols, _ = encode_traces(otlp.request(otlp.span("one", trace_id=TID, span_id=SID)))
    same, _ = encode_traces(otlp.request(otlp.span("two", trace_id=TID, span_id=PARENT)), cols)
    assert same is cols
    assert cols.SpanName == ["one", "two"]
    assert all(len(c) == 2 for c in cols.columns())


def test_empty_request_gives_no_rows(otlp):
    cols, rej = encode_traces(ExportTraceServiceRequest())
    assert len(cols) == 0 and rej.count == 0
    cols, rej = encode_traces(ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans()])]))
    assert len(cols) == 0 and rej.count == 0


# -- malformed items: rejected, counted, described ---------------------------------------------------


@pytest.mark.parametrize("fields, words", [
    ({"trace_id": b""}, "trace_id"),
    ({"trace_id": TID[:15]}, "trace_id"),
    ({"trace_id": TID + b"\x01"}, "trace_id"),
    ({"trace_id": bytes(16)}, "trace_id"),  # all zero is the invalid trace id
    ({"span_id": b""}, "span_id"),
    ({"span_id": SID[:7]}, "span_id"),
    ({"span_id": bytes(8)}, "span_id"),
    ({"parent": PARENT[:4]}, "parent_span_id"),
    ({"links": [(TID[:8], SID, "", {})]}, "link"),
    ({"links": [(TID, SID + b"\x00", "", {})]}, "link"),
])
def test_malformed_span_is_rejected_with_a_reason_and_the_rest_kept(otlp, fields, words):
    kw = {"trace_id": TID, "span_id": SID, **fields}
    bad = otlp.span("bad-span", **kw)
    good = otlp.span("good-span", trace_id=TID, span_id=PARENT)
    cols, rej = encode_traces(otlp.request(good, bad, good))
    assert cols.SpanName == ["good-span", "good-span"]
    assert all(len(c) == 2 for c in cols.columns())  # nothing stored half-right
    assert rej.count == 1
    assert words in rej.message and "bad-span" in rej.message


def test_reasons_are_bounded_and_not_repeated(otlp):
    bad = [otlp.span(f"bad{i}", trace_id=TID[:i], span_id=SID) for i in range(MAX_REASONS + 3)]
    same = [otlp.span("dup", trace_id=b"", span_id=SID) for _ in range(5)]
    cols, rej = encode_traces(otlp.request(*same, *bad))
    assert len(cols) == 0
    assert rej.count == 5 + MAX_REASONS + 3
    assert len(rej.reasons) == MAX_REASONS
    assert rej.reasons[0].startswith("span 'dup'")
    assert rej.message == "; ".join(rej.reasons)


# -- properties over random requests --------------------------------------------------------------

_scalars = st.one_of(
    st.text(max_size=6), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=6), st.none(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


def _any(v) -> AnyValue:
    if v is None:
        return AnyValue()
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, str):
        return AnyValue(string_value=v)
    if isinstance(v, bytes):
        return AnyValue(bytes_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[_any(x) for x in v]))
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=_any(x)) for k, x in v.items()]))


_attrs = st.lists(st.tuples(st.text(max_size=5), _values), max_size=4)
# mostly well-formed ids, with every kind of malformed one mixed in
_trace_ids = st.one_of(st.binary(min_size=16, max_size=16), st.just(bytes(16)), st.binary(max_size=20))
_span_ids = st.one_of(st.binary(min_size=8, max_size=8), st.just(bytes(8)), st.binary(max_size=10))
_parents = st.one_of(st.just(b""), st.just(bytes(8)), st.binary(min_size=8, max_size=8), st.binary(max_size=10))
_ns = st.integers(0, 2**64 - 1)


@st.composite
def _spans(draw) -> Span:
    span = Span(
        trace_id=draw(_trace_ids), span_id=draw(_span_ids), parent_span_id=draw(_parents),
        name=draw(st.text(max_size=8)), kind=draw(st.integers(0, 7)), trace_state=draw(st.text(max_size=4)),
        start_time_unix_nano=draw(_ns), end_time_unix_nano=draw(_ns),
        attributes=[KeyValue(key=k, value=_any(v)) for k, v in draw(_attrs)],
    )
    span.status.code = draw(st.integers(0, 4))
    span.status.message = draw(st.text(max_size=4))
    for _ in range(draw(st.integers(0, 2))):
        span.events.add(time_unix_nano=draw(_ns), name=draw(st.text(max_size=4)),
                        attributes=[KeyValue(key=k, value=_any(v)) for k, v in draw(_attrs)])
    for _ in range(draw(st.integers(0, 2))):
        span.links.add(trace_id=draw(st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=17))),
                       span_id=draw(st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=9))),
                       trace_state=draw(st.text(max_size=3)))
    return span


@st.composite
def _requests(draw) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add()
        rs.resource.attributes.extend(KeyValue(key=k, value=_any(v)) for k, v in draw(_attrs))
        if draw(st.booleans()):
            rs.resource.attributes.add(key="service.name", value=_any(draw(_values)))
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = draw(st.text(max_size=4)), draw(st.text(max_size=4))
            ss.spans.extend(draw(st.lists(_spans(), max_size=4)))
    return req


def _valid(span: Span) -> bool:
    return (len(span.trace_id) == 16 and span.trace_id != bytes(16)
            and len(span.span_id) == 8 and span.span_id != bytes(8)
            and len(span.parent_span_id) in (0, 8)
            and all(len(lk.trace_id) == 16 and len(lk.span_id) == 8 for lk in span.links)
            # DateTime64(9) ends in 2262: later timestamps are refused rather than stored wrong
            and max(span.start_time_unix_nano, span.end_time_unix_nano,
                    *(e.time_unix_nano for e in span.events)) <= 2**63 - 1)


def _all_spans(req):
    return [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_random_requests_every_valid_span_once_and_the_rest_counted(req):
    cols, rej = encode_traces(req)
    spans = _all_spans(req)
    valid = [s for s in spans if _valid(s)]
    assert len(cols) + rej.count == len(spans)
    assert rej.count == len(spans) - len(valid)
    assert bool(rej.reasons) == bool(rej.count) and len(rej.reasons) <= MAX_REASONS
    assert all(len(c) == len(cols) for c in cols.columns())
    got = Counter(zip(cols.TraceId, cols.SpanId, cols.ParentSpanId, cols.SpanName))
    want = Counter((s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex() if any(s.parent_span_id) else "", s.name)
                   for s in valid)
    assert got == want
    for attrs in (*cols.SpanAttributes, *cols.ResourceAttributes):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items())
    assert all(kind in {"Unspecified", "Internal", "Server", "Client", "Producer", "Consumer"} for kind in cols.SpanKind)
    assert set(cols.StatusCode) <= {"Unset", "Ok", "Error"}
    assert all(0 <= d < 2**64 for d in cols.Duration)
    assert all(len(ts) == len(n) == len(a) for ts, n, a in zip(cols.EventsTimestamp, cols.EventsName, cols.EventsAttributes))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests(), st.data())
def test_corrupted_wire_bytes_never_crash_the_encoder(req, data):
    raw = bytearray(req.SerializeToString())
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw += data.draw(st.binary(max_size=8))
    parsed = ExportTraceServiceRequest()
    try:
        parsed.ParseFromString(bytes(raw))
    except DecodeError:
        return  # the receiver answers INVALID_ARGUMENT
    cols, rej = encode_traces(parsed)
    assert len(cols) + rej.count == len(_all_spans(parsed))


@settings(max_examples=500, deadline=None)
@given(_values)
def test_any_value_renders_to_a_string(v):
    out = value_str(_any(v))
    assert isinstance(out, str)
    if isinstance(v, (list, dict)):
        json.loads(out)
    elif isinstance(v, bool):
        assert out in ("true", "false")
    elif isinstance(v, int):
        assert int(out) == v
    elif isinstance(v, float):
        assume(math.isfinite(v))
        assert float(out) == v
    elif isinstance(v, bytes):
        assert base64.b64decode(out) == v


def _reference_span_problem(span) -> str | None:
    """_span_problem as first written (plain and slow): the fast one must say exactly the same."""
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return f"span {span.name!r}: trace_id must be 16 bytes, not all zero (got {len(span.trace_id)} bytes)"
    if len(span.span_id) != 8 or not any(span.span_id):
        return f"span {span.name!r}: span_id must be 8 bytes, not all zero (got {len(span.span_id)} bytes)"
    if span.parent_span_id and len(span.parent_span_id) != 8:
        return f"span {span.name!r}: parent_span_id must be empty or 8 bytes (got {len(span.parent_span_id)})"
    for link in span.links:
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            return f"span {span.name!r}: a link has a malformed trace_id or span_id"
    if span.start_time_unix_nano > 2**63 - 1 or span.end_time_unix_nano > 2**63 - 1 or any(
            e.time_unix_nano > 2**63 - 1 for e in span.events):
        return f"span {span.name!r}: a timestamp is past the year 2262 (more than 2**63-1 ns)"
    return None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spans())
def test_span_problem_says_what_the_reference_says(span):
    assert _span_problem(span) == _reference_span_problem(span)
