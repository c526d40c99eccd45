"""The versioned config history: apply, get, history, rollback, subscribers, locking, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracemesh.collector._config_store import ConfigStore, ConfigStoreError, ControlDirBusy, UnknownVersion
from tracemesh.proxy._config import ConfigError, parse_config

V1 = textwrap.dedent("""\
    services:
      catalog: {versions: [v1, v2], ports: [{port: 8080, protocol: http}]}
    ---
    routes:
      - service: catalog
        destinations: [{version: v1, weight: 100}]
    """)
SHIFT = "routes:\n  - service: catalog\n    destinations: [{version: v1, weight: 80}, {version: v2, weight: 20}]\n"


def files(directory) -> dict[str, bytes]:
    vdir = directory / "versions"
    return {p.name: p.read_bytes() for p in sorted(vdir.iterdir())} if vdir.exists() else {}


def test_apply_get_history_rollback(tmp_path):
    with ConfigStore(tmp_path) as store:
        assert store.current() is None and store.history() == []
        seen: list[tuple[int, str]] = []
        store.on_change(lambda v: seen.append((v.version, threading.current_thread().name)))
        v1 = store.apply(V1, "a.yaml")
        assert (v1.version, v1.message) == (1, "apply a.yaml")
        assert store.apply(V1, "a.yaml") is v1  # unchanged: no new version
        v2 = store.apply(SHIFT, "shift.yaml")
        assert v2.version == 2 and v2.mesh["services"] == v1.mesh["services"]  # merged: the service stays
        assert v2.config().routes["catalog"][0].destinations[1].weight == 20
        v3 = store.rollback(1)
        assert (v3.version, v3.message, v3.mesh, v3.digest) == (3, "rollback to 1", v1.mesh, v1.digest)
        assert store.rollback(3) is v3  # already that content
        assert [s["version"] for s in store.history()] == [1, 2, 3]
        assert store.get(2).mesh == v2.mesh and store.get(2).yaml.startswith("# tracemesh mesh config, version 2")
        assert seen == [(1, "MainThread"), (2, "MainThread"), (3, "MainThread")]
        with pytest.raises(UnknownVersion):
            store.get(9)
        with pytest.raises(UnknownVersion):
            store.rollback(0)
        v4 = store.apply("services:\n  tax: {}\n", "tax.yaml", replace=True, message="only tax")
        assert list(v4.mesh["services"]) == ["tax"] and v4.mesh["routes"] == [] and v4.message == "only tax"
        parse_config(json.dumps(v4.mesh))  # what a sidecar does with it
    with ConfigStore(tmp_path) as again:  # survives a restart
        assert again.current().mesh == v4.mesh and again.current().version == 4
        assert [s["digest"] for s in again.history()] == [v1.digest, v2.digest, v1.digest, v4.digest]


@pytest.mark.parametrize("bad", [
    "services: [\n",  # syntax
    "services:\n  catalog: {versions: v1}\n",  # type
    "services:\n  catalog: {subsets: [v1]}\n",  # unknown field
    "routes:\n  - service: nope\n    destinations: [{version: v1}]\n",  # dangling service
    "routes:\n  - service: catalog\n    destinations: [{version: v9}]\n",  # dangling subset
    SHIFT.replace("20}", "10}"),  # weights
    "routes:\n  - service: catalog\n    destinations: [{version: v1}]\n    match: [{path: {regex: '[z-a]'}}]\n",  # regex
    "services:\n  tax: {}\n---\nservices:\n  tax: {}\n",  # duplicate across documents
    "services:\n  tax: {}\n---\nroutes:\n  - service: tax\n    destinations: [{version: v1}]\n",  # second document
    "services:\n  catalog: {versions: [v2]}\n",  # breaks a route kept from the current config
])
def test_an_invalid_apply_changes_nothing(tmp_path, bad):
    with ConfigStore(tmp_path) as store:
        store.apply(V1, "a.yaml")
        before, hist = files(tmp_path), store.history()
        calls = []
        store.on_change(calls.append)
        with pytest.raises(ConfigError) as info:
            store.apply(bad, "bad.yaml")
        assert str(info.value).startswith(("bad.yaml:", "config version 1:")), str(info.value)
        assert files(tmp_path) == before and store.history() == hist and store.current().version == 1 and not calls


def test_error_in_a_kept_object_says_how_to_resolve_it(tmp_path):
    with ConfigStore(tmp_path) as store:
        store.apply(V1, "a.yaml")
        with pytest.raises(ConfigError, match=r"^config version 1:\d+: routes\[0\].destinations\[0\].version: .*"
                                              r"kept from the current config.*--replace"):
            store.apply("services:\n  catalog: {versions: [v2]}\n", "b.yaml")
        # changing both in one apply is fine
        v = store.apply("services:\n  catalog: {versions: [v2]}\nroutes:\n  - service: catalog\n"
                        "    destinations: [{version: v2}]\n", "b.yaml")
        assert v.version == 2


def test_a_second_owner_is_refused_with_a_clear_error(tmp_path):
    with ConfigStore(tmp_path):
        with pytest.raises(ControlDirBusy, match=rf"in use by another collector \(pid {os.getpid()}\).*--control-dir"):
            ConfigStore(tmp_path)
    ConfigStore(tmp_path).close()  # free again once closed


def test_subscriber_errors_do_not_undo_a_version_and_unsubscribe_works(tmp_path):
    with ConfigStore(tmp_path) as store:
        got = []
        store.on_change(lambda v: 1 / 0)
        off = store.on_change(got.append)
        assert store.apply(V1, "a.yaml").version == 1 and got[0].version == 1
        off()
        store.apply(SHIFT, "b.yaml")
        assert len(got) == 1 and store.current().version == 2


def test_damaged_files_stop_the_store_and_leftovers_of_a_crash_are_swept(tmp_path):
    with ConfigStore(tmp_path) as store:
        store.apply(V1, "a.yaml")
        store.apply(SHIFT, "b.yaml")
    leftover = tmp_path / "versions" / ".00000003.json.1a2b3c4d.tmp"
    leftover.write_bytes(b'{"torn')  # what a crash inside write_atomic leaves: never renamed
    with ConfigStore(tmp_path) as store:
        assert store.current().version == 2 and not leftover.exists()
    v2 = tmp_path / "versions" / "00000002.json"
    doc = json.loads(v2.read_bytes())
    doc["mesh"]["routes"] = []
    v2.write_text(json.dumps(doc))
    with pytest.raises(ConfigStoreError, match="00000002.json is damaged"):
        ConfigStore(tmp_path)
    v2.write_bytes(b"{")
    with pytest.raises(ConfigStoreError, match="00000002.json is damaged"):
        ConfigStore(tmp_path)


def test_concurrent_applies_make_one_version_each_in_order(tmp_path):
    with ConfigStore(tmp_path) as store:
        store.apply(V1, "a.yaml")
        order = []
        store.on_change(lambda v: order.append(v.version))

        def shift(i: int) -> None:
            w = 1 + i
            store.apply(f"routes:\n  - service: catalog\n    destinations: [{{version: v1, weight: {100 - w}}}, "
                        f"{{version: v2, weight: {w}}}]\n", f"t{i}.yaml")

        threads = [threading.Thread(target=shift, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert order == list(range(2, 10)) and [s["version"] for s in store.history()] == list(range(1, 10))


CHILD = textwrap.dedent("""\
    import sys
    from tracemesh.collector._config_store import ConfigStore
    store = ConfigStore(sys.argv[1], keep=20)  # small: crashes also land while old versions are removed
    i = 0
    while True:
        i += 1
        w = i % 99 + 1
        v = store.apply(f"services:\\n  catalog: {{versions: [v1, v2]}}\\nroutes:\\n  - service: catalog\\n"
                        f"    destinations: [{{version: v1, weight: {100 - w}}}, {{version: v2, weight: {w}}}]\\n"
                        f"    name: r{i}\\n", "loop.yaml")
        # one write per line: under PYTHONUNBUFFERED print() writes each piece with its own system
        # call, and a kill between them left a torn line ("12 ")
        sys.stdout.write(f"{v.version} {v.digest}\\n")
        sys.stdout.flush()
    """)


def test_kill_9_during_applies_never_loses_or_tears_a_version(tmp_path):
    """SIGKILL at arbitrary points of an apply loop: every acknowledged version the history still
    keeps survives, whole, numbered without gaps, and the history opens (its lock freed by the kernel)."""
    acked: dict[int, str] = {}
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.4 + 0.13 * round_)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        for line in out.split("\n")[:-1]:  # whole lines only: the last piece is empty or cut by the kill
            n, d = line.split()
            acked[int(n)] = d
    assert len(acked) > 10, "the child never got going"
    with ConfigStore(tmp_path, keep=20) as store:
        hist = store.history()
        numbers = [s["version"] for s in hist]
        assert numbers == list(range(numbers[-1] - len(numbers) + 1, numbers[-1] + 1)) and len(numbers) <= 20
        assert max(acked) <= numbers[-1]
        for n, d in acked.items():
            if n >= numbers[0]:
                assert store.get(n).digest == d
        for s in hist:
            store.get(s["version"]).config()
        assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".")]


def test_an_empty_apply_is_refused(tmp_path):
    with ConfigStore(tmp_path) as store:
        for text in ("", "# nothing\n", "---\n---\n"):
            with pytest.raises(ConfigError, match="^e.yaml: no YAML documents"):
                store.apply(text, "e.yaml")
        assert store.current() is None


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.text(max_size=6),
                     st.sampled_from(["v1", "v2", "v3", "catalog", "tax", "http", "1m"]))
_keys = st.sampled_from(["services", "routes", "policies", "canaries", "versions", "ports", "service",
                         "destinations", "version", "weight", "name", "catalog", "tax", "action", "match"])
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_keys, inner, max_size=4)), max_leaves=25)


@pytest.fixture
def store_v1(tmp_path):
    with ConfigStore(tmp_path) as store:
        store.apply(V1, "a.yaml")
        yield store


# validate only reads, so one store serves every example
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(_docs, min_size=1, max_size=3), replace=st.booleans())
def test_validate_over_a_current_config_raises_only_config_errors(store_v1, docs, replace):
    try:
        store_v1.validate(yaml.safe_dump_all(docs), "h.yaml", replace=replace)
    except ConfigError as exc:
        assert str(exc).startswith(("h.yaml", "config version 1:")), str(exc)


def test_the_history_keeps_the_newest_versions_and_says_when_one_was_removed(tmp_path):
    weights = [(100 - w, w) for w in range(0, 100, 10)]  # ten distinct configs
    with ConfigStore(tmp_path, keep=3) as store:
        store.apply(V1, "a.yaml")
        for v1w, v2w in weights[1:6]:
            store.apply(f"routes:\n  - service: catalog\n    destinations: [{{version: v1, weight: {v1w}}}, "
                        f"{{version: v2, weight: {v2w}}}]\n", "shift.yaml")
        assert store.current().version == 6
        assert [s["version"] for s in store.history()] == [4, 5, 6]
        assert list(files(tmp_path)) == ["00000004.json", "00000005.json", "00000006.json"]
        with pytest.raises(UnknownVersion, match=r"version 2 was removed from the history, which keeps the newest 3 "
                                                 r"\(versions 4-6\)"):
            store.rollback(2)
        with pytest.raises(UnknownVersion, match=r"no config version 7 \(versions 4-6\)"):
            store.get(7)
        d4 = store.get(4).digest
        v7 = store.rollback(4)  # a kept version still rolls back, and numbering goes on
        assert v7.version == 7 and v7.digest == d4
        assert [s["version"] for s in store.history()] == [5, 6, 7]
    # reopened with a smaller limit: trimmed at once, numbering continues after the newest
    with ConfigStore(tmp_path, keep=1) as store:
        assert [s["version"] for s in store.history()] == [7] and list(files(tmp_path)) == ["00000007.json"]
        assert store.apply(V1, "a.yaml", replace=True).version == 8
        assert list(files(tmp_path)) == ["00000008.json"]
    with pytest.raises(ValueError, match="at least 1"):
        ConfigStore(tmp_path / "other", keep=0)


def test_the_collector_takes_the_history_limit_from_its_command_line():
    from tracemesh.cli import build_parser

    args = build_parser().parse_args(["collector", "--store", "x", "--config-history", "5"])
    assert args.config_history == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["collector", "--store", "x", "--config-history", "0"])
