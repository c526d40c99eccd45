"""The control plane's config model: documents, merging, the strict rules, precise errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.proxy._config import (
    Canary,
    ConfigError,
    MeshConfig,
    Port,
    compose_config,
    parse_config,
)

SRC = "mesh.yaml"

FULL = textwrap.dedent("""\
    # services: the registry supplies endpoints at runtime; static ones stay possible
    services:
      catalog:
        ports:
          - {port: 8080, protocol: http, name: web}
          - {port: 9090, protocol: grpc}
        versions: [v1, v2]
        mtls: strict
        traffic_policy:
          load_balancer: least_request
      pricing:
        endpoints: [{address: 127.0.0.1:9003, version: v1}]
    ---
    routes:
      - service: catalog
        name: testers
        match: [{headers: {x-user: {exact: tester}}}]
        destinations: [{version: v2}]
      - service: catalog
        destinations:
          - {version: v1, weight: 90}
          - {version: v2, weight: 10}
      - service: pricing
        destinations: [{version: v1, weight: 100}]
    policies:
      - name: no-admin
        service: catalog
        action: DENY
        rules: [{to: {paths: [/admin/*]}}]
    ---
    canaries:
      - name: catalog-v2
        service: catalog
        baseline: v1
        canary: v2
        steps: [10, 25, 50, 100]
        interval: 2m
        analysis_window: 5m
        thresholds: {max_error_percent: 1.5, max_p99_latency_ratio: 1.25, min_requests: 50}
    """)


def compose(text: str, base: str | None = None) -> tuple[MeshConfig, dict]:
    return compose_config([(SRC, text)], ("config version 1", base) if base is not None else None, strict=True)


def test_a_file_of_several_documents_merges_into_one_config():
    cfg, mesh = compose(FULL)
    cat = cfg.services["catalog"]
    assert cat.ports == (Port(8080, "http", "web"), Port(9090, "grpc", ""))
    assert cat.versions == ("v1", "v2") and cat.endpoints == () and cat.mtls == "strict"
    assert [r.name for r in cfg.routes["catalog"]] == ["testers", "catalog-1"]
    assert [p.name for p in cfg.policies] == ["no-admin"]
    assert cfg.canaries == (Canary("catalog-v2", "catalog", "v1", "v2", (10, 25, 50, 100), 120.0, 300.0, 1.5, 1.25, 50),)
    # the plain data is what a sidecar parses, with the legacy parser's defaults: the same config
    again = parse_config(json.dumps(mesh), "pushed")
    assert again.services == cfg.services and again.canaries == cfg.canaries and again.policies == cfg.policies
    assert [(r.name, r.destinations) for r in again.routes["catalog"]] == [(r.name, r.destinations) for r in cfg.routes["catalog"]]
    assert mesh["services"]["catalog"]["endpoints"] == []  # added: the legacy parser wants the key
    assert set(mesh) == {"services", "routes", "policies", "canaries"}


def test_parse_config_takes_documents_too_and_stays_lenient_where_it_was():
    assert set(parse_config("services: {a: {endpoints: []}}\n---\nservices: {b: {endpoints: []}}\n", SRC).services) == {"a", "b"}
    with pytest.raises(ConfigError, match="missing required key 'endpoints'"):
        parse_config("services:\n  catalog: {}\n", SRC)  # a sidecar's static file still needs endpoints
    lenient = "services: {a: {endpoints: [{address: ':1'}, {address: ':2', version: v2}]}}\n" \
              "routes: [{service: a, destinations: [{version: v1, weight: 3}, {version: v2, weight: 1}]}]\n"
    assert parse_config(lenient, SRC).routes["a"][0].destinations[0].weight == 3
    with pytest.raises(ConfigError, match=r"mesh.yaml:2: routes\[0\].destinations: the weights add up to 4; they must add up to 100"):
        parse_config(lenient, SRC, strict=True)


S = "services:\n  catalog:\n    versions: [v1, v2]\n"  # 3 lines
R = "routes:\n  - service: catalog\n    destinations:\n"  # lines 4-6 after S; a block list starts at its first item

# (text, line, field, words): strict mode, every error names mesh.yaml:LINE: FIELD: and says what was expected
ERRORS = [
    ("services:\n  catalog: [\n", 3, "", "not valid YAML"),
    ("services:\n\tcatalog: {}\n", 2, "", "not valid YAML"),
    ("services: {}\n---\nservices:\n  catalog: {versions: v1}\n", 4, "services.catalog.versions", "expected a list"),
    ("services:\n  catalog: {ports: [{port: http, protocol: http}]}\n", 2, "services.catalog.ports[0].port", "expected an integer (1-65535)"),
    ("services:\n  catalog: {ports: [{port: 80, protocol: udp}]}\n", 2, "services.catalog.ports[0].protocol", "expected one of http, http2, grpc, tcp"),
    ("services:\n  catalog:\n    ports:\n      - {port: 80, protocol: http}\n      - {port: 80, protocol: tcp}\n", 5, "services.catalog.ports[1].port", "listed twice"),
    ("services:\n  catalog: {ports: [{port: 80}]}\n", 2, "services.catalog.ports[0]", "missing required key 'protocol'"),
    ("services:\n  catalog:\n    versions: [v1, v1]\n", 3, "services.catalog.versions[1]", "listed twice"),
    ("services:\n  catalog:\n    subsets: [v1]\n", 3, "services.catalog.subsets", "unknown key"),
    ("servics:\n  catalog: {}\n", 2, "servics", "unknown key; expected one of canaries, policies, routes, services"),
    (S + R + "      - {version: v1, weight: 60}\n      - {version: v2, weight: 30}\n", 7, "routes[0].destinations", "add up to 90; they must add up to 100"),
    (S + R + "      - {version: v1, weight: 60}\n      - {version: v2}\n", 8, "routes[0].destinations[1]", "missing required key 'weight'"),
    (S + R + "      - {version: v1, weight: 50}\n", 7, "routes[0].destinations", "add up to 50"),
    (S + R + "      - {version: v3, weight: 100}\n", 7, "routes[0].destinations[0].version", "service 'catalog' has no version 'v3' (declares v1, v2)"),
    (S + "routes:\n  - service: pricing\n    destinations: [{version: v1}]\n", 5, "routes[0].service", "no service 'pricing' under services"),
    ("services:\n  catalog: {}\nroutes:\n  - service: catalog\n    destinations: [{version: v1}]\n", 5,
     "routes[0].destinations[0].version", "has no endpoints of version 'v1' (has none; declare it under services.catalog.versions)"),
    (S + "routes:\n  - service: catalog\n    destinations: [{version: v1, weight: '100'}]\n", 6, "routes[0].destinations[0].weight", "non-negative integer"),
    (S + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{path: {regex: '(unclosed'}}]\n", 7,
     "routes[0].match[0].path.regex", "does not compile"),
    (S + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: {service: catalog, version: v9}\n", 7,
     "routes[0].mirror.version", "no version 'v9'"),
    # duplicates across documents name both places
    (S + "---\nservices:\n  catalog: {}\n", 6, "services.catalog", "service 'catalog' is defined twice; the first is at mesh.yaml:3"),
    (S + "policies:\n  - {name: p, service: catalog, action: DENY}\n---\npolicies:\n  - {name: p, service: catalog, action: ALLOW}\n",
     8, "policies[0].name", "a second policy named 'p' (the first is at mesh.yaml:5)"),
    # an error in the second document names the second document's line
    (S + "---\n# comment\nroutes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: ten}\n", 9,
     "routes[0].destinations[0].weight", "non-negative integer, got 'ten'"),
    (S + "---\n\n\npolicies:\n  - {name: p, service: nope, action: DENY}\n", 8, "policies[0].service", "no service 'nope'"),
]

C = S + "canaries:\n  - name: c\n    service: catalog\n    baseline: v1\n    canary: v2\n    interval: 1m\n    thresholds: {max_error_percent: 1}\n"
CANARY_ERRORS = [
    (C + "    steps: [10, 50]\n", 11, "canaries[0].steps[1]", "the last step is 50; a rollout ends with the canary at 100"),
    (C + "    steps: [50, 10, 100]\n", 11, "canaries[0].steps[1]", "10 after 50: the steps must increase"),
    (C + "    steps: [0, 100]\n", 11, "canaries[0].steps[0]", "expected an integer (1-100)"),
    (C + "    steps: []\n", 11, "canaries[0].steps", "empty list"),
    (C.replace("canary: v2", "canary: v1") + "    steps: [100]\n", 8, "canaries[0].canary", "both 'v1'"),
    (C.replace("canary: v2", "canary: v7") + "    steps: [100]\n", 8, "canaries[0].canary", "no version 'v7'"),
    (C.replace("interval: 1m", "interval: often") + "    steps: [100]\n", 9, "canaries[0].interval", "expected a duration"),
    (C.replace("{max_error_percent: 1}", "{}") + "    steps: [100]\n", 10, "canaries[0].thresholds", "expected max_error_percent, max_p99_latency_ratio or both"),
    (C.replace("{max_error_percent: 1}", "{max_p99_latency_ratio: 0.5}") + "    steps: [100]\n", 10,
     "canaries[0].thresholds.max_p99_latency_ratio", "expected a ratio"),
    (C.replace("{max_error_percent: 1}", "{max_errors: 1}") + "    steps: [100]\n", 10, "canaries[0].thresholds.max_errors", "unknown key"),
    (C + "    steps: [100]\n  - {name: d, service: catalog, baseline: v2, canary: v1, steps: [100], interval: 1s, thresholds: {max_error_percent: 5}}\n",
     12, "canaries[1].service", "a second canary for 'catalog'"),
    (C + "    steps: [100]\n---\ncanaries:\n  - {name: c, service: catalog, baseline: v2, canary: v1, steps: [100], interval: 1s, thresholds: {max_error_percent: 5}}\n",
     14, "canaries[0].name", "a second canary named 'c' (the first is at mesh.yaml:5)"),
]


@pytest.mark.parametrize("text, line, field, words", ERRORS + CANARY_ERRORS,
                         ids=[f"{i}:{e[2] or 'yaml'}" for i, e in enumerate(ERRORS + CANARY_ERRORS)])
def test_every_error_names_file_line_field_and_what_was_expected(text, line, field, words):
    with pytest.raises(ConfigError) as info:
        compose(text)
    msg = str(info.value)
    assert msg.startswith(f"{SRC}:{line}: " + (f"{field}: " if field else "")), msg
    assert words in msg, msg


def test_a_valid_canary_and_its_defaults():
    cfg, _ = compose(C + "    steps: [5, 100]\n")
    (c,) = cfg.canaries
    assert (c.steps, c.interval_s, c.analysis_window_s, c.max_error_percent, c.max_p99_latency_ratio, c.min_requests) \
        == ((5, 100), 60.0, 60.0, 1.0, None, 100)


# -- the merge of apply: over the current config, object by object -----------------------------

BASE = textwrap.dedent("""\
    services:
      catalog: {versions: [v1, v2]}
      pricing: {versions: [v1]}
    routes:
      - service: catalog
        destinations: [{version: v1, weight: 100}]
      - service: pricing
        destinations: [{version: v1}]
    policies:
      - {name: a, service: catalog, action: DENY}
      - {name: b, service: pricing, action: AUDIT}
    """)


def test_merge_replaces_objects_by_name_and_a_services_routes_as_one_list():
    _, base = compose(BASE)
    base_yaml = yaml.safe_dump(base, sort_keys=False)
    change = textwrap.dedent("""\
        services:
          pricing: {versions: [v1, v2], mtls: strict}
          tax: {versions: [v1]}
        routes:
          - service: catalog
            match: [{path: {prefix: /beta}}]
            destinations: [{version: v2}]
          - service: catalog
            destinations: [{version: v1, weight: 50}, {version: v2, weight: 50}]
        policies:
          - {name: b, service: tax, action: ALLOW}
        """)
    cfg, mesh = compose(change, base_yaml)
    assert list(cfg.services) == ["catalog", "pricing", "tax"]
    assert cfg.services["pricing"].mtls == "strict" and cfg.services["pricing"].versions == ("v1", "v2")
    assert [len(r.destinations) for r in cfg.routes["catalog"]] == [1, 2]  # both new; the old one is gone
    assert len(cfg.routes["pricing"]) == 1  # untouched
    assert [(p.name, p.service) for p in cfg.policies] == [("a", "catalog"), ("b", "tax")]
    # merging the same change again changes nothing
    assert compose(change, yaml.safe_dump(mesh, sort_keys=False))[1] == mesh


def test_merge_checks_references_across_old_and_new_objects():
    _, base = compose(BASE)
    base_yaml = yaml.safe_dump(base, sort_keys=False)
    # a new route may name an old service...
    cfg, _ = compose("routes:\n  - service: pricing\n    destinations: [{version: v1, weight: 100}]\n", base_yaml)
    assert cfg.routes["pricing"][0].destinations[0].weight == 100
    # ...and a changed service must still hold what old objects name: the error says where the old one is
    with pytest.raises(ConfigError) as info:
        compose("services:\n  catalog: {versions: [v2]}\n", base_yaml)
    line = base_yaml.splitlines().index("  - version: v1") + 1
    assert str(info.value).startswith(f"config version 1:{line}: routes[0].destinations[0].version: "
                                      f"service 'catalog' has no version 'v1' (declares v2)"), str(info.value)


# -- properties: nothing but ConfigError, ever -----------------------------------------------

def _only_config_errors(text: str) -> None:
    try:
        cfg, mesh = compose(text)
    except ConfigError as exc:
        assert str(exc).startswith(SRC), str(exc)
    else:
        assert isinstance(cfg, MeshConfig)
        parse_config(json.dumps(mesh), "pushed")  # what validates strictly, a sidecar takes


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_to_validate_raises_only_config_errors(text):
    _only_config_errors(text)


YAML_BITS = ["services", "routes", "policies", "canaries", "versions", "ports", "port", "protocol", "steps",
             "baseline", "canary", "interval", "thresholds", "catalog", "v1", "v2", "weight", "destinations",
             "service", "name", "http", "100", "50", ":", ": ", "- ", "\n", "\n  ", "\n    ", "\n      ", "{", "}",
             "[", "]", ", ", "---\n", "...\n", "&a ", "*a", "<<: ", "!!binary ", "!!set ", "'", '"', "#", "\t",
             "2020-99-99", "~", "true", "1m", "[v1, v2]"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(YAML_BITS), max_size=50).map("".join))
def test_yaml_shaped_text_to_validate_raises_only_config_errors(text):
    _only_config_errors(text)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["v1", "v2", "catalog", "http", "grpc", "1m", "tcp"]))
keys = st.sampled_from(["services", "routes", "policies", "canaries", "versions", "ports", "port", "protocol",
                        "steps", "baseline", "canary", "interval", "thresholds", "max_error_percent", "catalog",
                        "service", "destinations", "version", "weight", "name", "endpoints"])
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(st.lists(documents, min_size=1, max_size=3))
def test_arbitrary_yaml_documents_raise_only_config_errors(docs):
    _only_config_errors(yaml.safe_dump_all(docs))


@pytest.mark.parametrize("text, words", [
    ("[" * 5000, "nested too deeply"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")) + "services: {x: *h}\n",
     "once anchors are expanded"),
])
def test_hostile_yaml_is_a_config_error(text, words):
    with pytest.raises(ConfigError, match=words):
        compose(text)
