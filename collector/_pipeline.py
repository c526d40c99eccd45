"""Between the receivers and the store: a bounded queue and one writer thread that batches.

Receivers hand over encoded columns with :meth:`SpanPipeline.offer`, which never blocks: when the
queue holds ``max_queued_spans`` it answers False and the receiver pushes back (gRPC
RESOURCE_EXHAUSTED), so memory stays bounded. The writer merges what is queued into inserts of up
to ``max_batch_spans`` rows, or whatever arrived within ``flush_interval_s``.

Cancellation: :meth:`close` drains the queue into the store before it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from tracemesh.collector._encode import SpanColumns

log = logging.getLogger(__name__)

#: Large inserts are cheap per row in ClickHouse; 50k spans is ~30 MB of columns.
MAX_BATCH_SPANS = 50_000
#: Data is queryable within about this long after it arrives.
FLUSH_INTERVAL_S = 0.2
#: Pushback threshold: the queue never holds more than this many spans.
MAX_QUEUED_SPANS = 200_000
#: After a failed insert, wait this long before trying again (the batch is kept).
RETRY_BACKOFF_S = 1.0


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    refused: int = 0  # pushed back because the queue was full
    stored: int = 0
    insert_errors: int = 0
    last_insert_ms: float = 0.0


class SpanPipeline:
    def __init__(self, insert, *, max_batch: int = MAX_BATCH_SPANS, max_queued: int = MAX_QUEUED_SPANS,
                 flush_interval: float = FLUSH_INTERVAL_S) -> None:
        self._insert = insert
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._flush_interval = flush_interval
        self._queue: deque[SpanColumns] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self.stats = Stats()
        self._thread = threading.Thread(target=self._run, name="span-writer", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queued

    def offer(self, cols: SpanColumns) -> bool:
        """Queue *cols* for storage; False (nothing queued) when full or closing."""
        n = len(cols)
        with self._cond:
            if self._closing or (self._queued + n > self._max_queued and self._queued > 0):
                self.stats.refused += n
                return False
            self._queue.append(cols)
            self._queued += n
            self.stats.received += n
            if self._queued >= self._max_batch:
                self._cond.notify()
        return True

    def _take(self) -> SpanColumns | None:
        with self._cond:
            deadline = time.monotonic() + self._flush_interval
            while self._queued < self._max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not self._queue:
                return None
            batch = self._queue.popleft()
            while self._queue and len(batch) + len(self._queue[0]) <= self._max_batch:
                nxt = self._queue.popleft()
                if not len(batch):
                    batch = nxt
                else:
                    batch.extend(nxt)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                with self._cond:
                    if self._closing and not self._queue:
                        return
                continue
            while True:
                t0 = time.perf_counter()
                try:
                    self._insert(batch)
                except Exception:
                    self.stats.insert_errors += 1
                    log.exception("insert of %d spans failed; retrying in %.1fs", len(batch), RETRY_BACKOFF_S)
                    with self._cond:
                        if self._closing and self.stats.insert_errors > 3:
                            log.error("giving up on %d spans at shutdown", len(batch))
                            break
                    time.sleep(RETRY_BACKOFF_S)
                    continue
                self.stats.last_insert_ms = (time.perf_counter() - t0) * 1000
                self.stats.stored += len(batch)
                break
            with self._cond:
                self._queued -= len(batch)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking spans, store what is queued, stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
