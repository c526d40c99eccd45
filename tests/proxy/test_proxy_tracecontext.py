"""W3C traceparent parsing: invalid forms are ignored (None), never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.proxy._tracecontext import TraceParent, new_span_id, new_trace_id, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_the_spec_example():
    tp = parse_traceparent(VALID)
    assert tp == TraceParent(bytes.fromhex(TRACE), bytes.fromhex(SPAN), 1)
    assert tp.sampled and tp.header() == VALID
    assert not parse_traceparent(f"00-{TRACE}-{SPAN}-00").sampled
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03").sampled  # other flag bits are not "sampled" itself
    assert parse_traceparent(f"  {VALID}\t") == tp  # optional whitespace around a header value


@pytest.mark.parametrize("value", [
    None, "", "-", "00", VALID[:-1], VALID + "0",
    f"00-{TRACE[:-1]}-{SPAN}-01",            # trace id 31 hex digits
    f"00-{TRACE}0-{SPAN}-01",                # 33
    f"00-{TRACE}-{SPAN[:-1]}-01",            # span id 15
    f"00-{TRACE}-{SPAN}0-01",                # 17
    f"00-{TRACE}-{SPAN}-1",                  # flags one digit
    f"00-{TRACE}-{SPAN}-001",
    f"0-{TRACE}-{SPAN}-01", f"000-{TRACE}-{SPAN}-01",
    f"00-{TRACE.upper()}-{SPAN}-01",         # uppercase is invalid
    f"00-{TRACE}-{SPAN.upper()}-01",
    f"00-{TRACE}-{SPAN}-0A",
    f"0A-{TRACE}-{SPAN}-01",
    f"00-{'0' * 32}-{SPAN}-01",              # all-zero ids
    f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{SPAN}-01",                 # version ff is forbidden
    f"00-{TRACE}-{SPAN}-01-extra",           # version 00 has exactly four fields
    f"00-{TRACE}-{SPAN}-01-",
    f"00_{TRACE}_{SPAN}_01",
    f"00-{TRACE[:16]}g{TRACE[17:]}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-0x",
    f"00-{TRACE}-{SPAN}-01".replace("-", "--", 1),
    f"cc-{TRACE}-{SPAN}-01what",             # even a future version separates its extra fields by '-'
    "00-" + "٣" * 32 + f"-{SPAN}-01",        # non-ASCII digits are not hex
])
def test_invalid_forms_are_none(value):
    assert parse_traceparent(value) is None


def test_future_versions_are_read_by_their_first_four_fields():
    tp = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-the-future-will-be-like")
    assert tp == TraceParent(bytes.fromhex(TRACE), bytes.fromhex(SPAN), 1)
    assert tp.header() == VALID  # we propagate the version we speak
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-00") == TraceParent(bytes.fromhex(TRACE), bytes.fromhex(SPAN), 0)


ids16 = st.binary(min_size=16, max_size=16).filter(any)
ids8 = st.binary(min_size=8, max_size=8).filter(any)


@settings(deadline=None)
@given(ids16, ids8, st.integers(0, 255))
def test_round_trip(trace_id, span_id, flags):
    tp = TraceParent(trace_id, span_id, flags)
    header = tp.header()
    assert len(header) == 55 and header == header.lower()
    assert parse_traceparent(header) == tp
    assert tp.sampled == bool(flags & 1)


@settings(deadline=None)
@given(st.text())
def test_arbitrary_text_is_none_or_well_formed(text):
    tp = parse_traceparent(text)
    if tp is not None:
        assert len(tp.trace_id) == 16 and any(tp.trace_id)
        assert len(tp.span_id) == 8 and any(tp.span_id)
        assert 0 <= tp.flags <= 255


@settings(deadline=None)
@given(st.from_regex(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[0-9a-zA-Z-]*)?\Z"))
def test_hex_shaped_headers(text):
    tp = parse_traceparent(text)
    version, trace_hex, span_hex = text[:2], text[3:35], text[36:52]
    valid = (version != "ff" and (version != "00" or len(text) == 55)
             and trace_hex != "0" * 32 and span_hex != "0" * 16)
    assert (tp is not None) == valid, text


def test_new_ids_are_random_and_never_zero():
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000
    assert all(len(t) == 16 and any(t) for t in traces) and all(len(s) == 8 and any(s) for s in spans)


# -- tracestate --------------------------------------------------------------------------------

from tracemesh.proxy._tracecontext import (  # noqa: E402
    B3, MAX_TRACESTATE_CHARS, extract, parse_b3_multi, parse_b3_single, parse_tracestate,
)


def test_tracestate_members_are_kept_in_order_and_normalized():
    assert parse_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE") == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    # several header lines are one list; optional whitespace and empty members go
    assert parse_tracestate(["rojo=1 ,\t", " , congo=2", "a@b-c=x y"]) == "rojo=1,congo=2,a@b-c=x y"
    assert parse_tracestate([]) == parse_tracestate("") == parse_tracestate(" , ") == ""
    assert parse_tracestate("rojo=a b ") == "rojo=a b"  # a trailing space is whitespace around the member
    assert parse_tracestate(",".join(f"k{i}=v" for i in range(32))).count(",") == 31


@pytest.mark.parametrize("value", [
    "Rojo=1",                    # keys are lowercase
    "rojo=1,rojo=2",             # duplicate keys
    "rojo",                      # no value
    "rojo=",                     # empty value
    "rojo=a,b",                  # "b" is not a member
    "rojo=a=b",                  # '=' is not a value character
    "1abc=x",                    # a simple key starts with a letter
    "t@" + "s" * 15 + "=x",      # system id at most 14 characters
    "k=\u00e9",                  # values are printable ASCII
    ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
])
def test_invalid_tracestate_is_dropped_whole(value):
    assert parse_tracestate(value) == ""


def test_long_tracestate_loses_long_members_first_then_the_last():
    long = "big=" + "x" * 200
    members = [f"k{i:02d}=" + "v" * 40 for i in range(12)]  # 12 x 44 + 11 commas = 539
    got = parse_tracestate(",".join(members[:5] + [long] + members[5:]))
    assert len(got) <= MAX_TRACESTATE_CHARS and "big=" not in got
    assert got == ",".join(members[:11])  # the long one went first, then one from the end


@settings(deadline=None)
@given(st.lists(st.text(max_size=80), max_size=4))
def test_tracestate_never_raises_and_is_bounded(values):
    got = parse_tracestate(values)
    assert len(got) <= MAX_TRACESTATE_CHARS and got.count(",") < 32
    assert parse_tracestate(got) == got  # what we pass on parses to itself


# -- B3 ------------------------------------------------------------------------------------------

B3_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"
B3_PARENT = "05e3ac9a4f6e3b90"
H = bytes.fromhex


def test_b3_single_forms_of_the_spec():
    assert parse_b3_single(f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}") == B3(H(B3_TRACE), H(B3_SPAN), True, False, H(B3_PARENT))
    assert parse_b3_single(f"{B3_TRACE}-{B3_SPAN}") == B3(H(B3_TRACE), H(B3_SPAN), None)  # deferred
    assert parse_b3_single(f"{B3_TRACE}-{B3_SPAN}-d").debug
    assert parse_b3_single(f"{B3_TRACE}-{B3_SPAN}-0").sampled is False
    short = parse_b3_single(f"{B3_SPAN}-{B3_SPAN}-1")  # a 64-bit trace id is left-padded
    assert short.trace_id == b"\0" * 8 + H(B3_SPAN) and short.short
    assert short.single() == f"{B3_SPAN}-{B3_SPAN}-1"  # and written back as it came
    assert parse_b3_single("0") == B3(None, None, False) and parse_b3_single("d").debug
    assert parse_b3_single("1").traceparent() is None  # a decision carries no ids


@pytest.mark.parametrize("value", [
    "", "2", "-", B3_TRACE, f"{B3_TRACE}-", f"{B3_TRACE}-{B3_SPAN}-x", f"{B3_TRACE}-{B3_SPAN}-1-",
    f"{B3_TRACE}-{B3_SPAN}-{B3_PARENT}",          # a parent needs the sampling state before it
    f"{B3_TRACE.upper()}-{B3_SPAN}-1", f"{B3_TRACE[:-1]}-{B3_SPAN}-1", f"{B3_TRACE}-{B3_SPAN}0-1",
    f"{'0' * 32}-{B3_SPAN}-1", f"{B3_TRACE}-{'0' * 16}-1", f"{B3_TRACE}-{B3_SPAN}-1-{'0' * 16}",
    f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}-extra",
])
def test_b3_single_invalid(value):
    assert parse_b3_single(value) is None


def test_b3_multi_headers():
    assert parse_b3_multi(B3_TRACE, B3_SPAN, "1", None, B3_PARENT) == B3(H(B3_TRACE), H(B3_SPAN), True, False,
                                                                        H(B3_PARENT))
    assert parse_b3_multi(B3_TRACE, B3_SPAN).sampled is None
    assert parse_b3_multi(B3_TRACE, B3_SPAN, "true").sampled is True  # the legacy form, read leniently
    assert parse_b3_multi(B3_TRACE, B3_SPAN, None, "1") == B3(H(B3_TRACE), H(B3_SPAN), True, True)  # debug
    assert parse_b3_multi(None, None, "0") == B3(None, None, False)
    assert parse_b3_multi(None, None) is None
    assert parse_b3_multi(B3_TRACE, None, "1") is None and parse_b3_multi(B3_TRACE, B3_SPAN, "yes") is None
    assert parse_b3_multi(B3_TRACE, B3_SPAN, "1", None, "zz") is None


ids8 = st.binary(min_size=8, max_size=8).filter(any)
b3s = st.builds(
    lambda t, s, sampled, debug, parent, short: B3(b"\0" * 8 + t[8:] if short else t, s,
                                                   True if debug else sampled, debug, parent, short),
    ids16.filter(lambda b: any(b[8:])), ids8, st.sampled_from([None, True, False]), st.booleans(),
    st.one_of(st.none(), ids8), st.booleans())


@settings(deadline=None)
@given(b3s)
def test_b3_round_trips_through_both_forms(b3):
    single = parse_b3_single(b3.single())
    if b3.sampled is None and not b3.debug:  # without a sampling state there is no room for the parent
        b3 = b3._replace(parent_span_id=None)
    assert single == b3
    m = dict(b3.multi())
    assert parse_b3_multi(*(None if v is None else v.decode() for v in (
        m.get(b"x-b3-traceid"), m.get(b"x-b3-spanid"), m.get(b"x-b3-sampled"), m.get(b"x-b3-flags"),
        m.get(b"x-b3-parentspanid")))) == b3
    assert b3.traceparent() == TraceParent(b3.trace_id, b3.span_id, 0 if b3.sampled is False else 1)


@settings(deadline=None)
@given(st.text(max_size=120), st.lists(st.tuples(st.sampled_from(
    [b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-flags", b"x-b3-parentspanid",
     b"traceparent", b"tracestate", b"x-request-id"]), st.binary(max_size=60)), max_size=8))
def test_b3_and_extract_never_raise(text, headers):
    b = parse_b3_single(text)
    assert b is None or (b.trace_id is None) == (b.span_id is None)
    parse_b3_multi(text, text, text, text, text)
    ctx, _ = extract(headers)
    assert ctx.parent is None or (len(ctx.parent.trace_id) == 16 and len(ctx.parent.span_id) == 8)


def test_extract_prefers_a_valid_traceparent_over_b3():
    b3 = [(b"b3", f"{B3_TRACE}-{B3_SPAN}-1".encode())]
    ctx, rid = extract([(b"traceparent", VALID.encode()), (b"tracestate", b"a=1"), (b"x-request-id", b"r1")] + b3)
    assert ctx.parent == parse_traceparent(VALID) and ctx.tracestate == "a=1" and rid == b"r1"
    assert ctx.b3_single and not ctx.b3_multi  # it is still replaced, naming our span
    ctx, _ = extract([(b"traceparent", b"garbage"), (b"tracestate", b"a=1")] + b3)
    assert ctx.parent == TraceParent(H(B3_TRACE), H(B3_SPAN), 1)
    assert ctx.tracestate == ""  # tracestate goes only with a valid traceparent
    ctx, _ = extract([(b"x-b3-traceid", B3_SPAN.encode()), (b"x-b3-spanid", B3_SPAN.encode()),
                      (b"x-b3-sampled", b"0")])
    assert ctx.parent == TraceParent(b"\0" * 8 + H(B3_SPAN), H(B3_SPAN), 0) and not ctx.sampled and ctx.b3_multi
    ctx, _ = extract([(b"b3", b"0")])
    assert ctx.parent is None and not ctx.sampled  # a new trace, not recorded, as the caller decided
    ctx, _ = extract([(b"b3", b"garbage"), (b"x-b3-traceid", B3_TRACE.encode()), (b"x-b3-spanid", B3_SPAN.encode())])
    assert ctx.parent == TraceParent(H(B3_TRACE), H(B3_SPAN), 1)  # a malformed single header: the multi ones
    assert extract([])[0].sampled


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8), st.integers(0, 255))
def test_the_data_paths_traceparent_bytes_are_the_header(trace_id, span_id, flags):
    # _http1._context_headers builds traceparent as bytes, not through TraceParent.header()
    from tracemesh.proxy._http1 import _context_headers, _Span

    span = _Span(0, trace_id, span_id, b"", flags, bool(flags & 1))
    assert _context_headers(span)[0] == (b"traceparent", TraceParent(trace_id, span_id, flags).header().encode())
