"""The mesh config model: YAML -> frozen objects; every error names file:line: field."""

from __future__ import annotations

import dataclasses
import re
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.net import Addr
from tracemesh.proxy import ConfigError, MeshConfig, load_config, parse_config
from tracemesh.proxy._config import MAX_CONFIG_BYTES, Destination, Endpoint

SRC = "mesh.yaml"

EXAMPLE = """\
services:
  catalog:
    endpoints:
      - {address: 127.0.0.1:9001, version: v1}
      - {address: 127.0.0.1:9002, version: v2}
  pricing:
    endpoints:
      - address: "[::1]:9003"
routes:
  - service: catalog
    destinations:
      - {version: v1, weight: 80}
      - {version: v2, weight: 20}
"""


def test_example_from_the_docs_parses_into_frozen_objects():
    cfg = parse_config(EXAMPLE, SRC)
    assert set(cfg.services) == {"catalog", "pricing"}
    cat = cfg.services["catalog"]
    assert cat.endpoints == (Endpoint(Addr("127.0.0.1", 9001), "v1"), Endpoint(Addr("127.0.0.1", 9002), "v2"))
    assert cfg.services["pricing"].endpoints == (Endpoint(Addr("::1", 9003), "v1"),)  # default version v1
    assert cfg.routes["catalog"][0].destinations == (Destination("v1", 80), Destination("v2", 20))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cat.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.routes["catalog"][0].destinations[0].weight = 1  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "~\n", "null"])
def test_empty_documents_are_an_empty_mesh(text):
    assert parse_config(text, SRC) == MeshConfig.empty()


def test_json_is_yaml_too():
    text = ('{"services": {"catalog": {"endpoints": [{"address": "127.0.0.1:9001", "version": "v2"}]}},'
            ' "routes": [{"service": "catalog", "destinations": [{"version": "v2"}]}]}')
    cfg = parse_config(text, SRC)
    assert cfg.services["catalog"].endpoints[0].version == "v2"
    assert cfg.routes["catalog"][0].destinations == (Destination("v2", 1),)  # weight defaults to 1


def test_sections_may_be_empty_and_zero_weights_are_allowed_beside_others():
    assert parse_config("services:\nroutes:\n", SRC) == MeshConfig.empty()
    cfg = parse_config(textwrap.dedent("""\
        services:
          a: {endpoints: []}
          b:
            endpoints: [{address: ':80', version: v1}, {address: 'localhost:81', version: v2}]
        routes:
          - service: b
            destinations: [{version: v1, weight: 0}, {version: v2, weight: 5}]
        """), SRC)
    assert cfg.services["a"].endpoints == ()
    assert cfg.services["b"].endpoints[0].address == Addr("127.0.0.1", 80)  # empty host: loopback
    assert cfg.routes["b"][0].destinations == (Destination("v1", 0), Destination("v2", 5))


def test_yaml_anchors_and_merge_keys_work():
    cfg = parse_config(textwrap.dedent("""\
        services:
          a:
            endpoints: &eps
              - {address: '127.0.0.1:9001', version: v1}
          b:
            endpoints: *eps
        """), SRC)
    assert cfg.services["a"].endpoints == cfg.services["b"].endpoints


