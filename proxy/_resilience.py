"""Retries, circuit breaking and outlier detection: plain objects, no sockets, an injectable clock.

The data path asks and reports; these objects decide. Defaults are Envoy's and Istio's (see
REFERENCE.md), each a named constant with its source.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Collection, Hashable

# -- what happened to one attempt --------------------------------------------------------------

#: Response flags that mean the request never got an answer from the upstream.
CONNECT_FAILURE, RESET, TIMEOUT = "UF", "UC", "UT"


@dataclass(frozen=True)
class Outcome:
    status: int | None  # HTTP status received, None when there was no response
    flag: str = "-"  # Envoy response flag for a local failure (UF, UC, UT, ...)
    grpc_status: int | None = None  # from grpc-status, for gRPC

    @property
    def gateway_error(self) -> bool:
        return self.status in (502, 503, 504) or self.flag in (CONNECT_FAILURE, RESET, TIMEOUT)


# -- retries -----------------------------------------------------------------------------------

#: Istio's default retry conditions ("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes").
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"})
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-status-codes",
                      "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
_GRPC = {"cancelled": 1, "deadline-exceeded": 4, "internal": 13, "resource-exhausted": 8, "unavailable": 14}
#: Envoy: 25 ms base interval, at most 10x that, fully jittered.
BACKOFF_BASE_S = 0.025
#: Istio: 2 retries.
DEFAULT_ATTEMPTS = 2


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS  # retries after the first try
    per_try_timeout_s: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float | None = None  # default 10x base

    def retriable(self, o: Outcome) -> bool:
        on = self.retry_on
        if o.flag == CONNECT_FAILURE and (on & {"connect-failure", "5xx", "gateway-error"}):
            return True
        if o.flag in (RESET, TIMEOUT) and o.status is None and (on & {"reset", "5xx", "gateway-error"}):
            return True
        if o.status is not None:
            if "5xx" in on and o.status >= 500:
                return True
            if "gateway-error" in on and o.status in (502, 503, 504):
                return True
            if "retriable-status-codes" in on and o.status in self.retriable_status_codes:
                return True
        if o.grpc_status is not None:
            return any(name in on and code == o.grpc_status for name, code in _GRPC.items())
        return False

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform over [0, min(max, base * 2**(retry-1))] for the *retry*-th retry (1-based)."""
        cap = self.backoff_max_s if self.backoff_max_s is not None else 10 * self.backoff_base_s
        return (rng or random).uniform(0, min(cap, self.backoff_base_s * 2 ** max(0, retry - 1)))


class RetryBudget:
    """Envoy's retry budget: retries in flight stay below ``percent`` of the requests in flight (but
    ``min_concurrency`` are always allowed), so a failing upstream cannot be stormed by retries."""

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.percent, self.min_concurrency = percent, min_concurrency
        self.active_requests = 0
        self.active_retries = 0
        self.denied = 0

    def try_retry(self) -> bool:
        allowed = max(self.min_concurrency, int(self.active_requests * self.percent / 100))
        if self.active_retries >= allowed:
            self.denied += 1
            return False
        self.active_retries += 1
        return True

    def retry_done(self) -> None:
        self.active_retries -= 1


# -- circuit breaking --------------------------------------------------------------------------

#: Envoy's defaults per upstream cluster.
DEFAULT_MAX_CONNECTIONS = DEFAULT_MAX_PENDING = DEFAULT_MAX_REQUESTS = 1024


@dataclass(frozen=True)
class Limits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_requests: int = DEFAULT_MAX_PENDING
    max_requests: int = DEFAULT_MAX_REQUESTS


class CircuitBreaker:
    """Counts what is open against a service's limits; a request past a limit is refused at once
    (503, flag UO) instead of queueing behind a saturated upstream."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.requests = self.pending = self.connections = 0
        self.overflows = 0

    def try_request(self) -> bool:
        if self.requests >= self.limits.max_requests:
            self.overflows += 1
            return False
        self.requests += 1
        return True

    def request_done(self) -> None:
        self.requests -= 1

    def try_pending(self) -> bool:
        if self.pending >= self.limits.max_pending_requests:
            self.overflows += 1
            return False
        self.pending += 1
        return True

    def pending_done(self) -> None:
        self.pending -= 1

    def can_connect(self) -> bool:
        return self.connections < self.limits.max_connections


# -- outlier detection -------------------------------------------------------------------------

@dataclass(frozen=True)
class OutlierPolicy:
    """Istio/Envoy defaults: 5 consecutive 5xx eject for 30 s x (times ejected), at most 10 % of a
    service's endpoints at once (but always at least one)."""

    consecutive_5xx: int | None = 5
    consecutive_gateway_errors: int | None = None
    base_ejection_s: float = 30.0
    max_ejection_percent: float = 10.0
    max_ejection_s: float = 300.0


