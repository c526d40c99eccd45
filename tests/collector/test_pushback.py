"""When the write-ahead log is full the collector pushes back, as OTLP says, and loses nothing it
acknowledged: gRPC RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with Retry-After."""

from __future__ import annotations

import os
import threading
import time

import grpc
import httpx
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from conftest import OTLP, Collector

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _big_request(trace_id: bytes) -> bytes:
    spans = [OTLP.span(f"op{i}", trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"), attrs={"pad": "x" * 2000})
             for i in range(150)]
    return OTLP.request(*spans, service="pushback").SerializeToString()  # ~320 KB


def test_a_full_log_pushes_back_and_everything_acknowledged_is_stored(tmp_path, tracemesh_cmd):
    c = Collector(tracemesh_cmd, tmp_path / "store", tmp_path / "c.log", otlp_http=True, extra=("--wal-max-mb", "1")).start()
    try:
        channel = grpc.insecure_channel(c.grpc_addr)
        export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        acked, refused, lock = [], [], threading.Lock()

        def send(n):
            for i in range(6):
                tid = os.urandom(12) + n.to_bytes(2, "big") + i.to_bytes(2, "big")
                try:
                    export(_big_request(tid), timeout=30)
                    with lock:
                        acked.append(tid.hex())
                except grpc.RpcError as exc:
                    with lock:
                        refused.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert refused, "72 exports of ~320 KB into a 1 MiB log: some must be pushed back"
        exc = refused[0]
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in exc.details()
        details = dict(exc.trailing_metadata())["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(details)
        info = error_details_pb2.RetryInfo()
        assert st.details[0].Unpack(info) and info.retry_delay.seconds >= 1

        # HTTP: keep sending until one is refused with 429
        got_429 = None
        for i in range(60):
            r = httpx.post(f"{c.http_url}/v1/traces", content=_big_request(os.urandom(16)),
                           headers={"content-type": "application/x-protobuf"}, timeout=30)
            if r.status_code == 429:
                got_429 = r
                break
            if r.status_code == 200 and i % 8 == 7:
                time.sleep(0.01)
        if got_429 is not None:  # the writer may drain faster than one client fills: then no 429 is due
            assert int(got_429.headers["retry-after"]) >= 1
            assert "storage is behind" in status_pb2.Status.FromString(got_429.content).message

        deadline = time.monotonic() + 60
        while c.stats()["pipeline"]["rows_queued"] and time.monotonic() < deadline:
            time.sleep(0.2)
        stored = {r["TraceId"] for r in c.rows("SELECT DISTINCT TraceId FROM otel_traces WHERE ServiceName = 'pushback'")}
        assert set(acked) <= stored
        assert c.stats()["pipeline"]["exports_refused"] >= len(refused)
    finally:
        c.stop()
