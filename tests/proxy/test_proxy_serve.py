"""``tracemesh sidecar`` as a process: config errors at start, hot reload keeping the last good
config, and an orderly SIGTERM that still delivers the spans."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import uuid

import pytest

from sidecar_harness import SidecarProc, Upstream, distinct_ports, sidecar_cmd, write_config
from tracemesh.net import Addr


@pytest.fixture(scope="module")
def apps():
    a, b = Upstream("app-a"), Upstream("app-b")
    yield a, b
    a.close()
    b.close()


def get(addr, host, path="/", timeout=10.0):
    conn = http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"host": host, "x-request-id": f"serve-{uuid.uuid4()}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def run_sidecar(config, otlp, timeout=20):
    p_in, p_out, p_app = distinct_ports(3)
    cmd = sidecar_cmd(service="s", version="v1", app=Addr("127.0.0.1", p_app), inbound=Addr("127.0.0.1", p_in),
                      outbound=Addr("127.0.0.1", p_out), collector=otlp.addr, config=config)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_bad_config_at_start_exits_2_naming_file_line_field(tmp_path, otlp):
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text("services:\n  catalog:\n    endpoints:\n      - {address: '127.0.0.1:9001', version: v1}\n"
                   "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: ten}\n")
    r = run_sidecar(cfg, otlp)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}:8: routes[0].destinations[0].weight: expected a non-negative integer, got 'ten'" in r.stderr
    assert "Traceback" not in r.stderr

    r = run_sidecar(tmp_path / "absent.yaml", otlp)
    assert r.returncode == 2 and f"{tmp_path / 'absent.yaml'}: cannot read" in r.stderr, r.stderr

    cfg.write_text("services:\n  catalog: [\n")
    r = run_sidecar(cfg, otlp)
    assert r.returncode == 2 and f"{cfg}:3: not valid YAML" in r.stderr, r.stderr


def test_bad_arguments_exit_2_with_usage(otlp):
    r = subprocess.run(sidecar_cmd(service="s", version="v1", app=Addr("127.0.0.1", 1), inbound=Addr("127.0.0.1", 2),
                                   outbound=Addr("127.0.0.1", 3), collector=otlp.addr, config=None)[:-2]
                       + ["--collector", "nowhere:port"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "usage:" in r.stderr and "--collector" in r.stderr, r.stderr


def test_listen_address_in_use_exits_1(tmp_path, otlp, apps):
    first = SidecarProc(tmp_path, "busy", apps[0].addr, otlp.addr).start()
    try:
        cmd = sidecar_cmd(service="busy2", version="v1", app=apps[0].addr, inbound=first.inbound,
                          outbound=Addr("127.0.0.1", distinct_ports(1)[0]), collector=otlp.addr, config=None)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    finally:
        assert first.terminate() == 0


def wait_for_service(addr, host, want, timeout=4.0):
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(addr, host)
        got = json.loads(body)["service"] if status == 200 else status
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_hot_reload_and_the_last_good_config(tmp_path, otlp, apps):
    a, b = apps
    cfg = write_config(tmp_path / "mesh.yaml", {"catalog": [(a.addr, "v1")]})
    sc = SidecarProc(tmp_path, "frontend", a.addr, otlp.addr, config=cfg).start()
    try:
        assert get(sc.outbound, "catalog")[0] == 200
        assert json.loads(get(sc.outbound, "catalog")[1])["service"] == "app-a"
        assert get(sc.outbound, "pricing")[0] == 404

        # a change: catalog moves to app-b, pricing appears
        t0 = time.monotonic()
        write_config(cfg, {"catalog": [(b.addr, "v2")], "pricing": [(a.addr, "v1")]})
        assert wait_for_service(sc.outbound, "catalog", "app-b") == "app-b"
        assert time.monotonic() - t0 < 3.5
        assert json.loads(get(sc.outbound, "pricing")[1])["service"] == "app-a"
        sc.wait_log("config reloaded")

        # a broken rewrite is rejected, loudly, and the last good config stays
        tmp = cfg.with_suffix(".tmp")  # replaced whole: a half-written file is not what this is about
        tmp.write_text("services:\n  catalog:\n    endpoints:\n      - {address: 'nowhere:http'}\n")
        os.replace(tmp, cfg)
        err = sc.wait_log("config change rejected")
        assert f"{cfg}:4: services.catalog.endpoints[0].address" in err
        assert json.loads(get(sc.outbound, "catalog")[1])["service"] == "app-b"
        assert get(sc.outbound, "pricing")[0] == 200

        # the file vanishing is not a config either
        cfg.unlink()
        time.sleep(1.5)
        assert json.loads(get(sc.outbound, "catalog")[1])["service"] == "app-b"

        # and a good file afterwards is picked up again
        write_config(cfg, {"catalog": [(a.addr, "v1")]})
        assert wait_for_service(sc.outbound, "catalog", "app-a") == "app-a"
        assert get(sc.outbound, "pricing")[0] == 404
        assert sc.proc.poll() is None
    finally:
        assert sc.terminate() == 0, sc.stderr()


def test_sigterm_exits_0_and_flushes_spans(tmp_path, otlp, apps):
    a, _ = apps
    sc = SidecarProc(tmp_path, "stopper", a.addr, otlp.addr).start()
    tag = f"/sigterm/{uuid.uuid4().hex}"
    for i in range(5):
        status, _ = get(sc.inbound, "stopper", f"{tag}/{i}")
        assert status == 200
    t0 = time.monotonic()
    rc = sc.terminate()  # at once: the spans may still sit in the export queue
    assert rc == 0, sc.stderr()
    assert time.monotonic() - t0 < 4
    spans = otlp.wait(5, service="stopper")
    assert sorted(s.attrs["url.path"] for s in spans) == [f"{tag}/{i}" for i in range(5)]
    out = sc.stdout()
    assert "recorded 5 spans, exported 5, dropped 0" in out, out


def test_sigterm_without_a_collector_counts_the_spans_it_could_not_send(tmp_path, apps):
    a, _ = apps
    sc = SidecarProc(tmp_path, "lonely", a.addr, Addr("127.0.0.1", distinct_ports(1)[0])).start()
    for i in range(3):
        assert get(sc.inbound, "lonely", f"/alone/{i}")[0] == 200
    time.sleep(0.7)  # one export attempt has failed: a batch waits for its retry
    assert get(sc.inbound, "lonely", "/alone/3")[0] == 200  # and one more is still queued
    t0 = time.monotonic()
    assert sc.terminate() == 0, sc.stderr()
    assert time.monotonic() - t0 < 5
    out = sc.stdout()
    assert "recorded 4 spans, exported 0, dropped 4" in out, out
    assert "span export to" in sc.stderr()  # said once, not per batch


def test_sigterm_lets_an_exchange_in_flight_finish(tmp_path, otlp, apps):
    a, _ = apps
    sc = SidecarProc(tmp_path, "drainer", a.addr, otlp.addr).start()
    path = f"/sleep/1.0?{uuid.uuid4().hex}"
    result = []
    t = threading.Thread(target=lambda: result.append(get(sc.inbound, "drainer", path)))
    t.start()
    deadline = time.monotonic() + 5
    while not a.requests(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.requests(path), "the request never reached the app"
    assert sc.terminate() == 0, sc.stderr()
    t.join(10)
    assert result and result[0][0] == 200, result
    [span] = otlp.wait(**{"url.path": "/sleep/1.0", "url.query": path.split("?")[1]})
    assert span.attrs["mesh.response_flags"] == "-" and span.attrs["http.response.status_code"] == 200
