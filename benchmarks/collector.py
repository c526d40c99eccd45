"""Collector ingest benchmark: OTLP/gRPC exporters -> durable in the embedded store.

Concurrent senders (separate processes, raw grpcio with pre-built requests, so the client's cost
does not land on the collector's CPU) export realistic spans: ~20 span attributes, resource
attributes, one event. The run ends when the target count is stored. The collector's CPU time
(all its threads, chdb's included) comes from /proc. The baseline, in the same run: the same rows,
already encoded, inserted straight into the same table in a fresh chdb, with the collector's insert
settings (the attribute-map indexes left to merges): the cost of storage alone, the ceiling for a
collector. It is measured from Arrow (ArrowStream, what the Python encoder hands
over) and from ClickHouse's Native format (what the C encoder hands over; built with it, so only when
it is built), each in its own process; the cheaper one is the baseline. It is measured again
after the collector's run, in the cheaper format, and the baseline is the mean of the two: this
machine's speed drifts by more than 10 % within minutes, and a baseline taken on one side of the
collector's run only moved the ratio with it (``raw_insert.before``, ``.after``).

    python benchmarks/collector.py [--quick] [--spans N] [--senders N]

``--pace SPANS_PER_S`` measures instead what a mesh's steady flow costs: one exporter sends that
many spans a second, open loop, for 120 s (30 with ``--quick``), and the collector's CPU is taken
in cores, ClickHouse's merges apart; the baseline, in the same run, is the same flow into tables
set to ClickHouse's own merge selector (``merge_selector_base`` 5, where the collector's migration
sets 10).

    python benchmarks/collector.py --pace 4000 [--quick]

``--layers`` measures the receiving side alone, layer by layer, with the bulk run's senders and
nothing stored: the receiver's gRPC server as the collector makes it, answering every export
unread, then the collector's receiver with each export checked, then also written to a write-ahead log (group
commit, segments released as a writer that keeps up would): the CPU a span costs each, split into
the handler threads and grpcio's own, and context switches per export; three rounds alternated
(one with ``--quick``). The collector's ``own_cpu_us_per_span_by_thread`` (handlers and grpcio)
compares with the last layer.

    python benchmarks/collector.py --layers [--quick] [--exports N]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SPANS_PER_EXPORT = 500
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_requests(n_requests: int, seed: int = 1) -> list[bytes]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    rnd = random.Random(seed)

    def kv(k, v):
        if isinstance(v, int):
            return KeyValue(key=k, value=AnyValue(int_value=v))
        return KeyValue(key=k, value=AnyValue(string_value=v))

    services = ["frontend", "catalog", "pricing", "checkout", "cart", "auth"]
    out = []
    for r in range(n_requests):
        svc = services[r % len(services)]
        spans = []
        trace_id = rnd.randbytes(16)
        t0 = time.time_ns()
        for i in range(SPANS_PER_EXPORT):
            if i % 10 == 0:
                trace_id = rnd.randbytes(16)
            start = t0 + i * 1000
            status = 500 if rnd.random() < 0.02 else 200
            attrs = [
                kv("http.request.method", rnd.choice(["GET", "POST", "PUT"])), kv("url.path", f"/api/v1/items/{rnd.randrange(10000)}"),
                kv("url.scheme", "http"), kv("url.query", f"page={rnd.randrange(50)}"),
                kv("http.response.status_code", status), kv("server.address", f"{svc}.default.svc.cluster.local"),
                kv("server.port", 8080), kv("network.protocol.version", "1.1"), kv("user_agent.original", "python-requests/2.32"),
                kv("client.address", f"10.0.{rnd.randrange(255)}.{rnd.randrange(255)}"), kv("http.request.body.size", rnd.randrange(5000)),
                kv("http.response.body.size", rnd.randrange(50000)), kv("mesh.direction", "inbound"),
                kv("mesh.source.service", rnd.choice(services)), kv("mesh.source.version", "v1"),
                kv("mesh.destination.service", svc), kv("mesh.destination.version", rnd.choice(["v1", "v2"])),
                kv("mesh.response_flags", "-"), kv("mesh.upstream.endpoint", f"10.1.0.{rnd.randrange(255)}:8080"),
                kv("guid:x-request-id", rnd.randbytes(16).hex()),
            ]
            spans.append(Span(
                trace_id=trace_id, span_id=rnd.randbytes(8), parent_span_id=rnd.randbytes(8) if i % 10 else b"",
                name=f"GET {svc}", kind=2, start_time_unix_nano=start, end_time_unix_nano=start + rnd.randrange(10**5, 10**8),
                attributes=attrs, events=[Span.Event(time_unix_nano=start + 500, name="request.sent",
                                                     attributes=[kv("bytes", rnd.randrange(5000))])],
                status=Status(code=2 if status >= 500 else 0),
            ))
        res = Resource(attributes=[kv("service.name", svc), kv("service.version", "v1"), kv("service.namespace", "shop"),
                                   kv("host.name", f"node-{r % 7}"), kv("k8s.pod.name", f"{svc}-7d9f8-{r % 13}"),
                                   kv("telemetry.sdk.name", "opentelemetry"), kv("telemetry.sdk.language", "python")])
        req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=res, scope_spans=[ScopeSpans(spans=spans)])])
        out.append(req.SerializeToString())
    return out


def _sender(target: str, payloads: list[bytes], n_exports: int, threads: int, q) -> None:
    import threading

    import grpc

    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
    lat: list[float] = []
    errors = [0]
    counter = iter(range(n_exports))
    lock = threading.Lock()

    def run():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            while True:  # as OTLP exporters do: retry what was pushed back, until acknowledged
                try:
                    export(payloads[i % len(payloads)], timeout=30)
                    break
                except grpc.RpcError:
                    errors[0] += 1
                    time.sleep(0.1)
            lat.append(time.perf_counter() - t)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((lat, errors[0]))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def _minor_faults(pid: int) -> int:
    """Minor page faults of all of *pid*'s threads so far, ended ones included."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """Each live thread of *pid*: its name, its CPU so far (clock ticks) and its minor page faults."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(task.name)] = (comm, int(fields[11]) + int(fields[12]), int(fields[7]))
    return out


