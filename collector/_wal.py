"""The collector's write-ahead log: an export is acknowledged only once it is here, on disk.

Records are appended to segment files ``<first-seq>.wal`` (rotated at :data:`SEGMENT_BYTES`),
each ``length u32 | crc32 u32 | seq u64 | kind u8 | payload``, the CRC covering seq, kind and
payload. Appenders share fsyncs (group commit): the first one to wait becomes the leader, syncs
everything written so far with the lock released, and wakes the others; under load one
``fdatasync`` acknowledges many exports. An appender may instead pass ``on_durable`` and return
as soon as its record is written: the leader runs the callback once a sync covers the record (and
keeps syncing while such callbacks wait), so no thread sleeps per record. The gRPC receiver acks
this way: a context switch saved per export is ~0.3 us a span on this machine.

Opening scans the segments; a torn or corrupt tail (a crash mid-write) is cut off at the last
whole record, so every record that was acknowledged (synced) survives and nothing half-written is
replayed. Segments whose records are all stored are released by :meth:`WAL.release`: up to
:data:`SPARE_SEGMENTS` of them are kept as ``<first-seq>.spare`` files and written over as later segments
(as PostgreSQL recycles its WAL files), the rest deleted. Writing over pages that the page cache and
the filesystem already hold costs about half what writing a new file does (no page or block
allocation, no deletion). A reused file holds its old records after the new ones until it is
closed, rotated or cut at the next open; they are never read: every record carries its sequence
number, and the scan stops at the first one older than the records before it.

Thread-safe. Not async: receivers run in grpcio's threads and in worker threads of Trio.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tracemesh._fs import fsync_dir

try:  # zlib's CRC-32, 4x faster where the CPU folds with PCLMULQDQ (collector/_crc32.c)
    from tracemesh.collector._crc32 import crc32
except ImportError:  # pragma: no cover - installs without a compiler
    from zlib import crc32

log = logging.getLogger(__name__)

#: Segments of this size keep deletion granular without many files.
SEGMENT_BYTES = 64 * 1024 * 1024
#: Beyond this many bytes not yet stored, appends are refused and receivers push back.
MAX_BYTES = 1024 * 1024 * 1024
#: A single record larger than this is refused (the receivers' message limit is lower).
MAX_RECORD_BYTES = 256 * 1024 * 1024
#: Released segments kept to be written over as later segments (each up to SEGMENT_BYTES on disk).
#: 400 KB appends, each synced: 251-259 us of CPU into new files, 185 into reused ones (2026-11-27,
#: benchmarks/wal.py's ``append_synced``).
SPARE_SEGMENTS = 2
_HEADER = struct.Struct("<IIQB")
_SUFFIX = ".wal"
_SPARE = ".spare"


class WALFull(Exception):
    """The log holds :data:`MAX_BYTES` not yet stored; the sender must retry later."""


class WALClosed(Exception):
    pass


@dataclass(frozen=True)
class _Loc:
    segment: Path
    offset: int
    length: int  # payload length


def _write_all(fd: int, head: bytes, payload: bytes, offset: int) -> None:
    """*head* then *payload* at *offset*, in one pwritev when the kernel takes it all (it does, for
    a file); after a short write, the rest in order."""
    done = os.pwritev(fd, (head, payload), offset)
    while done < len(head) + len(payload):
        rest = memoryview(head)[done:] if done < len(head) else memoryview(payload)[done - len(head):]
        done += os.pwrite(fd, rest, offset + done)


def _closed(m: mmap.mmap) -> bool:
    """Close *m* unless a view of it is held; whether it is closed."""
    try:
        m.close()
    except BufferError:  # exported: a view is still held
        return False
    return True


def _run(callbacks: list) -> None:
    """Run on_durable callbacks; one that raises is logged and does not stop the others."""
    for cb, error in callbacks:
        try:
            cb(error)
        except Exception:
            log.exception("an on_durable callback of the write-ahead log failed")


def _crc(seq: int, kind: int, payload: bytes) -> int:
    return crc32(payload, crc32(struct.pack("<QB", seq, kind)))


class WAL:
    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = SEGMENT_BYTES,
                 max_bytes: int = MAX_BYTES, sync: bool = True, spare_segments: int = SPARE_SEGMENTS) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        self._sync = sync
        self._max_spares = spare_segments
        self._spares: list[Path] = []  # released segment files to write over, see SPARE_SEGMENTS
        self.reused_segments = 0  # segments started in a spare rather than a new file
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index: dict[int, _Loc] = {}
        self._maps: dict[Path, list[mmap.mmap]] = {}  # read_view's mappings of segments, newest last
        self._maps_lock = threading.Lock()
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._bytes = 0
        self.truncated_bytes = 0  # cut off a torn tail at open
        self.stale_bytes = 0  # cut off at open after the last record: a reused segment's old records
        self.epoch = self._epoch()
        self._recover()
        self._syncing = False
        self._closed = False
        #: (seq, on_durable) of records written but not yet known synced, in sequence order
        self._callbacks: deque = deque()
        self.durable = self.next_seq - 1
        self.syncs = 0

    # -- opening -----------------------------------------------------------------------------

    def _epoch(self) -> str:
        """A random id for this log's life: with the sequence numbers it makes insert tokens unique
        even when the log directory is deleted and a new one starts again from 1."""
        path = self.dir / "epoch"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            epoch = os.urandom(8).hex()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(epoch)
            os.replace(tmp, path)
            fsync_dir(self.dir)
            return epoch

    def _recover(self) -> None:
        spares = sorted(self.dir.glob("*" + _SPARE))
        self._spares, extra = spares[:self._max_spares], spares[self._max_spares:]
        for path in extra:
            path.unlink(missing_ok=True)
        files = sorted(self.dir.glob("*" + _SUFFIX), key=lambda p: int(p.stem))
        next_seq = 1
        for i, path in enumerate(files):
            # an empty segment is named by the next sequence number: keep counting from there
            next_seq = max(next_seq, int(path.stem))
            valid_end = 0
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            stale = False  # the scan ended at a whole record older than the ones before it
            while pos + _HEADER.size <= len(data):
                length, crc, seq, kind = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if length > MAX_RECORD_BYTES or end > len(data):
                    break
                payload = data[pos + _HEADER.size:end]
                if _crc(seq, kind, payload) != crc:
                    break
                if seq < next_seq:  # written before this file was reused (or a stray copy): not ours
                    stale = True
                    break
                self._index[seq] = _Loc(path, pos + _HEADER.size, length)
                next_seq = seq + 1
                pos = valid_end = end
            if valid_end < len(data):
                cut = len(data) - valid_end
                if stale:
                    self.stale_bytes += cut
                    log.info("WAL: %s reused a released segment; its %d bytes of older records are cut", path, cut)
                elif i < len(files) - 1:
                    self.truncated_bytes += cut
                    log.error("WAL segment %s is corrupt after byte %d; %d bytes cut", path, valid_end, cut)
                else:
                    self.truncated_bytes += cut
                    log.warning("WAL: cut %d bytes after the last whole record of %s (a crash mid-write, "
                                "or a reused segment's older contents)", cut, path)
                with open(path, "r+b") as f:
                    f.truncate(valid_end)
                    os.fsync(f.fileno())
            self._segments.append((int(path.stem), path))
            self._bytes += valid_end
        self.next_seq = next_seq
        if self._segments:
            path = self._segments[-1][1]
            self._fd = os.open(path, os.O_WRONLY)
            self._seg_size = os.path.getsize(path)
            self._reused = False  # cut to its last record above
        else:
            self._open_segment(next_seq)

    def _open_segment(self, first_seq: int) -> None:
        """Start the segment named *first_seq*: in a spare when there is one, else a new file. Its
        name is durable before anything is written to it."""
        path = self.dir / f"{first_seq:020d}{_SUFFIX}"
        self._reused = bool(self._spares)  # then the file holds older records past what is written
        if self._reused:
            os.rename(self._spares.pop(), path)
            self.reused_segments += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._seg_size = 0
        self._segments.append((first_seq, path))
        if self._sync:
            fsync_dir(self.dir)

    def _retire(self, path: Path) -> int:
        """A released segment's file: kept as a spare while there is room, else deleted. Returns its
        size (what the log no longer holds)."""
        reusable = self._unmap(path)
        try:
            size = path.stat().st_size
            if reusable and len(self._spares) < self._max_spares:
                spare = path.with_suffix(_SPARE)  # named as the segment was: unique
                os.rename(path, spare)  # not synced: after a crash it may be back as a segment of stored records
                self._spares.append(spare)
            else:
                path.unlink()
        except FileNotFoundError:
            size = 0
        return size

    # -- appending ---------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes on disk in segments not yet released."""
        return self._bytes

    def append(self, kind: int, payload: bytes, on_assigned=None, on_durable=None) -> int:
        """Write one record and return its sequence number once it is on disk.

        *on_assigned(seq)* runs under the log's lock right after the record is written, so callers
        see records in sequence order. Raises WALFull (nothing written) or WALClosed.

        With *on_durable*, return as soon as the record is written (not yet synced);
        ``on_durable(None)`` runs once it is on disk, or ``on_durable(exc)`` when the sync failed
        (OSError), in whichever thread syncs (perhaps this one, before returning), never under the lock.
        """
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes is larger than {MAX_RECORD_BYTES}")
        reclen = _HEADER.size + len(payload)
        done: list = []
        try:
            with self._lock:
                while True:  # every wait below releases the lock: re-check everything after it
                    if self._closed:
                        raise WALClosed("the write-ahead log is closed")
                    if self._seg_size > 0 and self._seg_size + reclen > self._segment_bytes:
                        if self._syncing:  # never close the file a leader is syncing
                            self._cond.wait()
                            continue
                        self._rotate()
                        continue
                    break
                if self._bytes + len(payload) > self._max_bytes and self._bytes > 0:
                    raise WALFull(f"the write-ahead log holds {self._bytes} bytes not yet stored (limit {self._max_bytes})")
                # the number is taken only now, with the lock held from here to the write
                seq = self.next_seq
                head = _HEADER.pack(len(payload), _crc(seq, kind, payload), seq, kind)
                offset = self._seg_size
                _write_all(self._fd, head, payload, offset)  # not head + payload: that copies an export (~400 KB)
                self.next_seq = seq + 1
                self._seg_size += reclen
                self._bytes += reclen
                self._index[seq] = _Loc(self._segments[-1][1], offset + _HEADER.size, len(payload))
                if on_assigned is not None:
                    on_assigned(seq)
                if on_durable is None:
                    while self.durable < seq:
                        if self._syncing:
                            self._cond.wait()
                        else:
                            self._lead(seq, done)
                else:
                    self._callbacks.append((seq, on_durable))
                    if not self._syncing:
                        try:
                            self._lead(seq, done)
                        except OSError as exc:  # the callbacks it covered, this one's too, are told
                            log.error("write-ahead log: fdatasync failed: %s", exc)
                self._ready(done)  # covered by a rotation's sync
        finally:
            _run(done)
        return seq

    def _ready(self, done: list) -> None:
        """Move the callbacks of durable records to *done* (run once the lock is released)."""
        cbs = self._callbacks
        while cbs and cbs[0][0] <= self.durable:
            done.append((cbs.popleft()[1], None))

    def _lead(self, seq: int, done: list) -> None:
        """Lock held, no leader: sync, with the lock released, until record *seq* and every record
        with a callback are on disk. Callbacks of synced records run between syncs (outside the
        lock); the last ones go to *done*. A failed sync fails the callbacks it should have covered
        and raises."""
        self._syncing = True
        try:
            while self.durable < seq or (self._callbacks and self._callbacks[-1][0] > self.durable):
                target, fd = self.next_seq - 1, self._fd
                ready, done[:] = done[:], []
                self._lock.release()
                try:
                    _run(ready)
                    if self._sync:
                        os.fdatasync(fd)
                except OSError as exc:
                    self._lock.acquire()
                    while self._callbacks and self._callbacks[0][0] <= target:
                        done.append((self._callbacks.popleft()[1], exc))
                    raise
                except BaseException:
                    self._lock.acquire()
                    raise
                self._lock.acquire()
                self.syncs += 1
                self.durable = max(self.durable, target)
                self._ready(done)
                self._cond.notify_all()
        finally:
            self._syncing = False
            self._cond.notify_all()

    def _rotate(self) -> None:
        """Close the active segment (synced) and start the next; lock held, no leader syncing."""
        if self._reused:  # its older records go: only the last segment may have a tail
            os.ftruncate(self._fd, self._seg_size)
        if self._sync:
            os.fdatasync(self._fd)
        self.syncs += 1
        self.durable = self.next_seq - 1
        self._cond.notify_all()  # appenders waiting for durability are covered by this sync
        os.close(self._fd)
        self._open_segment(self.next_seq)

    # -- reading and releasing ---------------------------------------------------------------

    def read(self, seq: int) -> tuple[int, bytes]:
        """(kind, payload) of record *seq*; KeyError when released or never written."""
        loc = self._index[seq]
        with open(loc.segment, "rb") as f:
            f.seek(loc.offset - _HEADER.size)
            head = f.read(_HEADER.size)
            payload = f.read(loc.length)
        return self._checked(seq, loc, head, payload), payload

    def read_view(self, seq: int) -> tuple[int, memoryview]:
        """As :meth:`read`, the payload a read-only view of the segment's mapping (the page cache's
        own pages) instead of a copy: reading a spooled record back costs no fresh memory (a copy
        took ~320 us of a 400 KB export here, nearly all of it first-touch page faults). The view
        stays valid after the record is released: a segment of which views are still held when it is
        released is deleted, not reused (see :meth:`_unmap`)."""
        loc = self._index[seq]
        start, end = loc.offset - _HEADER.size, loc.offset + loc.length
        with self._maps_lock:  # views are taken under the lock: _unmap closes what none holds
            maps = self._maps.setdefault(loc.segment, [])
            if not maps or len(maps[-1]) < end:  # the active segment has grown since it was mapped
                maps[:] = [m for m in maps if not _closed(m)]  # older mappings no view holds go
                with open(loc.segment, "rb") as f:
                    maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            record = memoryview(maps[-1])[start:end]
        payload = record[_HEADER.size:]
        return self._checked(seq, loc, record[:_HEADER.size], payload), payload

    @staticmethod
    def _checked(seq: int, loc: _Loc, head, payload) -> int:
        """The kind of record *seq* read from *loc* as *head* and *payload*, once its header and
        CRC say it is that record, whole; IOError otherwise."""
        length, crc, rseq, kind = _HEADER.unpack(head)
        if rseq != seq or length != len(payload) or _crc(seq, kind, payload) != crc:
            raise IOError(f"WAL record {seq} in {loc.segment} fails its checksum")
        return kind

    def _unmap(self, path: Path) -> bool:
        """Forget the mappings of a segment being released. False when views of it are still held:
        they keep their mapping alive until they go, and the file must not be written over."""
        with self._maps_lock:
            maps = self._maps.pop(path, [])
            closed = [_closed(m) for m in maps]  # every one tried, not up to the first held
        return all(closed)

    def seqs(self, start: int = 1) -> Iterator[int]:
        """Sequence numbers still held, from *start*, in order."""
        return iter(sorted(s for s in self._index if s >= start))

    def release(self, through_seq: int) -> int:
        """Forget records up to *through_seq* (stored); delete segments that hold nothing else."""
        freed = 0
        with self._lock:
            for s in [s for s in self._index if s <= through_seq]:
                del self._index[s]
            while len(self._segments) > 1 and self._segments[1][0] <= through_seq + 1:
                _, path = self._segments.pop(0)
                freed += self._retire(path)
            self._bytes -= freed
            while self._syncing:
                self._cond.wait()
            if len(self._segments) == 1 and not self._index and self._seg_size > 0 and self.durable == self.next_seq - 1:
                # everything is stored: restart the active segment empty rather than let it grow
                os.close(self._fd)
                _, path = self._segments.pop()
                self._retire(path)
                self._bytes -= self._seg_size
                freed += self._seg_size
                self._open_segment(self.next_seq)
        return freed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._syncing:
                self._cond.wait()
            if self._reused:  # its older records: no tail to cut at the next open
                os.ftruncate(self._fd, self._seg_size)
            if self._sync:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self.durable = self.next_seq - 1
            done: list = []
            self._ready(done)
        _run(done)
        with self._maps_lock:
            self._maps.clear()
