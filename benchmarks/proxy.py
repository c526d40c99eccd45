"""Sidecar benchmark: what two sidecars add to a request, with and without mTLS between them,
against nginx as a proxy, in one run.

Paths, all HTTP/1.1 with 1 KB responses from one nginx acting as the server:
  direct:        client -> server
  sidecars:      client -> sidecar (outbound) -> sidecar (inbound) -> server, tracing on (spans
                 exported to a real collector, whose CPU is not counted)
  sidecars_mtls: the same, but the hop between the two sidecars is mesh mTLS (workload certificates
                 from the collector's CA, the inbound sidecar STRICT); client -> outbound sidecar
                 and inbound sidecar -> server stay plaintext, as in a mesh
  nginx:         client -> nginx (keep-alive upstream) -> server

The client is a separate process driving an open-loop fixed rate over kept-alive connections;
latency is measured from each request's *scheduled* send time, so a stall counts against the proxy
rather than hiding (no coordinated omission). Every path runs twice: at ``--rate`` (default 1000
requests/s; on a small machine the sidecar pair saturates below it, so those latencies are mostly
queueing) and at ``--low-rate`` (default 200 requests/s, where nothing saturates, so the added
latency is the proxies' own: the ``*_low`` keys). CPU comes from /proc for each proxy process. Then
closed-loop runs find the most one sidecar pair carries, plaintext and mTLS.

Handshakes: several clients, each opening a new TLS connection with a workload certificate per
handshake (``openssl s_time -new``, or Python ``ssl`` in processes where s_time is not usable),
against one STRICT inbound sidecar: ``mtls_handshakes_per_s``, the sidecar's CPU per handshake
(``mtls_handshake_vcpu_ms``) and what that makes on one core (``mtls_handshakes_per_core_s``).
The clients need about 1 ms of CPU per handshake themselves, so on 2 shared cores the rate can be
bounded by them rather than by the sidecar: ``mtls_handshake.sidecar_busy`` says which.

Before every measured run the benchmark waits until the sidecars and the collector are quiet (the
previous run's spans exported and written), so no run pays for the one before it.

    python benchmarks/proxy.py [--quick] [--rate 1000] [--low-rate 200] [--seconds 20]

``--workers``: the closed-loop maximum of one sidecar with one worker and with two
(``workers_max_rps``; left out of a ``--quick`` run that has already taken 100 s).

``--quick`` takes about a minute and a half; the full run about four minutes.

Needs Debian's nginx (and openssl for s_time). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = b"x" * 1024
TRUST_DOMAIN = "cluster.local"


def _sid(account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{account}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
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


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (all cores, every process), from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


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
    last_done = 0.0
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    end = t0 + seconds

    async def worker():
        nonlocal errors, last_done
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
                last_done = loop.time()
                lat.append(last_done - due)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                writer = None
        if writer is not None:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(conns)]
    n = 0
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
    # rps: requests over the scheduled time; achieved_rps: over the time until the last answer, which
    # is longer when the proxy could not keep up with an open-loop rate (the backlog drains after it).
    # abandoned: scheduled requests still waiting for a connection 5 s after the end, never sent;
    # the percentiles leave them out, so with abandoned > 0 the real tail is worse than they say.
    return {"requests": len(lat), "errors": errors, "abandoned": max(0, n - len(lat) - errors),
            "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "rps": len(lat) / seconds,
            "achieved_rps": len(lat) / max(seconds, last_done - t0) if lat else 0.0,
            "client_cpu_s": time.process_time()}


def _client_proc(q, *args) -> None:
    q.put(asyncio.run(_client(*args)))


def drive(port: int, host: str, rate: float, seconds: float, watch: list[int], conns: int = 32,
          closed_loop: bool = False) -> dict:
    q = mp.Queue()
    p = mp.Process(target=_client_proc, args=(q, port, host, rate, seconds, conns, closed_loop))
    cpu0 = {pid: _cpu_s(pid) for pid in watch}
    busy0, t0 = _machine_busy_s(), time.monotonic()
    p.start()
    res = q.get()
    p.join()
    res["cpu_s"] = {pid: round(_cpu_s(pid) - c, 3) for pid, c in cpu0.items()}
    # On a shared machine: how busy all cores were, and how much of that was not this benchmark
    # (when ``watch`` holds every process of it: the proxies, nginx and the collector).
    wall = time.monotonic() - t0
    busy = _machine_busy_s() - busy0
    res["wall_s"] = wall
    res["machine_busy_cores"] = busy / wall
    res["others_cores"] = max(0.0, busy - sum(res["cpu_s"].values()) - res.pop("client_cpu_s")) / wall
    return res


def settle(pids: list[int], limit_s: float, quiet: float = 0.1, window_s: float = 0.3) -> float:
    """Wait, at most ``limit_s``, until these processes together use less than ``quiet`` of a core:
    after a saturated run the sidecars are still exporting its spans and the collector writing
    them, which would otherwise load the next run (on 2 cores, its tail latency). Seconds waited."""
    t0 = time.monotonic()
    prev = sum(_cpu_s(pid) for pid in pids)
    while time.monotonic() - t0 < limit_s:
        time.sleep(window_s)
        now = sum(_cpu_s(pid) for pid in pids)
        if now - prev < quiet * window_s:
            break
        prev = now
    return time.monotonic() - t0


# -- mesh identity: a CA, join tokens, a client certificate -----------------------------------

def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _init_ca(workdir: Path, accounts: list[str]) -> tuple[Path, dict[str, Path], Path, Path, Path]:
    """A new mesh CA, a single-use join token file per account (sidecars), and a workload
    certificate for the handshake clients (``sa/loadgen``): (ca dir, tokens, cert, key, bundle)."""
    from tracemesh.collector._ca import MeshCA
    from tracemesh.identity import generate_key, make_csr, private_key_pem

    ca = MeshCA.init(workdir / "ca", trust_domain=TRUST_DOMAIN)
    tokens = {a: _write_private(workdir / f"{a}.token", (ca.create_token(_sid(a)) + "\n").encode()) for a in accounts}
    key = generate_key()
    chain = ca.issue(make_csr(key, _sid("loadgen")), ca.create_token(_sid("loadgen")))
    cert_path = workdir / "loadgen.pem"
    cert_path.write_bytes(chain)
    key_path = _write_private(workdir / "loadgen.key", private_key_pem(key))
    bundle_path = workdir / "bundle.pem"
    bundle_path.write_bytes(ca.bundle_pem())
    return ca.dir, tokens, cert_path, key_path, bundle_path


def _client_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """What a calling sidecar presents and checks (the peer's chain against the bundle)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _mtls_get(port: int, host: str, ctx: ssl.SSLContext) -> dict:
    """One request over mTLS straight to an inbound sidecar: proves the client certificate is
    accepted, and says what the handshake negotiated."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        negotiated = {"protocol": tls.version(), "cipher": tls.cipher()[0], "alpn": tls.selected_alpn_protocol()}
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        status = data.split(b"\r\n", 1)[0].decode(errors="replace")
        return {"status": status, **negotiated}


# -- new mTLS connections per second against one inbound sidecar ------------------------------

_S_TIME_LINE = re.compile(r"(\d+) connections in [\d.]+s;")


def _s_time(port: int, cert: Path, key: Path, bundle: Path, seconds: int, clients: int) -> tuple[int, float] | None:
    """``clients`` parallel ``openssl s_time -new`` (a full handshake per connection, no data):
    (connections, wall seconds), or None when s_time is missing or does not work here. The store
    is the mesh bundle alone: with the system's CA directory s_time looks the issuer up there on
    every connection, which costs it half again as much CPU (taken from the sidecar on 2 cores).
    s_time stops at a whole second of the wall clock (between ``seconds`` and ``seconds + 1`` after
    it starts; its "real seconds" are whole too), and clients started together stop together: the
    rate is over our own wall clock around them all."""
    if not shutil.which("openssl"):
        return None
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
           "-CAfile", str(bundle), "-no-CApath", "-no-CAstore", "-new", "-time", str(seconds)]
    t0 = time.monotonic()
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
          for _ in range(clients)]
    total = 0
    ok = True
    for p in ps:
        try:
            out = p.communicate(timeout=seconds + 30)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            for q in ps:
                q.kill()
                q.wait()
            print("openssl s_time did not finish", file=sys.stderr)
            return None
        m = _S_TIME_LINE.search(out)
        if p.returncode != 0 or not m or "ERROR" in out:
            print(f"openssl s_time did not work here (exit {p.returncode}): {out.strip()[-300:]}", file=sys.stderr)
            ok = False
        else:
            total += int(m.group(1))
    wall = time.monotonic() - t0
    return (total, wall) if ok and total else None


def _handshake_proc(q, port: int, cert: str, key: str, bundle: str, seconds: float) -> None:
    ctx = _client_context(Path(cert), Path(key), Path(bundle))
    n = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw):
                n += 1
        except (OSError, ssl.SSLError):
            errors += 1
    q.put((n, errors))


def _py_handshakes(port: int, cert: Path, key: Path, bundle: Path, seconds: float, clients: int) -> tuple[int, float]:
    q = mp.Queue()
    t0 = time.monotonic()
    ps = [mp.Process(target=_handshake_proc, args=(q, port, str(cert), str(key), str(bundle), seconds))
          for _ in range(clients)]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    wall = time.monotonic() - t0
    errors = sum(e for _, e in results)
    if errors:
        print(f"python handshake client: {errors} failed connections", file=sys.stderr)
    return sum(n for n, _ in results), wall


def handshakes(port: int, cert: Path, key: Path, bundle: Path, seconds: int, clients: int, pid: int,
               client: str) -> dict:
    """New mTLS connections per second one inbound sidecar completes, and its CPU per handshake."""
    cpu0 = _cpu_s(pid)
    res = _s_time(port, cert, key, bundle, seconds, clients) if client == "s_time" else None
    used = "openssl s_time -new"
    if res is None:
        cpu0 = _cpu_s(pid)
        res = _py_handshakes(port, cert, key, bundle, seconds, clients)
        used = "python ssl"
    cpu = _cpu_s(pid) - cpu0
    n, wall = res
    # sidecar_busy near 1: the sidecar was the bottleneck (one process, one core); well under 1: the
    # clients were (they share the machine), and per_core_s says what a whole core would do
    return {"client": used, "clients": clients, "connections": n, "seconds": wall, "per_s": n / wall,
            "sidecar_cpu_s": cpu, "sidecar_busy": cpu / wall, "vcpu_ms": cpu / n * 1000 if n else None,
            "per_core_s": n / cpu if cpu else None}


# -- processes --------------------------------------------------------------------------------

def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_MTLS_EXIT = re.compile(r"mTLS (\w+): (\d+) inbound handshakes, (\d+) plaintext connections, (\d+) refused")


def _inbound_tls_stats(log: Path) -> dict | None:
    """What a sidecar printed about its inbound mTLS at exit."""
    m = _MTLS_EXIT.search(log.read_text(errors="replace"))
    if not m:
        return None
    return {"mode": m.group(1), "handshakes": int(m.group(2)), "plaintext": int(m.group(3)), "refused": int(m.group(4))}


#: Under --quick, the --workers comparison is left out when the run has already taken this long.
QUICK_WORKERS_BUDGET_S = 100.0


def _children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if f[0] != "Z" and int(f[1]) == ppid:
                out.append(int(entry.name))
    return out


def compare_workers(args, started: float, ports: dict, sidecar, sidecars: dict, measure, out: dict,
                    secs: float, watch: list[int]) -> dict:
    """``--workers``: the most one sidecar serves (closed loop, client -> sidecar inbound -> server)
    with one worker (the ``server`` sidecar) and with two (a sidecar started for this), in the same
    run. On 2 cores the client (one Python process) takes most of a core of its own, so the ratio
    is a floor: ``machine_saturated`` says when every core was busy."""
    took = time.monotonic() - started
    if args.quick and took > QUICK_WORKERS_BUDGET_S:
        return {"skipped": f"--quick run had already taken {took:.0f} s"}
    admin = _free_port()
    ports["server-w2"] = (_free_port(), _free_port())
    sidecar("server-w2", "--workers", "2", "--admin", f"127.0.0.1:{admin}")
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or sidecars["server-w2"].poll() is not None:
                return {"skipped": "the --workers 2 sidecar did not become ready"}
            time.sleep(0.1)
    w2 = [sidecars["server-w2"].pid, *_children(sidecars["server-w2"].pid)]
    for name, port in (("one_sidecar_1_worker", ports["server"][0]), ("one_sidecar_2_workers", ports["server-w2"][0])):
        drive(port, "server", 500, 0.5, [])  # warm up: connections to the app in every worker
        measure(name, port, "server", 0, secs, [*watch, *w2], closed_loop=True)
    one, two = out["one_sidecar_1_worker"], out["one_sidecar_2_workers"]
    return {
        "max_rps_1_worker": round(one["rps"]), "max_rps_2_workers": round(two["rps"]),
        "ratio": round(two["rps"] / one["rps"], 2) if one["rps"] else None,
        "sidecar_cores_2_workers": round(sum(two["cpu_s"][p] for p in w2) / two["wall_s"], 2),
        "machine_busy_cores_2_workers": round(two["machine_busy_cores"], 2),
        "machine_saturated": two["machine_busy_cores"] > 0.9 * (os.cpu_count() or 1),
        "seconds": secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, about a minute and a half in all")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop rate (req/s) of the main runs")
    ap.add_argument("--low-rate", type=float, default=200.0,
                    help="open-loop rate (req/s) of the second run of every path, where the sidecars are not saturated")
    ap.add_argument("--seconds", type=float, default=None,
                    help="per main-rate and closed-loop run (default 20; --quick 8, closed loop 3)")
    ap.add_argument("--low-seconds", type=float, default=None, help="per low-rate run (default 20; --quick 5)")
    ap.add_argument("--handshake-seconds", type=int, default=None, help="handshake run (default 15; --quick 3)")
    ap.add_argument("--handshake-clients", type=int, default=8, help="parallel clients opening new mTLS connections")
    ap.add_argument("--handshake-client", choices=("s_time", "python"), default="s_time",
                    help="openssl s_time (falls back to python when it does not work) or Python ssl")
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    low_seconds = args.low_seconds or (5.0 if args.quick else 20.0)
    closed_seconds = 3.0 if args.quick and not args.seconds else seconds
    hs_seconds = args.handshake_seconds or (3 if args.quick else 15)
    if not shutil.which("nginx"):
        sys.exit("benchmarks/proxy.py needs nginx (apt-get install nginx-light)")
    started = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="tracemesh-proxy-bench-") as tmp:
        tmp = Path(tmp)
        try:
            server_port, nginx_port = _free_port(), _free_port()
            body = BODY.decode()
            nginx_server = _nginx(tmp, "server", f"server {{ listen 127.0.0.1:{server_port}; location / {{ return 200 '{body}'; }} }}")
            nginx_proxy = _nginx(tmp, "proxy", f"""upstream backend {{ server 127.0.0.1:{server_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}""")
            procs += [nginx_server, nginx_proxy]
            ca_dir, tokens, cert, key, bundle = _init_ca(tmp, ["client-mtls", "server-mtls"])
            otlp, api, ca_mtls = _free_port(), _free_port(), _free_port()
            log = open(tmp / "collector.log", "wb")
            collector = subprocess.Popen([sys.executable, "-m", "tracemesh", "collector", "--store", str(tmp / "store"),
                                          "--otlp-grpc", f"127.0.0.1:{otlp}", "--otlp-http", "off", "--api", f"127.0.0.1:{api}",
                                          "--ca", str(ca_dir), "--ca-mtls", f"127.0.0.1:{ca_mtls}"],
                                         stdout=log, stderr=subprocess.STDOUT)
            procs.append(collector)
            ports = {name: (_free_port(), _free_port()) for name in ("client", "server", "client-mtls", "server-mtls")}
            cfg = tmp / "mesh.yaml"
            cfg.write_text(json.dumps({"services": {
                "server": {"endpoints": [{"address": f"127.0.0.1:{ports['server'][0]}"}], "mtls": "disable"},
                "server-mtls": {"endpoints": [{"address": f"127.0.0.1:{ports['server-mtls'][0]}"}], "mtls": "strict",
                                "identity": _sid("server-mtls")},
            }}))
            sidecars: dict[str, subprocess.Popen] = {}

            def sidecar(svc: str, *extra: str) -> None:
                inb, outb = ports[svc]
                sidecars[svc] = subprocess.Popen(
                    [sys.executable, "-m", "tracemesh", "sidecar", "--service", svc, "--app", f"127.0.0.1:{server_port}",
                     "--inbound", f"127.0.0.1:{inb}", "--outbound", f"127.0.0.1:{outb}", "--collector", f"127.0.0.1:{otlp}",
                     "--config", str(cfg), *extra], stdout=open(tmp / f"{svc}.log", "wb"), stderr=subprocess.STDOUT)
                procs.append(sidecars[svc])

            sidecar("client")
            sidecar("server")
            _wait_port(otlp)  # the mTLS sidecars ask the CA on this port for their certificates
            for svc in ("client-mtls", "server-mtls"):
                sidecar(svc, "--identity", _sid(svc), "--token-file", str(tokens[svc]), "--mtls", "strict")
            for port in (server_port, nginx_port, api, *(p for pair in ports.values() for p in pair)):
                _wait_port(port)
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{api}/ready", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            check = _mtls_get(ports["server-mtls"][0], "server-mtls", _client_context(cert, key, bundle))
            if not check["status"].startswith("HTTP/1.1 200"):
                raise RuntimeError(f"mTLS request to the STRICT inbound sidecar failed: {check}")
            pids = {name: p.pid for name, p in sidecars.items()}
            watch = [*pids.values(), nginx_proxy.pid, nginx_server.pid, collector.pid]
            paths = (("direct", server_port, "server"), ("sidecars", ports["client"][1], "server"),
                     ("sidecars_mtls", ports["client-mtls"][1], "server-mtls"), ("nginx", nginx_port, "server"))
            out: dict[str, dict] = {}
            ours = [collector.pid, *pids.values()]  # what must be quiet before a measured run
            settle_limit = 2.0 if args.quick else 15.0
            waited = 0.0

            def measure(key: str, port: int, host: str, rate: float, secs: float, watched: list[int],
                        closed_loop: bool = False) -> None:
                nonlocal waited
                w = settle(ours, settle_limit)
                waited += w
                what = "closed loop, 32 connections" if closed_loop else f"{rate:.0f} req/s"
                print(f"{key}: {what} for {secs:.0f} s (after {w:.1f} s settling)", file=sys.stderr)
                out[key] = drive(port, host, rate, secs, watched, closed_loop=closed_loop)

            # Per path: warm up (which also fills the upstream pools: they drop connections idle
            # for 30 s), the low rate, then the main rate; the low run first, so that it never
            # follows a saturated run's export backlog.
            for name, port, host in paths:
                if name != "direct":
                    drive(port, host, 500, 1 if name.startswith("sidecars") and not args.quick else 0.5, [])
                measure(f"{name}_low", port, host, args.low_rate, low_seconds, watch)
                measure(name, port, host, args.rate, seconds, watch)
            measure("sidecars_closed_loop", ports["client"][1], "server", 0, closed_seconds, watch, closed_loop=True)
            measure("sidecars_mtls_closed_loop", ports["client-mtls"][1], "server-mtls", 0, closed_seconds, watch,
                    closed_loop=True)
            waited += settle(ours, settle_limit)
            print(f"handshakes: {args.handshake_clients} clients, a new mTLS connection each time, {hs_seconds} s",
                  file=sys.stderr)
            hs = handshakes(ports["server-mtls"][0], cert, key, bundle, hs_seconds, args.handshake_clients,
                            pids["server-mtls"], args.handshake_client)
            workers_cmp = compare_workers(args, started, ports, sidecar, sidecars, measure, out, closed_seconds, watch)
            rss = max(_rss_mb(pids["client"]), _rss_mb(pids["server"]))
            mtls_rss = max(_rss_mb(pids["client-mtls"]), _rss_mb(pids["server-mtls"]))

            def vcpu(run: str, a: str, b: str) -> float:
                """CPU-seconds per 1000 requests of one sidecar of the pair (their mean): the vCPUs
                one sidecar needs for 1000 req/s."""
                r = out[run]
                return (r["cpu_s"][pids[a]] + r["cpu_s"][pids[b]]) / 2 / r["requests"] * 1000

            def added(run: str, pct: str, base: str = "direct") -> float:
                low = "_low" if run.endswith("_low") else ""
                return round(out[run][pct] - out[base + low][pct], 3)

            def max_per_core(run: str, a: str, b: str) -> int | None:
                r = out[run]
                busiest = max(r["cpu_s"][pids[a]], r["cpu_s"][pids[b]])
                return round(r["rps"] / (busiest / closed_seconds)) if busiest else None

            vcpu_per_1000 = vcpu("sidecars", "client", "server")
            mtls_vcpu_per_1000 = vcpu("sidecars_mtls", "client-mtls", "server-mtls")
            nginx_vcpu = out["nginx"]["cpu_s"][nginx_proxy.pid] / seconds / (out["nginx"]["rps"] / 1000)
            result = {
                "benchmark": "proxy", "quick": args.quick, "cpus": os.cpu_count(), "rate": args.rate, "seconds": seconds,
                "low_rate": args.low_rate, "low_seconds": low_seconds, "loadavg_1m_at_start": load_at_start,
                # the most CPU that processes outside this benchmark took during one run (cores)
                "others_cores_max": round(max(v["others_cores"] for v in out.values()), 2),
                "vcpu_per_1000rps": round(vcpu_per_1000, 3),
                "nginx_vcpu_per_1000rps": round(nginx_vcpu, 4),
                "ratio_to_nginx": round(vcpu_per_1000 / nginx_vcpu, 1) if nginx_vcpu else None,
                "rss_mb": round(rss, 1),
                "added_p50_ms": added("sidecars", "p50_ms"),
                "added_p99_ms": added("sidecars", "p99_ms"),
                "nginx_added_p50_ms": added("nginx", "p50_ms"),
                "nginx_added_p99_ms": added("nginx", "p99_ms"),
                "max_rps_per_core": max_per_core("sidecars_closed_loop", "client", "server"),
                "max_rps_two_sidecars": round(out["sidecars_closed_loop"]["rps"]),
                "vcpu_per_1000rps_low": round(vcpu("sidecars_low", "client", "server"), 3),
                "added_p50_ms_low": added("sidecars_low", "p50_ms"),
                "added_p99_ms_low": added("sidecars_low", "p99_ms"),
                "nginx_added_p50_ms_low": added("nginx_low", "p50_ms"),
                "nginx_added_p99_ms_low": added("nginx_low", "p99_ms"),
                "mtls_vcpu_per_1000rps": round(mtls_vcpu_per_1000, 3),
                "mtls_cost_vcpu_per_1000rps": round(mtls_vcpu_per_1000 - vcpu_per_1000, 3),
                "mtls_rss_mb": round(mtls_rss, 1),
                "mtls_added_p50_ms": added("sidecars_mtls", "p50_ms"),
                "mtls_added_p99_ms": added("sidecars_mtls", "p99_ms"),
                "mtls_vcpu_per_1000rps_low": round(vcpu("sidecars_mtls_low", "client-mtls", "server-mtls"), 3),
                "mtls_cost_vcpu_per_1000rps_low": round(vcpu("sidecars_mtls_low", "client-mtls", "server-mtls")
                                                        - vcpu("sidecars_low", "client", "server"), 3),
                "mtls_added_p50_ms_low": added("sidecars_mtls_low", "p50_ms"),
                "mtls_added_p99_ms_low": added("sidecars_mtls_low", "p99_ms"),
                "mtls_max_rps_per_core": max_per_core("sidecars_mtls_closed_loop", "client-mtls", "server-mtls"),
                "mtls_max_rps_two_sidecars": round(out["sidecars_mtls_closed_loop"]["rps"]),
                "mtls_handshakes_per_s": round(hs["per_s"], 1),
                "mtls_handshake_vcpu_ms": round(hs["vcpu_ms"], 3) if hs["vcpu_ms"] else None,
                "mtls_handshakes_per_core_s": round(hs["per_core_s"]) if hs["per_core_s"] else None,
                "mtls_handshake": {**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in hs.items()},
                                   **{k: check[k] for k in ("protocol", "cipher", "alpn")}},
                "runs": {k: {**{kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items() if kk != "cpu_s"},
                             "collector_cores": round(v["cpu_s"][collector.pid] / v["wall_s"], 3)}
                         for k, v in out.items()},
            }
            result["workers_max_rps"] = workers_cmp
            # the sidecars print their mTLS counters at exit: a refused handshake would show there
            _stop(procs)
            result["mtls_inbound_at_exit"] = _inbound_tls_stats(tmp / "server-mtls.log")
            result["settling_s"] = round(waited, 1)
            result["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(result, indent=2))
        finally:
            _stop(procs)


if __name__ == "__main__":
    main()
