"""A ClickHouse server or cluster as the store, through clickhouse-driver's native protocol.

``--clickhouse clickhouse://user:password@host:9000/db?secure=1&cluster=NAME`` (``clickhouses://``
implies TLS; ``verify=0`` skips certificate checks, ``ca=FILE`` names a CA bundle). The same
migrations as the embedded store create the same tables. With ``cluster=NAME`` every DDL statement
runs ``ON CLUSTER``, each table is created as ``<name>_local`` on ``Replicated*MergeTree`` and
fronted by ``<name>`` on ``Distributed``; the collector writes to and reads from the Distributed
tables (``insert_distributed_sync = 1``, so an insert returns once the shards have it).

Inserts are columnar (``columnar=True``) and carry the write-ahead log's deduplication token; a
server too old to know ``insert_deduplication_token`` (it would ignore it silently) is detected at
connect from ``system.settings``, logged, and written without it (replay after a crash may then
store a batch twice). Where the server knows ``exclude_materialize_skip_indexes_on_insert``, inserts
leave the attribute-map indexes to merges, as the embedded store's do (``_schema.DEFERRED_INDEXES``).

Reads: one read-only statement with ``readonly = 1`` set on the query, so the server itself refuses
writes. The native protocol returns rows, not formatted text, so the query API's formats are
rendered here: JSON, JSONEachRow, CSV(WithNames), TSV(WithNames), PrettyCompact(NoEscapes).

Thread safety: one client per thread (clickhouse-driver clients are not thread-safe); a failed
connection is re-opened by the next call.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import re
import threading
from dataclasses import dataclass
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

from tracemesh.collector._encode import MapColumn, MapListColumn, SpanColumns
from tracemesh.collector._schema import (
    DEFER_INDEXES_SETTING,
    TRACE_COLUMNS,
    SchemaOptions,
    insert_settings,
)
from tracemesh.query import QueryError, prepare_readonly

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
SEND_RECEIVE_TIMEOUT_S = 120
#: Output formats the server store can render itself.
READ_FORMATS = frozenset({"JSON", "JSONEachRow", "CSV", "CSVWithNames", "TSV", "TSVWithNames", "TabSeparated",
                          "TabSeparatedWithNames", "PrettyCompact", "PrettyCompactNoEscapes"})


@dataclass(frozen=True)
class ServerTarget:
    host: str
    port: int
    user: str
    password: str
    database: str
    secure: bool
    verify: bool = True
    ca_certs: str | None = None
    cluster: str | None = None

    @classmethod
    def parse(cls, url: str) -> "ServerTarget":
        """``clickhouse[s]://[user[:password]@]host[:port][/database][?secure=1&verify=0&ca=F&cluster=C]``."""
        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ValueError(f"expected clickhouse://user:password@host:9000/db, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(q) - {"secure", "verify", "ca", "cluster"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}; known: secure, verify, ca, cluster")
        secure = parts.scheme == "clickhouses" or q.get("secure", "0") in ("1", "true", "yes")
        database = unquote(parts.path.lstrip("/")) or "default"
        cluster = q.get("cluster") or None
        for name, value in (("database", database), ("cluster", cluster or "x")):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                raise ValueError(f"{name} {value!r} must be a plain identifier")
        try:
            port = parts.port or (9440 if secure else 9000)
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}: {exc}") from None
        return cls(parts.hostname, port, unquote(parts.username or "default"), unquote(parts.password or ""),
                   database, secure, q.get("verify", "1") not in ("0", "false", "no"), q.get("ca"), cluster)

    def redacted(self) -> str:
        scheme = "clickhouses" if self.secure else "clickhouse"
        cluster = f"?cluster={self.cluster}" if self.cluster else ""
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.database}{cluster}"


# -- cluster DDL -------------------------------------------------------------------------------

_CREATE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+) \(", re.S)
_ENGINE = re.compile(r"ENGINE = (\w*)MergeTree\(\)")
_MV = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+)", re.S)
_ALTER_SETTING = re.compile(r"^ALTER TABLE (\w+) MODIFY SETTING (\w+) = (.+)$")


