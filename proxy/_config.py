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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tracemesh.identity import SpiffeId, SpiffeIdError
from tracemesh.net import Addr, parse_addr
from tracemesh.proxy._authz import ACTIONS, Operation, Policy, Rule, Source, valid_pattern

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


@dataclass(frozen=True)
class Service:
    name: str
    endpoints: tuple[Endpoint, ...]
    mtls: str = DEFAULT_MTLS
    identity: SpiffeId | None = None


@dataclass(frozen=True)
class Destination:
    version: str
    weight: int


@dataclass(frozen=True)
class Route:
    service: str
    destinations: tuple[Destination, ...]


@dataclass(frozen=True)
class MeshConfig:
    services: dict[str, Service]
    routes: dict[str, Route]
    policies: tuple[Policy, ...] = ()

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

    __slots__ = ("value", "line")

    def __init__(self, value, line: int) -> None:
        self.value, self.line = value, line


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
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: _Node | None, field: str, msg: str) -> ConfigError:
        line = f":{node.line}" if node is not None else ""
        return ConfigError(f"{self.source}{line}: {field}: {msg}" if field else f"{self.source}{line}: {msg}")

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


def parse_config(text: str, source: str = "<config>") -> MeshConfig:
    """Parse and validate *text*; raise ConfigError naming *source*, the line and the field."""
    ctx = _Ctx(source)
    try:
        root = yaml.load(text, Loader=_LineLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if root is None or root.value is None:
        return MeshConfig.empty()
    top = ctx.mapping(root, "", {"services", "routes", "policies"})

    services: dict[str, Service] = {}
    if "services" in top and top["services"].value is not None:
        svc_node = top["services"]
        for name, body in ctx.mapping(svc_node, "services", set(svc_node.value) if isinstance(svc_node.value, dict) else set()).items():
            field = f"services.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                raise ctx.fail(body, field, f"{name!r} is not a valid service name (lowercase DNS label)")
            m = ctx.mapping(body, field, {"endpoints", "mtls", "identity"}, {"endpoints"})
            eps = []
            seen = set()
            for i, ep in enumerate(ctx.seq(m["endpoints"], f"{field}.endpoints")):
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
            services[name] = Service(name, tuple(eps), mtls, identity)

    routes: dict[str, Route] = {}
    if "routes" in top and top["routes"].value is not None:
        for i, r in enumerate(ctx.seq(top["routes"], "routes")):
            rf = f"routes[{i}]"
            m = ctx.mapping(r, rf, {"service", "destinations"}, {"service", "destinations"})
            svc = ctx.string(m["service"], f"{rf}.service", _NAME, "service name")
            if svc not in services:
                raise ctx.fail(m["service"], f"{rf}.service", f"no service {svc!r} under services")
            if svc in routes:
                raise ctx.fail(m["service"], f"{rf}.service", f"a second route for {svc!r}; merge them into one")
            dests = []
            versions = {e.version for e in services[svc].endpoints}
            for j, d in enumerate(ctx.seq(m["destinations"], f"{rf}.destinations")):
                df = f"{rf}.destinations[{j}]"
                dm = ctx.mapping(d, df, {"version", "weight"}, {"version"})
                version = ctx.string(dm["version"], f"{df}.version", _VERSION, "version label")
                if version not in versions:
                    raise ctx.fail(dm["version"], f"{df}.version",
                                   f"service {svc!r} has no endpoints of version {version!r} (has {', '.join(sorted(versions)) or 'none'})")
                weight = dm["weight"].value if "weight" in dm else 1
                if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                    raise ctx.fail(dm.get("weight"), f"{df}.weight", f"expected a non-negative integer, got {_kind(weight)}")
                dests.append(Destination(version, weight))
            if not dests:
                raise ctx.fail(m["destinations"], f"{rf}.destinations", "a route needs at least one destination")
            if sum(d.weight for d in dests) == 0:
                raise ctx.fail(m["destinations"], f"{rf}.destinations", "the weights add up to 0; nothing could be sent")
            routes[svc] = Route(svc, tuple(dests))

    policies: list[Policy] = []
    if "policies" in top and top["policies"].value is not None:
        names: set[str] = set()
        for i, node in enumerate(ctx.seq(top["policies"], "policies")):
            policy = _policy(ctx, node, f"policies[{i}]", services)
            if policy.name in names:
                raise ctx.fail(node.value["name"], f"policies[{i}].name", f"a second policy named {policy.name!r}")
            names.add(policy.name)
            policies.append(policy)
    return MeshConfig(services, routes, tuple(policies))


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
