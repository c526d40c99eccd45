"""Config distribution end to end: a real collector (config store, control plane) and real sidecar
processes with ``--control``, driven through the collector's HTTP API and ``tracemesh proxy-status``.

Endpoints of the ``catalog`` service are either static (plain upstream apps) or registered by
catalog sidecars; load goes through the sidecars' outbound listeners, closed loop."""

from __future__ import annotations

import http.client
import json
import subprocess
import time

import pytest
from control_harness import ControlCollector, Load, Upstream, all_synced, control_sidecar

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def upstreams():
    ups = {"v1": Upstream("catalog-v1"), "v2": Upstream("catalog-v2"), "front": Upstream("frontend")}
    yield ups
    for u in ups.values():
        u.close()


@pytest.fixture
def procs():
    """Everything started here is stopped at the end, whatever happened."""
    started = []
    yield started
    for p in reversed(started):
        if hasattr(p, "close"):
            p.close()
        else:
            p.kill()


def mesh(ups, to: str, **services) -> dict:
    cfg = {"services": {"catalog": {"endpoints": [{"address": str(ups["v1"].addr), "version": "v1"},
                                                  {"address": str(ups["v2"].addr), "version": "v2"}]}},
           "routes": [{"service": "catalog", "destinations": [{"version": to}]}]}
    cfg["services"].update(services)
    return cfg


def who(outbound, n: int = 10) -> set[str]:
    """The upstreams that answered *n* requests to catalog through a sidecar's outbound listener."""
    seen = set()
    for _ in range(n):
        c = http.client.HTTPConnection(outbound.host, outbound.port, timeout=10)
        c.request("GET", "/", headers={"Host": "catalog"})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        seen.add(json.loads(body)["service"])
        c.close()
    return seen


def test_a_config_the_sidecar_rejects_leaves_it_on_its_previous_version(tmp_path, upstreams, procs, tracemesh_cmd):
    col = ControlCollector(tmp_path).start()
    procs.append(col)
    col.apply(mesh(upstreams, "v1"))
    sc = control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr)
    procs.append(sc)
    sc.start()
    col.wait_proxies(all_synced(1, "c1."), what="the sidecar on version 1")
    assert who(sc.outbound) == {"catalog-v1"}

    # valid for the control plane, but this sidecar has no identity to serve `strict` with
    col.apply(mesh(upstreams, "v2", frontend={"endpoints": [], "mtls": "strict"}))
    doc = col.wait_proxies(lambda d: [p["status"] for p in d["proxies"]] == ["NACK"], what="a NACK")
    p = doc["proxies"][0]
    assert p["acked_version"].startswith("c1.") and "mtls is strict" in p["nack"]["error"]
    assert p["nack"]["version"].startswith("c2.")
    assert who(sc.outbound) == {"catalog-v1"}  # still routing by version 1
    out = subprocess.run([*tracemesh_cmd, "proxy-status", "--api", col.api], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "frontend/v1" in ln)
    assert "NACK (services.frontend.mtls is strict" in line and p["acked_version"] in line and str(sc.inbound) in line

    col.apply(mesh(upstreams, "v2"))  # fixed: taken
    col.wait_proxies(all_synced(1, "c3."), what="the sidecar on version 3")
    assert who(sc.outbound) == {"catalog-v2"}
    out = subprocess.run([*tracemesh_cmd, "proxy-status", "--api", col.api], capture_output=True, text=True, timeout=60)
    assert "SYNCED" in out.stdout and "NACK" not in out.stdout


def test_a_route_change_under_load_reaches_every_sidecar_with_no_failed_request(tmp_path, upstreams, procs):
    col = ControlCollector(tmp_path).start()
    procs.append(col)
    col.apply(mesh(upstreams, "v1"))
    sidecars = [control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr) for _ in range(3)]
    procs.extend(sidecars)
    for sc in sidecars:
        sc.spawn()
    for sc in sidecars:
        sc.wait_ready()
    col.wait_proxies(all_synced(3, "c1."))
    loads = [Load(sc.outbound, "catalog", threads=2).start() for sc in sidecars]
    try:
        time.sleep(1.0)
        assert all(ld.snapshot().get("catalog-v1", 0) > 0 for ld in loads)
        col.apply(mesh(upstreams, "v2"))
        col.wait_proxies(all_synced(3, "c2."), what="every sidecar on version 2")
        time.sleep(1.0)  # requests already in flight to v1 finish
        before = [ld.snapshot() for ld in loads]
        time.sleep(1.5)
        after = [ld.snapshot() for ld in loads]
    finally:
        for ld in loads:
            ld.stop()
    for b, a, ld in zip(before, after, loads):
        assert a.get("catalog-v1", 0) == b.get("catalog-v1", 0), "a sidecar still sends to v1"
        assert a.get("catalog-v2", 0) > b.get("catalog-v2", 0)
        assert ld.failed == [], ld.failed[:5]


