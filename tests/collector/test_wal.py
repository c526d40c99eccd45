"""The write-ahead log on a real filesystem: what was synced survives; nothing torn is replayed."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from tracemesh.collector import _wal
from tracemesh.collector._wal import WAL, WALClosed, WALFull, _write_all


def _records(wal: WAL) -> list[tuple[int, int, bytes]]:
    return [(s, *wal.read(s)) for s in wal.seqs()]


def test_append_read_reopen(tmp_path):
    w = WAL(tmp_path)
    assert [w.append(1, b"a"), w.append(2, b"bb"), w.append(3, b"")] == [1, 2, 3]
    w.close()
    w = WAL(tmp_path)
    assert _records(w) == [(1, 1, b"a"), (2, 2, b"bb"), (3, 3, b"")]
    assert w.append(1, b"next") == 4
    with pytest.raises(WALClosed):
        w.close(), w.append(1, b"x")


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20), st.integers(min_value=1, max_value=400))
@settings(max_examples=60, deadline=None)
def test_a_torn_tail_is_cut_at_the_last_whole_record(tmp_path_factory, payloads, cut):
    d = tmp_path_factory.mktemp("wal")
    w = WAL(d)
    for p in payloads:
        w.append(1, p)
    w.close()
    seg = next(d.glob("*.wal"))
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(max(0, size - cut))  # a crash mid-write leaves a prefix
    w = WAL(d)
    got = _records(w)
    # a prefix of what was written, every record whole
    assert [p for _, _, p in got] == payloads[: len(got)]
    # and the log goes on after the cut
    assert w.append(1, b"after") == len(got) + 1
    w.close()
    assert [p for _, _, p in _records(WAL(d))][-1] == b"after"


def test_a_flipped_byte_ends_the_log_there(tmp_path):
    w = WAL(tmp_path)
    for i in range(5):
        w.append(1, b"record %d" % i)
    w.close()
    seg = next(tmp_path.glob("*.wal"))
    data = bytearray(seg.read_bytes())
    rec = 17 + len(b"record 0")
    data[2 * rec + 20] ^= 0xFF  # inside the third record's payload
    seg.write_bytes(bytes(data))
    assert [p for _, _, p in _records(WAL(tmp_path))] == [b"record 0", b"record 1"]


def test_group_commit_under_threads(tmp_path):
    w = WAL(tmp_path)
    seqs: list[int] = []
    lock = threading.Lock()

    def writer(n):
        for i in range(200):
            s = w.append(1, f"{n}-{i}".encode())
            assert w.durable >= s  # returned only once synced
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 1601))
    assert w.syncs < 1600  # waiters shared fsyncs
    w.close()
    assert len(_records(WAL(tmp_path))) == 1600


def test_on_assigned_sees_sequence_order(tmp_path):
    w = WAL(tmp_path)
    order: list[int] = []
    threads = [threading.Thread(target=lambda: [w.append(1, b"x", on_assigned=order.append) for _ in range(100)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == sorted(order) == list(range(1, 401))


def test_rotation_release_and_numbering_survive_an_emptied_log(tmp_path):
    w = WAL(tmp_path, segment_bytes=200)
    for i in range(30):
        w.append(1, b"x" * 40)
    assert len(list(tmp_path.glob("*.wal"))) > 5
    w.release(20)
    assert all(s > 20 for s in w.seqs())
    w.release(30)
    assert w.bytes == 0 and list(w.seqs()) == []
    w.close()
    # everything stored: a new log must not reuse sequence numbers (insert tokens are built from them)
    w = WAL(tmp_path, segment_bytes=200)
    assert w.append(1, b"y") == 31
    assert w.epoch == WAL(tmp_path).epoch


def test_full_log_refuses_without_writing(tmp_path):
    w = WAL(tmp_path, max_bytes=1000)
    w.append(1, b"x" * 900)
    with pytest.raises(WALFull):
        w.append(1, b"x" * 200)
    assert list(w.seqs()) == [1]
    w.release(1)
    assert w.append(1, b"x" * 200) == 2


def test_segment_files_are_private(tmp_path):
    w = WAL(tmp_path)
    w.append(1, b"secret")
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in tmp_path.glob("*.wal"))


def test_rotation_under_concurrent_appends_never_reuses_a_sequence_number(tmp_path):
    # Rotation waits for an in-flight group commit; appenders arriving meanwhile must not be handed
    # the number the rotating appender already holds (seen: acknowledged exports silently lost).
    w = WAL(tmp_path, segment_bytes=4096)
    got: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def writer(n):
        for i in range(300):
            payload = f"{n}:{i}:".encode() * 20
            s = w.append(1, payload)
            with lock:
                got.append((s, payload))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = sorted(s for s, _ in got)
    assert seqs == list(range(1, 2401)), "a sequence number was handed out twice"
    w.close()
    w = WAL(tmp_path, segment_bytes=4096)
    assert {s: w.read(s)[1] for s in w.seqs()} == dict(got)


# -- the checksum: zlib's CRC-32, whichever implementation computes it -------------------------

def test_records_carry_zlibs_crc32_of_seq_kind_and_payload(tmp_path):
    """The format does not depend on the implementation: a log written with the folded CRC reads
    with zlib's, and the other way round."""
    import struct
    import zlib

    w = WAL(tmp_path)
    payloads = [os.urandom(n) for n in (0, 1, 63, 64, 65, 1000, 70_000)]
    for i, p in enumerate(payloads):
        w.append(i % 3 + 1, p)
    w.close()
    data = next(tmp_path.glob("*.wal")).read_bytes()
    off, seen = 0, []
    while off < len(data):
        length, crc, seq, kind = struct.unpack_from("<IIQB", data, off)
        payload = data[off + 17: off + 17 + length]
        assert crc == zlib.crc32(payload, zlib.crc32(struct.pack("<QB", seq, kind)))
        seen.append(payload)
        off += 17 + length
    assert seen == payloads


