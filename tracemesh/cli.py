"""The ``tracemesh`` command. Argument parsing only; each subcommand lives in its package.

argparse already answers unknown flags and missing arguments with a usage message and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from tracemesh import _args
from tracemesh.net import Addr, parse_addr

DEFAULT_OTLP_GRPC = "127.0.0.1:4317"
DEFAULT_OTLP_HTTP = "127.0.0.1:4318"
DEFAULT_API = "127.0.0.1:7070"  # collector query API; 7070 is unassigned and easy to remember
DEFAULT_STORE = "tracemesh-data"


_addr, _positive_int = _args.addr, _args.positive_int


def _tcp_outbound(text: str) -> tuple:
    listen, sep, service = text.partition("=")
    if not sep or not service:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LISTEN=SERVICE, e.g. 127.0.0.1:15432=db")
    return _addr(listen), service


def _tcp_inbound(text: str) -> tuple:
    listen, sep, app = text.partition("=")
    if not sep or not app:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LISTEN=APP_PORT or LISTEN=HOST:PORT, e.g. "
                                         f"127.0.0.1:25432=5432")
    if app.isdigit():
        if not 1 <= int(app) <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r}: app port {app} is out of range (1-65535)")
        return _addr(listen), int(app)
    return _addr(listen), _addr(app)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracemesh", description="A tracing-first observability service mesh.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("collector", help="run the collector (OTLP receivers, ClickHouse store, query API), or `collector status`")
    c.add_argument("action", nargs="?", choices=("run", "status"), default="run",
                   help="run (default), or status: the numbers of the collector at --api")
    c.add_argument("--store", default=DEFAULT_STORE, help="embedded ClickHouse (chdb) data directory (default: %(default)s)")
    c.add_argument("--otlp-grpc", type=_addr, default=DEFAULT_OTLP_GRPC, help="OTLP/gRPC listen address (default: %(default)s)")
    c.add_argument("--otlp-http", default=DEFAULT_OTLP_HTTP,
                   help="OTLP/HTTP listen address, or 'off' (default: %(default)s)")
    c.add_argument("--api", default=None,
                   help=f"query API listen address (default: {DEFAULT_API}); for status: its URL")
    c.add_argument("--clickhouse", metavar="URL", default=None,
                   help="store in a ClickHouse server or cluster instead: clickhouse://user:pass@host:9000/db"
                        "[?secure=1&cluster=NAME] (default: the embedded store at --store)")
    c.add_argument("--wal", default=None, help="write-ahead log directory (default: STORE/wal, or ./tracemesh-wal with --clickhouse)")
    c.add_argument("--wal-max-mb", type=_positive_int, default=1024,
                   help="log size past which exports are pushed back (default: %(default)s)")
    c.add_argument("--max-message-mb", type=_positive_int, default=16,
                   help="largest OTLP message accepted, after decompression (default: %(default)s)")
    c.add_argument("--flush-interval", metavar="SECONDS", type=float, default=None,
                   help="store what arrived at least this often: data is queryable within about this long; "
                        "longer means fewer, larger inserts and less merging (default: 0.2)")
    c.add_argument("--ttl-days", type=int, default=0, help="keep data this many days; 0 keeps it (default: %(default)s)")
    c.add_argument("--python-encoder", action="store_true",
                   help="encode trace exports in Python instead of letting the embedded ClickHouse parse them "
                        "(slower; the same rows)")
    c.add_argument("--ca", metavar="DIR", default=None,
                   help="serve the mesh CA kept in DIR (made by `tracemesh ca init`): first certificates for "
                        "join tokens on the OTLP/gRPC port, renewals over mTLS on --ca-mtls (default: off)")
    c.add_argument("--ca-mtls", metavar="ADDR", type=_addr, default=None,
                   help="the CA's mTLS renewal port (default: the OTLP/gRPC host, port 15012)")
    c.add_argument("--control", metavar="ADDR", default=None,
                   help="config distribution to the sidecars (gRPC MeshDiscovery stream), plaintext, on ADDR, or "
                        "'off' (default: the OTLP/gRPC host, port 15010, if free); with --ca also over mTLS on the "
                        "CA's port")
    c.add_argument("--endpoint-grace", metavar="SECONDS", type=float, default=30.0,
                   help="a sidecar's endpoint stays in the mesh this long after it disconnected or its app turned "
                        "unhealthy (default: %(default)s)")
    c.add_argument("--control-dir", metavar="DIR", default=None,
                   help="the mesh config's versioned history (default: STORE/control, or ./tracemesh-control "
                        "with --clickhouse)")
    c.add_argument("--config-history", metavar="N", type=_positive_int, default=100,
                   help="mesh config versions kept in the history, the newest (default: %(default)s)")

    s = sub.add_parser("sidecar", help="run a sidecar proxy beside one workload")
    s.add_argument("--service", required=True, help="the workload's service name")
    s.add_argument("--version", default="v1", help="the workload's version label (default: %(default)s)")
    s.add_argument("--app", type=_addr, required=True, help="HOST:PORT of the local app")
    s.add_argument("--app-protocol", choices=("auto", "http1", "http2"), default="auto",
                   help="how the inbound side speaks to the app when the mesh config declares no protocol for "
                        "the service's port: auto (as the client did), http1 or http2 (h2c); the config's "
                        "ports[].protocol wins (default: %(default)s)")
    s.add_argument("--inbound", type=_addr, required=True, help="listen address that fronts the app")
    s.add_argument("--outbound", type=_addr, required=True, help="listen address for the app's outgoing calls")
    s.add_argument("--collector", type=_addr, required=True, help="collector OTLP/gRPC address")
    s.add_argument("--config", help="static mesh config (YAML): services, endpoints, routes, mTLS modes, policies")
    s.add_argument("--identity", metavar="SPIFFE_ID", default=None,
                   help="the workload's identity, spiffe://<trust-domain>/ns/<ns>/sa/<sa>: the sidecar makes a key, "
                        "gets its certificate from the collector's mesh CA and renews it at half-life")
    tok = s.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="join token for the first certificate (`tracemesh token create`)")
    tok.add_argument("--token-file", default=None, help="read the join token from this file")
    s.add_argument("--mtls", choices=("strict", "permissive", "disable"), default=None,
                   help="inbound: strict takes mesh mTLS only, permissive mTLS or plaintext on the same port, "
                        "disable plaintext only (default: permissive with --identity, else disable)")
    s.add_argument("--admin", metavar="ADDR", type=_addr, default=None,
                   help="serve GET /metrics (Prometheus, Istio's istio_* names), /ready and /healthz on "
                        "HOST:PORT (default: off)")
    s.add_argument("--control", metavar="ADDR", type=_addr, default=None,
                   help="take the mesh config and endpoints from the control plane at ADDR (the collector's "
                        "port 15010; with --identity its mTLS port, 15012), instead of --config (default: off)")
    s.add_argument("--control-cache", metavar="FILE", default=None,
                   help="with --control: keep the last applied config in FILE and start from it when the "
                        "control plane is away (default: off)")
    s.add_argument("--workers", metavar="N", type=_positive_int, default=1,
                   help="run N worker processes sharing the listeners (SO_REUSEPORT), to use N cores; this "
                        "process supervises them, holds the identity and serves --admin (default: %(default)s)")
    s.add_argument("--tcp-outbound", metavar="LISTEN=SERVICE", type=_tcp_outbound, action="append", default=[],
                   help="opaque TCP: listen on LISTEN (HOST:PORT) and pass each connection to an endpoint of "
                        "SERVICE, over mesh mTLS unless the service's mtls is disable (repeatable)")
    s.add_argument("--tcp-inbound", metavar="LISTEN=APP", type=_tcp_inbound, action="append", default=[],
                   help="opaque TCP: listen on LISTEN (HOST:PORT; plaintext or mTLS by --mtls) and pipe each "
                        "connection to the app's PORT or HOST:PORT (repeatable; with exactly one, mTLS connections "
                        "of the mesh's TCP ALPN on --inbound go to it too)")
    s.add_argument("--access-log", choices=("otlp", "stdout", "off"), default="otlp",
                   help="one access log record per request and TCP connection (Envoy's fields, with the "
                        "request's trace and span ids): otlp to the collector (otel_logs), stdout as JSON lines, "
                        "or off (default: %(default)s)")
    # INDEX:DIR, set by the supervisor of --workers on the command lines of its workers
    s.add_argument("--as-worker", dest="worker", default=None, help=argparse.SUPPRESS)

    q = sub.add_parser("sql", help="run read-only SQL over the store")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--store", help=f"embedded store directory (default: {DEFAULT_STORE})")
    where.add_argument("--api", help="collector query API URL, e.g. http://127.0.0.1:7070")
    q.add_argument("--format", choices=("table", "json", "csv"), default="table")
    q.add_argument("sql", help="SELECT, WITH, SHOW, DESCRIBE, EXPLAIN or EXISTS statement")

    d = sub.add_parser("demo", help="run a whole local mesh, drive load, show what it recorded")
    d.add_argument("--seconds", type=float, default=20.0, help="how long to drive load (default: %(default)s)")
    d.add_argument("--store", default=None, help="store directory (default: ./tracemesh-demo-<time>)")
    d.add_argument("--rps", type=float, default=40.0, help="requests per second of load (default: %(default)s)")

    from tracemesh._identity_cli import add_identity_commands

    add_identity_commands(sub)

    ps = sub.add_parser("proxy-status", help="each sidecar connected to the control plane, and whether it is in sync")
    ps.add_argument("--api", default=None, help=f"the collector's query API (default: http://{DEFAULT_API})")
    ps.add_argument("--json", action="store_true", help="print the collector's JSON answer as it is")

    from tracemesh._config_cli import add_config_commands

    add_config_commands(sub)
    return p


def _worker_argv(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> list[str]:
    """The user's command line for ``command``'s workers: every flag but the supervisor's own, so
    flags added to the command later reach the workers without a change here."""
    from tracemesh.proxy._workers import worker_argv

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return worker_argv(argv, [o for a in sub._actions for o in a.option_strings])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "collector":
        from tracemesh.collector import CollectorOptions, serve, status

        if args.action == "status":
            return status(args.api or f"http://{DEFAULT_API}")
        try:
            api = parse_addr(args.api or DEFAULT_API)
            otlp_http = None if args.otlp_http == "off" else parse_addr(args.otlp_http)
        except ValueError as exc:
            build_parser().error(str(exc))
        control_off = args.control == "off"
        try:
            control = parse_addr(args.control) if args.control and not control_off else None
        except ValueError as exc:
            parser.error(f"--control: {exc}")
        if args.endpoint_grace < 0:
            parser.error("--endpoint-grace must be 0 or more seconds")
        flush = {}
        if args.flush_interval is not None:
            if not 0.01 <= args.flush_interval <= 3600:
                parser.error("--flush-interval must be between 0.01 and 3600 seconds")
            flush = {"flush_interval_s": args.flush_interval}
        if args.ca_mtls is not None and not args.ca:
            build_parser().error("--ca-mtls goes with --ca (the CA directory to serve)")
        return serve(CollectorOptions(
            store=args.store, otlp_grpc=args.otlp_grpc, otlp_http=otlp_http, api=api, wal_dir=args.wal,
            wal_max_bytes=args.wal_max_mb * 1024 * 1024, max_message_bytes=args.max_message_mb * 1024 * 1024,
            ttl_days=args.ttl_days, clickhouse=args.clickhouse, ca_dir=args.ca, ca_mtls=args.ca_mtls,
            native_traces=not args.python_encoder, control_dir=args.control_dir, config_history=args.config_history,
            control=control, control_off=control_off, endpoint_grace_s=args.endpoint_grace, **flush))
    if args.command == "sidecar":
        from tracemesh.proxy import serve

        return serve(
            service=args.service,
            version=args.version,
            app=args.app,
            inbound=args.inbound,
            outbound=args.outbound,
            collector=args.collector,
            config=args.config,
            identity=args.identity,
            token=args.token,
            token_file=args.token_file,
            mtls=args.mtls,
            admin=args.admin,
            workers=args.workers,
            tcp_outbound=args.tcp_outbound,
            # a bare app port is on the --app host
            tcp_inbound=[(listen, Addr(args.app.host, app) if isinstance(app, int) else app)
                         for listen, app in args.tcp_inbound],
            worker=args.worker,
            control=args.control,
            control_cache=args.control_cache,
            app_protocol=args.app_protocol,
            access_log=args.access_log,
            worker_argv=_worker_argv(parser, "sidecar", sys.argv[1:] if argv is None else argv)
            if args.workers > 1 and args.worker is None else None,
        )
    if args.command == "sql":
        from tracemesh.query.cli import run_sql

        return run_sql(args.sql, store=args.store, api=args.api, fmt=args.format)
    if args.command == "demo":
        from tracemesh.demo import run

        return run(seconds=args.seconds, store=args.store, rps=args.rps)
    if args.command == "proxy-status":
        from tracemesh._control_cli import proxy_status

        return proxy_status(args.api or f"http://{DEFAULT_API}", as_json=args.json)
    if args.command in ("validate", "apply", "get", "history", "rollback"):
        from tracemesh._config_cli import run_config_command

        return run_config_command(args)
    if args.command in ("ca", "token", "cert"):
        from tracemesh._identity_cli import run_identity_command

        return run_identity_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
