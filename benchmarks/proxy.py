"""Sidecar benchmark: what two sidecars add to a request, against nginx as a proxy, in one run.

Paths, all HTTP/1.1 with 1 KB responses from one nginx acting as the server:
  direct:   client -> server
  sidecars: client -> sidecar (outbound) -> sidecar (inbound) -> server, tracing on (spans exported
            to a real collector, whose CPU is not counted)
  nginx:    client -> nginx (keep-alive upstream) -> server

The client is a separate process driving an open-loop fixed rate (default 1000 requests/s) over
kept-alive connections; latency is measured from each request's *scheduled* send time, so a
stall counts against the proxy rather than hiding (no coordinated omission). CPU comes from
/proc for each proxy process. Then a closed-loop run finds the most one sidecar pair carries.

    python benchmarks/proxy.py [--quick] [--rate 1000] [--seconds 20]

Needs Debian's nginx. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = b"x" * 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port}")
            time.sleep(0.05)


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- nginx ------------------------------------------------------------------------------------

def _nginx(workdir: Path, name: str, body: str) -> subprocess.Popen:
    d = workdir / name
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d};
  scgi_temp_path {d}; keepalive_requests 1000000; keepalive_timeout 300s; default_type text/plain;
{body}
}}""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the load client (its own process) --------------------------------------------------------

async def _client(port: int, host_header: str, rate: float, seconds: float, conns: int, closed_loop: bool) -> dict:
    request = f"GET / HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: tracemesh-bench\r\n\r\n".encode()
    queue: asyncio.Queue = asyncio.Queue()
    lat: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    end = t0 + seconds

    async def worker():
        nonlocal errors
        reader = writer = None
        while True:
            due = await queue.get() if not closed_loop else loop.time()
            if due is None or loop.time() > end + 5:
                break
            if closed_loop and due > end:
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                lat.append(loop.time() - due)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                writer = None
        if writer is not None:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(conns)]
    if not closed_loop:
        n = int(rate * seconds)
        for i in range(n):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(due)
        for _ in tasks:
            queue.put_nowait(None)
    await asyncio.gather(*tasks)
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else None  # noqa: E731
    return {"requests": len(lat), "errors": errors, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "rps": len(lat) / seconds}


def _client_proc(q, *args) -> None:
    q.put(asyncio.run(_client(*args)))


def drive(port: int, host: str, rate: float, seconds: float, watch: list[int], conns: int = 32,
          closed_loop: bool = False) -> dict:
    q = mp.Queue()
    p = mp.Process(target=_client_proc, args=(q, port, host, rate, seconds, conns, closed_loop))
    cpu0 = {pid: _cpu_s(pid) for pid in watch}
    p.start()
    res = q.get()
    p.join()
    res["cpu_s"] = {pid: round(_cpu_s(pid) - c, 3) for pid, c in cpu0.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, under a minute")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=None, help="per measured run (default 20; --quick 8)")
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    if not shutil.which("nginx"):
        sys.exit("benchmarks/proxy.py needs nginx (apt-get install nginx-light)")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tracemesh-proxy-bench-") as tmp:
        tmp = Path(tmp)
        try:
            server_port, nginx_port = _free_port(), _free_port()
            body = BODY.decode()
            procs.append(_nginx(tmp, "server", f"server {{ listen 127.0.0.1:{server_port}; location / {{ return 200 '{body}'; }} }}"))
            procs.append(_nginx(tmp, "proxy", f"""upstream backend {{ server 127.0.0.1:{server_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}"""))
            otlp, api = _free_port(), _free_port()
            log = open(tmp / "collector.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "tracemesh", "collector", "--store", str(tmp / "store"),
                                           "--otlp-grpc", f"127.0.0.1:{otlp}", "--otlp-http", "off", "--api", f"127.0.0.1:{api}"],
                                          stdout=log, stderr=subprocess.STDOUT))
            a_in, a_out, b_in, b_out = (_free_port() for _ in range(4))
            cfg = tmp / "mesh.yaml"
            cfg.write_text(json.dumps({"services": {"server": {"endpoints": [{"address": f"127.0.0.1:{b_in}"}]}}}))
            for svc, app, inb, outb in (("client", server_port, a_in, a_out), ("server", server_port, b_in, b_out)):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tracemesh", "sidecar", "--service", svc, "--app", f"127.0.0.1:{app}",
                     "--inbound", f"127.0.0.1:{inb}", "--outbound", f"127.0.0.1:{outb}", "--collector", f"127.0.0.1:{otlp}",
                     "--config", str(cfg)], stdout=open(tmp / f"{svc}.log", "wb"), stderr=subprocess.STDOUT))
            for port in (server_port, nginx_port, a_out, b_in, api):
                _wait_port(port)
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{api}/ready", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            nginx_server, nginx_proxy, sidecar_a, sidecar_b = procs[0].pid, procs[1].pid, procs[3].pid, procs[4].pid
            print("warming up", file=sys.stderr)
            drive(a_out, "server", 500, 2, [])
            drive(nginx_port, "server", 500, 2, [])
            out = {}
            for name, port in (("direct", server_port), ("sidecars", a_out), ("nginx", nginx_port)):
                print(f"{name}: {args.rate:.0f} req/s for {seconds:.0f} s", file=sys.stderr)
                out[name] = drive(port, "server", args.rate, seconds, [sidecar_a, sidecar_b, nginx_proxy, nginx_server])
            print("sidecars: closed loop, 32 connections", file=sys.stderr)
            peak = drive(a_out, "server", 0, seconds, [sidecar_a, sidecar_b], closed_loop=True)
            side = out["sidecars"]
            vcpu_per_1000 = (side["cpu_s"][sidecar_a] + side["cpu_s"][sidecar_b]) / 2 / seconds / (side["rps"] / 1000)
            nginx_vcpu = out["nginx"]["cpu_s"][nginx_proxy] / seconds / (out["nginx"]["rps"] / 1000)
            busiest = max(peak["cpu_s"][sidecar_a], peak["cpu_s"][sidecar_b])
            result = {
                "benchmark": "proxy", "quick": args.quick, "cpus": os.cpu_count(), "rate": args.rate, "seconds": seconds,
                "vcpu_per_1000rps": round(vcpu_per_1000, 3),
                "nginx_vcpu_per_1000rps": round(nginx_vcpu, 4),
                "ratio_to_nginx": round(vcpu_per_1000 / nginx_vcpu, 1) if nginx_vcpu else None,
                "rss_mb": round(max(_rss_mb(sidecar_a), _rss_mb(sidecar_b)), 1),
                "added_p50_ms": round(side["p50_ms"] - out["direct"]["p50_ms"], 3),
                "added_p99_ms": round(side["p99_ms"] - out["direct"]["p99_ms"], 3),
                "nginx_added_p50_ms": round(out["nginx"]["p50_ms"] - out["direct"]["p50_ms"], 3),
                "nginx_added_p99_ms": round(out["nginx"]["p99_ms"] - out["direct"]["p99_ms"], 3),
                "max_rps_per_core": round(peak["rps"] / (busiest / seconds)) if busiest else None,
                "max_rps_two_sidecars": round(peak["rps"]),
                "runs": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items() if kk != "cpu_s"}
                         for k, v in {**out, "sidecars_closed_loop": peak}.items()},
            }
            print(json.dumps(result, indent=2))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
