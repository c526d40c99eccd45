"""The mesh config a sidecar routes by: services, their endpoints, weighted routes, how each service
takes mTLS, and who may call what (authorization policies).

Loaded from YAML (JSON is YAML too) into frozen objects. Unknown keys, wrong types and impossible
values are errors that name the file, the line and the field, e.g.
``mesh.yaml:12: routes[0].destinations[1].weight: expected a non-negative integer, got 'ten'``.

Shape::

    services:
      catalog:
        endpoints:
          - {address: 127.0.0.1:9001, version: v1}
          - {address: 127.0.0.1:9002, version: v2}
    routes:
      - service: catalog
        destinations:
          - {version: v1, weight: 80}
          - {version: v2, weight: 20}

Routes: several per service, the first whose ``match`` takes a request wins (none: every request);
each may have ``name``, ``match`` (a list of alternatives of path/method(s)/headers/query string
matches), ``timeout``, ``retries``, ``fault`` and ``mirror`` (``{service, version, percent}``).
Per service, ``traffic_policy``: load_balancer, connection_pool, outlier_detection. Durations are strings: ``250ms``, ``2s``, ``1m``. See the
README's "Mesh config".

Per service, optionally: ``mtls: strict|permissive|disable`` (how its sidecars take connections,
so whether callers must, may or must not use mesh mTLS; default permissive) and ``identity:
spiffe://<td>/ns/<ns>/sa/<sa>`` (the SPIFFE ID its sidecars hold: callers then accept exactly
that peer, and an inbound sidecar names a caller with that identity by this service).

Authorization policies (Istio's semantics, see :mod:`tracemesh.proxy._authz`)::

    policies:
      - name: catalog-readers
        service: catalog             # the service that enforces it
        action: ALLOW                # ALLOW, DENY or AUDIT
        rules:
          - from: {principals: [spiffe://cluster.local/ns/shop/sa/frontend], not_namespaces: [test]}
            to: {methods: [GET, HEAD], paths: [/items/*, /health], ports: [9001]}

``from`` and ``to`` take one mapping or a list of them (alternatives). ``from`` keys:
principals, not_principals, namespaces, not_namespaces; ``to`` keys: methods, not_methods,
paths, not_paths, ports, not_ports.

A file may hold several YAML documents (``---``), each a fragment with any of the sections
(services, routes, policies, canaries); they merge, and a service, policy or canary named in two
places is an error naming both. Per service also ``ports: [{port, protocol: http|http2|grpc|tcp,
name}]`` and ``versions: [v1, v2]`` (its subsets: a route or canary may name these or its
endpoints' versions). ``canaries``: progressive rollouts (name, service, baseline, canary, steps,
interval, analysis_window, thresholds), validated and stored for the canary judge. The control
plane (:func:`compose_config`, ``strict``) also merges files over the current config, makes static
endpoints optional and wants route weights that add up to 100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tracemesh.identity import SpiffeId, SpiffeIdError
from tracemesh.net import Addr, parse_addr
from tracemesh.proxy._authz import ACTIONS, Operation, Policy, Rule, Source, valid_pattern
from tracemesh.proxy._match import MatchError, RequestMatch, StringMatch
from tracemesh.proxy._resilience import DEFAULT_RETRY_ON, RETRY_ON, Limits, OutlierPolicy, RetryPolicy

#: Service names are DNS labels (as Kubernetes service names are): they are also Host headers.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: A version label is a Kubernetes label value.
_VERSION = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: How a service's sidecars take connections (Istio's PeerAuthentication modes).
MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE = "strict", "permissive", "disable"
MTLS_MODES = (MTLS_STRICT, MTLS_PERMISSIVE, MTLS_DISABLE)
#: Istio's default: sidecars take mTLS and plaintext, so a mesh can be migrated service by service.
DEFAULT_MTLS = MTLS_PERMISSIVE
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$|^\*$")


class ConfigError(ValueError):
    """The config is wrong; the message names where (file:line: field) and what."""


@dataclass(frozen=True)
class Endpoint:
    address: Addr
    version: str


LOAD_BALANCERS = ("round_robin", "random", "least_request", "consistent_hash")


@dataclass(frozen=True)
class TrafficPolicy:
    """Istio's DestinationRule trafficPolicy for one service; ``None`` parts are off (Envoy's defaults)."""

    load_balancer: str = "round_robin"
    hash_header: str | None = None  # consistent_hash: the request header whose value is hashed
    limits: Limits | None = None
    outlier: OutlierPolicy | None = None


#: What a service port speaks (Istio's protocol selection, explicit).
PROTOCOLS = ("http", "http2", "grpc", "tcp")


@dataclass(frozen=True)
class Port:
    port: int
    protocol: str
    name: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    endpoints: tuple[Endpoint, ...]  # static ones; the control plane's registry adds the rest at runtime
    mtls: str = DEFAULT_MTLS
    identity: SpiffeId | None = None
    traffic_policy: TrafficPolicy = TrafficPolicy()
    ports: tuple[Port, ...] = ()
    versions: tuple[str, ...] = ()  # declared subsets; a route may name these or its endpoints' versions

    def known_versions(self) -> set[str]:
        return set(self.versions) | {e.version for e in self.endpoints}


@dataclass(frozen=True)
class Destination:
    version: str
    weight: int


@dataclass(frozen=True)
class Fault:
    delay_percent: float = 0.0
    delay_s: float = 0.0
    abort_percent: float = 0.0
    abort_status: int = 0  # HTTP; for a grpc_status-only abort, the status gRPC maps to (GRPC_TO_HTTP)
    abort_grpc_status: int | None = None  # Istio's grpcStatus: gRPC calls get it as a trailers-only answer


#: gRPC status codes by name (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
GRPC_STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                     "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                     "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                     "UNAUTHENTICATED")
#: The HTTP status of each gRPC status (google.rpc.Code's mapping, as Envoy's grpcToHttpStatus):
#: what an HTTP/1.1 request gets from an abort that names only a grpc_status.
GRPC_TO_HTTP = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)


@dataclass(frozen=True)
class Mirror:
    """Istio's mirror + mirrorPercentage: a copy of *percent* of a route's requests goes to *service*
    (its *version* only, when given), fire-and-forget; the answer is discarded."""

    service: str
    version: str | None = None
    percent: float = 100.0  # Istio's default when mirrorPercentage is left out


@dataclass(frozen=True)
class Route:
    service: str
    destinations: tuple[Destination, ...]
    name: str = ""
    matches: tuple[RequestMatch, ...] = ()  # none: every request
    timeout_s: float | None = None  # None: the sidecar's default route timeout
    retries: RetryPolicy | None = None  # None: no retries
    fault: Fault | None = None
    mirror: Mirror | None = None  # None: not mirrored


@dataclass(frozen=True)
class Canary:
    """A progressive rollout of one service's *canary* version beside its *baseline*: validated,
    stored and distributed now; the canary judge acts on it."""

    name: str
    service: str
    baseline: str
    canary: str
    steps: tuple[int, ...]  # the canary's weight at each step, percent, increasing, ending at 100
    interval_s: float  # time at each step
    analysis_window_s: float  # the spans judged at each step: the last this many seconds
    max_error_percent: float | None  # None: not judged by errors
    max_p99_latency_ratio: float | None  # canary p99 / baseline p99; None: not judged by latency
    min_requests: int  # fewer canary requests than this in the window: no verdict yet


#: Fewer requests than this in an analysis window say too little about an error rate to act on.
DEFAULT_CANARY_MIN_REQUESTS = 100


@dataclass(frozen=True)
class MeshConfig:
    services: dict[str, Service]
    routes: dict[str, tuple[Route, ...]]  # per service, in config order: the first that matches wins
    policies: tuple[Policy, ...] = ()
    canaries: tuple[Canary, ...] = ()

    @classmethod
    def empty(cls) -> "MeshConfig":
        return cls({}, {})

    def service_of(self, identity: SpiffeId | str | None) -> str | None:
        """The service whose configured identity is ``identity``, if exactly one has it."""
        if identity is None:
            return None
        text = str(identity)
        names = [s.name for s in self.services.values() if s.identity is not None and str(s.identity) == text]
        return names[0] if len(names) == 1 else None


# -- YAML with line numbers ------------------------------------------------------------------

class _Node:
    """A parsed value with the line it came from (1-based)."""

    __slots__ = ("value", "line", "source")

    def __init__(self, value, line: int, source: str | None = None) -> None:
        self.value, self.line, self.source = value, line, source  # source: set when documents of several files meet


class _LineLoader(yaml.SafeLoader):
    pass


def _construct(loader, node):
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out = {}
        for k_node, v_node in node.value:
            key = loader.construct_object(k_node, deep=True)
            key = key.value if isinstance(key, _Node) else key
            if isinstance(key, (dict, list)):  # unhashable; and no config key is a collection
                raise ConfigError(f"{k_node.start_mark.line + 1}: a key must be a plain value, not {_kind(key)}")
            if key in out:
                raise ConfigError(f"{k_node.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = loader.construct_object(v_node, deep=True)
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([loader.construct_object(n, deep=True) for n in node.value], line)
    raise ConfigError(f"{line}: unexpected YAML node {node.tag}")


for _tag in ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"):
    _LineLoader.add_constructor(_tag, _construct)


def _scalar(loader, node):
    # a plain scalar built by the stock constructors (avoids recursing into _construct)
    return yaml.SafeLoader.yaml_constructors[node.tag](loader, node)


def _leaf(loader, node):
    try:
        value = _scalar(loader, node)
    except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError):  # `2020-99-99`, `!!int ten`, `!!int`
        raise ConfigError(f"{node.start_mark.line + 1}: {node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}") from None
    return _Node(value, node.start_mark.line + 1)


def _reject(loader, node):
    raise ConfigError(f"{node.start_mark.line + 1}: unexpected YAML node {node.tag}")


# SafeLoader builds these as bytes, sets and pair lists, which carry no line and mean nothing here
for _tag in ("tag:yaml.org,2002:binary", "tag:yaml.org,2002:set", "tag:yaml.org,2002:omap", "tag:yaml.org,2002:pairs"):
    _LineLoader.add_constructor(_tag, _reject)

for _tag in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
             "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:timestamp"):
    _LineLoader.add_constructor(_tag, _leaf)


class _Ctx:
    def __init__(self, source: str, strict: bool = False) -> None:
        self.source = source
        self.strict = strict  # the control plane's rules (see parse_config)

    def fail(self, node: _Node | None, field: str, msg: str) -> ConfigError:
        line = f":{node.line}" if node is not None else ""
        source = node.source if node is not None and node.source else self.source
        return ConfigError(f"{source}{line}: {field}: {msg}" if field else f"{source}{line}: {msg}")

    def mapping(self, node: _Node, field: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(node.value, dict):
            raise self.fail(node, field, f"expected a mapping, got {_kind(node.value)}")
        for k, v in node.value.items():
            if k not in allowed:
                raise self.fail(v, f"{field}.{k}" if field else str(k),
                                f"unknown key; expected one of {', '.join(sorted(allowed))}")
        for k in sorted(required - node.value.keys()):
            raise self.fail(node, field or "(top level)", f"missing required key {k!r}")
        return node.value

    def seq(self, node: _Node, field: str) -> list[_Node]:
        if not isinstance(node.value, list):
            raise self.fail(node, field, f"expected a list, got {_kind(node.value)}")
        return node.value

    def string(self, node: _Node, field: str, pattern: re.Pattern | None = None, what: str = "") -> str:
        if not isinstance(node.value, str) or not node.value:
            raise self.fail(node, field, f"expected a non-empty string, got {_kind(node.value)}")
        if pattern is not None and not pattern.match(node.value):
            raise self.fail(node, field, f"{node.value!r} is not a valid {what}")
        return node.value


def _kind(v) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"{str(v).lower()}"
    if isinstance(v, (dict, list)):
        return "a mapping" if isinstance(v, dict) else "a list"
    return repr(v)


#: Top-level sections of a document.
SECTIONS = ("services", "routes", "policies", "canaries")
#: Nodes in one document once YAML anchors are expanded: a few kilobytes of aliases must not make
#: a gigabyte of objects (billion laughs); a real mesh config of 4 MiB has a few hundred thousand.
MAX_CONFIG_NODES = 1_000_000


def parse_config(text: str, source: str = "<config>", *, strict: bool = False) -> MeshConfig:
    """Parse and validate *text*; raise ConfigError naming *source*, the line and the field.

    *text* may hold several YAML documents (``---``); they merge into one config, and a service,
    policy or canary defined in two of them is an error naming both places. ``strict`` adds the
    control plane's rules (``tracemesh validate``/``apply``): static endpoints are optional (the
    endpoint registry supplies them), a route's weights add up to 100 (only a lone destination may
    leave its weight out), and an empty text is an error."""
    return compose_config([(source, text)], strict=strict)[0]


def compose_config(files, base: tuple[str, str] | None = None, *, strict: bool = True) -> tuple[MeshConfig, dict]:
    """Merge the documents of *files* (``(source, text)`` pairs) over *base* (the same, or None)
    object by object, validate the result as a whole, and return it with its plain data.

    The merge: services, policies and canaries replace those of *base* by name, and the routes of
    a service named by a route of *files* replace all of that service's routes in *base*. The plain
    data is JSON-able and in the shape :func:`parse_config` takes (every service has
    ``endpoints``), so ``parse_config(json.dumps(data))`` gives the same config. Errors name the
    source and line of the object at fault, in *base* too."""
    merged = _Fragment()
    if base is not None:
        for doc in _documents(*base):
            merged.add(doc)
    given = _Fragment()
    found = 0
    for source, text in files:
        for doc in _documents(source, text):
            given.add(doc)
            found += 1
    if strict and files and not found:  # an empty file is more likely a mistake than a wish to change nothing
        raise ConfigError(f"{files[0][0]}: no YAML documents; nothing to validate or apply")
    merged.overlay(given)
    ctx = _Ctx(files[0][0] if files else base[0] if base else "<config>", strict)
    return _build(ctx, merged), merged.plain()


def _documents(source: str, text: str) -> list[_Node]:
    """The non-empty documents of *text*, each a top-level mapping whose nodes know *source*."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters is more than the limit of {MAX_CONFIG_BYTES}")
    ctx = _Ctx(source)
    try:
        roots = list(yaml.load_all(text, Loader=_LineLoader))
    except ConfigError as exc:
        raise ConfigError(f"{source}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    docs = []
    for root in roots:
        if root is None or root.value is None:
            continue
        _stamp(root, source)
        ctx.mapping(root, "", set(SECTIONS))
        docs.append(root)
    return docs


def _stamp(root: _Node, source: str) -> None:
    """Set every node's source, counting nodes as anchors expand them (bounded)."""
    stack, count = [root], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}:{root.line}: more than {MAX_CONFIG_NODES} values once anchors are expanded")
        if isinstance(node, _Node):
            node.source = source
            v = node.value
            if isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)


