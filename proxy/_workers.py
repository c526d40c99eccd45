"""``tracemesh sidecar --workers N``: N worker processes share the inbound and outbound listeners
(``SO_REUSEPORT``: the kernel spreads new connections over them), so one sidecar uses N cores.

**Processes.** The process the user started is the *supervisor*. It serves no traffic: it checks
the flags, the config and that the listen ports are free (a plain ``bind``, so a port held by
anything else, even another sidecar's ``SO_REUSEPORT`` group, fails at once with a clear error),
then starts the workers as ``tracemesh <the user's flags> --as-worker I:DIR`` (minus ``--workers``,
``--token``, ``--token-file`` and ``--admin``, so flags added later pass through untouched), each in
its own process group (a terminal's Ctrl-C reaches the supervisor alone, which drains them once)
and dying with the supervisor (:data:`tracemesh._proc.DIE_WITH_PARENT`). A worker that exits is
started again after a backoff (:data:`RESTART_BACKOFF_S`, doubling up to
:data:`RESTART_BACKOFF_MAX_S`, reset after :data:`RESTART_RESET_S` of life); every restart is
logged. SIGTERM/SIGINT: the supervisor stops restarting, sends SIGTERM to every worker (each drains
as a single-process sidecar does) and exits once all have, 0 if all exited 0; workers still running
after :data:`STOP_GRACE_S`, or after a second signal, are killed. A worker that exits with status 2
(a usage or config error) before any worker was ever ready stops the sidecar with status 2: that
is not going to fix itself.

While all workers are down the supervisor keeps each port *bound* (not listening: a listening
socket that never accepts would take its share of the connections), so nothing else can take it.

**Identity.** A join token may be single use, so the supervisor alone runs
:class:`tracemesh.identity.RotatingCredentials` (its own key, the first certificate, renewals). It
hands key, chain and bundle to the workers through a private directory (0700, on a tmpfs when
there is one: ``$XDG_RUNTIME_DIR`` or ``/dev/shm``): one JSON file, mode 0600, replaced whole
(:func:`tracemesh._fs.write_atomic`) on every change and removed with the directory on exit (a
supervisor killed by SIGKILL leaves it behind, on tmpfs). Workers read it with
:class:`WorkerCredentials`: a ``RotatingCredentials`` that installs what the file holds instead of
asking the CA, so :class:`tracemesh.proxy._mtls.MeshTls` and everything else reads it as it reads
the supervisor's own, and fresh contexts are built and swapped on every change the same way.

**Admin.** Each worker serves its admin endpoint on an ephemeral loopback port, reported with its
pid in ``DIR/worker-I.json`` once its listeners are open. The supervisor serves the one ``--admin``
address: ``/ready`` (every worker ready, the certificate held, not draining), ``/healthz``,
``/certificate`` (its credential) and ``/metrics``: every ready worker's ``/metrics`` scraped at
once and merged by :func:`merge_prometheus` (samples with the same name and labels summed: right for
counters and histogram buckets, sums and counts, and for the sidecar's gauges, which are all
"how many now": open connections, queued spans). A restarted worker starts its counters from zero,
so an aggregated counter can go down; Prometheus' ``rate()`` takes that as a counter reset.

Spans and OTLP metrics are exported by each worker with its own ``service.instance.id``
(``host:pid``).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio

from tracemesh._fs import write_atomic
from tracemesh._proc import python_cmd
from tracemesh.identity import (
    ChildProcessCrypto,
    CredentialError,
    RotatingCredentials,
    SpiffeId,
)
from tracemesh.net import Addr, parse_addr

log = logging.getLogger("tracemesh.sidecar.workers")

#: The hidden flag a worker is started with: ``--as-worker INDEX:DIR``.
WORKER_FLAG = "--as-worker"
#: Flags of the user's command line that workers do not get: the supervisor alone bootstraps the
#: identity (a join token may be single use) and serves the admin address.
SUPERVISOR_ONLY = frozenset({"--workers", "--token", "--token-file", "--admin", WORKER_FLAG})
#: First wait before restarting a worker that exited; doubles on every exit in a row.
RESTART_BACKOFF_S = 0.5
#: A worker that keeps dying is retried at least this often.
RESTART_BACKOFF_MAX_S = 30.0
#: A worker that lived this long resets the backoff: its next exit is a new incident.
RESTART_RESET_S = 30.0
#: A worker's drain and flush take 5 s + 3 s at most; one still running this long after SIGTERM
#: is killed.
STOP_GRACE_S = 12.0
#: How often workers look at the credential file and the supervisor at its credential. A renewal is
#: due at half-life, so the old certificate stays valid long after the new one is picked up.
CRED_POLL_S = 0.2
#: How often the supervisor looks for a starting worker's report.
READY_POLL_S = 0.05
#: A worker's /metrics must answer within this, or it is left out of that scrape (and counted).
SCRAPE_TIMEOUT_S = 5.0
#: Bound on one worker's /metrics text (2000 series are ~55 MB, see proxy/_metrics.py).
MAX_SCRAPE_BYTES = 128 * 1024 * 1024
CRED_FILE = "credential.json"
LISTEN_BACKLOG = socket.SOMAXCONN


# -- command lines ---------------------------------------------------------------------------


def _resolve(name: str, options: Sequence[str]) -> str:
    """The option *name* stands for, as argparse reads it: exact, or a unique prefix."""
    if name in options:
        return name
    matches = [o for o in options if o.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def worker_argv(argv: Sequence[str], options: Sequence[str], drop: Iterable[str] = SUPERVISOR_ONLY) -> list[str]:
    """*argv* (the user's, already accepted by argparse) without the *drop* options and their
    values, in the ``--opt value`` and ``--opt=value`` forms and abbreviated as argparse allows
    (*options*: every option string of the parser). Every dropped option takes one value."""
    drop = set(drop)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        if tok.startswith("--"):
            name, eq, _ = tok.partition("=")
            if _resolve(name, options) in drop:
                i += 1 if eq else 2
                continue
        out.append(tok)
        i += 1
    return out


@dataclass(frozen=True)
class WorkerSpec:
    """What ``--as-worker INDEX:DIR`` tells a worker: its index and the supervisor's private directory."""

    index: int
    state_dir: Path

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """The spec of this worker process; also arranges :meth:`clean_up_if_orphaned` at exit."""
        index, sep, directory = text.partition(":")
        if not sep or not index.isdigit() or not directory:
            raise ValueError(f"{WORKER_FLAG} expects INDEX:DIR, got {text!r}")
        spec = cls(int(index), Path(directory))
        atexit.register(spec.clean_up_if_orphaned, os.getppid())
        return spec

    def clean_up_if_orphaned(self, supervisor_pid: int) -> None:
        """At exit: if the supervisor died first (SIGKILL: it could not clean up, and its death
        is what stopped this worker), remove its private directory, the key with it."""
        if os.getppid() != supervisor_pid:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __str__(self) -> str:
        return f"{self.index}:{self.state_dir}"

    @property
    def status_file(self) -> Path:
        return self.state_dir / f"worker-{self.index}.json"

    def report_ready(self, admin: Addr) -> None:
        """Tell the supervisor this worker listens, and where its admin endpoint is."""
        write_atomic(self.status_file, json.dumps({"pid": os.getpid(), "admin": str(admin)}).encode())


# -- listeners ---------------------------------------------------------------------------------


def _stdlib_socket(family: int, reuseport: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio does: TIME_WAIT leftovers are fine
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s


def _addrinfo(addr: Addr) -> list[tuple]:
    infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen, out = set(), []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            out.append((family, sockaddr))
    return out


def reserve_ports(addrs: Iterable[tuple[str, Addr]]) -> list[socket.socket]:
    """Fail fast if a listen address is taken, then hold each one bound (not listening).

    The check binds *without* ``SO_REUSEPORT``, so it fails against anything listening there,
    including another sidecar's workers (which, with ``SO_REUSEPORT`` alone, would silently share
    the port with ours). Raises OSError naming the flag and address."""
    held: list[socket.socket] = []
    try:
        for what, addr in addrs:
            if addr.port == 0:
                raise OSError(f"--{what} {addr}: --workers needs a fixed port (each worker would get its own)")
            for family, sockaddr in _addrinfo(addr):
                with _stdlib_socket(family, reuseport=False) as probe:
                    try:
                        probe.bind(sockaddr)
                    except OSError as exc:
                        raise OSError(exc.errno, f"--{what} {addr}: cannot listen there: "
                                                 f"{exc.strerror or exc}") from None
                s = _stdlib_socket(family, reuseport=True)
                held.append(s)
                s.bind(sockaddr)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


async def reuseport_listeners(addr: Addr) -> list[trio.SocketListener]:
    """Listeners on *addr* in the port's ``SO_REUSEPORT`` group (one per address family the host
    resolves to, as :func:`trio.open_tcp_listeners`, which does not set the option)."""
    listeners: list[trio.SocketListener] = []
    try:
        for family, sockaddr in await trio.to_thread.run_sync(_addrinfo, addr):
            s = trio.socket.from_stdlib_socket(_stdlib_socket(family, reuseport=True))
            try:
                await s.bind(sockaddr)
                s.listen(LISTEN_BACKLOG)
            except BaseException:
                s.close()
                raise
            listeners.append(trio.SocketListener(s))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


# -- the credential channel --------------------------------------------------------------------


def private_dir() -> Path:
    """A new 0700 directory for this sidecar's processes, on a tmpfs when there is one."""
    base = None
    for cand in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
            base = cand
            break
    return Path(tempfile.mkdtemp(prefix="tracemesh-sidecar-", dir=base))  # mkdtemp makes it 0700


def write_credentials(state_dir: Path, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes,
                      not_after: float, renew_at: float, generation: int) -> None:
    doc = {"generation": generation, "not_after": not_after, "renew_at": renew_at,
           "key": key_pem.decode(), "chain": chain_pem.decode(), "bundle": bundle_pem.decode()}
    write_atomic(state_dir / CRED_FILE, json.dumps(doc).encode(), mode=0o600)


def _refuse_obtain(csr: bytes):
    raise CredentialError("a worker of --workers never calls the CA: its supervisor does")


class WorkerCredentials(RotatingCredentials):
    """A worker's workload credential: a :class:`~tracemesh.identity.RotatingCredentials` fed from
    the supervisor's ``DIR/credential.json`` instead of the CA, so that everything that reads one
    (:class:`~tracemesh.proxy._mtls.MeshTls` first) reads this the same way.

    Every change of the file is installed with :meth:`RotatingCredentials.install` (checked, fresh
    contexts, one reference swapped: see ``RotatingCredentials`` for why the live ones are never
    reloaded); a file that does not load (a half-written one cannot happen: it is replaced whole)
    is logged and counted in ``failures``, and the current credential stays. :meth:`run` follows
    the file; the CA is never called."""

    def __init__(self, spiffe_id, state_dir: Path, poll_s: float = CRED_POLL_S) -> None:
        super().__init__(spiffe_id, _refuse_obtain, crypto=ChildProcessCrypto())
        self.path = Path(state_dir) / CRED_FILE
        self.poll_s = poll_s
        self._stamp: tuple | None = None

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def load(self) -> bool:
        """Install the file if it changed since the last look (blocking: builds contexts). True
        when a new credential was installed."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            self.install(doc["key"].encode(), doc["chain"].encode(), doc["bundle"].encode())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CredentialError) as exc:
            self.failures += 1
            self.last_error = exc
            log.error("the credential in %s did not load, keeping the current one: %s", self.path, exc)
            return False
        log.info("worker pid %d loaded certificate %d for %s from the supervisor (its certificate %s)",
                 os.getpid(), self.generation, self.spiffe_id, doc.get("generation"))
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Wait for the first credential, report started, then follow the file forever.
        Cancellation waits for a load in progress (milliseconds)."""
        while not self.ready:
            await trio.to_thread.run_sync(self.load)
            if not self.ready:
                await trio.sleep(self.poll_s)
        task_status.started()
        while True:
            await trio.sleep(self.poll_s)
            await trio.to_thread.run_sync(self.load)


# -- merging Prometheus text -----------------------------------------------------------------


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    samples: dict = field(default_factory=dict)  # "name{labels}" -> number, in first-seen order


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)  # NaN, +Inf, 1.5e3


def _format(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def merge_prometheus(texts: Iterable[bytes]) -> bytes:
    """One exposition (text format 0.0.4) of several of the sidecar's: families in first-seen
    order, samples with the same name and labels summed (the text up to the value is the key:
    every worker renders a label set the same way). Handles what :func:`render_prometheus`
    writes: ``# HELP``/``# TYPE`` before each family, no timestamps."""
    families: dict[str, _Family] = {}
    for text in texts:
        fam_name: str | None = None
        for line in text.decode("utf-8", "replace").splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    fam_name = parts[2]
                    fam = families.setdefault(fam_name, _Family())
                    rest = parts[3] if len(parts) > 3 else ""
                    if parts[1] == "HELP" and fam.help is None:
                        fam.help = rest
                    elif parts[1] == "TYPE" and fam.type is None:
                        fam.type = rest
                continue
            key, _, value = line.rpartition(" ")
            if not key:
                continue
            name = key.partition("{")[0]
            if fam_name is None or not (name == fam_name or name.startswith(fam_name + "_")):
                fam_name = name
            samples = families.setdefault(fam_name, _Family()).samples
            try:
                samples[key] = samples.get(key, 0) + _number(value)
            except ValueError:
                continue
    out = []
    for name, fam in families.items():
        if fam.help is not None:
            out.append(f"# HELP {name} {fam.help}\n")
        if fam.type is not None:
            out.append(f"# TYPE {name} {fam.type}\n")
        out.extend(f"{key} {_format(v)}\n" for key, v in fam.samples.items())
    return "".join(out).encode()


async def fetch(addr: Addr, path: str, timeout: float = SCRAPE_TIMEOUT_S,
                max_bytes: int = MAX_SCRAPE_BYTES) -> tuple[int, bytes]:
    """GET *path* from a worker's admin endpoint: (status, body). Bounded by *timeout* (TooSlowError)
    and *max_bytes* (ValueError); OSError, BrokenResourceError or h11's ProtocolError when the
    worker is not answering (or went away mid-answer). Cancellation closes the connection."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[
                ("host", str(addr)), ("connection", "close")])) + conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > max_bytes:
                        raise ValueError(f"{addr}{path}: more than {max_bytes} bytes")
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, bytes(body)


# -- the supervisor --------------------------------------------------------------------------


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


async def _wait_exit(proc: subprocess.Popen) -> int:
    """Wait for *proc* without blocking Trio (a pidfd where Linux has one, else polling)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        while proc.poll() is None:
            await trio.sleep(0.1)
        return proc.returncode
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return proc.wait()


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    admin: Addr | None = None
    ready: bool = False
    restarts: int = 0
    stopped: trio.Event = field(default_factory=trio.Event)
    last_code: int | None = None


class _Readiness:
    """/ready of the supervisor, for :func:`admin_handler`."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.creds = sup.creds

    def why_not(self) -> str | None:
        sup = self.sup
        if sup.draining:
            return "draining"
        if self.creds is not None and not self.creds.ready:
            return "no workload certificate yet"
        waiting = [str(s.index) for s in sup.slots if not s.ready]
        if waiting:
            return f"worker{'s' if len(waiting) > 1 else ''} {', '.join(waiting)} not ready"
        return None


class Supervisor:
    """Runs and restarts the workers, owns the identity and the admin address. One per sidecar.

    :meth:`run` returns the exit status once a signal drained the workers (or one failed at
    start with status 2). The private directory is removed when it returns."""

    def __init__(self, *, n: int, argv: Sequence[str], service: str, version: str, app: Addr,
                 inbound: Addr, outbound: Addr, collector: Addr, admin: Addr | None, creds, ca_client,
                 mode: str, state_dir: Path) -> None:
        self.n = n
        self.argv = list(argv)
        self.service, self.version, self.app = service, version, app
        self.inbound, self.outbound, self.collector, self.admin = inbound, outbound, collector, admin
        self.creds, self.ca_client, self.mode = creds, ca_client, mode
        self.state_dir = state_dir
        self.slots = [_Slot(i) for i in range(n)]
        self.draining = False
        self.fatal: int | None = None
        self.ever_ready = False
        self.scrape_failures = 0
        self._stop = trio.Event()
        self._second_signal = trio.Event()
        self._all_ready = trio.Event()

    # -- workers --

    def _spawn(self, slot: _Slot) -> subprocess.Popen:
        spec = WorkerSpec(slot.index, self.state_dir)
        cmd = python_cmd("-m", "tracemesh", *self.argv, WORKER_FLAG, str(spec))
        # Popen here, in the Trio thread, not in trio.to_thread (as trio's open_process does): the
        # kernel's parent-death signal fires when the *thread* that forked exits, and Trio's idle
        # worker threads exit after a few seconds.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0)

    def _read_status(self, slot: _Slot) -> dict | None:
        try:
            doc = json.loads((self.state_dir / f"worker-{slot.index}.json").read_bytes())
        except (OSError, ValueError):
            return None
        return doc if doc.get("pid") == slot.proc.pid else None

    async def _watch_ready(self, slot: _Slot) -> None:
        while (doc := self._read_status(slot)) is None:
            await trio.sleep(READY_POLL_S)
        slot.admin = parse_addr(doc["admin"])
        slot.ready = True
        self.ever_ready = True
        log.info("worker %d (pid %d) is serving", slot.index, slot.proc.pid)
        if all(s.ready for s in self.slots):
            self._all_ready.set()

    async def _keep_running(self, slot: _Slot) -> None:
        backoff = RESTART_BACKOFF_S
        try:
            while not self.draining:
                started = time.monotonic()
                try:
                    proc = self._spawn(slot)
                except OSError as exc:  # out of processes or memory, for now: try again later
                    log.error("cannot start worker %d: %s; trying again in %.1fs", slot.index, exc, backoff)
                    with trio.move_on_after(backoff):
                        await self._stop.wait()
                    backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
                    continue
                slot.proc = proc
                async with trio.open_nursery() as n:
                    n.start_soon(self._watch_ready, slot)
                    code = await _wait_exit(proc)
                    n.cancel_scope.cancel()
                slot.ready, slot.admin = False, None
                # stopped by our SIGTERM before it could catch it (still importing): a clean stop
                slot.last_code = 0 if self.draining and code == -signal.SIGTERM else code
                lived = time.monotonic() - started
                if self.draining:
                    break
                if code == 2 and not self.ever_ready:
                    log.error("worker %d %s before any worker served: giving up", slot.index, _exit_text(code))
                    self.fatal = 2
                    self._stop.set()
                    break
                if lived >= RESTART_RESET_S:
                    backoff = RESTART_BACKOFF_S
                slot.restarts += 1
                log.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs (restart %d)",
                            slot.index, slot.proc.pid, _exit_text(code), lived, backoff, slot.restarts)
                with trio.move_on_after(backoff):
                    await self._stop.wait()
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
        finally:
            slot.stopped.set()

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                try:
                    slot.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def _drain(self) -> None:
        """SIGTERM every worker and wait for all; SIGKILL after STOP_GRACE_S or a second signal."""
        self.draining = True
        self._stop.set()
        self._signal_all(signal.SIGTERM)

        async def all_stopped():
            for slot in self.slots:
                await slot.stopped.wait()

        async def escalate():
            with trio.move_on_after(STOP_GRACE_S):
                await self._second_signal.wait()
                log.warning("a second signal: killing the workers")
            self._signal_all(signal.SIGKILL)

        async with trio.open_nursery() as n:
            n.start_soon(escalate)
            await all_stopped()
            n.cancel_scope.cancel()

    # -- identity --

    async def _publish_credentials(self) -> None:
        """Run the credential and write it for the workers whenever it changed."""
        creds = self.creds
        async with trio.open_nursery() as n:
            n.start_soon(creds.run)
            last = None
            while True:
                if creds.ready:
                    key, chain, bundle = creds.export_pem()
                    if (chain, bundle) != last:
                        await trio.to_thread.run_sync(
                            write_credentials, self.state_dir, key, chain, bundle, creds.not_after,
                            creds.renew_at, creds.generation)
                        last = (chain, bundle)
                await trio.sleep(CRED_POLL_S)

    # -- admin --

    async def metrics_text(self) -> bytes:
        texts: list[bytes | None] = [None] * self.n

        async def one(i: int, addr: Addr) -> None:
            try:
                status, body = await fetch(addr, "/metrics")
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError, h11.ProtocolError) as exc:
                self.scrape_failures += 1
                log.warning("worker %d's /metrics did not answer: %r", i, exc)
                return
            if status != 200:
                self.scrape_failures += 1
                return
            texts[i] = body

        async with trio.open_nursery() as n:
            for slot in self.slots:
                if slot.ready and slot.admin is not None:
                    n.start_soon(one, slot.index, slot.admin)
        own = (
            "# HELP tracemesh_sidecar_workers Worker processes this sidecar runs (--workers).\n"
            f"# TYPE tracemesh_sidecar_workers gauge\ntracemesh_sidecar_workers {self.n}\n"
            "# HELP tracemesh_sidecar_workers_ready Workers serving now.\n"
            "# TYPE tracemesh_sidecar_workers_ready gauge\n"
            f"tracemesh_sidecar_workers_ready {sum(s.ready for s in self.slots)}\n"
            "# HELP tracemesh_sidecar_worker_restarts_total Workers started again after they exited.\n"
            "# TYPE tracemesh_sidecar_worker_restarts_total counter\n"
            f"tracemesh_sidecar_worker_restarts_total {sum(s.restarts for s in self.slots)}\n"
            "# HELP tracemesh_sidecar_worker_scrape_failures_total Worker /metrics scrapes that failed.\n"
            "# TYPE tracemesh_sidecar_worker_scrape_failures_total counter\n"
            f"tracemesh_sidecar_worker_scrape_failures_total {self.scrape_failures}\n"
        ).encode()
        return await trio.to_thread.run_sync(merge_prometheus, [t for t in texts if t is not None] + [own])

    def admin_handler(self):
        from tracemesh.httpserve import Response
        from tracemesh.proxy._admin import admin_handler
        from tracemesh.proxy._metrics import CONTENT_TYPE, MeshMetrics

        rest = admin_handler(MeshMetrics(), _Readiness(self))  # /ready, /healthz, /certificate

        async def handle(req):
            if req.path == "/metrics" and req.method in ("GET", "HEAD"):
                return Response(200, await self.metrics_text(), CONTENT_TYPE)
            return await rest(req)

        return handle

    # -- the whole --

    async def run(self) -> int:
        from datetime import datetime, timezone

        from tracemesh.httpserve import serve_http

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            admin_listeners = (await trio.open_tcp_listeners(self.admin.port, host=self.admin.host)
                               if self.admin else None)
            async with trio.open_nursery() as outer:
                if admin_listeners:
                    await outer.start(serve_http, admin_listeners, self.admin_handler())
                if self.creds is not None:
                    log.info("asking the mesh CA at %s for a certificate for %s", self.collector, self.creds.spiffe_id)
                    outer.start_soon(self._publish_credentials)
                async with trio.open_nursery() as workers:
                    for slot in self.slots:
                        workers.start_soon(self._keep_running, slot)

                    async def announce():
                        await self._all_ready.wait()
                        id_note = ""
                        if self.creds is not None:
                            id_note = (f"; identity {self.creds.spiffe_id}, certificate until "
                                       f"{datetime.fromtimestamp(self.creds.not_after, timezone.utc).isoformat(timespec='seconds')}, "
                                       f"inbound mTLS {self.mode}")
                        pids = ", ".join(str(s.proc.pid) for s in self.slots)
                        print(f"tracemesh sidecar {self.service}/{self.version}: {self.n} workers (pids {pids}), "
                              f"inbound {self.inbound} -> app {self.app}, outbound {self.outbound}, "
                              f"spans to {self.collector}{id_note}"
                              f"{f'; admin http://{self.admin}' if self.admin else ''}", flush=True)

                    outer.start_soon(announce)

                    async def on_signals():  # the one task that reads them (trio allows one)
                        seen = 0
                        async for signum in signals:
                            seen += 1
                            if seen == 1:
                                log.info("%s: draining the workers", signal.Signals(signum).name)
                                self._stop.set()
                            else:
                                self._second_signal.set()

                    outer.start_soon(on_signals)
                    await self._stop.wait()
                    await self._drain()
                outer.cancel_scope.cancel()
        codes = [s.last_code for s in self.slots]
        restarts = sum(s.restarts for s in self.slots)
        note = ""
        if self.creds is not None:
            note = (f"; {self.creds.generation} certificates, {self.creds.failures} failed calls to the CA")
        print(f"tracemesh sidecar {self.service}/{self.version}: {self.n} workers stopped "
              f"(exit statuses {codes}), {restarts} restarts{note}", flush=True)
        if self.fatal is not None:
            return self.fatal
        return 0 if all(c == 0 for c in codes if c is not None) else 1


async def supervise(*, workers: int, argv: Sequence[str], service: str, version: str, app: Addr,
                    inbound: Addr, outbound: Addr, collector: Addr, config: str | None,
                    identity: str | None, token: str | None, token_file: str | None, mtls: str | None,
                    admin: Addr | None, tcp_listen: Sequence[tuple[str, Addr]] = ()) -> int:
    """The supervisor of ``--workers N`` (N > 1): checks what a single sidecar checks at start
    (flags, config, the ports of every listener: *tcp_listen* too, as ``(flag, address)``) so that
    errors come once and early, then runs :class:`Supervisor`."""
    from tracemesh.proxy._config import load_config
    from tracemesh.proxy._serve import _identity_setup

    creds, ca_client, mode = _identity_setup(identity, token, token_file, mtls, collector)
    if config:
        load_config(config)  # ConfigError: exit 2 here, not N times in the workers
    held = reserve_ports([("inbound", inbound), ("outbound", outbound), *tcp_listen])
    state_dir = private_dir()
    try:
        sup = Supervisor(n=workers, argv=argv, service=service, version=version, app=app, inbound=inbound,
                         outbound=outbound, collector=collector, admin=admin, creds=creds, ca_client=ca_client,
                         mode=mode, state_dir=state_dir)
        return await sup.run()
    finally:
        for s in held:
            s.close()
        if ca_client is not None:
            ca_client.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def worker_identity(spec: WorkerSpec, identity: str | None, mtls: str | None):
    """A worker's (creds, ca_client, mode): the supervisor's credential, never a CA client."""
    from tracemesh.proxy._mtls import MTLS_DISABLE, MTLS_PERMISSIVE

    if identity is None:
        return None, None, MTLS_DISABLE
    return WorkerCredentials(SpiffeId.parse(identity), spec.state_dir), None, mtls or MTLS_PERMISSIVE


__all__ = ["Supervisor", "WorkerCredentials", "WorkerSpec", "merge_prometheus", "reserve_ports",
           "reuseport_listeners", "supervise", "worker_argv", "worker_identity"]
