"""Routing decisions, without sockets: service from the authority, version by weight, endpoint by
round robin."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.net import Addr
from tracemesh.proxy import parse_config
from tracemesh.proxy._router import NoHealthyUpstream, NoRoute, Router, service_from_authority

CONFIG = parse_config("""
services:
  catalog:
    endpoints:
      - {address: '10.0.0.1:80', version: v1}
      - {address: '10.0.0.2:80', version: v1}
      - {address: '10.0.0.3:80', version: v1}
      - {address: '10.0.0.9:80', version: v2}
  pricing:
    endpoints:
      - {address: '10.0.1.1:80', version: v1}
      - {address: '10.0.1.2:80', version: v2}
      - {address: '10.0.1.3:80', version: v3}
  empty:
    endpoints: []
routes:
  - service: catalog
    destinations: [{version: v1, weight: 80}, {version: v2, weight: 20}]
  - service: pricing
    destinations: [{version: v1, weight: 0}, {version: v2, weight: 1}, {version: v3, weight: 0}]
""", "test.yaml")


@pytest.mark.parametrize("authority", [
    "catalog", "catalog:80", "catalog:8080", "CATALOG", " catalog ", "catalog.default", "catalog.default.svc",
    "catalog.default.svc.cluster.local", "catalog.default.svc.cluster.local:80",
])
def test_authority_forms_name_the_service(authority):
    assert service_from_authority(authority) == "catalog"
    assert Router(CONFIG).pick(authority).service == "catalog"


@pytest.mark.parametrize("authority", ["10.0.0.1", "10.0.0.1:80", "[::1]:80", "[::1]", "unknown", "unknown:80",
                                       "catalogue", "", "cat", "unknown.catalog"])
def test_unknown_authorities_are_no_route(authority):
    with pytest.raises(NoRoute):
        Router(CONFIG).pick(authority)


def test_ip_literals_are_kept_whole():
    assert service_from_authority("10.0.0.1:80") == "10.0.0.1"
    assert service_from_authority("[::1]:80") == "[::1]:80"


def test_weights_80_20_over_10k_picks():
    router = Router(CONFIG, rng=random.Random(1234))
    versions = Counter(router.pick("catalog").endpoint.version for _ in range(10_000))
    # binomial(10000, 0.2): sd 40; 5 sd of tolerance
    assert abs(versions["v2"] - 2000) < 200, versions
    assert versions["v1"] + versions["v2"] == 10_000


def test_weight_zero_is_never_picked():
    router = Router(CONFIG, rng=random.Random(7))
    picked = Counter(router.pick("pricing").endpoint.version for _ in range(5_000))
    assert picked == {"v2": 5_000}


def test_same_seed_same_choices():
    a, b = Router(CONFIG, rng=random.Random(99)), Router(CONFIG, rng=random.Random(99))
    assert [a.pick("catalog").endpoint for _ in range(200)] == [b.pick("catalog").endpoint for _ in range(200)]


class _AlwaysFirst(random.Random):
    def choices(self, population, weights=None, *, cum_weights=None, k=1):
        return [population[0]] * k


def test_round_robin_within_the_picked_version():
    router = Router(CONFIG, rng=_AlwaysFirst())
    got = [router.pick("catalog").endpoint.address for _ in range(9)]
    v1 = [Addr("10.0.0.1", 80), Addr("10.0.0.2", 80), Addr("10.0.0.3", 80)]
    assert got == v1 * 3


def test_round_robin_over_all_endpoints_without_a_route():
    cfg = parse_config("""
services:
  s:
    endpoints: [{address: ':1', version: a}, {address: ':2', version: b}, {address: ':3', version: a}]
