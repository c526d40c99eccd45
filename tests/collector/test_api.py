"""The collector's HTTP query API (collector/_api.py on tracemesh/httpserve.py), against a real
collector process: httpx for what clients do, raw sockets for what hostile or broken ones do."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import grpc
import httpx
import pyarrow.ipc
import pyarrow.parquet
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from rawio import read_until_closed

from tracemesh.httpserve import HEADER_TIMEOUT_S, MAX_BODY_BYTES, MAX_HEADER_BYTES

TRACE_SERVICE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SEED_SPANS = 5


@pytest.fixture(scope="module")
def collector(collector_factory):
    return collector_factory()


@pytest.fixture(scope="module")
def seeded(collector, otlp) -> str:
    """A trace of SEED_SPANS spans sent through the real receiver; its trace id."""
    tid = os.urandom(16)
    ch = grpc.insecure_channel(collector.grpc_addr)
    export = ch.unary_unary(TRACE_SERVICE_EXPORT, request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=ExportTraceServiceResponse.FromString)
    export(otlp.request(*[otlp.span(f"op{i}", trace_id=tid, span_id=os.urandom(8), attrs={"i": i})
                          for i in range(SEED_SPANS)], service="api-test"), timeout=10)
    ch.close()
    assert len(collector.wait_rows(f"SELECT 1 FROM otel_traces WHERE TraceId = '{tid.hex()}'", SEED_SPANS)) == SEED_SPANS
    return tid.hex()


def sql(collector, query: str, fmt: str | None = None, method: str = "POST") -> httpx.Response:
    params = {"format": fmt} if fmt else {}
    if method == "GET":
        return httpx.get(f"{collector.api_url}/api/sql", params={"query": query, **params}, timeout=30)
    return httpx.post(f"{collector.api_url}/api/sql", params=params, content=query.encode(), timeout=30)


def raw_http(collector, data: bytes, timeout: float = 5.0) -> bytes:
    """Send *data* on a fresh connection; read until the server closes it (or *timeout*)."""
    with socket.create_connection(("127.0.0.1", collector.api_port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer and close before it read everything
        return read_until_closed(s)


def status_of(response: bytes) -> int:
    return int(response.split(b"\r\n", 1)[0].split()[1])


def assert_serving(collector) -> None:
    assert httpx.get(f"{collector.api_url}/ready", timeout=10).status_code == 200


# -- slow clients: opened first, judged last (the header timeout runs while the other tests do) --------


class SlowClient(threading.Thread):
    """Starts a request head and never finishes it: silent, or trickling a header line a second."""

    def __init__(self, port: int, trickle: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.trickle = port, trickle
        self.opened = self.closed = None
        self.got = None

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            self.opened = time.monotonic()
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(1.0)
            while time.monotonic() - self.opened < HEADER_TIMEOUT_S * 3:
                try:
                    if self.trickle:
                        s.sendall(b"X-Slow: y\r\n")
                    self.got = s.recv(1024)
                except socket.timeout:
                    continue
                except OSError:
                    self.got = b""
                self.closed = time.monotonic()
                return


@pytest.fixture(scope="module", autouse=True)
def slow_clients(collector):
    clients = [SlowClient(collector.api_port, trickle=False), SlowClient(collector.api_port, trickle=True)]
    for c in clients:
        c.start()
    while any(c.opened is None for c in clients):
        time.sleep(0.01)
    t0 = time.monotonic()
    assert_serving(collector)  # served at once while both hold a connection
    assert time.monotonic() - t0 < 2
    return clients


# -- what clients do -------------------------------------------------------------------------------


def test_ready(collector):
    r = httpx.get(f"{collector.api_url}/ready")
    assert (r.status_code, r.text) == (200, "ready\n")


def test_post_sql_json(collector, seeded):
    r = sql(collector, f"SELECT SpanName, SpanAttributes['i'] AS i FROM otel_traces WHERE TraceId = '{seeded}' ORDER BY SpanName")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["rows"] == SEED_SPANS
    assert [m["name"] for m in doc["meta"]] == ["SpanName", "i"]
    assert doc["data"] == [{"SpanName": f"op{i}", "i": str(i)} for i in range(SEED_SPANS)]


def test_get_sql_csv_with_names(collector, seeded):
    r = sql(collector, f"SELECT SpanName, ServiceName FROM otel_traces WHERE TraceId = '{seeded}' ORDER BY SpanName LIMIT 2",
            "CSVWithNames", method="GET")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv"
    assert r.text.splitlines() == ['"SpanName","ServiceName"', '"op0","api-test"', '"op1","api-test"']


def test_default_format_is_json(collector):
    r = sql(collector, "SELECT 1 AS one", method="GET")
    assert r.status_code == 200 and r.json()["data"] == [{"one": 1}]


@pytest.mark.parametrize("fmt, content_type", [
    ("JSONEachRow", "application/x-ndjson"),
    ("Arrow", "application/vnd.apache.arrow.file"),
    ("ArrowStream", "application/vnd.apache.arrow.stream"),
    ("Parquet", "application/vnd.apache.parquet"),
    ("TSVWithNames", "text/plain; charset=utf-8"),
    ("PrettyCompactNoEscapes", "text/plain; charset=utf-8"),
])
def test_output_formats(collector, seeded, fmt, content_type):
    r = sql(collector, f"SELECT SpanName FROM otel_traces WHERE TraceId = '{seeded}' ORDER BY SpanName", fmt)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == content_type
    names = [f"op{i}" for i in range(SEED_SPANS)]
    if fmt == "Arrow":
        assert pyarrow.ipc.open_file(r.content).read_all().column("SpanName").to_pylist() == names
    elif fmt == "ArrowStream":
        assert pyarrow.ipc.open_stream(r.content).read_all().column("SpanName").to_pylist() == names
    elif fmt == "Parquet":
        assert pyarrow.parquet.read_table(io.BytesIO(r.content)).column("SpanName").to_pylist() == names
    else:
        assert all(n in r.text for n in names)


def test_keep_alive_connection_serves_many_queries(collector):
    with httpx.Client(base_url=collector.api_url, timeout=10) as client:
        for i in range(20):
            r = client.post("/api/sql", content=f"SELECT {i} AS n".encode())
            assert r.status_code == 200 and r.json()["data"] == [{"n": i}]


def test_concurrent_queries_all_answer(collector, seeded):
    # the API runs up to four queries at once on the store's reader session
    failures: list[str] = []

    def client():
        with httpx.Client(base_url=collector.api_url, timeout=30) as c:
            for _ in range(25):
                r = c.post("/api/sql", content=f"SELECT count() AS n FROM otel_traces WHERE TraceId = '{seeded}'".encode())
                if r.status_code != 200 or int(r.json()["data"][0]["n"]) != SEED_SPANS:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]


def test_stats_show_span_counters(collector, seeded):
    r = httpx.get(f"{collector.api_url}/api/stats")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["store"] == str(collector.store) and doc["uptime_s"] >= 0
    p = doc["pipeline"]
    assert p["rows_received"] >= SEED_SPANS and p["rows_stored"] >= SEED_SPANS
    assert p["rows_stored_by_table"]["otel_traces"] >= SEED_SPANS
    assert p["rows_rejected"] == 0 and p["exports"] >= 1
    assert p["flush_interval_s"] == 0.2  # the default


def test_status_of_a_collector_that_is_not_there_is_one_clear_line(run_tracemesh):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_tracemesh("collector", "status", "--api", f"127.0.0.1:{port}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("tracemesh collector status: cannot reach the query API at http://127.0.0.1:")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_flush_interval_is_the_one_asked_for(collector_factory):
    c = collector_factory(extra=("--flush-interval", "0.25"))
    assert httpx.get(f"{c.api_url}/api/stats").json()["pipeline"]["flush_interval_s"] == 0.25


# -- what the query's author gets wrong: 400 with ClickHouse's words -----------------------------------


@pytest.mark.parametrize("query, words", [
    ("SELEC 1", "Syntax error"),
    ("SELECT no_such_column FROM otel_traces", "UNKNOWN_IDENTIFIER"),
    ("SELECT * FROM no_such_table", "UNKNOWN_TABLE"),
    ("SELECT 1 FORMAT CSV", "leave out FORMAT"),
])
def test_bad_sql_is_400_with_clickhouse_message(collector, query, words):
    r = sql(collector, query)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["error"]
    assert "Stack trace" not in r.json()["error"]


@pytest.mark.parametrize("query, words", [
    ("INSERT INTO otel_traces (TraceId) VALUES ('x')", "INSERT"),
    ("DROP TABLE otel_traces", "DROP"),
    ("ALTER TABLE otel_traces DELETE WHERE 1", "ALTER"),
    ("TRUNCATE TABLE otel_traces", "TRUNCATE"),
    ("SELECT 1; DROP TABLE otel_traces", "Multi-statements"),
    ("SELECT * FROM otel_traces INTO OUTFILE '/tmp/tracemesh-api-leak.csv'", "INTO OUTFILE"),
    ("SELECT 1 SETTINGS readonly = 0", "readonly"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "READONLY"),
    ("SYSTEM SHUTDOWN", "SYSTEM"),
])
def test_write_statements_are_400_and_change_nothing(collector, seeded, query, words):
    for method in ("POST", "GET"):
        r = sql(collector, query, method=method)
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]
    assert not os.path.exists("/tmp/tracemesh-api-leak.csv")
    r = sql(collector, f"SELECT count() AS n FROM otel_traces WHERE TraceId = '{seeded}'")
    assert r.status_code == 200 and int(r.json()["data"][0]["n"]) == SEED_SPANS


def test_unknown_format_is_400(collector):
    r = sql(collector, "SELECT 1", "NoSuchFormat")
    assert r.status_code == 400
    assert "unknown output format 'NoSuchFormat'" in r.json()["error"]


@pytest.mark.parametrize("method, query", [("POST", ""), ("POST", "  \n"), ("GET", "")])
def test_empty_query_is_400(collector, method, query):
    r = sql(collector, query, method=method) if method == "POST" else httpx.get(f"{collector.api_url}/api/sql")
    assert r.status_code == 400 and "empty query" in r.json()["error"]


def test_body_must_be_utf8(collector):
    r = httpx.post(f"{collector.api_url}/api/sql", content=b"SELECT '\xff'")
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]


def test_sql_larger_than_the_query_limit_is_400(collector):
    r = sql(collector, "SELECT '" + "x" * (300 * 1024) + "'")
    assert r.status_code == 400 and "larger than" in r.json()["error"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(collector, method):
    r = httpx.request(method, f"{collector.api_url}/api/sql", content=b"SELECT 1")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"


@pytest.mark.parametrize("path", ["/", "/api", "/api/sql/extra", "/API/SQL", "/../etc/passwd", "/ready/"])
def test_unknown_paths_are_404(collector, path):
    r = httpx.get(f"{collector.api_url}{path}")
    assert r.status_code == 404
    assert "no such endpoint" in r.json()["error"]


# -- what broken or hostile clients send: bounded, answered, and the server goes on ---------------------


def test_body_over_the_limit_is_413(collector):
    n = MAX_BODY_BYTES + 1
    head = b"POST /api/sql HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
    resp = raw_http(collector, head + b"x" * n, timeout=30)
    assert status_of(resp) == 413
    assert b"connection: close" in resp.lower()
    assert_serving(collector)


def test_chunked_body_over_the_limit_is_413(collector):
    def chunks():
        # exactly one byte over: the server reads all of it, so its close cannot reset our read
        mib = 1024 * 1024
        for _ in range(MAX_BODY_BYTES // mib):
            yield b"x" * mib
        yield b"x" * (MAX_BODY_BYTES % mib + 1)

    r = httpx.post(f"{collector.api_url}/api/sql", content=chunks(), timeout=60)
    assert r.status_code == 413
    assert "larger than" in r.json()["error"]
    assert_serving(collector)


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
    (b"G(T /ready HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /re\x00ady HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /ready HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"POST /api/sql HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /api/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST /api/sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    # both framings at once: the request-smuggling shape; refused and the connection closed
    (b"POST /api/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"8\r\nSELECT 1\r\n0\r\n\r\n", 400),
    (b"POST /api/sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
], ids=["garbage", "header-without-colon", "bad-method", "nul-in-target", "no-host", "bad-content-length",
        "two-content-lengths", "bad-chunk", "cl-and-te", "unknown-transfer-encoding"])
def test_malformed_http_is_refused_and_the_server_keeps_serving(collector, data, status):
    resp = raw_http(collector, data)
    assert status_of(resp) == status, resp[:300]
    assert b"connection: close" in resp.lower()
    assert b'{"error": "bad request' in resp
    assert_serving(collector)


def test_hostile_header_line_is_refused_at_once(collector):
    """h11's header-line regex is quadratic in a run of whitespace before a bad byte: ~10 s of the
    server's only thread for one such 60 KB head with h11 alone. Refused in linear time
    (tracemesh/_h1fast.py), while the server keeps answering others."""
    head = b"GET /ready HTTP/1.1\r\nHost: x\r\nX:" + b" " * (MAX_HEADER_BYTES - 100) + b"\x00\r\n\r\n"
    t0 = time.monotonic()
    resp = raw_http(collector, head)
    assert status_of(resp) == 400, resp[:300]
    assert b"illegal header line" in resp
    assert time.monotonic() - t0 < 2  # h11 alone: ~10 s on this machine
    assert_serving(collector)


def test_oversized_request_head_is_431(collector):
    resp = raw_http(collector, b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (3 * MAX_HEADER_BYTES) + b"\r\n\r\n")
    assert status_of(resp) == 431
    assert_serving(collector)


def test_pipelined_requests_are_answered_in_order(collector):
    resp = raw_http(collector, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /api/sql?query=SELECT%207%20AS%20n&format=CSV HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    parts = resp.split(b"HTTP/1.1 ")[1:]
    assert [int(p.split()[0]) for p in parts] == [200, 200, 404]
    assert parts[0].endswith(b"ready\n") and parts[1].endswith(b"\r\n\r\n7\n")


def test_head_is_answered_with_headers_only_and_the_server_lives_on(collector):
    r = httpx.head(f"{collector.api_url}/ready")
    assert r.status_code == 200 and r.headers["content-length"] == "6" and r.content == b""
    assert httpx.head(f"{collector.api_url}/nope").status_code == 404
    # framing stays right on a kept-alive connection: HEAD's answer has no body, GET's follows
    resp = raw_http(collector, b"HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, get = resp.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200 ") and head.endswith(b"\r\n\r\n")
    assert get.startswith(b"200 ") and get.endswith(b"\r\n\r\nready\n")
    assert_serving(collector)


def test_expect_100_continue(collector):
    resp = raw_http(collector, b"POST /api/sql?format=CSV HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n"
                               b"Expect: 100-continue\r\nConnection: close\r\n\r\nSELECT 1")
    assert resp.startswith(b"HTTP/1.1 100 ")
    assert b"HTTP/1.1 200 " in resp and resp.endswith(b"\r\n\r\n1\n")


def test_client_that_vanishes_mid_body_costs_nothing(collector):
    with socket.create_connection(("127.0.0.1", collector.api_port)) as s:
        s.sendall(b"POST /api/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nSELECT")
    assert_serving(collector)


def test_slow_clients_that_never_finish_their_head_are_dropped(collector, slow_clients):
    # last in this file: the clients connected when the module started; everything above was served meanwhile
    for c in slow_clients:
        c.join(max(0.0, c.opened + HEADER_TIMEOUT_S * 2 - time.monotonic()))
    for c in slow_clients:
        kind = "trickling" if c.trickle else "silent"
        assert c.closed is not None, f"the {kind} client is still connected after {HEADER_TIMEOUT_S * 2}s"
        held = c.closed - c.opened
        assert HEADER_TIMEOUT_S - 1 <= held <= HEADER_TIMEOUT_S + 5, f"the {kind} client was held {held:.1f}s"
        assert c.got == b""  # closed, not answered
    assert_serving(collector)