def test_the_control_plane_killed_under_load_fails_no_request_and_sidecars_resync(tmp_path, upstreams, procs):
    col = ControlCollector(tmp_path).start()
    procs.append(col)
    col.apply(mesh(upstreams, "v1"))
    cache = tmp_path / "b.control.json"
    a = control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr)
    b = control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr, extra=("--control-cache", str(cache)))
    procs.extend([a, b])
    a.spawn(), b.spawn()
    a.wait_ready(), b.wait_ready()
    col.wait_proxies(all_synced(2, "c1."))
    load = Load(a.outbound, "catalog", threads=3).start()
    try:
        time.sleep(0.5)
        col.kill()  # SIGKILL: no goodbye on the streams
        time.sleep(2.0)
        # a sidecar restarted while the control plane is away starts from its cache and serves
        assert json.loads(cache.read_text())["version"].startswith("c1.")
        b.terminate()
        b.start()
        assert who(b.outbound, 5) == {"catalog-v1"}
        assert "from the control cache" in b.stderr()
        time.sleep(1.0)
        col.start()  # same ports, same store and config history
        col.wait_proxies(all_synced(2, "c1."), timeout=40, what="both sidecars back in sync")
        col.apply(mesh(upstreams, "v2"))
        col.wait_proxies(all_synced(2, "c2."), what="both on version 2")
        time.sleep(0.3)
        n = load.snapshot().get("catalog-v2", 0)
        time.sleep(1.0)
        assert load.snapshot().get("catalog-v2", 0) > n
    finally:
        load.stop()
    assert load.failed == [], load.failed[:5]
    assert load.snapshot().get("catalog-v1", 0) > 0


def test_endpoints_join_and_leave_the_registry(tmp_path, upstreams, procs):
    col = ControlCollector(tmp_path, grace_s=2.0).start()  # no config applied: the registry alone makes the mesh
    procs.append(col)
    front = control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr)
    b1 = control_sidecar(tmp_path, col, "catalog", upstreams["v1"].addr)
    procs.extend([front, b1])
    front.spawn(), b1.spawn()
    front.wait_ready(), b1.wait_ready()
    col.wait_proxies(all_synced(2, endpoints=2))
    assert who(front.outbound, 4) == {"catalog-v1"}

    b2 = control_sidecar(tmp_path, col, "catalog", upstreams["v2"].addr, version="v2")
    procs.append(b2)
    b2.start()
    doc = col.wait_proxies(all_synced(3, endpoints=3))
    assert {e["address"] for e in doc["endpoints"]["catalog"]} == {str(b1.inbound), str(b2.inbound)}
    assert who(front.outbound, 10) == {"catalog-v1", "catalog-v2"}  # round robin over both

    b2.proc.kill()  # gone without a word; it stays for the grace period, then leaves
    b2.proc.wait()
    t0 = time.monotonic()
    doc = col.wait_proxies(lambda d: {e["address"] for e in d["endpoints"]["catalog"]} == {str(b1.inbound)}
                           and all_synced(2)(d),
                           what="the killed sidecar's endpoint gone")
    assert time.monotonic() - t0 >= 1.0  # not before its grace period (2 s, from the kill)
    assert who(front.outbound, 6) == {"catalog-v1"}

    upstreams["v1"].close()  # b1's app goes down: b1 reports it, and the endpoint leaves after the grace
    col.wait_proxies(lambda d: [(e["healthy"], e["routable"]) for e in d["endpoints"]["catalog"]] == [(False, False)]
                     and all_synced(2)(d), what="b1's endpoint unhealthy, then out")


def test_a_sidecar_with_workers_is_one_row_of_proxy_status(tmp_path, upstreams, procs, tracemesh_cmd):
    """Each of the N workers holds its own control stream (each must get the config), named
    HOST:PID/wI after the supervisor; proxy-status shows the sidecar once, with the worst status."""
    col = ControlCollector(tmp_path).start()
    procs.append(col)
    col.apply(mesh(upstreams, "v1"))
    sc = control_sidecar(tmp_path, col, "frontend", upstreams["front"].addr, extra=("--workers", "2"))
    procs.append(sc)
    sc.start()
    doc = col.wait_proxies(all_synced(2, "c1."), what="both workers on version 1")
    ids = sorted(p["instance_id"] for p in doc["proxies"])
    prefix = ids[0].rsplit("/", 1)[0]
    assert ids == [f"{prefix}/w0", f"{prefix}/w1"] and prefix.endswith(f":{sc.proc.pid}")
    assert len(doc["endpoints"]["frontend"]) == 1  # one endpoint, however many workers register it
    out = subprocess.run([*tracemesh_cmd, "proxy-status", "--api", col.api], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in out.stdout.splitlines() if "frontend/v1" in ln]
    assert len(rows) == 1 and f"{prefix} (2 workers)" in rows[0] and rows[0].rstrip().endswith("SYNCED")


def test_proxy_status_folds_workers_and_shows_the_worst_of_them():
    from tracemesh._control_cli import render

    def p(iid, status, acked, nack=None):
        return {"instance_id": iid, "service": "cart", "version": "v2", "address": "10.0.0.5:15006",
                "acked_version": acked, "connected_since": 1.7e9, "status": status, "nack": nack}

    doc = {"version": "c3.e1", "proxies": [
        p("node:40/w0", "SYNCED", "c3.e1"), p("node:40/w1", "NACK", "c2.e1", {"error": "bad route"}),
        p("node:41", "SYNCED", "c3.e1"), p("node:40/wx", "STALE", "c2.e1")]}
    lines = render(doc).splitlines()
    row = next(ln for ln in lines if "node:40 (2 workers)" in ln)
    assert "mixed" in row and row.rstrip().endswith("NACK (bad route)")
    assert any(ln.startswith("node:41 ") and ln.rstrip().endswith("SYNCED") for ln in lines)
    assert any(ln.startswith("node:40/wx ") for ln in lines)  # not a worker name: shown as it is
