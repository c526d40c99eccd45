"""Run in a child process by the tests: metrics and logs tables in a fresh embedded store.

chdb opens one data path per process and other tests open their own, so the store lives here.
Usage: ``python otel_chdb_probe.py WORKDIR``. WORKDIR holds ``metrics.pb`` and ``logs.pb``
(serialized export requests); the store is created in ``WORKDIR/store``. Prints one JSON
document: the tables' columns, keys and indexes as ClickHouse reports them, the DDL of a TTL
variant, and every row read back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
from chdb import session
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from tracemesh.collector._encode_otel import encode_logs, encode_metrics
from tracemesh.collector._schema import SchemaOptions, log_tables, metric_tables


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _json_rows(sess, sql: str) -> list:
    out = sess.query(sql, "JSONEachRow").bytes().decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main(workdir: Path) -> dict:
    metrics_req = ExportMetricsServiceRequest.FromString((workdir / "metrics.pb").read_bytes())
    logs_req = ExportLogsServiceRequest.FromString((workdir / "logs.pb").read_bytes())
    sess = session.Session(str(workdir / "store"))
    try:
        ddl = metric_tables() + log_tables()
        for _ in range(2):  # idempotent
            for stmt in ddl:
                sess.query(stmt)
        sess.query("CREATE DATABASE IF NOT EXISTS ttl")
        for stmt in metric_tables(SchemaOptions(ttl_days=7)) + log_tables(SchemaOptions(ttl_days=7)):
            sess.query(stmt.replace("CREATE TABLE IF NOT EXISTS ", "CREATE TABLE IF NOT EXISTS ttl.", 1))

        batches, rej = encode_metrics(metrics_req)
        log_rows, log_rej = encode_logs(logs_req)
        batches[log_rows.table] = log_rows
        inserted = {}
        for name, rows in batches.items():
            inserted[name] = len(rows)
            if not len(rows):
                continue
            # as the store inserts: no column list, Arrow columns matched by name
            with sess.send_insert(f"INSERT INTO {name}", "ArrowStream") as ins:
                ins.append(_stream(rows.arrow()))
                ins.finish()
        tables = sorted(batches)
        quoted = ", ".join(f"'{t}'" for t in tables)
        result = {
            "inserted": inserted,
            "rejected": {"metrics": rej.count, "logs": log_rej.count},
            "columns": {},
            "tables": {},
            "indexes": {},
            "ttl": {},
            "rows": {},
        }
        for r in _json_rows(sess, f"SELECT table, name, type, default_kind, default_expression, compression_codec "
                                  f"FROM system.columns WHERE database = 'default' AND table IN ({quoted}) "
                                  f"ORDER BY table, position"):
            result["columns"].setdefault(r["table"], []).append(
                [r["name"], r["type"], r["default_kind"], r["default_expression"], r["compression_codec"]])
        for r in _json_rows(sess, f"SELECT name, partition_key, sorting_key, primary_key, engine_full "
                                  f"FROM system.tables WHERE database = 'default' AND name IN ({quoted})"):
            result["tables"][r["name"]] = r
        for r in _json_rows(sess, f"SELECT table, name, type_full, expr, granularity FROM system.data_skipping_indices "
                                  f"WHERE database = 'default' AND table IN ({quoted}) ORDER BY table, name"):
            result["indexes"].setdefault(r["table"], []).append([r["name"], r["type_full"], r["expr"], r["granularity"]])
        for r in _json_rows(sess, "SELECT name, engine_full FROM system.tables WHERE database = 'ttl'"):
            result["ttl"][r["name"]] = r["engine_full"]
        for t in tables:
            result["rows"][t] = _json_rows(
                sess, f"SELECT * FROM {t} ORDER BY tuple() SETTINGS output_format_json_quote_64bit_integers = 0, "
                      f"output_format_json_quote_64bit_floats = 0, session_timezone = 'UTC'")
        return result
    finally:
        sess.close()


if __name__ == "__main__":
    json.dump(main(Path(sys.argv[1])), sys.stdout)
