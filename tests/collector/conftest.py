"""Shared parts of the collector tests: OTLP message builders and a real collector process.

chdb allows one embedded data path per process, so every in-process store in this directory
opens the same session-scoped path (``chdb_dir``) and closes it when its module is done; anything
that needs a second opener runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from collector_proc import CollectorProcess

from tracemesh.net import free_port


# -- OTLP builders -------------------------------------------------------------------------------


class OTLP:
    """Builders for OTLP trace messages from plain Python values."""

    @staticmethod
    def value(v) -> AnyValue:
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
        if isinstance(v, (list, tuple)):
            return AnyValue(array_value=ArrayValue(values=[OTLP.value(x) for x in v]))
        if isinstance(v, dict):
            return AnyValue(kvlist_value=KeyValueList(values=OTLP.kvs(v)))
        raise TypeError(type(v))

    @staticmethod
    def kvs(d) -> list[KeyValue]:
        items = d.items() if isinstance(d, dict) else d
        return [KeyValue(key=k, value=OTLP.value(v)) for k, v in items]

    @staticmethod
    def span(name: str = "op", *, trace_id: bytes, span_id: bytes, parent: bytes = b"", kind: int = Span.SPAN_KIND_SERVER,
             start: int = 1_700_000_000_000_000_000, duration: int = 1_500_000, attrs=None, status: tuple | None = None,
             events=(), links=(), trace_state: str = "") -> Span:
        s = Span(name=name, trace_id=trace_id, span_id=span_id, parent_span_id=parent, kind=kind,
                 start_time_unix_nano=start, end_time_unix_nano=start + duration, trace_state=trace_state,
                 attributes=OTLP.kvs(attrs or {}))
        if status is not None:
            s.status.CopyFrom(Status(code=status[0], message=status[1]))
        for ev in events:  # (time, name, attrs)
            s.events.add(time_unix_nano=ev[0], name=ev[1], attributes=OTLP.kvs(ev[2]))
        for lk in links:  # (trace_id, span_id, trace_state, attrs)
            s.links.add(trace_id=lk[0], span_id=lk[1], trace_state=lk[2], attributes=OTLP.kvs(lk[3]))
        return s

    @staticmethod
    def request(*spans: Span, service: str | None = "svc", resource=None, scope=("test.scope", "1.0")) -> ExportTraceServiceRequest:
        res = dict(resource or {})
        if service is not None:
            res.setdefault("service.name", service)
        return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            resource=Resource(attributes=OTLP.kvs(res)),
            scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope[0], version=scope[1]), spans=list(spans))],
        )])


@pytest.fixture(scope="session")
def otlp() -> type[OTLP]:
    return OTLP


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory) -> Path:
    """The one embedded data path every in-process store of this test session opens."""
    return tmp_path_factory.mktemp("chdb") / "store"


# -- a real collector process --------------------------------------------------------------------


class Collector(CollectorProcess):
    """``tracemesh collector`` as a subprocess on free loopback ports, its output in a file."""

    def __init__(self, cmd: list[str], store: Path, log: Path, otlp_http: bool = False, extra: tuple[str, ...] = (),
                 env: dict | None = None) -> None:
        self.cmd, self.store, self.log = cmd, Path(store), Path(log)
        self.otlp_http, self.extra, self.env = otlp_http, tuple(extra), env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Collector":
        self.grpc_port, self.api_port = free_port(), free_port()
        self.grpc_addr = f"127.0.0.1:{self.grpc_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        http_addr = f"127.0.0.1:{free_port()}" if self.otlp_http else "off"
        self.http_url = f"http://{http_addr}"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.cmd, "collector", "--store", str(self.store), "--otlp-grpc", self.grpc_addr,
                 "--otlp-http", http_addr, "--api", f"127.0.0.1:{self.api_port}", *self.extra],
                stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )
        self.wait_http_ready()
        return self

    # -- the query API, through a real HTTP client --

    def sql(self, query: str, fmt: str = "JSON") -> httpx.Response:
        return httpx.post(f"{self.api_url}/api/sql", params={"format": fmt}, content=query.encode(), timeout=30)

    def rows(self, query: str) -> list[dict]:
        r = self.sql(query)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def wait_rows(self, query: str, n: int, timeout: float = 15.0) -> list[dict]:
        """Poll *query* until it returns at least *n* rows (data is stored within a flush interval)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(query)
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def stats(self) -> dict:
        r = httpx.get(f"{self.api_url}/api/stats", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def collector_factory(tmp_path_factory, tracemesh_cmd):
    """Start collectors that are stopped (SIGTERM, then kill) when the module is done."""
    started: list[Collector] = []

    def make(store: Path | None = None, extra: tuple[str, ...] = (), env: dict | None = None) -> Collector:
        base = tmp_path_factory.mktemp("collector")
        c = Collector(tracemesh_cmd, store or base / "store", base / "collector.log", extra=extra, env=env)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        try:
            c.stop(timeout=30)
        except Exception:
            c.kill()


@pytest.fixture(scope="session")
def run_tracemesh(tracemesh_cmd):
    """Run one ``tracemesh`` command to completion, as a user would from a shell."""

    def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([*tracemesh_cmd, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})

    return run
