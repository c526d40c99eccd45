"""Authorization policies: the sans-I/O evaluator against a matrix of cases, the config that
declares them (errors name file:line: field), and the same matrix through real sidecars, where the
principal can only come from a verified client certificate."""

from __future__ import annotations

import textwrap

import pytest
from mtls_helpers import MeshCaEnv, echo, http_get, https_get, sid, tls_context
from sidecar_harness import SidecarProc, Upstream, start_all, write_mesh

from tracemesh.proxy import ConfigError, parse_config
from tracemesh.proxy._authz import (
    Authorizer,
    Decision,
    Operation,
    Policy,
    Request,
    Rule,
    Source,
    match_value,
    normalize_path,
)

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ADMIN = "spiffe://cluster.local/ns/shop/sa/admin-bob"
SRE = "spiffe://cluster.local/ns/ops/sa/sre"
INTERN = "spiffe://cluster.local/ns/ops/sa/intern"
TESTER = "spiffe://cluster.local/ns/test/sa/frontend"
STRANGER = "spiffe://cluster.local/ns/shop/sa/stranger"
PORT = 9001

# -- the evaluator, no sockets ------------------------------------------------------------------

POLICIES = [
    Policy("deny-admin", "catalog", "DENY", (Rule(operations=(Operation(paths=("/admin/*", "/admin")),)),)),
    Policy("deny-test-ns", "catalog", "DENY", (Rule(sources=(Source(namespaces=("test",)),)),)),
    Policy("readers", "catalog", "ALLOW", (Rule(
        sources=(Source(principals=(FRONTEND,)),),
        operations=(Operation(methods=("GET", "HEAD"), paths=("/items/*", "*.json")),)),)),
    Policy("writers", "catalog", "ALLOW", (Rule(
        sources=(Source(principals=("cluster.local/ns/shop/sa/admin-*",)),),  # Istio's form, prefix match
        operations=(Operation(methods=("POST", "PUT")),)),)),
    Policy("ops", "catalog", "ALLOW", (Rule(
        sources=(Source(namespaces=("ops",), not_principals=(INTERN,)),),
        operations=(Operation(ports=(PORT,), not_paths=("/items/secret*",)),)),)),
    Policy("audit-reports", "catalog", "AUDIT", (Rule(operations=(Operation(paths=("/items/report*",)),)),)),
    # pricing: any authenticated caller, except from test; no ALLOW at all for "open"
    Policy("mesh-only", "pricing", "ALLOW", (Rule(sources=(Source(principals=("*",), not_namespaces=("test",)),)),)),
    Policy("no-delete", "open", "DENY", (Rule(operations=(Operation(methods=("DELETE",)),)),)),
    Policy("nothing", "closed", "ALLOW", ()),  # an ALLOW policy without rules allows nothing
    Policy("everything", "wide", "ALLOW", (Rule(),)),  # the empty rule matches every request
]

