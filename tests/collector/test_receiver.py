"""The OTLP/gRPC receiver, end to end: a real collector process, real senders (the OpenTelemetry
SDK's OTLPSpanExporter, raw grpcio), and what landed checked through the query API."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

MiB = 1024 * 1024
TRACE_SERVICE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture(scope="module", params=["core", "grpcio"])
def collector(collector_factory, request):
    """Every test here runs on both OTLP/gRPC servers (collector/_grpc.py): grpcio's core driven by
    the collector's workers, the default, and grpc.server, its fallback. The core server is forced,
    so that a grpcio newer than those it was tested with fails here rather than falling back."""
    env = {k: v for k, v in os.environ.items() if k != "TRACEMESH_GRPC_SERVER"}
    env["TRACEMESH_GRPC_SERVER"] = request.param
    c = collector_factory(env=env)
    threads = set()
    for task in Path(f"/proc/{c.proc.pid}/task").iterdir():
        try:
            threads.add((task / "comm").read_text().strip())
        except OSError:
            pass
    # the two are told apart by their threads: grpc.server's pool starts its threads per call
    assert any(t.startswith("otlp-grpc_") for t in threads) == (request.param == "core"), threads
    return c


@pytest.fixture(scope="module")
def channel(collector):
    ch = grpc.insecure_channel(collector.grpc_addr, options=[("grpc.max_send_message_length", 64 * MiB)])
    yield ch
    ch.close()


def exporter(channel, raw: bool = False):
    """Export through grpcio: protobuf messages in and out, or raw bytes in."""
    return channel.unary_unary(
        TRACE_SERVICE_EXPORT,
        request_serializer=None if raw else (lambda m: m.SerializeToString()),
        response_deserializer=ExportTraceServiceResponse.FromString,
    )


def ids() -> tuple[bytes, bytes]:
    return os.urandom(16), os.urandom(8)


def still_serving(collector, channel, otlp) -> None:
    """The collector answers exports and queries after whatever came before."""
    tid, sid = ids()
    resp = exporter(channel)(otlp.request(otlp.span("alive", trace_id=tid, span_id=sid)), timeout=10)
    assert not resp.HasField("partial_success")
    assert collector.wait_rows(f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'", 1) == [{"SpanId": sid.hex()}]
    assert httpx.get(f"{collector.api_url}/ready").status_code == 200


# -- the OpenTelemetry SDK, as users' apps send -------------------------------------------------------


def test_sdk_spans_land_as_the_exporter_writes_them(collector):
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout", "deployment.environment": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.grpc_addr, insecure=True)))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("shop.cart", "1.2.3")
    linked = SpanContext(int.from_bytes(os.urandom(16), "big"), int.from_bytes(os.urandom(8), "big"), is_remote=True,
                         trace_flags=TraceFlags(1))
    t0 = time.time_ns()
    with tracer.start_as_current_span(
        "GET /cart", kind=SpanKind.SERVER, start_time=t0,
        attributes={"http.response.status_code": 200, "cache.hit": False, "ratio": 0.25, "tags": ["a", "b"]},
    ) as server:
        with tracer.start_as_current_span("load cart", start_time=t0 + 1_000, end_on_exit=False) as internal:
            internal.add_event("cache miss", {"key": "cart:42"}, timestamp=t0 + 2_000)
            internal.set_status(Status(StatusCode.ERROR, "db down"))
            internal.end(end_time=t0 + 5_001)
        with tracer.start_span("SELECT carts", kind=SpanKind.CLIENT, start_time=t0 + 6_000, links=[Link(linked, {"k": 1})]) as c:
            c.set_status(Status(StatusCode.OK))
    provider.shutdown()
    sent = {s.context.span_id: s for s in memory.get_finished_spans()}
    assert len(sent) == 3
    trace_id = format(server.get_span_context().trace_id, "032x")

    rows = collector.wait_rows(f"""
        SELECT *, toUnixTimestamp64Nano(Timestamp) AS ts, arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp) AS ets
        FROM otel_traces WHERE TraceId = '{trace_id}' ORDER BY Timestamp""", 3)
    assert [r["SpanName"] for r in rows] == ["GET /cart", "load cart", "SELECT carts"]
    for r in rows:
        s = sent[int(r["SpanId"], 16)]
        assert r["TraceId"] == trace_id == format(s.context.trace_id, "032x")
        assert r["SpanId"] == format(s.context.span_id, "016x")
        assert int(r["ts"]) == s.start_time
        assert int(r["Duration"]) == s.end_time - s.start_time
        assert r["ServiceName"] == "checkout"
        assert r["ResourceAttributes"]["service.name"] == "checkout"
        assert r["ResourceAttributes"]["deployment.environment"] == "test"
        assert r["ResourceAttributes"]["telemetry.sdk.language"] == "python"
        assert (r["ScopeName"], r["ScopeVersion"]) == ("shop.cart", "1.2.3")
    root, internal_row, client = rows
    assert root["ParentSpanId"] == ""
    assert internal_row["ParentSpanId"] == client["ParentSpanId"] == root["SpanId"]
    assert [r["SpanKind"] for r in rows] == ["Server", "Internal", "Client"]
    assert [r["StatusCode"] for r in rows] == ["Unset", "Error", "Ok"]
    assert internal_row["StatusMessage"] == "db down"
    assert int(internal_row["Duration"]) == 4_001
    assert root["SpanAttributes"] == {"http.response.status_code": "200", "cache.hit": "false", "ratio": "0.25",
                                      "tags": '["a","b"]'}
    assert internal_row["Events.Name"] == ["cache miss"]
    assert [int(t) for t in internal_row["ets"]] == [t0 + 2_000]
    assert internal_row["Events.Attributes"] == [{"key": "cart:42"}]
    assert client["Links.TraceId"] == [format(linked.trace_id, "032x")]
    assert client["Links.SpanId"] == [format(linked.span_id, "016x")]
    assert client["Links.Attributes"] == [{"k": "1"}]


# -- raw grpcio: what the SDK never sends ------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",  # not protobuf at all
    b"\x0a\x05abc",  # a length-delimited field cut short
    b"\x0a\x03\x0a\x01",  # resource_spans holding a truncated resource
    b"\x0b",  # a group start that never ends
], ids=["garbage", "truncated", "nested-truncated", "open-group"])
def test_malformed_bytes_are_invalid_argument_and_the_collector_keeps_serving(collector, channel, otlp, payload):
    with pytest.raises(grpc.RpcError) as err:
        exporter(channel, raw=True)(payload, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ExportTraceServiceRequest" in err.value.details()
    still_serving(collector, channel, otlp)


def test_some_bad_spans_are_rejected_through_partial_success(collector, channel, otlp):
    tid, _ = ids()
    good = [otlp.span(f"good{i}", trace_id=tid, span_id=os.urandom(8)) for i in range(3)]
    bad = [otlp.span("short-span-id", trace_id=tid, span_id=b"\x01\x02\x03\x04"),
           otlp.span("zero-trace-id", trace_id=bytes(16), span_id=os.urandom(8))]
    before = collector.stats()["pipeline"]
    resp = exporter(channel)(otlp.request(good[0], bad[0], good[1], bad[1], good[2]), timeout=10)
    assert resp.partial_success.rejected_spans == 2
    msg = resp.partial_success.error_message
    assert "short-span-id" in msg and "span_id" in msg and "zero-trace-id" in msg and "trace_id" in msg
    rows = collector.wait_rows(f"SELECT SpanName FROM otel_traces WHERE TraceId = '{tid.hex()}' ORDER BY SpanName", 3)
    assert [r["SpanName"] for r in rows] == ["good0", "good1", "good2"]
    after = collector.stats()["pipeline"]
    assert after["rows_rejected"] - before["rows_rejected"] == 2
    assert after["rows_received"] - before["rows_received"] == 3


def test_all_spans_bad_stores_nothing_and_says_why(collector, channel, otlp):
    tid, _ = ids()
    resp = exporter(channel)(otlp.request(otlp.span("only-bad", trace_id=tid, span_id=b"")), timeout=10)
    assert resp.partial_success.rejected_spans == 1
    assert "only-bad" in resp.partial_success.error_message
    time.sleep(0.5)  # more than a flush interval
    assert collector.rows(f"SELECT toString(count()) AS c FROM otel_traces WHERE TraceId = '{tid.hex()}'") == [{"c": "0"}]


def test_empty_export_is_plain_success(collector, channel, otlp):
    resp = exporter(channel)(otlp.request(), timeout=10)
    assert not resp.HasField("partial_success")
    resp = exporter(channel, raw=True)(b"", timeout=10)
    assert not resp.HasField("partial_success")


def test_oversized_message_is_refused_and_a_large_one_accepted(collector, channel, otlp):
    # beyond gRPC's 4 MiB default, within our 16 MiB: stored
    tid, sid = ids()
    exporter(channel)(otlp.request(otlp.span(trace_id=tid, span_id=sid, attrs={"blob": "x" * (6 * MiB)})), timeout=30)
    rows = collector.wait_rows(f"SELECT toString(length(SpanAttributes['blob'])) AS n FROM otel_traces "
                               f"WHERE TraceId = '{tid.hex()}'", 1)
    assert rows == [{"n": str(6 * MiB)}]
    # beyond 16 MiB: refused before it is parsed
    tid, sid = ids()
    with pytest.raises(grpc.RpcError) as err:
        exporter(channel)(otlp.request(otlp.span(trace_id=tid, span_id=sid, attrs={"blob": "x" * (17 * MiB)})), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    still_serving(collector, channel, otlp)
    assert collector.rows(f"SELECT toString(count()) AS c FROM otel_traces WHERE TraceId = '{tid.hex()}'") == [{"c": "0"}]


def test_gzip_compressed_exports_are_stored(collector, otlp):
    """The SDK exporter with gzip (OTEL_EXPORTER_OTLP_COMPRESSION=gzip): grpcio's core inflates it."""
    provider = TracerProvider(resource=Resource.create({"service.name": "zipped"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=collector.grpc_addr, insecure=True, compression=grpc.Compression.Gzip)))
    with provider.get_tracer("t").start_as_current_span("gz", attributes={"pad": "z" * 10_000}) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()
    rows = collector.wait_rows(f"SELECT ServiceName, length(SpanAttributes['pad']) AS n FROM otel_traces "
                               f"WHERE TraceId = '{trace_id}'", 1)
    assert rows == [{"ServiceName": "zipped", "n": 10_000}]


