"""Where an outbound request goes: service from the request, route by match (the first that takes
the request), version by the route's weights, endpoint by the service's balancer among the
endpoints of that version that outlier detection has not ejected. Plain objects, no sockets; the
driver asks, then connects, and reports how each attempt went.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from tracemesh.proxy._config import Endpoint, MeshConfig, Route, Service
from tracemesh.proxy._match import any_matches
from tracemesh.proxy._resilience import (
    Balancer, CircuitBreaker, Limits, OutlierDetector, Outcome, RetryBudget,
)


class NoRoute(Exception):
    """The request names no service this sidecar knows (Envoy's response flag NR)."""


class NoHealthyUpstream(Exception):
    """The service is known but has no endpoint to send to (Envoy's UH)."""


@dataclass(frozen=True)
class Pick:
    service: str
    endpoint: Endpoint
    route: Route | None = None


def service_from_authority(authority: str) -> str:
    """``catalog``, ``catalog:80``, ``catalog.default.svc.cluster.local`` -> ``catalog``."""
    host = authority.strip().lower()
    if host.startswith("["):
        return host  # an IPv6 literal never names a service
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.split(".", 1)[0] if not host.replace(".", "").isdigit() else host


class ServiceState:
    """What a sidecar keeps about one destination service, for one config: its balancer, circuit
    breaker, outlier detector, retry budget and requests in flight per endpoint. The data path holds
    on to the object it started a request with, so a config reload never unbalances its counts."""

    def __init__(self, svc: Service, rng: random.Random) -> None:
        tp = svc.traffic_policy
        self.service = svc
        self.balancer = Balancer(tp.load_balancer, rng)
        self.hash_header = tp.hash_header
        self.limits = tp.limits  # None: Envoy's defaults, which nothing here reaches
        self.breaker = CircuitBreaker(tp.limits or Limits())
        self.outliers = OutlierDetector(tp.outlier) if tp.outlier is not None else None
        self.budget = RetryBudget()
        self.in_flight: dict[Endpoint, int] = {}
        self.by_version: dict[str | None, list[Endpoint]] = {None: list(svc.endpoints)}
        for ep in svc.endpoints:
            self.by_version.setdefault(ep.version, []).append(ep)

    def started(self, ep: Endpoint) -> None:
        self.in_flight[ep] = self.in_flight.get(ep, 0) + 1

    def finished(self, ep: Endpoint, outcome: Outcome | None) -> None:
        """One attempt at *ep* ended; *outcome* None when it says nothing of the endpoint's health."""
        left = self.in_flight.get(ep, 1) - 1
        if left > 0:
            self.in_flight[ep] = left
        else:
            self.in_flight.pop(ep, None)
        if outcome is not None and self.outliers is not None:
            self.outliers.record(ep, outcome, self.by_version[None])


@dataclass(frozen=True)
class Selection:
    """The route a request takes and the version it goes to (chosen once; retries keep them)."""

    service: str
    route: Route | None
    version: str | None
    state: ServiceState


class Router:
    def __init__(self, config: MeshConfig, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.update(config)

    def update(self, config: MeshConfig) -> None:
        old = getattr(self, "_states", {})
        states = {name: ServiceState(svc, self._rng) for name, svc in config.services.items()}
        for name, state in states.items():  # ejections outlive config and endpoint changes
            before = old.get(name)
            if state.outliers is not None and before is not None and before.outliers is not None:
                state.outliers.carry_over(before.outliers, state.service.endpoints)
        self.config = config
        self._states = states

    def select(self, authority: str, method: str = "GET", path: str = "/",
               header: Callable[[str], str | None] = lambda name: None,
               query: Mapping[str, str] | None = None) -> Selection:
        """The service, route (the first whose match takes the request) and weighted version."""
        service = service_from_authority(authority)
        state = self._states.get(service)
        if state is None:
            raise NoRoute(f"no service {service!r} in the mesh config")
        routes = self.config.routes.get(service, ())
        route = None
        if routes:
            q = query or {}
            route = next((r for r in routes if any_matches(r.matches, method, path, header, q)), None)
            if route is None:
                raise NoRoute(f"no route of service {service!r} matches {method} {path}")
        version = None
        if route is not None:
            dests = [d for d in route.destinations if d.weight > 0]
            version = dests[0].version if len(dests) == 1 else \
                self._rng.choices([d.version for d in dests], weights=[d.weight for d in dests])[0]
        return Selection(service, route, version, state)

    def subset(self, service: str, version: str | None = None) -> Selection:
        """The endpoints of *service* (of *version* only, when given) without its routes: where a
        mirrored copy or an opaque TCP connection goes. NoRoute for an unknown service."""
        state = self._states.get(service)
        if state is None:
            raise NoRoute(f"no service {service!r} in the mesh config")
        return Selection(service, None, version, state)

    def endpoint(self, sel: Selection, exclude: Collection[Endpoint] = (), key: str | None = None) -> Endpoint:
        """An endpoint of the selected version: not ejected (unless all are), not in *exclude*
        (the endpoints already tried, unless no other is left), by the service's balancer."""
        state = sel.state
        eps = state.by_version.get(sel.version) or []
        if not eps:
            raise NoHealthyUpstream(f"service {sel.service!r} has no endpoints"
                                    + (f" of version {sel.version!r}" if sel.version else ""))
        live = state.outliers.healthy(eps) if state.outliers is not None else eps
        if exclude:
            live = [e for e in live if e not in exclude] or live
        return state.balancer.pick(live, lambda e: state.in_flight.get(e, 0), key)

    def pick(self, authority: str, method: str = "GET", path: str = "/",
             header: Callable[[str], str | None] = lambda name: None, query: Mapping[str, str] | None = None) -> Pick:
        """Choose an endpoint for a request to *authority*; raise NoRoute or NoHealthyUpstream."""
        sel = self.select(authority, method, path, header, query)
        key = header(sel.state.hash_header) if sel.state.hash_header else None
        return Pick(sel.service, self.endpoint(sel, key=key), sel.route)

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        svc = self.config.services.get(service)
        return svc.endpoints if svc else ()
