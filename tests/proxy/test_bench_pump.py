"""benchmarks/_pump.py, the byte pumps benchmarks/proxy.py measures as the event loop's floor:
a floor that did not forward every byte both ways would flatter nothing and mean nothing."""

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sidecar_harness import Upstream, pattern_sha256

from tracemesh.net import free_port

PUMP = Path(__file__).resolve().parents[2] / "benchmarks" / "_pump.py"
KINDS = ["trio", "asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


def _wait(port: int, proc: subprocess.Popen) -> None:
    import socket
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, "the pump exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the pump never listened"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def app():
    a = Upstream("pump-app")
    yield a
    a.close()


@pytest.mark.parametrize("kind", KINDS)
def test_two_pumps_in_a_row_carry_requests_and_bodies_both_ways(kind, app, curl, tmp_path):
    inner, outer = free_port(), free_port()
    pumps = [subprocess.Popen([sys.executable, str(PUMP), kind, str(inner), str(app.addr.port)]),
             subprocess.Popen([sys.executable, str(PUMP), kind, str(outer), str(inner)])]
    try:
        _wait(inner, pumps[0])
        _wait(outer, pumps[1])
        body = tmp_path / "body"
        body.write_bytes(bytes(range(256)) * 1000)  # 256 KB up
        down = tmp_path / "down"
        # one curl, one kept-alive connection: a JSON echo of an upload, then 300 KB down
        r = subprocess.run([curl, "-sS", "--data-binary", f"@{body}", f"http://127.0.0.1:{outer}/echo",
                            "--next", "-sS", "-o", str(down), f"http://127.0.0.1:{outer}/bytes/300000",
                            "-w", "%{http_code} %{num_connects}"], check=False, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        echo, _, tail = r.stdout.rpartition(b"}")
        seen = json.loads(echo + b"}")
        assert seen["body_len"] == 256_000
        assert seen["body_sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()
        assert tail.split() == [b"200", b"0"]  # the second request reused the connection
        assert hashlib.sha256(down.read_bytes()).hexdigest() == pattern_sha256(300_000)
    finally:
        for p in pumps:
            p.terminate()
        for p in pumps:
            p.wait(10)


def test_the_pump_refuses_a_wrong_command_line():
    r = subprocess.run([sys.executable, str(PUMP), "tokio", "1", "2"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "usage" in r.stderr
