"""The embedded store on real chdb (collector/_store.py, collector/_schema.py).

chdb allows one embedded data path per process: this module opens the session's one path
(``chdb_dir``) once and closes it at the end; second openers run in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tracemesh.collector import EmbeddedStore, open_store
from tracemesh.collector._encode import SpanColumns, encode_traces
from tracemesh.collector._schema import DEFERRED_INDEXES, SchemaOptions, insert_settings, trace_tables
from tracemesh.collector._store import settings_sql
from tracemesh.query import QueryError, ReadOnlyError

T0 = 1_700_000_000_123_456_789  # 2023-11-14, nanoseconds
MAP = "Map(LowCardinality(String), String)"

#: REFERENCE.md's otel_traces, in order, as system.columns shows it: ClickHouse flattens a Nested
#: column (flatten_nested = 1, the default the exporter's tables are created with) into one
#: ``Name.Field Array(T)`` column per field.
EXPECTED_COLUMNS = [
    ("Timestamp", "DateTime64(9)"),
    ("TraceId", "String"),
    ("SpanId", "String"),
    ("ParentSpanId", "String"),
    ("TraceState", "String"),
    ("SpanName", "LowCardinality(String)"),
    ("SpanKind", "LowCardinality(String)"),
    ("ServiceName", "LowCardinality(String)"),
    ("ResourceAttributes", MAP),
    ("ScopeName", "String"),
    ("ScopeVersion", "String"),
    ("SpanAttributes", MAP),
    ("Duration", "UInt64"),
    ("StatusCode", "LowCardinality(String)"),
    ("StatusMessage", "String"),
    ("Events.Timestamp", "Array(DateTime64(9))"),
    ("Events.Name", "Array(LowCardinality(String))"),
    ("Events.Attributes", f"Array({MAP})"),
    ("Links.TraceId", "Array(String)"),
    ("Links.SpanId", "Array(String)"),
    ("Links.TraceState", "Array(String)"),
    ("Links.Attributes", f"Array({MAP})"),
]


class _Box:
    store: EmbeddedStore


@pytest.fixture(scope="module")
def box(chdb_dir):
    b = _Box()
    b.store = EmbeddedStore(chdb_dir)
    b.store.ensure_schema()
    yield b
    b.store.close()


@pytest.fixture
def store(box) -> EmbeddedStore:
    return box.store


def rows(store: EmbeddedStore, sql: str) -> list[dict]:
    return json.loads(store.query_readonly(sql, "JSON"))["data"]


def new_ids() -> tuple[bytes, bytes]:
    return os.urandom(16), os.urandom(8)


def insert(store, otlp, *spans, **request_kw) -> SpanColumns:
    cols, rej = encode_traces(otlp.request(*spans, **request_kw))
    assert rej.count == 0
    assert store.insert_spans(cols) == len(cols)
    return cols


# -- the schema ----------------------------------------------------------------------------------


def test_otel_traces_columns_and_types_match_the_exporter_in_order(store):
    got = rows(store, """
        SELECT name, type, default_kind, compression_codec FROM system.columns
        WHERE database = currentDatabase() AND table = 'otel_traces' ORDER BY position""")
    physical = [(r["name"], r["type"]) for r in got if r["default_kind"] != "ALIAS"]
    assert physical == EXPECTED_COLUMNS
    aliases = {r["name"]: r["type"] for r in got if r["default_kind"] == "ALIAS"}
    assert aliases == {"ResourceAttributeItems": "Array(String)", "SpanAttributeItems": "Array(String)"}
    codecs = {r["name"]: r["compression_codec"] for r in got}
    assert codecs["Timestamp"] == "CODEC(Delta(8), ZSTD(1))"
    assert codecs["Duration"] == "CODEC(T64, ZSTD(1))"


def test_otel_traces_indexes_partitioning_and_order(store):
    idx = {(r["expr"], r["type_full"]) for r in rows(store, """
        SELECT expr, type_full FROM system.data_skipping_indices
        WHERE database = currentDatabase() AND table = 'otel_traces'""")}
    assert ("TraceId", "bloom_filter(0.001)") in idx
    for m in ("ResourceAttributes", "SpanAttributes"):
        assert (f"mapKeys({m})", "bloom_filter(0.01)") in idx
        assert (f"mapValues({m})", "bloom_filter(0.01)") in idx
    assert ("Duration", "minmax") in idx
    assert any(e == "lower(SpanName)" and t.startswith("tokenbf_v1(") for e, t in idx)

    [t] = rows(store, """SELECT partition_key, sorting_key, engine_full FROM system.tables
                         WHERE database = currentDatabase() AND name = 'otel_traces'""")
    assert t["partition_key"] == "toDate(Timestamp)"
    assert t["sorting_key"] in ("ServiceName, SpanName, toDateTime(Timestamp)",
                                "ServiceName, SpanName, toDateTime(Timestamp), Timestamp")
    assert "index_granularity = 8192" in t["engine_full"]
    assert "ttl_only_drop_parts = 1" in t["engine_full"]
    assert "TTL" not in t["engine_full"]  # no TTL unless asked for


def test_trace_id_ts_table_and_its_materialized_view(store):
    cols = rows(store, """SELECT name, type FROM system.columns
                          WHERE database = currentDatabase() AND table = 'otel_traces_trace_id_ts' ORDER BY position""")
    assert [(c["name"], c["type"]) for c in cols] == [("TraceId", "String"), ("Start", "DateTime"), ("End", "DateTime")]
    [mv] = rows(store, """SELECT engine, as_select FROM system.tables
                          WHERE database = currentDatabase() AND name = 'otel_traces_trace_id_ts_mv'""")
    assert mv["engine"] == "MaterializedView"
    assert "min(Timestamp)" in mv["as_select"] and "max(Timestamp)" in mv["as_select"]


def test_ensure_schema_is_idempotent(store):
    before = store.query_readonly("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                  "ORDER BY table, position", "TSV")
    store.ensure_schema()
    store.ensure_schema()
    after = store.query_readonly("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                 "ORDER BY table, position", "TSV")
    assert after == before


def test_ttl_option_is_applied_by_clickhouse(store):
    ddl = trace_tables(SchemaOptions(ttl_days=3))
    assert "TTL toDateTime(Timestamp) + toIntervalDay(3)" in ddl[0]
    assert "TTL Start + toIntervalDay(3)" in ddl[1]
    # run the DDL for real, in a scratch database of the same store
    store.execute("CREATE DATABASE IF NOT EXISTS ttl_check")
    store.execute(ddl[0].replace("IF NOT EXISTS otel_traces (", "IF NOT EXISTS ttl_check.otel_traces (", 1))
    [t] = rows(store, "SELECT engine_full FROM system.tables WHERE database = 'ttl_check' AND name = 'otel_traces'")
    assert "TTL toDateTime(Timestamp) + toIntervalDay(3)" in t["engine_full"]
    store.execute("DROP DATABASE ttl_check")


# -- writing and reading -----------------------------------------------------------------------------


def test_inserted_spans_read_back_column_for_column(store, otlp):
    tid, sid = new_ids()
    child = os.urandom(8)
    link_tid, link_sid = new_ids()
    root = otlp.span("GET /cart", trace_id=tid, span_id=sid, kind=Span.SPAN_KIND_SERVER, start=T0, duration=7_000_123,
                     attrs={"http.status_code": 200, "tags": ["a", "b"], "quote": "it's \\ \"x\"\t\n"},
                     trace_state="vendor=1")
    db = otlp.span("SELECT", trace_id=tid, span_id=child, parent=sid, kind=Span.SPAN_KIND_CLIENT, start=T0 + 1000,
                   duration=42, status=(Status.STATUS_CODE_ERROR, "deadlock"),
                   events=[(T0 + 1500, "exception", {"exception.message": "boom"}), (T0 + 1600, "retry", {})],
                   links=[(link_tid, link_sid, "k=v", {"why": "batch"})])
    insert(store, otlp, root, db, service="checkout", resource={"host.name": "h1"}, scope=("lib.db", "0.9"))

    got = rows(store, f"""
        SELECT toUnixTimestamp64Nano(Timestamp) AS ts, * EXCEPT Timestamp,
               arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp) AS event_ts
        FROM otel_traces WHERE TraceId = '{tid.hex()}' ORDER BY Timestamp""")
    assert len(got) == 2
    r, c = got
    assert int(r["ts"]) == T0 and int(c["ts"]) == T0 + 1000  # nanoseconds survive
    assert (r["TraceId"], r["SpanId"], r["ParentSpanId"]) == (tid.hex(), sid.hex(), "")
    assert (c["SpanId"], c["ParentSpanId"]) == (child.hex(), sid.hex())
    assert (r["SpanName"], r["SpanKind"], r["ServiceName"]) == ("GET /cart", "Server", "checkout")
    assert (c["SpanKind"], c["StatusCode"], c["StatusMessage"]) == ("Client", "Error", "deadlock")
    assert (r["StatusCode"], r["StatusMessage"], r["TraceState"]) == ("Unset", "", "vendor=1")
    assert r["ResourceAttributes"] == {"host.name": "h1", "service.name": "checkout"}
    assert (r["ScopeName"], r["ScopeVersion"]) == ("lib.db", "0.9")
    assert r["SpanAttributes"] == {"http.status_code": "200", "tags": '["a","b"]', "quote": "it's \\ \"x\"\t\n"}
    assert int(r["Duration"]) == 7_000_123 and int(c["Duration"]) == 42
    assert [int(t) for t in c["event_ts"]] == [T0 + 1500, T0 + 1600]
    assert c["Events.Name"] == ["exception", "retry"]
    assert c["Events.Attributes"] == [{"exception.message": "boom"}, {}]
    assert r["Events.Name"] == [] and r["Links.TraceId"] == []
    assert (c["Links.TraceId"], c["Links.SpanId"], c["Links.TraceState"]) == ([link_tid.hex()], [link_sid.hex()], ["k=v"])
    assert c["Links.Attributes"] == [{"why": "batch"}]
    # the ALIAS columns the exporter defines
    [items] = rows(store, f"SELECT SpanAttributeItems AS s, ResourceAttributeItems AS r FROM otel_traces "
                          f"WHERE SpanId = '{sid.hex()}'")
    assert "http.status_code=200" in items["s"] and "host.name=h1" in items["r"]


def test_insert_of_nothing_writes_nothing(store):
    assert store.insert_spans(SpanColumns()) == 0


def test_materialized_view_fills_trace_id_ts(store, otlp):
    tid, _ = new_ids()
    sec = 1_000_000_000
    # three inserts: the view sees each insert block on its own
    for start in (T0, T0 + 5 * sec, T0 + 2 * sec):
        insert(store, otlp, otlp.span(trace_id=tid, span_id=os.urandom(8), start=start))
    [r] = rows(store, f"""SELECT toUnixTimestamp(min(Start)) AS s, toUnixTimestamp(max(End)) AS e, count() AS n
                          FROM otel_traces_trace_id_ts WHERE TraceId = '{tid.hex()}'""")
    assert (int(r["s"]), int(r["e"])) == (T0 // sec, (T0 + 5 * sec) // sec)  # second resolution
    assert 1 <= int(r["n"]) <= 3
    # the lookup the trace-by-id query does: time range first, then the spans within it
    [n] = rows(store, f"""
        WITH (SELECT (min(Start), max(End)) FROM otel_traces_trace_id_ts WHERE TraceId = '{tid.hex()}') AS range
        SELECT count() AS c FROM otel_traces WHERE TraceId = '{tid.hex()}'
          AND Timestamp >= range.1 AND Timestamp <= range.2 + 1""")
    assert int(n["c"]) == 3


def test_a_replayed_insert_is_stored_once_in_both_tables(store, otlp):
    # the write-ahead log re-sends a run after a crash with the same token: ClickHouse must drop it,
    # in otel_traces and in the trace-id index its materialized view feeds
    tid, _ = new_ids()
    cols, _ = encode_traces(otlp.request(*[otlp.span(trace_id=tid, span_id=os.urandom(8)) for _ in range(3)]))
    token = f"test-{tid.hex()}:1-1:otel_traces"
    for _ in range(3):
        store.insert_rows("otel_traces", cols, token)
    [r] = rows(store, f"""SELECT (SELECT count() FROM otel_traces WHERE TraceId = '{tid.hex()}') AS spans,
                                 (SELECT count() FROM otel_traces_trace_id_ts WHERE TraceId = '{tid.hex()}') AS idx""")
    assert (int(r["spans"]), int(r["idx"])) == (3, 1)
    # a different token is a different insert
    store.insert_rows("otel_traces", cols, token + "-other")
    [r] = rows(store, f"SELECT count() AS c FROM otel_traces WHERE TraceId = '{tid.hex()}'")
    assert int(r["c"]) == 6


def test_deferred_indexes_are_exactly_the_attribute_map_indexes(store):
    got = rows(store, """SELECT table, name, expr FROM system.data_skipping_indices
                         WHERE database = currentDatabase() AND table LIKE 'otel_%' ORDER BY table, name""")
    on_maps: dict[str, set] = {}
    for r in got:
        if r["expr"].startswith(("mapKeys(", "mapValues(")):
            on_maps.setdefault(r["table"], set()).add(r["name"])
    assert {t: set(v.split(", ")) for t, v in DEFERRED_INDEXES.items()} == on_maps
    assert set(on_maps) >= {"otel_traces", "otel_logs", "otel_metrics_sum"}


def test_insert_settings_carry_the_token_and_the_deferred_indexes():
    assert insert_settings("otel_traces", "t:1-2") == {
        "insert_deduplication_token": "t:1-2",
        "exclude_materialize_skip_indexes_on_insert":
            "idx_res_attr_key, idx_res_attr_value, idx_span_attr_key, idx_span_attr_value"}
    assert insert_settings("otel_traces", defer=False) == {}  # a server that does not know the setting
    assert insert_settings("otel_traces_trace_id_ts", "t") == {"insert_deduplication_token": "t"}
    assert settings_sql(insert_settings("otel_logs", "it's")).startswith(" SETTINGS insert_deduplication_token = 'it\\'s', ")
    assert settings_sql({}) == ""


def _granules_kept(store, where: str, index: str) -> tuple[int, int]:
    """What skip index *index* keeps of otel_traces's granules for *where* (EXPLAIN indexes = 1):
    a part without the index keeps all of them."""
    plan = store.query_write(f"EXPLAIN indexes = 1 SELECT TraceId FROM otel_traces WHERE {where}").decode()
    m = re.search(rf"Name: {index}\n(?:.*\n)*?\s*Granules: (\d+)/(\d+)", plan)
    assert m, plan
    return int(m.group(1)), int(m.group(2))


def test_inserts_leave_attribute_map_indexes_to_merges(store, otlp):
    # a day of its own: its partition holds only this test's parts
    day = 1_500_000_000 * 10**9  # 2017-07-14
    in_day = "toDate(Timestamp) = '2017-07-14'"
    tid, _ = new_ids()
    spans = [otlp.span(trace_id=tid, span_id=os.urandom(8), start=day + i, attrs={"route": f"/r{i % 3}"})
             for i in range(30)]
    absent_attr = f"{in_day} AND has(mapKeys(SpanAttributes), 'absent')"
    absent_res = f"{in_day} AND has(mapValues(ResourceAttributes), 'absent')"
    absent_trace = f"{in_day} AND TraceId = '{'0' * 32}'"
    query = f"SELECT count() AS c FROM otel_traces WHERE TraceId = '{tid.hex()}' AND SpanAttributes['route'] = '/r1'"
    store.execute("SYSTEM STOP MERGES otel_traces")  # two parts to look at before any merge
    try:
        cols, _ = encode_traces(otlp.request(*spans[:15], resource={"zone": "z1"}))
        assert store.insert_rows("otel_traces", cols, f"test-{tid.hex()}") == 15  # the pipeline's path
        insert(store, otlp, *spans[15:], resource={"zone": "z1"})
        # the trace id's index was built on insert; the attribute maps' were not: nothing is skipped
        assert _granules_kept(store, absent_trace, "idx_trace_id") == (0, 2)
        assert _granules_kept(store, absent_attr, "idx_span_attr_key") == (2, 2)
        assert _granules_kept(store, absent_res, "idx_res_attr_value") == (2, 2)
        [before] = rows(store, query)
    finally:
        store.execute("SYSTEM START MERGES otel_traces")
    store.execute("OPTIMIZE TABLE otel_traces PARTITION '2017-07-14' FINAL")
    # the merge built every index for the part it wrote
    assert _granules_kept(store, absent_attr, "idx_span_attr_key") == (0, 1)
    assert _granules_kept(store, absent_res, "idx_res_attr_value") == (0, 1)
    assert _granules_kept(store, absent_trace, "idx_trace_id") == (0, 1)
    [after] = rows(store, query)
    assert int(before["c"]) == int(after["c"]) == 10


def test_concurrent_inserts_and_reads(store, otlp):
    # the query API runs up to four user queries at once beside the writer thread
    tid, _ = new_ids()
    errors: list[BaseException] = []
    reads = []

    def writer():
        try:
            for _ in range(10):
                insert(store, otlp, *[otlp.span(trace_id=tid, span_id=os.urandom(8)) for _ in range(50)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(100):
                rows(store, f"SELECT count() FROM otel_traces WHERE TraceId = '{tid.hex()}'")
                reads.append(1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer) for _ in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in writers + readers:
        t.start()
    for t in writers + readers:
        t.join(60)
    assert not errors, errors[:3]
    assert len(reads) == 400
    [r] = rows(store, f"SELECT count() AS c FROM otel_traces WHERE TraceId = '{tid.hex()}'")
    assert int(r["c"]) == 2000


# -- reading as a user: read-only, ClickHouse's words ------------------------------------------------


def test_output_formats(store):
    assert store.query_readonly("SELECT 1 AS x, 'a' AS y", "CSVWithNames") == b'"x","y"\n1,"a"\n'
    assert json.loads(store.query_readonly("SELECT 1 AS x", "JSONEachRow")) == {"x": 1}
    with pytest.raises(QueryError, match="unknown output format 'Nope'"):
        store.query_readonly("SELECT 1", "Nope")


def test_sql_with_escapes_runs_as_written(store):
    # the statement travels to formatQuery as a query parameter: tabs, newlines and backslashes
    # must reach ClickHouse unchanged
    sql = "SELECT 'tab\there' AS a,\n  'back\\\\slash' AS b, 'nl\\nx' AS c -- comment\n"
    [r] = rows(store, sql)
    assert r == {"a": "tab\there", "b": "back\\slash", "c": "nl\nx"}


def test_clickhouse_error_message_is_kept(store):
    with pytest.raises(QueryError) as err:
        store.query_readonly("SELECT no_such_column FROM otel_traces")
    msg = str(err.value)
    assert "UNKNOWN_IDENTIFIER" in msg and "no_such_column" in msg
    assert "Stack trace" not in msg
    with pytest.raises(QueryError, match="Syntax error"):
        store.query_readonly("SELEC 1")


@pytest.mark.parametrize("sql, words", [
    ("INSERT INTO otel_traces (TraceId) VALUES ('x')", "INSERT"),
    ("DROP TABLE otel_traces", "DROP"),
    ("ALTER TABLE otel_traces DELETE WHERE 1", "ALTER"),
    ("TRUNCATE TABLE otel_traces", "TRUNCATE"),
    ("SELECT 1; DROP TABLE otel_traces", "Multi-statements"),
    ("SELECT * FROM otel_traces INTO OUTFILE '/tmp/tracemesh-leak.csv'", "INTO OUTFILE"),
    ("CREATE TABLE x (a Int8) ENGINE = Memory", "CREATE"),
    ("SELECT 1 SETTINGS readonly = 0", "readonly"),  # passes the statement check; ClickHouse refuses
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "READONLY"),  # table functions need write access
])
def test_query_readonly_refuses_what_is_not_a_read(store, otlp, sql, words):
    tid, sid = new_ids()
    insert(store, otlp, otlp.span(trace_id=tid, span_id=sid))
    count = rows(store, "SELECT count() AS c FROM otel_traces")[0]["c"]
    with pytest.raises(QueryError) as err:
        store.query_readonly(sql)
    assert words in str(err.value)
    assert not os.path.exists("/tmp/tracemesh-leak.csv")
    assert rows(store, "SELECT count() AS c FROM otel_traces")[0]["c"] == count
    assert rows(store, f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'") == [{"SpanId": sid.hex()}]


def test_statement_kind_refusals_are_read_only_errors(store):
    with pytest.raises(ReadOnlyError):
        store.query_readonly("DROP TABLE otel_traces")


# -- one owner per directory ---------------------------------------------------------------------

_OPEN_IN_SUBPROCESS = """
import json, sys
from tracemesh.collector import StoreBusy, open_store
try:
    s = open_store(sys.argv[1])
