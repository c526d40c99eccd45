"""``tracemesh collector``: wire the store, the pipeline, the OTLP receiver and the query API.

Start order: query API listens first (answering 503 on ``/ready``), then the store opens and the
schema is ensured, then the OTLP receiver starts and ``/ready`` turns 200. Stop order on SIGTERM or
SIGINT: the receiver stops taking data (in-flight exports finish), the pipeline drains into the
store, the store closes and releases its directory.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import asdict

import trio

from tracemesh.collector._api import QueryAPI
from tracemesh.collector._grpc import start_grpc
from tracemesh.collector._pipeline import SpanPipeline
from tracemesh.collector._store import EmbeddedStore, StoreBusy
from tracemesh.httpserve import serve_http
from tracemesh.net import Addr

log = logging.getLogger("tracemesh.collector")

#: In-flight OTLP exports get this long to finish at shutdown.
GRPC_GRACE_S = 5.0


async def _main(store_dir: str, otlp_grpc: Addr, api: Addr) -> int:
    started = time.time()
    state: dict = {"store": None, "pipeline": None}

    def stats() -> dict:
        p = state["pipeline"]
        out = {"uptime_s": round(time.time() - started, 1), "store": store_dir}
        if p is not None:
            out["spans"] = {**asdict(p.stats), "queued": p.queued}
        return out

    api_handler = QueryAPI(None, stats)
    listeners = await trio.open_tcp_listeners(api.port, host=api.host)
    bound = listeners[0].socket.getsockname()
    api_url = f"http://{api.host}:{bound[1]}"
    server = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_http, listeners, api_handler)
            try:
                store = await trio.to_thread.run_sync(EmbeddedStore, store_dir)
            except StoreBusy as exc:
                where = f"; its query API is {exc.api_url}" if exc.api_url else ""
                print(f"tracemesh collector: {exc}{where}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            state["store"] = store
            await trio.to_thread.run_sync(store.ensure_schema)
            store.announce(api_url)
            pipeline = state["pipeline"] = SpanPipeline(store.insert_spans)
            server, port = start_grpc(str(otlp_grpc), pipeline)
            api_handler.store = store
            api_handler.ready = True
            print(f"tracemesh collector: OTLP/gRPC on {otlp_grpc.host}:{port}, query API on {api_url}, "
                  f"store {store_dir}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("got %s; shutting down", signal.Signals(signum).name)
                    break
            api_handler.ready = False
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if server is not None:
                await trio.to_thread.run_sync(lambda: server.stop(GRPC_GRACE_S).wait())
            if state["pipeline"] is not None:
                await trio.to_thread.run_sync(state["pipeline"].close)
                s = state["pipeline"].stats
                print(f"tracemesh collector: stored {s.stored} spans, rejected {s.rejected}, "
                      f"refused {s.refused}", flush=True)
            if state["store"] is not None:
                state["store"].close()
    return 0


def serve(store: str, otlp_grpc: Addr, api: Addr) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return trio.run(_main, store, otlp_grpc, api)
    except OSError as exc:
        print(f"tracemesh collector: {exc}", file=sys.stderr)
        return 1
