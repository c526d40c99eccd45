"""The control plane's distribution side: the endpoint registry and the MeshDiscovery watch stream
(``proto/tracemesh/mesh/v1/discovery.proto``) that brings every sidecar its config.

**Streams.** A sidecar opens ``/tracemesh.mesh.v1.MeshDiscovery/Stream`` with its node (service,
version, address of its inbound listener, health). That registers its workload as an endpoint of
its service. The server answers with a snapshot at once and again whenever the config, the
endpoints or the trust bundle change; the sidecar ACKs what it applied and NACKs what it refused
(it then keeps its last good config); :meth:`Distributor.proxies` is what ``GET /api/proxies``
and ``tracemesh proxy-status`` show.

**Snapshots are whole and checked** (make-before-break). One snapshot carries the mesh config
with the registry's endpoints merged into each service's endpoints (static endpoints of the
config kept), so a route and every subset it names arrive together: a sidecar never holds a route
to a version it has no endpoints for. Before anything is published the merged config must pass
:func:`tracemesh.proxy._config.parse_config`, the sidecar's own parser; a snapshot that does not
is refused (logged, shown by ``/api/proxies``) and the previous one stays. When the last endpoint
of a version that a route still sends to leaves, the previously published endpoints of that version
are kept ("held") until the route stops naming it or another endpoint of the version registers:
the route keeps working or fails as it did, and other changes still go out.

**Debouncing.** Changes (a publish, an endpoint coming or going, a health flip, a new trust
bundle) mark the snapshot dirty; it is rebuilt once the changes have been quiet for
:data:`DEBOUNCE_S`, or :data:`MAX_DEBOUNCE_S` after the first, and pushed at most once per
:data:`DEBOUNCE_S`; a sidecar that has not taken the previous snapshot off the wire yet gets only
the newest. A rollout of a hundred pods is a handful of pushes, not a hundred.

**Versions** are ``c<config version>.e<endpoint generation>``; the nonce numbers snapshots.

**Endpoints.** A registered endpoint is routable while its sidecar is connected and healthy, and
for a grace period (:data:`DEFAULT_GRACE_S`) after it went away or turned unhealthy; then it
leaves (a disconnected one is forgotten, an unhealthy one stays listed as unhealthy). After a
restart the registry is empty; sidecars that reconnect holding a config (their first message names
its version) get their first snapshot only after :data:`RESYNC_HOLD_S`, by when the others have
reconnected and registered again, so a restart does not briefly strip endpoints from the mesh.

**Threads.** The streams are served by a ``grpc.aio`` server on its own event loop in one thread
(:class:`ControlServer`): a thousand idle streams cost a few KiB each, not a thread each as in
grpcio's synchronous server, whose worker pool the OTLP receiver needs for exports. Plaintext on
``--control`` (default port 15010, istiod's plaintext xDS port); with the mesh CA also over mTLS on
the CA's port (15012), where the renewal method moves too (:func:`ca_renewal_handler`).
:meth:`Distributor.publish` may be called from any thread (the config store calls it from the
thread that applied a version).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from tracemesh._proc import name_os_thread
from tracemesh._proto import discovery_pb2 as pb
from tracemesh.net import parse_addr

log = logging.getLogger("tracemesh.collector.discovery")

SERVICE = "tracemesh.mesh.v1.MeshDiscovery"
METHOD = "Stream"
PATH = f"/{SERVICE}/{METHOD}"
#: istiod's plaintext xDS port; the mTLS stream shares the CA's port (15012), as istiod's does.
DEFAULT_PORT = 15010
#: How long an endpoint stays routable after its sidecar disconnected or its app turned unhealthy:
#: a sidecar restarting or a blip of the app's health check does not churn every proxy's config.
DEFAULT_GRACE_S = 30.0
#: Changes quieter than this apart are coalesced into one snapshot; pushes are at least this apart.
DEBOUNCE_S = 0.1
#: ...but a steady stream of changes still gets pushed this long after the first.
MAX_DEBOUNCE_S = 1.0
#: A reconnecting sidecar's first snapshot waits this long after the server started: longer than a
#: sidecar's reconnect backoff cap (10 s), so the others have registered again by then.
RESYNC_HOLD_S = 12.0
#: The first message (the node) must come within this.
NODE_TIMEOUT_S = 10.0
#: How often grace periods are checked and the trust bundle is re-read.
SWEEP_S = 0.5
#: Bound on what one sidecar may send (a node, an ACK with an error message).
MAX_REQUEST_BYTES = 64 * 1024
#: A snapshot carries a whole mesh; the sidecar's parser takes up to 4 MiB.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: Bound on the error text kept per NACK.
MAX_ERROR_CHARS = 2000
#: Publish times kept, to tell how long a config version took to be ACKed.
KEEP_PUBLISH_TIMES = 256
#: Streams (and CA calls) served at once; past it a sidecar is told RESOURCE_EXHAUSTED and retries.
MAX_STREAMS = 20_000


class SnapshotRefused(ValueError):
    """The merged snapshot does not pass the sidecar's parser; nothing is published."""


