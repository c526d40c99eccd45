"""Access logs: one OTLP log record per request and TCP connection, linked to its span. The wire
encoder against the reference protobuf parser; then real sidecars, a real OTLP receiver, a real
collector storing ``otel_logs``, and a collector that is not there."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from io import StringIO

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from h2_helpers import SERVICE, GrpcApp, grpc_channel, stub
from sidecar_harness import START_TIMEOUT_S, SidecarProc, Upstream, any_value, distinct_ports, http_get_text, start_all
from tracemesh.net import Addr, free_port
from tracemesh.proxy._accesslog import (
    SCOPE_NAME, AccessEntry, AccessLog, StdoutWriter, encode_logs_fast, fields, json_line, line,
)

T0 = 1_764_154_800_123_456_789  # 2025-11-26T11:00:00.123Z
HTTP_ATTRS = {"http.request.method": "POST", "url.path": "/items/ü", "url.query": "a=1", "network.protocol.version": "2",
              "mesh.direction": "outbound", "guid:x-request-id": "rid-1", "user_agent.original": "ua/1",
              "mesh.upstream.endpoint": "127.0.0.1:9080", "mesh.destination.service": "catalog",
              "mesh.destination.version": "v2", "mesh.route": "r1", "rpc.grpc.status_code": 14,
              "mesh.source.principal": "spiffe://cluster.local/ns/default/sa/a",
              "mesh.destination.principal": "spiffe://cluster.local/ns/default/sa/b"}


def _entry(attrs=None, **kw) -> AccessEntry:
    base = dict(start_ns=T0, duration_ns=5_600_000, trace_id=b"\x01" * 16, span_id=b"\x02" * 8, trace_flags=1,
                attrs=HTTP_ATTRS if attrs is None else attrs, status=503, flags="UF,URX", received=10, sent=91,
                authority="catalog:80")
    base.update(kw)
    return AccessEntry(**base)


def test_fields_and_line_are_envoys():
    f = fields(_entry())
    assert f == {
        "start_time": "2025-11-26T11:00:00.123Z", "method": "POST", "path": "/items/ü?a=1", "protocol": "HTTP/2",
        "response_code": 503, "response_flags": "UF,URX", "bytes_received": 10, "bytes_sent": 91, "duration": 5,
        "user_agent": "ua/1", "request_id": "rid-1", "authority": "catalog:80", "upstream_host": "127.0.0.1:9080",
        "upstream_cluster": "outbound|9080|v2|catalog", "route_name": "r1", "grpc_status": 14,
        "source_principal": "spiffe://cluster.local/ns/default/sa/a",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/b"}
    assert line(f) == ('[2025-11-26T11:00:00.123Z] "POST /items/ü?a=1 HTTP/2" 503 UF,URX 10 91 5 - "-" "ua/1" '
                       '"rid-1" "catalog:80" "127.0.0.1:9080"')
    tcp = fields(_entry({"network.transport": "tcp", "mesh.direction": "inbound",
                         "mesh.upstream.endpoint": "127.0.0.1:5432"}, status=0, flags="-", authority=""))
    assert tcp["protocol"] == "TCP" and "method" not in tcp and tcp["upstream_cluster"] == "inbound|5432||"
    assert line(tcp) == '[2025-11-26T11:00:00.123Z] "- - -" 0 - 10 91 5 - "-" "-" "-" "-" "127.0.0.1:5432"'


def _parse(payload: bytes):
    req = ExportLogsServiceRequest.FromString(payload)
    [rl] = req.resource_logs
    [sl] = rl.scope_logs
    return rl, sl


def test_wire_encoding_as_the_reference_parser_reads_it():
    e = _entry()
    rl, sl = _parse(encode_logs_fast({"service.name": "web", "n": 3}, "1.2", [e, _entry(trace_flags=0)]))
    assert {kv.key: any_value(kv.value) for kv in rl.resource.attributes} == {"service.name": "web", "n": 3}
    assert (sl.scope.name, sl.scope.version) == (SCOPE_NAME, "1.2")
    r, unsampled = sl.log_records
    assert (r.trace_id, r.span_id, r.flags) == (e.trace_id, e.span_id, 1)
    assert (r.time_unix_nano, r.observed_time_unix_nano) == (T0, T0 + 5_600_000)
    assert (r.severity_number, r.severity_text) == (9, "INFO")
    assert r.body.string_value == line(fields(e))
    assert {kv.key: any_value(kv.value) for kv in r.attributes} == fields(e)
    assert unsampled.flags == 0


_values = st.one_of(st.text(max_size=300), st.integers(-2**63, 2**63 - 1), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(HTTP_ATTRS) + ["network.transport"]), _values, max_size=16),
       st.integers(0, 2**63), st.integers(0, 2**40), st.text(max_size=200), st.integers(0, 999))
def test_any_record_round_trips(attrs, start, duration, authority, status):
    e = _entry(attrs, start_ns=start, duration_ns=duration, authority=authority, status=status)
    _, sl = _parse(encode_logs_fast({}, "", [e]))
    [r] = sl.log_records
    assert {kv.key: any_value(kv.value) for kv in r.attributes} == fields(e)
    assert r.body.string_value == line(fields(e))
    json.loads(json_line(e))


def test_queue_is_bounded_and_counts_drops():
    q = AccessLog(max_queued=2)
    for i in range(5):
        q.record(_entry(status=i))
    assert (q.stats.recorded, q.stats.dropped, len(q)) == (2, 3, 2)
    assert [e.status for e in q.take()] == [0, 1]


def test_stdout_writer_writes_json_lines_off_the_event_loop():
    q, out = AccessLog(), StringIO()
    w = StdoutWriter(q, out)
    q.record(_entry())
    q.record(_entry(status=200))
    trio.run(w.flush, 2.0)
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["response_code"] for r in rows] == [503, 200]
    assert rows[0]["trace_id"] == "01" * 16 and rows[0]["span_id"] == "02" * 8
    assert q.stats.exported == 2 and len(q) == 0


# -- through real sidecars -----------------------------------------------------------------------


def _get(addr: Addr, target: str, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=10)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_every_http1_request_gets_a_record_on_each_side_linked_to_its_span(mesh, otlp):
    rid = str(uuid.uuid4())
    status, _ = _get(mesh.frontend.outbound, "/alog?x=1", {"host": "catalog", "x-request-id": rid,
                                                           "user-agent": "alog-test/1"})
    assert status == 200
    logs = otlp.wait_logs(2, request_id=rid)
    spans = otlp.wait(2, **{"guid:x-request-id": rid})
    by_service = {s.resource["service.name"]: s for s in spans}
    for r in logs:
        span = by_service[r.resource["service.name"]]
        assert (r.trace_id, r.span_id, r.flags) == (span.trace_id, span.span_id, 1)  # Grafana's log -> trace link
        assert r.scope[0] == SCOPE_NAME and r.time_ns == span.start_ns
        a = r.attrs
        assert (a["method"], a["path"], a["protocol"], a["response_code"], a["response_flags"]) == (
            "GET", "/alog?x=1", "HTTP/1.1", 200, "-")
        assert a["user_agent"] == "alog-test/1" and a["bytes_sent"] == span.attrs["http.response.body.size"]
        assert re.fullmatch(r'\[\S+Z\] "GET /alog\?x=1 HTTP/1\.1" 200 - 0 \d+ \d+ - "-" "alog-test/1" '
                            rf'"{rid}" "\S+" "\S+"', r.body), r.body
    client = next(r for r in logs if r.resource["service.name"] == "frontend")
    assert client.attrs["upstream_cluster"] == f"outbound|{mesh.catalog.inbound.port}|v1|catalog"
    assert client.attrs["authority"] == "catalog"
    # a local answer is a request too: no route (NR) gets its record
    rid = str(uuid.uuid4())
    status, _ = _get(mesh.frontend.outbound, "/", {"host": "nowhere", "x-request-id": rid})
    assert status == 404
    [r] = otlp.wait_logs(1, request_id=rid)
    assert (r.attrs["response_code"], r.attrs["response_flags"]) == (404, "NR")


class _Echo:
    """A TCP echo server in a thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = Addr("127.0.0.1", self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def sidecars(otlp, tmp_path_factory):
    """``alog-tcp`` (an HTTP app, and TCP inbound to an echo server; logs to the OTLP receiver),
    ``alog-grpc`` (a grpcio app; ``--access-log stdout``), ``alog-down`` (its collector is a port
    nothing listens on; ``--admin``)."""
    work = tmp_path_factory.mktemp("alog")
    app, echo, grpc_app = Upstream("alog"), _Echo(), GrpcApp()
    tcp_port, admin_port = distinct_ports(2)
    tcp = SidecarProc(work, "alog-tcp", app.addr, otlp.addr,
                      extra=("--tcp-inbound", f"127.0.0.1:{tcp_port}={echo.addr.port}"))
    grpc_sc = SidecarProc(work, "alog-grpc", grpc_app.addr, otlp.addr, extra=("--access-log", "stdout"))
    down = SidecarProc(work, "alog-down", app.addr, Addr("127.0.0.1", free_port()),
                       extra=("--admin", f"127.0.0.1:{admin_port}"))
    procs = [tcp, grpc_sc, down]
    try:
        start_all(procs)
        yield {"tcp": tcp, "tcp_listen": Addr("127.0.0.1", tcp_port), "grpc": grpc_sc, "down": down,
               "admin": Addr("127.0.0.1", admin_port)}
    finally:
        for p in procs:
            p.close()
        for x in (app, echo, grpc_app):
            x.close()


def test_a_tcp_connection_gets_one_record(sidecars, otlp):
    with socket.create_connection(sidecars["tcp_listen"], timeout=5) as s:
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(65536)
    [r] = otlp.wait_logs(1, service="alog-tcp", protocol="TCP")
    [span] = otlp.wait(1, service="alog-tcp", **{"network.transport": "tcp"})
    assert (r.trace_id, r.span_id) == (span.trace_id, span.span_id)
    assert (r.attrs["bytes_received"], r.attrs["bytes_sent"], r.attrs["response_flags"]) == (1000, 1000, "-")
    assert r.body.startswith("[") and '"- - -" 0 - 1000 1000 ' in r.body


def test_grpc_calls_go_to_stdout_as_json_lines(sidecars, otlp):
    sc = sidecars["grpc"]
    with grpc_channel(sc.inbound, "greeter") as ch:
        assert stub(ch, "Unary")(b"hi", timeout=10) == b"echo:hi"
    deadline = time.monotonic() + 10
    while not (rows := [json.loads(x) for x in sc.stdout().splitlines() if x.startswith("{")]):
        assert time.monotonic() < deadline, sc.stdout()
        time.sleep(0.1)
    [r] = rows
    assert (r["method"], r["path"], r["protocol"], r["response_code"], r["grpc_status"]) == (
        "POST", f"/{SERVICE}/Unary", "HTTP/2", 200, 0)
    [span] = otlp.wait(1, service="alog-grpc")
    assert (r["trace_id"], r["span_id"]) == (span.trace_id, span.span_id)
    assert otlp.find("alog-grpc") and not [x for x in otlp.logs if x.resource.get("service.name") == "alog-grpc"]


def _metric(admin: Addr, name: str) -> float:
    status, body = http_get_text(admin, "/metrics")
    assert status == 200
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    return float(m.group(1)) if m else -1.0


def test_collector_down_costs_no_request_and_drops_are_counted(sidecars):
    sc, admin = sidecars["down"], sidecars["admin"]
    worst = 0.0
    for i in range(30):
        t = time.monotonic()
        status, _ = _get(sc.inbound, f"/down/{i}", {})
        worst = max(worst, time.monotonic() - t)
        assert status == 200
    assert worst < 2.0  # nothing waits for the collector (an export call waits up to 10 s)
    deadline = time.monotonic() + 10
    while _metric(admin, "tracemesh_sidecar_access_log_export_failures_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _metric(admin, "tracemesh_sidecar_access_logs_recorded_total") >= 30
    assert _metric(admin, "tracemesh_sidecar_access_logs_exported_total") == 0
    assert sc.terminate() == 0
    m = re.search(r"access log \(otlp\): recorded (\d+) records, exported 0, dropped (\d+)", sc.stdout())
    assert m and int(m.group(1)) >= 30 and m.group(1) == m.group(2), sc.stdout()  # every one lost is counted


# -- into a real collector's otel_logs -----------------------------------------------------------


def test_a_real_collector_stores_the_records_with_their_spans_ids(tmp_path, otlp):
    grpc_port, api_port = distinct_ports(2)
    with open(tmp_path / "collector.log", "wb") as out:
        collector = subprocess.Popen(
            [sys.executable, "-m", "tracemesh", "collector", "--store", str(tmp_path / "store"), "--otlp-grpc",
             f"127.0.0.1:{grpc_port}", "--otlp-http", "off", "--control", "off", "--api", f"127.0.0.1:{api_port}"],
            stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{api_port}"
    app = Upstream("alog-stored")
    back = SidecarProc(tmp_path, "back", app.addr, Addr("127.0.0.1", grpc_port))
    try:
        back.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert collector.poll() is None, (tmp_path / "collector.log").read_text()
            try:
                if httpx.get(f"{api}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "collector not ready"
            time.sleep(0.1)
        back.wait_ready()
        trace, parent, rid = secrets.token_hex(16), secrets.token_hex(8), str(uuid.uuid4())
        status, _ = _get(back.inbound, "/stored", {"traceparent": f"00-{trace}-{parent}-01", "x-request-id": rid})
        assert status == 200

        def rows(sql):
            r = httpx.post(f"{api}/api/sql", params={"format": "JSON"}, content=sql.encode(), timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["data"]

        deadline = time.monotonic() + 20
        while not (logs := rows(f"SELECT TraceId, SpanId, TraceFlags, ServiceName, ScopeName, Body, "
                                f"LogAttributes['request_id'] AS rid, LogAttributes['response_code'] AS code "
                                f"FROM otel_logs WHERE TraceId = '{trace}'")) or not rows(
                f"SELECT SpanId FROM otel_traces WHERE TraceId = '{trace}'"):
            assert time.monotonic() < deadline, "not stored in time"
            time.sleep(0.2)
        [log] = logs
        [span] = rows(f"SELECT SpanId, ParentSpanId FROM otel_traces WHERE TraceId = '{trace}'")
        assert log["SpanId"] == span["SpanId"] and span["ParentSpanId"] == parent
        assert (log["ServiceName"], log["ScopeName"], log["rid"], log["code"], log["TraceFlags"]) == (
            "back", SCOPE_NAME, rid, "200", 1)
        assert '"GET /stored HTTP/1.1" 200 - ' in log["Body"]
    finally:
        back.close()
        app.close()
        collector.terminate()
        try:
            collector.wait(30)
        except subprocess.TimeoutExpired:
            collector.kill()
            collector.wait()
