"""Control plane benchmark: how fast a route change reaches 1,000 sidecars, and what the collector
pays for it, against the same push to 10 sidecars in the same run.

One ``tracemesh collector`` (embedded store, config history, control plane) as a subprocess. The
sidecars are simulated by light clients: ``grpc.aio`` streams spread over ``--procs`` worker
processes (each stream its own connection, as a sidecar's is); each sends its node (so it registers
an endpoint of one of 50 services, and every snapshot carries all of them), ACKs every snapshot as
soon as it has decoded it, and does not parse the config (a real sidecar's parse runs in its own
process, in parallel with every other sidecar's).

Per phase (10 sidecars, the baseline; then ``--sidecars``): connect them all, wait until every one
is SYNCED, apply a route change through the collector's HTTP API (``POST /api/config``, the path
``tracemesh apply`` takes), and wait until every one ACKed it. The ACK latency of a sidecar is
measured by the collector, in one clock: from the moment the config store published the new
version to the ACK of the first snapshot carrying it (``config_ack_s`` of ``GET /api/proxies``).
``control_cpu_s`` is the collector's CPU (all threads, /proc) from the apply to the last ACK;
``control_rss_mb`` its resident memory with every sidecar connected; ``connect_s`` and
``connect_cpu_s`` what it took to connect them and sync them all the first time.

    python benchmarks/control.py [--quick] [--sidecars 1000] [--procs 4]

``--quick`` (about 10 s here) does one route change per phase; the full run three and reports the
worst. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICES = 50


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    from tracemesh.net import free_port

    return free_port()


# -- a worker process of simulated sidecars --------------------------------------------------


async def _sidecar(addr: str, n: int, stats: dict, stop: asyncio.Event) -> None:
    import grpc

    from tracemesh._proto import discovery_pb2 as pb

    node = pb.Node(service=f"svc-{n % SERVICES}", version="v1", namespace="bench", instance_id=f"sim-{n}",
                   address=f"127.{1 + n // 60000}.{(n // 250) % 240}.{n % 250 + 1}:{8000 + n % 1000}",
                   healthy=True)
    while not stop.is_set():
        async with grpc.aio.insecure_channel(addr) as channel:
            call = channel.stream_stream("/tracemesh.mesh.v1.MeshDiscovery/Stream",
                                         request_serializer=pb.DiscoveryRequest.SerializeToString,
                                         response_deserializer=pb.DiscoveryResponse.FromString)()
            try:
                await call.write(pb.DiscoveryRequest(node=node))
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break
                    stats["snapshots"] += 1
                    await call.write(pb.DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce))
            except grpc.aio.AioRpcError:
                stats["errors"] += 1
        if not stop.is_set():
            await asyncio.sleep(0.5)


async def _worker(addr: str, first: int, count: int) -> None:
    stats = {"snapshots": 0, "errors": 0}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(_sidecar(addr, first + i, stats, stop)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # a rollout, not a thundering herd of handshakes
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)


# -- the driver ------------------------------------------------------------------------------


class Collector:
    def __init__(self, workdir: Path) -> None:
        self.api = f"http://127.0.0.1:{_free_port()}"
        self.control = f"127.0.0.1:{_free_port()}"
        self.log = open(workdir / "collector.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracemesh", "collector", "--store", str(workdir / "store"),
             "--otlp-grpc", f"127.0.0.1:{_free_port()}", "--otlp-http", "off",
             "--api", self.api.removeprefix("http://"), "--control", self.control, "--endpoint-grace", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.api + "/api/proxies?summary=1", timeout=2) as r:
                    json.load(r)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"collector did not start: {(workdir / 'collector.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def proxies(self, summary: bool = False) -> dict:
        with urllib.request.urlopen(self.api + "/api/proxies" + ("?summary=1" if summary else ""), timeout=30) as r:
            return json.load(r)

    def apply(self, weight_v2: int) -> int:
        mesh = {"services": {"catalog": {"endpoints": [{"address": "127.0.0.1:9001", "version": "v1"},
                                                       {"address": "127.0.0.1:9002", "version": "v2"}]}},
                "routes": [{"service": "catalog", "destinations": [{"version": "v1", "weight": 100 - weight_v2},
                                                                  {"version": "v2", "weight": weight_v2}]}]}
        req = urllib.request.Request(self.api + "/api/config?replace=1", data=json.dumps(mesh).encode(),
                                     method="POST", headers={"content-type": "application/yaml"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["version"]

    def wait(self, pred, timeout: float) -> dict:
        """Poll the cheap summary until *pred* holds of it."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.proxies(summary=True)
            if pred(doc):
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached in {timeout}s: {doc}")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _synced(n: int, config: int | None = None):
    def pred(doc: dict) -> bool:
        return (doc["connected"] == n and doc["SYNCED"] == n and not doc["pending"]
                and (config is None or doc["config_version"] == config))
    return pred


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def phase(col: Collector, sidecars: int, procs: int, changes: int, first: int) -> dict:
    per = [sidecars // procs + (1 if i < sidecars % procs else 0) for i in range(procs)]
    workers, offset = [], first
    cpu0, t0 = _cpu_s(col.proc.pid), time.monotonic()
    for count in per:
        if count:
            workers.append(subprocess.Popen([sys.executable, __file__, "--worker", col.control, str(offset), str(count)],
                                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
            offset += count
    try:
        col.wait(_synced(sidecars), timeout=120)
        connect_s, connect_cpu = time.monotonic() - t0, _cpu_s(col.proc.pid) - cpu0
        rss = _rss_mb(col.proc.pid)
        runs = []
        for k in range(changes):
            time.sleep(0.5)
            cpu0, t0 = _cpu_s(col.proc.pid), time.monotonic()
            version = col.apply(weight_v2=10 * (k + 1) + first % 7)
            col.wait(_synced(sidecars, version), timeout=60)
            wall, cpu = time.monotonic() - t0, _cpu_s(col.proc.pid) - cpu0
            doc = col.proxies()
            lat = [p["config_ack_s"] for p in doc["proxies"]]
            runs.append({"p50_ack_s": round(statistics.median(lat), 3), "p99_ack_s": round(_pct(lat, 0.99), 3),
                         "max_ack_s": round(max(lat), 3), "all_acked_s": round(wall, 3),
                         "control_cpu_s": round(cpu, 3), "pushes": doc["pushes"]})
        worst = max(runs, key=lambda r: r["p99_ack_s"])
        return {"sidecars": sidecars, **worst, "control_rss_mb": round(rss, 1), "connect_s": round(connect_s, 2),
                "connect_cpu_s": round(connect_cpu, 2), "runs": len(runs)}
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        errors = 0
        for w in workers:
            try:
                out, _ = w.communicate(timeout=30)
                errors += json.loads(out.decode().strip().splitlines()[-1])["errors"]
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                w.kill()
        # the next phase starts once these have left the registry (grace 1 s)
        col.wait(lambda d: d["connected"] == 0 and d["endpoints"] == 0 and not d["pending"], timeout=30)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        asyncio.run(_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one route change per phase (about 10 s)")
    ap.add_argument("--sidecars", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="worker processes of simulated sidecars")
    args = ap.parse_args()
    changes = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="tracemesh-bench-control-") as tmp:
        col = Collector(Path(tmp))
        try:
            col.apply(weight_v2=0)
            baseline = phase(col, 10, min(args.procs, 2), changes, first=0)
            full = phase(col, args.sidecars, args.procs, changes, first=100_000)
        finally:
            col.close()
    out = {"sidecars": full["sidecars"], "p50_ack_s": full["p50_ack_s"], "p99_ack_s": full["p99_ack_s"],
           "max_ack_s": full["max_ack_s"], "control_cpu_s": full["control_cpu_s"],
           "control_rss_mb": full["control_rss_mb"],
           # the collector's RSS is mostly its embedded ClickHouse: what 1,000 streams add over 10
           "control_rss_delta_mb": round(full["control_rss_mb"] - baseline["control_rss_mb"], 1),
           "target_p99_ack_s": 1.0,
           "p99_ratio_to_baseline": round(full["p99_ack_s"] / max(baseline["p99_ack_s"], 1e-3), 1),
           "full": full, "baseline": baseline,
           "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
