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

When 1000 requests/s open loop is more than the pair sustains on this machine (``rate_sustained``
false, ``rate_not_sustained`` says what it carried), the added latency is also measured at 80 % of
the closed-loop maximum (``sustainable_rate``, ``added_p50_ms_sustainable``...).

HTTP/2 (``http2``): h2load (h2c prior knowledge, 4 connections x 10 streams, closed loop; and, in
the full run, paced at 500 requests/s for the added latency) direct to nginx serving h2c, through
the outbound sidecar to a sidecar in front of that nginx, and through nginx as an h2c front (nginx
proxies to its upstream in HTTP/1.1: it has no HTTP/2 upstreams). gRPC (``grpc``): a grpcio client
(8 threads of blocking calls) to the tests' grpcio generic-handler app (tests/proxy/h2_helpers.py,
in a process of its own), direct and through two sidecars: unary 1 KB echoes, and (full run) a
server-streaming call of 100 messages.

The event loop's floor (``floor``): the same client at ``--rate`` through two bare byte pumps
(benchmarks/_pump.py: no parsing, no routing, no telemetry) in place of the sidecars: one on the
sidecar's own I/O layer and event loop (Trio), one on asyncio with Protocol callbacks, and one on
uvloop when it is installed. ``floor.sidecar_above_trio_pump_vcpu_per_1000rps`` is what the
sidecar's own per-request work costs.

``--workers``: the closed-loop maximum of one sidecar with one worker and with two
(``workers_max_rps``; not in a ``--quick`` run).

``--quick`` takes about a minute (shorter runs, no paced HTTP/2 runs, no server streaming, no
``--workers`` comparison, the trio pump alone for the floor: ``quick_notes``); the full run about
seven and a half.

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


# -- HTTP/2 (h2load) and gRPC (grpcio) --------------------------------------------------------

_H2LOAD_DONE = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_H2LOAD_REQS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")


def h2load(port: int, authority: str, seconds: float, watch: list[int], workdir: Path, clients: int = 4,
           streams: int = 10, rps: float | None = None) -> dict:
    """h2load over h2c (prior knowledge), ``clients`` connections with ``streams`` concurrent
    streams each, for ``seconds`` (after a 0.5 s warm-up); with ``rps`` the whole load is paced at
    that rate. Latency percentiles come from h2load's per-request log; CPU from /proc, as ``drive``."""
    log = workdir / f"h2load-{port}-{time.monotonic_ns()}.log"
    cmd = ["h2load", "-c", str(clients), "-m", str(streams), "-t", "1", "-D", f"{seconds:g}", "--warm-up-time", "1",
           "-H", f":authority: {authority}", "--log-file", str(log), f"http://127.0.0.1:{port}/"]
    if rps:
        cmd[1:1] = ["--rps", str(rps / clients)]
    cpu0 = {pid: _cpu_s(pid) for pid in watch}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    wall = time.monotonic() - t0
    text = proc.stdout
    done = _H2LOAD_DONE.search(text)
    reqs = _H2LOAD_REQS.search(text)
    lat = []
    for line in log.read_text().splitlines() if log.exists() else ():
        f = line.split("\t")
        if len(f) >= 3 and f[1] == "200":
            lat.append(int(f[2]) / 1000)
    lat.sort()
    pct = lambda p: round(lat[min(len(lat) - 1, int(len(lat) * p))], 3) if lat else None
    if not done or not reqs:
        print(f"h2load failed (exit {proc.returncode}): {(text + proc.stderr)[-400:]}", file=sys.stderr)
    return {"rps": float(done.group(2)) if done else 0.0, "requests": int(reqs.group(4)) if reqs else 0,
            "failed": int(reqs.group(5)) + int(reqs.group(6)) if reqs else None, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "seconds": seconds, "clients": clients, "streams": streams, "paced_rps": rps,
            "cpu_s": {pid: round(_cpu_s(pid) - c, 3) for pid, c in cpu0.items()}, "wall_s": wall}


def _import_test_helpers() -> None:
    """Make tests/proxy's helpers importable, and tests/ beside them (they import its shared modules)."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    for folder in (tests, tests / "proxy"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def _grpc_app_proc(q) -> None:
    """The tests' grpcio app (generic handlers, ``test.Echo``), in a process of its own."""
    _import_test_helpers()
    from h2_helpers import GrpcApp

    app = GrpcApp()
    q.put(app.addr.port)
    signal.sigwait({signal.SIGTERM})
    app.close()


