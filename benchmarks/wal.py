"""Write-ahead log benchmark: the checksum and the read-back path, each against its baseline in the
same run.

A collector's log holds every acknowledged export; under sustained overload most trace exports
wait only there (memory is bounded) and are read back when their turn comes. Measured on records of
``--record-kb`` random bytes (400 KB: one benchmarks/collector.py export of 500 spans):

- ``crc32``: the log's CRC-32 (collector/_crc32.c, folded with PCLMULQDQ where the CPU has it)
  against ``zlib.crc32``, the same function computed the usual way (the baseline);
- ``read_back``: ``WAL.read_view`` (a checked view of the segment's mapped pages) against
  ``WAL.read`` (a checked copy into fresh memory, the baseline), reading every record of a log of
  ``--records`` records (the log reopened each time, so its segments are mapped afresh; their pages
  are in the page cache, as a collector's recent writes are), holding up to 200 at a time (a run of
  the pipeline), then dropping them together, as the pipeline does after an insert;
- ``append``: ``WAL.append`` with group commit off (``sync=False``: the CPU, not the disk);
- ``append_synced``: ``WAL.append`` with each record synced, records released 4 behind as a
  pipeline stores them, segments of 8 records: into segments started in released files written
  over (``SPARE_SEGMENTS``, the log's default) against new files each time (``spare_segments=0``,
  the baseline).

CPU per record comes from ``getrusage`` (user and system separately: the copy's cost is page
faults, which is system time). Prints one JSON document.

    python benchmarks/wal.py [--quick] [--records N] [--record-kb N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Records held before they are dropped together: a run of the pipeline (at most 100k spans, 200
#: exports of 500) is held until its insert is done, then freed at once.
HELD = 200


def _measure(fn, n: int) -> dict:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, sys_ = (r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n
    return {"us_per_record": round(wall / n * 1e6, 1), "cpu_us_per_record": round((user + sys_) * 1e6, 1),
            "user_us": round(user * 1e6, 1), "system_us": round(sys_ * 1e6, 1),
            "page_faults_per_record": round((r1.ru_minflt - r0.ru_minflt) / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and repetitions (a few seconds)")
    ap.add_argument("--records", type=int, default=None, help="records in the log (default 400; --quick 100)")
    ap.add_argument("--record-kb", type=int, default=400, help="bytes of each record, in KB (default 400)")
    args = ap.parse_args()
    n = args.records or (100 if args.quick else 400)
    reps = 3 if args.quick else 7

    from tracemesh.collector import _wal
    from tracemesh.collector._wal import WAL

    try:
        from tracemesh.collector import _crc32
    except ImportError:
        _crc32 = None
    data = os.urandom(args.record_kb * 1000)
    out: dict = {"benchmark": "wal", "quick": args.quick, "records": n, "record_bytes": len(data),
                 "crc_implementation": ("folded (PCLMULQDQ)" if _crc32.folding() else "byte table")
                 if _crc32 is not None and _wal.crc32 is _crc32.crc32 else "zlib"}

    # the checksum: alternated repetitions, the best of each (the least disturbed by the machine)
    runs: dict[str, list[dict]] = {"log": [], "zlib": []}
    for _ in range(reps):
        for name, fn in (("log", _wal.crc32), ("zlib", zlib.crc32)):
            runs[name].append(_measure(lambda fn=fn: [fn(data) for _ in range(n)], n))
    best = {k: min(v, key=lambda m: m["cpu_us_per_record"]) for k, v in runs.items()}

    def gbs(m: dict) -> float:
        return round(len(data) / max(m["us_per_record"], 1e-9) / 1000, 2)

    out["crc32"] = {"log_us": best["log"]["us_per_record"], "log_gb_per_s": gbs(best["log"]),
                    "zlib_us": best["zlib"]["us_per_record"], "zlib_gb_per_s": gbs(best["zlib"]),
                    "speedup": round(best["zlib"]["us_per_record"] / max(best["log"]["us_per_record"], 1e-9), 2)}

    with tempfile.TemporaryDirectory() as tmp:
        wal = WAL(Path(tmp) / "wal", sync=False)
        out["append"] = _measure(lambda: [wal.append(1, data) for _ in range(n)], n)
        seqs = list(wal.seqs())
        wal.close()

        def read_all(read):
            def go():
                held = []
                for s in seqs:
                    held.append(read(s))
                    if len(held) >= HELD:
                        held.clear()
            return go

        def appends(spares: int):
            def go():
                wal = WAL(Path(tmp) / f"sync{spares}-{len(reused)}", sync=True, spare_segments=spares,
                          segment_bytes=8 * (len(data) + 64))
                for i in range(n):
                    seq = wal.append(1, data)
                    if seq > 4:
                        wal.release(seq - 4)
                reused.append(wal.reused_segments)
                wal.close()
            return go

        runs = {"reused": [], "new": []}
        reused: list[int] = []
        for _ in range(reps):
            for name, spares in (("reused", _wal.SPARE_SEGMENTS), ("new", 0)):
                runs[name].append(_measure(appends(spares), n))
        mid = {k: sorted(v, key=lambda m: m["cpu_us_per_record"])[len(v) // 2] for k, v in runs.items()}
        out["append_synced"] = {"reused_files": mid["reused"], "new_files": mid["new"], "segments_reused": max(reused),
                                "cpu_ratio_to_new": round(mid["reused"]["cpu_us_per_record"]
                                                          / max(mid["new"]["cpu_us_per_record"], 1e-9), 3)}

        runs = {"read_view": [], "read": []}
        for _ in range(reps):
            for name in runs:
                wal = WAL(Path(tmp) / "wal", sync=False)  # reopened: no segment mapped yet
                runs[name].append(_measure(read_all(getattr(wal, name)), len(seqs)))
                wal.close()
    # the median of each: the copy's page faults depend on what the allocator kept from the last round
    mid = {k: sorted(v, key=lambda m: m["cpu_us_per_record"])[len(v) // 2] for k, v in runs.items()}
    out["read_back"] = {"view": mid["read_view"], "copy": mid["read"],
                        "cpu_ratio_to_copy": round(mid["read_view"]["cpu_us_per_record"]
                                                   / max(mid["read"]["cpu_us_per_record"], 1e-9), 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