# Each case: the YAML, the line the error must name, the field it must name, words of the reason.
BASE = "services:\n  catalog:\n    endpoints:\n      - {address: '127.0.0.1:9001', version: v1}\n"
ERRORS = [
    ("- just\n- a list\n", 1, "", "expected a mapping"),
    ("services: {}\nextra: 1\n", 2, "extra", "unknown key"),
    ("services: [a, b]\n", 1, "services", "expected a mapping, got a list"),
    ("services:\n  Catalog: {endpoints: []}\n", 2, "services.Catalog", "not a valid service name"),
    ("services:\n  cat_log: {endpoints: []}\n", 2, "services.cat_log", "not a valid service name"),
    ("services:\n  1: {endpoints: []}\n", 2, "services.1", "not a valid service name"),
    ("services:\n  catalog: 7\n", 2, "services.catalog", "expected a mapping, got 7"),
    ("services:\n  catalog:\n    endpoint: []\n", 3, "services.catalog.endpoint", "unknown key"),
    ("services:\n  catalog: {}\n", 2, "services.catalog", "missing required key 'endpoints'"),
    ("services:\n  catalog:\n    endpoints: 127.0.0.1:80\n", 3, "services.catalog.endpoints", "expected a list"),
    ("services:\n  catalog:\n    endpoints:\n      - 127.0.0.1:80\n", 4, "services.catalog.endpoints[0]", "expected a mapping"),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1'}\n      - {version: v1}\n",
     5, "services.catalog.endpoints[1]", "missing required key 'address'"),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1', zone: a}\n", 4, "services.catalog.endpoints[0].zone", "unknown key"),
    ("services:\n  catalog:\n    endpoints:\n      - address: 8080\n", 4, "services.catalog.endpoints[0].address", "expected a non-empty string"),
    ("services:\n  catalog:\n    endpoints:\n      - address: ''\n", 4, "services.catalog.endpoints[0].address", "non-empty string"),
    ("services:\n  catalog:\n    endpoints:\n      - address: 'host:http'\n", 4, "services.catalog.endpoints[0].address", "bad port"),
    ("services:\n  catalog:\n    endpoints:\n      - address: 'host:70000'\n", 4, "services.catalog.endpoints[0].address", "out of range"),
    ("services:\n  catalog:\n    endpoints:\n      - address: 'host:0'\n", 4, "services.catalog.endpoints[0].address", "port 0"),
    ("services:\n  catalog:\n    endpoints:\n      - address: '[::1'\n", 4, "services.catalog.endpoints[0].address", "bad address"),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1', version: -v1}\n", 4, "services.catalog.endpoints[0].version", "not a valid version label"),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1', version: 2}\n", 4, "services.catalog.endpoints[0].version", "non-empty string"),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1'}\n      - {address: '127.0.0.1:1'}\n",
     5, "services.catalog.endpoints[1]", "listed twice"),
    (BASE + "routes: {service: catalog}\n", 5, "routes", "expected a list"),
    (BASE + "routes:\n  - catalog\n", 6, "routes[0]", "expected a mapping"),
    (BASE + "routes:\n  - destinations: [{version: v1}]\n", 6, "routes[0]", "missing required key 'service'"),
    (BASE + "routes:\n  - service: catalog\n", 6, "routes[0]", "missing required key 'destinations'"),
    (BASE + "routes:\n  - {service: catalog, destinations: [{version: v1}], retry: 2}\n", 6, "routes[0].retry", "unknown key"),
    (BASE + "routes:\n  - service: pricing\n    destinations: [{version: v1}]\n", 6, "routes[0].service", "no service 'pricing'"),
    (BASE + "routes:\n  - service: Catalog\n    destinations: [{version: v1}]\n", 6, "routes[0].service", "not a valid service name"),
    (BASE + "routes:\n  - {service: catalog, destinations: [{version: v1}]}\n  - {service: catalog, destinations: [{version: v1}]}\n",
     7, "routes[1].service", "a second route"),
    (BASE + "routes:\n  - service: catalog\n    destinations: {version: v1}\n", 7, "routes[0].destinations", "expected a list"),
    (BASE + "routes:\n  - service: catalog\n    destinations: []\n", 7, "routes[0].destinations", "at least one destination"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {weight: 1}\n", 8, "routes[0].destinations[0]", "missing required key 'version'"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v9}\n", 8, "routes[0].destinations[0].version", "no endpoints of version 'v9' (has v1)"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: ten}\n", 8, "routes[0].destinations[0].weight", "non-negative integer, got 'ten'"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: -1}\n", 8, "routes[0].destinations[0].weight", "non-negative integer"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: 0.5}\n", 8, "routes[0].destinations[0].weight", "non-negative integer"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: true}\n", 8, "routes[0].destinations[0].weight", "got true"),
    (BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: 0}\n", 8, "routes[0].destinations", "add up to 0"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    timeout: 2\n", 8, "routes[0].timeout", "expected a duration"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    timeout: 2 s\n", 8, "routes[0].timeout", "expected a duration"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: 2\n", 8, "routes[0].retries", "expected a mapping"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: {attempts: 2, retry_on: 'gateway-error,sometimes'}\n", 8, "routes[0].retries.retry_on", "'sometimes' is not a retry condition"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: {attempts: -1}\n", 8, "routes[0].retries.attempts", "expected an integer"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: {attempts: 1, per_try_timeout: 1h30}\n", 8, "routes[0].retries.per_try_timeout", "expected a duration"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: {attempts: 1, retriable_status_codes: [700]}\n", 8, "routes[0].retries.retriable_status_codes[0]", "100-599"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    retries: {attempts: 1, tries: 2}\n", 8, "routes[0].retries.tries", "unknown key"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {abort: {percent: 150, http_status: 503}}\n", 8, "routes[0].fault.abort.percent", "percentage"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {abort: {percent: 50}}\n", 8, "routes[0].fault.abort", "expected one of http_status or grpc_status"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {abort: {http_status: 503, grpc_status: 14}}\n", 8, "routes[0].fault.abort", "expected one of http_status or grpc_status"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {abort: {grpc_status: 17}}\n", 8, "routes[0].fault.abort.grpc_status", "0-16 or a name"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {abort: {grpc_status: NOPE}}\n", 8, "routes[0].fault.abort.grpc_status", "got 'NOPE'"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    fault: {delay: {fixed_delay: soon}}\n", 8, "routes[0].fault.delay.fixed_delay", "expected a duration"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{path: {regex: '(unclosed'}}]\n", 8, "routes[0].match[0].path.regex", "does not compile"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{path: {exact: /a, prefix: /b}}]\n", 8, "routes[0].match[0].path", "exactly one of"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{path: {present: true}}]\n", 8, "routes[0].match[0].path.present", "unknown key"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{method: get}]\n", 8, "routes[0].match[0].method", "not a valid HTTP method"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{headers: {x-user: {present: false}}}]\n", 8, "routes[0].match[0].headers.x-user.present", "expected true"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{headers: {'bad header': {exact: a}}}]\n", 8, "routes[0].match[0].headers.bad header", "not a valid header name"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{host: x}]\n", 8, "routes[0].match[0].host", "unknown key"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: []\n", 8, "routes[0].match", "empty list"),
    ("services:\n  catalog:\n    endpoints: []\n    traffic_policy: {load_balancer: fastest}\n", 4, "services.catalog.traffic_policy.load_balancer", "not a load balancer"),
    ("services:\n  catalog:\n    endpoints: []\n    traffic_policy: {connection_pool: {max_requests: 0}}\n", 4, "services.catalog.traffic_policy.connection_pool.max_requests", "expected an integer"),
    ("services:\n  catalog:\n    endpoints: []\n    traffic_policy: {outlier_detection: {interval: 1s}}\n", 4, "services.catalog.traffic_policy.outlier_detection.interval", "unknown key"),
    ("services:\n  catalog:\n    endpoints: []\n    traffic_policy: {load_balancer: {consistent_hash: {cookie: a}}}\n", 4, "services.catalog.traffic_policy.load_balancer.consistent_hash.cookie", "unknown key"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: shadow\n", 8, "routes[0].mirror", "expected a mapping"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: {percent: 10}\n", 8, "routes[0].mirror", "missing required key 'service'"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: {service: shadow}\n", 8, "routes[0].mirror.service", "no service 'shadow'"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: {service: catalog, version: v2}\n", 8, "routes[0].mirror.version", "no endpoints of version 'v2' (has v1)"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror: {service: catalog, percent: 101}\n", 8, "routes[0].mirror.percent", "percentage"),
    (BASE + "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    mirror:\n      service: catalog\n      weight: 5\n", 10, "routes[0].mirror.weight", "unknown key"),
]


