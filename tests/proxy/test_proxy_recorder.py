"""The lean span recorder: bounded queue, pure OTLP encoder, and the grpcio exporter."""

from __future__ import annotations

import math
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar_harness import OTLPReceiver, any_value
from tracemesh.net import free_port
from tracemesh.proxy._recorder import (
    ENCODE_SLICE, KIND_CLIENT, KIND_SERVER, MAX_BATCH, SCOPE_NAME, STATUS_ERROR, STATUS_UNSET, OTLPExporter, SpanRecord,
    SpanRecorder, encode_request,
)


def _span(i: int = 1, **kw) -> SpanRecord:
    base = dict(trace_id=bytes([i % 255 + 1]) * 16, span_id=bytes([i % 255 + 1]) * 8, parent_span_id=b"",
                name=f"GET s{i}", kind=KIND_SERVER, start_ns=1_700_000_000_000_000_000 + i,
                end_ns=1_700_000_000_000_500_000 + i, attributes={"i": i}, status=STATUS_UNSET, status_message="")
    base.update(kw)
    return SpanRecord(**base)


async def _until(ready, timeout: float = 10) -> None:
    """Wait until ``ready()`` is true (trio.TooSlowError after *timeout* seconds)."""
    with trio.fail_after(timeout):
        while not ready():
            await trio.sleep(0.02)


def test_bounded_queue_drops_and_counts():
    r = SpanRecorder(max_queued=3)
    for i in range(5):
        r.record(_span(i))
    assert len(r) == 3
    assert (r.stats.recorded, r.stats.dropped) == (3, 2)
    assert [s.attributes["i"] for s in r.take(2)] == [0, 1]  # oldest first
    r.record(_span(9))
    assert [s.attributes["i"] for s in r.take()] == [2, 9]
    assert r.take() == [] and len(r) == 0
    assert (r.stats.recorded, r.stats.dropped) == (4, 2)


def test_a_full_batch_wakes_the_exporter():
    r = SpanRecorder()
    for i in range(MAX_BATCH - 1):
        r.record(_span(i))
    assert not r.wakeup.is_set()
    r.record(_span(MAX_BATCH))
    assert r.wakeup.is_set()
    assert len(r.take()) == MAX_BATCH


RESOURCE = {"service.name": "catalog", "service.version": "v2", "mesh.component": "sidecar"}


def test_encode_request_decodes_to_the_same_spans():
    spans = [
        _span(1, attributes={"http.request.method": "GET", "http.response.status_code": 200, "ok": True,
                             "ratio": 0.25, "url.path": "/items/ü"}),
        _span(2, kind=KIND_CLIENT, parent_span_id=b"\x01" * 8, status=STATUS_ERROR, status_message="upstream reset"),
    ]
    req = ExportTraceServiceRequest.FromString(encode_request(RESOURCE, "1.2.3", spans))
    assert len(req.resource_spans) == 1
    rs = req.resource_spans[0]
    assert {kv.key: any_value(kv.value) for kv in rs.resource.attributes} == RESOURCE
    assert len(rs.scope_spans) == 1
    ss = rs.scope_spans[0]
    assert (ss.scope.name, ss.scope.version) == (SCOPE_NAME, "1.2.3")
    assert len(ss.spans) == 2
    for got, want in zip(ss.spans, spans):
        assert (got.trace_id, got.span_id, got.parent_span_id) == (want.trace_id, want.span_id, want.parent_span_id)
        assert (got.name, got.kind, got.start_time_unix_nano, got.end_time_unix_nano) == (
            want.name, want.kind, want.start_ns, want.end_ns)
        assert {kv.key: any_value(kv.value) for kv in got.attributes} == want.attributes
        assert (got.status.code, got.status.message) == (want.status, want.status_message)
    # the value types survive (an int stays an int, a bool a bool), as OTLP consumers see them
    kinds = {kv.key: kv.value.WhichOneof("value") for kv in ss.spans[0].attributes}
    assert kinds == {"http.request.method": "string_value", "http.response.status_code": "int_value",
                     "ok": "bool_value", "ratio": "double_value", "url.path": "string_value"}


attr_values = st.one_of(st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1), st.floats(allow_nan=False),
                        st.text())


@settings(deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8),
                          st.dictionaries(st.text(min_size=1), attr_values, max_size=6),
                          st.integers(0, 2 ** 63), st.sampled_from([KIND_SERVER, KIND_CLIENT])), max_size=8),
       st.dictionaries(st.text(min_size=1), st.text(), max_size=4))
