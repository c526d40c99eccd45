"""The sidecar's side of config distribution: the MeshDiscovery watch stream to the control plane
(``tracemesh sidecar --control ADDR``), see :mod:`tracemesh.collector._discovery`.

The sidecar opens one stream, sends its node (service, version, the address callers reach it on,
its app's health), and then takes snapshots: each is parsed and checked by
:func:`~tracemesh.proxy._config.parse_config` and by :func:`local_problem` (what only this sidecar
can know), then applied at once through :meth:`Router.update` (routes, endpoints, mTLS modes and
authorization policies all live in that one config object) and ACKed; a snapshot that fails is
NACKed with the reason and the last good config stays. A trust bundle in a snapshot (sent only on
a verified mTLS stream) is installed before the config, through
:meth:`RotatingCredentials.update_bundle`, so new roots are trusted without waiting for the next
certificate renewal.

**Transport.** A small gRPC client on Trio and ``h2`` (no thread): plaintext (h2 prior
knowledge) without an identity; with one, mTLS with the workload's client context, and the server
must prove the collector's SPIFFE ID, checked after the handshake as the CA client checks it
(grpcio's client would check a hostname, and the collector's certificate has only a SPIFFE URI).

**Outages.** A broken stream is retried with exponential backoff and full jitter
(:data:`BACKOFF_BASE_S` doubling to :data:`BACKOFF_CAP_S`); meanwhile the sidecar serves with the
last good config. With ``--control-cache FILE`` every applied snapshot is also written there
(atomically), and read at start, so a sidecar restarted during an outage starts with it. At start
the sidecar waits for a first config (from the control plane or the cache) for at most
:data:`INITIAL_FETCH_TIMEOUT_S` before it opens its listeners.

**Health.** The app is checked by a TCP connect every :data:`HEALTH_INTERVAL_S`; after
:data:`UNHEALTHY_AFTER` failures in a row the sidecar reports it unhealthy, after one success
healthy again, and the control plane takes the endpoint out of (or back into) the mesh.

Cancellation: :meth:`ControlClient.run` runs until cancelled; cancelling closes the connection.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from tracemesh._proto import discovery_pb2 as pb
from tracemesh.net import Addr
from tracemesh.proxy._config import MTLS_STRICT, ConfigError, MeshConfig, parse_config
from tracemesh.proxy._router import Router

log = logging.getLogger("tracemesh.sidecar.control")

PATH = "/tracemesh.mesh.v1.MeshDiscovery/Stream"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0
CONNECT_TIMEOUT_S = 5.0
#: The server pings every 20 s; nothing at all received for this long means the connection is dead.
LIVENESS_S = 60.0
#: At start, wait this long for a first config before serving without one (Istio waits 15 s).
INITIAL_FETCH_TIMEOUT_S = 15.0
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 1.0
UNHEALTHY_AFTER = 3
#: A snapshot is a whole mesh; the config parser takes up to 4 MiB of it.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_WINDOW = 8 * 1024 * 1024
#: One log line per kind of connection failure at most this often.
LOG_EVERY_S = 30.0


class ControlError(Exception):
    """The stream failed: the control plane is away, refused us, or broke the protocol."""


class SnapshotRejected(Exception):
    """This sidecar cannot apply a snapshot (the NACK's message)."""


def local_problem(cfg: MeshConfig, service: str, identity, has_identity: bool) -> str | None:
    """Why *cfg* cannot be applied by this sidecar, though it is a valid mesh config."""
    own = cfg.services.get(service)
    if own is None:
        return None
    if own.mtls == MTLS_STRICT and not has_identity:
        return (f"services.{service}.mtls is strict, but this sidecar has no identity (no --identity): "
                f"it could take no mesh mTLS connection, so every caller would fail")
    if identity is not None and own.identity is not None and own.identity != identity:
        return (f"services.{service}.identity is {own.identity}, but this sidecar holds {identity}: "
                f"callers would refuse it")
    return None


# -- a bidirectional gRPC call over h2 -------------------------------------------------------


class _Call:
    """One bidirectional gRPC call on its own connection. ``send`` frames and writes a message;
    ``receive`` returns the next whole message, or raises ControlError when the call ends."""

    def __init__(self, stream: trio.abc.Stream, authority: str, secure: bool) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._authority, self._secure = authority, secure
        self._send_lock = trio.Lock()
        self._buf = bytearray()
        self._ended: str | None = None
        self._meta: dict[str, str] = {}
        self.sid = 0

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self._send_lock:
                await self.stream.send_all(data)

    async def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW})
        self.conn.increment_flow_control_window(_WINDOW)
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, [
            (":method", "POST"), (":scheme", "https" if self._secure else "http"), (":path", PATH),
            (":authority", self._authority), ("content-type", "application/grpc"), ("te", "trailers"),
            ("user-agent", "tracemesh-sidecar")])
        await self._flush()

    async def send(self, message: bytes) -> None:
        try:
            self.conn.send_data(self.sid, b"\x00" + len(message).to_bytes(4, "big") + message)
        except h2.exceptions.ProtocolError as exc:  # stream closed, or no flow-control window
            raise ControlError(f"cannot send on the stream: {exc}") from None
        await self._flush()

    def _message(self) -> bytes | None:
        if len(self._buf) < 5:
            return None
        if self._buf[0] != 0:
            raise ControlError("the control plane sent a compressed message; none was negotiated")
        n = int.from_bytes(self._buf[1:5], "big")
        if n > MAX_MESSAGE_BYTES:
            raise ControlError(f"a message of {n} bytes; at most {MAX_MESSAGE_BYTES}")
        if len(self._buf) < 5 + n:
            return None
        msg = bytes(self._buf[5:5 + n])
        del self._buf[:5 + n]
        return msg

    def _status(self) -> str:
        status = self._meta.get("grpc-status")
        if status is None:
            return f"the stream ended without a gRPC status (HTTP {self._meta.get(':status', '?')})"
        from urllib.parse import unquote

        return f"the control plane ended the stream: status {status}: {unquote(self._meta.get('grpc-message', ''))}"

    async def receive(self) -> bytes:
        while True:
            msg = self._message()
            if msg is not None:
                return msg
            if self._ended is not None:
                raise ControlError(self._ended)
            with trio.move_on_after(LIVENESS_S) as idle:
                data = await self.stream.receive_some(65536)
            if idle.cancelled_caught:
                raise ControlError(f"nothing from the control plane for {LIVENESS_S:.0f}s")
            if not data:
                raise ControlError("the control plane closed the connection")
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                raise ControlError(f"HTTP/2 protocol error from the control plane: {exc}") from None
            for ev in events:
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    self._meta.update(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    self._buf += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self._ended = self._status()
                elif isinstance(ev, h2.events.StreamReset):
                    self._ended = f"the control plane reset the stream (h2 error {ev.error_code})"
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self._ended = self._ended or f"the control plane closed the connection (h2 error {ev.error_code})"
            await self._flush()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


# -- the client ----------------------------------------------------------------------------


@dataclass
class ControlStats:
    connects: int = 0
    failures: int = 0
    snapshots: int = 0
    applied: int = 0
    nacks: int = 0
    bundles: int = 0


class ControlClient:
    """Keeps *router* on the control plane's config. *creds* (RotatingCredentials or None): with
    one, the stream is mTLS and pushed trust bundles are installed into it."""

    def __init__(self, addr: Addr, router: Router, *, service: str, version: str, address: Addr,
                 app: Addr | None, instance_id: str, namespace: str = "default", creds=None,
                 cache: str | None = None, sidecar_version: str = "") -> None:
        self.addr = addr
        self.router = router
        self.service, self.version = service, version
        self.address, self.app = address, app
        self.instance_id, self.namespace = instance_id, namespace
        self.creds = creds
        self.cache = cache
        self.sidecar_version = sidecar_version
        self.healthy = True
        self.applied_version = ""  # the version of the config in force ("" none yet)
        self.last_error = ""  # why the last snapshot was NACKed, or the stream broke
        self.stats = ControlStats()
        self._call: _Call | None = None
        self._applied_json = ""  # the mesh JSON of the config in force
        self._first = trio.Event()
        self._last_log: dict[str, float] = {}

    # -- cache --

    def _load_cache(self) -> bool:
        if not self.cache:
            return False
        try:
            with open(self.cache, encoding="utf-8") as f:
                doc = json.load(f)
            cfg = parse_config(doc["mesh_json"], f"{self.cache} (version {doc['version']})")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            log.warning("the control cache %s is unusable, ignored: %s", self.cache, exc)
            return False
        self.router.update(cfg)
        self.applied_version = str(doc["version"])
        self._applied_json = doc["mesh_json"]
        log.info("config version %s from the control cache %s (until the control plane answers)",
                 self.applied_version, self.cache)
        return True

    def _save_cache(self, version: str, mesh_json: str) -> None:
        tmp = f"{self.cache}.{os.getpid()}.tmp"  # worker processes of one sidecar share the file
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": version, "saved_at": time.time(), "mesh_json": mesh_json}, f)
            os.replace(tmp, self.cache)
        except OSError as exc:
            log.warning("cannot write the control cache %s: %s", self.cache, exc)

    # -- running --

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Report started once a first config is in force (from the control plane or the cache)
        or :data:`INITIAL_FETCH_TIMEOUT_S` passed; then keep it current until cancelled."""
        if await trio.to_thread.run_sync(self._load_cache):
            self._first.set()
        if self.app is not None:
            self.healthy = await self._app_reachable()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._connect_loop)
            if self.app is not None:
                nursery.start_soon(self._health_loop)
            with trio.move_on_after(INITIAL_FETCH_TIMEOUT_S):
                await self._first.wait()
            if not self._first.is_set():
                log.warning("no config from the control plane at %s within %.0fs; serving without one "
                            "until it answers", self.addr, INITIAL_FETCH_TIMEOUT_S)
            task_status.started()

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            started = trio.current_time()
            try:
                await self._session()
            except (ControlError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    ssl.SSLError, trio.TooSlowError) as exc:
                self.stats.failures += 1
                reason = str(exc) or type(exc).__name__
                self._warn(reason, "control plane at %s: %s; serving with config %s, retrying",
                           self.addr, reason, self.applied_version or "(none yet)")
            if trio.current_time() - started > BACKOFF_CAP_S:
                attempt = 0  # it was up for a while: start the backoff over
            delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))
            attempt = min(attempt + 1, 16)
            await trio.sleep(delay)

    def _warn(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            if len(self._last_log) > 100:  # reasons with varying text: keep the memory bounded
                self._last_log.clear()
            self._last_log[kind] = now
            log.warning(msg, *args)

    async def _open(self) -> tuple[trio.abc.Stream, bool]:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(self.addr.host, self.addr.port)
            if self.creds is None:
                return tcp, False
            from tracemesh._ca_protocol import collector_id
            from tracemesh.identity import PeerIdentityError, authenticate_peer

            tls = trio.SSLStream(tcp, self.creds.client_context, server_hostname=None)
            try:
                await tls.do_handshake()
                expected = collector_id(self.creds.spiffe_id.trust_domain)
                got = authenticate_peer(tls, self.creds.spiffe_id.trust_domain)
                if got != expected:
                    raise PeerIdentityError(f"the control plane presented {got}, not {expected}")
                if tls.selected_alpn_protocol() != "h2":
                    raise ControlError(f"the control plane did not negotiate h2 (got {tls.selected_alpn_protocol()!r})")
            except PeerIdentityError as exc:
                await trio.aclose_forcefully(tls)
                raise ControlError(str(exc)) from None
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
            return tls, True

    def _node(self) -> pb.Node:
        return pb.Node(service=self.service, version=self.version, namespace=self.namespace,
                       instance_id=self.instance_id, address=str(self.address), healthy=self.healthy,
                       ports={"http": self.address.port},
                       identity=str(self.creds.spiffe_id) if self.creds is not None else "",
                       sidecar_version=self.sidecar_version)

    async def _session(self) -> None:
        stream, secure = await self._open()
        call = _Call(stream, str(self.addr), secure)
        try:
            await call.start()
            # version_info: what we hold, so a control plane that just restarted lets the others
            # register again before it sends us anything
            await call.send(pb.DiscoveryRequest(node=self._node(), version_info=self.applied_version).SerializeToString())
            self._call = call
            self.stats.connects += 1
            first = True
            while True:
                data = await call.receive()
                if first:
                    log.info("control plane at %s: connected%s", self.addr, " (mTLS)" if secure else "")
                    first = False
                await self._on_snapshot(call, data, secure)
        finally:
            self._call = None
            await call.aclose()

    async def _on_snapshot(self, call: _Call, data: bytes, secure: bool) -> None:
        self.stats.snapshots += 1
        try:
            resp = pb.DiscoveryResponse.FromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ControlError(f"not a DiscoveryResponse: {exc}") from None
        new_bundle = (secure and self.creds is not None and bool(resp.trust_bundle_pem) and self.creds.ready
                      and resp.trust_bundle_pem.encode() != self.creds.bundle_pem)
        if resp.mesh_json == self._applied_json and not new_bundle:
            # the same config again (a reconnect): nothing to parse, and the router keeps its state
            # (balancers, outlier ejections) rather than starting over
            self.applied_version = resp.version_info
            await call.send(pb.DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce).SerializeToString())
            return
        try:
            cfg = await trio.to_thread.run_sync(parse_config, resp.mesh_json, f"snapshot {resp.version_info}")
            problem = local_problem(cfg, self.service, self.creds.spiffe_id if self.creds is not None else None,
                                    self.creds is not None)
            if problem:
                raise SnapshotRejected(problem)
            if new_bundle:
                await self._install_bundle(resp.trust_bundle_pem.encode())
        except (ConfigError, SnapshotRejected) as exc:
            self.stats.nacks += 1
            self.last_error = str(exc)
            log.error("snapshot %s rejected, keeping config %s: %s", resp.version_info,
                      self.applied_version or "(none)", exc)
            await call.send(pb.DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce,
                                                error_detail=pb.ErrorDetail(message=str(exc)[:2000])).SerializeToString())
            return
        if resp.mesh_json != self._applied_json:
            self.router.update(cfg)
            self._applied_json = resp.mesh_json
        changed = resp.version_info != self.applied_version
        self.applied_version = resp.version_info
        self.last_error = ""
        self.stats.applied += 1
        self._first.set()
        if changed:
            log.info("config %s applied: %d services, %d routes", resp.version_info, len(cfg.services),
                     sum(map(len, cfg.routes.values())))
        await call.send(pb.DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce).SerializeToString())
        if self.cache:
            await trio.to_thread.run_sync(self._save_cache, resp.version_info, resp.mesh_json)

    async def _install_bundle(self, bundle: bytes) -> None:
        from tracemesh.identity import CredentialError

        if not self.creds.ready or bundle == self.creds.bundle_pem:
            return
        try:
            await trio.to_thread.run_sync(self.creds.update_bundle, bundle)
        except CredentialError as exc:
            raise SnapshotRejected(f"the trust bundle is unusable: {exc}") from None
        self.stats.bundles += 1
        log.info("trust bundle from the control plane installed (%d bytes)", len(bundle))

    # -- health --

    async def _app_reachable(self) -> bool:
        try:
            with trio.fail_after(HEALTH_TIMEOUT_S):
                s = await trio.open_tcp_stream(self.app.host, self.app.port)
        except (OSError, trio.TooSlowError):
            return False
        await trio.aclose_forcefully(s)
        return True

    async def _health_loop(self) -> None:
        failures = 0
        while True:
            await trio.sleep(HEALTH_INTERVAL_S)
            ok = await self._app_reachable()
            failures = 0 if ok else failures + 1
            healthy = ok or (self.healthy and failures < UNHEALTHY_AFTER)
            if healthy == self.healthy:
                continue
            self.healthy = healthy
            log.warning("the app at %s is %s", self.app, "reachable again" if healthy else
                        f"unreachable ({failures} checks in a row)")
            call = self._call
            if call is not None:
                try:
                    await call.send(pb.DiscoveryRequest(health=pb.HealthUpdate(healthy=healthy)).SerializeToString())
                except (ControlError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the next stream's node carries it
