"""Where an outbound request goes: service from the request, version by route weights, endpoint
by round robin within that version. Plain objects, no sockets; the driver asks, then connects.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from tracemesh.proxy._config import Endpoint, MeshConfig


class NoRoute(Exception):
    """The request names no service this sidecar knows (Envoy's response flag NR)."""


class NoHealthyUpstream(Exception):
    """The service is known but has no endpoint to send to (Envoy's UH)."""


@dataclass(frozen=True)
class Pick:
    service: str
    endpoint: Endpoint


def service_from_authority(authority: str) -> str:
    """``catalog``, ``catalog:80``, ``catalog.default.svc.cluster.local`` -> ``catalog``."""
    host = authority.strip().lower()
    if host.startswith("["):
        return host  # an IPv6 literal never names a service
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.split(".", 1)[0] if not host.replace(".", "").isdigit() else host


class Router:
    def __init__(self, config: MeshConfig, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.update(config)

    def update(self, config: MeshConfig) -> None:
        self.config = config
        self._rr: dict[tuple[str, str | None], itertools.cycle] = {}
        for svc in config.services.values():
            by_version: dict[str, list[Endpoint]] = {}
            for ep in svc.endpoints:
                by_version.setdefault(ep.version, []).append(ep)
            for version, eps in by_version.items():
                self._rr[(svc.name, version)] = itertools.cycle(eps)
            if svc.endpoints:
                self._rr[(svc.name, None)] = itertools.cycle(svc.endpoints)

    def pick(self, authority: str) -> Pick:
        """Choose an endpoint for a request to *authority*; raise NoRoute or NoHealthyUpstream."""
        service = service_from_authority(authority)
        svc = self.config.services.get(service)
        if svc is None:
            raise NoRoute(f"no service {service!r} in the mesh config")
        route = self.config.routes.get(service)
        version = None
        if route is not None:
            dests = [d for d in route.destinations if d.weight > 0]
            version = self._rng.choices([d.version for d in dests], weights=[d.weight for d in dests])[0]
        cycle = self._rr.get((service, version))
        if cycle is None:
            raise NoHealthyUpstream(f"service {service!r} has no endpoints" + (f" of version {version!r}" if version else ""))
        return Pick(service, next(cycle))

    def endpoints(self, service: str) -> tuple[Endpoint, ...]:
        svc = self.config.services.get(service)
        return svc.endpoints if svc else ()