MATRIX = [
    # service, principal, method, path, port -> decision, policy
    ("catalog", FRONTEND, "GET", "/items/1", PORT, "allow", "readers"),
    ("catalog", FRONTEND, "HEAD", "/items/1", PORT, "allow", "readers"),
    ("catalog", FRONTEND, "GET", "/data/x.json", PORT, "allow", "readers"),  # suffix wildcard
    ("catalog", FRONTEND, "GET", "/items", PORT, "deny", "none"),  # "/items/*" needs the slash
    ("catalog", FRONTEND, "POST", "/items/1", PORT, "deny", "none"),  # method not allowed
    ("catalog", FRONTEND, "GET", "/admin/users", PORT, "deny", "deny-admin"),  # DENY before ALLOW
    ("catalog", FRONTEND, "GET", "/admin", PORT, "deny", "deny-admin"),
    ("catalog", FRONTEND, "GET", "/items/../admin/users", PORT, "deny", "deny-admin"),  # normalised
    ("catalog", FRONTEND, "GET", "//admin/users", PORT, "deny", "deny-admin"),
    ("catalog", FRONTEND, "GET", "/%61dmin/users", PORT, "deny", "deny-admin"),  # %61 is 'a'
    ("catalog", FRONTEND, "GET", "/items/report-q3", PORT, "audit", "audit-reports"),  # allowed, audited
    ("catalog", ADMIN, "POST", "/items/1", PORT, "allow", "writers"),
    ("catalog", ADMIN, "GET", "/items/1", PORT, "deny", "none"),  # writers may not read
    ("catalog", SRE, "DELETE", "/anything", PORT, "allow", "ops"),  # namespace
    ("catalog", SRE, "GET", "/items/1", PORT + 1, "deny", "none"),  # wrong port
    ("catalog", SRE, "GET", "/items/secret-plan", PORT, "deny", "none"),  # not_paths
    ("catalog", INTERN, "GET", "/x", PORT, "deny", "none"),  # not_principals
    ("catalog", TESTER, "GET", "/items/1", PORT, "deny", "deny-test-ns"),  # denied by namespace
    ("catalog", STRANGER, "GET", "/items/1", PORT, "deny", "none"),
    ("catalog", None, "GET", "/items/1", PORT, "deny", "none"),  # plaintext: no principal
    ("pricing", STRANGER, "GET", "/", PORT, "allow", "mesh-only"),
    ("pricing", TESTER, "GET", "/", PORT, "deny", "none"),
    ("pricing", None, "GET", "/", PORT, "deny", "none"),  # "*" means an authenticated principal
    ("open", None, "GET", "/", PORT, "allow", None),  # only DENY policies: the rest is allowed
    ("open", FRONTEND, "DELETE", "/x", PORT, "deny", "no-delete"),
    ("closed", FRONTEND, "GET", "/", PORT, "deny", "none"),
    ("wide", None, "PATCH", "/anything", PORT, "allow", "everything"),
    ("unlisted", None, "GET", "/", PORT, "allow", None),  # no policy at all
]


@pytest.mark.parametrize("service,principal,method,path,port,decision,policy", MATRIX)
def test_policy_matrix(service, principal, method, path, port, decision, policy):
    got = Authorizer(POLICIES).check(service, Request(principal, method, path, port))
    assert (got.decision, got.policy) == (decision, policy)
    assert got.allowed == (decision != "deny")


def test_not_principals_matches_a_plaintext_caller():
    """Envoy's semantics: a negation matches when the property is absent."""
    authz = Authorizer([Policy("p", "s", "DENY", (Rule(sources=(Source(not_principals=(FRONTEND,)),)),))])
    assert not authz.check("s", Request(None, "GET", "/", 1)).allowed
    assert authz.check("s", Request(FRONTEND, "GET", "/", 1)).allowed


def test_alternatives_within_from_and_to_are_ored():
    rule = Rule(sources=(Source(principals=(FRONTEND,)), Source(namespaces=("ops",))),
                operations=(Operation(methods=("GET",)), Operation(paths=("/w",))))
    authz = Authorizer([Policy("p", "s", "ALLOW", (rule,))])
    assert authz.check("s", Request(SRE, "POST", "/w", 1)).allowed
    assert authz.check("s", Request(FRONTEND, "GET", "/r", 1)).allowed
    assert not authz.check("s", Request(STRANGER, "GET", "/r", 1)).allowed
    assert not authz.check("s", Request(FRONTEND, "POST", "/r", 1)).allowed


def test_opaque_tcp_is_judged_as_istio_judges_tcp():
    """No method or path: a rule that names one never allows (ALLOW) and denies on its other fields (DENY)."""
    allow_http = Policy("http", "s", "ALLOW", (Rule((Source(principals=(FRONTEND,)),), (Operation(methods=("GET",)),)),))
    allow_port = Policy("port", "s", "ALLOW", (Rule(operations=(Operation(ports=(5432,)),)),))
    deny_http = Policy("deny", "s", "DENY", (Rule((Source(principals=(STRANGER,)),), (Operation(paths=("/x",)),)),))
    authz = Authorizer([allow_http, allow_port, deny_http])
    tcp = Request(FRONTEND, None, None, 5432)
    assert authz.check("s", tcp) == Decision(True, "allow", "port")
    assert authz.check("s", Request(FRONTEND, None, None, 5433)) == Decision(False, "deny", "none")
    assert authz.check("s", Request(STRANGER, None, None, 5432)) == Decision(False, "deny", "deny")
    assert authz.check("s", Request(STRANGER, "GET", "/y", 5432)).allowed  # HTTP: the path decides


