"""``tracemesh sidecar``: listeners, config, span export, and an orderly stop.

Start: load the config (a bad file is an error at start), start the exporter; with ``--identity``,
get the workload certificate from the collector's mesh CA (retrying with backoff until it comes;
renewed at half-life from then on), then open both listeners, so that a sidecar that listens can
serve mTLS. Without an identity the listeners open at once.
The config file is re-read when it changes; a change that does not validate is logged and the last
good config stays in force. With ``--control`` the config comes from the control plane instead
(:mod:`tracemesh.proxy._control`): the sidecar waits for a first one (or its ``--control-cache``)
for a bounded time before serving, and keeps the last good one while the control plane is away.
SIGTERM/SIGINT: stop accepting, give open exchanges
:data:`DRAIN_S` to finish, then flush queued spans, metrics and access logs for at most :data:`FLUSH_S`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from datetime import datetime, timezone
from functools import partial

import trio

from tracemesh import __version__
from tracemesh._proc import freeze_startup_objects, keep_freed_memory
from tracemesh.httpserve import serve_http
from tracemesh.net import Addr
from tracemesh.proxy._accesslog import DEFAULT_MODE as DEFAULT_ACCESS_LOG
from tracemesh.proxy._accesslog import AccessLog, LogsExporter, StdoutWriter
from tracemesh.proxy._admin import ConnectionStats, MetricsExporter, Readiness, admin_handler, sidecar_stats
from tracemesh.proxy._config import ConfigError, MeshConfig, load_config
from tracemesh.proxy._http1 import Sidecar
from tracemesh.proxy._metrics import MeshMetrics
from tracemesh.proxy._mtls import MTLS_DISABLE, MTLS_PERMISSIVE, CaClient, MeshTls
from tracemesh.proxy._otlp import OtlpClient
from tracemesh.proxy._recorder import OTLPExporter, SpanRecorder
from tracemesh.proxy._router import Router

log = logging.getLogger("tracemesh.sidecar")

DRAIN_S = 5.0
FLUSH_S = 3.0
CONFIG_POLL_S = 1.0


def _stamp(path: str) -> tuple[float, int]:
    st = os.stat(path)
    return st.st_mtime, st.st_size


async def _watch_config(path: str, router: Router, mtime: float) -> None:
    """Reload *path* when it changed and then stayed the same for one poll interval, so a file
    caught half-written by an in-place editor is never loaded (it could be a valid, smaller mesh)."""
    loaded = (mtime, os.stat(path).st_size)
    seen = loaded
    while True:
        await trio.sleep(CONFIG_POLL_S)
        try:
            now = _stamp(path)
        except OSError:
            continue  # the file is being replaced, or gone: keep the last good config
        if now != seen:
            seen = now  # changed since the last look: wait until it settles
            continue
        if now == loaded:
            continue
        loaded = now
        try:
            cfg = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            log.error("config change rejected, keeping the last good config: %s", exc)
            continue
        router.update(cfg)
        log.info("config reloaded from %s: %d services, %d routes", path, len(cfg.services), sum(map(len, cfg.routes.values())))


async def _listen(addr: Addr) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(addr.port, host=addr.host)


async def _listen_reuseport(addr: Addr) -> list[trio.SocketListener]:
    from tracemesh.proxy._workers import reuseport_listeners

    return await reuseport_listeners(addr)


async def _tcp_listeners(listen, sidecar: Sidecar, outbound: tuple[tuple[Addr, str], ...],
                         inbound: tuple[tuple[Addr, Addr], ...]) -> list:
    """(listeners, handler) for each --tcp-outbound LISTEN=SERVICE and --tcp-inbound LISTEN=APP."""
    out = []
    for addr, service in outbound:
        out.append((await listen(addr), partial(sidecar.tcp.serve_outbound, service=service)))
        log.info("TCP outbound %s -> service %s", addr, service)
    for addr, app in inbound:
        out.append((await listen(addr), partial(sidecar.tcp.serve_inbound, app=app)))
        log.info("TCP inbound %s -> app %s", addr, app)
    return out


#: The longest another Python thread may hold the GIL while the event loop waits for it (the
#: interpreter's default is 5 ms). The sidecar's threads are rare (the metrics export encodes in one
#: every 10 s: up to 80 ms at the series bound, /metrics scrapes render in one, name lookups), but
#: while one runs, each wait is a latency spike for every request in flight.
SWITCH_INTERVAL_S = 0.001


class UsageError(Exception):
    """Flags that do not go together; exit status 2, as argparse's own errors."""