""")
    router = Router(cfg)
    assert [router.pick("s").endpoint.address.port for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]


def test_service_without_endpoints_is_no_healthy_upstream():
    with pytest.raises(NoHealthyUpstream):
        Router(CONFIG).pick("empty")


def test_update_swaps_the_config():
    router = Router(CONFIG)
    router.update(parse_config("services:\n  other:\n    endpoints: [{address: ':9'}]\n"))
    assert router.pick("other").endpoint.address == Addr("127.0.0.1", 9)
    with pytest.raises(NoRoute):
        router.pick("catalog")
    assert router.endpoints("other")[0].address.port == 9 and router.endpoints("catalog") == ()


@settings(deadline=None)
@given(st.text())
def test_any_authority_is_a_pick_or_a_typed_refusal(authority):
    router = Router(CONFIG)
    try:
        pick = router.pick(authority)
    except (NoRoute, NoHealthyUpstream):
        return
    assert pick.service in CONFIG.services


MATCHED = parse_config("""
services:
  shop:
    endpoints: [{address: ':1', version: v1}, {address: ':2', version: v2}, {address: ':3', version: v2}]
    traffic_policy: {outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 100}}
routes:
  - {service: shop, name: api, match: [{path: {prefix: /api/}, method: POST}], destinations: [{version: v2}]}
  - {service: shop, name: beta, match: [{query: {beta: {exact: '1'}}}], destinations: [{version: v2}]}
  - {service: shop, name: rest, match: [{path: {prefix: /}}], destinations: [{version: v1}]}
""")


def test_first_matching_route_wins_and_unmatched_requests_are_no_route():
    router = Router(MATCHED)
    assert router.select("shop", "POST", "/api/x").route.name == "api"
    assert router.select("shop", "GET", "/api/x").route.name == "rest"
    assert router.select("shop", "GET", "/a", query={"beta": "1"}).route.name == "beta"
    assert router.pick("shop", "POST", "/api/x").endpoint.version == "v2"
    with pytest.raises(NoRoute):
        router.select("shop", "GET", "no-slash")


def test_ejected_endpoints_are_skipped_until_all_are():
    from tracemesh.proxy._resilience import Outcome

    router = Router(MATCHED)
    sel = router.select("shop", "POST", "/api/x")
    a, b = sel.state.by_version["v2"]
    sel.state.finished(a, Outcome(500))
    assert {router.endpoint(sel) for _ in range(6)} == {b}
    sel.state.finished(b, Outcome(503))
    assert {router.endpoint(sel) for _ in range(6)} == {a, b}  # panic: all ejected, all used
    assert router.endpoint(sel, exclude=[a]) == b


def test_an_ejection_outlives_a_config_or_endpoint_change():
    from tracemesh.proxy._resilience import Outcome

    router = Router(MATCHED)
    sel = router.select("shop", "POST", "/api/x")
    a, b = sel.state.by_version["v2"]
    sel.state.finished(a, Outcome(500))
    assert {router.endpoint(sel) for _ in range(6)} == {b}
    # a new endpoint arrives (the control plane's next snapshot): a stays out, the others serve
    router.update(parse_config("""
services:
  shop:
    endpoints: [{address: ':1', version: v1}, {address: ':2', version: v2}, {address: ':3', version: v2},
                {address: ':4', version: v2}]
    traffic_policy: {outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 100}}
routes:
  - {service: shop, name: api, match: [{path: {prefix: /api/}, method: POST}], destinations: [{version: v2}]}
"""))
    sel = router.select("shop", "POST", "/api/x")
    assert len(sel.state.by_version["v2"]) == 3
    assert a not in {router.endpoint(sel) for _ in range(12)}
    assert sel.state.outliers.ejections == 1
    # an endpoint that left and came back is not remembered beyond the config it left in
    router.update(parse_config("""
services:
  shop:
    endpoints: [{address: ':1', version: v1}, {address: ':3', version: v2}]
    traffic_policy: {outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 100}}
"""))
    router.update(MATCHED)
    sel = router.select("shop", "POST", "/api/x")
    assert a in {router.endpoint(sel) for _ in range(6)}