def _named_cpu_s(before: dict, after: dict, prefixes: tuple[str, ...], *, invert: bool = False) -> float:
    """CPU between two :func:`_thread_ticks` snapshots of the threads named with *prefixes* (or, with
    *invert*, of all the others); a thread that ended in between is not counted."""
    return _named_sum(before, after, prefixes, 1, invert) / CLK_TCK


def _named_faults(before: dict, after: dict, prefixes: tuple[str, ...], *, invert: bool = False) -> int:
    """Minor page faults between two :func:`_thread_ticks` snapshots, as :func:`_named_cpu_s` counts CPU."""
    return _named_sum(before, after, prefixes, 2, invert)


def _named_sum(before: dict, after: dict, prefixes: tuple[str, ...], field: int, invert: bool) -> int:
    return sum(v[field] - before.get(tid, (v[0], 0, 0))[field] for tid, v in after.items()
               if v[0].startswith(prefixes) != invert)


#: Thread names of ClickHouse's (chdb's) pools. Every other thread is the collector's own: Python's
#: threads keep the process's name, grpcio and Trio name theirs. ClickHouse's pools start and end
#: threads as they go, so its share is the process's CPU less the collector's own (long-lived) threads.
CLICKHOUSE_THREADS = ("ThreadPool", "MergeMutate", "RuntimeData", "jemalloc", "MemoryWorker", "BgSch", "BgMBSch",
                      "BgDistSch", "Fetch", "Move", "Common", "SystemLog", "AsyncLoader", "QueryPipeline")


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _sql(api: str, sql: str):
    req = urllib.request.Request(f"{api}/api/sql?format=JSON", data=sql.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["data"]


def _start_collector(workdir: Path, store: str = "store"):
    """A collector on a store under *workdir*, ready: (process, gRPC port, API URL, its log file)."""
    grpc_port, api_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{api_port}"
    log = open(workdir / f"{store}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tracemesh", "collector", "--store", str(workdir / store),
                             "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--otlp-http", "off", "--api", f"127.0.0.1:{api_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{api}/ready", timeout=1)
            return proc, grpc_port, api, log
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                raise RuntimeError((workdir / f"{store}.log").read_text()) from None
            time.sleep(0.1)


def _start_senders(port: int, payloads: list[bytes], n_exports: int, senders: int, q) -> list[mp.Process]:
    """*senders* processes of 4 threads each, exporting *n_exports* in all to *port*; each puts its
    (latencies, retries) on *q* when done."""
    per = [n_exports // senders + (1 if i < n_exports % senders else 0) for i in range(senders)]
    procs = [mp.Process(target=_sender, args=(f"127.0.0.1:{port}", payloads, n, 4, q)) for n in per]
    for p in procs:
        p.start()
    return procs


def measure_collector(payloads: list[bytes], n_exports: int, senders: int, workdir: Path) -> dict:
    proc, grpc_port, api, log = _start_collector(workdir)
    try:
        cpu0, faults0, threads0, t0 = _cpu_s(proc.pid), _minor_faults(proc.pid), _thread_ticks(proc.pid), time.perf_counter()
        q = mp.Queue()
        procs = _start_senders(grpc_port, payloads, n_exports, senders, q)
        target = n_exports * SPANS_PER_EXPORT
        last_print = 0.0
        while True:
            stored = _get(f"{api}/api/stats")["pipeline"]["rows_stored"]
            now = time.perf_counter()
            if now - last_print > 2:
                print(f"  stored {stored}/{target} spans", file=sys.stderr, flush=True)
                last_print = now
            if stored >= target:
                break
            if now - t0 > (60 if os.environ.get("BENCH_DEBUG") else 600):
                st = _get(f"{api}/api/stats")
                raise RuntimeError(f"the collector did not store the spans in time: {st}\n"
                                   + (workdir / "store.log").read_text()[-3000:])
            time.sleep(0.2)  # the collector answers these polls on the CPU we measure: not too often
        wall, cpu, threads1 = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0, _thread_ticks(proc.pid)
        faults = _minor_faults(proc.pid) - faults0
        merge_cpu = _named_cpu_s(threads0, threads1, ("MergeMutate",))  # ClickHouse's merges
        own_cpu = _named_cpu_s(threads0, threads1, CLICKHOUSE_THREADS, invert=True)
        handlers = _named_cpu_s(threads0, threads1, ("otlp-grpc",))
        writer = _named_cpu_s(threads0, threads1, ("store-writer",))
        own_faults = _named_faults(threads0, threads1, CLICKHOUSE_THREADS, invert=True)
        handler_faults = _named_faults(threads0, threads1, ("otlp-grpc",))
        writer_faults = _named_faults(threads0, threads1, ("store-writer",))
        pipeline = _get(f"{api}/api/stats")["pipeline"]
        inserts = pipeline["inserts"]
        lat, errors = [], 0
        for _ in procs:
            l, e = q.get()
            lat += l
            errors += e
        for p in procs:
            p.join()
        lat.sort()
        parts = _sql(api, "SELECT sum(bytes_on_disk) AS b, sum(rows) AS r FROM system.parts "
                          "WHERE table = 'otel_traces' AND active")[0]
        return {
            "spans": target, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "spans_per_s": round(target / wall), "spans_per_cpu_s": round(target / cpu),
            # ClickHouse's merges that ran during the run (counted in cpu_s): the baseline's inserts
            # run back to back and are measured before most of theirs
            "merge_cpu_s": round(merge_cpu, 2), "spans_per_cpu_s_without_merges": round(target / max(cpu - merge_cpu, 1e-9)),
            # the ratio's two sides per span: receiving, logging, checking and encoding (ours: all but
            # CLICKHOUSE_THREADS) against ClickHouse's inserting and merging (the rest of the process)
            "own_cpu_us_per_span": round(own_cpu / target * 1e6, 2),
            "clickhouse_cpu_us_per_span": round((cpu - own_cpu) / target * 1e6, 2),
            # ours by thread (the collector names them): the export handlers (checking, logging,
            # waiting for the sync), the store writer (reading back, encoding, handing the block to
            # chdb), and the rest, nearly all grpcio's own threads receiving the messages
            "own_cpu_us_per_span_by_thread": {
                "otlp_grpc_handlers": round(handlers / target * 1e6, 2),
                "store_writer": round(writer / target * 1e6, 2),
                "grpc_core_and_other": round((own_cpu - handlers - writer) / target * 1e6, 2)},
            # first touches of memory: each a few µs of system time (~2.5 on this project's VM)
            "minor_faults_per_span_by_thread": {
                "otlp_grpc_handlers": round(handler_faults / target, 3),
                "store_writer": round(writer_faults / target, 3),
                "grpc_core_and_other": round((own_faults - handler_faults - writer_faults) / target, 3),
                "clickhouse": round((faults - own_faults) / target, 3)},
            "p50_export_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_export_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
            "export_retries": errors, "inserts": inserts, "spans_per_insert": round(target / max(inserts, 1)),
            # exports that waited only in the write-ahead log (memory was at its bound) and were read back
            "exports_read_back": pipeline["records_read_back"],
            "peak_rss_mb": round(_rss_peak_mb(proc.pid), 1),
            "bytes_per_span": round(int(parts["b"]) / max(int(parts["r"]), 1), 1),
        }
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


_RAW = r'''
import sys, time, json
from chdb import session
sys.path.insert(0, ".")
from tracemesh.collector._encode import SpanColumns, encode_traces
from tracemesh.collector._store import spans_to_arrow, _arrow_stream, settings_sql
from tracemesh.collector._schema import insert_settings
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
# 200 exports (100k rows) an insert: as large as the collector's largest (~90k spans), and cheaper per
# row than 50k-row inserts (measured: ~230k against ~150k rows per CPU-second before merges)
fmt, n_exports, batch = sys.argv[2], int(sys.argv[3]), 200
payloads = [open(p, "rb").read() for p in sys.argv[4:]]
s = session.Session(sys.argv[1])
# the collector's tables as its migrations leave them (table settings included), not just their DDL
from tracemesh.collector._migrations import migrate
migrate(lambda q: s.query(q), lambda q, fmt="TSVRaw": s.query(q, fmt).bytes())
streams = []
for i in range(0, n_exports, batch):  # the rows already encoded, as a collector would hand them over
    run = [payloads[j % len(payloads)] for j in range(i, min(i + batch, n_exports))]
    if fmt == "Native":
        from tracemesh.collector import _otlpc
        streams.append(_otlpc.encode(run))
        continue
    cols = SpanColumns()
    for p in run:
        req = ExportTraceServiceRequest(); req.ParseFromString(p)
        encode_traces(req, cols)
    streams.append((len(cols), _arrow_stream(spans_to_arrow(cols))))
import os
def merge_cpu():  # this process's ClickHouse merge threads (named MergeMutate)
    total = 0
    for t in os.listdir("/proc/self/task"):
        try:
            if open(f"/proc/self/task/{t}/comm").read().startswith("MergeMutate"):
                f = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")
c0, m0, t0 = time.process_time(), merge_cpu(), time.perf_counter()
rows = 0
for i, (n, data) in enumerate(streams):
    # a deduplication token, as the collector's inserts carry: without one, a table with a
    # deduplication window hashes every block's data to make its own
    with s.send_insert("INSERT INTO otel_traces" + settings_sql(insert_settings("otel_traces", f"raw:{i}")), fmt) as ins:
        ins.append(data); ins.finish()
    rows += n
cpu, merges, wall = time.process_time() - c0, merge_cpu() - m0, time.perf_counter() - t0
# then until ClickHouse has merged the parts these inserts made (the collector's CPU includes the
# merges that run while it works; this figure is reported beside the baseline, not as it)
quiet, deadline = 0, time.monotonic() + 60
while quiet < 10 and time.monotonic() < deadline:
    merging = int(s.query("SELECT count() FROM system.merges", "CSV").bytes().strip() or 0)
    quiet = 0 if merging else quiet + 1
    time.sleep(0.1)
merged_cpu = time.process_time() - c0
print(json.dumps({"rows": rows, "cpu_s": cpu, "wall_s": wall, "cpu_s_with_merges": merged_cpu, "merge_cpu_s": merges}))
'''


def _have_c_encoder() -> bool:
    try:
        from tracemesh.collector import _otlpc  # noqa: F401
    except ImportError:
        return False
    return True


_SET_MERGE_BASE = r'''
import sys
from tracemesh.collector._migrations import merge_selector
from tracemesh.collector._store import EmbeddedStore
st = EmbeddedStore(sys.argv[1])
st.ensure_schema()
for sql in merge_selector(int(sys.argv[2])):
    st.execute(sql)
st.close()
'''
#: ClickHouse's own merge_selector_base, the pace mode's baseline.
CLICKHOUSE_MERGE_SELECTOR_BASE = 5


def measure_pace(payloads: list[bytes], spans_per_s: int, seconds: float, workdir: Path, tag: str,
                 merge_selector_base: int | None = None) -> dict:
    """A collector's CPU while one exporter sends *spans_per_s* (in 500-span exports, open loop) for
    *seconds*: a mesh's steady flow, where ClickHouse's merges of many small parts dominate. With
    *merge_selector_base*, the store is made with the tables set to it first (the baseline: the
    collector's own migration sets MERGE_SELECTOR_BASE, and a migration already applied is not redone)."""
    import grpc

    store = f"pace-{tag}"
    if merge_selector_base is not None:
        subprocess.run([sys.executable, "-c", _SET_MERGE_BASE, str(workdir / store), str(merge_selector_base)],
                       check=True, capture_output=True, timeout=120)
    proc, grpc_port, api, log = _start_collector(workdir, store)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            export = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                    request_serializer=None, response_deserializer=lambda b: b)
            export(payloads[0], timeout=30)
            time.sleep(2)  # the first insert and its warm-up, outside the measure
            interval = SPANS_PER_EXPORT / spans_per_s
            cpu0, threads0, t0 = _cpu_s(proc.pid), _thread_ticks(proc.pid), time.monotonic()
            sent = 0
            while time.monotonic() - t0 < seconds:
                wait = t0 + sent * interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                export(payloads[sent % len(payloads)], timeout=30)
                sent += 1
            wall = time.monotonic() - t0
            cpu, threads1 = _cpu_s(proc.pid) - cpu0, _thread_ticks(proc.pid)
        merges = _named_cpu_s(threads0, threads1, ("MergeMutate",))
        own = _named_cpu_s(threads0, threads1, CLICKHOUSE_THREADS, invert=True)
        parts = _sql(api, "SELECT count() AS n FROM system.parts WHERE table = 'otel_traces' AND active")[0]["n"]
        ddl = _sql(api, "SHOW CREATE TABLE otel_traces")[0]["statement"]
        table_base = re.search(r"merge_selector_base = (\d+)", ddl)
        return {"merge_selector_base": int(table_base.group(1)) if table_base else None,
                "spans_per_s": round(sent * SPANS_PER_EXPORT / wall), "seconds": round(wall, 1),
                "cores": round(cpu / wall, 3), "merge_cores": round(merges / wall, 3), "own_cores": round(own / wall, 3),
                "cpu_us_per_span": round(cpu / (sent * SPANS_PER_EXPORT) * 1e6, 1),
                "active_parts_at_end": int(parts)}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


_LAYER_SERVER = r"""
import sys, tempfile, threading
from tracemesh._proc import KEEP_FREED_MAX_BYTES, freeze_startup_objects, keep_freed_memory
from tracemesh.collector._grpc import MAX_MESSAGE_BYTES, start_grpc
from tracemesh.collector._otlp import use_native_traces
layer, workdir = sys.argv[1], sys.argv[2]

class Pipeline:  # the receiver's side of tracemesh.collector._pipeline.Pipeline, nothing stored
    def __init__(self):
        self.wal = None
        if layer == "wal":
            from tracemesh.collector._wal import WAL
            self.wal = WAL(tempfile.mkdtemp(dir=workdir))
            self.lock = threading.Lock()
    def submit(self, kind, payload, batches, rejected=0, on_durable=None):
        if self.wal is None:
            if on_durable is not None:
                on_durable(None)
            return
        seq = self.wal.append(kind, payload, on_durable=on_durable)
        if seq % 32 == 0:  # as a writer that keeps up: segments released, their files reused
            with self.lock:
                self.wal.release(min(seq, self.wal.durable))

use_native_traces(True)  # as the collector on its embedded store (the C check when it is built)
# grpcio: the receiver's server answering every export unread; else as the collector, which checks
# each export and (wal) logs it
server, port = start_grpc("127.0.0.1:0", Pipeline(), bare=layer == "grpcio")
freeze_startup_objects()
keep_freed_memory(min(MAX_MESSAGE_BYTES, KEEP_FREED_MAX_BYTES))  # as the collector does
print(port, flush=True)
server.wait_for_termination()
"""
#: The receiver's layers (``--layers``): grpcio's bare server, then the collector's check of each
#: export, then its write-ahead log; each with what the layer before it had.
LAYERS = ("grpcio", "check", "wal")


def _ctx_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary and not
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def measure_layer(layer: str, payloads: list[bytes], n_exports: int, senders: int, workdir: Path) -> dict:
    """The CPU a span costs a receiver made of *layer* and the layers before it (see LAYERS), with
    the bulk run's senders: the whole process, its handler threads, and the rest (grpcio's core
    and polling threads); and the context switches of all its threads, per export."""
    proc = subprocess.Popen([sys.executable, "-c", _LAYER_SERVER, layer, str(workdir)], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        q = mp.Queue()
        for warm in _start_senders(port, payloads, 50, 1, q):
            q.get()
            warm.join()
        cpu0, threads0, ctx0 = _cpu_s(proc.pid), _thread_ticks(proc.pid), _ctx_switches(proc.pid)
        procs = _start_senders(port, payloads, n_exports, senders, q)
        errors = sum(q.get()[1] for _ in procs)
        for p in procs:
            p.join()
        cpu, threads1, ctx1 = _cpu_s(proc.pid) - cpu0, _thread_ticks(proc.pid), _ctx_switches(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    spans = n_exports * SPANS_PER_EXPORT
    handlers = _named_cpu_s(threads0, threads1, ("otlp-grpc",))
    return {"cpu_us_per_span": round(cpu / spans * 1e6, 2), "handlers_us_per_span": round(handlers / spans * 1e6, 2),
            "grpc_core_and_other_us_per_span": round((cpu - handlers) / spans * 1e6, 2),
            "context_switches_per_export": round((ctx1 - ctx0) / n_exports, 1), "errors": errors}


def measure_layers(payloads: list[bytes], n_exports: int, senders: int, workdir: Path, rounds: int) -> dict:
    """:func:`measure_layer` for every layer, *rounds* times alternated (this machine's speed drifts)."""
    runs: dict[str, list[dict]] = {layer: [] for layer in LAYERS}
    for r in range(rounds):
        for layer in LAYERS:
            print(f"layers: {layer}, round {r + 1} of {rounds}", file=sys.stderr)
            runs[layer].append(measure_layer(layer, payloads, n_exports, senders, workdir))
    return {layer: {**{k: [m[k] for m in ms] for k in ms[0] if k != "errors"}, "errors": sum(m["errors"] for m in ms)}
            for layer, ms in runs.items()}


def write_payloads(payloads: list[bytes], workdir: Path) -> list[str]:
    """The requests as files, for the raw-insert processes to read."""
    files = []
    for i, p in enumerate(payloads):
        f = workdir / f"req{i}.pb"
        f.write_bytes(p)
        files.append(str(f))
    return files


def measure_raw_insert(files: list[str], n_exports: int, workdir: Path, formats: tuple[str, ...] | None = None,
                       tag: str = "") -> dict:
    """The same rows (the requests in *files*) inserted straight into chdb, from ArrowStream and
    (with the C encoder built) from Native (or only *formats*), each in a fresh store and process;
    the cheaper one is the baseline."""
    out = {}
    if formats is None:
        formats = ("ArrowStream", "Native") if _have_c_encoder() else ("ArrowStream",)
    for fmt in formats:
        r = subprocess.run([sys.executable, "-c", _RAW, str(workdir / f"raw-{fmt}{tag}"), fmt, str(n_exports), *files],
                           capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        out[fmt] = {"rows": m["rows"], "cpu_s": round(m["cpu_s"], 2), "rows_per_cpu_s": round(m["rows"] / m["cpu_s"]),
                    "rows_per_cpu_s_with_merges": round(m["rows"] / m["cpu_s_with_merges"]),
                    "merge_cpu_s": round(m["merge_cpu_s"], 2),
                    "rows_per_cpu_s_without_merges": round(m["rows"] / max(m["cpu_s"] - m["merge_cpu_s"], 1e-9))}
    fmt = max(out, key=lambda f: out[f]["rows_per_cpu_s"])
    return {**out[fmt], "format": fmt, "from": out}


def _bracketed(before: dict, after: dict) -> dict:
    """The baseline from the runs before and after the collector's (same format): the mean of
    their rates (and of their other rates), each kept beside it."""
    mean = {k: round((before[k] + after[k]) / 2) for k in
            ("rows_per_cpu_s", "rows_per_cpu_s_with_merges", "rows_per_cpu_s_without_merges")}
    return {**before, **mean, "before": before["rows_per_cpu_s"], "after": after["rows_per_cpu_s"],
            "spread": round(abs(before["rows_per_cpu_s"] - after["rows_per_cpu_s"]) / mean["rows_per_cpu_s"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    ap.add_argument("--spans", type=int, default=None, help="spans to store (default 1,000,000; --quick 200,000)")
    ap.add_argument("--senders", type=int, default=2, help="sender processes, 4 threads each (default 2)")
    ap.add_argument("--pace", type=int, default=None, metavar="SPANS_PER_S",
                    help="instead: the collector's CPU at a steady flow of this many spans a second (a mesh's "
                         "pace, e.g. 4000), against the same with ClickHouse's default merge selector")
    ap.add_argument("--layers", action="store_true",
                    help="instead: what the receiver's layers cost a span (grpcio's bare server, the check of "
                         "each export, the write-ahead log), nothing stored")
    ap.add_argument("--exports", type=int, default=None, help="with --layers: exports a layer receives "
                                                              "(default 2,000; --quick 400)")
    args = ap.parse_args()
    if args.layers:
        n_exports = args.exports or (400 if args.quick else 2000)
        payloads = build_requests(64)
        with tempfile.TemporaryDirectory(prefix="tracemesh-bench-") as tmp:
            layers = measure_layers(payloads, n_exports, args.senders, Path(tmp), 1 if args.quick else 3)
        print(json.dumps({"benchmark": "collector-layers", "quick": args.quick, "cpus": os.cpu_count(),
                          "exports": n_exports, "spans_per_export": SPANS_PER_EXPORT, "layers": layers}, indent=2))
        return
    if args.pace:
        seconds = 30 if args.quick else 120
        payloads = build_requests(64)
        with tempfile.TemporaryDirectory(prefix="tracemesh-bench-") as tmp:
            print(f"baseline: {args.pace} spans/s for {seconds} s, ClickHouse's merge selector", file=sys.stderr)
            base = measure_pace(payloads, args.pace, seconds, Path(tmp), "baseline", CLICKHOUSE_MERGE_SELECTOR_BASE)
            print(f"collector: {args.pace} spans/s for {seconds} s, as it sets up its tables", file=sys.stderr)
            ours = measure_pace(payloads, args.pace, seconds, Path(tmp), "collector")
        print(json.dumps({"benchmark": "collector-pace", "quick": args.quick, "cpus": os.cpu_count(),
                          "cores": ours["cores"], "baseline_cores": base["cores"],
                          "ratio_to_default_merges": round(ours["cores"] / base["cores"], 3),
                          "collector": ours, "baseline_default_merges": base}, indent=2))
        return
    spans = args.spans or (200_000 if args.quick else 1_000_000)
    n_exports = max(1, spans // SPANS_PER_EXPORT)
    print(f"building {min(n_exports, 64)} distinct requests of {SPANS_PER_EXPORT} spans", file=sys.stderr)
    payloads = build_requests(min(n_exports, 64))
    with tempfile.TemporaryDirectory(prefix="tracemesh-bench-") as tmp:
        tmp = Path(tmp)
        print("baseline: raw chdb insert of the same rows", file=sys.stderr)
        files = write_payloads(payloads, tmp)
        raw = measure_raw_insert(files, n_exports, tmp)
        print(f"collector: {n_exports} exports over gRPC until stored", file=sys.stderr)
        ours = measure_collector(payloads, n_exports, args.senders, tmp)
        print(f"baseline again ({raw['format']}), after the collector's run", file=sys.stderr)
        after = measure_raw_insert(files, n_exports, tmp, formats=(raw["format"],), tag="-after")
        raw = _bracketed(raw, after)
    result = {
        "benchmark": "collector", "quick": args.quick, "cpus": os.cpu_count(),
        "spans_per_cpu_s": ours["spans_per_cpu_s"],
        "raw_insert_rows_per_cpu_s": raw["rows_per_cpu_s"],
        "raw_insert_arrow_rows_per_cpu_s": raw["from"]["ArrowStream"]["rows_per_cpu_s"],
        "raw_insert_native_rows_per_cpu_s": raw["from"].get("Native", {}).get("rows_per_cpu_s"),
        # the same inserts until ClickHouse has merged their parts (the collector pays merges too)
        "raw_insert_with_merges_rows_per_cpu_s": raw["rows_per_cpu_s_with_merges"],
        "ratio_to_raw_insert": round(ours["spans_per_cpu_s"] / raw["rows_per_cpu_s"], 3),
        # like for like, both without the merges that ran during their runs (not the target's ratio)
        "ratio_without_merges": round(ours["spans_per_cpu_s_without_merges"] / raw["rows_per_cpu_s_without_merges"], 3),
        "p99_export_ms": ours["p99_export_ms"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "bytes_per_span": ours["bytes_per_span"],
        "c_encoder": _have_c_encoder(),
        "collector": ours, "raw_insert": raw,
        "request_bytes_per_span": round(sum(map(len, payloads)) / (len(payloads) * SPANS_PER_EXPORT), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