@pytest.mark.parametrize("text, line, field, words", ERRORS, ids=[f"{e[2] or 'top'}:{e[3]}" for e in ERRORS])
def test_every_error_names_file_line_and_field(text, line, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    msg = str(info.value)
    prefix = f"{SRC}:{line}: " + (f"{field}: " if field else "")
    assert msg.startswith(prefix), msg
    assert words in msg, msg


@pytest.mark.parametrize("text, line, words", [
    ("services:\n  catalog: {endpoints: []}\n  catalog: {endpoints: []}\n", 3, "duplicate key 'catalog'"),
    ("services:\n  catalog: [\n", 3, "not valid YAML"),
    ("services:\n\tcatalog: {}\n", 2, "not valid YAML"),
    ("services: !!python/object:os.system {}\n", 1, "not valid YAML"),  # safe loading: no object tags
])
def test_yaml_level_errors_name_file_and_line(text, line, words):
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    msg = str(info.value)
    assert msg.startswith(f"{SRC}:{line}: "), msg
    assert words in msg, msg


@pytest.mark.parametrize("text, line", [
    ("services:\n  catalog:\n    endpoints:\n      - address: !!binary aGVsbG8=\n", 4),
    ("services: !!set {a, b}\n", 1),
    ("services:\n  catalog: !!omap [{endpoints: []}]\n", 2),
    ("routes:\n  - !!pairs [[service, catalog]]\n", 2),
    ("services:\n  catalog:\n    endpoints:\n      - {address: ':1', version: 2020-99-99}\n", 4),
    ("routes:\n  - {service: a, destinations: [{version: v1, weight: !!int ten}]}\n", 2),
    ("services:\n  x: !!float one\n", 2),
    ("services:\n  x: !!bool maybe\n", 2),
    ("services:\n  x: !!timestamp yesterday\n", 2),
    ("? [a, b]\n: 1\n", 1),
    ("services:\n  {a: 1}: {endpoints: []}\n", 2),
    ("!!binary aGVsbG8=\n", 1),
])
def test_unusual_yaml_types_are_config_errors_with_a_line(text, line):
    """Tags and keys the model has no use for are errors that say where, not crashes."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert str(info.value).startswith(f"{SRC}:{line}: "), str(info.value)


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "mesh.yaml"
    p.write_text(BASE + "routes:\n  - service: catalog\n    destinations:\n      - {version: v1, weight: ten}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}:8: routes[0].destinations[0].weight: ")):
        load_config(p)
    p.write_text(BASE)
    assert load_config(str(p)).services["catalog"].endpoints[0].address == Addr("127.0.0.1", 9001)


def test_load_config_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'absent.yaml'}: cannot read")):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("services: {caf\xe9: {endpoints: []}}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{latin}: not UTF-8 text")):
        load_config(latin)
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)


# -- property tests: nothing but ConfigError, ever ------------------------------------------

def _parse_or_config_error(text: str) -> None:
    try:
        cfg = parse_config(text, SRC)
    except ConfigError as exc:
        assert str(exc).startswith(SRC), str(exc)
    else:
        assert isinstance(cfg, MeshConfig)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises_anything_but_config_error(text):
    _parse_or_config_error(text)


YAML_BITS = ["services", "routes", "endpoints", "address", "version", "destinations", "weight", "service",
             "catalog", "v1", "127.0.0.1:9001", ":", ": ", "- ", "\n", "\n  ", "\n    ", "{", "}", "[", "]", ",",
             "? ", "&a ", "*a", "<<: ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!int ", "!!float ",
             "!!bool ", "!!timestamp ", "!!str ", "!!null ", "!!map ", "!!seq ", "!foo ", "2020-99-99", "0x1F",
             "~", "null", "true", "0", "-1", "1e3", ".inf", "'", '"', "|\n  ", ">\n  ", "#", "---\n", "...\n",
             "%YAML 1.1\n", "\t", "aGVsbG8=", "\\", "\x85", "\ufeff", "<<", "=", "!!merge ", "!!value ",
             "!!python/tuple ", "!<tag:yaml.org,2002:int> ", "&b ", "*b"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(YAML_BITS), max_size=40).map("".join))
def test_yaml_shaped_text_never_raises_anything_but_config_error(text):
    _parse_or_config_error(text)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["v1", "v2", "catalog", "127.0.0.1:9001", ":9002",
                                                           "[::1]:9003", "host:0", "-v"]))
keys = st.sampled_from(["services", "routes", "endpoints", "address", "version", "destinations", "weight",
                        "service", "catalog", "pricing", "x"])
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_arbitrary_yaml_documents_never_raise_anything_but_config_error(doc):
    _parse_or_config_error(yaml.safe_dump(doc))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["catalog", "pricing", "a-b", "x1"]), st.lists(
    st.tuples(st.integers(1, 65535), st.sampled_from(["v1", "v2", "canary.3"])), min_size=1, max_size=4,
    unique_by=lambda t: t[0]), min_size=1, max_size=3))
def test_generated_valid_configs_parse_to_what_was_written(services):
    doc = {"services": {name: {"endpoints": [{"address": f"127.0.0.1:{port}", "version": v} for port, v in eps]}
                        for name, eps in services.items()},
           "routes": [{"service": name, "destinations": [{"version": v, "weight": 3} for v in sorted({v for _, v in eps})]}
                      for name, eps in services.items()]}
    cfg = parse_config(yaml.safe_dump(doc), SRC)
    for name, eps in services.items():
        assert cfg.services[name].endpoints == tuple(Endpoint(Addr("127.0.0.1", p), v) for p, v in eps)
        assert {d.version for d in cfg.routes[name][0].destinations} == {v for _, v in eps}


ROUTING = """\
services:
  catalog:
    endpoints:
      - {address: 127.0.0.1:9001, version: v1}
      - {address: 127.0.0.1:9002, version: v2}
    traffic_policy:
      load_balancer: {consistent_hash: {header: X-User}}
      connection_pool: {max_connections: 10, max_pending_requests: 5, max_requests: 20}
      outlier_detection: {consecutive_5xx: 3, base_ejection_time: 500ms, max_ejection_percent: 50}
routes:
  - service: catalog
    name: testers
    match:
      - headers: {x-user: {exact: tester}}
      - path: {regex: '/beta/.*'}
        methods: [GET, HEAD]
        query: {debug: {present: true}}
    destinations: [{version: v2}]
    timeout: 2s
    retries: {attempts: 3, per_try_timeout: 250ms, retry_on: 'gateway-error,connect-failure', retriable_status_codes: [409]}
    fault: {delay: {percent: 10, fixed_delay: 1m}, abort: {percent: 5.5, http_status: 418}}
  - service: catalog
    destinations: [{version: v1}]
"""


def test_routes_with_matches_retries_faults_and_traffic_policy():
    from tracemesh.proxy._resilience import Limits, OutlierPolicy, RetryPolicy

    cfg = parse_config(ROUTING, SRC)
    first, second = cfg.routes["catalog"]
    assert (first.name, second.name) == ("testers", "catalog-1")  # unnamed: service-index
    assert not second.matches and second.retries is None and second.timeout_s is None and second.fault is None
    assert first.timeout_s == 2.0
    assert first.retries == RetryPolicy(3, 0.25, frozenset({"gateway-error", "connect-failure", "retriable-status-codes"}),
                                        frozenset({409}))
    assert (first.fault.delay_percent, first.fault.delay_s, first.fault.abort_percent, first.fault.abort_status) == (10.0, 60.0, 5.5, 418)
    m0, m1 = first.matches
    assert m0.matches("GET", "/x", {"x-user": "tester"}.get, {})
    assert not m0.matches("GET", "/x", {"x-user": "testers"}.get, {})
    assert m1.matches("HEAD", "/beta/a", {}.get, {"debug": ""})
    assert not m1.matches("POST", "/beta/a", {}.get, {"debug": "1"})
    assert not m1.matches("GET", "/beta/a", {}.get, {})
    tp = cfg.services["catalog"].traffic_policy
    assert (tp.load_balancer, tp.hash_header) == ("consistent_hash", "x-user")
    assert tp.limits == Limits(10, 5, 20)
    assert tp.outlier == OutlierPolicy(consecutive_5xx=3, base_ejection_s=0.5, max_ejection_percent=50.0)
    assert cfg.services["catalog"].traffic_policy != parse_config(EXAMPLE, SRC).services["catalog"].traffic_policy


def test_route_names_are_unique_per_service():
    text = ROUTING.replace("    destinations: [{version: v1}]\n", "    name: testers\n    destinations: [{version: v1}]\n")
    with pytest.raises(ConfigError, match=r"mesh.yaml:\d+: routes\[1\].name: a second route named 'testers'"):
        parse_config(text, SRC)


def test_route_mirror_parses_with_istio_defaults():
    from tracemesh.proxy._config import Mirror

    text = BASE + ("  shadow:\n    endpoints:\n      - {address: '127.0.0.1:9009', version: v2}\n"
                   "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n"
                   "    mirror: {service: shadow, version: v2, percent: 12.5}\n"
                   "  - service: shadow\n    destinations: [{version: v2}]\n    mirror: {service: catalog}\n")
    cfg = parse_config(text, SRC)
    assert cfg.routes["catalog"][0].mirror == Mirror("shadow", "v2", 12.5)
    assert cfg.routes["shadow"][0].mirror == Mirror("catalog", None, 100.0)  # no percent: all, as Istio
    assert parse_config(EXAMPLE, SRC).routes["catalog"][0].mirror is None


def test_fault_abort_takes_a_grpc_status_by_number_or_name():
    from tracemesh.proxy._config import Fault

    def fault(abort: str) -> Fault:
        text = BASE + f"routes:\n  - service: catalog\n    destinations: [{{version: v1}}]\n    fault: {{abort: {abort}}}\n"
        return parse_config(text, SRC).routes["catalog"][0].fault

    # an HTTP/1.1 request gets the HTTP status gRPC maps to (google.rpc.Code's mapping, as Envoy's)
    assert fault("{grpc_status: UNAVAILABLE, percent: 50}") == Fault(0.0, 0.0, 50.0, 503, 14)
    assert fault("{grpc_status: resource_exhausted}") == Fault(0.0, 0.0, 100.0, 429, 8)
    assert fault("{grpc_status: 12}") == Fault(0.0, 0.0, 100.0, 501, 12)
    assert fault("{grpc_status: 0}").abort_grpc_status == 0
    assert fault("{http_status: 418}").abort_grpc_status is None