def test_encode_request_round_trip(items, resource):
    spans = [_span(i, trace_id=t, span_id=s, attributes=a, start_ns=start, end_ns=start + 1, kind=k)
             for i, (t, s, a, start, k) in enumerate(items)]
    req = ExportTraceServiceRequest.FromString(encode_request(resource, "0", spans))
    rs = req.resource_spans[0]
    assert {kv.key: any_value(kv.value) for kv in rs.resource.attributes} == resource
    got = rs.scope_spans[0].spans
    assert len(got) == len(spans)
    for g, w in zip(got, spans):
        assert (g.trace_id, g.span_id, g.start_time_unix_nano, g.kind) == (w.trace_id, w.span_id, w.start_ns, w.kind)
        decoded = {kv.key: any_value(kv.value) for kv in g.attributes}
        assert decoded.keys() == w.attributes.keys()
        for k, v in w.attributes.items():
            assert type(decoded[k]) is type(v) and (decoded[k] == v or (isinstance(v, float) and math.isclose(decoded[k], v)))


def test_exporter_sends_queued_spans_and_flush_sends_the_rest(otlp):
    recorder = SpanRecorder()
    exporter = OTLPExporter(recorder, str(otlp.addr), {"service.name": "recorder-test"}, "9.9")
    tag = f"recorder-{time.monotonic_ns()}"

    async def main():
        async with trio.open_nursery() as n:
            await n.start(exporter.run)
            recorder.record(_span(1, attributes={"test": tag, "n": 1}))
            await _until(lambda: recorder.stats.exported >= 1)
            n.cancel_scope.cancel()
        recorder.record(_span(2, attributes={"test": tag, "n": 2}))  # the exporter loop is gone: flush sends it
        await exporter.flush(3)

    try:
        trio.run(main)
    finally:
        exporter.close()
    got = otlp.wait(2, test=tag)
    assert sorted(s.attrs["n"] for s in got) == [1, 2]
    assert got[0].resource == {"service.name": "recorder-test"} and got[0].scope == (SCOPE_NAME, "9.9")
    assert recorder.stats.exported == 2 and recorder.stats.export_failures == 0


def test_steady_load_is_exported_in_batches_not_a_call_per_few_spans(otlp):
    """Spans arriving steadily go every EXPORT_INTERVAL_S, or at once as a full MAX_BATCH: what
    arrives while an export is in flight waits. (The exporter used to send again at once whatever
    had arrived meanwhile: under load an export of a few spans every few milliseconds, each a call
    and a WAL sync at the collector.)"""
    recorder = SpanRecorder()
    exporter = OTLPExporter(recorder, str(otlp.addr), {"service.name": "recorder-test"}, "9.9")
    tag = f"steady-{time.monotonic_ns()}"
    n = MAX_BATCH + 2000

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            t0 = trio.current_time()
            for i in range(n):  # ~2,000 spans a second for ~1.5 s: some arrive during every export
                recorder.record(_span(i, attributes={"test": tag}))
                await trio.sleep_until(t0 + (i + 1) / 2000)
            await _until(lambda: recorder.stats.exported >= n)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        exporter.close()
    assert len(otlp.wait(n, test=tag)) == n
    # full batches, and what the intervals found (~1.5 s of them, and the rest at the end)
    assert exporter.client.calls <= 6, exporter.client.calls  # it was ~190


def test_flush_is_bounded_when_the_collector_is_away():
    recorder = SpanRecorder()
    exporter = OTLPExporter(recorder, f"127.0.0.1:{free_port()}", {}, "0")
    for i in range(3):
        recorder.record(_span(i))
    t0 = time.monotonic()
    try:
        trio.run(exporter.flush, 1.0)
    finally:
        exporter.close()
    assert time.monotonic() - t0 < 3
    assert recorder.stats.exported == 0 and recorder.stats.export_failures >= 1
    assert recorder.stats.export_dropped == 3  # lost at shutdown, but counted


async def _after_a_failure(recorder: SpanRecorder) -> None:
    await _until(lambda: recorder.stats.export_failures)  # the failed batch waits for its retry


async def _mid_encoding(recorder: SpanRecorder) -> None:
    for _ in range(4):  # a full batch woke the exporter: 32 slices to encode, a checkpoint after each
        await trio.lowlevel.checkpoint()
    assert len(recorder) == 0 and recorder.stats.export_failures == 0  # taken, and being encoded