def _identity_setup(identity: str | None, token: str | None, token_file: str | None, mtls: str | None,
                    collector: Addr):
    """The workload credential (not yet obtained), its CA client and the inbound mode."""
    from tracemesh.identity import (
        ChildProcessCrypto,
        RotatingCredentials,
        SpiffeId,
        SpiffeIdError,
    )

    if identity is None:
        if mtls not in (None, MTLS_DISABLE):
            raise UsageError(f"--mtls {mtls} needs --identity (a workload certificate to serve mTLS with)")
        if token or token_file:
            raise UsageError("--token and --token-file go with --identity")
        return None, None, MTLS_DISABLE
    try:
        sid = SpiffeId.parse(identity)
    except SpiffeIdError as exc:
        raise UsageError(f"--identity {identity!r} is not a SPIFFE ID: {exc}") from None
    if not sid.is_workload:
        raise UsageError(f"--identity {identity!r} is not a workload identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {token_file}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError("--identity needs a join token (--token or --token-file) for its first certificate")
    client = CaClient(collector, sid, token)
    # the key, CSR and certificate checks run in a short-lived child: cryptography stays out of the
    # sidecar (~8 MB resident for the process's life)
    creds = RotatingCredentials(sid, client.obtain, max_retry_s=10.0, crypto=ChildProcessCrypto())
    client.creds = creds
    return creds, client, mtls or MTLS_PERMISSIVE


async def _main(service: str, version: str, app: Addr, inbound: Addr, outbound: Addr, collector: Addr,
                config: str | None, identity: str | None = None, token: str | None = None,
                token_file: str | None = None, mtls: str | None = None, admin: Addr | None = None,
                worker: str | None = None, tcp_outbound: tuple[tuple[Addr, str], ...] = (),
                tcp_inbound: tuple[tuple[Addr, Addr], ...] = (), control: Addr | None = None,
                control_cache: str | None = None, app_protocol: str = "auto",
                access_log: str = DEFAULT_ACCESS_LOG) -> int:
    if control is not None and config:
        raise UsageError("--control and --config are two sources of the mesh config; give one")
    if control_cache and control is None:
        raise UsageError("--control-cache goes with --control")
    spec = None
    if worker is not None:  # one of --workers N: the supervisor holds the identity and the admin address
        from tracemesh.proxy._workers import WorkerSpec, worker_identity

        spec = WorkerSpec.parse(worker)
        creds, ca_client, mode = worker_identity(spec, identity, mtls)
        admin = Addr("127.0.0.1", 0)  # scraped by the supervisor
    else:
        creds, ca_client, mode = _identity_setup(identity, token, token_file, mtls, collector)
    listen = _listen if spec is None else _listen_reuseport
    cfg = load_config(config) if config else MeshConfig.empty()
    mtime = os.stat(config).st_mtime if config else 0.0
    own = cfg.services.get(service)
    if creds is not None and own is not None and own.identity is not None and own.identity != creds.spiffe_id:
        log.warning("the mesh config says service %s is %s, but this sidecar is %s: callers that check "
                    "the identity will refuse it", service, own.identity, creds.spiffe_id)
    router = Router(cfg)
    recorder = SpanRecorder()
    resource = {
        "service.name": service,
        "service.version": version,
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        "telemetry.sdk.name": "tracemesh",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": __version__,
        "mesh.component": "sidecar",
    }
    if creds is not None:
        resource["mesh.identity"] = str(creds.spiffe_id)
    control_client = None
    if control is not None:
        from tracemesh.proxy._control import ControlClient

        control_client = ControlClient(
            control, router, service=service, version=version, address=inbound, app=app,
            # a worker's stream is named after its supervisor, so proxy-status shows one sidecar
            instance_id=(f"{socket.gethostname()}:{os.getppid()}/w{spec.index}" if spec is not None
                         else resource["service.instance.id"]),
            namespace=(creds.spiffe_id.namespace if creds is not None else None) or "default",
            creds=creds, cache=control_cache, sidecar_version=__version__)
    otlp = OtlpClient(str(collector))  # one connection to the collector for spans, access logs and metrics
    exporter = OTLPExporter(recorder, str(collector), resource, __version__, client=otlp)
    tls = MeshTls(creds, mode)
    sidecar = Sidecar(service=service, version=version, app=app, router=router, recorder=recorder, tls=tls)
    sidecar.app_protocol = app_protocol  # the mesh config's declared protocol, when there is one, wins
    metrics = MeshMetrics()
    sidecar.metrics = metrics  # the data path calls metrics.observe() once per request
    metrics_exporter = MetricsExporter(metrics, str(collector), resource, __version__, client=otlp)
    alog = log_exporter = None
    if access_log != "off":  # one record per request and TCP connection, exported as spans are
        alog = sidecar.access_log = sidecar.tcp.access_log = AccessLog()
        log_exporter = (LogsExporter(alog, str(collector), resource, __version__, client=otlp)
                        if access_log == "otlp" else StdoutWriter(alog))
    conn_stats = ConnectionStats()
    metrics.stats = sidecar_stats(recorder, tls, sidecar, conn_stats, metrics_exporter)
    readiness = Readiness(creds)
    # opened first, so /ready answers (503) while the certificate is still being fetched
    admin_listeners = await trio.open_tcp_listeners(admin.port, host=admin.host) if admin else None
    in_listeners = out_listeners = None
    tcp_listeners: list = []
    sidecar.tcp.metrics = metrics  # and once per TCP connection opened, closed, and as bytes flow
    if len(tcp_inbound) == 1:  # opaque TCP arriving on the HTTP inbound port goes to the one TCP app port
        sidecar.tcp.default_app = tcp_inbound[0][1]
    if creds is None:
        in_listeners = await listen(inbound)
        out_listeners = await listen(outbound)
        tcp_listeners = await _tcp_listeners(listen, sidecar, tcp_outbound, tcp_inbound)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(exporter.run)
            await outer.start(metrics_exporter.run)
            if log_exporter is not None:
                await outer.start(log_exporter.run)
            await outer.start(sidecar.run)  # the task group of mirrored requests
            if admin_listeners:
                await outer.start(serve_http, admin_listeners, admin_handler(metrics, readiness))
            id_note = ""
            if creds is not None:
                if spec is None:  # a worker waits for its supervisor's
                    log.info("asking the mesh CA at %s for a certificate for %s", collector, creds.spiffe_id)
                with trio.CancelScope() as waiting:
                    async def stop_on_signal():
                        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                            async for _ in signals:
                                waiting.cancel()
                                return
                    async with trio.open_nursery() as w:
                        w.start_soon(stop_on_signal)
                        await outer.start(creds.run)
                        w.cancel_scope.cancel()
                if not creds.ready:  # a signal while the CA was not answering
                    outer.cancel_scope.cancel()
                    return 0
                in_listeners = await listen(inbound)
                out_listeners = await listen(outbound)
                tcp_listeners = await _tcp_listeners(listen, sidecar, tcp_outbound, tcp_inbound)
                id_note = (f"; identity {creds.spiffe_id}, certificate until "
                           f"{datetime.fromtimestamp(creds.not_after, timezone.utc).isoformat(timespec='seconds')}, "
                           f"inbound mTLS {mode}")
            if config:
                outer.start_soon(_watch_config, config, router, mtime)
            if control_client is not None:  # a first config (or the cache's) before serving, within a bound
                await outer.start(control_client.run)
                id_note += (f"; config from the control plane at {control} "
                            f"(version {control_client.applied_version or 'none yet'})")
            async with trio.open_nursery() as conns:
                async def serve(listeners, direction):
                    async def one(stream):
                        conn_stats.opened(direction)
                        try:
                            await sidecar.handle(stream, direction)
                        finally:
                            conn_stats.closed(direction)
                    await trio.serve_listeners(one, listeners, handler_nursery=conns)
                accept = trio.CancelScope()

                async def accept_loop():
                    with accept:
                        async with trio.open_nursery() as n:
                            n.start_soon(serve, in_listeners, "inbound")
                            n.start_soon(serve, out_listeners, "outbound")
                            for listeners, handler in tcp_listeners:
                                n.start_soon(partial(trio.serve_listeners, handler, listeners, handler_nursery=conns))

                conns.start_soon(accept_loop)
                freeze_startup_objects()
                keep_freed_memory()
                sys.setswitchinterval(SWITCH_INTERVAL_S)
                readiness.listening = True
                if spec is not None:  # the supervisor prints the banner once every worker reported
                    spec.report_ready(Addr(*admin_listeners[0].socket.getsockname()[:2]))
                    log.info("worker %d (pid %d) serving inbound %s, outbound %s%s", spec.index, os.getpid(),
                             inbound, outbound, id_note)
                else:
                    print(f"tracemesh sidecar {service}/{version}: inbound {inbound} -> app {app}, "
                          f"outbound {outbound}, spans to {collector}{id_note}"
                          f"{f'; admin http://{admin}' if admin else ''}", flush=True)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
                readiness.draining = True
                accept.cancel()
                conns.cancel_scope.deadline = trio.current_time() + DRAIN_S
            async with trio.open_nursery() as flushing:  # both bounded by FLUSH_S, side by side
                flushing.start_soon(exporter.flush, FLUSH_S)
                flushing.start_soon(metrics_exporter.flush, FLUSH_S)
                if log_exporter is not None:
                    flushing.start_soon(log_exporter.flush, FLUSH_S)
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await sidecar.pool.aclose()
            if getattr(sidecar, "h2pool", None) is not None:  # made by the first HTTP/2 exchange
                await sidecar.h2pool.aclose()
        exporter.close()
        metrics_exporter.close()
        if log_exporter is not None:
            log_exporter.close()
        otlp.close()
        if ca_client is not None:
            ca_client.close()
        s = recorder.stats
        print(f"tracemesh sidecar {service}/{version}: recorded {s.recorded} spans, exported {s.exported}, "
              f"dropped {s.dropped + s.export_dropped}", flush=True)
        if alog is not None:
            s = alog.stats
            print(f"tracemesh sidecar {service}/{version}: access log ({access_log}): recorded {s.recorded} "
                  f"records, exported {s.exported}, dropped {s.dropped + s.export_dropped}", flush=True)
        t = tls.stats
        if creds is not None:
            print(f"tracemesh sidecar {service}/{version}: mTLS {mode}: {t.handshakes} inbound handshakes, "
                  f"{t.plaintext} plaintext connections, {t.refused} refused ({t.refused_plaintext} plaintext, "
                  f"{t.refused_handshake} failed handshakes, {t.refused_identity} wrong identity, "
                  f"{t.timeouts} timeouts); {t.upstream_handshakes} upstream handshakes, "
                  f"{t.upstream_failures} failed; {creds.generation} certificates, {creds.failures} failed "
                  f"calls to the CA; {sidecar.denied} requests denied by policy", flush=True)
        elif sidecar.denied:
            print(f"tracemesh sidecar {service}/{version}: {sidecar.denied} requests denied by policy", flush=True)
        if control_client is not None:
            c = control_client.stats
            print(f"tracemesh sidecar {service}/{version}: control plane: {c.connects} connections, "
                  f"{c.failures} failed, {c.snapshots} snapshots, {c.applied} applied, {c.nacks} rejected; "
                  f"config {control_client.applied_version or 'none'}", flush=True)
    return 0


def serve(*, service: str, version: str, app: Addr, inbound: Addr, outbound: Addr, collector: Addr,
          config: str | None, identity: str | None = None, token: str | None = None,
          token_file: str | None = None, mtls: str | None = None, admin: Addr | None = None,
          workers: int = 1, worker: str | None = None, worker_argv: list[str] | None = None,
          tcp_outbound: tuple[tuple[Addr, str], ...] = (), tcp_inbound: tuple[tuple[Addr, Addr], ...] = (),
          control: Addr | None = None, control_cache: str | None = None, app_protocol: str = "auto",
          access_log: str = DEFAULT_ACCESS_LOG) -> int:
    """``workers`` > 1: this process supervises that many workers (:mod:`tracemesh.proxy._workers`),
    started with ``worker_argv`` (the user's flags less the supervisor's own) and ``--as-worker``;
    ``worker`` (``INDEX:DIR``, from ``--as-worker``): this process is one of them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if workers > 1 and worker is None:
            from tracemesh.proxy._workers import supervise

            return trio.run(partial(
                supervise, workers=workers, argv=worker_argv or [], service=service, version=version, app=app,
                inbound=inbound, outbound=outbound, collector=collector, config=config, identity=identity,
                token=token, token_file=token_file, mtls=mtls, admin=admin,
                tcp_listen=[("tcp-outbound", addr) for addr, _ in tcp_outbound]
                + [("tcp-inbound", addr) for addr, _ in tcp_inbound]))
        return trio.run(partial(_main, service, version, app, inbound, outbound, collector, config,
                                identity, token, token_file, mtls, admin, worker,
                                tcp_outbound=tuple(tcp_outbound), tcp_inbound=tuple(tcp_inbound),
                                control=control, control_cache=control_cache, app_protocol=app_protocol,
                                access_log=access_log))
    except UsageError as exc:
        print(f"tracemesh sidecar: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"tracemesh sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tracemesh sidecar: {exc}", file=sys.stderr)
        return 1
