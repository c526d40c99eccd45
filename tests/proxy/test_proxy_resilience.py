"""Retries, breakers, outlier detection, balancers and route matches, without sockets."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from tracemesh.proxy._match import MatchError, RequestMatch, StringMatch, any_matches
from tracemesh.proxy._resilience import (
    Balancer, CircuitBreaker, Limits, OutlierDetector, OutlierPolicy, Outcome, RetryBudget, RetryPolicy,
)


# -- matches -----------------------------------------------------------------------------------

def _m(**kw):
    return RequestMatch(**kw)


def test_string_matches():
    assert StringMatch.make("exact", "/a").matches("/a") and not StringMatch.make("exact", "/a").matches("/ab")
    assert StringMatch.make("prefix", "/api/").matches("/api/v1") and not StringMatch.make("prefix", "/api/").matches("/ap")
    rx = StringMatch.make("regex", r"/items/\d+")
    assert rx.matches("/items/42") and not rx.matches("/items/42/x")  # the whole value, as Envoy's safe_regex
    assert StringMatch.make("present").matches("") and not StringMatch.make("present").matches(None)
    with pytest.raises(MatchError, match="does not compile"):
        StringMatch.make("regex", "(")
    with pytest.raises(MatchError):
        StringMatch.make("glob", "*")


def test_a_hostile_regex_runs_in_linear_time():
    rx = StringMatch.make("regex", r"(a+)+$")  # catastrophic backtracking in a backtracking engine
    t = time.perf_counter()
    assert not rx.matches("a" * 100_000 + "b")
    assert time.perf_counter() - t < 1.0


def test_request_match_all_conditions_and_any_match():
    headers = {"x-user": "beta-tester", "x-env": "prod"}
    m = _m(path=StringMatch.make("prefix", "/api"), methods=frozenset({"GET"}),
           headers=(("x-user", StringMatch.make("regex", "beta-.*")),), query=(("v", StringMatch.make("exact", "2")),))
    assert m.matches("GET", "/api/x", headers.get, {"v": "2"})
    assert not m.matches("POST", "/api/x", headers.get, {"v": "2"})
    assert not m.matches("GET", "/api/x", headers.get, {"v": "3"})
    assert not m.matches("GET", "/api/x", {}.get, {"v": "2"})
    assert any_matches((), "DELETE", "/", {}.get, {})  # no matches: everything
    assert any_matches((m, _m(methods=frozenset({"POST"}))), "POST", "/other", {}.get, {})


# -- retries -----------------------------------------------------------------------------------

def test_retry_conditions_follow_istio_and_envoy():
    default = RetryPolicy()
    assert default.retriable(Outcome(None, "UF"))  # connect-failure
    assert not default.retriable(Outcome(503))  # a 503 answer is not retried by Istio's default
    assert default.retriable(Outcome(200, grpc_status=14))  # gRPC UNAVAILABLE
    gw = RetryPolicy(retry_on=frozenset({"gateway-error"}))
    assert gw.retriable(Outcome(502)) and gw.retriable(Outcome(504)) and not gw.retriable(Outcome(500))
    any5 = RetryPolicy(retry_on=frozenset({"5xx"}))
    assert any5.retriable(Outcome(500)) and any5.retriable(Outcome(None, "UC")) and not any5.retriable(Outcome(404))
    codes = RetryPolicy(retry_on=frozenset({"retriable-status-codes"}), retriable_status_codes=frozenset({409}))
    assert codes.retriable(Outcome(409)) and not codes.retriable(Outcome(500))


@given(st.integers(1, 12), st.integers(0, 2**32))
def test_backoff_is_fully_jittered_and_capped(retry, seed):
    p = RetryPolicy()
    b = p.backoff_s(retry, random.Random(seed))
    assert 0 <= b <= min(0.25, 0.025 * 2 ** (retry - 1))


def test_retry_budget_keeps_retries_to_a_share_of_traffic():
    budget = RetryBudget(percent=20, min_concurrency=3)
    budget.active_requests = 100
    granted = sum(budget.try_retry() for _ in range(50))
    assert granted == 20 and budget.denied == 30
    budget.active_requests = 1
    for _ in range(granted):
        budget.retry_done()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]  # the floor of 3


# -- circuit breaking --------------------------------------------------------------------------

def test_breaker_opens_at_the_limit_and_closes_as_requests_finish():
    cb = CircuitBreaker(Limits(max_requests=3, max_pending_requests=1, max_connections=2))
    assert [cb.try_request() for _ in range(4)] == [True, True, True, False]
    assert cb.overflows == 1
    cb.request_done()
    assert cb.try_request()
    assert cb.try_pending() and not cb.try_pending()


# -- outlier detection -------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_an_endpoint_is_ejected_after_5_consecutive_5xx_and_returns_later_for_longer_each_time():
    clock = Clock()
    od = OutlierDetector(OutlierPolicy(max_ejection_percent=50), clock)
    group = ["a", "b", "c", "d"]
    for _ in range(4):
        assert not od.record("a", Outcome(503), group)
    od.record("a", Outcome(200), group)  # a success resets the count
    assert [od.record("a", Outcome(500), group) for _ in range(5)] == [False] * 4 + [True]
    assert od.is_ejected("a") and od.healthy(group) == ["b", "c", "d"]
    clock.t += 30.1
    assert not od.is_ejected("a")  # back after the base ejection time
    for _ in range(5):
        od.record("a", Outcome(None, "UF"), group)
    clock.t += 30.1
    assert od.is_ejected("a")  # the second ejection lasts 2 x 30 s
    clock.t += 30
    assert not od.is_ejected("a")


def test_ejection_never_exceeds_the_max_percent_but_always_allows_one():
    clock = Clock()
    od = OutlierDetector(OutlierPolicy(max_ejection_percent=10), clock)
    group = ["a", "b", "c"]
    for ep in group:
        for _ in range(5):
            od.record(ep, Outcome(500), group)
    assert sum(od.is_ejected(e) for e in group) == 1
    od2 = OutlierDetector(OutlierPolicy(max_ejection_percent=100), clock)
    for ep in ["x"]:
        for _ in range(5):
            od2.record(ep, Outcome(500), ["x"])
    assert od2.healthy(["x"]) == ["x"]  # all ejected: route to them anyway (panic mode)


# -- balancing ---------------------------------------------------------------------------------

def test_round_robin_and_random_spread_evenly():
    rr = Balancer("round_robin")
    assert [rr.pick(["a", "b", "c"]) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    rnd = Balancer("random", random.Random(7))
    counts = Counter(rnd.pick(["a", "b", "c"]) for _ in range(30_000))
    assert all(9_400 < n < 10_600 for n in counts.values())


def test_least_request_avoids_the_busy_endpoint():
    lr = Balancer("least_request", random.Random(3))
    load = {"busy": 50, "idle1": 0, "idle2": 1}
    counts = Counter(lr.pick(list(load), load.get) for _ in range(9_000))
    assert counts["busy"] == 0  # two choices: the busy one loses every comparison it is in


def test_consistent_hash_is_sticky_and_moves_few_keys_when_an_endpoint_goes():
    ch = Balancer("consistent_hash")
    eps = [f"10.0.0.{i}:80" for i in range(5)]
    keys = [f"user-{i}" for i in range(5_000)]
    before = {k: ch.pick(eps, key=k) for k in keys}
    assert before == {k: ch.pick(eps, key=k) for k in keys}
    spread = Counter(before.values())
    assert all(700 < n < 1_300 for n in spread.values()), spread
    after = {k: ch.pick(eps[:-1], key=k) for k in keys}
    moved = sum(before[k] != after[k] for k in keys)
    assert moved == sum(1 for k in keys if before[k] == eps[-1])  # only the gone endpoint's keys move
