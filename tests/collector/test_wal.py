"""The write-ahead log on a real filesystem: what was synced survives; nothing torn is replayed."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

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
    w.release(seqs[-1])  # stored: the segments are deleted
    assert not [p for p in tmp_path.glob("*.wal") if p.stat().st_size]
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


@pytest.mark.parametrize("short", [0, 5, 20, 1020])
def test_a_short_writev_is_finished_in_order(tmp_path, monkeypatch, short):
    # a file takes a whole writev; should the kernel ever take less, the rest follows in order
    real, first = os.writev, []

    def writev(fd, bufs):
        if first:
            return real(fd, bufs)
        first.append(short)
        return os.write(fd, b"".join(bufs)[:short]) if short else 0

    monkeypatch.setattr(os, "writev", writev)
    head, payload = bytes(range(20)), os.urandom(5000)
    with open(tmp_path / "seg", "wb") as f:
        _write_all(f.fileno(), head, payload)
    assert first == [short] and (tmp_path / "seg").read_bytes() == head + payload