@pytest.mark.parametrize("pattern,value,hit", [
    ("*", "x", True), ("*", "", True), ("*", None, False), ("/a/*", "/a/b", True), ("/a/*", "/a", False),
    ("*.json", "/x.json", True), ("*.json", "/x.jsonp", False), ("GET", "GET", True), ("GET", "get", False),
])
def test_istio_string_matching(pattern, value, hit):
    assert match_value(pattern, value) is hit


@pytest.mark.parametrize("raw,norm", [
    ("/", "/"), ("/a/b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../../etc", "/etc"),
    ("//a///b/", "/a/b/"), ("/a/b/..", "/a/"), ("/%41%7e", "/A~"), ("/a%2Fb", "/a%2Fb"), ("/a/%2e%2e/b", "/b"),
])
def test_path_normalisation(raw, norm):
    assert normalize_path(raw) == norm


def test_decisions_are_plain_values():
    assert Authorizer([]).check("x", Request(None, "GET", "/", 1)) == Decision(True, "allow", None)
    assert not Authorizer([]).enforces("x")


# -- the config ---------------------------------------------------------------------------------

CONFIG = """\
services:
  catalog:
    endpoints: [{address: 127.0.0.1:9001}]
    mtls: STRICT
    identity: spiffe://cluster.local/ns/shop/sa/catalog
  pricing:
    endpoints: [{address: 127.0.0.1:9002}]
policies:
  - name: readers
    service: catalog
    action: ALLOW
    rules:
      - from: {principals: [spiffe://cluster.local/ns/shop/sa/frontend], not_namespaces: [test]}
        to: [{methods: [GET], paths: [/items/*]}, {ports: [9001, "9002"]}]
      - {}
  - name: no-rules
    service: pricing
    action: DENY
"""


def test_policies_parse_into_frozen_objects():
    cfg = parse_config(CONFIG, "mesh.yaml")
    assert cfg.services["catalog"].mtls == "strict"  # modes are case-insensitive, stored lower case
    assert str(cfg.services["catalog"].identity) == "spiffe://cluster.local/ns/shop/sa/catalog"
    assert cfg.services["pricing"].mtls == "permissive" and cfg.services["pricing"].identity is None
    assert cfg.service_of("spiffe://cluster.local/ns/shop/sa/catalog") == "catalog"
    readers, no_rules = cfg.policies
    assert readers == Policy("readers", "catalog", "ALLOW", (
        Rule(sources=(Source(principals=(FRONTEND,), not_namespaces=("test",)),),
             operations=(Operation(methods=("GET",), paths=("/items/*",)), Operation(ports=(9001, 9002)))),
        Rule(),
    ))
    assert no_rules == Policy("no-rules", "pricing", "DENY", ())


def _policy_error(policy_yaml: str) -> str:
    text = ("services:\n  catalog:\n    endpoints: [{address: 127.0.0.1:9001}]\npolicies:\n"
            + textwrap.indent(textwrap.dedent(policy_yaml), "  "))
    with pytest.raises(ConfigError) as err:
        parse_config(text, "mesh.yaml")
    return str(err.value)


