"""The ``tracemesh`` command. Argument parsing only; each subcommand lives in its package.

argparse already answers unknown flags and missing arguments with a usage message and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from tracemesh.net import parse_addr

DEFAULT_OTLP_GRPC = "127.0.0.1:4317"
DEFAULT_API = "127.0.0.1:7070"  # collector query API; 7070 is unassigned and easy to remember
DEFAULT_STORE = "tracemesh-data"


def _addr(text: str):
    try:
        return parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracemesh", description="A tracing-first observability service mesh.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("collector", help="run the collector: OTLP receiver, ClickHouse store, query API")
    c.add_argument("--store", default=DEFAULT_STORE, help="embedded ClickHouse (chdb) data directory (default: %(default)s)")
    c.add_argument("--otlp-grpc", type=_addr, default=DEFAULT_OTLP_GRPC, help="OTLP/gRPC listen address (default: %(default)s)")
    c.add_argument("--api", type=_addr, default=DEFAULT_API, help="HTTP query API listen address (default: %(default)s)")

    s = sub.add_parser("sidecar", help="run a sidecar proxy beside one workload")
    s.add_argument("--service", required=True, help="the workload's service name")
    s.add_argument("--version", default="v1", help="the workload's version label (default: %(default)s)")
    s.add_argument("--app", type=_addr, required=True, help="HOST:PORT of the local app")
    s.add_argument("--inbound", type=_addr, required=True, help="listen address that fronts the app")
    s.add_argument("--outbound", type=_addr, required=True, help="listen address for the app's outgoing calls")
    s.add_argument("--collector", type=_addr, required=True, help="collector OTLP/gRPC address")
    s.add_argument("--config", help="static mesh config (YAML): services, endpoints, routes")

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "collector":
        from tracemesh.collector import serve

        return serve(store=args.store, otlp_grpc=args.otlp_grpc, api=args.api)
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
        )
    if args.command == "sql":
        from tracemesh.query.cli import run_sql

        return run_sql(args.sql, store=args.store, api=args.api, fmt=args.format)
    if args.command == "demo":
        from tracemesh.demo import run

        return run(seconds=args.seconds, store=args.store, rps=args.rps)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