def test_a_call_without_a_message_or_to_an_unknown_method_is_refused_and_serving_goes_on(collector, channel, otlp):
    with pytest.raises(grpc.RpcError) as err:  # a stream half-closed before any message
        channel.stream_unary(TRACE_SERVICE_EXPORT)(iter(()), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "requires exactly one request message" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Nope")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    still_serving(collector, channel, otlp)


def test_an_export_abandoned_by_its_sender_is_still_stored_and_serving_goes_on(collector, otlp):
    """A sender that gives up (its deadline passes, its channel closes) while its exports are being
    logged: what was logged is stored, and the receiver's workers are all still there."""
    tid = os.urandom(16)
    ch = grpc.insecure_channel(collector.grpc_addr)
    futures_ = [exporter(ch).future(otlp.request(otlp.span(f"gone{i}", trace_id=tid, span_id=os.urandom(8))), timeout=10)
                for i in range(40)]
    ch.close()  # cancels what has not been answered yet
    acked = 0
    for f in futures_:
        try:
            f.result()
            acked += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED
    with grpc.insecure_channel(collector.grpc_addr) as ch2:
        # more calls at once than the receiver has workers: none was lost to the cancelled ones
        ok = [exporter(ch2).future(otlp.request(otlp.span("after", trace_id=tid, span_id=os.urandom(8))), timeout=10)
              for _ in range(16)]
        for f in ok:
            f.result()
    rows = collector.wait_rows(f"SELECT SpanName FROM otel_traces WHERE TraceId = '{tid.hex()}' AND SpanName = 'after'", 16)
    assert len(rows) == 16
    gone = collector.rows(f"SELECT SpanName FROM otel_traces WHERE TraceId = '{tid.hex()}' AND SpanName LIKE 'gone%'")
    assert len(gone) >= acked  # every acknowledged one; the cancelled ones too if they were logged


def test_concurrent_senders_every_span_stored(collector, otlp):
    tid, _ = ids()
    errors: list[BaseException] = []

    def send():
        ch = grpc.insecure_channel(collector.grpc_addr)
        try:
            export = exporter(ch)
            for _ in range(10):
                export(otlp.request(*[otlp.span(trace_id=tid, span_id=os.urandom(8)) for _ in range(20)]), timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            ch.close()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    rows = collector.wait_rows(f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'", 800)
    assert len(rows) == len({r["SpanId"] for r in rows}) == 800


def test_stats_count_what_was_received_and_stored(collector, channel, otlp):
    before = collector.stats()["pipeline"]
    tid, _ = ids()
    exporter(channel)(otlp.request(*[otlp.span(trace_id=tid, span_id=os.urandom(8)) for _ in range(7)]), timeout=10)
    collector.wait_rows(f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'", 7)
    deadline = time.monotonic() + 10
    while True:
        after = collector.stats()["pipeline"]
        if after["rows_stored"] - before["rows_stored"] >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["rows_received"] - before["rows_received"] == 7
    assert after["rows_stored"] - before["rows_stored"] == 7
    assert after["exports"] - before["exports"] == 1
    assert after["rows_stored_by_table"]["otel_traces"] >= 7


def test_the_collectors_threads_carry_their_names_for_top_and_perf(collector, channel, otlp):
    """``top -H``, ``perf`` and the benchmark's per-thread split tell the receiving handlers and the
    store writer apart by the OS-level thread name."""
    tid, sid = ids()
    exporter(channel)(otlp.request(otlp.span("named", trace_id=tid, span_id=sid)), timeout=10)
    collector.wait_rows(f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'", 1)
    names = set()
    for task in Path(f"/proc/{collector.proc.pid}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:
            pass  # the thread ended meanwhile
    assert "store-writer" in names
    assert any(n.startswith("otlp-grpc_") for n in names), names
    assert "control-plane" in names


# -- one owner per store --------------------------------------------------------------------------


def test_a_second_collector_on_the_same_store_is_refused(collector, run_tracemesh):
    from tracemesh.net import free_port

    second = run_tracemesh("collector", "--store", str(collector.store), "--otlp-grpc", f"127.0.0.1:{free_port()}",
                           "--otlp-http", "off", "--api", f"127.0.0.1:{free_port()}")
    assert second.returncode == 1
    assert f"its query API is {collector.api_url}" in second.stderr
    assert f"collector pid {collector.proc.pid}" in second.stderr
    # `tracemesh sql --store` points the user at the API; through the API the same query works
    direct = run_tracemesh("sql", "--store", str(collector.store), "SELECT 1")
    assert direct.returncode == 1 and f"tracemesh sql --api {collector.api_url}" in direct.stderr
    via_api = run_tracemesh("sql", "--api", collector.api_url, "--format", "csv", "SELECT 41 + 1 AS answer")
    assert via_api.returncode == 0, via_api.stderr
    assert via_api.stdout.splitlines() == ['"answer"', "42"]
    assert collector.proc.poll() is None  # the owner was not disturbed


# -- SIGTERM: stop taking exports, store what was acknowledged ----------------------------------------


def test_sigterm_under_load_stores_every_acknowledged_export(collector_factory, otlp, run_tracemesh):
    c = collector_factory()
    acked: list[str] = []
    stop = threading.Event()

    def send():
        ch = grpc.insecure_channel(c.grpc_addr)
        export = exporter(ch)
        while not stop.is_set():
            tid = os.urandom(16)
            req = otlp.request(*[otlp.span(trace_id=tid, span_id=i.to_bytes(8, "big")) for i in range(1, 101)])
            try:
                export(req, timeout=10)
            except grpc.RpcError:
                break  # the collector is going away
            acked.append(tid.hex())
        ch.close()

    senders = [threading.Thread(target=send) for _ in range(3)]
    for t in senders:
        t.start()
    try:
        while len(acked) < 30:
            time.sleep(0.01)
        assert c.stop(timeout=60) == 0, c.output()
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    acked_now = list(acked)
    assert len(acked_now) >= 30
    assert "got SIGTERM" in c.output()
    assert not (c.store / "collector.json").exists()  # it let go of the store

    got = run_tracemesh("sql", "--store", str(c.store), "--format", "csv",
                        "SELECT TraceId, count() FROM otel_traces GROUP BY TraceId")
    assert got.returncode == 0, got.stderr
    stored = dict(line.replace('"', "").split(",") for line in got.stdout.splitlines()[1:])
    missing = [t for t in acked_now if t not in stored]
    assert not missing, f"{len(missing)} of {len(acked_now)} acknowledged exports missing after SIGTERM"
    assert all(stored[t] == "100" for t in acked_now)


def test_the_core_server_is_chosen_only_on_grpcio_releases_it_was_tested_with(monkeypatch, caplog):
    from tracemesh.collector import _grpc

    monkeypatch.delenv("TRACEMESH_GRPC_SERVER", raising=False)
    first, last = _grpc.CORE_TESTED
    assert first <= _grpc._grpcio_version(), "pyproject's grpcio floor is older than the receiver was tested on"
    for version, kind in ((first, "core"), (last, "core"), ((last[0], last[1] + 1), "grpcio"), ((2, 0), "grpcio")):
        monkeypatch.setattr(_grpc, "_grpcio_version", lambda v=version: v)
        assert _grpc.server_kind() == kind, version
    assert "newer than the releases" in caplog.text
    monkeypatch.setenv("TRACEMESH_GRPC_SERVER", "core")  # forced, on a release not yet tried
    assert _grpc.server_kind() == "core"
    monkeypatch.setenv("TRACEMESH_GRPC_SERVER", "grpcio")
    assert _grpc.server_kind() == "grpcio"
    monkeypatch.setenv("TRACEMESH_GRPC_SERVER", "fast")
    with pytest.raises(ValueError, match="core or grpcio"):
        _grpc.server_kind()
