"""Authorization policies, evaluated as Istio evaluates AuthorizationPolicy: plain objects, no I/O.

A policy belongs to the service that enforces it (its inbound sidecar) and has an action:

- ``DENY`` policies are evaluated first: if any matches, the request is denied.
- ``ALLOW``: if the service has at least one ALLOW policy, a request must match one of them;
  with none, every request that no DENY policy matched is allowed.
- ``AUDIT`` never changes the outcome; a match only marks the span (decision ``audit``).

A policy matches when any of its rules matches; a policy without rules never matches (so an ALLOW
policy with ``rules: []`` denies everything, as in Istio) while the empty rule ``{}`` matches
every request. Within a rule, ``from`` and ``to`` are each a list of alternatives (any one may
match; a missing list matches anything); within one alternative every field that is given must
match (AND), and a field matches when any of its values does (OR). ``not_*`` fields match when
none of their values does, which includes a request without that property: a plaintext caller
has no principal, so it matches ``not_principals`` but never ``principals``.

Values are matched as Istio matches strings: exact, ``prefix*``, ``*suffix``, or ``*`` (present,
any value). Principals are SPIFFE IDs, written whole (``spiffe://cluster.local/ns/a/sa/b``) or in
Istio's form without the scheme (``cluster.local/ns/a/sa/b``); namespaces come from the caller's
SPIFFE ID (``/ns/<namespace>/sa/...``). The principal is only ever the peer certificate's
verified identity, never a header. Paths are matched after normalisation
(:func:`normalize_path`), so ``/public/../admin`` cannot slip past a rule about ``/admin/*``.
Ports are the port the caller connected to (the sidecar's inbound port, the one the mesh config
lists as the endpoint's address).

Opaque TCP connections are judged too, as Istio judges TCP traffic: they have no method or path,
so a rule that names one never matches in an ALLOW or AUDIT policy and matches on its other fields
in a DENY policy (the HTTP-only fields are ignored there: a DENY errs on the side of denying).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ALLOW, DENY, AUDIT = "ALLOW", "DENY", "AUDIT"
ACTIONS = (ALLOW, DENY, AUDIT)
#: Envoy's wording for a request refused by RBAC, answered with 403.
DENIED_BODY = "RBAC: access denied"
#: Response flag of a request denied by policy (Envoy: RBAC; details rbac_access_denied_matched_policy[...]).
RBAC_FLAG = "RBAC"
#: The policy name recorded when a request is denied because no ALLOW policy matched it
#: (Envoy prints ``rbac_access_denied_matched_policy[none]``).
NO_MATCH = "none"

_SCHEME = "spiffe://"
_PCT_UNRESERVED = re.compile(r"%(2[DdEe]|3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|5[Ff]|7[Ee])")


def _pattern_ok(value: str) -> bool:
    """Istio allows ``*`` only as a whole value, a prefix or a suffix."""
    return value == "*" or "*" not in value[1:-1] and not (value.startswith("*") and value.endswith("*"))


def match_value(pattern: str, value: str | None) -> bool:
    """Istio string matching: exact, ``prefix*``, ``*suffix``, ``*`` (any value, but present)."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _principal_key(text: str) -> str:
    return text[len(_SCHEME):] if text.startswith(_SCHEME) else text


def normalize_path(path: str) -> str:
    """The path as policies see it: percent-encoded unreserved characters decoded (RFC 3986
    6.2.2.2), repeated slashes merged, and dot segments removed (RFC 3986 5.2.4); never above
    the root. ``%2F`` stays encoded: it is data, not a separator."""
    path = _PCT_UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    out: list[str] = []
    for seg in path.split("/")[1:] if path.startswith("/") else path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    trailing = path.endswith(("/", "/.", "/..")) and out
    return "/" + "/".join(out) + ("/" if trailing else "")


@dataclass(frozen=True)
class Source:
    """One alternative of a rule's ``from``: who is calling."""

    principals: tuple[str, ...] | None = None
    not_principals: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    not_namespaces: tuple[str, ...] | None = None

    def matches(self, req: Request) -> bool:
        principal = None if req.principal is None else _principal_key(req.principal)
        return (_any(self.principals, principal, _principal_key)
                and _none(self.not_principals, principal, _principal_key)
                and _any(self.namespaces, req.namespace)
                and _none(self.not_namespaces, req.namespace))


