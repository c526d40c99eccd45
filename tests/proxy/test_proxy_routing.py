"""Routing and resilience through a real sidecar to real upstream apps: route matches, weights,
timeouts, retries, fault injection, circuit breaking and outlier detection, each shown by its
effect on responses, on what the upstreams saw and on the client spans."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import uuid
from collections import Counter

import pytest

from sidecar_harness import SidecarProc, StatusApp, Upstream, write_mesh



def ep(addr, version="v1"):
    return {"address": str(addr), "version": version}


@pytest.fixture(scope="module")
def routed(otlp, tmp_path_factory):
    work = tmp_path_factory.mktemp("routing")
    apps = {name: Upstream(name) for name in ("v1", "v2", "good", "slow", "healthy")}
    bad = {name: StatusApp(code) for name, code in (("flaky", 503), ("broken1", 503), ("broken2", 503), ("sick", 500),
                                                    ("relapsing", 500))}
    config = {
        "services": {
            "shop": {"endpoints": [ep(apps["v1"].addr, "v1"), ep(apps["v2"].addr, "v2")]},
            "flaky": {"endpoints": [ep(bad["flaky"].addr), ep(apps["good"].addr)]},
            "broken": {"endpoints": [ep(bad["broken1"].addr), ep(bad["broken2"].addr)]},
            "slow": {"endpoints": [ep(apps["slow"].addr)],
                     "traffic_policy": {"connection_pool": {"max_requests": 1}}},
            "returning": {"endpoints": [ep(bad["relapsing"].addr), ep(apps["healthy"].addr)],
                          "traffic_policy": {"outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "1s",
                                                                   "max_ejection_percent": 50}}},
            "ejecting": {"endpoints": [ep(bad["sick"].addr), ep(apps["healthy"].addr)],
                         "traffic_policy": {"outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "30s",
                                                                  "max_ejection_percent": 50}}},
        },
        "routes": [
            {"service": "shop", "name": "testers", "match": [{"headers": {"x-user": {"exact": "tester"}}}],
             "destinations": [{"version": "v2"}]},
            {"service": "shop", "name": "beta", "match": [{"path": {"regex": "/beta/[0-9]+"}, "method": "GET"}],
             "destinations": [{"version": "v2"}]},
            {"service": "shop", "name": "short", "match": [{"path": {"prefix": "/sleep/"}}],
             "destinations": [{"version": "v1"}], "timeout": "300ms"},
            {"service": "shop", "name": "aborted", "match": [{"path": {"prefix": "/abort"}}],
             "destinations": [{"version": "v1"}], "fault": {"abort": {"percent": 100, "http_status": 418}}},
            {"service": "shop", "name": "delayed", "match": [{"path": {"prefix": "/delayed"}}],
             "destinations": [{"version": "v1"}], "fault": {"delay": {"percent": 100, "fixed_delay": "300ms"}}},
            {"service": "shop", "name": "split",
             "destinations": [{"version": "v1", "weight": 80}, {"version": "v2", "weight": 20}]},
            {"service": "flaky", "destinations": [{"version": "v1"}],
             "retries": {"attempts": 2, "retry_on": "gateway-error,connect-failure"}},
            {"service": "broken", "destinations": [{"version": "v1"}],
             "retries": {"attempts": 2, "retry_on": "5xx"}},
        ],
    }
    path = write_mesh(work / "mesh.yaml", config)
    sc = SidecarProc(work, "client", apps["v1"].addr, otlp.addr, config=path).start()
    try:
        yield sc, apps, bad
        assert sc.proc.poll() is None, f"the sidecar died:\n{sc.stderr()}"
    finally:
        sc.close()
        for app in [*apps.values(), *bad.values()]:
            app.close()


def call(sc, service, path, headers=None, conn=None, timeout=10.0):
    rid = f"route-{uuid.uuid4()}"
    own = conn is None
    conn = conn or http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"host": service, "x-request-id": rid, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), rid
    finally:
        if own:
            conn.close()


def span_of(otlp, rid):
    [span] = otlp.wait(**{"guid:x-request-id": rid, "mesh.direction": "outbound"})
    return span


def flags(span):
    return set(span.attrs["mesh.response_flags"].split(","))


def test_header_match_routes_to_v2(routed, otlp):
    sc, apps, _ = routed
    for _ in range(5):
        status, body, rid = call(sc, "shop", "/items", {"x-user": "tester"})
        assert status == 200 and json.loads(body)["service"] == "v2"
    span = span_of(otlp, rid)
    assert span.attrs["mesh.route"] == "testers" and span.attrs["mesh.destination.version"] == "v2"
    assert span.attrs["mesh.upstream.endpoint"] == str(apps["v2"].addr)


def test_path_regex_match(routed, otlp):
    sc, _, _ = routed
    status, body, rid = call(sc, "shop", "/beta/42?x=1")
    assert status == 200 and json.loads(body)["service"] == "v2"
    assert span_of(otlp, rid).attrs["mesh.route"] == "beta"
    status, _, rid = call(sc, "shop", "/beta/x42")  # a regex matches the whole path, or not at all
    assert status == 200 and span_of(otlp, rid).attrs["mesh.route"] == "split"


def test_weights_80_20_over_400_requests(routed):
    sc, apps, _ = routed
    conn = http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=10)
    tag = f"/status/200?weights={uuid.uuid4()}"  # a bodiless answer: one write upstream, no Nagle stall
    try:
        for _ in range(400):
            assert call(sc, "shop", tag, conn=conn)[0] == 200
    finally:
        conn.close()
    got = Counter({v: len(apps[v].requests(tag)) for v in ("v1", "v2")})
    # binomial(400, 0.2): mean 80, sd 8; 4.5 sd of tolerance
    assert abs(got["v2"] - 80) <= 36 and got["v1"] + got["v2"] == 400, got


def test_route_timeout_is_504_ut(routed, otlp):
    sc, _, _ = routed
    t0 = time.monotonic()
    status, body, rid = call(sc, "shop", "/sleep/1.5")
    took = time.monotonic() - t0
    assert status == 504 and 0.25 < took < 1.2, (status, took)
    span = span_of(otlp, rid)
    assert flags(span) == {"UT"} and span.attrs["mesh.route"] == "short" and span.status == "ERROR"


def test_retry_on_503_succeeds_on_the_other_endpoint(routed, otlp):
    sc, apps, bad = routed
    before = bad["flaky"].hits
    spans = []
    for _ in range(4):  # round robin: every other request first meets the failing endpoint
        status, body, rid = call(sc, "flaky", "/r")
        assert status == 200 and json.loads(body)["service"] == "good"
        spans.append(span_of(otlp, rid))
    retried = [s for s in spans if s.attrs["mesh.retries"] == 1]
    assert retried and all(s.attrs["mesh.retries"] in (0, 1) for s in spans)
    assert len(retried) == bad["flaky"].hits - before
    for s in retried:
        assert s.attrs["mesh.upstream.endpoint"] == str(apps["good"].addr)
        assert s.attrs["mesh.response_flags"] == "-" and s.status == "UNSET"


def test_a_small_body_is_buffered_and_sent_again_on_retry(routed, otlp):
    sc, apps, bad = routed
    body = bytes(range(256)) * 40  # 10 KiB, under the 64 KiB a retry may buffer
    for _ in range(2):  # one of the two meets the failing endpoint first
        rid = f"route-{uuid.uuid4()}"
        conn = http.client.HTTPConnection(sc.outbound.host, sc.outbound.port, timeout=10)
        try:
            conn.request("POST", "/post", body=body, headers={"host": "flaky", "x-request-id": rid})
            resp = conn.getresponse()
            echo = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 200 and echo["service"] == "good" and echo["body_len"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        span_of(otlp, rid)
    assert {s.attrs["mesh.retries"] for s in otlp.find(**{"url.path": "/post", "mesh.direction": "outbound"})} == {0, 1}


def test_retries_exhausted_is_urx(routed, otlp):
    sc, _, bad = routed
    before = bad["broken1"].hits + bad["broken2"].hits
    status, _, rid = call(sc, "broken", "/r")
    assert status == 503  # the last attempt's answer is relayed
    span = span_of(otlp, rid)
    assert span.attrs["mesh.retries"] == 2 and flags(span) == {"URX"} and span.status == "ERROR"
    assert bad["broken1"].hits + bad["broken2"].hits - before == 3  # the first try and two retries


def test_fault_abort_answers_without_calling_the_upstream(routed, otlp):
    sc, apps, _ = routed
    status, body, rid = call(sc, "shop", "/abort/me")
    assert status == 418 and b"fault filter abort" in body
    span = span_of(otlp, rid)
    assert flags(span) == {"FI"} and span.attrs["http.response.status_code"] == 418
    assert span.attrs["mesh.route"] == "aborted"
    assert not apps["v1"].requests("/abort") and not apps["v2"].requests("/abort")


def test_fault_delay_is_measured(routed, otlp):
    sc, _, _ = routed
    t0 = time.monotonic()
    status, _, rid = call(sc, "shop", "/delayed/x")
    took = time.monotonic() - t0
    assert status == 200 and took >= 0.3, took
    span = span_of(otlp, rid)
    assert flags(span) == {"DI"} and span.status == "UNSET"
    assert (span.end_ns - span.start_ns) / 1e9 >= 0.3


def test_circuit_breaker_max_requests_1(routed, otlp):
    sc, _, _ = routed
    results = {}

    def slow(key):
        results[key] = call(sc, "slow", "/sleep/0.6")

    t = threading.Thread(target=slow, args=("first",))
    t.start()
    time.sleep(0.2)  # the first is in flight upstream
    slow("second")
    t.join()
    assert sorted(r[0] for r in results.values()) == [200, 503], results
    status, body, rid = results["second"]
    assert status == 503 and b"overflow" in body
    assert flags(span_of(otlp, rid)) == {"UO"}
    assert call(sc, "slow", "/sleep/0")[0] == 200  # the breaker closes once the request is done


def test_outlier_detection_ejects_the_failing_endpoint(routed, otlp):
    sc, apps, bad = routed
    codes = [call(sc, "ejecting", "/o")[0] for _ in range(12)]
    # round robin until the sick endpoint has failed twice in a row, then only the healthy one
    assert bad["sick"].hits == 2 and codes.count(500) == 2, codes
    assert codes[4:] == [200] * 8, codes
    status, body, rid = call(sc, "ejecting", "/o")
    assert status == 200 and span_of(otlp, rid).attrs["mesh.upstream.endpoint"] == str(apps["healthy"].addr)


def test_an_ejected_endpoint_returns_after_its_ejection_time(routed):
    sc, apps, bad = routed
    sick = bad["relapsing"]
    for _ in range(6):
        call(sc, "returning", "/r")
    assert sick.hits == 2  # ejected after two consecutive 500s
    sick.status = 200  # the app recovers; the sidecar only learns by trying it again
    for _ in range(4):
        call(sc, "returning", "/r")
    assert sick.hits == 2  # still ejected
    time.sleep(1.2)  # base ejection time 1 s (x1, first ejection)
    codes = [call(sc, "returning", "/r")[0] for _ in range(6)]
    assert codes == [200] * 6 and sick.hits >= 4, (codes, sick.hits)  # back in the rotation