def _grpc_client_proc(q, port: int, authority: str, seconds: float, concurrency: int, kind: str) -> None:
    """``concurrency`` threads making back-to-back calls (closed loop) for ``seconds``."""
    import threading

    from tracemesh.net import Addr

    _import_test_helpers()
    from h2_helpers import grpc_channel, stub

    channel = grpc_channel(Addr("127.0.0.1", port), authority)
    call = stub(channel, "Unary") if kind == "unary" else stub(channel, "ServerStream", "server")
    request = b"x" * 1024 if kind == "unary" else b"100"  # a 1 KB echo / 100 messages per call
    for _ in range(20):  # warm up: the channel connected, the sidecars' upstream pools filled
        call(request, timeout=10) if kind == "unary" else list(call(request, timeout=10))
    lats: list[float] = []
    errors = [0]
    end = time.monotonic() + seconds

    def loop() -> None:
        mine = []
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                call(request, timeout=10) if kind == "unary" else list(call(request, timeout=10))
            except Exception:  # noqa: BLE001 — any failed call is counted, the run goes on
                errors[0] += 1
                continue
            mine.append(time.perf_counter() - t)
        lats.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    lats.sort()
    pct = lambda p: round(lats[min(len(lats) - 1, int(len(lats) * p))] * 1000, 3) if lats else None
    q.put({"calls": len(lats), "errors": errors[0], "calls_per_s": len(lats) / seconds, "p50_ms": pct(0.5),
           "p99_ms": pct(0.99), "seconds": seconds, "concurrency": concurrency, "kind": kind})


def grpc_drive(port: int, authority: str, seconds: float, watch: list[int], concurrency: int = 8,
               kind: str = "unary") -> dict:
    q = mp.Queue()
    p = mp.Process(target=_grpc_client_proc, args=(q, port, authority, seconds, concurrency, kind))
    cpu0 = {pid: _cpu_s(pid) for pid in watch}
    t0 = time.monotonic()
    p.start()
    res = q.get()
    p.join()
    # the warm-up calls are counted in the CPU too: 20 calls against thousands
    res["cpu_s"] = {pid: round(_cpu_s(pid) - c, 3) for pid, c in cpu0.items()}
    res["wall_s"] = time.monotonic() - t0
    return res


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


PUMP = Path(__file__).resolve().parent / "_pump.py"


def measure_floor(args, server_port: int, secs: float, measure, out: dict, watch: list[int]) -> dict:
    """The event loop's floor: two bare byte pumps (benchmarks/_pump.py: no HTTP, no routing, no
    telemetry) in place of the two sidecars, client -> pump -> pump -> server, at the main rate.
    ``trio`` is the sidecar's own I/O layer on its own event loop; ``asyncio`` the standard
    library's loop with Protocol callbacks; ``uvloop`` the same on libuv, when installed. What the
    sidecar costs above the trio pump is its own per-request work."""
    import importlib.util
    floor: dict = {}
    if args.quick:  # the sidecar's own loop only, to stay within a minute
        kinds = ["trio"]
        floor["asyncio"] = floor["uvloop"] = {"skipped": "--quick: the trio pump only"}
    elif importlib.util.find_spec("uvloop"):
        kinds = ["trio", "asyncio", "uvloop"]
    else:
        kinds = ["trio", "asyncio"]
        floor["uvloop"] = {"skipped": "uvloop is not installed (pip install uvloop; not a tracemesh dependency)"}
    for kind in kinds:
        inner, outer = _free_port(), _free_port()
        pumps = [subprocess.Popen([sys.executable, str(PUMP), kind, str(inner), str(server_port)]),
                 subprocess.Popen([sys.executable, str(PUMP), kind, str(outer), str(inner)])]
        try:
            _wait_port(inner)
            _wait_port(outer)
            drive(outer, "server", 500, 0.5, [])
            key = f"pump_{kind}"
            measure(key, outer, "server", args.rate, secs, [*watch, *(p.pid for p in pumps)])
            r = out[key]
            floor[kind] = {
                "vcpu_per_1000rps": round(sum(r["cpu_s"][p.pid] for p in pumps) / 2 / r["requests"] * 1000, 3)
                if r["requests"] else None,
                "added_p50_ms": round(r["p50_ms"] - out["direct"]["p50_ms"], 3),
                "added_p99_ms": round(r["p99_ms"] - out["direct"]["p99_ms"], 3),
                "errors": r["errors"],
            }
        finally:
            _stop(pumps)
    return floor