@dataclass(frozen=True)
class Operation:
    """One alternative of a rule's ``to``: what is being asked for."""

    methods: tuple[str, ...] | None = None
    not_methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    not_paths: tuple[str, ...] | None = None
    ports: tuple[int, ...] | None = None
    not_ports: tuple[int, ...] | None = None

    def matches(self, req: Request, http_fields_match: bool = False) -> bool:
        """*http_fields_match*: for opaque TCP (``req.method`` None), whether a method or path field
        counts as matched (Istio: ignored in a DENY rule, so it denies more) or not (in an ALLOW or
        AUDIT rule, so it allows less)."""
        if req.method is None:
            if not http_fields_match and any(f is not None for f in (self.methods, self.not_methods,
                                                                       self.paths, self.not_paths)):
                return False
            return ((self.ports is None or req.port in self.ports)
                    and (self.not_ports is None or req.port not in self.not_ports))
        path = req.normalized_path
        return (_any(self.methods, req.method) and _none(self.not_methods, req.method)
                and _any(self.paths, path) and _none(self.not_paths, path)
                and (self.ports is None or req.port in self.ports)
                and (self.not_ports is None or req.port not in self.not_ports))


def _any(patterns, value, key=None) -> bool:
    if patterns is None:
        return True
    return any(match_value(key(p) if key else p, value) for p in patterns)


def _none(patterns, value, key=None) -> bool:
    if patterns is None:
        return True
    return not any(match_value(key(p) if key else p, value) for p in patterns)


@dataclass(frozen=True)
class Rule:
    """``from`` alternatives and ``to`` alternatives; ``None`` means "any"."""

    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None

    def matches(self, req: Request, http_fields_match: bool = False) -> bool:
        return ((self.sources is None or any(s.matches(req) for s in self.sources))
                and (self.operations is None or any(o.matches(req, http_fields_match) for o in self.operations)))


@dataclass(frozen=True)
class Policy:
    name: str
    service: str  # the service whose inbound sidecar enforces it
    action: str  # ALLOW, DENY or AUDIT
    rules: tuple[Rule, ...] = ()

    def matches(self, req: Request) -> bool:
        return any(r.matches(req, self.action == DENY) for r in self.rules)


@dataclass(frozen=True)
class Request:
    """What a policy can see of a request. ``principal`` is the verified peer SPIFFE ID (None for
    a plaintext caller); ``path`` excludes the query. An opaque TCP connection has no method and
    no path (None): see :meth:`Operation.matches`."""

    principal: str | None
    method: str | None
    path: str | None
    port: int

    @property
    def namespace(self) -> str | None:
        if self.principal is None:
            return None
        seg = _principal_key(self.principal).split("/")
        # <trust-domain>/ns/<ns>/sa/<sa>
        if len(seg) == 5 and seg[1] == "ns" and seg[3] == "sa":
            return seg[2]
        return None

    @property
    def normalized_path(self) -> str:
        return normalize_path(self.path or "")


@dataclass(frozen=True)
class Decision:
    """``decision`` is ``allow``, ``deny`` or ``audit`` (allowed, and an AUDIT policy matched).
    ``policy`` names the policy that decided: the DENY policy that matched, the ALLOW policy that
    matched, :data:`NO_MATCH` when ALLOW policies exist and none matched, or the AUDIT policy;
    None when the request was allowed with no policy involved."""

    allowed: bool
    decision: str
    policy: str | None


ALLOWED = Decision(True, "allow", None)


class Authorizer:
    """The policies of a mesh, by enforcing service. Immutable; build a new one on config change."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._by_service: dict[str, dict[str, list[Policy]]] = {}
        for p in policies:
            if p.action not in ACTIONS:
                raise ValueError(f"policy {p.name!r}: unknown action {p.action!r}")
            self._by_service.setdefault(p.service, {a: [] for a in ACTIONS})[p.action].append(p)

    def enforces(self, service: str) -> bool:
        """Whether any policy applies to ``service`` (if not, :meth:`check` always allows)."""
        return service in self._by_service

    def check(self, service: str, req: Request) -> Decision:
        by_action = self._by_service.get(service)
        if by_action is None:
            return ALLOWED
        for p in by_action[DENY]:
            if p.matches(req):
                return Decision(False, "deny", p.name)
        decision = ALLOWED
        if by_action[ALLOW]:
            matched = next((p for p in by_action[ALLOW] if p.matches(req)), None)
            if matched is None:
                return Decision(False, "deny", NO_MATCH)
            decision = Decision(True, "allow", matched.name)
        audited = next((p for p in by_action[AUDIT] if p.matches(req)), None)
        if audited is not None:
            return Decision(True, "audit", audited.name)
        return decision


def valid_pattern(value: str) -> bool:
    """For config validation: a non-empty string with ``*`` only whole, leading or trailing."""
    return bool(value) and _pattern_ok(value)