class _Fragment:
    """The objects of some documents, by kind, each with the node and field it came from."""

    def __init__(self) -> None:
        self.services: dict = {}  # name -> body node
        self.routes: list[tuple[object, _Node, str]] = []  # (service name as written, node, field)
        self.named: dict[str, dict] = {"policies": {}, "canaries": {}}  # kind -> name -> (node, field)
        self.unnamed: dict[str, list] = {"policies": [], "canaries": []}  # no usable name: the build says why

    def add(self, root: _Node) -> None:
        ctx = _Ctx(root.source or "<config>")
        top = root.value
        if "services" in top and top["services"].value is not None:
            svc_node = top["services"]
            ctx.mapping(svc_node, "services", set(svc_node.value) if isinstance(svc_node.value, dict) else set())
            for name, body in svc_node.value.items():
                if name in self.services:
                    first = self.services[name]
                    raise ctx.fail(body, f"services.{name}", f"service {name!r} is defined twice; "
                                                            f"the first is at {first.source}:{first.line}")
                self.services[name] = body
        if "routes" in top and top["routes"].value is not None:
            for i, r in enumerate(ctx.seq(top["routes"], "routes")):
                svc = r.value.get("service") if isinstance(r.value, dict) else None
                svc = svc.value if svc is not None and isinstance(svc.value, str) else None
                self.routes.append((svc, r, f"routes[{i}]"))
        for kind in ("policies", "canaries"):
            if kind not in top or top[kind].value is None:
                continue
            named = self.named[kind]
            for i, node in enumerate(ctx.seq(top[kind], kind)):
                field = f"{kind}[{i}]"
                name_node = node.value.get("name") if isinstance(node.value, dict) else None
                name = name_node.value if name_node is not None else None
                if not isinstance(name, str):
                    self.unnamed[kind].append((node, field))
                    continue
                if name in named:
                    first = named[name][0]
                    raise ctx.fail(name_node, f"{field}.name", f"a second {kind[:-3] + 'y'} named {name!r} "
                                                                f"(the first is at {first.source}:{first.line})")
                named[name] = (node, field)

    def overlay(self, other: "_Fragment") -> None:
        """Object-level merge: *other*'s objects replace these by name (routes: per service)."""
        self.services.update(other.services)
        replaced = {svc for svc, _, _ in other.routes}
        self.routes = [r for r in self.routes if r[0] not in replaced] + other.routes
        for kind in ("policies", "canaries"):
            self.named[kind].update(other.named[kind])
            self.unnamed[kind] += other.unnamed[kind]

    def items(self, kind: str) -> list[tuple[_Node, str]]:
        return list(self.named[kind].values()) + self.unnamed[kind]

    def plain(self) -> dict:
        services = {}
        for name, body in self.services.items():
            data = _plain(body)
            if isinstance(data, dict):
                data.setdefault("endpoints", [])
            services[name] = data
        return {"services": services, "routes": [_plain(n) for _, n, _ in self.routes],
                "policies": [_plain(n) for n, _ in self.items("policies")],
                "canaries": [_plain(n) for n, _ in self.items("canaries")]}


