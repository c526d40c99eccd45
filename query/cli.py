"""``tracemesh sql``: read-only SQL over the store, embedded or through a collector's query API."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from tracemesh.query._readonly import QueryError

#: ``--format`` choice -> ClickHouse output format. NoEscapes: no ANSI colour codes in pipes.
FORMATS = {"table": "PrettyCompactNoEscapes", "json": "JSON", "csv": "CSVWithNames"}

#: A query API answer larger than this is cut off rather than filling memory.
MAX_API_RESPONSE_BYTES = 512 * 1024 * 1024
API_TIMEOUT_S = 120.0


def query_api(api: str, sql: str, clickhouse_format: str, timeout: float = API_TIMEOUT_S) -> bytes:
    """POST *sql* to a collector's query API; raise QueryError with ClickHouse's message."""
    base = api if "://" in api else f"http://{api}"
    url = f"{base.rstrip('/')}/api/sql?" + urllib.parse.urlencode({"format": clickhouse_format})
    req = urllib.request.Request(url, data=sql.encode(), method="POST", headers={"Content-Type": "text/plain"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(MAX_API_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        body = exc.read(64 * 1024)
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace") or f"HTTP {exc.code}"
        raise QueryError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueryError(f"cannot reach the query API at {base}: {reason}") from None


def stats_api(api: str, timeout: float = 10.0) -> dict:
    """GET a collector's ``/api/stats``; QueryError when it cannot be reached."""
    base = (api if "://" in api else f"http://{api}").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/api/stats", timeout=timeout) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise QueryError(f"cannot reach the query API at {base}: {getattr(exc, 'reason', exc)}") from None


def query_store(store: str, sql: str, clickhouse_format: str) -> bytes:
    """Open the embedded store at *store* and run *sql* read-only.

    Raises QueryError; when a running collector owns the store, the message points to its API.
    """
    from tracemesh.collector import StoreBusy, open_store

    if not os.path.isdir(store):
        raise QueryError(f"no store at {store!r}: run `tracemesh collector --store {store}` or `tracemesh demo` first")
    try:
        st = open_store(store)
    except StoreBusy as exc:
        hint = f"tracemesh sql --api {exc.api_url} ..." if exc.api_url else "tracemesh sql --api URL ..."
        raise QueryError(f"{exc}; query it through the collector's API instead: {hint}") from None
    try:
        return st.query_readonly(sql, clickhouse_format)
    finally:
        st.close()


def run_sql(sql: str, *, store: str | None, api: str | None, fmt: str = "table") -> int:
    from tracemesh.cli import DEFAULT_STORE

    clickhouse_format = FORMATS[fmt]
    try:
        if api:
            out = query_api(api, sql, clickhouse_format)
        else:
            out = query_store(store or DEFAULT_STORE, sql, clickhouse_format)
    except QueryError as exc:
        print(f"tracemesh sql: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0
