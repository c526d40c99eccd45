"""The embedded store: real ClickHouse in-process (chdb) on a data directory.

One process owns a data directory. We take an ``flock`` on ``DIR/.tracemesh.lock`` before chdb
opens it, so a second opener gets :class:`StoreBusy` with the owning collector's query API URL
(from ``DIR/collector.json``) instead of chdb's low-level lock error. Writes go through one
session; reads from users go through a second session pinned to ``readonly = 1`` so ClickHouse
itself refuses anything that would change data, whatever the statement looks like.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pyarrow as pa

from tracemesh.collector._encode import SpanColumns
from tracemesh.collector._schema import TRACE_COLUMNS, SchemaOptions, insert_settings
from tracemesh.query import QueryError, prepare_readonly

LOCK_FILE = ".tracemesh.lock"
OWNER_FILE = "collector.json"
#: A user query runs at most this long (seconds); the API must not be tied up forever.
QUERY_MAX_EXECUTION_S = 120
#: Output formats a reader may ask for; all of them write to the answer, none to a file.
READ_FORMATS = frozenset({
    "PrettyCompactNoEscapes", "PrettyCompact", "Pretty", "PrettyNoEscapes", "JSON", "JSONCompact",
    "JSONEachRow", "CSV", "CSVWithNames", "TSV", "TSVWithNames", "TSVRaw", "TabSeparated",
    "TabSeparatedWithNames", "Markdown", "Vertical", "Values", "Arrow", "ArrowStream", "Parquet",
})

_MAP = pa.map_(pa.string(), pa.string())
_TS = pa.timestamp("ns")
_SPAN_SCHEMA = pa.schema([
    ("Timestamp", _TS), ("TraceId", pa.string()), ("SpanId", pa.string()), ("ParentSpanId", pa.string()),
    ("TraceState", pa.string()), ("SpanName", pa.string()), ("SpanKind", pa.string()), ("ServiceName", pa.string()),
    ("ResourceAttributes", _MAP), ("ScopeName", pa.string()), ("ScopeVersion", pa.string()),
    ("SpanAttributes", _MAP), ("Duration", pa.uint64()), ("StatusCode", pa.string()), ("StatusMessage", pa.string()),
    ("Events.Timestamp", pa.list_(_TS)), ("Events.Name", pa.list_(pa.string())), ("Events.Attributes", pa.list_(_MAP)),
    ("Links.TraceId", pa.list_(pa.string())), ("Links.SpanId", pa.list_(pa.string())),
    ("Links.TraceState", pa.list_(pa.string())), ("Links.Attributes", pa.list_(_MAP)),
])
assert tuple(_SPAN_SCHEMA.names) == TRACE_COLUMNS


class StoreBusy(Exception):
    """Another process owns the store. ``api_url`` is its collector's query API, when known."""

    def __init__(self, path: str, api_url: str | None, pid: int | None) -> None:
        owner = f"collector pid {pid}" if pid else "another process"
        super().__init__(f"the store {path} is in use by {owner}")
        self.path, self.api_url, self.pid = path, api_url, pid


def _sql_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def settings_sql(settings: dict[str, str]) -> str:
    """`` SETTINGS a = 'x', b = 'y'`` for an INSERT (string values), or nothing."""
    if not settings:
        return ""
    return " SETTINGS " + ", ".join(f"{k} = '{_sql_quote(v)}'" for k, v in settings.items())


def _chdb_message(exc: Exception) -> str:
    msg = str(exc).strip()
    # chdb wraps ClickHouse's message; keep ClickHouse's words, drop the stack noise
    return msg.split("\nStack trace")[0]


