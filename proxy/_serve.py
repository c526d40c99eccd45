"""``tracemesh sidecar``: listeners, config, span export, and an orderly stop.

Start: load the config (a bad file is an error at start), open both listeners, start the exporter.
The config file is re-read when it changes; a change that does not validate is logged and the last
good config stays in force. SIGTERM/SIGINT: stop accepting, give open exchanges
:data:`DRAIN_S` to finish, then flush queued spans for at most :data:`FLUSH_S`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

import trio

from tracemesh import __version__
from tracemesh.net import Addr
from tracemesh.proxy._config import ConfigError, MeshConfig, load_config
from tracemesh.proxy._http1 import Sidecar
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
        log.info("config reloaded from %s: %d services, %d routes", path, len(cfg.services), len(cfg.routes))


async def _main(service: str, version: str, app: Addr, inbound: Addr, outbound: Addr, collector: Addr,
                config: str | None) -> int:
    cfg = load_config(config) if config else MeshConfig.empty()
    mtime = os.stat(config).st_mtime if config else 0.0
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
    exporter = OTLPExporter(recorder, str(collector), resource, __version__)
    sidecar = Sidecar(service=service, version=version, app=app, router=router, recorder=recorder)
    in_listeners = await trio.open_tcp_listeners(inbound.port, host=inbound.host)
    out_listeners = await trio.open_tcp_listeners(outbound.port, host=outbound.host)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(exporter.run)
            if config:
                outer.start_soon(_watch_config, config, router, mtime)
            async with trio.open_nursery() as conns:
                async def serve(listeners, direction):
                    async def one(stream):
                        await sidecar.handle(stream, direction)
                    await trio.serve_listeners(one, listeners, handler_nursery=conns)
                accept = trio.CancelScope()

                async def accept_loop():
                    with accept:
                        async with trio.open_nursery() as n:
                            n.start_soon(serve, in_listeners, "inbound")
                            n.start_soon(serve, out_listeners, "outbound")

                conns.start_soon(accept_loop)
                print(f"tracemesh sidecar {service}/{version}: inbound {inbound} -> app {app}, "
                      f"outbound {outbound}, spans to {collector}", flush=True)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
                accept.cancel()
                conns.cancel_scope.deadline = trio.current_time() + DRAIN_S
            await exporter.flush(FLUSH_S)
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await sidecar.pool.aclose()
        exporter.close()
        s = recorder.stats
        print(f"tracemesh sidecar {service}/{version}: recorded {s.recorded} spans, exported {s.exported}, "
              f"dropped {s.dropped + s.export_dropped}", flush=True)
    return 0


def serve(*, service: str, version: str, app: Addr, inbound: Addr, outbound: Addr, collector: Addr,
          config: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return trio.run(_main, service, version, app, inbound, outbound, collector, config)
    except ConfigError as exc:
        print(f"tracemesh sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tracemesh sidecar: {exc}", file=sys.stderr)
        return 1