@dataclass
class _State:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float = 0.0
    times_ejected: int = 0


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy = OutlierPolicy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.clock = policy, clock
        self._state: dict[Hashable, _State] = {}
        self.ejections = 0

    def _s(self, ep: Hashable) -> _State:
        s = self._state.get(ep)
        if s is None:
            s = self._state[ep] = _State()
        return s

    def is_ejected(self, ep: Hashable) -> bool:
        s = self._state.get(ep)
        return s is not None and s.ejected_until > self.clock()

    def record(self, ep: Hashable, o: Outcome, group: list[Hashable]) -> bool:
        """Count *o* for endpoint *ep* of *group* (the service's endpoints); True if it was ejected now."""
        s = self._s(ep)
        failed_5xx = (o.status is not None and o.status >= 500) or o.flag in (CONNECT_FAILURE, RESET, TIMEOUT)
        s.consecutive_5xx = s.consecutive_5xx + 1 if failed_5xx else 0
        s.consecutive_gateway = s.consecutive_gateway + 1 if o.gateway_error else 0
        p = self.policy
        tripped = (p.consecutive_5xx is not None and s.consecutive_5xx >= p.consecutive_5xx) or (
            p.consecutive_gateway_errors is not None and s.consecutive_gateway >= p.consecutive_gateway_errors)
        if not tripped or self.is_ejected(ep):
            return False
        now = self.clock()
        ejected = sum(1 for e in group if e != ep and self.is_ejected(e))
        if ejected >= max(1, int(len(group) * p.max_ejection_percent / 100)):
            return False  # never eject past the limit: some capacity beats none
        s.times_ejected += 1
        s.ejected_until = now + min(p.base_ejection_s * s.times_ejected, max(p.max_ejection_s, p.base_ejection_s))
        s.consecutive_5xx = s.consecutive_gateway = 0
        self.ejections += 1
        return True

    def carry_over(self, old: "OutlierDetector", group: Collection[Hashable]) -> None:
        """Take over what *old* (the previous config's detector of the same service) knew of the
        endpoints still in *group*: a config or endpoint change must not return an ejected endpoint
        early, nor forget its ejection count or its run of failures."""
        for ep in group:
            s = old._state.get(ep)
            if s is not None:
                self._state[ep] = _State(s.consecutive_5xx, s.consecutive_gateway, s.ejected_until, s.times_ejected)
        self.ejections += old.ejections

    def healthy(self, group: list[Hashable]) -> list[Hashable]:
        """The endpoints not ejected; all of them if every one is (panic routing, as Envoy does)."""
        live = [e for e in group if not self.is_ejected(e)]
        return live or list(group)


# -- load balancing ----------------------------------------------------------------------------

class Balancer:
    """Picks one endpoint of a non-empty list. ``load(ep)`` gives requests in flight per endpoint."""

    def __init__(self, kind: str = "round_robin", rng: random.Random | None = None) -> None:
        if kind not in ("round_robin", "random", "least_request", "consistent_hash"):
            raise ValueError(f"unknown load balancer {kind!r}")
        self.kind = kind
        self.rng = rng or random.Random()
        self._next: dict[tuple, int] = {}
        self._rings: dict[tuple, tuple[list[int], list[Hashable]]] = {}

    def pick(self, endpoints: list[Hashable], load: Callable[[Hashable], int] = lambda e: 0, key: str | None = None):
        if len(endpoints) == 1:
            return endpoints[0]
        if self.kind == "random":
            return self.rng.choice(endpoints)
        if self.kind == "least_request":
            # two random choices (Envoy's default choice_count): near-best balance at O(1)
            a, b = self.rng.sample(endpoints, 2)
            return a if load(a) <= load(b) else b
        if self.kind == "consistent_hash" and key is not None:
            return self._ring_pick(endpoints, key)
        ident = tuple(endpoints)
        i = self._next.get(ident, 0)
        self._next[ident] = (i + 1) % len(endpoints)
        if len(self._next) > 1024:  # endpoint sets come and go with config: do not keep them all
            self._next.clear()
        return endpoints[i % len(endpoints)]

    #: Virtual nodes per endpoint on the hash ring: spreads keys within a few percent.
    RING_REPLICAS = 160

    def _ring_pick(self, endpoints: list[Hashable], key: str):
        import bisect
        import hashlib

        ident = tuple(endpoints)
        ring = self._rings.get(ident)
        if ring is None:
            points = sorted((int.from_bytes(hashlib.blake2b(f"{e}#{i}".encode(), digest_size=8).digest(), "big"), n)
                            for n, e in enumerate(endpoints) for i in range(self.RING_REPLICAS))
            ring = ([p for p, _ in points], [endpoints[n] for _, n in points])
            if len(self._rings) > 64:
                self._rings.clear()
            self._rings[ident] = ring
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        i = bisect.bisect(ring[0], h) % len(ring[0])
        return ring[1][i]
