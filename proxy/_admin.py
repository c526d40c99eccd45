"""The sidecar's admin side: ``/metrics``, ``/ready`` and ``/healthz`` over
:func:`tracemesh.httpserve.serve_http`, and the periodic OTLP/gRPC export of its metrics.

Neither is on the request path. ``/metrics`` copies the counts in the Trio thread (a microsecond
a series) and formats them in a worker thread; the exporter does the same every
:data:`EXPORT_INTERVAL_S` (encoding in a worker thread: a registry at its series bound takes tens
of milliseconds) and sends over :mod:`._otlp`'s connection from the Trio thread, as the span
exporter does.

Cancellation: cancelling :meth:`MetricsExporter.run` stops the periodic export; call
:meth:`MetricsExporter.flush` (shielded, bounded) at shutdown to send the final counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import trio

from tracemesh.httpserve import Handler, Request, Response
from tracemesh.proxy._accesslog import stats_lines as access_log_stats
from tracemesh.proxy._http2 import STATS as h2s
from tracemesh.proxy._metrics import CONTENT_TYPE, MeshMetrics, encode_otlp, render_prometheus
from tracemesh.proxy._otlp import ExportError, OtlpClient

log = logging.getLogger(__name__)

#: Istio's proxies report every 10 s too (Prometheus scrapes at 15 s).
EXPORT_INTERVAL_S = 10.0
#: Shorter than the interval, so one slow collector cannot pile exports up.
EXPORT_TIMEOUT_S = 5.0
EXPORT_PATH = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


class Readiness:
    """Ready once the listeners are open and, with an identity, a certificate is held; not ready
    again once draining (so a load balancer stops sending before the listeners close)."""

    def __init__(self, creds=None) -> None:
        self.creds = creds
        self.listening = False
        self.draining = False

    def why_not(self) -> str | None:
        if self.draining:
            return "draining"
        if self.creds is not None and not self.creds.ready:
            return "no workload certificate yet"
        if not self.listening:
            return "listeners not open yet"
        return None


class ConnectionStats:
    """Downstream connections per listener, counted by the accept loop."""

    def __init__(self) -> None:
        self.open = {"inbound": 0, "outbound": 0}
        self.total = {"inbound": 0, "outbound": 0}

    def opened(self, direction: str) -> None:
        self.open[direction] += 1
        self.total[direction] += 1

    def closed(self, direction: str) -> None:
        self.open[direction] -= 1


def sidecar_stats(recorder, tls, sidecar, conns: ConnectionStats, exporter: MetricsExporter | None = None):
    """The callback for :class:`MeshMetrics`: the sidecar's own numbers, read when asked."""

    def stats() -> Mapping:
        s, t = recorder.stats, tls.stats
        out = {
            "tracemesh_sidecar_spans_recorded_total": (s.recorded, "Spans queued for export."),
            "tracemesh_sidecar_spans_dropped_total": (s.dropped + s.export_dropped,
                                                      "Spans dropped: queue full, or export failed for good."),
            "tracemesh_sidecar_spans_exported_total": (s.exported, "Spans the collector accepted."),
            "tracemesh_sidecar_span_export_failures_total": (s.export_failures, "Failed span export calls."),
            "tracemesh_sidecar_spans_queued": (len(recorder), "Spans waiting for export."),
            "tracemesh_sidecar_inbound_connections_open": (conns.open["inbound"], "Open inbound connections."),
            "tracemesh_sidecar_outbound_connections_open": (conns.open["outbound"], "Open outbound connections."),
            "tracemesh_sidecar_inbound_connections_total": (conns.total["inbound"], "Inbound connections accepted."),
            "tracemesh_sidecar_outbound_connections_total": (conns.total["outbound"], "Outbound connections accepted."),
            "tracemesh_sidecar_requests_denied_total": (sidecar.denied, "Requests denied by authorization policy."),
            "tracemesh_sidecar_mirrored_total": (sidecar.mirrors.sent, "Mirrored copies of requests sent."),
            "tracemesh_sidecar_mirror_dropped_total": (
                sidecar.mirrors.dropped, "Mirrored copies dropped: too many in flight (or not serving)."),
            "tracemesh_sidecar_mirror_skipped_total": (
                sidecar.mirrors.skipped, "Requests not mirrored: a body too large to copy."),
            "tracemesh_sidecar_mirror_failed_total": (sidecar.mirrors.failed, "Mirrored copies that got no answer."),
            "tracemesh_sidecar_mtls_handshakes_total": (t.handshakes, "Inbound mTLS handshakes completed."),
            "tracemesh_sidecar_mtls_refused_total": (t.refused, "Inbound connections refused by the mTLS mode."),
            "tracemesh_sidecar_http2_downstream_protocol_errors_total": (
                h2s.downstream_protocol_errors, "HTTP/2 client connections ended for breaking the protocol (GOAWAY)."),
            "tracemesh_sidecar_http2_upstream_protocol_errors_total": (
                h2s.upstream_protocol_errors, "HTTP/2 app connections ended for breaking the protocol (GOAWAY)."),
            "tracemesh_sidecar_http2_rapid_reset_closes_total": (
                h2s.rapid_reset_closes, "HTTP/2 client connections closed for resetting most of their streams."),
        }
        access_log = getattr(sidecar, "access_log", None)
        if access_log is not None:
            out.update(access_log_stats(access_log.stats, len(access_log)))
        if exporter is not None:
            out["tracemesh_sidecar_metric_exports_total"] = (exporter.exported, "Metric exports the collector accepted.")
            out["tracemesh_sidecar_metric_export_failures_total"] = (exporter.failures, "Failed metric export calls.")
        return out

    return stats


