import shutil
from dataclasses import dataclass

import pytest
from sidecar_harness import OTLPReceiver, SidecarProc, Upstream, write_config

from tracemesh.net import Addr, free_port


@pytest.fixture(scope="session")
def otlp():
    """One OTLP/gRPC trace receiver for the whole session; tests find their spans by attributes."""
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl is not installed (Debian package: openssl)")
    return exe


@pytest.fixture(scope="session")
def curl() -> str:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (Debian package: curl)")
    return exe


@dataclass
class Mesh:
    """Two real sidecars: frontend (in front of the ``frontend`` app, calling out by its config) and
    catalog (in front of the ``catalog`` app). Outbound services of frontend:

    ``catalog``   -> the catalog sidecar's inbound (two hops: frontend outbound, catalog inbound)
    ``direct``    -> the catalog app itself (one hop; failure tests use it)
    ``keepalive`` -> an app only the keep-alive test talks to
    ``stale``     -> an app that closes connections idle for 0.3 s
    ``dead``      -> a port nothing listens on
    ``empty``     -> a service without endpoints
    """

    frontend: SidecarProc
    catalog: SidecarProc
    apps: dict[str, Upstream]
    dead: Addr


@pytest.fixture(scope="session")
def mesh(otlp, tmp_path_factory):
    work = tmp_path_factory.mktemp("mesh")
    apps = {name: Upstream(name) for name in ("frontend", "catalog", "keepalive")}
    apps["stale"] = Upstream("stale", idle_timeout=0.3)
    dead = Addr("127.0.0.1", free_port())
    started: list[SidecarProc] = []
    try:
        catalog = SidecarProc(work, "catalog", apps["catalog"].addr, otlp.addr)
        started.append(catalog.start())
        config = write_config(work / "frontend.yaml", {
            "catalog": [(catalog.inbound, "v1")],
            "direct": [(apps["catalog"].addr, "v1")],
            "keepalive": [(apps["keepalive"].addr, "v1")],
            "stale": [(apps["stale"].addr, "v1")],
            "dead": [(dead, "v1")],
            "empty": [],
        })
        frontend = SidecarProc(work, "frontend", apps["frontend"].addr, otlp.addr, config=config)
        started.append(frontend.start())
        yield Mesh(frontend, catalog, apps, dead)
        for sc in started:  # they must still be alive after everything the tests threw at them
            assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
    finally:
        for sc in started:
            sc.close()
        for app in apps.values():
            app.close()