def spans_to_arrow(cols: SpanColumns) -> pa.Table:
    arrays = [col.arrow() if hasattr(col, "arrow") else pa.array(col, type=f.type)
              for col, f in zip(cols.columns(), _SPAN_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=_SPAN_SCHEMA)


def _arrow_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


class EmbeddedStore:
    """chdb on *path*. Thread-safe; ``close()`` releases the directory for another process."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        from chdb import session

        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise FileNotFoundError(f"no store at {self.path}")
        self._lock_fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            owner = self._read_owner()
            raise StoreBusy(str(self.path), owner.get("api_url"), owner.get("pid")) from None
        try:
            self._writer = session.Session(str(self.path))
            self._reader = session.Session(str(self.path))
            self._reader.query(f"SET max_execution_time = {QUERY_MAX_EXECUTION_S}")
            self._reader.query("SET readonly = 1")
        except Exception:
            os.close(self._lock_fd)
            raise
        self._write_lock = threading.Lock()
        self._closed = False
        self.native = None  # a NativeIngest, once enable_native() has set it up

    def _read_owner(self) -> dict:
        try:
            return json.loads((self.path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}

    # -- ownership ---------------------------------------------------------------------------

    def announce(self, api_url: str) -> None:
        """Say who owns the store, so readers that find it busy can be pointed to *api_url*."""
        tmp = self.path / (OWNER_FILE + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "api_url": api_url}))
        os.replace(tmp, self.path / OWNER_FILE)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            (self.path / OWNER_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        for s in (self._reader, self._writer):
            try:
                s.close()
            except Exception:
                pass
        os.close(self._lock_fd)

    # -- writing -----------------------------------------------------------------------------

    def execute(self, sql: str) -> None:
        with self._write_lock:
            try:
                self._writer.query(sql)
            except Exception as exc:
                raise QueryError(_chdb_message(exc)) from None

    def ensure_schema(self, opts: SchemaOptions = SchemaOptions()) -> list[int]:
        """Apply the migrations this store has not seen; return the versions applied."""
        from tracemesh.collector._migrations import migrate

        return migrate(self.execute, self.query_write, opts)

    def insert_rows(self, table: str, batch, token: str = "") -> int:
        """Insert *batch* (SpanColumns or any object with ``.arrow()``) into *table* in one columnar
        INSERT. With *token*, ClickHouse drops the insert if one with the same token already
        arrived (replay after a crash)."""
        n = len(batch)
        if not n:
            return 0
        if type(batch).__name__ == "NativeTraces":
            if self.native is not None and len(batch) >= self.native.min_spans:
                return self.native.insert(batch, token)
            # small batches: the Python encoder's fixed cost is far lower. The choice depends only on
            # the run (its valid spans), so a replay takes the same path and its token still matches.
            from tracemesh.collector._native import encode_payloads

            batch = encode_payloads(batch)
        arrow = spans_to_arrow(batch) if isinstance(batch, SpanColumns) else batch.arrow()
        self.insert_block(table, _arrow_stream(arrow), "ArrowStream", token)
        return n

    def insert_block(self, table: str, data: bytes, fmt: str, token: str = "") -> None:
        """Insert *data*, already in ClickHouse input format *fmt* (``ArrowStream``, ``Native``)."""
        with self._write_lock:
            try:
                with self._writer.send_insert(f"INSERT INTO {table}{settings_sql(insert_settings(table, token))}", fmt) as ins:
                    ins.append(data)
                    ins.finish()
            except Exception as exc:
                raise QueryError(_chdb_message(exc)) from None

    def enable_native(self, workdir, min_spans: int | None = None, c_encoder: bool | None = None) -> None:
        """Store trace batches kept as protobuf bytes (NativeTraces) natively from now on: through
        the C encoder when it is built (*c_encoder* None) or asked for (True), every batch; else
        ClickHouse parses them itself, for batches of at least *min_spans* valid spans (default
        :data:`NATIVE_MIN_SPANS`; see _native.py)."""
        from tracemesh.collector._native import NATIVE_MIN_SPANS, NativeIngest

        native = NativeIngest(self, workdir, NATIVE_MIN_SPANS if min_spans is None else min_spans, c_encoder)
        native.setup()
        self.native = native

    def query_write(self, sql: str, fmt: str = "TSVRaw") -> bytes:
        """Run *sql* on the writer session (schema management; never with user input)."""
        with self._write_lock:
            try:
                return self._writer.query(sql, fmt).bytes()
            except Exception as exc:
                raise QueryError(_chdb_message(exc)) from None

    def insert_spans(self, cols: SpanColumns) -> int:
        """Insert *cols* in one columnar INSERT; return the rows written."""
        if not len(cols):
            return 0
        data = _arrow_stream(spans_to_arrow(cols))
        with self._write_lock:
            try:
                with self._writer.send_insert(f"INSERT INTO otel_traces{settings_sql(insert_settings('otel_traces'))}",
                                              "ArrowStream") as ins:
                    ins.append(data)
                    ins.finish()
            except Exception as exc:
                raise QueryError(_chdb_message(exc)) from None
        return len(cols)

    # -- reading -----------------------------------------------------------------------------

    def _format_query(self, sql: str) -> str:
        try:
            # a literal, not a query parameter: chdb keeps parameters on the session, so another
            # thread's query on it drops them ("Substitution `q` is not set") under concurrent API use
            res = self._reader.query(f"SELECT formatQuery('{_sql_quote(sql)}')", "TSVRaw")
        except Exception as exc:
            raise QueryError(_chdb_message(exc)) from None
        return res.bytes().decode()

    def query_readonly(self, sql: str, fmt: str = "JSON") -> bytes:
        """Run one read-only statement as typed by a user; raise QueryError with ClickHouse's words."""
        if fmt not in READ_FORMATS:
            raise QueryError(f"unknown output format {fmt!r}; one of {', '.join(sorted(READ_FORMATS))}")
        canonical = prepare_readonly(sql, self._format_query)
        try:
            return self._reader.query(canonical, fmt).bytes()
        except Exception as exc:
            raise QueryError(_chdb_message(exc)) from None


def open_store(path: str | os.PathLike) -> EmbeddedStore:
    """Open an existing store for reading (``tracemesh sql --store``). Raises StoreBusy."""
    return EmbeddedStore(path, create=False)
