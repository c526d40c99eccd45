"""``tracemesh collector``: wire the store, the write-ahead log, the pipeline, the receivers and the
query API.

Start order: the query API listens first (``/ready`` answers 503), then the store opens and is
migrated, the write-ahead log is opened and whatever it holds from before is queued for storage,
then the OTLP receivers start and ``/ready`` turns 200. Stop order on SIGTERM or SIGINT: receivers
stop taking exports (in-flight ones finish), the pipeline stores what it can within
:data:`DRAIN_S` (the log keeps the rest for the next start), the store closes.

With config distribution on (the default; ``--control off`` turns it off), the control plane's
``grpc.aio`` server (:mod:`tracemesh.collector._discovery`) starts after the config history and the
CA and before the OTLP receivers: plaintext on ``--control``, and with ``--ca`` over mTLS on the CA's
port, where it also serves the CA's renewals. Every new config version is published to it.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
from dataclasses import dataclass

import trio

from tracemesh._proc import KEEP_FREED_MAX_BYTES, freeze_startup_objects, keep_freed_memory, name_os_thread
from tracemesh.collector import _selfmetrics
from tracemesh.collector._api import QueryAPI
from tracemesh.collector._config_store import ConfigStore, ConfigStoreError
from tracemesh.collector._grpc import MAX_MESSAGE_BYTES, start_grpc
from tracemesh.collector._otlp import decode_record, use_native_traces
from tracemesh.collector._otlp_http import OTLPHttp
from tracemesh.collector._pipeline import FLUSH_INTERVAL_S, Pipeline
from tracemesh.collector._schema import SchemaOptions
from tracemesh.collector._store import EmbeddedStore, StoreBusy
from tracemesh.collector._wal import MAX_BYTES, WAL
from tracemesh.query import QueryError
from tracemesh.httpserve import serve_http
from tracemesh.net import Addr

log = logging.getLogger("tracemesh.collector")

#: In-flight OTLP/gRPC exports get this long to finish at shutdown.
GRPC_GRACE_S = 5.0
#: Queued rows get this long to reach storage at shutdown; the rest waits in the log.
DRAIN_S = 10.0


@dataclass(frozen=True)
class CollectorOptions:
    store: str
    otlp_grpc: Addr
    otlp_http: Addr | None
    api: Addr
    wal_dir: str | None = None  # default: <store>/wal
    wal_max_bytes: int = MAX_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    ttl_days: int = 0
    clickhouse: str | None = None  # a ClickHouse server URL instead of the embedded store
    native_traces: bool = True  # embedded store: ClickHouse parses OTLP traces itself (_native.py)
    ca_dir: str | None = None  # serve the mesh CA in this directory (off when None)
    ca_mtls: Addr | None = None  # the CA's mTLS renewal port; default <otlp host>:15012
    control: Addr | None = None  # the plaintext discovery port; None: <otlp host>:15010, if free
    control_off: bool = False  # no config distribution (and the CA renews on its own server)
    endpoint_grace_s: float = 30.0  # how long a departed or unhealthy endpoint stays routable
    control_dir: str | None = None  # the mesh config history; default <store>/control, ./tracemesh-control with --clickhouse
    config_history: int = 100  # versions of the mesh config kept (the newest)
    flush_interval_s: float = FLUSH_INTERVAL_S  # stored data is queryable within about this long


#: Where the write-ahead log lives when the store is a server (no store directory to put it in).
DEFAULT_SERVER_WAL = "tracemesh-wal"
#: Where the mesh config history lives when the store is a server.
DEFAULT_SERVER_CONTROL = "tracemesh-control"


def _store_name(opts: CollectorOptions) -> str:
    if opts.clickhouse:
        from tracemesh.collector._server_store import ServerTarget

        return ServerTarget.parse(opts.clickhouse).redacted()  # never print the password
    return opts.store


def _open_store(opts: CollectorOptions):
    if opts.clickhouse:
        from tracemesh.collector._server_store import ServerStore, ServerTarget

        return ServerStore(ServerTarget.parse(opts.clickhouse))
    return EmbeddedStore(opts.store)


def _start_control(opts: CollectorOptions, config_store, ca_service, ca_serving):
    """The config distribution server (blocking start): plaintext on ``--control``, and over mTLS
    on the CA's port with the CA's renewals beside it. Every new config version is published to it."""
    from concurrent import futures

    import grpc

    from tracemesh.collector._ca_service import DEFAULT_MTLS_PORT
    from tracemesh.collector._discovery import DEFAULT_PORT, ControlServer, Distributor, ca_renewal_handler
    from tracemesh.net import parse_addr

    distributor = Distributor(grace_s=opts.endpoint_grace_s)
    config_store.on_change(lambda v: distributor.publish(v.version, v.mesh))
    cur = config_store.current()
    # nothing ever applied: an empty config, so the registry's endpoints alone make a mesh
    distributor.publish(cur.version if cur else 0, cur.mesh if cur else {})
    server = ControlServer(distributor)
    plain = opts.control or Addr(opts.otlp_grpc.host, DEFAULT_PORT)
    mtls_addr = creds = None
    handlers: tuple = ()
    if ca_service is not None:
        mtls_addr = str(opts.ca_mtls or Addr(opts.otlp_grpc.host, DEFAULT_MTLS_PORT))
        creds = grpc.dynamic_ssl_server_credentials(ca_serving.configuration(), ca_serving.fetch,
                                                    require_client_authentication=True)
        handlers = (ca_renewal_handler(ca_service, futures.ThreadPoolExecutor(4, thread_name_prefix="mesh-ca", initializer=name_os_thread)),)
        distributor.set_bundle_source(ca_service.ca.bundle_pem)
    server.start(str(plain), mtls_addr, creds, handlers, plain_optional=opts.control is None)
    where = [f"{plain.host}:{server.plain_port}"] if server.plain_port else []
    if server.mtls_port:
        where.append(f"mTLS on {parse_addr(mtls_addr).host}:{server.mtls_port}")
    return server, f"tracemesh collector: config distribution (MeshDiscovery) on {', '.join(where) or 'no port'}"


async def _main(opts: CollectorOptions) -> int:
    started = time.time()
    # config_store: the mesh config history (a ConfigStore); subscribe to new versions with on_change
    state: dict = {"store": None, "pipeline": None, "config_store": None}

    def stats() -> dict:
        p = state["pipeline"]
        out = {"uptime_s": round(time.time() - started, 1), "store": _store_name(opts)}
        if p is not None:
            out["pipeline"] = _selfmetrics.snapshot(p)
        return out

    control_dir = opts.control_dir or (DEFAULT_SERVER_CONTROL if opts.clickhouse else f"{opts.store}/control")
    api_handler = QueryAPI(None, stats, lambda: _selfmetrics.prometheus(state["pipeline"], time.time() - started))
    listeners = await trio.open_tcp_listeners(opts.api.port, host=opts.api.host)
    api_url = f"http://{opts.api.host}:{listeners[0].socket.getsockname()[1]}"
    http_listeners = []
    if opts.otlp_http is not None:
        http_listeners = await trio.open_tcp_listeners(opts.otlp_http.port, host=opts.otlp_http.host)
    server = None
    ca_server = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_http, listeners, api_handler)
            try:
                store = await trio.to_thread.run_sync(_open_store, opts)
            except StoreBusy as exc:
                where = f"; its query API is {exc.api_url}" if exc.api_url else ""
                print(f"tracemesh collector: {exc}{where}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            except (QueryError, ValueError) as exc:
                print(f"tracemesh collector: cannot use the store: {exc}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            state["store"] = store
            try:  # after the store: a second collector on the same store hears about the store first
                config_store = state["config_store"] = await trio.to_thread.run_sync(
                    functools.partial(ConfigStore, control_dir, keep=opts.config_history))
            except ConfigStoreError as exc:
                print(f"tracemesh collector: {exc}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            api_handler.config.store = config_store
            applied = await trio.to_thread.run_sync(store.ensure_schema, SchemaOptions(ttl_days=opts.ttl_days))
            if applied:
                log.info("schema migrations applied: %s", ", ".join(map(str, applied)))
            store.announce(api_url)
            wal_dir = opts.wal_dir or (DEFAULT_SERVER_WAL if opts.clickhouse else f"{opts.store}/wal")
            wal = await trio.to_thread.run_sync(lambda: WAL(wal_dir, max_bytes=opts.wal_max_bytes))
            if opts.native_traces and not opts.clickhouse:
                await trio.to_thread.run_sync(store.enable_native, f"{wal_dir}/native")
                use_native_traces(True)
            pipeline = state["pipeline"] = Pipeline(wal, store.insert_rows, decode_record,
                                                     flush_interval=opts.flush_interval_s)
            ca_handlers, ca_line, ca_service, ca_serving = (), "", None, None
            if opts.ca_dir:
                from tracemesh.collector._ca import CaError
                from tracemesh.collector._ca_service import DEFAULT_MTLS_PORT, open_ca, start_ca

                ca_mtls = opts.ca_mtls or Addr(opts.otlp_grpc.host, DEFAULT_MTLS_PORT)
                try:
                    if opts.control_off:
                        ca_service, ca_server, ca_port = await trio.to_thread.run_sync(start_ca, opts.ca_dir, str(ca_mtls))
                    else:  # the control plane's server serves the renewals, beside the discovery stream
                        ca_service, ca_serving = await trio.to_thread.run_sync(open_ca, opts.ca_dir)
                        ca_port = 0
                except CaError as exc:
                    print(f"tracemesh collector: cannot serve the mesh CA: {exc}", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return 1
                ca_handlers = (ca_service.handler(renewal=False),)
            control_line = ""
            if not opts.control_off:
                control, control_line = await trio.to_thread.run_sync(_start_control, opts, config_store, ca_service,
                                                                      ca_serving)
                state["control"] = control
                api_handler.proxies = control.distributor.proxies
                if ca_service is not None:
                    ca_port = ca_service.renew_port = control.mtls_port
            if ca_service is not None:
                ca_line = (f"tracemesh collector: mesh CA {opts.ca_dir} (trust domain {ca_service.ca.trust_domain}): "
                           f"first certificates on the OTLP/gRPC port, renewals over mTLS on {ca_mtls.host}:{ca_port}")
            server, port = start_grpc(str(opts.otlp_grpc), pipeline, max_message=opts.max_message_bytes,
                                      extra_handlers=ca_handlers)
            otlp_http = OTLPHttp(pipeline, opts.max_message_bytes)
            where_http = ""
            if http_listeners:
                await nursery.start(serve_http, http_listeners, otlp_http)
                otlp_http.ready = True
                where_http = f", OTLP/HTTP on {opts.otlp_http.host}:{http_listeners[0].socket.getsockname()[1]}"
            api_handler.store = store
            freeze_startup_objects()
            # grpcio's threads copy each export into a fresh block of its size (~400 KB for an SDK's
            # 512 spans): kept for reuse, not unmapped and faulted in again page by page (~2.5 us of
            # system time a page on a VM). Blocks up to the message limit.
            keep_freed_memory(min(opts.max_message_bytes, KEEP_FREED_MAX_BYTES))
            api_handler.ready = True
            print(f"tracemesh collector: OTLP/gRPC on {opts.otlp_grpc.host}:{port}{where_http}, "
                  f"query API on {api_url}, store {_store_name(opts)}", flush=True)
            if ca_line:
                print(ca_line, flush=True)
            if control_line:
                print(control_line, flush=True)
            cur = config_store.current()
            print(f"tracemesh collector: mesh config history {control_dir}, "
                  + (f"version {cur.version} in force" if cur else "nothing applied yet"), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("got %s; shutting down", signal.Signals(signum).name)
                    break
            api_handler.ready = False
            otlp_http.ready = False
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if server is not None:
                await trio.to_thread.run_sync(lambda: server.stop(GRPC_GRACE_S).wait())
            if ca_server is not None:
                await trio.to_thread.run_sync(lambda: ca_server.stop(GRPC_GRACE_S).wait())
            if state.get("control") is not None:
                await trio.to_thread.run_sync(state["control"].stop, 1.0)
            p = state["pipeline"]
            if p is not None:
                await trio.to_thread.run_sync(p.close, DRAIN_S)
                s = p.stats
                print(f"tracemesh collector: stored {s.stored_rows} rows, rejected {s.rejected_rows}, "
                      f"refused {s.refused_exports} exports, {len(p._pending)} records left in the log",
                      flush=True)
            if state["store"] is not None:
                state["store"].close()
            if state["config_store"] is not None:
                state["config_store"].close()
    return 0


def serve(opts: CollectorOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return trio.run(_main, opts)
    except OSError as exc:
        print(f"tracemesh collector: {exc}", file=sys.stderr)
        return 1


def status(api: str) -> int:
    """``tracemesh collector status``: the running collector's numbers, for people."""
    from tracemesh.query import QueryError
    from tracemesh.query.cli import stats_api

    base = api if "://" in api else f"http://{api}"
    try:
        st = stats_api(base)
    except QueryError as exc:
        print(f"tracemesh collector status: {exc}", file=sys.stderr)
        return 1
    p = st.get("pipeline")
    print(f"collector at {base}: up {st['uptime_s']:.0f}s, store {st['store']}")
    if not p:
        print("  starting (store not open yet)")
        return 0
    print(f"  storage     {'up' if p['storage_up'] else 'DOWN (retrying; exports are kept in the log)'}")
    print(f"  received    {p['rows_received']} rows in {p['exports']} exports "
          f"({p['rows_rejected']} rejected as malformed, {p['exports_refused']} exports pushed back)")
    print(f"  stored      {p['rows_stored']} rows in {p['inserts']} inserts "
          f"(last {p['last_insert_ms']:.1f} ms, {p['insert_errors']} failed)")
    for table, n in sorted(p["rows_stored_by_table"].items()):
        print(f"    {table:28s} {n}")
    print(f"  waiting     {p['rows_queued']} rows; {p['records_spooled']} exports only in the log "
          f"({p['records_read_back']} read back from it so far: memory was at its bound)")
    print(f"  log         {p['wal_bytes']} bytes, {p['wal_syncs']} group commits")
    return 0