_crc32 = pytest.importorskip("tracemesh.collector._crc32")


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=15), st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=400, deadline=None)
def test_the_folded_crc32_is_zlibs(data, skip, start):
    import zlib

    view = memoryview(data)[skip:]  # every alignment of the folded loads
    assert _crc32.crc32(view) == zlib.crc32(view)
    assert _crc32.crc32(view, start) == zlib.crc32(view, start)


def test_the_folded_crc32_is_zlibs_on_large_inputs_and_without_pclmul():
    import subprocess
    import sys
    import zlib

    big = os.urandom(1 << 20)
    for n in (1 << 20, 404_632, 65_536 + 17, 16_384, 16_383):
        assert _crc32.crc32(big[:n]) == zlib.crc32(big[:n])
    # the byte table alone (a CPU without PCLMULQDQ)
    code = ("import os, zlib; from tracemesh.collector import _crc32; assert not _crc32.folding(); "
            "d = os.urandom(100_003); assert all(_crc32.crc32(d[:n], 7) == zlib.crc32(d[:n], 7) for n in range(0, 300)); "
            "assert _crc32.crc32(d) == zlib.crc32(d)")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRACEMESH_CRC32_TABLE": "1"}, check=True)


def test_the_crc32_refuses_what_zlib_refuses():
    with pytest.raises(TypeError):
        _crc32.crc32("text")
    with pytest.raises(TypeError):
        _crc32.crc32()
    assert _crc32.crc32(b"", 5) == 5


def test_read_view_is_read_without_a_copy_and_outlives_its_segment(tmp_path):
    w = WAL(tmp_path, segment_bytes=4096)
    payloads = [os.urandom(n) for n in (10, 1500, 3000, 700, 2500)]  # several segments
    seqs = [w.append(i % 3 + 1, p) for i, p in enumerate(payloads)]
    views = {s: w.read_view(s) for s in seqs[:2]}
    # the active segment grows after it was mapped: later records are still read whole
    seqs.append(w.append(3, b"later"))
    payloads.append(b"later")
    for s, p in zip(seqs, payloads):
        kind, view = w.read_view(s)
        assert isinstance(view, memoryview) and view.readonly
        assert (kind, bytes(view)) == w.read(s) == ((s - 1) % 3 + 1, p)
    del view
    w.release(seqs[-1])  # stored: segments still viewed are deleted, not kept to be written over
    assert w.bytes == 0
    for _ in range(6):  # later segments reuse the others
        w.append(1, os.urandom(3000))
    assert w.reused_segments >= 2
    assert {s: (k, bytes(v)) for s, (k, v) in views.items()} == {seqs[0]: (1, payloads[0]), seqs[1]: (2, payloads[1])}
    w.close()


def test_read_view_checks_the_crc(tmp_path):
    w = WAL(tmp_path)
    seq = w.append(1, b"payload bytes")
    seg = next(tmp_path.glob("*.wal"))
    with open(seg, "r+b") as f:  # the disk changes under the log (a bad sector, a stray write)
        f.seek(17 + 3)
        f.write(b"X")
    with pytest.raises(IOError, match="checksum"):
        w.read_view(seq)
    w.close()


