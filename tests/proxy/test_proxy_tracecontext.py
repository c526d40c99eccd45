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