def admin_handler(metrics: MeshMetrics, readiness: Readiness) -> Handler:
    async def handle(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=[("allow", "GET, HEAD")])
        path = req.path
        if path == "/metrics":
            snap = metrics.snapshot()
            body = await trio.to_thread.run_sync(render_prometheus, snap)
            return Response(200, body, CONTENT_TYPE)
        if path == "/ready":
            why = readiness.why_not()
            return Response(200, b"ready\n") if why is None else Response(503, f"not ready: {why}\n".encode())
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/certificate":
            # the workload's certificate chain (public) as it holds it now: `tracemesh cert show --admin`
            creds = readiness.creds
            if creds is None:
                return Response(404, b"this sidecar has no workload identity (--identity)\n")
            if not creds.ready:
                return Response(503, b"no workload certificate yet\n")
            return Response(200, creds.chain_pem, "application/x-pem-file",
                            headers=[("x-tracemesh-renew-at", f"{creds.renew_at:.0f}")])
        return Response(404, b"not found: try /metrics, /ready, /healthz, /certificate\n")

    return handle


class MetricsExporter:
    """Sends the registry's cumulative counts to the collector as OTLP metrics."""

    def __init__(self, metrics: MeshMetrics, collector: str, resource: dict, scope_version: str,
                 interval_s: float = EXPORT_INTERVAL_S, client: OtlpClient | None = None) -> None:
        self.metrics = metrics
        self.target = collector
        self.resource = resource
        self.scope_version = scope_version
        self.interval_s = interval_s
        self.start_ns = time.time_ns()
        self.exported = 0
        self.failures = 0
        # as the span exporter's: no retries here (the next interval is the retry)
        self.client = client if client is not None else OtlpClient(collector)
        self._own_client = client is None
        self._warned_at = 0.0

    def encode(self, snap, now_ns: int) -> bytes:
        return encode_otlp(snap, self.resource, self.start_ns, now_ns, self.scope_version)

    async def export_once(self, timeout: float = EXPORT_TIMEOUT_S) -> bool:
        snap = self.metrics.snapshot()  # in the Trio thread: consistent with observe()
        # encoded in a worker thread (~20-40 us a series: tens of ms at the series bound), sent from here
        payload = await trio.to_thread.run_sync(self.encode, snap, time.time_ns(), abandon_on_cancel=True)
        try:
            await self.client.call(EXPORT_PATH, payload, timeout)
        except ExportError as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("metrics export to %s failed: %s %s", self.target, exc.code, exc.details)
            return False
        self.exported += 1
        return True

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Export every *interval_s* until cancelled; cumulative counts make a failed export harmless."""
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            await self.export_once()

    async def flush(self, deadline_s: float = 3.0) -> None:
        """Export the final counts, for at most *deadline_s* (shielded: runs during shutdown)."""
        with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
            await self.export_once(timeout=deadline_s)

    def close(self) -> None:
        if self._own_client:
            self.client.close()
