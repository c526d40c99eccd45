"""A whole local mesh as real processes: one collector, and each workload behind its own sidecar.

Used by ``tracemesh demo`` and by the end-to-end tests. The collector serves the mesh CA (a new one
in ``<workdir>/ca``); every workload gets a single-use join token for its identity
``spiffe://cluster.local/ns/demo/sa/<service>``, and every sidecar runs STRICT mTLS, so whatever
enters the mesh does so over mTLS too: :meth:`LocalMesh.client_context` is a mesh client
credential (``sa/loadgen``) for the demo's load and the tests, as an ingress gateway would hold.

The sidecars take their config from the control plane: the demo applies its mesh config
(``<workdir>/mesh.yaml``) to the collector through its API, as ``tracemesh apply`` does, and starts
every sidecar with ``--control`` (over mTLS, on the CA's port); the config names no endpoint, each
sidecar registers its own workload, and the demo waits until every sidecar has acknowledged a
snapshot holding all of them before any load starts.

Every child runs in its own session (so a
Ctrl-C at the terminal reaches only the supervisor, which stops the children in order) and asks the
kernel for SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``, see :mod:`tracemesh._proc`), so no
process is left behind even when the supervisor is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracemesh._proc import python_cmd
from tracemesh.net import Addr, free_port, wait_for_port

#: The demo's trust domain and namespace: identities are spiffe://cluster.local/ns/demo/sa/<service>.
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "demo"
#: The identity of the demo's load generator (and of the tests' requests): the mesh's way in.
CLIENT_ACCOUNT = "loadgen"

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

    @property
    def identity(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{self.service}"


@dataclass(frozen=True)
class PresentedCert:
    """What a workload's sidecar presented in a handshake: its SPIFFE ID and certificate expiry."""

    workload: str
    identity: str
    not_after: str  # ISO 8601, UTC


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
        self.ca_mtls = Addr(self.host, free_port(self.host))
        self.control = Addr(self.host, free_port(self.host))  # plaintext discovery; the sidecars use ca_mtls
        self._client_ctx: ssl.SSLContext | None = None
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

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    def config(self) -> dict:
        """The demo's mesh config. No endpoints: the sidecars register them; each service declares
        its versions, so a route can name them before their sidecars are up."""
        services: dict[str, dict] = {}
        for w in self.workloads:
            svc = services.setdefault(w.service, {"endpoints": [], "versions": [], "mtls": "strict",
                                                  "identity": w.identity})
            svc["versions"].append(w.version)
        routes = [
            {"service": "catalog", "destinations": [{"version": v, "weight": wt} for v, wt in CANARY_WEIGHTS.items()]}
        ]
        return {"services": services, "routes": routes}

    def _init_ca(self) -> list[Path]:
        """A new mesh CA in the workdir, and one single-use join token per workload (0600 files,
        passed by path: a token on a command line is visible to every user of the machine)."""
        from tracemesh.collector._ca import MeshCA

        ca = MeshCA.init(self.ca_dir, trust_domain=TRUST_DOMAIN)
        tokens = self.workdir / "tokens"
        tokens.mkdir(mode=0o700, exist_ok=True)
        paths = []
        for w in self.workloads:
            path = tokens / w.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ca.create_token(w.identity) + "\n")
            paths.append(path)
        return paths

    def client_context(self) -> ssl.SSLContext:
        """An mTLS client context with the identity ``sa/loadgen`` from the mesh CA, offering
        HTTP/1.1 (for ``http.client.HTTPSConnection(..., context=...)``). Made once, on first use."""
        if self._client_ctx is None:
            from tracemesh.collector._ca import MeshCA
            from tracemesh.identity import client_context, generate_key, make_csr, private_key_pem

            ca = MeshCA.open(self.ca_dir)
            ident = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{CLIENT_ACCOUNT}"
            key = generate_key()
            chain = ca.issue(make_csr(key, ident), ca.create_token(ident))
            ctx = client_context(chain, private_key_pem(key), ca.bundle_pem())
            ctx.set_alpn_protocols(["http/1.1"])
            self._client_ctx = ctx
        return self._client_ctx

    def presented_certs(self) -> list[PresentedCert]:
        """Handshake with every workload's sidecar and read the certificate it presents now."""
        from cryptography import x509

        from tracemesh.identity import spiffe_id_of

        out = []
        for w in self.workloads:
            with socket.create_connection(w.inbound, timeout=5) as raw, \
                    self.client_context().wrap_socket(raw) as tls:
                leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            out.append(PresentedCert(w.name, str(spiffe_id_of(leaf)),
                                     leaf.not_valid_after_utc.isoformat(timespec="seconds")))
        return out

    def start(self, progress=lambda msg: None) -> None:
        """Start collector (with the mesh CA), apps and sidecars; return when all listen (a sidecar
        listens once it holds its certificate). Raises RuntimeError with logs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "mesh.yaml"
        # JSON is YAML: no emitter quirks, and the file stays readable.
        cfg.write_text(json.dumps(self.config(), indent=2))
        tokens = self._init_ca()
        progress("starting collector")
        self._spawn(
            "collector",
            ["-m", "tracemesh", "collector", "--store", str(self.store), "--otlp-grpc", str(self.otlp), "--otlp-http", str(self.otlp_http),
             "--api", str(self.api), "--ca", str(self.ca_dir), "--ca-mtls", str(self.ca_mtls),
             "--control", str(self.control)],
        )
        for w in self.workloads:
            self._spawn(
                f"app-{w.name}",
                ["-m", "tracemesh.demo.app", "--service", w.service, "--version", w.version, "--port", str(w.app.port),
                 "--outbound", str(w.outbound), "--collector", str(self.otlp)],
            )
        # Sidecars ask the CA (on the OTLP/gRPC port) for their certificates as they start: start
        # them once it listens, rather than have them back off while the store opens.
        self._wait_listening([(self.otlp, "collector")])
        self._apply(cfg)
        for w, token in zip(self.workloads, tokens, strict=True):
            self._spawn(
                f"sidecar-{w.name}",
                ["-m", "tracemesh", "sidecar", "--service", w.service, "--version", w.version, "--app", str(w.app),
                 "--inbound", str(w.inbound), "--outbound", str(w.outbound), "--collector", str(self.otlp),
                 "--control", str(self.ca_mtls), "--identity", w.identity, "--token-file", str(token),
                 "--mtls", "strict"],
            )
        progress(f"starting {len(self.workloads)} workloads, each behind its sidecar (STRICT mTLS, "
                 f"certificates from the mesh CA, config from the control plane)")
        self._wait_ready()

    def _apply(self, path: Path) -> None:
        """``tracemesh apply -f mesh.yaml``, through the collector's API (it answers once its config
        history is open)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.check_alive()
            req = urllib.request.Request(f"{self.api_url}/api/config?replace=1&source=mesh.yaml",
                                         data=path.read_bytes(), method="POST",
                                         headers={"content-type": "application/yaml"})
            try:
                with urllib.request.urlopen(req, timeout=10):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    raise RuntimeError(f"the collector refused the demo's config: {exc.read().decode()}") from None
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the collector did not take the demo's config")
            time.sleep(0.1)

    def _wait_synced(self, deadline: float) -> None:
        """Until every sidecar has acknowledged a snapshot holding every workload's endpoint."""
        import urllib.request

        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/api/proxies", timeout=5) as r:
                    doc = json.load(r)
                ps = doc["proxies"]
                if (len(ps) == len(self.workloads) and not doc["pending"] and all(p["status"] == "SYNCED" for p in ps)
                        and sum(len(e) for e in doc["endpoints"].values()) == len(self.workloads)):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecars did not all take their config from the control plane")
            time.sleep(0.1)

    def _wait_listening(self, targets: list[tuple[Addr, str]], deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT_S
        for addr, name in targets:
            while True:
                self.check_alive()
                try:
                    wait_for_port(addr, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not listen on {addr} within {START_TIMEOUT_S:.0f}s") from None

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + START_TIMEOUT_S
        self._wait_listening([(self.api, "collector")] + [
            (a, f"{w.name}") for w in self.workloads for a in (w.app, w.inbound, w.outbound)
        ], deadline)
        while True:  # the API answers /ready only once the store and the receiver are up
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/ready", timeout=2) as r:
                    if r.status == 200:
                        return self._wait_synced(deadline)
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