def cluster_ddl(sql: str, cluster: str, database: str) -> list[str]:
    """One embedded-store DDL statement as the statements that make it on a cluster."""
    m = _CREATE.match(sql)
    if m:
        name = m.group(1)
        local = _CREATE.sub(f"CREATE TABLE IF NOT EXISTS {name}_local ON CLUSTER {cluster} (", sql, count=1)
        local = _ENGINE.sub(lambda e: f"ENGINE = Replicated{e.group(1)}MergeTree("
                            f"'/clickhouse/tables/{{shard}}/{database}/{name}_local', '{{replica}}')", local)
        dist = (f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {cluster} AS {name}_local "
                f"ENGINE = Distributed({cluster}, {database}, {name}_local, rand())")
        return [local, dist]
    m = _MV.match(sql)
    if m:
        # the view runs where the rows land: on each shard's local table
        out = _MV.sub(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {m.group(1)} ON CLUSTER {cluster} TO {m.group(2)}_local", sql, count=1)
        return [re.sub(r"\bFROM (\w+)\b", r"FROM \1_local", out)]
    m = _ALTER_SETTING.match(sql)
    if m:
        if m.group(2) == "non_replicated_deduplication_window":
            return []  # replicated tables deduplicate by token already (replicated_deduplication_window)
        return [f"ALTER TABLE {m.group(1)}_local ON CLUSTER {cluster} MODIFY SETTING {m.group(2)} = {m.group(3)}"]
    raise ValueError(f"no cluster form for: {sql[:80]}")


# -- rendering rows ----------------------------------------------------------------------------

def _jsonable(v):
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat(sep=" ") if isinstance(v, _dt.datetime) else v.isoformat()
    if isinstance(v, (UUID, IPv4Address, IPv6Address, Decimal)):
        return str(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v != v:
        return None
    return v


def _text(v) -> str:
    v = _jsonable(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if v is None:
        return "\\N"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render(rows: list[tuple], columns: list[tuple[str, str]], fmt: str) -> bytes:
    names = [c[0] for c in columns]
    if fmt == "JSON":
        data = [dict(zip(names, map(_jsonable, r))) for r in rows]
        doc = {"meta": [{"name": n, "type": t} for n, t in columns], "data": data, "rows": len(rows)}
        return (json.dumps(doc, ensure_ascii=False, indent=1) + "\n").encode()
    if fmt == "JSONEachRow":
        return "".join(json.dumps(dict(zip(names, map(_jsonable, r))), ensure_ascii=False) + "\n" for r in rows).encode()
    if fmt in ("CSV", "CSVWithNames"):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        if fmt == "CSVWithNames":
            w.writerow(names)
        for r in rows:
            w.writerow([v if isinstance(v, (int, float)) and not isinstance(v, bool) else _text(v) for v in r])
        return buf.getvalue().encode()
    if fmt in ("TSV", "TabSeparated", "TSVWithNames", "TabSeparatedWithNames"):
        esc = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n"})
        lines = ["\t".join(names)] if fmt.endswith("Names") else []
        lines += ["\t".join(_text(v).translate(esc) for v in r) for r in rows]
        return ("\n".join(lines) + ("\n" if lines else "")).encode()
    if fmt in ("PrettyCompact", "PrettyCompactNoEscapes"):
        from tracemesh.query.render import table

        return (table(names, [[_text(v) for v in r] for r in rows]) + "\n").encode()
    raise QueryError(f"format {fmt} is not available with a ClickHouse server store; one of {', '.join(sorted(READ_FORMATS))}")


# -- the store ---------------------------------------------------------------------------------

def _insert_columns(batch) -> tuple[list[str], list[list]]:
    if isinstance(batch, SpanColumns):
        names, cols = list(TRACE_COLUMNS), batch.columns()
    else:
        names, cols = list(batch.columns), list(batch.columns.values())
    out = []
    for c in cols:
        if isinstance(c, (MapColumn, MapListColumn)):
            out.append(list(c))
        else:
            out.append(c)
    return names, out


class ServerStore:
    """The store on a ClickHouse server; the same surface as EmbeddedStore."""

    def __init__(self, target: ServerTarget) -> None:
        import clickhouse_driver  # noqa: F401 - fail early with ImportError if missing

        self.target = target
        self.path = target.redacted()
        self._local = threading.local()
        self._tokens = True
        self._defer_indexes = False
        self._has_format_query: bool | None = None
        self._table_settings: dict[str, bool] = {}  # MergeTree setting -> whether the server knows it
        self.server_version = self._run("SELECT version()")[0][0]
        # old servers take an unknown query setting silently: ask rather than rely on an error
        known = {r[0] for r in self._run("SELECT name FROM system.settings WHERE name IN %(n)s",
                                         {"n": ("insert_deduplication_token", DEFER_INDEXES_SETTING)})}
        self._tokens = "insert_deduplication_token" in known
        # attribute-map indexes left to merges (see _schema.DEFERRED_INDEXES) where the server can
        self._defer_indexes = DEFER_INDEXES_SETTING in known
        if not self._tokens:
            log.warning("ClickHouse %s does not know insert_deduplication_token: replay after a crash may store a "
                        "batch twice; 22.3 or newer gives exactly-once", self.server_version)

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            from clickhouse_driver import Client

            t = self.target
            c = self._local.client = Client(
                t.host, port=t.port, user=t.user, password=t.password, database=t.database, secure=t.secure,
                verify=t.verify, ca_certs=t.ca_certs, connect_timeout=CONNECT_TIMEOUT_S,
                send_receive_timeout=SEND_RECEIVE_TIMEOUT_S, client_name="tracemesh-collector",
                settings={"insert_distributed_sync": 1} if t.cluster else {},
            )
        return c

    def _run(self, sql: str, *args, **kw):
        try:
            return self._client().execute(sql, *args, **kw)
        except Exception as exc:
            self._drop_client()
            raise QueryError(_message(exc)) from None

    def _drop_client(self) -> None:
        c = getattr(self._local, "client", None)
        self._local.client = None
        if c is not None:
            try:
                c.disconnect()
            except Exception:
                pass

    # -- schema ------------------------------------------------------------------------------

    def execute(self, sql: str) -> None:
        m = _ALTER_SETTING.match(sql)
        if m and not self._knows_table_setting(m.group(2)):
            # a tuning newer than the server (merge_selector_base, say): the tables work without it
            log.warning("ClickHouse %s does not know the table setting %s: %s left as it is",
                        self.server_version, m.group(2), m.group(1))
            return
        if self.target.cluster and not sql.startswith("INSERT"):
            if sql.startswith("CREATE TABLE IF NOT EXISTS tracemesh_schema_migrations"):
                sql = sql.replace("tracemesh_schema_migrations (", f"tracemesh_schema_migrations ON CLUSTER {self.target.cluster} (", 1)
                self._run(sql)
                return
            for stmt in cluster_ddl(sql, self.target.cluster, self.target.database):
                self._run(stmt)
            return
        self._run(sql)

    def _knows_table_setting(self, name: str) -> bool:
        if name not in self._table_settings:  # asked once: a migration sets it on every table
            try:
                rows = self._run("SELECT count() FROM system.merge_tree_settings WHERE name = %(n)s", {"n": name})
                self._table_settings[name] = bool(rows[0][0])
            except QueryError:
                self._table_settings[name] = False  # a server too old for the table
        return self._table_settings[name]

    def query_write(self, sql: str, fmt: str = "TSVRaw") -> bytes:
        rows = self._run(sql)
        return "".join("\t".join(map(str, r)) + "\n" for r in rows).encode()

    def ensure_schema(self, opts: SchemaOptions = SchemaOptions()) -> list[int]:
        from tracemesh.collector._migrations import migrate

        return migrate(self.execute, self.query_write, opts)

    def announce(self, api_url: str) -> None:
        pass  # a server is shared by design: nobody needs pointing to our API

    # -- writing -----------------------------------------------------------------------------

    def insert_rows(self, table: str, batch, token: str = "") -> int:
        n = len(batch)
        if not n:
            return 0
        names, cols = _insert_columns(batch)
        settings = insert_settings(table, token if self._tokens else "", defer=self._defer_indexes)
        sql = f"INSERT INTO {table} ({', '.join(f'`{c}`' for c in names)}) VALUES"
        try:
            self._client().execute(sql, cols, columnar=True, settings=settings)
        except Exception as exc:
            self._drop_client()
            raise QueryError(_message(exc)) from None
        return n

    # -- reading -----------------------------------------------------------------------------

    def _format_query(self, sql: str) -> str:
        if self._has_format_query is None:
            try:
                self._client().execute("SELECT formatQuery('SELECT 1')")
                self._has_format_query = True
            except Exception:
                self._drop_client()
                self._has_format_query = False  # old server: its readonly setting alone decides
        if not self._has_format_query:
            return sql
        return self._run("SELECT formatQuery(%(q)s)", {"q": sql})[0][0]

    def query_readonly(self, sql: str, fmt: str = "JSON") -> bytes:
        if fmt not in READ_FORMATS:
            raise QueryError(f"output format {fmt!r} is not available with a ClickHouse server store "
                             f"(rows come over the native protocol); one of {', '.join(sorted(READ_FORMATS))}")
        canonical = prepare_readonly(sql, self._format_query)
        rows, columns = self._run(canonical, with_column_types=True,
                                  settings={"readonly": 1, "max_execution_time": 120})
        return render(rows, columns, fmt)

    def close(self) -> None:
        self._drop_client()


def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return re.split(r"\.?\s*Stack trace", msg, maxsplit=1)[0].strip()
