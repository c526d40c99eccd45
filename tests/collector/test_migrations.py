"""Schema migrations: an old store is upgraded in place, its data kept; two collectors racing for
one store do not both get it."""

from __future__ import annotations

import subprocess
import sys
import threading

from conftest import Collector

from tracemesh.collector._migrations import MIGRATIONS

_OLD_COLLECTOR = """
import sys
from tracemesh.collector._migrations import MIGRATIONS, migrate
from tracemesh.collector._store import EmbeddedStore
st = EmbeddedStore(sys.argv[1])
migrate(st.execute, st.query_write, migrations=MIGRATIONS[:1])  # what the first release created
st.execute("INSERT INTO otel_traces (Timestamp, TraceId, SpanId, SpanName, ServiceName) "
           "VALUES (now64(9), 'aa', 'bb', 'from the old release', 'old')")
st.close()
"""


def test_a_store_from_an_older_release_is_upgraded_and_keeps_its_data(tmp_path, tracemesh_cmd):
    store = tmp_path / "store"
    r = subprocess.run([sys.executable, "-c", _OLD_COLLECTOR, str(store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c = Collector(tracemesh_cmd, store, tmp_path / "collector.log").start()
    try:
        versions = [int(r["version"]) for r in c.rows("SELECT DISTINCT version FROM tracemesh_schema_migrations ORDER BY version")]
        assert versions == [v for v, _, _ in MIGRATIONS]
        assert c.rows("SELECT SpanName FROM otel_traces") == [{"SpanName": "from the old release"}]
        tables = {r["name"] for r in c.rows("SHOW TABLES")}
        assert {"otel_logs", "otel_metrics_sum", "otel_traces_trace_id_ts"} <= tables
        ddl = c.rows("SHOW CREATE TABLE otel_traces")[0]["statement"]
        assert "non_replicated_deduplication_window = 1000" in ddl
        # migration 5: merges wait for wider sets of parts, on every table the collector fills
        for table in ("otel_traces", "otel_traces_trace_id_ts", "otel_logs", "otel_metrics_sum"):
            assert "merge_selector_base = 10" in c.rows(f"SHOW CREATE TABLE {table}")[0]["statement"], table
    finally:
        c.stop()
    # a restart finds nothing left to do
    c2 = Collector(tracemesh_cmd, store, tmp_path / "collector2.log").start()
    try:
        assert "schema migration" not in c2.output()
    finally:
        c2.stop()


def test_two_collectors_starting_at_once_on_one_store(tmp_path, tracemesh_cmd):
    store = tmp_path / "store"
    results: dict[int, object] = {}

    def start(i):
        c = Collector(tracemesh_cmd, store, tmp_path / f"c{i}.log")
        try:
            results[i] = c.start()
        except (RuntimeError, TimeoutError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    up = [r for r in results.values() if isinstance(r, Collector)]
    down = [r for r in results.values() if not isinstance(r, Collector)]
    try:
        assert len(up) == 1 and len(down) == 1, results
        assert "in use by" in str(down[0])
        versions = up[0].rows("SELECT count() AS n, uniqExact(version) AS u FROM tracemesh_schema_migrations")[0]
        assert int(versions["n"]) == int(versions["u"]) == len(MIGRATIONS)
    finally:
        for c in up:
            c.stop()
