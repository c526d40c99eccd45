"""A real ``tracemesh collector`` for the control plane tests, and the CLI run as users run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from collector_proc import CollectorProcess

from tracemesh.net import free_port


class Collector(CollectorProcess):
    """``tracemesh collector`` on free loopback ports with its own store and config history."""

    def __init__(self, cmd: list[str], store: Path, log: Path, control_dir: Path | None = None) -> None:
        self.cmd, self.store, self.log, self.control_dir = cmd, Path(store), Path(log), control_dir
        self.proc: subprocess.Popen | None = None

    def popen(self) -> subprocess.Popen:
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        extra = ["--control-dir", str(self.control_dir)] if self.control_dir else []
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.cmd, "collector", "--store", str(self.store), "--otlp-grpc", f"127.0.0.1:{free_port()}",
                 "--otlp-http", "off", "--api", f"127.0.0.1:{self.api_port}", *extra],
                stdout=out, stderr=subprocess.STDOUT)
        return self.proc

    def start(self) -> "Collector":
        self.popen()
        self.wait_http_ready()
        return self


@pytest.fixture(scope="module")
def collector_factory(tmp_path_factory, tracemesh_cmd):
    """Make collectors (not started); each is killed when the module is done."""
    made: list[Collector] = []

    def make(store: Path | None = None, control_dir: Path | None = None) -> Collector:
        base = tmp_path_factory.mktemp("collector")
        c = Collector(tracemesh_cmd, store or base / "store", base / "collector.log", control_dir)
        made.append(c)
        return c

    yield make
    for c in made:  # what these tests keep is the config history, which a kill cannot harm: no need to drain
        c.kill()


@pytest.fixture(scope="session")
def tm(tracemesh_cmd):
    """Run one ``tracemesh`` command to completion, as from a shell (optionally with stdin)."""

    def run(*args: str, stdin: str | None = None, api: str | None = None, timeout: float = 60.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TRACEMESH_API", None)
        if api:
            env["TRACEMESH_API"] = api
        return subprocess.run([*tracemesh_cmd, *args], input=stdin, capture_output=True, text=True,
                              timeout=timeout, env=env)

    return run