def _plain(node):
    v = node.value if isinstance(node, _Node) else node
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if hasattr(v, "isoformat"):  # dates validate nowhere; kept JSON-able all the same
        return v.isoformat()
    return v


def _build(ctx: _Ctx, frag: _Fragment) -> MeshConfig:
    services: dict[str, Service] = {}
    for name, body in frag.services.items():
        field = f"services.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ctx.fail(body, field, f"{name!r} is not a valid service name (lowercase DNS label)")
        m = ctx.mapping(body, field, {"endpoints", "mtls", "identity", "traffic_policy", "ports", "versions"},
                        set() if ctx.strict else {"endpoints"})
        eps = []
        seen = set()
        for i, ep in enumerate(ctx.seq(m["endpoints"], f"{field}.endpoints") if "endpoints" in m else ()):
            ef = f"{field}.endpoints[{i}]"
            e = ctx.mapping(ep, ef, {"address", "version"}, {"address"})
            addr_text = ctx.string(e["address"], f"{ef}.address")
            try:
                addr = parse_addr(addr_text)
            except ValueError as exc:
                raise ctx.fail(e["address"], f"{ef}.address", str(exc)) from None
            if addr.port == 0:
                raise ctx.fail(e["address"], f"{ef}.address", "port 0 is not an address to connect to")
            version = ctx.string(e["version"], f"{ef}.version", _VERSION, "version label") if "version" in e else "v1"
            if addr in seen:
                raise ctx.fail(ep, ef, f"endpoint {addr_text} is listed twice")
            seen.add(addr)
            eps.append(Endpoint(addr, version))
        mtls = DEFAULT_MTLS
        if "mtls" in m:
            mtls = ctx.string(m["mtls"], f"{field}.mtls").lower()
            if mtls not in MTLS_MODES:
                raise ctx.fail(m["mtls"], f"{field}.mtls",
                               f"{m['mtls'].value!r} is not an mTLS mode; expected one of {', '.join(MTLS_MODES)}")
        identity = None
        if "identity" in m:
            identity = _spiffe_id(ctx, m["identity"], f"{field}.identity")
        tp = TrafficPolicy()
        if "traffic_policy" in m and m["traffic_policy"].value is not None:
            tp = _traffic_policy(ctx, m["traffic_policy"], f"{field}.traffic_policy")
        ports = _ports(ctx, m["ports"], f"{field}.ports") if "ports" in m else ()
        versions = _versions(ctx, m["versions"], f"{field}.versions") if "versions" in m else ()
        services[name] = Service(name, tuple(eps), mtls, identity, tp, ports, versions)

    routes: dict[str, list[Route]] = {}
    names_seen: set[tuple[str, str]] = set()
    for _, r, rf in frag.routes:
        route = _route(ctx, r, rf, services, routes)
        if (route.service, route.name) in names_seen:
            raise ctx.fail(r.value.get("name", r), f"{rf}.name",
                           f"a second route named {route.name!r} for {route.service!r}")
        names_seen.add((route.service, route.name))
        routes.setdefault(route.service, []).append(route)

    policies: list[Policy] = []
    names: set[str] = set()
    for node, pf in frag.items("policies"):
        policy = _policy(ctx, node, pf, services)
        if policy.name in names:
            raise ctx.fail(node.value["name"], f"{pf}.name", f"a second policy named {policy.name!r}")
        names.add(policy.name)
        policies.append(policy)

    canaries: list[Canary] = []
    by_service: dict[str, tuple[Canary, _Node]] = {}
    for node, cf in frag.items("canaries"):
        canary = _canary(ctx, node, cf, services)
        if canary.name in {c.name for c in canaries}:
            raise ctx.fail(node.value["name"], f"{cf}.name", f"a second canary named {canary.name!r}")
        if canary.service in by_service:
            first, fnode = by_service[canary.service]
            raise ctx.fail(node.value["service"], f"{cf}.service",
                           f"a second canary for {canary.service!r} (the first, {first.name!r}, is at "
                           f"{fnode.source or ctx.source}:{fnode.line}); two rollouts cannot share one service's weights")
        by_service[canary.service] = (canary, node)
        canaries.append(canary)
    return MeshConfig(services, {k: tuple(v) for k, v in routes.items()}, tuple(policies), tuple(canaries))


