"""The collector's own numbers: a Prometheus text exposition and a dict for ``/api/stats``."""

from __future__ import annotations

from tracemesh.collector._pipeline import Pipeline


def snapshot(pipeline: Pipeline) -> dict:
    s = pipeline.stats
    return {
        "exports": s.exports,
        "rows_received": s.received_rows,
        "rows_rejected": s.rejected_rows,
        "exports_refused": s.refused_exports,
        "rows_stored": s.stored_rows,
        "rows_stored_by_table": dict(s.stored_by_table),
        "rows_queued": pipeline.queued_rows,
        "records_spooled": s.spooled_records,
        "records_recovered": s.recovered_records,
        "records_read_back": s.read_back_records,
        "wal_bytes": pipeline.wal.bytes,
        "wal_syncs": pipeline.wal.syncs,
        "wal_segments_reused": pipeline.wal.reused_segments,
        "inserts": s.inserts,
        "insert_errors": s.insert_errors,
        "insert_seconds": round(s.insert_seconds, 6),
        "last_insert_ms": round(s.last_insert_ms, 3),
        "storage_up": s.storage_ok,
        "flush_interval_s": pipeline.flush_interval,
    }


_HELP = {
    "exports": ("counter", "OTLP exports acknowledged (durable in the write-ahead log)"),
    "rows_received": ("counter", "spans, data points and log records acknowledged"),
    "rows_rejected": ("counter", "malformed items refused through OTLP partial success"),
    "exports_refused": ("counter", "exports pushed back (log full or shutting down)"),
    "rows_queued": ("gauge", "rows acknowledged and not yet stored"),
    "records_spooled": ("gauge", "exports waiting only in the write-ahead log (not in memory)"),
    "records_read_back": ("counter", "exports stored from the write-ahead log (spooled or recovered), not from memory"),
    "wal_bytes": ("gauge", "bytes in the write-ahead log not yet released"),
    "wal_syncs": ("counter", "fsyncs of the write-ahead log (group commits)"),
    "wal_segments_reused": ("counter", "write-ahead log segments started in a released segment's file, written over"),
    "inserts": ("counter", "inserts into ClickHouse"),
    "insert_errors": ("counter", "failed inserts (retried)"),
    "insert_seconds": ("counter", "seconds spent in successful inserts"),
}


def prometheus(pipeline: Pipeline, uptime_s: float) -> bytes:
    snap = snapshot(pipeline)
    lines = []
    for key, (kind, help_) in _HELP.items():
        name = f"tracemesh_collector_{key}" + ("_total" if kind == "counter" and not key.endswith("seconds") else "")
        if key == "insert_seconds":
            name = "tracemesh_collector_insert_seconds_total"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {snap[key]}"]
    name = "tracemesh_collector_rows_stored_total"
    lines += [f"# HELP {name} rows stored in ClickHouse, by table", f"# TYPE {name} counter"]
    for table, n in sorted(snap["rows_stored_by_table"].items()):
        lines.append(f'{name}{{table="{table}"}} {n}')
    lines += ["# HELP tracemesh_collector_storage_up 1 when the last insert succeeded",
              "# TYPE tracemesh_collector_storage_up gauge", f"tracemesh_collector_storage_up {int(snap['storage_up'])}",
              "# HELP tracemesh_collector_uptime_seconds seconds since start",
              "# TYPE tracemesh_collector_uptime_seconds gauge", f"tracemesh_collector_uptime_seconds {uptime_s:.1f}"]
    return ("\n".join(lines) + "\n").encode()
