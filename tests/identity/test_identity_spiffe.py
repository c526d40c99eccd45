"""SPIFFE ID parsing: the spec's rules, by example and by property."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.identity import MAX_SPIFFE_ID_BYTES, SpiffeId, SpiffeIdError

TD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
PATH_ALPHABET = TD_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The spec's grammar, written independently of the parser, as the oracle.
ORACLE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def oracle_valid(text: str) -> bool:
    if not ORACLE.fullmatch(text) or len(text.encode()) > MAX_SPIFFE_ID_BYTES:
        return False
    td, _, path = text[len("spiffe://"):].partition("/")
    if len(td) > 255:
        return False
    return not any(seg in (".", "..") for seg in path.split("/"))


def test_workload_id_round_trip():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    assert sid.trust_domain == "cluster.local"
    assert sid.path == "/ns/default/sa/web"
    assert (sid.namespace, sid.service_account, sid.is_workload) == ("default", "web", True)
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert sid == SpiffeId.workload("default", "web")
    assert sid.member_of("cluster.local") and not sid.member_of("other")


def test_non_workload_ids_are_valid_spiffe_ids():
    assert SpiffeId.parse("spiffe://example.org").path == ""
    sid = SpiffeId.parse("spiffe://example.org/some/path_with-Mixed.Case")
    assert not sid.is_workload and sid.namespace is None


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("http://cluster.local/ns/a/sa/b", "scheme"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "lowercase"),
    ("spiffe:/cluster.local/ns/a", "scheme"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///ns/a/sa/b", "trust domain is missing"),
    ("spiffe://Cluster.local/ns/a/sa/b", "lowercase"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "userinfo"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
    ("spiffe://cluster.local/", "trailing slash"),
    ("spiffe://cluster.local/ns//sa/b", "empty segments"),
    ("spiffe://cluster.local/ns/./sa/b", "dot segments"),
    ("spiffe://cluster.local/ns/../sa/b", "dot segments"),
    ("spiffe://cluster.local/ns/a%20b", "percent-encoding"),
    ("spiffe://clu%73ter.local/ns/a", "percent-encoding"),
    ("spiffe://cluster.local/ns/a b", "path segment characters"),
    ("spiffe://cluster.local/ns/é", "path segment characters"),
    ("spiffe://clus ter.local/x", "trust domain characters"),
    ("spiffe://" + "a" * 256 + "/x", "255"),
    ("spiffe://cluster.local/" + "a" * 2030, "2048"),
])
def test_invalid_ids_name_the_rule(text, message):
    with pytest.raises(SpiffeIdError, match=message):
        SpiffeId.parse(text)


def test_constructor_validates_too():
    with pytest.raises(SpiffeIdError):
        SpiffeId("Cluster.local", "/ns/a")
    with pytest.raises(SpiffeIdError):
        SpiffeId.workload("..", "web")
    with pytest.raises(TypeError):
        SpiffeId.parse(b"spiffe://cluster.local/x")  # type: ignore[arg-type]


def test_length_limit_is_in_bytes_and_inclusive():
    base = "spiffe://cluster.local/"
    exact = base + "a" * (MAX_SPIFFE_ID_BYTES - len(base))
    assert len(str(SpiffeId.parse(exact)).encode()) == MAX_SPIFFE_ID_BYTES
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(exact + "a")


segments = st.text(PATH_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
trust_domains = st.text(TD_ALPHABET, min_size=1, max_size=40)


@given(trust_domains, st.lists(segments, max_size=6))
def test_valid_ids_round_trip(td, segs):
    text = "spiffe://" + td + "".join("/" + s for s in segs)
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert SpiffeId(sid.trust_domain, sid.path) == sid
    assert sid.trust_domain == td


@given(trust_domains, segments, segments)
def test_workload_ids_expose_namespace_and_account(td, ns, sa):
    sid = SpiffeId.parse(f"spiffe://{td}/ns/{ns}/sa/{sa}")
    assert (sid.namespace, sid.service_account) == (ns, sa)


# Texts close to the grammar's edges: the scheme (or not), then characters that matter.
near_misses = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["spiffe://", "spiffe://", "spiffe:/", "Spiffe://", ""]),
    st.text("abAZ09.-_/:@?#%é \x00", max_size=40),
)


@settings(max_examples=400)
@given(st.one_of(near_misses, st.text(max_size=60)))
def test_parser_agrees_with_the_grammar(text):
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        assert not oracle_valid(text), text
    else:
        assert oracle_valid(text), text
        assert str(sid) == text