except StoreBusy as exc:
    print(json.dumps({"busy": True, "api_url": exc.api_url, "pid": exc.pid, "path": exc.path, "message": str(exc)}))
else:
    print(json.dumps({"busy": False, "count": int(s.query_readonly("SELECT count() FROM otel_traces", "TSV"))}))
    s.close()
"""


def _open_elsewhere(path) -> dict:
    out = subprocess.run([sys.executable, "-c", _OPEN_IN_SUBPROCESS, str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_opener_gets_store_busy_with_the_owner(store, chdb_dir, run_tracemesh):
    store.announce("http://127.0.0.1:7999")
    got = _open_elsewhere(chdb_dir)
    assert got["busy"] is True
    assert got["api_url"] == "http://127.0.0.1:7999"
    assert got["pid"] == os.getpid()
    assert str(chdb_dir) in got["message"] and f"pid {os.getpid()}" in got["message"]
    # and the CLI turns it into advice
    cli = run_tracemesh("sql", "--store", str(chdb_dir), "SELECT 1")
    assert cli.returncode == 1
    assert "tracemesh sql --api http://127.0.0.1:7999" in cli.stderr


def test_close_releases_the_directory(box, chdb_dir, otlp):
    tid, sid = new_ids()
    insert(box.store, otlp, otlp.span(trace_id=tid, span_id=sid))
    count = int(rows(box.store, "SELECT count() AS c FROM otel_traces")[0]["c"])
    box.store.close()
    box.store.close()  # idempotent
    assert not (chdb_dir / "collector.json").exists()  # no stale owner left behind
    try:
        assert _open_elsewhere(chdb_dir) == {"busy": False, "count": count}
    finally:
        box.store = EmbeddedStore(chdb_dir)
    assert rows(box.store, f"SELECT SpanId FROM otel_traces WHERE TraceId = '{tid.hex()}'") == [{"SpanId": sid.hex()}]


def test_open_store_needs_an_existing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here").exists()
