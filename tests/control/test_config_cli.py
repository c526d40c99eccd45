"""validate/apply/get/history/rollback through a real ``tracemesh collector`` and the real CLI."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time

import httpx
import pytest
import yaml

from tracemesh.proxy._config import parse_config

MESH = textwrap.dedent("""\
    services:
      catalog:
        versions: [v1, v2]
        ports: [{port: 8080, protocol: http, name: web}]
      pricing:
        versions: [v1]
    ---
    routes:
      - service: catalog
        destinations: [{version: v1, weight: 100}]
    canaries:
      - name: catalog-v2
        service: catalog
        baseline: v1
        canary: v2
        steps: [10, 50, 100]
        interval: 1m
        thresholds: {max_error_percent: 1}
    """)
SHIFT = "routes:\n  - service: catalog\n    destinations: [{version: v1, weight: 80}, {version: v2, weight: 20}]\n"
# the second document's route names a subset catalog does not have: line 6
BAD = "services:\n  tax: {versions: [v1]}\n---\nroutes:\n  - service: catalog\n    destinations: [{version: v3}]\n"


@pytest.fixture(scope="module")
def coll(collector_factory):
    return collector_factory().start()


@pytest.fixture
def write(tmp_path):
    def w(name: str, text: str) -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)
    return w


def test_validate_is_local_and_precise(tm, write):
    ok = tm("validate", "-f", write("mesh.yaml", MESH))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("mesh.yaml: valid: 2 services, 1 route, 0 policies, 1 canary")
    bad = write("bad.yaml", BAD)
    out = tm("validate", "-f", write("m.yaml", MESH.split("---")[0]), "-f", bad)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"{bad}:6: routes[0].destinations[0].version: service 'catalog' "
                                  f"has no version 'v3' (declares v1, v2)")
    syntax = tm("validate", "-f", write("s.yaml", "services: {a: [\n"))
    assert syntax.returncode == 1 and ":2: not valid YAML" in syntax.stderr
    assert tm("validate", "-f", "-", stdin="services:\n  a: {}\n").stdout.startswith("<stdin>: valid: 1 service")
    missing = tm("validate", "-f", "/nonexistent.yaml")
    assert missing.returncode == 1 and "/nonexistent.yaml: cannot read" in missing.stderr


def test_apply_get_history_rollback_through_the_collector(coll, tm, write):
    api = coll.api_url
    none = tm("get", api=api)
    assert none.returncode == 1 and "no config applied yet" in none.stderr
    assert httpx.get(f"{api}/api/config").status_code == 409

    first = tm("apply", "-f", write("mesh.yaml", MESH), api=api)
    assert first.returncode == 0, first.stderr
    assert "version 1 (2 services, 1 route, 0 policies, 1 canary)" in first.stdout
    again = tm("apply", "-f", write("mesh.yaml", MESH), api=api)
    assert again.returncode == 0 and "unchanged: version 1" in again.stdout

    bad = write("bad.yaml", BAD)
    refused = tm("apply", "-f", bad, api=api)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"{bad}:6: routes[0].destinations[0].version: service 'catalog' has no version 'v3' (declares v1, v2)"
    weights = tm("apply", "-f", write("w.yaml", SHIFT.replace("20}", "10}")), api=api)
    assert weights.returncode == 1 and "w.yaml:3: routes[0].destinations: the weights add up to 90" in weights.stderr

    shifted = tm("apply", "-f", write("shift.yaml", SHIFT), "-m", "shift 20% to v2", api=api)
    assert shifted.returncode == 0 and "version 2" in shifted.stdout

    got = tm("get", api=api)
    assert got.returncode == 0 and got.stdout.startswith("# tracemesh mesh config, version 2: shift 20% to v2\n")
    doc = yaml.safe_load(got.stdout)
    assert doc["routes"][0]["destinations"][1] == {"version": "v2", "weight": 20} and "tax" not in doc["services"]
    # what `get` prints is a config: applied whole, it is the same config (no new version)
    same = tm("apply", "--replace", "-f", write("got.yaml", got.stdout), api=api)
    assert same.returncode == 0 and "unchanged: version 2" in same.stdout, same.stderr
    as_json = json.loads(tm("get", "--version", "1", "-o", "json", api=api).stdout)
    assert as_json["version"] == 1 and as_json["mesh"]["routes"][0]["destinations"] == [{"version": "v1", "weight": 100}]
    parse_config(json.dumps(as_json["mesh"]), "pushed")  # what a sidecar will do with it

    rolled = tm("rollback", "1", api=api)
    assert rolled.returncode == 0 and "now version 3" in rolled.stdout
    hist = tm("history", api=api)
    assert hist.returncode == 0
    lines = hist.stdout.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "APPLIED"] and len(lines) == 4
    assert lines[3].startswith("* 3") and lines[3].rstrip().endswith("rollback to 1")
    assert "shift 20% to v2" in lines[2]
    unknown = tm("rollback", "9", api=api)
    assert unknown.returncode == 1 and "no config version 9" in unknown.stderr

    # replace: the files are the whole config
    replaced = tm("apply", "--replace", "-f", write("only.yaml", "services:\n  tax: {}\n"), api=api)
    assert replaced.returncode == 0 and "version 4 (1 service, 0 routes" in replaced.stdout
    # several files, one version: all or nothing
    both = tm("apply", "-f", write("s.yaml", "services:\n  shop: {versions: [v1]}\n"),
              "-f", write("r.yaml", "routes:\n  - service: shop\n    destinations: [{version: v1}]\n"), api=api)
    assert both.returncode == 0 and "version 5" in both.stdout
    partial = tm("apply", "-f", write("s2.yaml", "services:\n  cart: {}\n"), "-f", bad, api=api)
    assert partial.returncode == 1 and f"{bad}:5: routes[0].service: no service 'catalog'" in partial.stderr
    assert len(httpx.get(f"{api}/api/config/history").json()["versions"]) == 5


def test_the_http_api_answers_for_itself(coll):
    api = coll.api_url
    v = httpx.post(f"{api}/api/config/validate", params={"source": "x.yaml"}, content=b"routes: 7\n")
    assert v.status_code == 400 and v.json()["error"] == "x.yaml:1: routes: expected a list, got 7"
    ok = httpx.post(f"{api}/api/config/validate", params={"replace": "1"}, content=b"services: {a: {}}\n")
    assert ok.status_code == 200 and ok.json() == {"valid": True, "summary": "1 service, 0 routes, 0 policies, 0 canaries",
                                                   "replace": True}
    browser = httpx.post(f"{api}/api/config", content=b"services: {a: {}}\n", headers={"origin": "http://evil.example"})
    assert browser.status_code == 403
    assert httpx.get(f"{api}/api/config", params={"version": "x"}).status_code == 400
    assert httpx.get(f"{api}/api/config", params={"version": "999"}).status_code == 404
    assert httpx.post(f"{api}/api/config/rollback").status_code == 400
    assert httpx.get(f"{api}/api/config/rollback").status_code == 405
    assert httpx.post(f"{api}/api/config", content=b"\xff").status_code == 400


def test_history_survives_a_restart_and_a_second_collector_is_refused(collector_factory, tm, tmp_path, write):
    first = collector_factory(control_dir=tmp_path / "control").start()
    assert tm("apply", "-f", write("mesh.yaml", MESH), api=first.api_url).returncode == 0
    assert tm("apply", "-f", write("shift.yaml", SHIFT), api=first.api_url).returncode == 0
    before = httpx.get(f"{first.api_url}/api/config/history").json()

    second = collector_factory(control_dir=tmp_path / "control")
    assert second.popen().wait(60) == 1
    assert f"config history {tmp_path / 'control'} is in use by another collector (pid {first.proc.pid})" in second.output()

    assert first.stop() == 0
    restarted = collector_factory(store=first.store, control_dir=tmp_path / "control").start()
    assert httpx.get(f"{restarted.api_url}/api/config/history").json() == before
    got = tm("get", api=restarted.api_url)
    assert got.stdout.startswith("# tracemesh mesh config, version 2")
    assert "mesh config history" in restarted.output() and "version 2 in force" in restarted.output()


def test_kill_9_during_applies_then_restart_keeps_a_consistent_history(collector_factory, tmp_path):
    control = tmp_path / "control"
    acked: dict[int, str] = {}
    c = collector_factory(control_dir=control)
    for round_ in range(2):  # the store's own test kills an apply loop many more times, without chdb
        c.start()
        stop = threading.Event()

        def loop(api: str, base: int, stop: threading.Event) -> None:
            i = 0
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    i += 1
                    w = (base + i) % 99 + 1
                    body = (f"services:\n  catalog: {{versions: [v1, v2]}}\nroutes:\n  - service: catalog\n"
                            f"    destinations: [{{version: v1, weight: {100 - w}}}, {{version: v2, weight: {w}}}]\n")
                    try:
                        r = client.post(f"{api}/api/config", content=body.encode(), params={"source": "loop.yaml"})
                    except httpx.TransportError:
                        return
                    if r.status_code == 200 and r.json()["changed"]:
                        acked[r.json()["version"]] = r.json()["digest"]

        t = threading.Thread(target=loop, args=(c.api_url, round_ * 37, stop))
        t.start()
        time.sleep(0.5 + 0.3 * round_)
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(10)
        stop.set()
        t.join(15)
    c.start()
    hist = httpx.get(f"{c.api_url}/api/config/history").json()["versions"]
    numbers = [h["version"] for h in hist]
    # the newest versions (at most the 100 kept), numbered without gaps, the last acknowledged among them
    assert numbers == list(range(numbers[-1] - len(numbers) + 1, numbers[-1] + 1)) and len(numbers) <= 100
    assert len(acked) > 5 and max(acked) <= numbers[-1]
    digests = {h["version"]: h["digest"] for h in hist}
    for n, d in acked.items():
        if n >= numbers[0]:
            assert digests[n] == d
    for n in numbers[-3:]:
        r = httpx.get(f"{c.api_url}/api/config", params={"version": n})
        parse_config(json.dumps(r.json()["mesh"]), "pushed")