@pytest.mark.parametrize("policy,message", [
    ("- {name: p, service: catalog, action: REJECT}",
     "mesh.yaml:5: policies[0].action: 'REJECT' is not an action; expected one of ALLOW, DENY, AUDIT"),
    ("- {name: p, service: nope, action: DENY}", "mesh.yaml:5: policies[0].service: no service 'nope' under services"),
    ("- {name: p, action: DENY}", "mesh.yaml:5: policies[0]: missing required key 'service'"),
    ("- {name: p, service: catalog, action: DENY, rule: []}", "mesh.yaml:5: policies[0].rule: unknown key"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - to: {paths: [/a*b]}",
     "mesh.yaml:9: policies[0].rules[0].to.paths[0]: '/a*b': '*' may only be the whole value, its start or its end"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - to: {methods: [get]}",
     "mesh.yaml:9: policies[0].rules[0].to.methods[0]: 'get' is not an HTTP method"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - to: {ports: [0]}",
     "mesh.yaml:9: policies[0].rules[0].to.ports[0]: expected a port number (1-65535), got 0"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - to: {paths: []}",
     "mesh.yaml:9: policies[0].rules[0].to.paths: an empty list matches nothing"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - from: {principals: ['spiffe://Bad/x']}",
     "mesh.yaml:9: policies[0].rules[0].from.principals[0]: 'spiffe://Bad/x' is not a SPIFFE ID"),
    ("- name: p\n  service: catalog\n  action: DENY\n  rules:\n    - from: {who: [x]}",
     "mesh.yaml:9: policies[0].rules[0].from.who: unknown key"),
    ("- {name: p, service: catalog, action: DENY}\n- {name: p, service: catalog, action: ALLOW}",
     "mesh.yaml:6: policies[1].name: a second policy named 'p'"),
])
def test_policy_errors_name_file_line_field(policy, message):
    assert message in _policy_error(policy)


@pytest.mark.parametrize("body,message", [
    ("mtls: sometimes", "mesh.yaml:4: services.catalog.mtls: 'sometimes' is not an mTLS mode; expected one of strict, permissive, disable"),
    ("identity: spiffe://cluster.local/web", "mesh.yaml:4: services.catalog.identity: 'spiffe://cluster.local/web' is not a workload identity"),
    ("identity: https://x/ns/a/sa/b", "mesh.yaml:4: services.catalog.identity: 'https://x/ns/a/sa/b' is not a SPIFFE ID"),
])
def test_service_security_errors_name_file_line_field(body, message):
    text = f"services:\n  catalog:\n    endpoints: [{{address: 127.0.0.1:9001}}]\n    {body}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "mesh.yaml")
    assert message in str(err.value)


# -- through real sidecars ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def authz_mesh(tmp_path_factory):
    """catalog (STRICT) and pricing (PERMISSIVE) sidecars enforcing the policies above, and a
    frontend sidecar calling catalog; all with certificates from a real CA service."""
    work = tmp_path_factory.mktemp("authz")
    env = MeshCaEnv(work)
    apps = {n: Upstream(n) for n in ("catalog", "pricing", "frontend")}
    scs = {}
    try:
        cfg = work / "mesh.yaml"
        scs["catalog"] = SidecarProc(work, "catalog", apps["catalog"].addr, env.addr, config=cfg,
                                     extra=env.sidecar_args(sid("catalog"), "strict"))
        scs["pricing"] = SidecarProc(work, "pricing", apps["pricing"].addr, env.addr, config=cfg,
                                     extra=env.sidecar_args(sid("pricing")))
        scs["frontend"] = SidecarProc(work, "frontend", apps["frontend"].addr, env.addr, config=cfg,
                                      extra=env.sidecar_args(sid("frontend")))
        port = scs["catalog"].inbound.port
        policies = []
        for p in POLICIES:
            if p.service not in ("catalog", "pricing"):
                continue
            rules = []
            for r in p.rules:
                rule = {}
                if r.sources is not None:
                    rule["from"] = [{k: list(v) for k, v in vars(s).items() if v is not None} for s in r.sources]
                if r.operations is not None:
                    rule["to"] = [{k: [port if x == PORT else x for x in v] for k, v in vars(o).items() if v is not None}
                                  for o in r.operations]
                rules.append(rule)
            policies.append({"name": p.name, "service": p.service, "action": p.action, "rules": rules})
        write_mesh(cfg, {
            "services": {
                "catalog": {"endpoints": [{"address": str(scs["catalog"].inbound)}], "mtls": "strict",
                            "identity": str(sid("catalog"))},
                "pricing": {"endpoints": [{"address": str(scs["pricing"].inbound)}], "identity": str(sid("pricing"))},
                "frontend": {"endpoints": [{"address": str(scs["frontend"].inbound)}], "identity": FRONTEND},
            },
            "policies": policies,
        })
        start_all(list(scs.values()))
        yield env, scs, apps
        for sc in scs.values():
            assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
    finally:
        for sc in scs.values():
            sc.close()
        for app in apps.values():
            app.close()
        env.close()