@pytest.mark.parametrize(("spans", "moment"), [(2, _after_a_failure), (MAX_BATCH, _mid_encoding)],
                         ids=["waiting-for-its-retry", "mid-encoding"])
def test_cancelled_exporter_counts_the_batch_it_held(spans, moment):
    recorder = SpanRecorder()
    exporter = OTLPExporter(recorder, f"127.0.0.1:{free_port()}", {}, "0")

    async def main():
        async with trio.open_nursery() as n:
            await n.start(exporter.run)
            for i in range(spans):
                recorder.record(_span(i))
            await moment(recorder)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        exporter.close()
    assert len(recorder) == 0 and recorder.stats.exported == 0
    assert recorder.stats.export_dropped == spans


def test_sliced_encoding_frees_the_records_and_writes_what_encode_writes():
    exporter = OTLPExporter(SpanRecorder(), f"127.0.0.1:{free_port()}", {"service.name": "s"}, "0")
    batch = [_span(i, attributes={"i": i, "route": "r"}) for i in range(3 * ENCODE_SLICE + 5)]
    whole = exporter.encode(list(batch))
    assert trio.run(exporter.encode_sliced, batch) == whole
    assert batch == []  # freed as it was encoded, not after the export
    exporter.close()


def test_a_batch_that_failed_is_sent_later_from_its_bytes_once():
    """The collector is away for the first attempts: the batch (several encoding slices) waits as
    its encoded bytes, whose records are already freed, and arrives whole, once, when it is back."""
    port = free_port()
    recorder = SpanRecorder()
    exporter = OTLPExporter(recorder, f"127.0.0.1:{port}", {"service.name": "retry-test"}, "0")
    n = 3 * ENCODE_SLICE + 7
    receiver = None

    async def main():
        nonlocal receiver
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            for i in range(n):
                recorder.record(_span(i, attributes={"test": "retry", "n": i}))
            await _until(lambda: recorder.stats.export_failures >= 2)
            assert len(recorder) == 0  # taken: the exporter holds the batch
            receiver = OTLPReceiver(port=port)
            await _until(lambda: recorder.stats.exported >= n, 20)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        got = receiver.wait(n, test="retry")
        assert sorted(s.attrs["n"] for s in got) == list(range(n))
        assert receiver.requests == 1
        assert recorder.stats.exported == n and recorder.stats.export_dropped == 0
    finally:
        exporter.close()
        if receiver is not None:
            receiver.close()


# -- the hand-written wire encoder writes exactly what the message encoder writes ---------------

from hypothesis import given, settings, strategies as _st  # noqa: E402

from tracemesh.proxy._recorder import encode_request_fast  # noqa: E402

_attr_value = _st.one_of(_st.text(max_size=300), _st.booleans(), _st.integers(-2**63, 2**63 - 1),
                         _st.floats(allow_nan=False))
_records = _st.builds(
    SpanRecord, _st.binary(min_size=16, max_size=16), _st.binary(min_size=8, max_size=8),
    _st.sampled_from([b"", b"\x01" * 8]), _st.text(max_size=40), _st.integers(0, 5),
    _st.integers(0, 2**64 - 1), _st.integers(0, 2**64 - 1),
    _st.dictionaries(_st.text(max_size=30), _attr_value, max_size=8), _st.integers(0, 2), _st.text(max_size=20),
    _st.one_of(_st.just(""), _st.text(max_size=60)))


@given(_st.lists(_records, max_size=5), _st.dictionaries(_st.text(max_size=20), _attr_value, max_size=4), _st.text(max_size=10))
@settings(max_examples=300, deadline=None)
def test_fast_encoder_is_byte_identical(spans, resource, version):
    assert encode_request_fast(resource, version, spans) == encode_request(resource, version, spans)


def test_trace_state_is_span_field_3_as_the_reference_parser_reads_it():
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    spans = [_span(1, trace_state=state), _span(2)]
    for payload in (encode_request_fast(RESOURCE, "1", spans), encode_request(RESOURCE, "1", spans)):
        got = ExportTraceServiceRequest.FromString(payload).resource_spans[0].scope_spans[0].spans
        assert [s.trace_state for s in got] == [state, ""]
    assert Span.DESCRIPTOR.fields_by_name["trace_state"].number == 3
