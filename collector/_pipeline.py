"""From an acknowledged export to stored rows: WAL first, then batched columnar inserts.

A receiver validates and encodes an export, then calls :meth:`Pipeline.submit`, which appends the
raw request to the write-ahead log (group commit) and returns only once it is on disk (or, given a
callback, calls it then); only then is the export acknowledged. The encoded rows wait in memory for the writer thread, up to
``max_memory_rows``; beyond that an entry keeps only its place in the log (spooled) and is decoded
again from the log when its turn comes (a batch kept as protobuf bytes is rebuilt from it without
being parsed again). When the log itself is full, :class:`Backpressure` tells
the receiver to push back.

The writer takes a contiguous run of durable records, writes an *intent* (first and last sequence
number) to ``checkpoint.json``, inserts each table's rows with the insert deduplication token
``<wal epoch>:<first>-<last>:<table>``, then releases the run from the log. After a crash the run
named by the intent is inserted again, the same rows with the same token, so ClickHouse drops what
already arrived (``non_replicated_deduplication_window`` on our tables); later records follow.
Nothing acknowledged is lost; nothing is stored twice.

Storage failures are retried with backoff, the same run and tokens each time, for as long as it
takes; meanwhile the log grows. Cancellation: :meth:`close` stops taking exports, tries to store
what is queued for a bounded time, and leaves the rest in the log for the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tracemesh._fs import write_atomic
from tracemesh._proc import name_os_thread
from tracemesh.collector._wal import WAL, WALClosed, WALFull

log = logging.getLogger(__name__)

KIND_TRACES, KIND_METRICS, KIND_LOGS = 1, 2, 3
KIND_NAMES = {KIND_TRACES: "traces", KIND_METRICS: "metrics", KIND_LOGS: "logs"}

#: Large inserts are cheap per row in ClickHouse; 25k spans is ~15 MB of columns, ~60 MB as Python objects.
#: Counted in weight (see :func:`weight`): a batch kept as protobuf bytes weighs less than its rows.
MAX_BATCH_ROWS = 25_000
#: However light its batches, one insert takes at most this many rows: ClickHouse holds an insert's
#: rows in memory (~7 KB a span while it parses OTLP itself).
MAX_RUN_ROWS = 100_000
#: Data is queryable within about this long after it arrives (``--flush-interval``). Each insert makes
#: a part in every table it touches, and ClickHouse merges parts in the background, rebuilding their
#: skip indexes. At a mesh's pace (2 sidecars at 1,000 req/s, ~4,000 spans and access-log records a
#: second) merges were ~40 % of the collector's CPU, and 1 s took 15-23 % off it (3 alternated pairs,
#: 2026-11-27); but under bulk load (benchmarks/collector.py) 1 s cost 10-18 % of spans per
#: CPU-second (2 pairs: full 100k-row runs, more merging inside the run). So 0.2 s stays the default
#: and a mesh with a steady, moderate flow can choose 1 s.
FLUSH_INTERVAL_S = 0.2
#: Rows held in memory for the writer; beyond this, entries are spooled (kept only in the log).
MAX_MEMORY_ROWS = 100_000
#: After a failed insert, wait this long (doubling up to the max) before trying the same run again.
RETRY_BACKOFF_S, RETRY_BACKOFF_MAX_S = 0.5, 10.0
#: Told to senders that are pushed back.
RETRY_AFTER_S = 2
#: Rows per record assumed for records recovered from the log (their count is known once decoded).
_RECOVERED_ROWS_GUESS = 1000
CHECKPOINT = "checkpoint.json"

Decoder = Callable[[int, bytes], dict]
Inserter = Callable[[str, object, str], None]


def weight(batches: dict) -> int:
    """What *batches* count against a batch's size, in rows encoded as Python objects (~2.4 KB each).
    A batch may say less through a ``weight`` attribute (trace requests kept as protobuf bytes for
    ClickHouse to parse, ~0.8 KB a span): its inserts are then larger, which amortises their fixed
    cost (planning ClickHouse's own OTLP parsing takes ~0.2 s). Memory is still bounded in rows."""
    return sum(getattr(b, "weight", None) or len(b) for b in batches.values())


def _light(batches: dict) -> dict | None:
    """What a spooled entry keeps instead of its rows: for each table a function that rebuilds the
    batch from the logged payload without decoding it again (a batch's ``spooled()``), when every
    batch offers one; else None, and the record is decoded again from the log."""
    out = {}
    for table, b in batches.items():
        rebuild = b.spooled() if hasattr(b, "spooled") else None
        if rebuild is None:
            return None
        out[table] = rebuild
    return out


class Backpressure(Exception):
    """Not accepted now; retry after ``retry_after_s``. The export was not acknowledged."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Stats:
    exports: int = 0  # acknowledged exports (records in the log)
    received_rows: int = 0
    rejected_rows: int = 0  # malformed items, refused through OTLP partial success
    refused_exports: int = 0  # pushed back: log full or closing
    stored_rows: int = 0
    stored_by_table: dict = field(default_factory=dict)
    spooled_records: int = 0  # records currently waiting only in the log
    read_back_records: int = 0  # records stored from the log (spooled or recovered), not from memory
    recovered_records: int = 0  # records found in the log at start
    insert_errors: int = 0
    inserts: int = 0
    insert_seconds: float = 0.0
    last_insert_ms: float = 0.0
    storage_ok: bool = True


@dataclass
class _Entry:
    seq: int
    batches: dict | None  # None: spooled, decode from the log
    rows: int
    weight: int  # see weight(): batches are limited by it
    light: dict | None = None  # spooled: rebuilds the batches from the logged payload (see _light)


def _merge(batches_list: list[dict]) -> dict:
    out: dict = {}
    for batches in batches_list:
        for table, b in batches.items():
            if not len(b):
                continue
            if table in out:
                out[table].extend(b)
            else:
                out[table] = b
    return out


class Pipeline:
    def __init__(self, wal: WAL, insert: Inserter, decode: Decoder, *, max_batch_rows: int = MAX_BATCH_ROWS,
                 flush_interval: float = FLUSH_INTERVAL_S, max_memory_rows: int = MAX_MEMORY_ROWS) -> None:
        self.wal = wal
        self._insert = insert
        self._decode = decode
        self._max_batch = max_batch_rows
        self._flush_interval = flush_interval
        self._max_memory = max_memory_rows
        self._checkpoint = str(wal.dir / CHECKPOINT)
        self._cond = threading.Condition()
        self._pending: dict[int, _Entry] = {}
        self._pending_rows = 0  # the sum of _pending's rows, kept as it changes (read by every stats poll)
        self._memory_rows = 0
        self._closing = False
        self._give_up_at = float("inf")
        self.stats = Stats()
        self._forced: tuple[int, int] | None = None
        self._next = self._recover()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self) -> int:
        intent = None
        try:
            with open(self._checkpoint) as f:
                intent = tuple(json.load(f)["intent"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.error("unreadable %s (%s): replaying the whole log (duplicates are dropped by token)", self._checkpoint, exc)
        seqs = list(self.wal.seqs())
        if intent is not None:
            first, last = intent
            if seqs and seqs[0] < first:
                self.wal.release(first - 1)  # stored before the last intent was written
                seqs = [s for s in seqs if s >= first]
            if seqs and seqs[0] == first and seqs[-1] >= last:
                self._forced = (first, last)
        for s in seqs:
            loc_rows = _RECOVERED_ROWS_GUESS
            self._pending[s] = _Entry(s, None, loc_rows, loc_rows)
            self._pending_rows += loc_rows
        self.stats.recovered_records = self.stats.spooled_records = len(seqs)
        if seqs:
            log.info("write-ahead log holds %d records not known to be stored: storing them again "
                     "(insert tokens drop what was already stored)", len(seqs))
        return seqs[0] if seqs else self.wal.next_seq

    # -- receiving ---------------------------------------------------------------------------

    @property
    def flush_interval(self) -> float:
        """Seconds after which what arrived is stored, however little."""
        return self._flush_interval

    @property
    def queued_rows(self) -> int:
        # a counter, not a sum over _pending under the lock the receivers need: under overload
        # thousands of records wait, and /api/stats and /metrics are polled
        return self._pending_rows

    def submit(self, kind: int, payload: bytes, batches: dict, rejected: int = 0, on_durable=None) -> int | None:
        """Make one export durable and queue its rows; return its sequence number (None when the
        export had nothing valid to store: only its rejections are counted).

        Blocks until the record is on disk (group commit). Raises Backpressure when the log is full
        or the collector is stopping; then nothing was kept and the sender must retry.

        With *on_durable*, returns once the record is written: ``on_durable(None)`` runs once it is
        on disk (then, and only then, the export may be acknowledged), ``on_durable(exc)`` when the
        log could not sync it; at once when there was nothing to store.
        """
        rows = sum(len(b) for b in batches.values())
        if not rows:
            self.stats.rejected_rows += rejected
            if on_durable is not None:
                on_durable(None)
            return None
        w = weight(batches)

        def assigned(seq: int) -> None:
            with self._cond:
                spool = self._memory_rows + rows > self._max_memory
                self._pending[seq] = _Entry(seq, None if spool else batches, rows, w, _light(batches) if spool else None)
                self._pending_rows += rows
                if spool:
                    self.stats.spooled_records += 1
                else:
                    self._memory_rows += rows

        def durable(error: Exception | None = None) -> None:
            if error is None:
                with self._cond:
                    self.stats.exports += 1
                    self.stats.received_rows += rows
                    self.stats.rejected_rows += rejected
                    self._cond.notify()
            if on_durable is not None:
                on_durable(error)

        if self._closing:
            self.stats.refused_exports += 1
            raise Backpressure("the collector is shutting down")
        try:
            seq = self.wal.append(kind, payload, on_assigned=assigned, on_durable=durable if on_durable else None)
        except WALFull as exc:
            self.stats.refused_exports += 1
            raise Backpressure(f"storage is behind: {exc}") from None
        except WALClosed:
            self.stats.refused_exports += 1
            raise Backpressure("the collector is shutting down") from None
        if on_durable is None:
            durable()
        return seq

    # -- writing -----------------------------------------------------------------------------

    def _take(self) -> list[_Entry] | None:
        """A contiguous run of durable entries to store next; None when closing and done."""
        with self._cond:
            deadline = time.monotonic() + self._flush_interval
            while True:
                ready, full = self._ready()
                if self._closing or full:
                    break
                left = deadline - time.monotonic()
                if left <= 0 and ready:
                    break
                self._cond.wait(left if left > 0 else self._flush_interval)
            run: list[_Entry] = []
            w = rows = 0
            s = self._next
            last = self._forced[1] if self._forced else None
            while s in self._pending and s <= self.wal.durable:
                e = self._pending[s]
                if last is None and run and (w + e.weight > self._max_batch or rows + e.rows > MAX_RUN_ROWS):
                    break
                run.append(e)
                w += e.weight
                rows += e.rows
                if last is not None and s == last:
                    break
                s += 1
            if not run:
                return None if self._closing else []
            return run

    def _ready(self) -> tuple[int, bool]:
        """Weight of the durable entries next in line, and whether they make a full run (a batch's
        weight or MAX_RUN_ROWS rows: waiting for the flush interval then only grows the backlog)."""
        w = rows = 0
        s = self._next
        while s in self._pending and s <= self.wal.durable:
            e = self._pending[s]
            w += e.weight
            rows += e.rows
            if w >= self._max_batch or rows >= MAX_RUN_ROWS:
                return w, True
            s += 1
        return w, False

    def _materialize(self, run: list[_Entry]) -> tuple[dict, int]:
        parts = []
        for e in run:
            if e.batches is not None:
                parts.append(e.batches)
                continue
            self.stats.read_back_records += 1
            if e.light is not None:  # kept as the logged bytes: a view of the log's pages will do
                kind, payload = self.wal.read_view(e.seq)
                parts.append({table: rebuild(payload) for table, rebuild in e.light.items()})
            else:
                kind, payload = self.wal.read(e.seq)
                parts.append(self._decode(kind, payload))
        tables = _merge(parts)
        return tables, sum(len(b) for b in tables.values())

    def _run(self) -> None:
        name_os_thread()
        while True:
            run = self._take()
            if run is None:
                return
            if not run:
                continue
            first, last = run[0].seq, run[-1].seq
            try:
                write_atomic(self._checkpoint, json.dumps({"intent": [first, last], "epoch": self.wal.epoch}).encode())
                tables, rows = self._materialize(run)
            except Exception:
                log.exception("cannot prepare records %d-%d for storage; retrying", first, last)
                time.sleep(RETRY_BACKOFF_S)
                continue
            backoff = RETRY_BACKOFF_S
            while True:
                t0 = time.perf_counter()
                try:
                    self._store(tables, first, last)
                except Exception as exc:
                    self.stats.insert_errors += 1
                    self.stats.storage_ok = False
                    if time.monotonic() > self._give_up_at:
                        log.error("stopping with %d records still in the write-ahead log; they are stored at the next start",
                                  len(self._pending))
                        return
                    log.warning("insert of records %d-%d (%d rows) failed, retrying in %.1fs: %s",
                                first, last, rows, backoff, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    with self._cond:
                        self._cond.wait(backoff)
                    backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)
                    continue
                break
            dt = time.perf_counter() - t0
            by_table = {table: len(b) for table, b in tables.items()}
            held = sum(e.rows for e in run if e.batches is not None)
            spooled = sum(e.batches is None for e in run)
            # what was read back holds views of the log's pages (_merge extends the first batch with
            # them): dropped before the release, so the log can write over their segments
            del tables
            for e in run:
                e.batches = e.light = None
            self.wal.release(last)
            with self._cond:
                self._forced = None
                for e in run:
                    del self._pending[e.seq]
                    self._pending_rows -= e.rows
                self._memory_rows -= held
                self.stats.spooled_records -= spooled
                self._next = last + 1
                st = self.stats
                st.storage_ok = True
                st.inserts += 1
                st.insert_seconds += dt
                st.last_insert_ms = dt * 1000
                st.stored_rows += rows
                for table, n in by_table.items():
                    st.stored_by_table[table] = st.stored_by_table.get(table, 0) + n
                self._cond.notify_all()

    def _store(self, tables: dict, first: int, last: int) -> None:
        # a function of its own: no loop variable outlives the insert holding a batch (see _run)
        for table, batch in tables.items():
            self._insert(table, batch, f"{self.wal.epoch}:{first}-{last}:{table}")

    def wait_stored(self, seq: int, timeout: float) -> bool:
        """True once record *seq* is stored (used by tests and at shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next <= seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking exports; store what is queued within *timeout*; the log keeps the rest."""
        with self._cond:
            self._closing = True
            self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 1)
        self.wal.close()