def compare_workers(args, started: float, ports: dict, sidecar, sidecars: dict, measure, out: dict,
                    secs: float, watch: list[int]) -> dict:
    """``--workers``: the most one sidecar serves (closed loop, client -> sidecar inbound -> server)
    with one worker (the ``server`` sidecar) and with two (a sidecar started for this), in the same
    run. On 2 cores the client (one Python process) takes most of a core of its own, so the ratio
    is a floor: ``machine_saturated`` says when every core was busy."""
    if args.quick:
        return {"skipped": "--quick: it would take the run past a minute"}
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
    ap.add_argument("--quick", action="store_true", help="short runs, under a minute in all")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop rate (req/s) of the main runs")
    ap.add_argument("--low-rate", type=float, default=200.0,
                    help="open-loop rate (req/s) of the second run of every path, where the sidecars are not saturated")
    ap.add_argument("--seconds", type=float, default=None,
                    help="per main-rate and closed-loop run (default 20; --quick 3, closed loop 2)")
    ap.add_argument("--low-seconds", type=float, default=None, help="per low-rate run (default 20; --quick 2)")
    ap.add_argument("--handshake-seconds", type=int, default=None, help="handshake run (default 15; --quick 1)")
    ap.add_argument("--handshake-clients", type=int, default=8, help="parallel clients opening new mTLS connections")
    ap.add_argument("--handshake-client", choices=("s_time", "python"), default="s_time",
                    help="openssl s_time (falls back to python when it does not work) or Python ssl")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    low_seconds = args.low_seconds or (2.0 if args.quick else 20.0)
    closed_seconds = 2.0 if args.quick and not args.seconds else seconds
    hs_seconds = args.handshake_seconds or (1 if args.quick else 15)
    if not shutil.which("nginx"):
        sys.exit("benchmarks/proxy.py needs nginx (apt-get install nginx-light)")
    started = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)
    procs: list[subprocess.Popen] = []
    helpers: list[mp.Process] = []
    with tempfile.TemporaryDirectory(prefix="tracemesh-proxy-bench-") as tmp:
        tmp = Path(tmp)
        try:
            server_port, nginx_port = _free_port(), _free_port()
            # HTTP/2: the same nginx answers h2c (prior knowledge: ``http2`` on a plaintext listener);
            # the nginx proxy fronts h2c too, but nginx has no HTTP/2 upstreams (only grpc_pass): it
            # talks HTTP/1.1 keep-alive to the server, as it does in the HTTP/1.1 runs
            h2_server_port, nginx_h2_port = _free_port(), _free_port()
            body = BODY.decode()
            nginx_server = _nginx(tmp, "server", f"""server {{ listen 127.0.0.1:{server_port}; location / {{ return 200 '{body}'; }} }}
  server {{ listen 127.0.0.1:{h2_server_port} http2; location / {{ return 200 '{body}'; }} }}""")
            nginx_proxy = _nginx(tmp, "proxy", f"""upstream backend {{ server 127.0.0.1:{server_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}
  server {{ listen 127.0.0.1:{nginx_h2_port} http2; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}""")
            procs += [nginx_server, nginx_proxy]
            grpc_q = mp.Queue()
            grpc_app = mp.Process(target=_grpc_app_proc, args=(grpc_q,), daemon=True)
            grpc_app.start()
            helpers.append(grpc_app)
            grpc_port = grpc_q.get(timeout=60)
            ca_dir, tokens, cert, key, bundle = _init_ca(tmp, ["client-mtls", "server-mtls"])
            otlp, api, ca_mtls = _free_port(), _free_port(), _free_port()
            log = open(tmp / "collector.log", "wb")
            collector = subprocess.Popen([sys.executable, "-m", "tracemesh", "collector", "--store", str(tmp / "store"),
                                          "--otlp-grpc", f"127.0.0.1:{otlp}", "--otlp-http", "off", "--api", f"127.0.0.1:{api}",
                                          "--ca", str(ca_dir), "--ca-mtls", f"127.0.0.1:{ca_mtls}"],
                                         stdout=log, stderr=subprocess.STDOUT)
            procs.append(collector)
            ports = {name: (_free_port(), _free_port())
                     for name in ("client", "server", "client-mtls", "server-mtls", "server-h2", "server-grpc")}
            cfg = tmp / "mesh.yaml"
            cfg.write_text(json.dumps({"services": {
                "server": {"endpoints": [{"address": f"127.0.0.1:{ports['server'][0]}"}], "mtls": "disable"},
                "server-mtls": {"endpoints": [{"address": f"127.0.0.1:{ports['server-mtls'][0]}"}], "mtls": "strict",
                                "identity": _sid("server-mtls")},
                "server-h2": {"endpoints": [{"address": f"127.0.0.1:{ports['server-h2'][0]}"}], "mtls": "disable"},
                "server-grpc": {"endpoints": [{"address": f"127.0.0.1:{ports['server-grpc'][0]}"}], "mtls": "disable"},
            }}))
            sidecars: dict[str, subprocess.Popen] = {}

            def sidecar(svc: str, *extra: str, app: int = server_port) -> None:
                inb, outb = ports[svc]
                sidecars[svc] = subprocess.Popen(
                    [sys.executable, "-m", "tracemesh", "sidecar", "--service", svc, "--app", f"127.0.0.1:{app}",
                     "--inbound", f"127.0.0.1:{inb}", "--outbound", f"127.0.0.1:{outb}", "--collector", f"127.0.0.1:{otlp}",
                     "--config", str(cfg), *extra], stdout=open(tmp / f"{svc}.log", "wb"), stderr=subprocess.STDOUT)
                procs.append(sidecars[svc])

            sidecar("client")
            sidecar("server")
            sidecar("server-h2", app=h2_server_port)
            sidecar("server-grpc", app=grpc_port)
            _wait_port(otlp)  # the mTLS sidecars ask the CA on this port for their certificates
            for svc in ("client-mtls", "server-mtls"):
                sidecar(svc, "--identity", _sid(svc), "--token-file", str(tokens[svc]), "--mtls", "strict")
            for port in (server_port, nginx_port, h2_server_port, nginx_h2_port, api,
                         *(p for pair in ports.values() for p in pair)):
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
            watch = [*pids.values(), nginx_proxy.pid, nginx_server.pid, collector.pid, grpc_app.pid]
            paths = (("direct", server_port, "server"), ("sidecars", ports["client"][1], "server"),
                     ("sidecars_mtls", ports["client-mtls"][1], "server-mtls"), ("nginx", nginx_port, "server"))
            out: dict[str, dict] = {}
            ours = [collector.pid, *pids.values()]  # what must be quiet before a measured run
            settle_limit = 0.3 if args.quick else 15.0
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
            print("the event loop's floor: bare byte pumps in place of the sidecars", file=sys.stderr)
            floor = measure_floor(args, server_port, low_seconds if args.quick else seconds, measure, out, watch)
            # 1000 req/s open loop may be more than one pair sustains on 2 shared cores: then also the
            # added latency at 80 % of the closed-loop maximum, a rate it does sustain
            main_run = out["sidecars"]
            sustained = main_run["achieved_rps"] >= 0.95 * args.rate and not main_run["abandoned"]
            top = None
            if not sustained:
                top = round(0.8 * out["sidecars_closed_loop"]["rps"] / 50) * 50
                measure("sidecars_sustainable", ports["client"][1], "server", top, low_seconds if args.quick else seconds, watch)
                measure("direct_sustainable", server_port, "server", top, low_seconds if args.quick else seconds, watch)
            h2 = {}
            h2_secs = 1.0 if args.quick else min(seconds, 10.0)
            for name, port, authority in (("direct", h2_server_port, "server-h2"), ("sidecars", ports["client"][1], "server-h2"),
                                          ("nginx", nginx_h2_port, "server")):
                w = settle(ours, settle_limit)
                waited += w
                print(f"h2load {name}: 4 connections x 10 streams for {h2_secs:.0f} s", file=sys.stderr)
                h2[name] = h2load(port, authority, h2_secs, watch, tmp)
                if not args.quick:
                    waited += settle(ours, settle_limit)
                    print(f"h2load {name}: paced at 500 req/s for {h2_secs:.0f} s", file=sys.stderr)
                    h2[name + "_500rps"] = h2load(port, authority, h2_secs, watch, tmp, rps=500)
            grpc_runs = {}
            g_secs = 1.5 if args.quick else min(seconds, 10.0)
            for kind in ("unary", "server_stream"):
                if kind == "server_stream" and args.quick:
                    continue
                for name, port in (("direct", grpc_port), ("sidecars", ports["client"][1])):
                    waited += settle(ours, settle_limit)
                    print(f"grpc {kind} {name}: 8 threads for {g_secs:.0f} s", file=sys.stderr)
                    grpc_runs[f"{kind}_{name}"] = grpc_drive(port, "server-grpc", g_secs, watch,
                                                             kind="unary" if kind == "unary" else "server")
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
            # what the sidecar pair costs above two bare pumps on its own event loop: its own work
            result["floor"] = {**floor, "sidecar_above_trio_pump_vcpu_per_1000rps":
                               round(vcpu_per_1000 - floor["trio"]["vcpu_per_1000rps"], 3)
                               if floor["trio"].get("vcpu_per_1000rps") else None}
            result["rate_sustained"] = sustained
            if not sustained:
                # the pair could not keep up with --rate: its added latency there is queueing
                result["rate_not_sustained"] = (f"two sidecars carried {main_run['achieved_rps']:.0f} of {args.rate:.0f} "
                                                f"req/s open loop on this machine; see *_sustainable")
                result["sustainable_rate"] = top
                result["added_p50_ms_sustainable"] = added("sidecars_sustainable", "p50_ms", "direct_sustainable")
                result["added_p99_ms_sustainable"] = added("sidecars_sustainable", "p99_ms", "direct_sustainable")
                result["vcpu_per_1000rps_sustainable"] = round(vcpu("sidecars_sustainable", "client", "server"), 3)

            def per_1000(cpu: dict, n: int, *pids_: int) -> float | None:
                return round(sum(cpu[p] for p in pids_) / len(pids_) / n * 1000, 3) if n else None

            h2_pair = (pids["client"], pids["server-h2"])
            result["http2"] = {
                "client": "h2load, h2c prior knowledge, 4 connections x 10 concurrent streams, closed loop; 1 KB responses",
                "server": "nginx (http2 on a plaintext listener: h2c)",
                "nginx_front": "nginx-light 1.22 serves h2c on a plaintext listener; it proxies to the server over "
                               "HTTP/1.1 keep-alive (nginx has no HTTP/2 upstreams)",
                "vcpu_per_1000rps": per_1000(h2["sidecars"]["cpu_s"], h2["sidecars"]["requests"], *h2_pair),
                "nginx_vcpu_per_1000rps": per_1000(h2["nginx"]["cpu_s"], h2["nginx"]["requests"], nginx_proxy.pid),
                "rps_ratio_to_direct": round(h2["sidecars"]["rps"] / h2["direct"]["rps"], 3) if h2["direct"]["rps"] else None,
                "max_rps_per_core": (round(h2["sidecars"]["rps"] / (max(h2["sidecars"]["cpu_s"][p] for p in h2_pair)
                                                                     / h2["sidecars"]["wall_s"]))
                                     if max(h2["sidecars"]["cpu_s"][p] for p in h2_pair) else None),
                "runs": {k: {kk: vv for kk, vv in v.items() if kk != "cpu_s"} for k, v in h2.items()},
            }
            if "sidecars_500rps" in h2:
                result["http2"]["added_p50_ms_500rps"] = round(h2["sidecars_500rps"]["p50_ms"] - h2["direct_500rps"]["p50_ms"], 3)
                result["http2"]["added_p99_ms_500rps"] = round(h2["sidecars_500rps"]["p99_ms"] - h2["direct_500rps"]["p99_ms"], 3)
            g_pair = (pids["client"], pids["server-grpc"])
            result["grpc"] = {
                "client": "grpcio, 8 threads of blocking calls (closed loop), 1 KB unary echo; server streaming: "
                          "100 messages per call; server: the tests' grpcio generic-handler app",
                **{f"{k}_vcpu_per_1000calls": per_1000(v["cpu_s"], v["calls"], *g_pair)
                   for k, v in grpc_runs.items() if k.endswith("_sidecars")},
                **{f"{k[:-len('_sidecars')]}_calls_ratio_to_direct": round(v["calls_per_s"] / grpc_runs[k.replace("_sidecars", "_direct")]["calls_per_s"], 3)
                   for k, v in grpc_runs.items() if k.endswith("_sidecars") and grpc_runs[k.replace("_sidecars", "_direct")]["calls_per_s"]},
                "runs": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items() if kk != "cpu_s"}
                         for k, v in grpc_runs.items()},
            }
            if args.quick:
                result["quick_notes"] = ("--quick: short runs; HTTP/2 without the paced 500 req/s runs, gRPC without "
                                         "server streaming, no --workers comparison, the floor's trio pump only")
            # the sidecars print their mTLS counters at exit: a refused handshake would show there
            _stop(procs)
            result["mtls_inbound_at_exit"] = _inbound_tls_stats(tmp / "server-mtls.log")
            result["settling_s"] = round(waited, 1)
            result["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(result, indent=2))
        finally:
            _stop(procs)
            for h in helpers:
                h.terminate()
                h.join(10)


if __name__ == "__main__":
    main()
