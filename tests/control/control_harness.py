"""Real parts for the config distribution tests: a collector process with its control plane on free
ports, config applied through its HTTP API, ``/api/proxies`` polled, and the sidecar harness of
tests/proxy (sidecar subprocesses, upstream apps).

A helper module, not a conftest, so that it composes with the other tests of this folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from collector_proc import wait_ready  # noqa: E402
from sidecar_harness import SidecarProc, Upstream, distinct_ports  # noqa: E402,F401

from tracemesh._proc import DIE_WITH_PARENT  # noqa: E402
from tracemesh.net import Addr, free_port  # noqa: E402

class ControlCollector:
    """``tracemesh collector`` with config distribution on a free port (and a short endpoint grace)."""

    def __init__(self, workdir: Path, grace_s: float = 3.0, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.log = workdir / "collector.log"
        self.grace_s = grace_s
        self.extra = extra
        self.otlp = Addr("127.0.0.1", free_port())
        self.api = f"http://127.0.0.1:{free_port()}"
        self.control = Addr("127.0.0.1", free_port())
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ControlCollector":
        cmd = [sys.executable, "-c", DIE_WITH_PARENT, "-m", "tracemesh", "collector", "--store", str(self.store),
               "--otlp-grpc", str(self.otlp), "--otlp-http", "off", "--api", self.api.removeprefix("http://"),
               "--control", str(self.control), "--endpoint-grace", str(self.grace_s), *self.extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_ready(self, lambda: self.get("/ready", raw=True) == b"ready\n" and "config distribution" in self.output())
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.api + path, timeout=10) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def apply(self, mesh: dict | str) -> dict:
        """Apply *mesh* (a dict, sent as JSON, which is YAML) as the whole config; the API's answer."""
        body = (mesh if isinstance(mesh, str) else json.dumps(mesh)).encode()
        req = urllib.request.Request(self.api + "/api/config?replace=1", data=body, method="POST",
                                     headers={"content-type": "application/yaml"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"apply refused: {exc.read().decode()}") from None

    def proxies(self) -> dict:
        return self.get("/api/proxies")

    def wait_proxies(self, pred, timeout: float = 20.0, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                doc = self.proxies()
            except OSError:
                doc = None
            if doc is not None and pred(doc):
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached within {timeout}s: {what}\n{json.dumps(doc, indent=1)}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def all_synced(n: int, version_prefix: str | None = None, endpoints: int | None = None):
    """A predicate on /api/proxies: *n* sidecars connected, every one SYNCED (to a version that
    starts with *version_prefix*, e.g. ``c3.``), no change waiting to be pushed, and (given
    *endpoints*) that many registered endpoints."""
    def pred(doc: dict) -> bool:
        ps = doc["proxies"]
        if endpoints is not None and sum(map(len, doc["endpoints"].values())) != endpoints:
            return False
        return (len(ps) == n and all(p["status"] == "SYNCED" for p in ps) and not doc["pending"]
                and (version_prefix is None or doc["version"].startswith(version_prefix)))
    return pred


def control_sidecar(workdir: Path, collector: ControlCollector, service: str, app: Addr, version: str = "v1",
                    extra: tuple[str, ...] = ()) -> SidecarProc:
    return SidecarProc(workdir, service, app, collector.otlp, None, version,
                       extra=("--control", str(collector.control), *extra))


class Load:
    """Closed-loop HTTP/1.1 load through a sidecar's outbound listener to ``service`` (Host header),
    on a few threads with kept-alive connections; counts answers by status and version seen."""

    def __init__(self, outbound: Addr, service: str, threads: int = 3, path: str = "/") -> None:
        import http.client

        self._http = http.client
        self.outbound, self.service, self.path = outbound, service, path
        self.ok = 0
        self.failed: list[str] = []
        self.by_target: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        conn = None
        while not self.stop_ev.is_set():
            try:
                if conn is None:
                    conn = self._http.HTTPConnection(self.outbound.host, self.outbound.port, timeout=10)
                conn.request("GET", self.path, headers={"Host": self.service})
                resp = conn.getresponse()
                body = resp.read()
                with self.lock:
                    if resp.status == 200:
                        self.ok += 1
                        who = json.loads(body).get("service", "?")
                        self.by_target[who] = self.by_target.get(who, 0) + 1
                    else:
                        self.failed.append(f"{resp.status} {resp.getheader('x-tracemesh-flags', '')} {body[:200]!r}")
            except (OSError, self._http.HTTPException) as exc:
                with self.lock:
                    self.failed.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.005)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.by_target)

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(15)
