"""Fixtures of the identity tests: a CA per test, openssl, real TLS servers on loopback."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from idhelpers import TLSServer

from tracemesh.collector._ca import MeshCA


@pytest.fixture(scope="session")
def openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl is not installed (Debian package: openssl)")
    return exe


@pytest.fixture
def ca(tmp_path) -> MeshCA:
    return MeshCA.init(tmp_path / "ca")


@pytest.fixture
def bundle_file(ca, tmp_path) -> Path:
    path = tmp_path / "bundle.pem"
    path.write_bytes(ca.bundle_pem())
    return path


@pytest.fixture
def tls_server():
    servers: list[TLSServer] = []

    def start(context: ssl.SSLContext, on_accept=None) -> TLSServer:
        s = TLSServer(context, on_accept)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()