def _ports(ctx: _Ctx, node: _Node, field: str) -> tuple[Port, ...]:
    out: list[Port] = []
    for i, pn in enumerate(ctx.seq(node, field)):
        pf = f"{field}[{i}]"
        m = ctx.mapping(pn, pf, {"port", "protocol", "name"}, {"port", "protocol"})
        number = _int(ctx, m["port"], f"{pf}.port", 1, 65535)
        protocol = ctx.string(m["protocol"], f"{pf}.protocol").lower()
        if protocol not in PROTOCOLS:
            raise ctx.fail(m["protocol"], f"{pf}.protocol",
                           f"{m['protocol'].value!r} is not a protocol; expected one of {', '.join(PROTOCOLS)}")
        name = ctx.string(m["name"], f"{pf}.name", _NAME, "port name (lowercase DNS label)") if "name" in m else ""
        if any(p.port == number for p in out):
            raise ctx.fail(m["port"], f"{pf}.port", f"port {number} is listed twice")
        if name and any(p.name == name for p in out):
            raise ctx.fail(m["name"], f"{pf}.name", f"a second port named {name!r}")
        out.append(Port(number, protocol, name))
    return tuple(out)


def _versions(ctx: _Ctx, node: _Node, field: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, vn in enumerate(ctx.seq(node, field)):
        v = ctx.string(vn, f"{field}[{i}]", _VERSION, "version label")
        if v in out:
            raise ctx.fail(vn, f"{field}[{i}]", f"version {v!r} is listed twice")
        out.append(v)
    return tuple(out)


def _known_version(ctx: _Ctx, node: _Node, field: str, svc: str, services: dict[str, Service]) -> str:
    """A version label that names a subset of *svc*: one it declares or its endpoints have."""
    version = ctx.string(node, field, _VERSION, "version label")
    s = services[svc]
    if version in s.known_versions():
        return version
    have = sorted({e.version for e in s.endpoints})
    if s.versions:
        raise ctx.fail(node, field, f"service {svc!r} has no version {version!r} (declares {', '.join(s.versions)}"
                                    + (f"; endpoints have {', '.join(have)})" if have else ")"))
    hint = f"; declare it under services.{svc}.versions" if not have else ""
    raise ctx.fail(node, field, f"service {svc!r} has no endpoints of version {version!r} "
                                f"(has {', '.join(have) or 'none'}{hint})")


def _canary(ctx: _Ctx, node: _Node, field: str, services: dict[str, Service]) -> Canary:
    m = ctx.mapping(node, field, {"name", "service", "baseline", "canary", "steps", "interval", "analysis_window",
                                  "thresholds"}, {"name", "service", "baseline", "canary", "steps", "interval",
                                                  "thresholds"})
    name = ctx.string(m["name"], f"{field}.name", _VERSION, "canary name (letters, digits, '.', '_', '-')")
    svc = ctx.string(m["service"], f"{field}.service", _NAME, "service name")
    if svc not in services:
        raise ctx.fail(m["service"], f"{field}.service", f"no service {svc!r} under services")
    baseline = _known_version(ctx, m["baseline"], f"{field}.baseline", svc, services)
    canary = _known_version(ctx, m["canary"], f"{field}.canary", svc, services)
    if canary == baseline:
        raise ctx.fail(m["canary"], f"{field}.canary", f"the canary and the baseline are both {canary!r}")
    steps: list[int] = []
    items = ctx.seq(m["steps"], f"{field}.steps")
    if not items:
        raise ctx.fail(m["steps"], f"{field}.steps", "expected a list of percentages ending at 100, got an empty list")
    for i, sn in enumerate(items):
        step = _int(ctx, sn, f"{field}.steps[{i}]", 1, 100)
        if steps and step <= steps[-1]:
            raise ctx.fail(sn, f"{field}.steps[{i}]", f"{step} after {steps[-1]}: the steps must increase")
        steps.append(step)
    if steps[-1] != 100:
        raise ctx.fail(items[-1], f"{field}.steps[{len(items) - 1}]",
                       f"the last step is {steps[-1]}; a rollout ends with the canary at 100")
    interval = _duration(ctx, m["interval"], f"{field}.interval")
    window = _duration(ctx, m["analysis_window"], f"{field}.analysis_window") if "analysis_window" in m else interval
    tf = f"{field}.thresholds"
    t = ctx.mapping(m["thresholds"], tf, {"max_error_percent", "max_p99_latency_ratio", "min_requests"})
    if "max_error_percent" not in t and "max_p99_latency_ratio" not in t:
        raise ctx.fail(m["thresholds"], tf, "expected max_error_percent, max_p99_latency_ratio or both")
    max_err = _percent(ctx, t["max_error_percent"], f"{tf}.max_error_percent") if "max_error_percent" in t else None
    ratio = None
    if "max_p99_latency_ratio" in t:
        rn = t["max_p99_latency_ratio"]
        ratio = rn.value
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio <= 1000.0:
            raise ctx.fail(rn, f"{tf}.max_p99_latency_ratio",
                           f"expected a ratio of canary p99 to baseline p99 (1-1000, e.g. 1.5), got {_kind(ratio)}")
        ratio = float(ratio)
    min_requests = _int(ctx, t["min_requests"], f"{tf}.min_requests", 0) if "min_requests" in t \
        else DEFAULT_CANARY_MIN_REQUESTS
    return Canary(name, svc, baseline, canary, tuple(steps), interval, window, max_err, ratio, min_requests)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(ctx: _Ctx, node: _Node, field: str, allow_zero: bool = False) -> float:
    v = node.value
    got = _DURATION.match(v.strip()) if isinstance(v, str) else None
    if got is None:
        raise ctx.fail(node, field, f"expected a duration such as '250ms', '2s' or '1m', got {_kind(v)}")
    seconds = float(got.group(1)) * _UNIT_S[got.group(2)]
    if seconds <= 0 and not allow_zero:
        raise ctx.fail(node, field, "a duration of 0 means nothing here; leave the key out")
    return seconds


def _int(ctx: _Ctx, node: _Node, field: str, lo: int, hi: int | None = None) -> int:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        raise ctx.fail(node, field, f"expected an integer ({rng}), got {_kind(v)}")
    return v


def _percent(ctx: _Ctx, node: _Node, field: str) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
        raise ctx.fail(node, field, f"expected a percentage (0-100), got {_kind(v)}")
    return float(v)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _string_match(ctx: _Ctx, node: _Node, field: str, present_ok: bool) -> StringMatch:
    kinds = {"exact", "prefix", "regex"} | ({"present"} if present_ok else set())
    m = ctx.mapping(node, field, kinds)
    if len(m) != 1:
        raise ctx.fail(node, field, f"expected exactly one of {', '.join(sorted(kinds))}")
    (kind, vnode), = m.items()
    if kind == "present":
        if vnode.value is not True:
            raise ctx.fail(vnode, f"{field}.present", f"expected true, got {_kind(vnode.value)}")
        value = ""
    elif kind == "exact" and vnode.value == "":
        value = ""
    else:
        value = ctx.string(vnode, f"{field}.{kind}")
    try:
        return StringMatch.make(kind, value)
    except MatchError as exc:
        raise ctx.fail(vnode, f"{field}.{kind}", str(exc)) from None


def _request_match(ctx: _Ctx, node: _Node, field: str) -> RequestMatch:
    m = ctx.mapping(node, field, {"path", "method", "methods", "headers", "query"})
    path = _string_match(ctx, m["path"], f"{field}.path", False) if "path" in m else None
    methods: list[str] = []
    if "method" in m:
        methods.append(ctx.string(m["method"], f"{field}.method", _METHOD, "HTTP method (upper case, e.g. GET)"))
    if "methods" in m:
        for k, v in enumerate(ctx.seq(m["methods"], f"{field}.methods")):
            methods.append(ctx.string(v, f"{field}.methods[{k}]", _METHOD, "HTTP method (upper case, e.g. GET)"))
    pairs = {}
    for key in ("headers", "query"):
        got = []
        if key in m:
            hm = m[key]
            if not isinstance(hm.value, dict):
                raise ctx.fail(hm, f"{field}.{key}", f"expected a mapping, got {_kind(hm.value)}")
            for name, sm in hm.value.items():
                nf = f"{field}.{key}.{name}"
                if not isinstance(name, str) or not name or (key == "headers" and not _HEADER_NAME.match(name)):
                    raise ctx.fail(sm, nf, f"{name!r} is not a valid {'header' if key == 'headers' else 'parameter'} name")
                got.append((name.lower() if key == "headers" else name, _string_match(ctx, sm, nf, True)))
        pairs[key] = tuple(got)
    return RequestMatch(path, frozenset(methods), pairs["headers"], pairs["query"])


def _route(ctx: _Ctx, node: _Node, rf: str, services: dict[str, Service], earlier: dict[str, list[Route]]) -> Route:
    m = ctx.mapping(node, rf, {"service", "name", "match", "destinations", "timeout", "retries", "fault", "mirror"},
                    {"service", "destinations"})
    svc = ctx.string(m["service"], f"{rf}.service", _NAME, "service name")
    if svc not in services:
        raise ctx.fail(m["service"], f"{rf}.service", f"no service {svc!r} under services")
    before = earlier.get(svc, [])
    if any(not r.matches for r in before):
        raise ctx.fail(m["service"], f"{rf}.service",
                       f"a second route for {svc!r} after one that takes every request: it could never be taken; "
                       f"give the earlier one a match, or merge them into one")
    name = ctx.string(m["name"], f"{rf}.name", _VERSION, "route name (letters, digits, '.', '_', '-')") \
        if "name" in m else (svc if not before else f"{svc}-{len(before)}")
    matches = []
    if "match" in m and m["match"].value is not None:
        items = ctx.seq(m["match"], f"{rf}.match")
        if not items:
            raise ctx.fail(m["match"], f"{rf}.match", "an empty list; leave the key out to take every request")
        matches = [_request_match(ctx, mn, f"{rf}.match[{k}]") for k, mn in enumerate(items)]
    dests = []
    weighed = False  # a weight was written
    dest_nodes = ctx.seq(m["destinations"], f"{rf}.destinations")
    for j, d in enumerate(dest_nodes):
        df = f"{rf}.destinations[{j}]"
        dm = ctx.mapping(d, df, {"version", "weight"}, {"version"})
        version = _known_version(ctx, dm["version"], f"{df}.version", svc, services)
        if ctx.strict and "weight" not in dm and len(dest_nodes) > 1:
            raise ctx.fail(d, df, "missing required key 'weight' (with several destinations, each has a weight "
                                  "and they add up to 100)")
        weight = dm["weight"].value if "weight" in dm else 1
        weighed = weighed or "weight" in dm
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ctx.fail(dm.get("weight"), f"{df}.weight", f"expected a non-negative integer, got {_kind(weight)}")
        dests.append(Destination(version, weight))
    if not dests:
        raise ctx.fail(m["destinations"], f"{rf}.destinations", "a route needs at least one destination")
    if sum(d.weight for d in dests) == 0:
        raise ctx.fail(m["destinations"], f"{rf}.destinations", "the weights add up to 0; nothing could be sent")
    if ctx.strict and weighed and sum(d.weight for d in dests) != 100:
        raise ctx.fail(m["destinations"], f"{rf}.destinations",
                       f"the weights add up to {sum(d.weight for d in dests)}; they must add up to 100")
    timeout = _duration(ctx, m["timeout"], f"{rf}.timeout") if "timeout" in m else None
    retries = _retries(ctx, m["retries"], f"{rf}.retries") if "retries" in m else None
    fault = _fault(ctx, m["fault"], f"{rf}.fault") if "fault" in m else None
    mirror = _mirror(ctx, m["mirror"], f"{rf}.mirror", services) if "mirror" in m else None
    return Route(svc, tuple(dests), name, tuple(matches), timeout, retries, fault, mirror)


def _mirror(ctx: _Ctx, node: _Node, field: str, services: dict[str, Service]) -> Mirror:
    m = ctx.mapping(node, field, {"service", "version", "percent"}, {"service"})
    svc = ctx.string(m["service"], f"{field}.service", _NAME, "service name")
    if svc not in services:
        raise ctx.fail(m["service"], f"{field}.service", f"no service {svc!r} under services")
    version = None
    if "version" in m:
        version = _known_version(ctx, m["version"], f"{field}.version", svc, services)
    percent = _percent(ctx, m["percent"], f"{field}.percent") if "percent" in m else 100.0
    return Mirror(svc, version, percent)


def _retries(ctx: _Ctx, node: _Node, field: str) -> RetryPolicy:
    m = ctx.mapping(node, field, {"attempts", "per_try_timeout", "retry_on", "retriable_status_codes"}, {"attempts"})
    attempts = _int(ctx, m["attempts"], f"{field}.attempts", 0, 100)
    per_try = _duration(ctx, m["per_try_timeout"], f"{field}.per_try_timeout") if "per_try_timeout" in m else None
    retry_on = DEFAULT_RETRY_ON
    if "retry_on" in m:
        rn = m["retry_on"]
        if isinstance(rn.value, list):
            tokens = [ctx.string(v, f"{field}.retry_on[{k}]") for k, v in enumerate(rn.value)]
        else:
            tokens = [t.strip() for t in ctx.string(rn, f"{field}.retry_on").split(",") if t.strip()]
        for t in tokens:
            if t not in RETRY_ON:
                raise ctx.fail(rn, f"{field}.retry_on", f"{t!r} is not a retry condition; expected some of {', '.join(sorted(RETRY_ON))}")
        if not tokens:
            raise ctx.fail(rn, f"{field}.retry_on", "no retry condition given")
        retry_on = frozenset(tokens)
    codes = []
    if "retriable_status_codes" in m:
        for k, v in enumerate(ctx.seq(m["retriable_status_codes"], f"{field}.retriable_status_codes")):
            codes.append(_int(ctx, v, f"{field}.retriable_status_codes[{k}]", 100, 599))
        if codes and "retry_on" in m and "retriable-status-codes" not in retry_on:
            retry_on = retry_on | {"retriable-status-codes"}  # listing codes means retrying them
    return RetryPolicy(attempts, per_try, retry_on, frozenset(codes))


def _fault(ctx: _Ctx, node: _Node, field: str) -> Fault:
    m = ctx.mapping(node, field, {"delay", "abort"})
    if not m:
        raise ctx.fail(node, field, "expected delay, abort or both")
    delay_percent = delay_s = abort_percent = 0.0
    abort_status = 0
    if "delay" in m:
        dm = ctx.mapping(m["delay"], f"{field}.delay", {"percent", "fixed_delay"}, {"fixed_delay"})
        delay_s = _duration(ctx, dm["fixed_delay"], f"{field}.delay.fixed_delay")
        delay_percent = _percent(ctx, dm["percent"], f"{field}.delay.percent") if "percent" in dm else 100.0
    abort_grpc = None
    if "abort" in m:
        am = ctx.mapping(m["abort"], f"{field}.abort", {"percent", "http_status", "grpc_status"})
        if ("http_status" in am) == ("grpc_status" in am):
            raise ctx.fail(m["abort"], f"{field}.abort", "expected one of http_status or grpc_status")
        if "http_status" in am:
            abort_status = _int(ctx, am["http_status"], f"{field}.abort.http_status", 200, 599)
        else:
            abort_grpc = _grpc_status(ctx, am["grpc_status"], f"{field}.abort.grpc_status")
            abort_status = GRPC_TO_HTTP[abort_grpc]
        abort_percent = _percent(ctx, am["percent"], f"{field}.abort.percent") if "percent" in am else 100.0
    return Fault(delay_percent, delay_s, abort_percent, abort_status, abort_grpc)


def _grpc_status(ctx: _Ctx, node: _Node, field: str) -> int:
    """A gRPC status: its number (0-16) or its name (``UNAVAILABLE``, any case)."""
    v = node.value
    if isinstance(v, str) and v.strip().upper() in GRPC_STATUS_NAMES:
        return GRPC_STATUS_NAMES.index(v.strip().upper())
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16:
        return v
    raise ctx.fail(node, field, f"expected a gRPC status, 0-16 or a name such as UNAVAILABLE, got {_kind(v)}")


def _traffic_policy(ctx: _Ctx, node: _Node, field: str) -> TrafficPolicy:
    m = ctx.mapping(node, field, {"load_balancer", "connection_pool", "outlier_detection"})
    lb, hash_header, limits, outlier = "round_robin", None, None, None
    if "load_balancer" in m:
        ln = m["load_balancer"]
        lf = f"{field}.load_balancer"
        if isinstance(ln.value, dict):
            ch = ctx.mapping(ln, lf, {"consistent_hash"}, {"consistent_hash"})
            hm = ctx.mapping(ch["consistent_hash"], f"{lf}.consistent_hash", {"header"}, {"header"})
            hash_header = ctx.string(hm["header"], f"{lf}.consistent_hash.header", _HEADER_NAME, "header name").lower()
            lb = "consistent_hash"
        else:
            lb = ctx.string(ln, lf)
            if lb not in LOAD_BALANCERS or lb == "consistent_hash":
                raise ctx.fail(ln, lf, f"{lb!r} is not a load balancer; expected round_robin, random, least_request "
                                       f"or {{consistent_hash: {{header: NAME}}}}")
    if "connection_pool" in m:
        cf = f"{field}.connection_pool"
        cm = ctx.mapping(m["connection_pool"], cf, {"max_connections", "max_pending_requests", "max_requests"})
        limits = Limits(**{k: _int(ctx, v, f"{cf}.{k}", 1) for k, v in cm.items()})
    if "outlier_detection" in m:
        of = f"{field}.outlier_detection"
        om = ctx.mapping(m["outlier_detection"], of, {"consecutive_5xx", "consecutive_gateway_errors",
                                                      "base_ejection_time", "max_ejection_percent"})
        kw: dict = {}
        if "consecutive_gateway_errors" in om:
            kw["consecutive_gateway_errors"] = _int(ctx, om["consecutive_gateway_errors"], f"{of}.consecutive_gateway_errors", 1)
            kw["consecutive_5xx"] = None  # as Istio: only what is given counts
        if "consecutive_5xx" in om:
            kw["consecutive_5xx"] = _int(ctx, om["consecutive_5xx"], f"{of}.consecutive_5xx", 1)
        if "base_ejection_time" in om:
            kw["base_ejection_s"] = _duration(ctx, om["base_ejection_time"], f"{of}.base_ejection_time")
        if "max_ejection_percent" in om:
            kw["max_ejection_percent"] = _percent(ctx, om["max_ejection_percent"], f"{of}.max_ejection_percent")
        outlier = OutlierPolicy(**kw)
    return TrafficPolicy(lb, hash_header, limits, outlier)


def _spiffe_id(ctx: _Ctx, node: _Node, field: str) -> SpiffeId:
    text = ctx.string(node, field)
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise ctx.fail(node, field, f"{text!r} is not a SPIFFE ID: {exc}") from None
    if not sid.is_workload:
        raise ctx.fail(node, field, f"{text!r} is not a workload identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    return sid


_SOURCE_KEYS = ("principals", "not_principals", "namespaces", "not_namespaces")
_OPERATION_KEYS = ("methods", "not_methods", "paths", "not_paths", "ports", "not_ports")


def _policy(ctx: _Ctx, node: _Node, field: str, services: dict[str, Service]) -> Policy:
    m = ctx.mapping(node, field, {"name", "service", "action", "rules"}, {"name", "service", "action"})
    name = ctx.string(m["name"], f"{field}.name", _VERSION, "policy name (letters, digits, '.', '_', '-')")
    service = ctx.string(m["service"], f"{field}.service", _NAME, "service name")
    if service not in services:
        raise ctx.fail(m["service"], f"{field}.service", f"no service {service!r} under services")
    action = ctx.string(m["action"], f"{field}.action")
    if action not in ACTIONS:
        raise ctx.fail(m["action"], f"{field}.action", f"{action!r} is not an action; expected one of {', '.join(ACTIONS)}")
    rules = []
    if "rules" in m and m["rules"].value is not None:
        for j, r in enumerate(ctx.seq(m["rules"], f"{field}.rules")):
            rf = f"{field}.rules[{j}]"
            rm = ctx.mapping(r, rf, {"from", "to"})
            sources = operations = None
            if "from" in rm:
                sources = tuple(Source(**_match_fields(ctx, alt, f, _SOURCE_KEYS))
                                for alt, f in _alternatives(ctx, rm["from"], f"{rf}.from"))
            if "to" in rm:
                operations = tuple(Operation(**_match_fields(ctx, alt, f, _OPERATION_KEYS))
                                   for alt, f in _alternatives(ctx, rm["to"], f"{rf}.to"))
            rules.append(Rule(sources, operations))
    return Policy(name, service, action, tuple(rules))


def _alternatives(ctx: _Ctx, node: _Node, field: str) -> list[tuple[_Node, str]]:
    """``from``/``to``: one mapping, or a non-empty list of them."""
    if isinstance(node.value, list):
        if not node.value:
            raise ctx.fail(node, field, "an empty list matches nothing; leave the key out to match anything")
        return [(alt, f"{field}[{k}]") for k, alt in enumerate(node.value)]
    return [(node, field)]


def _match_fields(ctx: _Ctx, node: _Node, field: str, keys: tuple[str, ...]) -> dict:
    m = ctx.mapping(node, field, set(keys))
    out = {}
    for key, vnode in m.items():
        kf = f"{field}.{key}"
        values = ctx.seq(vnode, kf)
        if not values:
            raise ctx.fail(vnode, kf, "an empty list matches nothing; leave the key out to match anything")
        got = []
        for k, v in enumerate(values):
            vf = f"{kf}[{k}]"
            if key.endswith("ports"):
                port = v.value
                if isinstance(port, str) and port.isdigit():
                    port = int(port)
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ctx.fail(v, vf, f"expected a port number (1-65535), got {_kind(v.value)}")
                got.append(port)
                continue
            text = ctx.string(v, vf)
            if not valid_pattern(text):
                raise ctx.fail(v, vf, f"{text!r}: '*' may only be the whole value, its start or its end")
            if key.endswith("methods") and not _METHOD.match(text):
                raise ctx.fail(v, vf, f"{text!r} is not an HTTP method (upper case, e.g. GET)")
            if key.endswith("paths") and not text.startswith(("/", "*")):
                raise ctx.fail(v, vf, f"{text!r}: a path starts with '/' (or is a '*' suffix pattern)")
            if key.endswith("principals") and text != "*" and not text.startswith("*"):
                try:
                    full = text if text.startswith("spiffe://") else f"spiffe://{text}"
                    SpiffeId.parse(full.rstrip("*").rstrip("/"))
                except SpiffeIdError as exc:
                    raise ctx.fail(v, vf, f"{text!r} is not a SPIFFE ID (or a prefix/suffix of one): {exc}") from None
            got.append(text)
        out[key] = tuple(got)
    return out


def load_config(path: str | Path) -> MeshConfig:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {size} bytes is larger than the {MAX_CONFIG_BYTES} byte limit")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(p))
