"""A whole local mesh as real processes: one collector, and each workload behind its own sidecar.

Used by ``tracemesh demo`` and by the end-to-end tests. Every child runs in its own session (so a
Ctrl-C at the terminal reaches only the supervisor, which stops the children in order) and asks the
kernel for SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``, see :mod:`tracemesh._proc`), so no
process is left behind even when the supervisor is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracemesh._proc import python_cmd
from tracemesh.net import Addr, free_port, wait_for_port

#: (service, version) of the demo's workloads; catalog v2 is the canary.
WORKLOADS = (("frontend", "v1"), ("catalog", "v1"), ("catalog", "v2"), ("pricing", "v1"))
#: The canary's share of catalog traffic while it is under observation.
CANARY_WEIGHTS = {"v1": 80, "v2": 20}
START_TIMEOUT_S = 60.0  # cold imports of grpc + chdb on a busy 2-core machine take seconds
STOP_TIMEOUT_S = 15.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Workload:
    service: str
    version: str
    app: Addr
    inbound: Addr
    outbound: Addr

    @property
    def name(self) -> str:
        return f"{self.service}-{self.version}"


@dataclass
class LocalMesh:
    store: Path
    workdir: Path
    host: str = "127.0.0.1"
    python: str = sys.executable
    procs: list[Proc] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.otlp = Addr(self.host, free_port(self.host))
        self.api = Addr(self.host, free_port(self.host))
        self.otlp_http = Addr(self.host, free_port(self.host))
        self.workloads = [
            Workload(s, v, *(Addr(self.host, free_port(self.host)) for _ in range(3))) for s, v in WORKLOADS
        ]

    @property
    def api_url(self) -> str:
        return f"http://{self.api}"

    @property
    def entry(self) -> Workload:
        """The frontend's workload: load enters the mesh at its sidecar's inbound listener."""
        return self.workloads[0]

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        f = open(log, "wb")
        try:
            popen = subprocess.Popen(
                python_cmd(*args, python=self.python),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            f.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def config(self) -> dict:
        services: dict[str, dict] = {}
        for w in self.workloads:
            services.setdefault(w.service, {"endpoints": []})["endpoints"].append(
                {"address": str(w.inbound), "version": w.version}
            )
        routes = [
            {"service": "catalog", "destinations": [{"version": v, "weight": wt} for v, wt in CANARY_WEIGHTS.items()]}
        ]
        return {"services": services, "routes": routes}

    def start(self, progress=lambda msg: None) -> None:
        """Start collector, sidecars and apps; return when all listen. Raises RuntimeError with logs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "mesh.yaml"
        # JSON is YAML: no emitter quirks, and the file stays readable.
        cfg.write_text(json.dumps(self.config(), indent=2))
        progress("starting collector")
        self._spawn(
            "collector",
            ["-m", "tracemesh", "collector", "--store", str(self.store), "--otlp-grpc", str(self.otlp), "--otlp-http", str(self.otlp_http),
             "--api", str(self.api)],
        )
        for w in self.workloads:
            self._spawn(
                f"sidecar-{w.name}",
                ["-m", "tracemesh", "sidecar", "--service", w.service, "--version", w.version, "--app", str(w.app),
                 "--inbound", str(w.inbound), "--outbound", str(w.outbound), "--collector", str(self.otlp),
                 "--config", str(cfg)],
            )
            self._spawn(
                f"app-{w.name}",
                ["-m", "tracemesh.demo.app", "--service", w.service, "--version", w.version, "--port", str(w.app.port),
                 "--outbound", str(w.outbound), "--collector", str(self.otlp)],
            )
        progress(f"starting {len(self.workloads)} workloads, each behind its sidecar")
        self._wait_ready()

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + START_TIMEOUT_S
        targets = [(self.api, "collector")] + [
            (a, f"{w.name}") for w in self.workloads for a in (w.app, w.inbound, w.outbound)
        ]
        for addr, name in targets:
            while True:
                self.check_alive()
                try:
                    wait_for_port(addr, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not listen on {addr} within {START_TIMEOUT_S:.0f}s") from None
        while True:  # the API answers /ready only once the store and the receiver are up
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("collector did not become ready")
            time.sleep(0.1)

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code is not None:
                raise RuntimeError(f"{p.name} exited with code {code}:\n{p.tail()}")

    def _stop(self, procs: list[Proc]) -> dict[str, int]:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            try:
                codes[p.name] = p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                codes[p.name] = p.popen.wait()
        return codes

    def stop_workloads(self) -> dict[str, int]:
        """SIGTERM apps, then sidecars (apps flush their spans through the collector, sidecars theirs)."""
        apps = [p for p in self.procs if p.name.startswith("app-")]
        sidecars = [p for p in self.procs if p.name.startswith("sidecar-")]
        return {**self._stop(apps), **self._stop(sidecars)}

    def stop_collector(self) -> dict[str, int]:
        return self._stop([p for p in self.procs if p.name == "collector"])

    def close(self) -> None:
        """Stop whatever still runs, in dependency order; safe to call more than once."""
        self.stop_workloads()
        self.stop_collector()

    def __enter__(self) -> "LocalMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
