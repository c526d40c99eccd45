"""The sidecar's own OTLP/gRPC client (:mod:`tracemesh.proxy._otlp`) against grpcio's server, and
the encoders' caches: what a warm encoder writes is what a fresh one (and the reference message
encoder) writes."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from sidecar_harness import any_value
from tracemesh.net import free_port
from tracemesh.proxy._accesslog import AccessEntry, LogEncoder, fields, line
from tracemesh.proxy._otlp import ExportError, OtlpClient
from tracemesh.proxy._recorder import KIND_CLIENT, KIND_SERVER, SpanEncoder, SpanRecord, encode_request

PATH = "/test.Echo/Call"


class _Server:
    """A grpcio server with one generic unary method: *behave(request, context)* answers."""

    def __init__(self, behave, port: int = 0) -> None:
        self.behave = behave
        self.port = port or free_port()
        self.calls = 0
        self.sizes: list[int] = []
        self._start()

    def _start(self) -> None:
        outer = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                def call(request, context):
                    outer.calls += 1
                    outer.sizes.append(len(request))
                    return outer.behave(request, context)
                return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=None)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Handler()],
                                  options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def restart(self) -> None:
        self.server.stop(0).wait()
        self._start()

    def stop(self) -> None:
        self.server.stop(0).wait()


def _echo(request, context):
    return request[:16]


def test_calls_share_one_connection_and_carry_large_messages():
    srv = _Server(_echo)
    client = OtlpClient(f"127.0.0.1:{srv.port}")
    big = os.urandom(3 * 1024 * 1024)  # beyond the default HTTP/2 windows: flow control at work

    async def main():
        assert await client.call(PATH, b"hello", 5) == b"hello"
        assert await client.call(PATH, big, 10) == big[:16]
        assert await client.call(PATH, b"", 5) == b""
        async with trio.open_nursery() as n:  # concurrent callers take turns on the one connection
            for i in range(5):
                n.start_soon(client.call, PATH, bytes([i]) * 1000, 5)

    try:
        trio.run(main)
    finally:
        client.close()
        srv.stop()
    assert client.connects == 1 and client.calls == 8
    assert srv.sizes[:3] == [5, len(big), 0]


def test_a_status_is_an_export_error_with_its_name_and_message():
    def refuse(request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down: 50% full")

    srv = _Server(refuse)
    client = OtlpClient(f"127.0.0.1:{srv.port}")

    async def main():
        for _ in range(2):  # the connection stays usable after an error status
            with pytest.raises(ExportError) as err:
                await client.call(PATH, b"x" * 100, 5)
            assert (err.value.code, err.value.details) == ("RESOURCE_EXHAUSTED", "slow down: 50% full")

    try:
        trio.run(main)
    finally:
        client.close()
        srv.stop()
    assert client.connects == 1


def test_nobody_listening_is_unavailable_at_once():
    client = OtlpClient(f"127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(ExportError) as err:
        trio.run(client.call, PATH, b"x", 5.0)
    assert err.value.code == "UNAVAILABLE" and time.monotonic() - t0 < 2


def test_a_slow_answer_is_deadline_exceeded_and_the_next_call_works():
    release = threading.Event()

    def slow(request, context):
        if request == b"slow":
            release.wait(5)
        return b"ok"

    srv = _Server(slow)
    client = OtlpClient(f"127.0.0.1:{srv.port}")

    async def main():
        t0 = trio.current_time()
        with pytest.raises(ExportError) as err:
            await client.call(PATH, b"slow", 0.3)
        assert err.value.code == "DEADLINE_EXCEEDED" and trio.current_time() - t0 < 2
        release.set()
        assert await client.call(PATH, b"fast", 5) == b"ok"

    try:
        trio.run(main)
    finally:
        release.set()
        client.close()
        srv.stop()
    assert client.connects == 2  # the abandoned call's connection was dropped


def test_a_restarted_collector_is_reached_again():
    srv = _Server(_echo)
    client = OtlpClient(f"127.0.0.1:{srv.port}")

    async def main():
        assert await client.call(PATH, b"one", 5) == b"one"
        await trio.to_thread.run_sync(srv.restart)
        # the kept connection is dead; the call goes out on a new one (at most one failure between)
        for _ in range(20):
            try:
                assert await client.call(PATH, b"two", 5) == b"two"
                return
            except ExportError:
                await trio.sleep(0.1)
        raise AssertionError("never reached the restarted server")

    try:
        trio.run(main)
    finally:
        client.close()
        srv.stop()
    assert client.connects >= 2


def test_a_cancelled_call_drops_the_connection_and_the_next_one_works():
    release = threading.Event()

    def hold(request, context):
        if request == b"hold":
            release.wait(5)
        return b"ok"

    srv = _Server(hold)
    client = OtlpClient(f"127.0.0.1:{srv.port}")

    async def main():
        with trio.move_on_after(0.3):
            await client.call(PATH, b"hold", 10)
        release.set()
        assert await client.call(PATH, b"after", 5) == b"ok"

    try:
        trio.run(main)
    finally:
        release.set()
        client.close()
        srv.stop()


# -- warm encoders write what fresh ones write ------------------------------------------------

_values = st.one_of(st.sampled_from(["GET", "catalog", "v1", "-", "/", "127.0.0.1:9080", ""]),
                    st.sampled_from([0, 1, 200, 503, 1024, True, False, 1.0, 200.0]), st.text(max_size=20))
_keys = st.sampled_from(["http.request.method", "mesh.direction", "http.response.status_code", "url.path",
                         "http.response.body.size", "mesh.mirror", "k"])
_spans = st.builds(
    SpanRecord, st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8),
    st.sampled_from([b"", b"\x01" * 8]), st.sampled_from(["GET catalog", "POST x", ""]),
    st.sampled_from([KIND_SERVER, KIND_CLIENT]), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
    st.dictionaries(_keys, _values, max_size=7), st.integers(0, 2), st.sampled_from(["", "upstream reset"]),
    st.sampled_from(["", "a=1"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_spans, max_size=6), min_size=1, max_size=4))
def test_a_warm_span_encoder_writes_what_the_message_encoder_writes(batches):
    # values that compare equal across types (1, True, 1.0) must not take each other's cached bytes
    enc = SpanEncoder({"service.name": "s"}, "1")
    for batch in batches:
        assert enc.encode(batch) == encode_request({"service.name": "s"}, "1", batch)


_log_attrs = st.fixed_dictionaries({}, optional={
    "http.request.method": st.sampled_from(["GET", "POST", 1, True]),
    "url.path": st.sampled_from(["/", "/a", 7]), "url.query": st.sampled_from(["", "x=1", 0]),
    "network.protocol.version": st.sampled_from(["1.1", "2"]),
    "network.transport": st.sampled_from(["tcp", "udp"]),
    "mesh.direction": st.sampled_from(["inbound", "outbound"]),
    "guid:x-request-id": st.text(max_size=10), "user_agent.original": st.sampled_from(["ua/1", 1]),
    "mesh.upstream.endpoint": st.sampled_from(["127.0.0.1:9080", "10.0.0.1:80", 5]),
    "mesh.destination.service": st.sampled_from(["catalog", "x"]),
    "mesh.destination.version": st.sampled_from(["v1", "v2"]), "mesh.route": st.sampled_from(["r1", True]),
    "rpc.grpc.status_code": st.sampled_from([0, 1, 14, True, False, 1.0]),
    "mesh.source.principal": st.sampled_from(["spiffe://cluster.local/ns/a/sa/b"]),
})
_entries = st.builds(AccessEntry, st.integers(0, 2**63), st.integers(0, 2**40), st.just(b"\x01" * 16),
                     st.just(b"\x02" * 8), st.integers(0, 255), _log_attrs, st.sampled_from([0, 200, 503, True]),
                     st.sampled_from(["-", "UF,URX", "DC"]), st.integers(0, 2**20), st.integers(0, 2**20),
                     st.sampled_from(["", "catalog:80", "x"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_entries, max_size=6), min_size=1, max_size=4))
def test_a_warm_log_encoder_writes_each_records_fields_and_line(batches):
    enc = LogEncoder({"service.name": "s"}, "1")
    for batch in batches:
        req = ExportLogsServiceRequest.FromString(enc.encode(batch))
        got = req.resource_logs[0].scope_logs[0].log_records if batch else []
        assert len(got) == len(batch)
        for r, e in zip(got, batch):
            f = fields(e)
            decoded = {kv.key: any_value(kv.value) for kv in r.attributes}
            assert decoded == f
            assert {k: type(v) for k, v in decoded.items()} == {k: type(v) for k, v in f.items()}
            assert r.body.string_value == line(f)
            assert (r.time_unix_nano, r.observed_time_unix_nano) == (e.start_ns, e.start_ns + e.duration_ns)
            assert (r.trace_id, r.span_id, r.flags) == (e.trace_id, e.span_id, e.trace_flags)


# -- metrics: the wire encoder writes what the message encoder writes ---------------------------

_label = st.sampled_from(["catalog", "v1", "", "spiffe://cluster.local/ns/a/sa/b", "x" * 300, "ü"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["inbound", "outbound"]), _label, _label, st.sampled_from([None, 200, 503]),
                          st.sampled_from([None, "-", "UF"]), st.floats(0, 100), st.integers(0, 2**40),
                          st.integers(0, 2**40)), max_size=8),
       st.lists(st.tuples(_label, st.integers(0, 2**40)), max_size=3),
       st.dictionaries(st.sampled_from(["a_total", "b", "c_total", "d"]),
                       st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.booleans()), max_size=4),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from(["", "1.2"]))
def test_the_metrics_wire_encoder_writes_what_the_message_encoder_writes(obs, tcp, stats, start, now, version):
    from tracemesh.proxy._metrics import MeshMetrics, encode_otlp, encode_otlp_reference

    m = MeshMetrics(max_series=4, stats=lambda: stats)
    for direction, svc, ver, status, flags, seconds, req, resp in obs:
        m.observe({"mesh.direction": direction, "mesh.source.service": svc, "mesh.destination.version": ver},
                  seconds, req, resp, status, flags)
    for svc, sent in tcp:
        s = m.tcp_series({"mesh.direction": "inbound", "mesh.source.service": svc})
        s.opened += 1
        s.sent += sent
    snap = m.snapshot()
    resource = {"service.name": "s", "n": 3}
    assert encode_otlp(snap, resource, start, now, version) == encode_otlp_reference(snap, resource, start, now, version)


def test_the_span_constants_are_opentelemetry_protos_and_the_sidecar_loads_no_protobuf():
    import subprocess
    import sys

    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    from tracemesh.proxy import _recorder

    assert (_recorder.KIND_SERVER, _recorder.KIND_CLIENT) == (Span.SpanKind.SPAN_KIND_SERVER,
                                                               Span.SpanKind.SPAN_KIND_CLIENT)
    assert (_recorder.STATUS_UNSET, _recorder.STATUS_ERROR) == (Status.StatusCode.STATUS_CODE_UNSET,
                                                                Status.StatusCode.STATUS_CODE_ERROR)
    code = ("import sys, tracemesh.proxy._serve, tracemesh.proxy._http1, tracemesh.proxy._http2, "
            "tracemesh.proxy._tcp; print('google.protobuf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "False"
    # nor grpcio, even with mTLS (the CA client speaks gRPC with h2), nor cryptography until keys are made
    code = "import sys, tracemesh.proxy._mtls; print('grpc' in sys.modules, 'cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "False False"
