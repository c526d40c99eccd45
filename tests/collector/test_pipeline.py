"""From an acknowledged export to stored rows (collector/_pipeline.py): a real write-ahead log on
disk, the real store on chdb, the real decoder. Storage outages are played by wrapping the real
insert so that it fails (or fails after it wrote, as a lost answer looks) a set number of times."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tracemesh.collector import EmbeddedStore
from tracemesh.collector import _pipeline
from tracemesh.collector._otlp import SIGNALS, decode_record
from tracemesh.collector._pipeline import KIND_TRACES, Backpressure, Pipeline
from tracemesh.collector._wal import WAL
from tracemesh.query import QueryError

TRACES = SIGNALS[KIND_TRACES]
WAIT_S = 30


@pytest.fixture(scope="module")
def store(chdb_dir):
    s = EmbeddedStore(chdb_dir)
    s.ensure_schema()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(_pipeline, "RETRY_BACKOFF_S", 0.05)


class Storage:
    """The real insert, with outages on demand and a record of every call."""

    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store
        self.calls: list[tuple[str, int, str]] = []
        self.fail_next = 0  # fail before writing (storage down)
        self.lose_next = 0  # write, then fail (the answer was lost)
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, table: str, batch, token: str) -> None:
        self.gate.wait(WAIT_S)
        self.calls.append((table, len(batch), token))
        if self.down or self.fail_next > 0:
            self.fail_next -= 1
            raise QueryError("storage is down (test)")
        self.store.insert_rows(table, batch, token)
        if self.lose_next > 0:
            self.lose_next -= 1
            raise QueryError("connection lost after the insert (test)")


def export(otlp, trace_id: bytes, n: int) -> tuple[bytes, dict, int]:
    raw = otlp.request(*[otlp.span(f"s{i}", trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"))
                         for i in range(n)]).SerializeToString()
    accepted = TRACES.accept(raw)
    return raw, accepted.batches, accepted.rejected


def submit(p: Pipeline, otlp, trace_id: bytes, n: int) -> int:
    raw, batches, rejected = export(otlp, trace_id, n)
    return p.submit(KIND_TRACES, raw, batches, rejected)


def count(store, trace_ids) -> dict[str, int]:
    ids = ", ".join(f"'{t.hex()}'" for t in trace_ids)
    out = json.loads(store.query_readonly(
        f"SELECT TraceId, count() AS n FROM otel_traces WHERE TraceId IN ({ids}) GROUP BY TraceId", "JSON"))
    return {r["TraceId"]: int(r["n"]) for r in out["data"]}


def test_exports_are_stored_in_few_batched_inserts(store, otlp, tmp_path):
    storage = Storage(store)
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.1)
    try:
        storage.gate.clear()  # hold the writer so that exports queue up
        tids = [os.urandom(16) for _ in range(20)]
        seqs = [submit(p, otlp, t, 10) for t in tids]
        assert seqs == list(range(seqs[0], seqs[0] + 20))
        assert p.queued_rows == 200  # all acknowledged, none stored (a counter kept as records come and go)
        storage.gate.set()
        assert p.wait_stored(seqs[-1], WAIT_S)
        assert count(store, tids) == {t.hex(): 10 for t in tids}
        assert p.stats.exports == 20 and p.stats.received_rows == p.stats.stored_rows == 200
        assert p.stats.inserts < 20  # merged into larger inserts
        assert p.stats.stored_by_table == {"otel_traces": 200}
        assert p.queued_rows == 0 and p.wal.bytes == 0  # the log let go of what is stored
    finally:
        p.close(5)


def test_an_outage_is_retried_with_the_same_token_until_stored(store, otlp, tmp_path):
    storage = Storage(store)
    storage.fail_next = 3
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05)
    try:
        tid = os.urandom(16)
        seq = submit(p, otlp, tid, 5)
        assert p.wait_stored(seq, WAIT_S)
        assert count(store, [tid]) == {tid.hex(): 5}
        assert p.stats.insert_errors == 3 and p.stats.storage_ok
        assert len(storage.calls) == 4 and len({c[2] for c in storage.calls}) == 1  # one token throughout
    finally:
        p.close(5)


def test_an_insert_whose_answer_was_lost_is_not_stored_twice(store, otlp, tmp_path):
    storage = Storage(store)
    storage.lose_next = 2
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05)
    try:
        tid = os.urandom(16)
        seq = submit(p, otlp, tid, 7)
        assert p.wait_stored(seq, WAIT_S)
        assert len(storage.calls) == 3  # wrote three times, ClickHouse kept one
        assert count(store, [tid]) == {tid.hex(): 7}
        idx = json.loads(store.query_readonly(
            f"SELECT count() AS n FROM otel_traces_trace_id_ts WHERE TraceId = '{tid.hex()}'", "JSON"))
        assert int(idx["data"][0]["n"]) == 1
    finally:
        p.close(5)


def test_what_close_cannot_store_stays_in_the_log_for_the_next_start(store, otlp, tmp_path):
    storage = Storage(store)
    storage.down = True
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05)
    tids = [os.urandom(16) for _ in range(3)]
    for t in tids:
        submit(p, otlp, t, 4)
    p.close(0.5)  # storage still down: give up, keep the log
    assert count(store, tids) == {}
    with pytest.raises(Backpressure):
        submit(p, otlp, os.urandom(16), 1)  # closed: nothing is taken any more

    storage.down = False
    p2 = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05)
    try:
        assert p2.stats.recovered_records == 3
        last = submit(p2, otlp, os.urandom(16), 1)
        assert p2.wait_stored(last, WAIT_S)
        assert count(store, tids) == {t.hex(): 4 for t in tids}
    finally:
        p2.close(5)


def test_a_full_run_is_stored_without_waiting_for_the_flush_interval(store, otlp, tmp_path, monkeypatch):
    """Batches kept as protobuf bytes weigh little, so a run fills by MAX_RUN_ROWS first: it goes
    at once, not when the (long) interval ends."""
    monkeypatch.setattr(_pipeline, "MAX_RUN_ROWS", 20)
    p = Pipeline(WAL(tmp_path / "wal"), Storage(store), decode_record, flush_interval=60.0, max_batch_rows=10**9)
    try:
        tids = [os.urandom(16) for _ in range(2)]
        seqs = [submit(p, otlp, t, 10) for t in tids]
        assert p.wait_stored(seqs[-1], 10)
        assert count(store, tids) == {t.hex(): 10 for t in tids}
    finally:
        p.close(5)


def test_close_drains_what_is_queued(store, otlp, tmp_path):
    storage = Storage(store)
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=5.0)  # no timely flush
    tids = [os.urandom(16) for _ in range(5)]
    for t in tids:
        submit(p, otlp, t, 3)
    p.close(10)
    assert count(store, tids) == {t.hex(): 3 for t in tids}
    reopened = WAL(tmp_path / "wal")
    assert list(reopened.seqs()) == []  # nothing left to replay
    reopened.close()


def test_beyond_the_memory_bound_exports_wait_only_in_the_log(store, otlp, tmp_path):
    storage = Storage(store)
    storage.gate.clear()
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05, max_memory_rows=25)
    try:
        tids = [os.urandom(16) for _ in range(10)]
        seqs = [submit(p, otlp, t, 10) for t in tids]
        assert p.stats.spooled_records >= 7  # at most 2 exports of 10 rows fit in memory
        storage.gate.set()
        assert p.wait_stored(seqs[-1], WAIT_S)
        assert count(store, tids) == {t.hex(): 10 for t in tids}  # decoded again from the log
        assert p.stats.spooled_records == 0
        assert p.stats.read_back_records >= 7  # counted (records_read_back in /api/stats)
    finally:
        p.close(5)


def test_a_full_log_pushes_back_and_takes_nothing(store, otlp, tmp_path):
    storage = Storage(store)
    storage.gate.clear()
    raw, _, _ = export(otlp, os.urandom(16), 10)
    p = Pipeline(WAL(tmp_path / "wal", max_bytes=len(raw) * 5), storage, decode_record, flush_interval=0.05)
    try:
        accepted, refused = [], 0
        for _ in range(10):
            t = os.urandom(16)
            try:
                submit(p, otlp, t, 10)
            except Backpressure as exc:
                assert exc.retry_after_s > 0
                refused += 1
            else:
                accepted.append(t)
        assert refused and accepted
        assert p.stats.refused_exports == refused
        storage.gate.set()
        deadline_seq = p.wal.next_seq - 1
        assert p.wait_stored(deadline_seq, WAIT_S)
        assert count(store, accepted) == {t.hex(): 10 for t in accepted}
        # room again once stored
        t = os.urandom(16)
        assert p.wait_stored(submit(p, otlp, t, 10), WAIT_S)
    finally:
        storage.gate.set()
        p.close(5)


# -- batches kept as protobuf bytes (native trace ingest) ------------------------------------------


def native_submit(p: Pipeline, otlp, trace_id: bytes, n: int) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from tracemesh.collector._native import validate_traces

    raw = otlp.request(*[otlp.span(f"s{i}", trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"))
                         for i in range(n)]).SerializeToString()
    batches, rej = validate_traces(ExportTraceServiceRequest.FromString(raw), raw)
    return p.submit(KIND_TRACES, raw, batches, rej.count)


def test_batches_kept_as_bytes_weigh_less_so_their_inserts_are_larger(store, otlp, tmp_path, monkeypatch):
    storage = Storage(store)
    monkeypatch.setattr(_pipeline, "MAX_RUN_ROWS", 40)
    # 10 spans of protobuf weigh 1 row: 5 of them fit a run of weight 5, up to 40 rows
    p = Pipeline(WAL(tmp_path / "wal"), storage, decode_record, flush_interval=0.05, max_batch_rows=5)
    try:
        storage.gate.clear()
        tids = [os.urandom(16) for _ in range(12)]
        seqs = [native_submit(p, otlp, t, 10) for t in tids]
        assert all(e.weight == 1 for e in p._pending.values())
        storage.gate.set()
        assert p.wait_stored(seqs[-1], WAIT_S)
        assert count(store, tids) == {t.hex(): 10 for t in tids}
        sizes = [n for _, n, _ in storage.calls]
        assert sum(sizes) == 120 and max(sizes) == 40  # limited by rows, not by weight
    finally:
        p.close(5)


def spooled_then_stored(p: Pipeline, storage: Storage, otlp, n: int) -> list[bytes]:
    """*n* native exports of 5 spans, submitted while storage waits (with max_memory_rows=1 all but
    one wait only in the log), then stored; their trace ids."""
    storage.gate.clear()
    tids = [os.urandom(16) for _ in range(n)]
    seqs = [native_submit(p, otlp, t, 5) for t in tids]
    assert p.stats.spooled_records >= n - 1
    storage.gate.set()
    assert p.wait_stored(seqs[-1], WAIT_S)
    return tids


def test_spooled_native_batches_are_rebuilt_from_the_log_without_parsing_again(store, otlp, tmp_path):
    storage = Storage(store)
    decoded = []

    def decode(kind, payload):
        decoded.append(kind)
        return decode_record(kind, payload)

    p = Pipeline(WAL(tmp_path / "wal"), storage, decode, flush_interval=0.05, max_memory_rows=1)
    try:
        tids = spooled_then_stored(p, storage, otlp, 6)
        assert count(store, tids) == {t.hex(): 5 for t in tids}
        assert decoded == [] and p.stats.spooled_records == 0
    finally:
        p.close(5)


def test_segments_read_back_are_written_over_once_stored(store, otlp, tmp_path):
    # exports read back from the log are views of its pages: the pipeline lets them go before it
    # releases their segments, so the log can reuse the files (else it must delete them)
    storage = Storage(store)
    p = Pipeline(WAL(tmp_path / "wal", segment_bytes=4096), storage, decode_record, flush_interval=0.05,
                 max_memory_rows=1)
    try:
        tids = []
        for _ in range(4):
            tids += spooled_then_stored(p, storage, otlp, 8)
        assert count(store, tids) == {t.hex(): 5 for t in tids}
        assert p.stats.read_back_records >= 28 and p.wal.reused_segments >= 4
        assert len(list((tmp_path / "wal").glob("*.spare"))) <= 2
    finally:
        p.close(5)
