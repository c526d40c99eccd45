"""The sidecar's control client (Trio + h2) against the real control server, in one process:
snapshots applied to the router, local rejections NACKed with the old config kept, the cache
written and read back, reconnection after the server goes away."""

from __future__ import annotations

import json

import trio

from tracemesh.collector._discovery import ControlServer, Distributor
from tracemesh.identity import SpiffeId
from tracemesh.net import Addr, free_port
from tracemesh.proxy import _control
from tracemesh.proxy._config import parse_config
from tracemesh.proxy._control import ControlClient, local_problem
from tracemesh.proxy._router import Router


def test_local_problems_are_what_only_the_sidecar_knows():
    cfg = parse_config("services: {catalog: {endpoints: [{address: '127.0.0.1:1'}], mtls: strict,"
                       " identity: 'spiffe://td/ns/a/sa/catalog'}}")
    assert "no identity" in local_problem(cfg, "catalog", None, False)
    assert "callers would refuse it" in local_problem(cfg, "catalog", SpiffeId.parse("spiffe://td/ns/a/sa/other"), True)
    assert local_problem(cfg, "catalog", SpiffeId.parse("spiffe://td/ns/a/sa/catalog"), True) is None
    assert local_problem(cfg, "pricing", None, False) is None  # not its own service


def mesh(version: str, **catalog) -> dict:
    return {"services": {"catalog": {"endpoints": [{"address": "127.0.0.1:9001", "version": version}], **catalog}}}


def test_snapshots_nacks_cache_and_reconnects(tmp_path, monkeypatch):
    monkeypatch.setattr(_control, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setattr(_control, "BACKOFF_CAP_S", 0.2)
    port = free_port()
    dist = Distributor(grace_s=0.2, resync_hold_s=0.0)
    server = ControlServer(dist)
    server.start(f"127.0.0.1:{port}")
    dist.publish(1, mesh("v1"))
    cache = tmp_path / "cache.json"
    router = Router(parse_config(""))
    client = ControlClient(Addr("127.0.0.1", port), router, service="catalog", version="v1",
                           address=Addr("127.0.0.1", 9100), app=None, instance_id="test:1", cache=str(cache))

    async def until(pred, timeout=10.0):
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.02)

    def endpoints():
        return {(str(e.address), e.version) for e in router.endpoints("catalog")}

    async def main():
        nonlocal server
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            # its own workload registered, and merged into what it applied
            await until(lambda: endpoints() == {("127.0.0.1:9001", "v1"), ("127.0.0.1:9100", "v1")})
            assert client.applied_version.startswith("c1.")
            dist.publish(2, mesh("v1", mtls="strict"))  # this sidecar has no identity: it refuses
            await until(lambda: client.stats.nacks >= 1)
            assert "mtls is strict" in client.last_error and client.applied_version.startswith("c1.")
            assert router.config.services["catalog"].mtls == "permissive"
            await until(lambda: [p["status"] for p in dist.proxies()["proxies"]] == ["NACK"])
            dist.publish(3, mesh("v2"))
            await until(lambda: ("127.0.0.1:9001", "v2") in endpoints())
            # the cache is written after the router takes the config (in a worker thread): wait for it
            await until(lambda: json.loads(cache.read_text())["version"] == client.applied_version)
            # the control plane goes away and comes back: the router keeps its config meanwhile
            await trio.to_thread.run_sync(server.stop, 0.1)
            await until(lambda: client.stats.failures >= 1)
            assert ("127.0.0.1:9001", "v2") in endpoints()
            server = ControlServer(dist2 := Distributor(grace_s=0.2, resync_hold_s=0.0))
            await trio.to_thread.run_sync(server.start, f"127.0.0.1:{port}")
            dist2.publish(4, mesh("v3"))
            await until(lambda: ("127.0.0.1:9001", "v3") in endpoints())
            await until(lambda: json.loads(cache.read_text())["version"] == client.applied_version)
            assert client.stats.connects >= 2
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        server.stop(0.1)

    # a new sidecar process starts from the cache before any control plane answers
    router2 = Router(parse_config(""))
    again = ControlClient(Addr("127.0.0.1", free_port()), router2, service="catalog", version="v1",
                          address=Addr("127.0.0.1", 9100), app=None, instance_id="test:2", cache=str(cache))
    assert again._load_cache()
    assert {e.version for e in router2.endpoints("catalog")} == {"v3", "v1"}
