"""``tracemesh sidecar --workers N`` with real processes: connections spread over the workers by
the kernel (SO_REUSEPORT), a worker killed under load is restarted while the others keep serving,
SIGTERM drains every worker, the supervisor's /metrics is the sum of the workers', and with an
identity the supervisor alone bootstraps (a single-use join token) and hands every renewal to
the workers, which serve mTLS with it without a failed request."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from cryptography import x509
from mtls_helpers import MeshCaEnv, sid, tls_context
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import (
    SidecarProc, Upstream, distinct_ports, http_get_text, run_load, write_config, write_mesh,
)

from tracemesh.net import Addr
from tracemesh.proxy._workers import merge_prometheus, worker_argv

WORKERS = 3


def _get(addr: Addr, path: str, headers: dict | None = None, timeout: float = 10.0) -> int:
    """One request on a fresh connection (so the kernel picks a worker for each): the status."""
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers_sidecar(otlp, tmp_path_factory):
    work = tmp_path_factory.mktemp("workers")
    app = Upstream("wapp")
    config = write_config(work / "mesh.yaml", {"wapp": [(app.addr, "v1")]})
    admin = Addr("127.0.0.1", distinct_ports(1)[0])
    sc = SidecarProc(work, "wsvc", app.addr, otlp.addr, config=config,
                     extra=("--workers", str(WORKERS), "--admin", str(admin)))
    sc.admin = admin
    try:
        sc.start()
        yield sc
        assert sc.terminate() == 0
    finally:
        sc.close()
        app.close()


def _instances(otlp, service: str, path: str) -> Counter:
    return Counter(s.resource["service.instance.id"] for s in otlp.find(service, **{"url.path": path})
                   if s.kind == "SERVER")


def test_connections_are_spread_over_the_workers(workers_sidecar, otlp):
    sc = workers_sidecar
    workers = sc.children()
    assert len(workers) == WORKERS, workers
    assert http_get_text(sc.admin, "/ready") == (200, b"ready\n")
    n = 240
    with ThreadPoolExecutor(16) as pool:
        inbound = list(pool.map(lambda _: _get(sc.inbound, "/w/spread"), range(n)))
        outbound = list(pool.map(lambda _: _get(sc.outbound, "/w/spread-out", {"host": "wapp"}), range(60)))
    assert inbound == [200] * n and outbound == [200] * 60
    spans = otlp.wait(n, timeout=15, service="wsvc", **{"url.path": "/w/spread"})
    per_instance = _instances(otlp, "wsvc", "/w/spread")
    assert sum(per_instance.values()) == n == len(spans)
    assert len(per_instance) >= 2, per_instance  # (3 workers, 240 connections: all three, in practice)
    assert {i.rpartition(":")[2] for i in per_instance} <= {str(p) for p in workers}
    out = sc.stdout()
    assert out.count("tracemesh sidecar wsvc/v1: 3 workers (pids") == 1, out


def _requests_total(text: bytes, **labels) -> tuple[float, float]:
    """Sum of istio_requests_total and of istio_request_duration_milliseconds_count over the
    series with *labels*, parsed by prometheus_client."""
    total = count = 0.0
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                if s.name == "istio_requests_total":
                    total += s.value
                elif s.name == "istio_request_duration_milliseconds_count":
                    count += s.value
    return total, count


def test_admin_metrics_are_the_sum_over_the_workers(workers_sidecar):
    sc = workers_sidecar
    labels = {"reporter": "destination", "destination_workload": "wsvc", "response_code": "200"}
    status, before = http_get_text(sc.admin, "/metrics")
    assert status == 200
    b_total, b_count = _requests_total(before, **labels)
    n = 150
    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(lambda _: _get(sc.inbound, "/w/metrics"), range(n))) == [200] * n
    status, after = http_get_text(sc.admin, "/metrics")
    assert status == 200
    a_total, a_count = _requests_total(after, **labels)
    assert (a_total - b_total, a_count - b_count) == (n, n)
    fams = {f.name: f for f in text_string_to_metric_families(after.decode())}
    assert fams["tracemesh_sidecar_workers"].samples[0].value == WORKERS
    assert fams["tracemesh_sidecar_workers_ready"].samples[0].value == WORKERS
    assert fams["tracemesh_sidecar_inbound_connections"].samples[0].value >= a_total  # summed counters
    # buckets stay cumulative after the merge
    buckets = [s.value for s in fams["istio_request_duration_milliseconds"].samples
               if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())]
    assert buckets == sorted(buckets) and buckets[-1] == a_count


def test_every_worker_follows_the_config_file(workers_sidecar):
    sc = workers_sidecar
    app2 = Upstream("wapp2")
    try:
        write_config(sc.config, {"wapp": [(app2.addr, "v1")]})

        def answered_by():
            conn = http.client.HTTPConnection(*sc.outbound, timeout=10)
            try:
                conn.request("GET", "/w/config", headers={"host": "wapp"})
                return json.loads(conn.getresponse().read())["service"]
            finally:
                conn.close()

        def all_on(service: str) -> bool:  # fresh connections, so every worker is asked (3 workers, 30 connections)
            with ThreadPoolExecutor(6) as pool:
                return set(pool.map(lambda _: answered_by(), range(30))) == {service}

        _wait(lambda: all_on("wapp2"), 20, "every worker routing to the new endpoint")
        _wait(lambda: sc.stderr().count("config reloaded from") >= WORKERS, 5, "a reload in every worker")
    finally:
        write_config(sc.config, {"wapp": [(sc.app, "v1")]})
        try:  # back on the first endpoint in every worker before app2 goes: the tests after this one
            _wait(lambda: all_on("wapp"), 20, "every worker routing to the first endpoint again")
        finally:
            app2.close()


def test_a_killed_worker_is_restarted_and_the_sidecar_keeps_serving(workers_sidecar, otlp):
    sc = workers_sidecar
    stats = {"before": Counter(), "after": Counter()}
    phase = ["before"]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                ok = _get(sc.inbound, "/w/kill", timeout=5) == 200
            except (OSError, http.client.HTTPException):  # a connection on the killed worker
                ok = False
            stats[phase[0]]["ok" if ok else "failed"] += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        old = sc.children()
        victim = old[0]
        os.kill(victim, signal.SIGKILL)
        sc.wait_log("was killed by SIGKILL", timeout=10)
        _wait(lambda: len(sc.children()) == WORKERS and victim not in sc.children(), 20, "a new worker")
        _wait(lambda: http_get_text(sc.admin, "/ready")[0] == 200, 20, "all workers ready again")
        new = (set(sc.children()) - set(old)).pop()
        phase[0] = "after"
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert stats["before"]["ok"] > 0
    assert stats["after"]["failed"] == 0 and stats["after"]["ok"] > 10, stats
    # fresh connections after the restart: every one answered, and the new worker takes its share
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: _get(sc.inbound, "/w/after-kill"), range(90))) == [200] * 90
    otlp.wait(90, timeout=15, service="wsvc", **{"url.path": "/w/after-kill"})
    assert any(i.endswith(f":{new}") for i in _instances(otlp, "wsvc", "/w/after-kill")), \
        _instances(otlp, "wsvc", "/w/after-kill")
    _, text = http_get_text(sc.admin, "/metrics")
    restarts = [s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
                if s.name == "tracemesh_sidecar_worker_restarts_total"]
    assert restarts == [1.0]
    assert sc.proc.poll() is None


def test_sigterm_drains_every_worker_and_exits_0(otlp, tmp_path):
    app = Upstream("wdrain")
    sc = SidecarProc(tmp_path, "wdrain", app.addr, otlp.addr, extra=("--workers", "2"))
    try:
        sc.start()
        workers = sc.children()
        assert len(workers) == 2
        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(_get, sc.inbound, "/sleep/1.5") for _ in range(6)]
            time.sleep(0.5)  # the requests are in flight, on both workers (most likely)
            sc.proc.send_signal(signal.SIGTERM)
            assert [f.result() for f in slow] == [200] * 6  # drained, not cut
        assert sc.proc.wait(20) == 0
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
        out = sc.stdout()
        assert "2 workers stopped (exit statuses [0, 0]), 0 restarts" in out, out
        with pytest.raises(OSError):
            socket.create_connection(tuple(sc.inbound), timeout=2).close()
    finally:
        sc.close()
        app.close()


def test_workers_stop_with_a_killed_supervisor_and_remove_its_directory(otlp, tmp_path):
    app = Upstream("worphan")
    sc = SidecarProc(tmp_path, "worphan", app.addr, otlp.addr, extra=("--workers", "2"))
    try:
        sc.start()
        workers = sc.children()
        state = _state_dir(workers[0])
        assert os.path.isdir(state)
        sc.proc.kill()  # the supervisor cannot clean up; its workers get SIGTERM from the kernel
        sc.proc.wait()
        _wait(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 20, "the workers' exit")
        assert not os.path.exists(state)
    finally:
        sc.close()
        app.close()


def test_a_port_in_use_fails_at_once(otlp, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sc = SidecarProc(tmp_path, "wbusy", Addr("127.0.0.1", 1), otlp.addr, extra=("--workers", "2"))
        sc.inbound = Addr("127.0.0.1", port)
        sc.spawn()
        assert sc.proc.wait(20) == 1
        assert f"--inbound 127.0.0.1:{port}: cannot listen there" in sc.stderr()
        assert sc.children() == []


def test_a_worker_that_refuses_its_flags_stops_the_sidecar_with_status_2(otlp, tmp_path):
    """Flags the supervisor does not check itself still reach the workers, which check them: a
    usage error in every worker before any served is reported once, as status 2, not retried."""
    import argparse

    from tracemesh.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sidecar"]
    if "--control" not in sub._option_string_actions:
        pytest.skip("no --control flag in this build")
    config = write_config(tmp_path / "mesh.yaml", {})
    sc = SidecarProc(tmp_path, "wusage", Addr("127.0.0.1", 1), otlp.addr, config=config,
                     extra=("--workers", "2", "--control", "127.0.0.1:1"))
    sc.spawn()
    assert sc.proc.wait(30) == 2
    err = sc.stderr()
    assert "--control and --config" in err and "before any worker served: giving up" in err, err[-2000:]
    assert sc.children() == []


# -- identity: one bootstrap, renewals handed to every worker ---------------------------------

SHORT_TTL = timedelta(seconds=4)  # renewed every 2 s
LOAD_S = 7.0


def _state_dir(worker_pid: int) -> str:
    """The supervisor's private directory, from a worker's command line (``--as-worker I:DIR``)."""
    argv = open(f"/proc/{worker_pid}/cmdline", "rb").read().decode().split("\0")
    return argv[argv.index("--as-worker") + 1].partition(":")[2]


def test_workers_serve_mtls_with_the_supervisors_certificate_through_renewals(tmp_path):
    env = MeshCaEnv(tmp_path, workload_ttl=SHORT_TTL)
    app = Upstream("wcat")
    admin = Addr("127.0.0.1", distinct_ports(1)[0])
    cfg = tmp_path / "mesh.yaml"
    # env.sidecar_args: a fresh join token, good for one certificate
    sc = SidecarProc(tmp_path, "wcat", app.addr, env.addr, config=cfg,
                     extra=(*env.sidecar_args(sid("wcat"), "strict"), "--workers", "2", "--admin", str(admin)))
    # its outbound calls itself over mTLS: the workers originate with the handed-over certificate too
    write_mesh(cfg, {"services": {"wcat": {"endpoints": [{"address": str(sc.inbound)}], "mtls": "strict",
                                           "identity": str(sid("wcat"))}}})
    client = tls_context(env.cred(sid("wclient"), ttl=timedelta(hours=1)), env.ca.bundle_pem())
    served: dict[str, int] = {}  # x-request-id -> serial of the certificate the server presented
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def new_handshakes(k: int):
        i = 0
        while not stop.is_set():
            i += 1
            rid = f"w{k}-{i}"
            try:
                with socket.create_connection(tuple(sc.inbound), timeout=10) as raw, client.wrap_socket(raw) as s:
                    serial = x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number
                    s.sendall(f"GET /mtls HTTP/1.1\r\nHost: wcat\r\nx-request-id: {rid}\r\n"
                              "Connection: close\r\n\r\n".encode())
                    head = s.recv(64)
                with lock:
                    if head.startswith(b"HTTP/1.1 200"):
                        served[rid] = serial
                    else:
                        errors.append(f"{rid}: {head[:40]!r}")
            except (OSError, ssl.SSLError) as exc:
                with lock:
                    errors.append(f"{rid}: {exc!r}")
            time.sleep(0.01)

    outbound = Counter()

    def via_outbound():
        while not stop.is_set():
            try:
                status = _get(sc.outbound, "/mtls-out", {"host": "wcat"})
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)
            with lock:
                outbound[status] += 1
            time.sleep(0.01)

    try:
        sc.start()
        workers = sc.children()
        assert len(workers) == 2
        state = _state_dir(workers[0])
        assert os.stat(state).st_mode & 0o777 == 0o700
        assert os.stat(f"{state}/credential.json").st_mode & 0o777 == 0o600
        argv = " ".join(open(f"/proc/{workers[0]}/cmdline").read().split("\0"))
        assert "--token" not in argv and "--admin" not in argv and "--workers" not in argv, argv
        status, chain = http_get_text(admin, "/certificate")
        assert status == 200 and b"BEGIN CERTIFICATE" in chain
        threads = [threading.Thread(target=new_handshakes, args=(k,), daemon=True) for k in range(3)]
        threads.append(threading.Thread(target=via_outbound, daemon=True))
        run_load(threads, LOAD_S, stop)
        assert errors == [], errors[:5]
        assert len(served) > 100
        assert set(outbound) == {200} and outbound[200] > 20, outbound
        # which worker served which request: the inbound spans carry the request id and the worker
        got = env.otlp.wait(len(served), timeout=15, service="wcat")
        by_worker: dict[str, set[int]] = {}
        for s in got:
            rid = s.attrs.get("guid:x-request-id")
            if s.kind == "SERVER" and rid in served:
                by_worker.setdefault(s.resource["service.instance.id"], set()).add(served[rid])
        assert {i.rpartition(":")[2] for i in by_worker} == {str(p) for p in workers}, by_worker
        a, b = by_worker.values()
        assert len(a) >= 3 and len(b) >= 3, by_worker  # every renewal reached both workers
        assert a & b, by_worker  # the same certificate, served by both
        err = sc.stderr()
        for pid in workers:
            assert f"worker pid {pid} loaded certificate 3 " in err, err[-3000:]
        assert env.service.issued == 1 and env.service.renewed >= 2  # one bootstrap, by the supervisor
        assert "renewal for" not in err  # no failed renewal
        assert "did not load" not in err
        assert sc.terminate() == 0
        assert not os.path.exists(state)  # the key went with it
    finally:
        stop.set()
        sc.close()
        app.close()
        env.close()


# -- pure parts ----------------------------------------------------------------------------------


def test_worker_argv_drops_the_supervisors_flags_in_every_spelling():
    options = ["--service", "--app", "--token", "--token-file", "--admin", "--workers", "--as-worker", "--config",
               "--control"]
    argv = ["sidecar", "--service", "s", "--workers", "4", "--token=t", "--admin", ":9", "--config", "c.yaml",
            "--token-file", "f", "--work=2", "--control", "cp:1", "--adm=:1"]
    assert worker_argv(argv, options) == ["sidecar", "--service", "s", "--config", "c.yaml", "--control", "cp:1"]


def test_merge_sums_samples_with_the_same_name_and_labels():
    a = (b'# HELP m_total Things.\n# TYPE m_total counter\nm_total{a="1"} 2\nm_total{a="x y"} 1\n'
         b'# HELP h A histogram.\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1.5\nh_count 2\n'
         b'# TYPE g gauge\ng 3\n')
    b = (b'# HELP m_total Things.\n# TYPE m_total counter\nm_total{a="2"} 5\nm_total{a="x y"} 4\n'
         b'# HELP h A histogram.\n# TYPE h histogram\nh_bucket{le="1"} 0\nh_bucket{le="+Inf"} 1\nh_sum 0.25\nh_count 1\n'
         b'# TYPE g gauge\ng 1\n')
    merged = merge_prometheus([a, b])
    fams = {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(merged.decode())}
    assert fams["m"] == {("m_total", (("a", "1"),)): 2, ("m_total", (("a", "x y"),)): 5, ("m_total", (("a", "2"),)): 5}
    assert fams["h"] == {("h_bucket", (("le", "1"),)): 1, ("h_bucket", (("le", "+Inf"),)): 3,
                         ("h_sum", ()): 1.75, ("h_count", ()): 3}
    assert fams["g"] == {("g", ()): 4}
    assert merged.count(b"# TYPE m_total counter") == 1 and merged.count(b"# HELP h A histogram.") == 1


def test_worker_credentials_follow_the_file_and_keep_the_last_good_one(tmp_path):
    from tracemesh.collector._ca import MeshCA
    from tracemesh.identity import generate_key, make_csr, private_key_pem
    from tracemesh.proxy._workers import WorkerCredentials, private_dir, write_credentials

    ca = MeshCA.init(tmp_path / "ca")
    me = sid("wfile")

    def cred(identity=me):
        key = generate_key()
        chain = ca.issue(make_csr(key, identity), ca.create_token(identity))
        return private_key_pem(key), chain, ca.bundle_pem()

    state = private_dir()
    try:
        assert os.stat(state).st_mode & 0o777 == 0o700
        creds = WorkerCredentials(me, state)
        assert not creds.load() and not creds.ready  # nothing written yet
        first = cred()
        write_credentials(state, *first, not_after=0, renew_at=0, generation=1)
        assert os.stat(state / "credential.json").st_mode & 0o777 == 0o600
        assert creds.load() and creds.ready and creds.generation == 1
        ctx = creds.server_context
        assert not creds.load()  # unchanged: nothing rebuilt
        key, chain, bundle = cred()
        write_credentials(state, first[0], chain, bundle, 0, 0, 2)  # a certificate for another key
        assert not creds.load() and creds.failures == 1
        write_credentials(state, *cred(sid("someone-else")), 0, 0, 3)
        assert not creds.load() and creds.failures == 2
        assert creds.server_context is ctx and creds.chain_pem == first[1]  # the last good one stays
        write_credentials(state, key, chain, bundle, 0, 0, 4)
        assert creds.load() and creds.generation == 2 and creds.chain_pem == chain
        assert creds.server_context is not ctx  # fresh contexts, the old one untouched
    finally:
        import shutil

        shutil.rmtree(state)