def _client(env: MeshCaEnv, principal: str | None):
    if principal is None:
        return None
    from tracemesh.identity import SpiffeId

    return tls_context(env.cred(SpiffeId.parse(principal)), env.ca.bundle_pem())


REAL_CASES = [m for m in MATRIX if m[0] in ("catalog", "pricing") and m[4] == PORT
              and not (m[0] == "catalog" and m[1] is None)]  # catalog is STRICT: no plaintext caller gets that far


@pytest.fixture(scope="module")
def matrix_answers(authz_mesh):
    """Every case sent once, up front, so that the spans of all of them arrive in one export."""
    env, scs, apps = authz_mesh
    answers = {}
    for case in REAL_CASES:
        service, principal, method, path = case[:4]
        ctx = _client(env, principal)
        headers = {"x-request-id": f"authz-{len(answers)}"}
        answers[case] = headers["x-request-id"], (
            https_get(scs[service].inbound, ctx, path, headers, method) if ctx is not None
            else http_get(scs[service].inbound, path, headers, method))
    return answers


@pytest.mark.parametrize("case", REAL_CASES, ids=[f"{m[0]}-{m[2]}-{m[3]}-{(m[1] or 'plaintext').rsplit('/', 1)[-1]}"
                                                  for m in REAL_CASES])
def test_policy_matrix_through_a_real_sidecar(authz_mesh, matrix_answers, case):
    env, scs, apps = authz_mesh
    service, principal, method, path, port, decision, policy = case
    rid, (status, body) = matrix_answers[case]
    if decision == "deny":
        assert (status, body) == (403, b"RBAC: access denied\n")
    else:
        assert status == 200, body
        if method != "HEAD":
            seen = echo(body)
            # the app gets the normalised path the policy judged, and who called, from the certificate
            assert seen["headers"]["x-forwarded-client-cert"] == f"By={sid(service)};URI={principal}"
    span = env.otlp.wait(service=service, **{"guid:x-request-id": rid})[0]
    assert span.attrs["mesh.authz.decision"] == decision
    assert span.attrs.get("mesh.authz.policy") == policy
    assert span.attrs["mesh.response_flags"] == ("RBAC" if decision == "deny" else "-")
    assert span.attrs.get("mesh.source.principal") == principal
    assert span.attrs["mesh.connection_security_policy"] == ("mutual_tls" if principal else "none")
    assert span.status == "UNSET"  # a policy's 403 is the mesh working, not a server error


def test_denied_through_the_callers_sidecar_and_headers_prove_nothing(authz_mesh):
    env, scs, apps = authz_mesh
    out = scs["frontend"].outbound
    assert http_get(out, "/items/7", {"host": "catalog"})[0] == 200
    assert http_get(out, "/items/7", {"host": "catalog"}, method="POST") == (403, b"RBAC: access denied\n")
    assert http_get(out, "/admin/x", {"host": "catalog"})[0] == 403
    # a plaintext caller claiming an identity in headers is still nobody
    lie = {"x-forwarded-client-cert": f"URI={FRONTEND}", "x-tracemesh-peer": "frontend;v1", "x-request-id": "authz-lie"}
    assert http_get(scs["pricing"].inbound, "/", lie) == (403, b"RBAC: access denied\n")
    span = env.otlp.wait(service="pricing", **{"guid:x-request-id": "authz-lie"})[0]
    assert "mesh.source.principal" not in span.attrs
    assert span.attrs["mesh.connection_security_policy"] == "none"
    # and an authenticated one cannot pass for another through them either
    ctx = _client(env, STRANGER)
    status, body = https_get(scs["pricing"].inbound, ctx, "/", {**lie, "x-request-id": "authz-lie2"})
    assert status == 200
    assert echo(body)["headers"]["x-forwarded-client-cert"] == f"By={sid('pricing')};URI={STRANGER}"
    span = env.otlp.wait(service="pricing", **{"guid:x-request-id": "authz-lie2"})[0]
    assert span.attrs["mesh.source.principal"] == STRANGER
    assert span.attrs["mesh.source.service"] == "stranger"  # the service account, not the claim
    assert "mesh.source.version" not in span.attrs
