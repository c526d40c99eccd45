"""The demo's script: start the mesh, drive load with progress, stop, and show the traces."""

from __future__ import annotations

import http.client
import json
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tracemesh.demo._mesh import LocalMesh
from tracemesh.query import QueryError
from tracemesh.query.cli import query_api, stats_api
from tracemesh.query.render import SpanRow, table, waterfall

LOAD_WORKERS = 8
SPAN_SETTLE_TIMEOUT_S = 20.0


@dataclass
class LoadStats:
    sent: int = 0
    failed: int = 0
    errors: int = 0  # transport errors (no HTTP answer at all)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()


def _drive(entry: str, rps: float, seconds: float, stats: LoadStats, stop: threading.Event, show,
           context=None) -> None:
    """Open-loop load at *rps* spread over worker threads, each with a kept-alive connection
    (over mTLS with *context*, an ``ssl.SSLContext``, when given)."""
    host, _, port = entry.rpartition(":")
    interval = LOAD_WORKERS / rps
    t_start = time.monotonic()
    t_end = t_start + seconds

    def worker(n: int) -> None:
        conn = (http.client.HTTPSConnection(host, int(port), timeout=10, context=context) if context is not None
                else http.client.HTTPConnection(host, int(port), timeout=10))
        next_at = t_start + n * interval / LOAD_WORKERS
        while not stop.is_set():
            now = time.monotonic()
            if now >= t_end:
                return
            if next_at > now:
                stop.wait(next_at - now)
                continue
            next_at += interval
            path = "/" if random.random() < 0.8 else f"/item/{random.choice(('lamp', 'desk', 'rug'))}"
            ok = False
            try:
                conn.request("GET", path, headers={"User-Agent": "tracemesh-demo-load"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status < 500
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
            except (http.client.HTTPException, OSError):
                conn.close()
                with stats.lock:
                    stats.errors += 1
            with stats.lock:
                stats.sent += 1
                stats.failed += not ok

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(LOAD_WORKERS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        show(min(time.monotonic() - t_start, seconds))
        for t in threads:
            t.join(timeout=0.25)
            break
    show(seconds)


def _progress_printer(seconds: float, stats: LoadStats):
    tty = sys.stderr.isatty()
    last = [-10.0]

    def show(elapsed: float) -> None:
        if last[0] >= seconds:
            return  # the final line is out; threads still finishing their last request print nothing more
        width = 30
        filled = int(width * elapsed / seconds) if seconds else width
        line = (f"  load [{'#' * filled}{'.' * (width - filled)}] {elapsed:5.1f}/{seconds:.0f}s  "
                f"sent {stats.sent}  failed {stats.failed}  ({stats.sent / max(elapsed, 1e-9):.0f} req/s)")
        if tty:
            sys.stderr.write("\r" + line)
            if elapsed >= seconds:
                last[0] = elapsed
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif elapsed - last[0] >= 5 or elapsed >= seconds:
            last[0] = elapsed
            print(line, file=sys.stderr, flush=True)

    return show


def _sql(api: str, sql: str) -> list[dict]:
    return json.loads(query_api(api, sql, "JSON"))["data"]


def _wait_for_spans(api: str) -> int:
    """Wait until what the collector acknowledged is stored and the span count has stopped growing
    (the workloads' exporters flush as they stop)."""
    deadline = time.monotonic() + SPAN_SETTLE_TIMEOUT_S
    last = -1
    while True:
        queued = int(stats_api(api)["pipeline"]["rows_queued"])  # acknowledged, not stored yet
        n = int(_sql(api, "SELECT count() AS n FROM otel_traces")[0]["n"])
        if (n == last and not queued) or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.25 if queued else 0.5)


def identities(certs, api: str) -> str:
    """Each workload's identity and the certificate its sidecar presented, then who called whom as
    the sidecars verified it (the peer identities on the inbound spans)."""
    out = ["\nworkload identities (STRICT mTLS; certificates from the mesh CA, renewed at half-life):"]
    out.append(table(["workload", "identity (SPIFFE ID)", "certificate expires"],
                     [[c.workload, c.identity, c.not_after] for c in certs]))
    rows = _sql(api, """
        SELECT SpanAttributes['mesh.source.principal'] AS source, ServiceName AS destination,
               SpanAttributes['mesh.connection_security_policy'] AS security, count() AS requests
        FROM otel_traces
        WHERE SpanKind = 'Server' AND ScopeName = 'tracemesh.proxy'
        GROUP BY source, destination, security ORDER BY destination, source""")
    out.append("\ncallers as each sidecar verified them (inbound SERVER spans):")
    out.append(table(["source principal", "destination", "security", "requests"],
                     [[r["source"] or "-", r["destination"], r["security"] or "-", r["requests"]] for r in rows],
                     right=[3]))
    return "\n".join(out)


def _proxy_status(api: str) -> str:
    """``tracemesh proxy-status`` while the sidecars still run: where each took its config from."""
    from tracemesh._control_cli import fetch_proxies, render

    try:
        doc = fetch_proxies(api)
    except OSError as exc:
        return f"\nconfig distribution: cannot ask the collector: {exc}"
    return "\n\nconfig from the control plane (`tracemesh proxy-status`; mesh.yaml applied, endpoints registered " \
           "by the sidecars):\n" + render(doc)


def summarize(api: str, seconds: float) -> tuple[str, str | None]:
    """The demo's report from the store, through the collector's query API; and the trace it drew."""
    out: list[str] = []
    traces = _sql(api, """
        SELECT uniqExact(TraceId) AS traces,
               countIf(services >= 3) AS deep
        FROM (SELECT TraceId, uniqExact(ServiceName) AS services FROM otel_traces GROUP BY TraceId)""")[0]
    out.append(f"traces stored: {traces['traces']}, of which {traces['deep']} cross 3 or more services")
    rows = _sql(api, f"""
        SELECT ServiceName AS service,
               ResourceAttributes['service.version'] AS version,
               count() AS requests,
               round(count() / {max(seconds, 1e-9)}, 1) AS rps,
               countIf(StatusCode = 'Error') AS errors,
               round(quantile(0.5)(Duration) / 1e6, 2) AS p50,
               round(quantile(0.99)(Duration) / 1e6, 2) AS p99
        FROM otel_traces
        WHERE SpanKind = 'Server' AND ScopeName = 'tracemesh.proxy'
        GROUP BY service, version ORDER BY service, version""")
    out.append("\nrequests served, as each workload's sidecar saw them (inbound SERVER spans):")
    out.append(table(
        ["service", "version", "requests", "req/s", "errors", "error %", "p50 ms", "p99 ms"],
        [[r["service"], r["version"], r["requests"], r["rps"], r["errors"],
          f"{100 * int(r['errors']) / max(int(r['requests']), 1):.1f}", r["p50"], r["p99"]] for r in rows],
        right=range(2, 8),
    ))
    pick = _sql(api, """
        SELECT TraceId, uniqExact(ServiceName) AS services, count() AS spans
        FROM otel_traces
        GROUP BY TraceId
        HAVING services >= 3
        ORDER BY services DESC, spans DESC, max(Timestamp) DESC
        LIMIT 1""")
    trace_id = pick[0]["TraceId"] if pick else None
    if trace_id:
        spans = _sql(api, f"""
            SELECT SpanId, ParentSpanId, ServiceName, SpanName, SpanKind,
                   toUnixTimestamp64Nano(Timestamp) AS start, Duration, StatusCode
            FROM otel_traces WHERE TraceId = '{trace_id}'""")
        out.append("\none trace, as a waterfall:")
        out.append(waterfall(trace_id, [
            SpanRow(s["SpanId"], s["ParentSpanId"], s["ServiceName"], s["SpanName"], s["SpanKind"],
                    int(s["start"]), int(s["Duration"]), s["StatusCode"] == "Error") for s in spans
        ]))
    return "\n".join(out), trace_id


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(seconds: float = 20.0, store: str | None = None, rps: float = 40.0) -> int:
    if seconds <= 0 or rps <= 0:
        print("tracemesh demo: --seconds and --rps must be positive", file=sys.stderr)
        return 2
    store_path = Path(store or f"tracemesh-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    # SIGTERM to the demo is handled like Ctrl-C: stop every process, keep the store.
    signal.signal(signal.SIGTERM, _interrupt)
    stats = LoadStats()
    with tempfile.TemporaryDirectory(prefix="tracemesh-demo-") as work:
        mesh = LocalMesh(store=store_path, workdir=Path(work))
        say = lambda msg: print(f"tracemesh demo: {msg}", file=sys.stderr, flush=True)  # noqa: E731
        try:
            mesh.start(progress=say)
            say(f"mesh up: collector {mesh.otlp} (OTLP/gRPC), query API {mesh.api_url}, store {store_path}")
            say(f"driving {rps:g} req/s into frontend via its sidecar at {mesh.entry.inbound} for {seconds:g}s "
                f"(catalog v1/v2 split 80/20)")
            stop = threading.Event()
            _drive(str(mesh.entry.inbound), rps, seconds, stats, stop, _progress_printer(seconds, stats),
                   context=mesh.client_context())
            mesh.check_alive()
            certs = mesh.presented_certs()
            proxies = _proxy_status(mesh.api_url)
            say("stopping workloads (their sidecars and SDKs flush spans)")
            mesh.stop_workloads()
            stored = _wait_for_spans(mesh.api_url)
            report, trace_id = summarize(mesh.api_url, seconds)
            report += "\n" + identities(certs, mesh.api_url)
            report += proxies
        except KeyboardInterrupt:
            print("\ntracemesh demo: interrupted; stopping every process", file=sys.stderr)
            return 130
        except (RuntimeError, QueryError) as exc:
            print(f"tracemesh demo: {exc}", file=sys.stderr)
            return 1
        finally:
            mesh.close()
    print()
    print(f"requests sent: {stats.sent}, failed: {stats.failed} (5xx or no answer; {stats.errors} without an answer)")
    print(f"spans stored: {stored}")
    print(report)
    store_arg = shlex.quote(str(store_path))
    print("\nlook further (the store stays in place):")
    if trace_id:
        print(f"  tracemesh sql --store {store_arg} \"SELECT ServiceName, SpanName, Duration/1e6 AS ms, StatusCode "
              f"FROM otel_traces WHERE TraceId = '{trace_id}' ORDER BY Timestamp\"")
    print(f"  tracemesh sql --store {store_arg} \"SELECT ServiceName, count() FROM otel_traces GROUP BY ServiceName\"")
    return 0
