"""The ClickHouse-server store against a real server process (Debian's clickhouse-server, an old
18.16: it has no Map type, so these tests use simple tables; the otel_* DDL is checked for syntax
against the embedded ClickHouse instead)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tracemesh.collector._migrations import MIGRATIONS
from tracemesh.collector._pipeline import Pipeline
from tracemesh.collector._schema import SchemaOptions
from tracemesh.collector._server_store import ServerStore, ServerTarget, cluster_ddl
from tracemesh.collector._wal import WAL
from tracemesh.net import Addr, free_port, wait_for_port
from tracemesh.query import QueryError

SERVER = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
needs_server = pytest.mark.skipif(not Path(SERVER).exists(), reason="Debian's clickhouse-server is not installed "
                                  "(apt-get install clickhouse-server; .ci/run does)")

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/err.log</errorlog><console>0</console></logger>
  <tcp_port>{port}</tcp_port><listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile><default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>"""
_USERS = """<?xml version="1.0"?>
<yandex><profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
         <writer><password>s3cret</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></writer></users>
  <quotas><default></default></quotas></yandex>"""


class Server:
    """clickhouse-server as a child process on a free port; stop and start it on the same data."""

    def __init__(self, base: Path) -> None:
        self.dir, self.port = base, free_port()
        (base / "data").mkdir(parents=True)
        (base / "tmp").mkdir()
        (base / "config.xml").write_text(_CONFIG.format(d=base, port=self.port))
        (base / "users.xml").write_text(_USERS)
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([SERVER, f"--config-file={self.dir / 'config.xml'}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(Addr("127.0.0.1", self.port), timeout=60)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def url(self, user="writer:s3cret", db="default") -> str:
        return f"clickhouse://{user}@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(SERVER).exists():
        pytest.skip("Debian's clickhouse-server is not installed")
    s = Server(tmp_path_factory.mktemp("clickhouse"))
    s.start()
    yield s
    if s.proc.poll() is None:
        s.proc.terminate()
        s.proc.wait(30)


class Rows:
    """A batch of plain columns, as the encoders hand them to a store."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def extend(self, other):
        for k, v in other.columns.items():
            self.columns[k] = self.columns[k] + v


# -- no server needed --------------------------------------------------------------------------

def test_target_parsing_and_redaction():
    t = ServerTarget.parse("clickhouse://ops:p%40ss@db.internal:9001/telemetry?cluster=main")
    assert (t.host, t.port, t.user, t.password, t.database, t.cluster, t.secure) == (
        "db.internal", 9001, "ops", "p@ss", "telemetry", "main", False)
    assert "p@ss" not in t.redacted() and "s3" not in t.redacted()
    s = ServerTarget.parse("clickhouses://h?verify=0&ca=/etc/ca.pem")
    assert (s.port, s.secure, s.verify, s.ca_certs, s.database) == (9440, True, False, "/etc/ca.pem", "default")
    for bad in ("http://h:8123", "clickhouse:///db", "clickhouse://h/db?colour=red", "clickhouse://h/my-db",
                "clickhouse://h:99999", "clickhouse://h/db?cluster=a;DROP"):
        with pytest.raises(ValueError):
            ServerTarget.parse(bad)


def test_cluster_ddl_is_replicated_local_tables_behind_distributed_ones():
    statements = [s for _, _, make in MIGRATIONS for s in make(SchemaOptions())]
    out = [x for s in statements for x in cluster_ddl(s, "main", "otel")]
    creates = [s for s in out if s.startswith("CREATE TABLE")]
    assert all(" ON CLUSTER main " in s for s in out)
    assert {s.split()[5] for s in creates if "_local" in s.split()[5]} >= {"otel_traces_local", "otel_logs_local"}
    local = next(s for s in creates if s.split()[5] == "otel_traces_local")
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/otel/otel_traces_local', '{replica}')" in local
    assert "CREATE TABLE IF NOT EXISTS otel_traces ON CLUSTER main AS otel_traces_local ENGINE = Distributed(main, otel, otel_traces_local, rand())" in out
    # table settings go to the local tables; the deduplication window is the replicated engine's own
    assert "ALTER TABLE otel_logs_local ON CLUSTER main MODIFY SETTING merge_selector_base = 10" in out
    assert not any("non_replicated_deduplication_window" in s for s in out)
    mv = next(s for s in out if "MATERIALIZED VIEW" in s)
    assert "TO otel_traces_trace_id_ts_local" in mv and "FROM otel_traces_local" in mv
    # and ClickHouse's own parser accepts every statement (the embedded engine, in a subprocess)
    script = ("import chdb, json, sys\nfor q in json.load(sys.stdin):\n"
              "    chdb.query('SELECT formatQuery({q:String})', 'TSV', params={'q': q.replace(chr(92), chr(92)*2).replace(chr(10), chr(92)+'n')})\n"
              "print('ok')")
    r = subprocess.run([sys.executable, "-c", script], input=json.dumps(out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# -- against the server ------------------------------------------------------------------------

@needs_server
def test_connect_insert_read_formats_and_readonly(server):
    store = ServerStore(ServerTarget.parse(server.url()))
    assert store.server_version.startswith("18.")
    store.execute("CREATE TABLE IF NOT EXISTS ev (ts DateTime, id String, n UInt64) ENGINE = MergeTree ORDER BY id")
    t0 = 1_700_000_000
    assert store.insert_rows("ev", Rows(ts=[t0, t0 + 1], id=["a", "b,\"q\""], n=[1, 2]), token="tok-1") == 2
    assert store._tokens is False  # 18.16 predates insert_deduplication_token: detected, written without it
    assert store._defer_indexes is False  # and exclude_materialize_skip_indexes_on_insert: inserts leave it out
    # a table setting the server does not know (migration 5's) is left out, not an error
    store.execute("ALTER TABLE ev MODIFY SETTING merge_selector_base = 10")
    assert "merge_selector_base" not in store.query_write("SHOW CREATE TABLE ev").decode()
    doc = json.loads(store.query_readonly("SELECT id, n, toString(ts) AS ts FROM ev ORDER BY id", "JSON"))
    assert [r["id"] for r in doc["data"]] == ["a", 'b,"q"'] and doc["rows"] == 2
    assert doc["meta"][1] == {"name": "n", "type": "UInt64"}
    assert store.query_readonly("SELECT id, n FROM ev ORDER BY id", "CSVWithNames") == b'"id","n"\n"a",1\n"b,""q""",2\n'
    assert b"| a " in store.query_readonly("SELECT id FROM ev ORDER BY id", "PrettyCompact") or \
        b"a" in store.query_readonly("SELECT id FROM ev ORDER BY id", "PrettyCompact")
    for sql in ("INSERT INTO ev (id) VALUES ('x')", "DROP TABLE ev", "SELECT 1; DROP TABLE ev"):
        with pytest.raises(QueryError):
            store.query_readonly(sql)
    with pytest.raises(QueryError, match="not available"):
        store.query_readonly("SELECT 1", "Parquet")
    assert json.loads(store.query_readonly("SELECT count() AS c FROM ev"))["data"][0]["c"] == 2
    store.close()


@needs_server
def test_wrong_password_and_unreachable_server_are_clear_errors(server):
    with pytest.raises(QueryError, match="(?i)password|authentication"):
        ServerStore(ServerTarget.parse(server.url(user="writer:wrong")))
    with pytest.raises(QueryError, match="(?i)connect|refused"):
        ServerStore(ServerTarget.parse(f"clickhouse://127.0.0.1:{free_port()}/default"))


@needs_server
def test_collector_refuses_a_server_it_cannot_migrate_and_says_why(server, tmp_path, tracemesh_cmd):
    # 18.16 predates the Map type of the exporter's schema: the collector must say so and stop
    r = subprocess.run([*tracemesh_cmd, "collector", "--clickhouse", server.url(), "--wal", str(tmp_path / "wal"),
                        "--otlp-grpc", f"127.0.0.1:{free_port()}", "--otlp-http", "off", "--api", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "s3cret" not in r.stdout + r.stderr  # the password is never printed


@needs_server
@pytest.mark.timeout(240)
def test_server_down_30s_under_load_every_acknowledged_row_is_stored_once(server, tmp_path):
    store = ServerStore(ServerTarget.parse(server.url()))
    store.execute("CREATE TABLE IF NOT EXISTS load (id String, n UInt64) ENGINE = MergeTree ORDER BY id")

    def decode(kind, payload):
        ids = payload.decode().split(",")
        return {"load": Rows(id=ids, n=[len(i) for i in ids])}

    pipeline = Pipeline(WAL(tmp_path / "wal"), store.insert_rows, decode, flush_interval=0.1)
    acked: list[str] = []
    stop = threading.Event()

    def sender():
        i = 0
        while not stop.is_set():
            ids = [f"r{i}-{j}" for j in range(20)]
            pipeline.submit(1, ",".join(ids).encode(), decode(1, ",".join(ids).encode()))
            acked.extend(ids)
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=sender)
    t.start()
    try:
        time.sleep(1)
        server.kill()  # storage down: exports are still acknowledged, into the log
        down_at = len(acked)
        time.sleep(30)
        assert len(acked) > down_at + 1000, "acknowledging stopped while storage was down"
        assert pipeline.stats.insert_errors > 0 and not pipeline.stats.storage_ok
        server.start()
        time.sleep(1)
    finally:
        stop.set()
        t.join(10)
    deadline = time.monotonic() + 90
    while pipeline.queued_rows and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pipeline.queued_rows == 0
    rows = json.loads(store.query_readonly("SELECT count() AS c, uniqExact(id) AS u FROM load"))["data"][0]
    assert int(rows["c"]) == int(rows["u"]) == len(acked)
    pipeline.close()
    store.close()