# -- the pure part: merging endpoints into a config ----------------------------------------


@dataclass(frozen=True)
class RegisteredEndpoint:
    service: str
    address: str
    version: str
    healthy: bool
    routable: bool
    connected: bool
    instance_id: str


def _route_versions(mesh: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in mesh.get("routes") or ():
        if isinstance(r, dict) and isinstance(r.get("service"), str):
            for d in r.get("destinations") or ():
                if isinstance(d, dict) and isinstance(d.get("version"), str):
                    out.setdefault(r["service"], set()).add(d["version"])
    return out


def merge_endpoints(mesh: dict, registered: list[RegisteredEndpoint],
                    previous: dict[str, list[dict]] | None = None) -> tuple[dict, list[str]]:
    """The mesh config with the routable registered endpoints added to their services' static
    ones (a service known only from the registry is added with its endpoints alone), and, for a
    version a route still sends to that lost its last endpoint, the endpoints of that version in
    *previous* (the last published snapshot's, per service). Returns ``(mesh, held)``; *held*
    says which ``service/version`` were kept that way. *mesh* is not modified."""
    out = copy.deepcopy(mesh) if mesh else {}
    services = out.setdefault("services", {}) or {}
    out["services"] = services
    by_service: dict[str, list[RegisteredEndpoint]] = {}
    for ep in registered:
        if ep.routable:
            by_service.setdefault(ep.service, []).append(ep)
    for name in sorted(by_service):
        body = services.setdefault(name, {"endpoints": []})
        if not isinstance(body, dict):
            continue  # not a mapping: the parser says so
        eps = body.setdefault("endpoints", []) or []
        body["endpoints"] = eps
        seen = {e.get("address") for e in eps if isinstance(e, dict)}
        for ep in sorted(by_service[name], key=lambda e: e.address):
            if ep.address not in seen:  # a static endpoint of the same address wins
                eps.append({"address": ep.address, "version": ep.version})
                seen.add(ep.address)
    held = []
    for name, versions in _route_versions(out).items():
        body = services.get(name)
        if not isinstance(body, dict) or not isinstance(body.get("endpoints"), list):
            continue
        have = {e.get("version", "v1") for e in body["endpoints"] if isinstance(e, dict)}
        seen = {e.get("address") for e in body["endpoints"] if isinstance(e, dict)}
        for v in sorted(versions - have):
            keep = [e for e in (previous or {}).get(name, ()) if e.get("version", "v1") == v
                    and e.get("address") not in seen]
            if keep:
                body["endpoints"].extend(keep)
                held.append(f"{name}/{v}")
    return out, held


def check_snapshot(mesh: dict) -> str:
    """The snapshot's JSON, once the sidecar's own parser accepts it; else SnapshotRefused."""
    from tracemesh.proxy._config import ConfigError, parse_config

    text = json.dumps(mesh, sort_keys=True, separators=(",", ":"))
    try:
        parse_config(text, "<snapshot>")
    except ConfigError as exc:
        raise SnapshotRefused(str(exc)) from None
    return text


# -- state ---------------------------------------------------------------------------------


@dataclass
class _Endpoint:
    service: str
    address: str
    version: str
    instance_id: str
    healthy: bool = True
    streams: int = 0  # open streams of this endpoint's sidecar (a reconnect may overlap the old one)
    bad_since: float | None = None  # monotonic: disconnected or unhealthy since


@dataclass
class _Conn:
    id: int
    node: pb.Node
    peer: str
    verified: str | None  # the SPIFFE ID proven in the mTLS handshake
    connected_at: float  # wall clock
    key: tuple[str, str]  # the endpoint it registered
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    hold_until: float = 0.0  # monotonic
    sent_seq: int = 0
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_config: int = -1
    acked_at: float = 0.0
    config_acked_at: float = 0.0  # when it first ACKed its current acked_config
    nacks: int = 0
    nack_version: str = ""
    nack_nonce: str = ""
    nack_error: str = ""
    nack_at: float = 0.0


@dataclass(frozen=True)
class _Snapshot:
    seq: int
    version: str
    config_version: int
    endpoint_generation: int
    mesh: dict
    plain: bytes  # serialized response without the bundle (plaintext streams)
    secure: bytes  # with the trust bundle (verified mTLS streams)


class Distributor:
    """The registry, the current snapshot and the connected sidecars; serves the stream method.

    Thread safety: :meth:`publish`, :meth:`set_bundle_source` and :meth:`proxies` may be called
    from any thread; everything else runs on the control server's event loop.
    """

    def __init__(self, *, grace_s: float = DEFAULT_GRACE_S, debounce_s: float = DEBOUNCE_S,
                 max_debounce_s: float = MAX_DEBOUNCE_S, resync_hold_s: float = RESYNC_HOLD_S) -> None:
        self.grace_s = grace_s
        self.debounce_s = debounce_s
        self.max_debounce_s = max_debounce_s
        self.resync_hold_s = resync_hold_s
        self._lock = threading.Lock()
        self._config: tuple[int, dict] | None = None  # (version, mesh) as published
        self._published_at: dict[int, float] = {}  # config version -> wall clock
        self._bundle_fn: Callable[[], bytes] | None = None
        self._bundle = b""
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 0
        self._snap: _Snapshot | None = None
        self._seq = 0
        self._generation = 0
        self._ep_key: tuple = ()
        self._refused: dict | None = None
        self._dirty_since: float | None = None
        self._building = False  # a snapshot is being built from changes no longer counted in _dirty_since
        self._last_change = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = time.monotonic()
        self._snap_bundle = b""  # the bundle the current snapshot carries
        self.pushes = 0  # snapshots built and sent out
        self.refusals = 0

    # -- inputs (any thread) --

    def publish(self, version: int, mesh: dict) -> None:
        """A new config version (``mesh`` as :func:`parse_config` reads it). Nothing is sent to
        any sidecar before the first call. Returns at once; the push is debounced."""
        now = time.time()
        with self._lock:
            if self._config is not None and int(version) < self._config[0]:
                return  # an older version published late (a race with a subscriber): never go back
            self._config = (int(version), copy.deepcopy(mesh or {}))
            self._published_at[int(version)] = now
            while len(self._published_at) > KEEP_PUBLISH_TIMES:
                self._published_at.pop(next(iter(self._published_at)))
        self._changed_threadsafe()

    def set_bundle_source(self, fn: Callable[[], bytes]) -> None:
        """``fn() -> PEM`` (the CA's live bundle), re-read every :data:`SWEEP_S`; a change is pushed."""
        self._bundle_fn = fn
        self._bundle = fn()
        self._changed_threadsafe()

    def _changed_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None:
            if self._dirty_since is None:  # pending from now on, not from when the loop gets to it
                self._dirty_since = time.monotonic()
            loop.call_soon_threadsafe(self._changed)

    def _changed(self) -> None:
        now = time.monotonic()
        if self._dirty_since is None:
            self._dirty_since = now
        self._last_change = now
        if self._wake is not None:
            self._wake.set()

    # -- the event loop's tasks --

    async def run(self) -> None:
        """Debounced pushes and the grace-period sweep, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started = time.monotonic()
        self._changed()
        sweeper = asyncio.ensure_future(self._sweep())
        try:
            last_push = -1e9
            while True:
                await self._wake.wait()
                if self._dirty_since is None:  # set again while the last rebuild ran, and taken by it
                    self._wake.clear()
                    continue
                while True:  # quiet for debounce_s, or max_debounce_s after the first change
                    now = time.monotonic()
                    due = min(self._last_change + self.debounce_s, self._dirty_since + self.max_debounce_s)
                    due = max(due, last_push + self.debounce_s)
                    if now >= due:
                        break
                    await asyncio.sleep(due - now)
                # whatever changes from here on is after what this rebuild reads: a new round
                self._wake.clear()
                self._building = True  # still pending until the new snapshot is published
                self._dirty_since = None
                last_push = time.monotonic()
                try:
                    await self._rebuild()
                except Exception:  # noqa: BLE001 - a bug here must not end distribution for good
                    log.exception("building a snapshot failed; the sidecars keep the last one")
                finally:
                    self._building = False
        finally:
            sweeper.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            if self._bundle_fn is not None:
                try:
                    bundle = await asyncio.get_running_loop().run_in_executor(None, self._bundle_fn)
                except Exception:  # noqa: BLE001 - keep the bundle we have; the CA logs its own trouble
                    log.exception("cannot read the mesh CA's trust bundle")
                else:
                    if bundle != self._bundle:
                        self._bundle = bundle
                        log.info("the trust bundle changed; pushing it to the sidecars")
                        self._changed()
            now = time.monotonic()
            with self._lock:
                for key, ep in list(self._endpoints.items()):
                    if ep.streams == 0 and ep.bad_since is not None and now - ep.bad_since >= self.grace_s:
                        del self._endpoints[key]
            if self._endpoint_key() != self._ep_key:
                self._changed()

    def _registered(self, now: float | None = None) -> list[RegisteredEndpoint]:
        now = time.monotonic() if now is None else now
        return [RegisteredEndpoint(e.service, e.address, e.version, e.healthy and e.streams > 0,
                                   e.bad_since is None or now - e.bad_since < self.grace_s,
                                   e.streams > 0, e.instance_id)
                for e in self._endpoints.values()]

    def _endpoint_key(self) -> tuple:
        with self._lock:
            return tuple(sorted((e.service, e.address, e.version, e.healthy, e.routable)
                                for e in self._registered()))

    async def _rebuild(self) -> None:
        with self._lock:
            if self._config is None:
                return  # no config yet: sending an empty mesh would wipe the sidecars' last good one
            cversion, mesh = self._config
            registered = self._registered()
            ep_key = tuple(sorted((e.service, e.address, e.version, e.healthy, e.routable) for e in registered))
        if ep_key != self._ep_key:
            self._ep_key = ep_key
            self._generation += 1
        previous = {}
        if self._snap is not None:
            previous = {name: [e for e in body.get("endpoints", []) if isinstance(e, dict)]
                        for name, body in (self._snap.mesh.get("services") or {}).items() if isinstance(body, dict)}
        merged, held = merge_endpoints(mesh, registered, previous)
        version = f"c{cversion}.e{self._generation}"
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, check_snapshot, merged)
        except SnapshotRefused as exc:
            self.refusals += 1
            with self._lock:
                self._refused = {"version": version, "error": str(exc), "at": time.time()}
            log.error("snapshot %s refused, the sidecars keep %s: %s", version,
                      self._snap.version if self._snap else "what they have", exc)
            return
        if held:
            log.warning("snapshot %s keeps the last endpoints of %s: a route still sends there",
                        version, ", ".join(held))
        if self._snap is not None and self._snap.mesh == merged and self._snap.config_version == cversion \
                and self._snap_bundle == self._bundle:
            return  # nothing a sidecar would see changed (e.g. a health flip inside the grace period)
        groups: dict[str, list] = {}
        for e in sorted(registered, key=lambda e: (e.service, e.address)):
            groups.setdefault(e.service, []).append(pb.Endpoint(address=e.address, version=e.version,
                                                                healthy=e.healthy, instance_id=e.instance_id))
        self._seq += 1
        resp = pb.DiscoveryResponse(version_info=version, nonce=str(self._seq), mesh_json=text,
                                    endpoints=[pb.ServiceEndpoints(service=s, endpoints=eps) for s, eps in groups.items()],
                                    config_version=cversion, endpoint_generation=self._generation)
        plain = resp.SerializeToString()
        secure = plain
        if self._bundle:
            resp.trust_bundle_pem = self._bundle.decode("ascii", "replace")
            secure = resp.SerializeToString()
        self._snap_bundle = self._bundle
        with self._lock:
            self._snap = _Snapshot(self._seq, version, cversion, self._generation, merged, plain, secure)
            self._refused = None
            conns = list(self._conns.values())
        self.pushes += 1
        log.info("snapshot %s: %d services, %d registered endpoints; pushing to %d sidecars", version,
                 len(merged.get("services") or {}), len(registered), len(conns))
        for c in conns:
            c.wake.set()

    # -- the stream method --

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            METHOD: grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=pb.DiscoveryRequest.FromString, response_serializer=None),
        })

    def _service_identity(self, service: str) -> str | None:
        """The SPIFFE ID the config in force gives *service*, if any."""
        with self._lock:
            mesh = self._config[1] if self._config else {}
        body = (mesh.get("services") or {}).get(service)
        ident = body.get("identity") if isinstance(body, dict) else None
        return ident if isinstance(ident, str) else None

    def _register(self, node: pb.Node, peer: str, verified: str | None) -> _Conn:
        from tracemesh.proxy._config import _NAME, _VERSION

        # checked here, so that one odd sidecar cannot make every snapshot fail the parser
        if not _NAME.match(node.service):
            raise ValueError(f"node.service {node.service!r} is not a service name (a lowercase DNS label)")
        if node.version and not _VERSION.match(node.version):
            raise ValueError(f"node.version {node.version!r} is not a version label")
        address = node.address
        try:
            addr = parse_addr(address)
        except ValueError as exc:
            raise ValueError(f"node.address {address!r}: {exc}") from None
        if addr.port == 0:
            raise ValueError(f"node.address {address!r}: port 0 is not an address to connect to")
        if addr.host in ("0.0.0.0", "::", ""):  # listening everywhere: callers reach it where it called from
            host = _peer_host(peer)
            if host:
                address = f"[{host}]:{addr.port}" if ":" in host else f"{host}:{addr.port}"
        now = time.monotonic()
        key = (node.service, address)
        with self._lock:
            self._next_conn += 1
            conn = _Conn(self._next_conn, node, peer, verified, time.time(), key)
            ep = self._endpoints.get(key)
            if ep is None:
                ep = self._endpoints[key] = _Endpoint(node.service, address, node.version or "v1", node.instance_id)
            ep.version, ep.instance_id = node.version or "v1", node.instance_id
            ep.streams += 1
            ep.healthy = node.healthy
            ep.bad_since = None if node.healthy else (ep.bad_since or now)
            self._conns[conn.id] = conn
        self._changed()
        return conn

    def _unregister(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.pop(conn.id, None)
            ep = self._endpoints.get(conn.key)
            if ep is not None:
                ep.streams = max(0, ep.streams - 1)
                if ep.streams == 0 and ep.bad_since is None:
                    ep.bad_since = time.monotonic()
        self._changed()

    def _on_request(self, conn: _Conn, req: pb.DiscoveryRequest) -> None:
        now = time.time()
        if req.HasField("health"):
            with self._lock:
                ep = self._endpoints.get(conn.key)
                if ep is not None and ep.healthy != req.health.healthy:
                    ep.healthy = req.health.healthy
                    ep.bad_since = None if ep.healthy else time.monotonic()
                    conn.node.healthy = ep.healthy
                    log.info("%s %s at %s is %s", conn.node.service, conn.node.version, ep.address,
                             "healthy again" if ep.healthy else "unhealthy")
                    self._changed()
        if not req.response_nonce:
            return
        with self._lock:
            if req.HasField("error_detail"):
                conn.nacks += 1
                conn.nack_version, conn.nack_nonce = req.version_info, req.response_nonce
                conn.nack_error = req.error_detail.message[:MAX_ERROR_CHARS]
                conn.nack_at = now
                log.warning("%s (%s %s) rejected snapshot %s: %s", conn.node.instance_id, conn.node.service,
                            conn.node.version, req.version_info, conn.nack_error)
                return
            if req.response_nonce != conn.sent_nonce:
                return  # an ACK of an older snapshot than the last one sent: wait for the newest
            config = _config_of(req.version_info)
            if config != conn.acked_config:
                conn.config_acked_at = now
                conn.acked_config = config
            conn.acked_version, conn.acked_at = req.version_info, now

    async def _stream(self, requests, context: grpc.aio.ServicerContext):
        it = requests.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), NODE_TIMEOUT_S)
        except (asyncio.TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send the node first, within {NODE_TIMEOUT_S:.0f}s")
        node = first.node
        if not first.HasField("node") or not node.service or not node.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message must carry the node, with its service and address")
        verified = _verified_identity(context)
        if verified is not None and node.identity and node.identity != verified:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the node says it is {node.identity}, but its certificate is {verified}")
        claimed = self._service_identity(node.service)
        if claimed is not None and verified != claimed:
            # an endpoint of a service with an identity is registered only by a holder of it, so
            # no other workload (or a plaintext client) can put itself behind that service's name
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"service {node.service}'s sidecars hold {claimed}; this stream "
                                + (f"proved {verified}" if verified else "is not mTLS"))
        try:
            conn = self._register(node, context.peer(), verified)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if first.version_info and time.monotonic() - self._started < self.resync_hold_s:
            # it holds a config from before our restart: let the registry fill up again first
            conn.hold_until = self._started + self.resync_hold_s
        log.info("sidecar %s (%s %s at %s%s) connected from %s", node.instance_id, node.service, node.version,
                 conn.key[1], f", {verified}" if verified else "", context.peer())

        async def read() -> None:
            try:
                async for req in it:
                    self._on_request(conn, req)
            finally:
                conn.wake.set()

        reader = asyncio.ensure_future(read())
        try:
            if conn.hold_until:
                await asyncio.wait([reader], timeout=max(0.0, conn.hold_until - time.monotonic()))
            while not reader.done():
                snap = self._snap
                if snap is not None and snap.seq > conn.sent_seq:
                    with self._lock:
                        conn.sent_seq, conn.sent_version, conn.sent_nonce = snap.seq, snap.version, str(snap.seq)
                        conn.sent_at = time.time()
                    yield snap.secure if verified else snap.plain
                    continue
                conn.wake.clear()
                if self._snap is not None and self._snap.seq > conn.sent_seq:
                    continue
                await conn.wake.wait()
        finally:
            reader.cancel()
            self._unregister(conn)
            log.info("sidecar %s (%s %s) disconnected", node.instance_id, node.service, node.version)

    # -- status --

    def proxies(self, summary: bool = False) -> dict:
        """What ``GET /api/proxies`` answers: every connected sidecar and where it stands
        (*summary*: only how many are in each state, for a poller of a large mesh)."""
        with self._lock:
            snap, refused = self._snap, self._refused
            current = snap.version if snap else ""
            if summary:
                counts = {"SYNCED": 0, "STALE": 0, "NACK": 0}
                for c in self._conns.values():
                    nacked = bool(c.nack_nonce) and c.nack_nonce == c.sent_nonce
                    counts["NACK" if nacked else "SYNCED" if current and c.acked_version == current else "STALE"] += 1
                return {"version": current, "config_version": snap.config_version if snap else None,
                        "pending": self._dirty_since is not None or self._building,
                        "pushes": self.pushes, "refused": refused,
                        "connected": len(self._conns), "endpoints": len(self._endpoints), **counts}
            out = []
            for c in sorted(self._conns.values(), key=lambda c: (c.node.service, c.node.version, c.key[1])):
                nacked = bool(c.nack_nonce) and c.nack_nonce == c.sent_nonce
                status = "NACK" if nacked else ("SYNCED" if current and c.acked_version == current else "STALE")
                published = self._published_at.get(c.acked_config)
                out.append({
                    "instance_id": c.node.instance_id, "service": c.node.service, "version": c.node.version,
                    "namespace": c.node.namespace, "address": c.key[1], "identity": c.verified or c.node.identity,
                    "verified": c.verified is not None, "healthy": c.node.healthy, "peer": c.peer,
                    "connected_since": c.connected_at, "sent_version": c.sent_version,
                    "acked_version": c.acked_version, "acked_at": c.acked_at or None,
                    "config_ack_s": (round(c.config_acked_at - published, 4)
                                     if published is not None and c.config_acked_at else None),
                    "status": status, "in_sync": status == "SYNCED",
                    "nack": ({"version": c.nack_version, "error": c.nack_error, "at": c.nack_at}
                             if c.nack_nonce else None),
                    "nacks": c.nacks,
                })
            endpoints: dict[str, list] = {}
            for e in sorted(self._registered(), key=lambda e: (e.service, e.address)):
                endpoints.setdefault(e.service, []).append(
                    {"address": e.address, "version": e.version, "healthy": e.healthy, "routable": e.routable,
                     "connected": e.connected, "instance_id": e.instance_id})
            return {"version": current, "config_version": snap.config_version if snap else None,
                    "config_published_at": self._published_at.get(snap.config_version) if snap else None,
                    "endpoint_generation": snap.endpoint_generation if snap else None,
                    "pushes": self.pushes, "refused": refused,
                    "pending": self._dirty_since is not None or self._building,  # changes not published yet (debouncing, building)
                    "proxies": out, "endpoints": endpoints}


def _config_of(version: str) -> int:
    try:
        return int(version.split(".", 1)[0].removeprefix("c"))
    except ValueError:
        return -1


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` / ``ipv6:[::1]:5555`` -> the host."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def _verified_identity(context) -> str | None:
    from tracemesh.identity import CredentialError, load_pem_certs, spiffe_id_of

    pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
    if not pem:
        return None
    try:
        return str(spiffe_id_of(load_pem_certs(pem)[0]))
    except CredentialError:
        return None


# -- the CA's renewal method on the same aio server ---------------------------------------


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _SyncContext:
    """What :class:`~tracemesh.collector._ca_service.CaService` uses of a synchronous servicer
    context, over an aio one: ``abort`` raises, and the aio handler aborts for it."""

    def __init__(self, context) -> None:
        self._context = context

    def peer(self) -> str:
        return self._context.peer()

    def auth_context(self):
        return self._context.auth_context()

    def abort(self, code, details):
        raise _Abort(code, details)

    def set_trailing_metadata(self, md) -> None:
        self._context.set_trailing_metadata(md)


def ca_renewal_handler(ca_service, pool: futures.Executor) -> grpc.GenericRpcHandler:
    """The CA's renewal method (blocking: a file lock, an fsync) for the aio server of the mTLS
    port, run in *pool*."""
    from tracemesh.collector._ca_service import METHOD as CA_METHOD, SERVICE as CA_SERVICE

    async def sign(data: bytes, context):
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, ca_service.renew, data, _SyncContext(context))
        except _Abort as exc:
            await context.abort(exc.code, exc.details)

    return grpc.method_handlers_generic_handler(CA_SERVICE, {
        CA_METHOD: grpc.unary_unary_rpc_method_handler(sign, request_deserializer=None, response_serializer=None),
    })


# -- the server ----------------------------------------------------------------------------


class ControlServer:
    """A ``grpc.aio`` server on its own event loop thread: the discovery stream on a plaintext
    port, and, given TLS credentials, on an mTLS port too (with *mtls_handlers* beside it)."""

    def __init__(self, distributor: Distributor) -> None:
        self.distributor = distributor
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Future] = []
        self.plain_port = 0
        self.mtls_port = 0

    def start(self, plain_addr: str | None, mtls_addr: str | None = None, mtls_creds=None,
              mtls_handlers: tuple = (), plain_optional: bool = False) -> None:
        """Bind and start (blocking until listening); OSError when an address cannot be bound,
        except *plain_addr* with *plain_optional* (a default port taken: no plaintext port)."""
        ready: futures.Future = futures.Future()

        async def main() -> None:
            try:
                server = grpc.aio.server(options=[
                    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                    ("grpc.so_reuseport", 0),
                    # dead peers are found by keepalive pings; the sidecar answers them (h2 does)
                    ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                    ("grpc.http2.max_ping_strikes", 0),
                ], maximum_concurrent_rpcs=MAX_STREAMS)
                server.add_generic_rpc_handlers((self.distributor.handler(),))
                if mtls_handlers:
                    server.add_generic_rpc_handlers(tuple(mtls_handlers))
                if plain_addr:
                    try:
                        self.plain_port = server.add_insecure_port(plain_addr)
                    except RuntimeError as exc:
                        if not plain_optional:
                            raise OSError(f"cannot listen for the control plane on {plain_addr}: {exc}") from None
                        log.warning("cannot listen for the control plane on %s (%s): no plaintext discovery port",
                                    plain_addr, exc)
                if mtls_addr:
                    try:
                        self.mtls_port = server.add_secure_port(mtls_addr, mtls_creds)
                    except RuntimeError as exc:
                        raise OSError(f"cannot listen for the control plane on {mtls_addr}: {exc}") from None
                await server.start()
                self._server = server
                self._tasks.append(asyncio.ensure_future(self.distributor.run()))
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                ready.set_exception(exc)
                return
            ready.set_result(None)
            await server.wait_for_termination()

        def run() -> None:
            name_os_thread()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, name="control-plane", daemon=True)
        self._thread.start()
        ready.result(timeout=30)

    def stop(self, grace: float = 1.0) -> None:
        """Close every stream (sidecars reconnect elsewhere or later) and stop the loop."""
        if self._server is None or self._thread is None:
            return

        async def shutdown() -> None:
            for t in self._tasks:
                t.cancel()
            await self._server.stop(grace)

        # the loop ends with the server (wait_for_termination returns): join the thread, not the
        # coroutine, whose result may never be delivered by a loop that has stopped
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=grace + 10)
        if self._thread.is_alive():
            log.warning("the control plane did not stop in time")
