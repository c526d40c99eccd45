"""Opaque TCP through two real sidecars (``--tcp-outbound`` on the caller's, ``--tcp-inbound`` on the
callee's), plaintext and over mesh mTLS: real bytes to real TCP servers (one that answers only after
the client's EOF, so half-close must work; one that speaks first), a 20 MB transfer checked by
hash, an upstream that is down, and the spans and Istio TCP metrics each connection leaves."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import urllib.request

import pytest
from mtls_helpers import MeshCaEnv, sid
from prometheus_client.parser import text_string_to_metric_families
from sidecar_harness import SidecarProc, distinct_ports, start_all, write_mesh

from tracemesh.net import Addr, free_port

BIG = 20 * 1024 * 1024


class TcpApp:
    """A threaded TCP server; *handler(conn)* serves one connection (closed after it returns)."""

    def __init__(self, handler) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = Addr("127.0.0.1", self.sock.getsockname()[1])
        self.handler = handler
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def digest_handler(conn) -> None:
    """Read to EOF, then answer ``<sha256> <length>``: only a connection that stays open for the
    answer after the client's half-close gets one."""
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        h.update(data)
        n += len(data)
    conn.sendall(f"{h.hexdigest()} {n}\n".encode())


def banner_handler(conn) -> None:
    """Server speaks first (as SMTP, MySQL, SSH do), then answers one line."""
    conn.sendall(b"220 db ready\r\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            return
        line += chunk
    conn.sendall(b"250 " + line.upper())


def blob_handler(conn) -> None:
    """Read an 8-byte size, then send that many pattern bytes and close."""
    size = int.from_bytes(_recv_exact(conn, 8), "big")
    block = bytes(range(256)) * 4096
    left = size
    while left:
        conn.sendall(block[:min(left, len(block))])
        left -= min(left, len(block))


def _recv_exact(conn, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed early")
        out += chunk
    return out


def _blob_sha(size: int) -> str:
    block = bytes(range(256)) * 4096
    h = hashlib.sha256()
    left = size
    while left:
        h.update(block[:min(left, len(block))])
        left -= min(left, len(block))
    return h.hexdigest()


def read_all(s: socket.socket) -> bytes:
    out = []
    while chunk := s.recv(1 << 16):
        out.append(chunk)
    return b"".join(out)


def send_and_digest(addr: Addr, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back
        return read_all(s)


def banner_exchange(addr: Addr, timeout: float = 10.0) -> tuple[bytes, bytes]:
    with socket.create_connection(addr, timeout=timeout) as s:
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = s.recv(1024)
            assert chunk, f"closed before the banner: {banner!r}"
            banner += chunk
        s.sendall(b"helo mesh\r\n")
        return banner, read_all(s)


def fetch_blob(addr: Addr, size: int, timeout: float = 30.0) -> tuple[int, str]:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(size.to_bytes(8, "big"))
        h, n = hashlib.sha256(), 0
        while chunk := s.recv(1 << 16):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()


def expected_digest(payload: bytes) -> bytes:
    return f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()


class Pair:
    """The caller's sidecar (``client``) with its TCP outbound listeners by service, the callee's
    (``server``) with its TCP inbound listeners by app."""

    def __init__(self, client: SidecarProc, server: SidecarProc, out: dict, inb: dict, admin: Addr) -> None:
        self.client, self.server, self.out, self.inb, self.admin = client, server, out, inb, admin


def _pair(work, collector, apps, mesh_extra: dict, client_extra=(), server_extra=(), config_extra=None,
          deny_blob=False):
    """Sidecars ``tcpclient`` and ``db``: for each app name, a --tcp-inbound on db and a service of
    the same name whose endpoint is that listener, reached through a --tcp-outbound on tcpclient."""
    names = list(apps)
    ports = distinct_ports(2 * len(names) + 1)
    inb = {n: Addr("127.0.0.1", ports[i]) for i, n in enumerate(names)}
    out = {n: Addr("127.0.0.1", ports[len(names) + i]) for i, n in enumerate(names)}
    admin = Addr("127.0.0.1", ports[-1])
    cfg = work / "mesh.yaml"
    server = SidecarProc(work, "db", apps[names[0]].addr, collector, config=cfg, extra=(
        *server_extra, *(x for n in names for x in ("--tcp-inbound", f"{inb[n]}={apps[n].addr}"))))
    services = {n: {"endpoints": [{"address": str(inb[n])}], **mesh_extra} for n in names}
    services["db"] = {"endpoints": [{"address": str(server.inbound)}], **mesh_extra}
    services.update(config_extra or {})
    # the callee refuses every connection to its blob port, whoever calls (as Istio judges TCP: the
    # DENY rule's HTTP-only field is ignored)
    policies = [{"name": "no-blob", "service": "db", "action": "DENY",
                 "rules": [{"to": {"ports": [inb["blob"].port], "methods": ["GET"]}}]}] if deny_blob else []
    write_mesh(cfg, {"services": services, "policies": policies})
    client_outs = [x for n in (*names, *services.keys() - set(names)) for x in
                   ("--tcp-outbound", f"{out.setdefault(n, Addr('127.0.0.1', free_port()))}={n}")]
    client = SidecarProc(work, "tcpclient", apps[names[0]].addr, collector, config=cfg,
                         extra=(*client_extra, *client_outs, "--admin", str(admin)))
    start_all([server, client])  # the TCP listeners open before the banner (a probe would be a real connection)
    return Pair(client, server, out, inb, admin)


@pytest.fixture(scope="module")
def apps():
    made = {"digest": TcpApp(digest_handler), "banner": TcpApp(banner_handler), "blob": TcpApp(blob_handler)}
    yield made
    for app in made.values():
        app.close()


@pytest.fixture(scope="module")
def plain(otlp, apps, tmp_path_factory):
    work = tmp_path_factory.mktemp("tcp-plain")
    dead = Addr("127.0.0.1", free_port())
    pair = _pair(work, otlp.addr, apps, {"mtls": "disable"}, deny_blob=True,
                 config_extra={"down": {"endpoints": [{"address": str(dead)}], "mtls": "disable"}})
    yield pair
    for sc in (pair.client, pair.server):
        assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
        sc.close()


@pytest.fixture(scope="module")
def tls(apps, tmp_path_factory):
    work = tmp_path_factory.mktemp("tcp-mtls")
    env = MeshCaEnv(work)
    try:
        # the callee PERMISSIVE (the default with an identity): TLS from the mesh, plaintext otherwise
        single = SidecarProc(work, "single", apps["digest"].addr, env.addr, extra=(
            *env.sidecar_args(sid("single"), "strict"), "--tcp-inbound", f"127.0.0.1:{free_port()}={apps['digest'].addr}"))
        single.spawn()
        pair = _pair(work, env.addr, apps, {"identity": str(sid("db"))},
                     client_extra=env.sidecar_args(sid("tcpclient")), server_extra=env.sidecar_args(sid("db")),
                     config_extra={"single": {"endpoints": [{"address": str(single.inbound)}],
                                              "identity": str(sid("single"))}})
        single.wait_ready()
        pair.single = single
        yield env, pair
        for sc in (pair.client, pair.server, single):
            assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
            sc.close()
    finally:
        env.close()


def test_plaintext_half_close_and_server_first_through_two_sidecars(plain, otlp):
    payload = os.urandom(300_000)
    assert send_and_digest(plain.out["digest"], payload) == expected_digest(payload)
    banner, answer = banner_exchange(plain.out["banner"])
    assert (banner, answer) == (b"220 db ready\r\n", b"250 HELO MESH\r\n")

    client = otlp.wait(1, service="tcpclient", **{"mesh.tcp.received_bytes": len(payload)})[0]
    assert (client.name, client.kind, client.status) == ("tcp digest", "CLIENT", "UNSET")
    a = client.attrs
    assert a["network.transport"] == "tcp" and a["mesh.response_flags"] == "-"
    assert (a["mesh.tcp.received_bytes"], a["mesh.tcp.sent_bytes"]) == (len(payload), len(expected_digest(payload)))
    assert a["mesh.upstream.endpoint"] == str(plain.inb["digest"])
    assert a["mesh.connection_security_policy"] == "none"
    server = otlp.wait(1, service="db", **{"mesh.tcp.received_bytes": len(payload)})[0]
    assert (server.name, server.kind, server.attrs["mesh.direction"]) == ("tcp db", "SERVER", "inbound")
    assert server.end_ns - server.start_ns > 0


def test_upstream_down_closes_the_connection_with_uf(plain, otlp):
    t0 = time.monotonic()
    with socket.create_connection(plain.out["down"], timeout=10) as s:
        try:
            s.sendall(b"hello?")
            assert read_all(s) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 8
    span = otlp.wait(1, service="tcpclient", **{"mesh.destination.service": "down"})[0]
    assert span.attrs["mesh.response_flags"] == "UF" and span.status == "ERROR"
    assert "connect" in span.status_message


def test_tcp_metrics_on_the_admin_endpoint(plain):
    # its own traffic (the counters are the sidecar's for its life: other tests may add to them)
    for payload in (os.urandom(300_000), b"x" * 1000):
        assert send_and_digest(plain.out["digest"], payload) == expected_digest(payload)
    with socket.create_connection(plain.out["down"], timeout=10) as s:  # upstream down: UF
        try:
            s.sendall(b"hello?")
            read_all(s)
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + 10
    while True:  # the span (and the closed count) is recorded just after the client sees the close
        text = urllib.request.urlopen(f"http://{plain.admin}/metrics", timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {(f.name, s.labels.get("destination_service"), s.labels.get("response_flags")): s
                   for f in fams.values() for s in f.samples}
        closed = samples.get(("istio_tcp_connections_closed", "digest", "-"))
        down = samples.get(("istio_tcp_connections_opened", "down", "UF"))
        if (closed and closed.value >= 2 and down) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    opened = samples[("istio_tcp_connections_opened", "digest", "-")]
    assert opened.value >= 2 and closed.value >= 2
    assert opened.labels["request_protocol"] == "tcp" and opened.labels["reporter"] == "source"
    assert "response_code" not in opened.labels
    assert samples[("istio_tcp_received_bytes", "digest", "-")].value >= 300_000 + 1000
    assert samples[("istio_tcp_sent_bytes", "digest", "-")].value >= 2 * 66
    assert samples[("istio_tcp_connections_opened", "down", "UF")].value >= 1


def test_mtls_twenty_megabytes_both_ways_intact(tls):
    env, pair = tls
    otlp = env.otlp  # the CA's door and the spans' receiver
    payload = os.urandom(BIG)
    assert send_and_digest(pair.out["digest"], payload, timeout=60) == expected_digest(payload)
    assert fetch_blob(pair.out["blob"], BIG, timeout=60) == (BIG, _blob_sha(BIG))
    span = otlp.wait(1, service="tcpclient", **{"mesh.tcp.received_bytes": BIG})[0]
    a = span.attrs
    assert a["mesh.connection_security_policy"] == "mutual_tls"
    assert a["mesh.destination.principal"] == str(sid("db"))
    assert a["mesh.tcp.received_bytes"] == BIG
    server = otlp.wait(1, service="db", **{"mesh.tcp.received_bytes": BIG})[0]
    assert server.attrs["mesh.source.principal"] == str(sid("tcpclient"))
    assert server.attrs["mesh.connection_security_policy"] == "mutual_tls"


def test_mtls_server_first_and_the_http_inbound_port(tls):
    env, pair = tls
    assert banner_exchange(pair.out["banner"]) == (b"220 db ready\r\n", b"250 HELO MESH\r\n")
    # a plaintext server-first client straight at the PERMISSIVE listener: taken as plaintext after the peek wait
    assert banner_exchange(pair.inb["banner"]) == (b"220 db ready\r\n", b"250 HELO MESH\r\n")
    # service ``single`` is a sidecar's HTTP inbound port (STRICT): mTLS that chose the TCP ALPN is piped
    # to its one --tcp-inbound app port
    payload = os.urandom(100_000)
    assert send_and_digest(pair.out["single"], payload) == expected_digest(payload)
    # service ``db`` is the callee's HTTP inbound port too, but it has three --tcp-inbound ports, so
    # which one is meant is ambiguous: refused (closed)
    with socket.create_connection(pair.out["db"], timeout=10) as s:
        try:
            s.sendall(b"ping")
            assert read_all(s) == b""
        except ConnectionResetError:
            pass


# -- no sockets: the frame codec and the TCP metrics' encodings ---------------------------------


def test_frames_round_trip_whatever_the_read_sizes():
    from tracemesh.proxy._tcp import EOF_FRAME, MAX_FRAME, FrameDecoder, encode_frames

    data = os.urandom(3 * MAX_FRAME + 17)
    wire = encode_frames(data[:10]) + encode_frames(data[10:]) + EOF_FRAME
    for step in (1, 3, 4, 5, 1000, MAX_FRAME + 4, len(wire)):
        dec, got = FrameDecoder(), []
        for i in range(0, len(wire), step):
            dec.feed(wire[i:i + step])
            got.append(dec.payload())
        assert b"".join(got) == data and dec.eof, step


@pytest.mark.parametrize("wire, words", [
    ((70000).to_bytes(4, "big") + b"x", "a frame of 70000 bytes"),
    (b"\x00\x00\x00\x00junk", "after the end frame"),
])
def test_bad_frames_are_errors(wire, words):
    from tracemesh.proxy._tcp import FrameDecoder, FrameError

    dec = FrameDecoder()
    with pytest.raises(FrameError, match=words):
        dec.feed(wire)
        dec.payload()


def test_tcp_metrics_in_otlp_and_prometheus():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from tracemesh.proxy._metrics import MeshMetrics

    m = MeshMetrics()
    attrs = {"mesh.direction": "inbound", "mesh.source.service": "web", "mesh.destination.service": "db",
             "mesh.connection_security_policy": "mutual_tls"}
    s = m.tcp_series(attrs)
    assert m.tcp_series(dict(attrs)) is s
    s.opened += 2
    s.closed += 1
    s.received += 500
    s.sent += 70
    req = ExportMetricsServiceRequest.FromString(m.to_otlp({"service.name": "db"}, 1, 2))
    sums = {x.name: x.sum for x in req.resource_metrics[0].scope_metrics[0].metrics if x.name.startswith("istio_tcp")}
    assert {k: v.data_points[0].as_int for k, v in sums.items()} == {
        "istio_tcp_connections_opened_total": 2, "istio_tcp_connections_closed_total": 1,
        "istio_tcp_sent_bytes_total": 70, "istio_tcp_received_bytes_total": 500}
    assert all(v.is_monotonic for v in sums.values())
    labels = {kv.key: kv.value.string_value for kv in sums["istio_tcp_sent_bytes_total"].data_points[0].attributes}
    assert labels["request_protocol"] == "tcp" and labels["reporter"] == "destination"
    assert labels["source_workload"] == "web" and "response_code" not in labels
    fams = {f.name: f for f in text_string_to_metric_families(m.render_prometheus().decode())}
    assert fams["istio_tcp_received_bytes"].samples[0].value == 500


def test_authorization_policy_closes_a_denied_connection(plain, otlp):
    with socket.create_connection(plain.out["blob"], timeout=10) as s:
        try:
            s.sendall((1000).to_bytes(8, "big"))
            assert read_all(s) == b""
        except ConnectionResetError:
            pass
    span = otlp.wait(1, service="db", **{"mesh.response_flags": "RBAC"})[0]
    assert (span.name, span.attrs["mesh.authz.decision"], span.attrs["mesh.authz.policy"]) == ("tcp db", "deny", "no-blob")
    assert span.status == "UNSET"  # a policy's denial is the mesh working, not failing


@pytest.mark.parametrize("flag, value, words", [
    ("--tcp-outbound", "127.0.0.1:15432", "expected LISTEN=SERVICE"),
    ("--tcp-inbound", "127.0.0.1:25432=", "expected LISTEN=APP_PORT"),
    ("--tcp-inbound", "127.0.0.1:25432=70000", "out of range"),
    ("--tcp-inbound", "nowhere=5432", "nowhere"),
])
def test_bad_tcp_flags_are_usage_errors(flag, value, words, capsys):
    from tracemesh.cli import build_parser

    base = ["sidecar", "--service", "a", "--app", "127.0.0.1:1", "--inbound", "127.0.0.1:2", "--outbound",
            "127.0.0.1:3", "--collector", "127.0.0.1:4"]
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*base, flag, value])
    assert info.value.code == 2 and words in capsys.readouterr().err
    args = build_parser().parse_args([*base, "--tcp-inbound", "127.0.0.1:25432=5432",
                                      "--tcp-outbound", "127.0.0.1:15432=db", "--tcp-outbound", "127.0.0.1:15433=mq"])
    assert args.tcp_inbound == [(Addr("127.0.0.1", 25432), 5432)]
    assert args.tcp_outbound == [(Addr("127.0.0.1", 15432), "db"), (Addr("127.0.0.1", 15433), "mq")]
