"""The demo's workloads: small HTTP services instrumented with the OpenTelemetry SDK, as users' are.

``frontend`` -> ``catalog`` (v1 and v2) -> ``pricing``. Each app speaks plain HTTP to its own
sidecar: incoming requests arrive from the sidecar's inbound listener, outgoing calls go to the
sidecar's outbound listener, either as an HTTP proxy (frontend uses urllib with ``HTTP_PROXY``
semantics, as an unmodified client would) or by ``Host`` header over a kept-alive connection
(catalog). The apps' own spans join the sidecars' spans through ``traceparent``.

Run one with ``python -m tracemesh.demo.app --service catalog --version v2 --port P
--outbound 127.0.0.1:Q --collector 127.0.0.1:4317``. SIGTERM flushes spans and exits 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

ITEMS = ("lamp", "chair", "desk", "shelf", "rug", "clock")

#: Behaviour per workload. catalog v2 is the "canary": a little slower and a little less reliable.
PROFILES = {
    ("frontend", "v1"): {"latency_ms": (1, 3), "error_rate": 0.0},
    ("catalog", "v1"): {"latency_ms": (2, 6), "error_rate": 0.005},
    ("catalog", "v2"): {"latency_ms": (6, 14), "error_rate": 0.04},
    ("pricing", "v1"): {"latency_ms": (1, 4), "error_rate": 0.005},
}


class _Upstream:
    """Calls to another service through the sidecar's outbound listener."""

    def __init__(self, outbound: str, style: str) -> None:
        self.host, _, port = outbound.rpartition(":")
        self.port = int(port)
        self.style = style
        self._local = threading.local()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{outbound}"}))

    def get(self, service: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.style == "proxy":
            # absolute-form through the sidecar, exactly what HTTP_PROXY does for urllib
            req = urllib.request.Request(f"http://{service}{path}", headers=headers)
            try:
                with self._opener.open(req, timeout=10) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
        # by Host header over a kept-alive connection to the sidecar
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                conn.request("GET", path, headers={**headers, "Host": service})
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def make_handler(service: str, version: str, tracer: trace.Tracer, upstream: _Upstream):
    profile = PROFILES.get((service, version), {"latency_ms": (1, 3), "error_rate": 0.0})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
        server_version = f"{service}/{version}"

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
            pass  # the sidecars' spans and access logs are the record

        def _call(self, callee: str, path: str) -> tuple[int, bytes]:
            with tracer.start_as_current_span(f"GET {callee}", kind=SpanKind.CLIENT) as span:
                span.set_attribute("http.request.method", "GET")
                span.set_attribute("peer.service", callee)
                headers: dict[str, str] = {}
                propagate.inject(headers)
                rid = self.headers.get("x-request-id")
                if rid:
                    headers["x-request-id"] = rid
                status, body = upstream.get(callee, path, headers)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"{callee} answered {status}"))
                return status, body

        def _work(self, name: str) -> None:
            with tracer.start_as_current_span(name):
                lo, hi = profile["latency_ms"]
                time.sleep(random.uniform(lo, hi) / 1000)

        def _route(self, path: str) -> tuple[int, dict]:
            if service == "frontend":
                if path.startswith("/item/"):
                    status, body = self._call("catalog", "/items/" + path.rsplit("/", 1)[-1])
                else:
                    status, body = self._call("catalog", "/items")
                self._work("render page")
                if status >= 400:
                    return 502, {"error": f"catalog answered {status}"}
                return 200, {"page": "home" if path == "/" else "item", "catalog": json.loads(body)}
            if service == "catalog":
                self._work("load catalog")
                names = [path.rsplit("/", 1)[-1]] if path.startswith("/items/") else random.sample(ITEMS, 2)
                priced = []
                for name in names:
                    status, body = self._call("pricing", f"/price?item={name}")
                    if status >= 400:
                        return 502, {"error": f"pricing answered {status}"}
                    priced.append(json.loads(body))
                return 200, {"version": version, "items": priced}
            if service == "pricing":
                self._work("compute price")
                item = path.partition("item=")[2] or "unknown"
                return 200, {"item": item, "price": round(10 + (hash(item) % 9000) / 100, 2)}
            return 404, {"error": "no such page"}

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            ctx = propagate.extract(dict(self.headers.items()))
            path = self.path.split("?", 1)[0]
            with tracer.start_as_current_span(
                f"GET {path if service != 'pricing' else '/price'}", context=ctx, kind=SpanKind.SERVER
            ) as span:
                span.set_attribute("http.request.method", "GET")
                span.set_attribute("url.path", path)
                try:
                    if random.random() < profile["error_rate"]:
                        status, payload = 500, {"error": "injected demo failure"}
                    else:
                        status, payload = self._route(self.path)
                except Exception as exc:  # the demo app answers 500 like a real one, and says why on its span
                    span.record_exception(exc)
                    status, payload = 500, {"error": str(exc)}
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracemesh.demo.app")
    p.add_argument("--service", required=True, choices=("frontend", "catalog", "pricing"))
    p.add_argument("--version", default="v1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--outbound", required=True, help="HOST:PORT of this app's sidecar outbound listener")
    p.add_argument("--collector", required=True, help="HOST:PORT of the collector's OTLP/gRPC receiver")
    args = p.parse_args(argv)

    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": args.service, "service.version": args.version, "service.namespace": "default"}
        )
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://{args.collector}", insecure=True), schedule_delay_millis=500)
    )
    tracer = provider.get_tracer("tracemesh.demo")
    style = "proxy" if args.service == "frontend" else "host"
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.service, args.version, tracer, _Upstream(args.outbound, style)))
    server.daemon_threads = True

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"demo app {args.service}/{args.version} listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        provider.shutdown()  # flushes the batch processor: the app's last spans reach the collector
    return 0


if __name__ == "__main__":
    sys.exit(main())
