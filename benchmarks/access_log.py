"""What an access log record costs the sidecar, against what a span costs (the baseline, same run).

Two figures each, per request, on one core: the request path (building the queued tuple and
appending it to the bounded queue) and the exporter's worker thread (encoding the OTLP protobuf
bytes of a batch of 1,024, as sent). CPU time of this process, best of several rounds, so a busy
machine inflates it less. Prints JSON. ``python benchmarks/access_log.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tracemesh.proxy._accesslog import AccessEntry, AccessLog, encode_logs_fast
from tracemesh.proxy._recorder import KIND_CLIENT, SpanRecord, SpanRecorder, encode_request_fast

#: the attributes of a typical outbound mTLS request's span (what both records are made from)
ATTRS = {
    "http.request.method": "GET", "url.path": "/items/42", "url.query": "x=1", "url.scheme": "http",
    "network.protocol.version": "1.1", "mesh.direction": "outbound",
    "guid:x-request-id": "3f2c7c1e-8a2b-4b8e-9e0e-0d8f3f1b2a11", "user_agent.original": "python-httpx/0.27",
    "mesh.connection_security_policy": "mutual_tls", "mesh.source.service": "frontend",
    "mesh.source.version": "v1", "peer.service": "catalog", "mesh.destination.service": "catalog",
    "mesh.route": "catalog-default", "mesh.destination.version": "v2", "mesh.upstream.endpoint": "127.0.0.1:9080",
    "server.address": "catalog", "mesh.retries": 0,
    "mesh.source.principal": "spiffe://cluster.local/ns/default/sa/frontend",
    "mesh.destination.principal": "spiffe://cluster.local/ns/default/sa/catalog",
    "http.response.status_code": 200, "mesh.response_flags": "-", "http.request.body.size": 0,
    "http.response.body.size": 1024,
}
RESOURCE = {"service.name": "frontend", "service.version": "v1", "service.instance.id": "host:1",
            "mesh.component": "sidecar"}
TID, SID = os.urandom(16), os.urandom(8)


def _span() -> SpanRecord:
    return SpanRecord(TID, SID, SID, "GET catalog", KIND_CLIENT, time.time_ns(), time.time_ns(), ATTRS, 0, "", "")


def _entry() -> AccessEntry:
    return AccessEntry(time.time_ns(), 1_234_567, TID, SID, 1, ATTRS, 200, "-", 0, 1024, "catalog:80")


def _best_us(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        best = min(best, fn())
    return round(best / 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, rounds = (20_000, 5) if args.quick else (100_000, 9)

    def hot(queue_type, make):
        def run():
            q = queue_type(n + 1)
            t = time.process_time_ns()
            for _ in range(n):
                q.record(make())
            return (time.process_time_ns() - t) / n
        return run

    spans = [_span() for _ in range(1024)]
    entries = [_entry() for _ in range(1024)]

    def enc(f, batch):
        def run():
            t = time.process_time_ns()
            for _ in range(5):
                f(RESOURCE, "0.1", batch)
            return (time.process_time_ns() - t) / 5 / len(batch)
        return run

    out = {
        "request_path_us": {"span": _best_us(hot(SpanRecorder, _span), rounds),
                            "access_log": _best_us(hot(AccessLog, _entry), rounds)},
        "encode_us": {"span": _best_us(enc(encode_request_fast, spans), rounds),
                      "access_log": _best_us(enc(encode_logs_fast, entries), rounds)},
        "bytes": {"span": len(encode_request_fast(RESOURCE, "0.1", spans)) // 1024,
                  "access_log": len(encode_logs_fast(RESOURCE, "0.1", entries)) // 1024},
        "attributes": len(ATTRS),
        "load_average": os.getloadavg()[0],
    }
    for k in ("request_path_us", "encode_us", "bytes"):
        out[k]["ratio"] = round(out[k]["access_log"] / out[k]["span"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