def test_the_wal_benchmark_runs_and_reports_both_sides():
    """benchmarks/wal.py --quick (well under a second): its JSON, not its speed, is checked here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "wal.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--records", "20", "--record-kb", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["records"] == 20 and out["record_bytes"] == 64_000
    assert out["crc_implementation"] in ("folded (PCLMULQDQ)", "byte table", "zlib")
    assert out["crc32"]["log_us"] > 0 and out["crc32"]["zlib_us"] > 0
    for side in ("view", "copy"):
        assert out["read_back"][side]["cpu_us_per_record"] >= 0
    assert out["append"]["us_per_record"] > 0
    assert out["append_synced"]["segments_reused"] > 0 and out["append_synced"]["new_files"]["cpu_us_per_record"] > 0


@pytest.mark.parametrize("short", [0, 5, 20, 1020])
def test_a_short_write_is_finished_in_order(tmp_path, monkeypatch, short):
    # a file takes a whole pwritev; should the kernel ever take less, the rest follows in order
    real_pwrite, calls = os.pwrite, []

    def pwritev(fd, bufs, offset):
        calls.append(short)
        return real_pwrite(fd, b"".join(bufs)[:short], offset) if short else 0

    def pwrite(fd, data, offset):  # and each later write takes at most 777 bytes
        calls.append(offset)
        return real_pwrite(fd, bytes(data)[:777], offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "pwrite", pwrite)
    head, payload = bytes(range(20)), os.urandom(5000)
    with open(tmp_path / "seg", "wb") as f:
        f.write(b"?" * 100)
        _write_all(f.fileno(), head, payload, 100)
    assert calls[0] == short and len(calls) > 2
    assert (tmp_path / "seg").read_bytes() == b"?" * 100 + head + payload


# -- released segments written over (SPARE_SEGMENTS) ------------------------------------------------


def _crash(w: WAL) -> None:
    """Leave *w* as kill -9 would: nothing closed, nothing cut; only its descriptor goes."""
    os.close(w._fd)
    w._closed = True


def test_a_reused_segment_holds_only_its_new_records_after_a_crash(tmp_path):
    w = WAL(tmp_path, segment_bytes=1000)
    old = [w.append(1, bytes([i]) * 83) for i in range(22)]  # 100-byte records: 10 a segment
    w.release(old[-1])  # all stored
    # two kept (2 spares), the active one restarted in one of them, the third file deleted
    assert len(list(tmp_path.glob("*.spare"))) == 1 and w.reused_segments == 1
    new = [w.append(2, bytes([100 + i]) * 83) for i in range(13)]  # same size: old records line up
    assert w.reused_segments == 2
    _crash(w)
    w = WAL(tmp_path, segment_bytes=1000)
    # the new records, whole and in order; the older records after them, though whole and
    # checksummed, are older than their neighbours: never replayed, and cut from the file
    assert _records(w) == [(s, 2, bytes([100 + i]) * 83) for i, s in enumerate(new)]
    assert w.stale_bytes > 0 and w.truncated_bytes == 0
    assert w.append(3, b"next") == new[-1] + 1
    w.close()
    assert [s for s, *_ in _records(WAL(tmp_path))] == [*new, new[-1] + 1]


def test_a_segment_reused_but_not_yet_written_is_empty_after_a_crash(tmp_path):
    w = WAL(tmp_path, segment_bytes=1000)
    seqs = [w.append(1, b"x" * 83) for i in range(25)]
    w.release(seqs[-1])
    w.close()
    spare = min(tmp_path.glob("*.spare"))
    # the crash came between the rename that starts a segment in a spare and its first record
    os.rename(spare, tmp_path / f"{seqs[-1] + 1:020d}.wal")
    w = WAL(tmp_path, segment_bytes=1000)
    assert list(w.seqs()) == [] and w.append(1, b"y") == seqs[-1] + 1
    assert w.truncated_bytes == 0
    w.close()


def test_a_reused_segment_is_cut_to_its_records_when_the_log_moves_on(tmp_path):
    w = WAL(tmp_path, segment_bytes=1000)
    seqs = [w.append(1, b"a" * 83) for _ in range(30)]  # 3 segments of 10 x 100 bytes
    w.release(seqs[-1])
    new = [w.append(2, b"b" * 283) for _ in range(7)]  # 3 to a segment: 900 bytes, then older ones
    assert w.reused_segments >= 2
    assert [p.stat().st_size for p in sorted(tmp_path.glob("*.wal"))][:2] == [900, 900]
    w.close()
    w = WAL(tmp_path, segment_bytes=1000)
    assert _records(w) == [(s, 2, b"b" * 283) for s in new] and w.truncated_bytes == w.stale_bytes == 0
    w.close()


def test_a_clean_close_leaves_no_older_records_behind(tmp_path, caplog):
    w = WAL(tmp_path, segment_bytes=1000)
    seqs = [w.append(1, b"z" * 183) for _ in range(12)]
    w.release(seqs[-1])
    last = w.append(1, b"short")  # into a reused file: older records follow it until close
    w.close()
    with caplog.at_level("INFO", logger="tracemesh.collector._wal"):
        w = WAL(tmp_path, segment_bytes=1000)
    assert _records(w) == [(last, 1, b"short")] and w.stale_bytes == w.truncated_bytes == 0
    assert not caplog.records
    w.close()


def test_no_spares_means_released_segments_are_deleted(tmp_path):
    w = WAL(tmp_path, segment_bytes=1000, spare_segments=0)
    seqs = [w.append(1, b"x" * 183) for _ in range(12)]
    w.release(seqs[-1])
    assert not list(tmp_path.glob("*.spare")) and w.reused_segments == 0
    w.close()


_OPS = st.lists(st.one_of(
    # n records of one size: 283 bytes line up with a reused file's older records (300 with the
    # header, 5 to a segment); other sizes land mid-record
    st.tuples(st.just("append"), st.integers(min_value=1, max_value=12),
              st.one_of(st.just(283), st.integers(min_value=0, max_value=700))),
    st.tuples(st.just("release"), st.one_of(st.just(1.0), st.floats(min_value=0, max_value=1)), st.none()),
    st.tuples(st.just("reopen"), st.booleans(), st.none()),  # True: a clean close; False: a crash
), min_size=1, max_size=30)


@given(_OPS, st.integers(min_value=0, max_value=3))
@settings(max_examples=150, deadline=None)
def test_segments_written_over_never_bring_back_a_record_nor_lose_one(tmp_path_factory, ops, spares):
    d = tmp_path_factory.mktemp("wal")
    w = WAL(d, segment_bytes=1500, spare_segments=spares, sync=False)
    written: dict[int, bytes] = {}  # every record ever appended, by sequence number
    released = 0
    for op, arg, size in ops:
        if op == "append":
            for _ in range(arg):
                seq = w.append(1, os.urandom(size))
                assert seq not in written and seq == max(written, default=0) + 1
                written[seq] = bytes(w.read(seq)[1])
        elif op == "release" and written:
            released = max(released, int(arg * max(written)))
            w.release(released)
        elif op == "reopen":
            if arg:
                w.close()
            else:
                _crash(w)
            w = WAL(d, segment_bytes=1500, spare_segments=spares, sync=False)
            # after a crash a reused file's older bytes may follow the last record mid-record, as a
            # torn write does (and are cut the same way); after a clean close, nothing follows
            assert w.truncated_bytes == w.stale_bytes == 0 if arg else True
            got = _records(w)
            # every record not released is there, whole; what else is there is what release left
            # in segments it could not delete yet (the pipeline's checkpoint drops those); nothing
            # from before a file was reused, nothing out of order
            assert [s for s, *_ in got] == list(range(got[0][0], max(written) + 1)) if got else True
            assert all(p == written[s] for s, _, p in got)
            assert {s for s in written if s > released} <= {s for s, *_ in got}
        assert len(list(d.glob("*.spare"))) <= spares
    w.close()


def test_on_durable_runs_once_for_each_record_after_a_sync_covers_it(tmp_path):
    """Appenders that do not wait (the gRPC receiver) and appenders that do (OTLP/HTTP) at once:
    each callback runs exactly once, never before its record is synced, and syncs are shared."""
    w = WAL(tmp_path)
    calls: dict[tuple, list] = {}  # token -> [(error, w.durable when called)]
    seqs: dict[tuple, int] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(50):
            if (i + j) % 3 == 0:
                w.append(1, b"b" * 1000)  # blocking
                continue

            def cb(error, token=(i, j)):
                with lock:
                    calls.setdefault(token, []).append((error, w.durable))

            seqs[(i, j)] = w.append(1, b"a" * 1000, on_durable=cb)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.keys() == seqs.keys()
    for token, seq in seqs.items():
        assert len(calls[token]) == 1, (token, calls[token])
        error, durable = calls[token][0]
        assert error is None and durable >= seq
    assert w.durable == w.next_seq - 1 == 400
    assert w.syncs < 400  # shared
    w.close()


def test_a_failed_sync_fails_the_callbacks_it_covered_and_the_log_goes_on(tmp_path, monkeypatch):
    w = WAL(tmp_path)
    real = os.fdatasync
    results: list = []

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_wal.os, "fdatasync", failing)
    seq = w.append(1, b"x", on_durable=results.append)  # returns: the callback carries the error
    assert len(results) == 1 and isinstance(results[0], OSError) and w.durable < seq
    with pytest.raises(OSError):  # an appender that waits gets the error itself
        w.append(1, b"y")
    monkeypatch.setattr(_wal.os, "fdatasync", real)
    seq = w.append(1, b"z", on_durable=results.append)
    assert results[1:] == [None] and w.durable == seq
    w.close()
    assert [w2 for w2 in WAL(tmp_path).seqs()] == [1, 2, 3]  # written, and found at the next open
