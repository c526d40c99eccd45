"""Versioned, idempotent schema migrations.

Each migration has a number and a list of statements, every one of them safe to run twice
(``IF NOT EXISTS``, ``MODIFY SETTING``). The versions applied are recorded in
``tracemesh_schema_migrations``; a collector applies, in order, those not recorded there. Because
each statement is idempotent, two collectors starting at once on one ClickHouse server may both run
a migration and both record it: the end state is the same, and the record is deduplicated on read
(``SELECT DISTINCT version``). On the embedded store only one process can open the data directory.

Numbers are forever: a released migration is never edited, only followed by a new one.
"""

from __future__ import annotations

import logging
from typing import Callable

from tracemesh.collector._schema import SchemaOptions, trace_tables

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "tracemesh_schema_migrations"
#: Blocks whose insert token ClickHouse remembers per table: replay after a crash re-sends at most
#: a few batches, so 1000 is ample while cheap (tokens live in ZooKeeper-less MergeTree metadata).
DEDUP_WINDOW = 1000
TRACE_INSERT_TABLES = ("otel_traces",)
#: Every table the collector inserts into (the materialized view's target included).
INSERT_TABLES = ("otel_traces", "otel_traces_trace_id_ts", "otel_metrics_gauge", "otel_metrics_sum",
                 "otel_metrics_histogram", "otel_metrics_exp_histogram", "otel_metrics_summary", "otel_logs")
#: ClickHouse's merge selector waits for about this many parts of a size before merging them (its
#: default is 5). A collector inserts small parts several times a second, and every merge rewrites
#: its rows and rebuilds the attribute maps' bloom-filter indexes; with a wider base each row is
#: merged fewer times. At a mesh's pace (4,000 spans a second in 500-span exports;
#: ``benchmarks/collector.py --pace 4000``) the collector's CPU went 0.342 -> 0.224 and
#: 0.360 -> 0.267 of a core in two runs, its merges 0.202 -> 0.108 and 0.215 -> 0.118, with 10 and 6
#: active parts at the end against 5 and 7 (20: 0.220 and 0.091, but 19 parts, which every query opens).
MERGE_SELECTOR_BASE = 10


def merge_selector(base: int = MERGE_SELECTOR_BASE) -> list[str]:
    """Migration 5's statements for *base* (the pace benchmark sets ClickHouse's own 5 back with them)."""
    return [f"ALTER TABLE {t} MODIFY SETTING merge_selector_base = {base}" for t in INSERT_TABLES]


def _dedup(tables) -> list[str]:
    return [f"ALTER TABLE {t} MODIFY SETTING non_replicated_deduplication_window = {DEDUP_WINDOW}" for t in tables]


def _metrics_and_logs(opts: SchemaOptions) -> list[str]:
    from tracemesh.collector import _schema

    ddl = _schema.metric_tables(opts) + _schema.log_tables(opts)
    tables = ["otel_metrics_gauge", "otel_metrics_sum", "otel_metrics_histogram", "otel_metrics_exp_histogram",
              "otel_metrics_summary", "otel_logs"]
    return ddl + _dedup(tables)


#: (version, description, statements for the options)
MIGRATIONS: list[tuple[int, str, Callable[[SchemaOptions], list[str]]]] = [
    (1, "traces: otel_traces, otel_traces_trace_id_ts and its materialized view", trace_tables),
    (2, "traces: insert deduplication window, for idempotent replay of the write-ahead log",
     lambda opts: _dedup(TRACE_INSERT_TABLES)),
    (3, "metrics and logs: otel_metrics_* and otel_logs, with the deduplication window", _metrics_and_logs),
    # the view's target needs its own window: without it a replayed (deduplicated) insert still
    # adds its rows to the trace-id index a second time
    (4, "traces: deduplication window on otel_traces_trace_id_ts, the materialized view's target",
     lambda opts: _dedup(("otel_traces_trace_id_ts",))),
    (5, f"all tables: merges wait for about {MERGE_SELECTOR_BASE} parts of a size (merge_selector_base)",
     lambda opts: merge_selector()),
]


def applied_versions(query: Callable[[str], bytes]) -> set[int]:
    out = query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")
    return {int(x) for x in out.decode().split()}


def migrate(execute: Callable[[str], None], query: Callable[[str], bytes], opts: SchemaOptions = SchemaOptions(),
            migrations=None) -> list[int]:
    """Apply pending migrations in order; return the versions applied now."""
    migrations = MIGRATIONS if migrations is None else migrations
    execute(f"""CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version UInt32,
    description String,
    applied_at DateTime DEFAULT now()
) ENGINE = MergeTree ORDER BY version""")
    done = applied_versions(query)
    applied = []
    for version, description, statements in migrations:
        if version in done:
            continue
        log.info("schema migration %d: %s", version, description)
        for sql in statements(opts):
            execute(sql)
        execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES ({version}, '{description.replace(chr(39), '')}')")
        applied.append(version)
    return applied
