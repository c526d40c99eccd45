"""``tracemesh validate|apply|get|history|rollback``: the mesh config from the command line.

``validate`` runs locally (no collector needed) unless given ``--api``; the others talk to the
collector's query API (``--api``, default ``$TRACEMESH_API`` or http://127.0.0.1:7070), which owns
the versioned history. Exit status: 0 done, 1 refused (the errors, file:line: field: what was
expected, on stderr) or the collector unreachable; argparse's 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CONFIG_COMMANDS = ("validate", "apply", "get", "history", "rollback")
#: Generous for a config of a few MiB on a busy collector; the apply itself takes milliseconds.
HTTP_TIMEOUT_S = 60.0
FILES_TYPE = "application/vnd.tracemesh.files+json"


def _default_api() -> str:
    from tracemesh.cli import DEFAULT_API

    return os.environ.get("TRACEMESH_API") or f"http://{DEFAULT_API}"


def add_config_commands(sub) -> None:
    api_help = "the collector's query API URL (default: $TRACEMESH_API or http://127.0.0.1:7070)"

    v = sub.add_parser("validate", help="check mesh config files (locally, or against the collector's current config with --api)")
    v.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE",
                   help="a YAML file of one or more documents; repeat for several; '-' reads stdin")
    v.add_argument("--api", default=None, help="validate as `apply` would, merged into this collector's current config")
    v.add_argument("--replace", action="store_true", help="with --api: as `apply --replace` would")

    a = sub.add_parser("apply", help="apply mesh config files to the collector: a new config version, all documents or none")
    a.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE",
                   help="a YAML file of one or more documents; repeat for several; '-' reads stdin")
    a.add_argument("--replace", action="store_true",
                   help="the files are the whole config (default: merge into the current one, object by object)")
    a.add_argument("-m", "--message", default=None, help="a note kept in the history (default: the file names)")
    a.add_argument("--api", default=None, help=api_help)

    g = sub.add_parser("get", help="print the config in force (or an earlier version)")
    g.add_argument("--version", type=int, default=None, metavar="N", help="this version instead of the current one")
    g.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    g.add_argument("--api", default=None, help=api_help)

    h = sub.add_parser("history", help="list the config versions")
    h.add_argument("-o", "--output", choices=("table", "json"), default="table")
    h.add_argument("--api", default=None, help=api_help)

    r = sub.add_parser("rollback", help="make an earlier version's config the current one (as a new version)")
    r.add_argument("version", type=int, metavar="VERSION")
    r.add_argument("--api", default=None, help=api_help)


class _Failed(Exception):
    """Say this on stderr and exit 1; *located*: the message already says where (file:line: field:)."""

    def __init__(self, message: str, located: bool = False) -> None:
        super().__init__(message)
        self.located = located


def _read_files(names: list[str]) -> list[tuple[str, str]]:
    from tracemesh.proxy._config import MAX_CONFIG_BYTES

    out = []
    for name in names:
        try:
            data = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1) if name == "-" else open(name, "rb").read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise _Failed(f"{name}: cannot read: {exc.strerror or exc}") from None
        source = "<stdin>" if name == "-" else name
        if len(data) > MAX_CONFIG_BYTES:
            raise _Failed(f"{source}: larger than the {MAX_CONFIG_BYTES} byte limit")
        try:
            out.append((source, data.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise _Failed(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return out


def _call(api: str | None, method: str, path: str, params: dict | None = None,
          files: list[tuple[str, str]] | None = None) -> dict | str:
    base = api or _default_api()
    base = (base if "://" in base else f"http://{base}").rstrip("/")
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v not in (None, False)})
    url = f"{base}{path}" + (f"?{query}" if query else "")
    body, headers = None, {}
    if files is not None:
        if len(files) == 1:
            body = files[0][1].encode()
            headers["content-type"] = "application/yaml"
            url += ("&" if query else "?") + urllib.parse.urlencode({"source": files[0][0]})
        else:
            body = json.dumps({"files": [{"source": s, "text": t} for s, t in files]}).encode()
            headers["content-type"] = FILES_TYPE
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            raw = resp.read()
            ctype = resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}: {raw.decode(errors='replace').strip()}"
        # a refused config already says where (file:line: field: ...)
        raise _Failed(message, located=exc.code == 400 and files is not None) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Failed(f"cannot reach the collector at {base}: {getattr(exc, 'reason', exc)}") from None
    return json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def run_config_command(args: argparse.Namespace) -> int:
    prog = f"tracemesh {args.command}"
    try:
        return _run(args)
    except _Failed as exc:
        print(str(exc) if exc.located else f"{prog}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "validate":
        files = _read_files(args.files)
        if args.api is None:
            if args.replace:
                raise _Failed("--replace goes with --api (local validation always takes the files as the whole config)")
            from tracemesh.collector._config_store import describe
            from tracemesh.proxy._config import ConfigError, compose_config

            try:
                cfg, _ = compose_config(files, None, strict=True)
            except ConfigError as exc:
                raise _Failed(str(exc), located=True) from None
            print(f"{', '.join(s for s, _ in files)}: valid: {describe(cfg)}")
            return 0
        got = _call(args.api, "POST", "/api/config/validate", {"replace": "1" if args.replace else None}, files)
        print(f"{', '.join(s for s, _ in files)}: valid{' as the whole config' if args.replace else ' merged into the current config'}: "
              f"{got['summary']}")
        return 0
    if cmd == "apply":
        files = _read_files(args.files)
        got = _call(args.api, "POST", "/api/config", {"replace": "1" if args.replace else None,
                                                       "message": args.message}, files)
        if got["changed"]:
            print(f"applied {', '.join(s for s, _ in files)}: version {got['version']} ({got['summary']})")
        else:
            print(f"unchanged: version {got['version']} is already this config")
        return 0
    if cmd == "get":
        params = {"version": args.version, "format": args.output}
        got = _call(args.api, "GET", "/api/config", params)
        sys.stdout.write(got if isinstance(got, str) else json.dumps(got, indent=2) + "\n")
        return 0
    if cmd == "history":
        got = _call(args.api, "GET", "/api/config/history")
        if args.output == "json":
            print(json.dumps(got, indent=2))
            return 0
        if not got["versions"]:
            print("no config applied yet")
            return 0
        rows = [(("* " if v["version"] == got["current"] else "  ") + str(v["version"]), _when(v["applied_at"]),
                 str(v["services"]), str(v["routes"]), str(v["policies"]), str(v["canaries"]), v["digest"][:12],
                 v["message"]) for v in got["versions"]]
        head = ("  VERSION", "APPLIED (UTC)", "SERVICES", "ROUTES", "POLICIES", "CANARIES", "DIGEST", "MESSAGE")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0
    if cmd == "rollback":
        got = _call(args.api, "POST", "/api/config/rollback", {"version": str(args.version)})
        if got["changed"]:
            print(f"rolled back to version {args.version}'s config: now version {got['version']}")
        else:
            print(f"unchanged: version {got['version']} already has version {args.version}'s config")
        return 0
    raise AssertionError(cmd)
