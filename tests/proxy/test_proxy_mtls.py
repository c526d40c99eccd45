"""Mesh mTLS through real sidecars, with real tools: certificates from a real CA service, ``openssl
s_client`` and curl as clients, STRICT / PERMISSIVE / DISABLE, identities on the spans, and
workload certificates rotating under continuous load without a failed request."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
import trio
from mtls_helpers import (
    MeshCaEnv,
    curl_mtls,
    echo,
    http_get,
    https_get,
    plaintext_refused,
    presented_identity,
    s_client,
    sid,
    tls_context,
    write_cred,
)
from sidecar_harness import SidecarProc, Upstream, distinct_ports, run_load, sidecar_cmd, start_all, write_mesh

from tracemesh.collector._ca import MeshCA
from tracemesh.identity import generate_key, make_csr, private_key_pem
from tracemesh.net import Addr
from tracemesh.proxy import _mtls
from tracemesh.proxy._mtls import MeshTls


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    """Sidecars with certificates from a CA service:

    catalog   STRICT, in front of the catalog app
    pricing   PERMISSIVE (the default with an identity)
    frontend  PERMISSIVE; its mesh config says catalog is STRICT with identity catalog, pricing
              has identity pricing, ``imposter`` is catalog's sidecar but expected to be
              ``sa/imposter``, and ``plain`` is the pricing app itself with mTLS disabled.
    """
    work = tmp_path_factory.mktemp("mtls")
    env = MeshCaEnv(work)
    apps = {n: Upstream(n) for n in ("catalog", "pricing", "frontend")}
    scs: dict[str, SidecarProc] = {}
    try:
        cfg = work / "mesh.yaml"
        scs["catalog"] = SidecarProc(work, "catalog", apps["catalog"].addr, env.addr, config=cfg,
                                     extra=env.sidecar_args(sid("catalog"), "strict"))
        scs["pricing"] = SidecarProc(work, "pricing", apps["pricing"].addr, env.addr, config=cfg,
                                     extra=env.sidecar_args(sid("pricing")))
        scs["frontend"] = SidecarProc(work, "frontend", apps["frontend"].addr, env.addr, config=cfg,
                                      extra=env.sidecar_args(sid("frontend")))
        write_mesh(cfg, {"services": {
            "catalog": {"endpoints": [{"address": str(scs["catalog"].inbound)}], "mtls": "strict",
                        "identity": str(sid("catalog"))},
            "pricing": {"endpoints": [{"address": str(scs["pricing"].inbound)}], "identity": str(sid("pricing"))},
            "frontend": {"endpoints": [{"address": str(scs["frontend"].inbound)}], "identity": str(sid("frontend"))},
            "imposter": {"endpoints": [{"address": str(scs["catalog"].inbound)}], "identity": str(sid("imposter"))},
            "plain": {"endpoints": [{"address": str(apps["pricing"].addr)}], "mtls": "disable"},
        }})
        start_all(list(scs.values()))
        yield env, scs, apps
        for sc in scs.values():  # nothing any test threw at them may have killed them
            assert sc.proc.poll() is None, f"{sc.service} sidecar died:\n{sc.stderr()}"
    finally:
        for sc in scs.values():
            sc.close()
        for app in apps.values():
            app.close()
        env.close()


def _self_signed(openssl, directory, identity):
    directory.mkdir(parents=True, exist_ok=True)
    key, pem = directory / "ss.key.pem", directory / "ss.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(pem), "-days", "1", "-subj", "/CN=impostor",
                    "-addext", f"subjectAltName=URI:{identity}"], check=True, capture_output=True)
    return write_cred(directory, "ss", identity, key.read_bytes(), pem.read_bytes())


def _bad_client(kind, env, openssl, tmp_path):
    if kind == "no certificate":
        return None
    if kind == "self-signed":
        return _self_signed(openssl, tmp_path / "ss", sid("web"))
    if kind == "another trust domain":
        other = MeshCA.init(tmp_path / "other-ca", trust_domain="other.example")
        ident = sid("web", trust_domain="other.example")
        key = generate_key()
        chain = other.issue(make_csr(key, ident), other.create_token(ident))
        return write_cred(tmp_path / "other", "other", ident, private_key_pem(key), chain)
    if kind == "expired":
        return env.cred(sid("web"), ttl=timedelta(hours=1), _now=datetime.now(timezone.utc) - timedelta(days=2))
    raise AssertionError(kind)


# -- STRICT -------------------------------------------------------------------------------------


def test_strict_serves_a_mesh_client_and_openssl_verifies_the_server(tls_mesh, openssl, curl):
    env, scs, apps = tls_mesh
    catalog = scs["catalog"]
    client = env.cred(sid("curl-client"))
    r = curl_mtls(curl, catalog.inbound, "/items/1", client, env.bundle_file,
                  extra=("-H", "x-request-id: mtls-curl", "-H", "x-tracemesh-peer: frontend;v9"))
    body, _, code = r.stdout.rpartition("\n")
    assert code == "200", r.stderr
    assert "ALPN: server accepted http/1.1" in r.stderr  # curl_mtls offers HTTP/1.1 only
    seen = echo(body.encode())
    assert seen["headers"]["x-forwarded-client-cert"] == f"By={sid('catalog')};URI={sid('curl-client')}"
    assert "x-tracemesh-peer" not in seen["headers"]
    span = env.otlp.wait(service="catalog", **{"guid:x-request-id": "mtls-curl"})[0]
    a = span.attrs
    assert a["mesh.connection_security_policy"] == "mutual_tls"
    assert a["mesh.source.principal"] == str(sid("curl-client"))
    assert a["mesh.destination.principal"] == str(sid("catalog"))
    # the header claimed frontend; the certificate says curl-client, and that is what counts
    assert a["mesh.source.service"] == "curl-client" and "mesh.source.version" not in a
    assert span.resource["mesh.identity"] == str(sid("catalog"))

    # openssl verifies the sidecar's chain against the bundle and reads its SPIFFE ID
    out = s_client(openssl, catalog.inbound, bundle=env.bundle_file, cred=client,
                   send=b"GET /x HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n",
                   extra=("-alpn", "http/1.1"))
    assert b"Verify return code: 0 (ok)" in out.stdout, out.stdout[-2000:]
    assert b"ALPN protocol: http/1.1" in out.stdout
    assert b"HTTP/1.1 200 OK" in out.stdout
    assert presented_identity(out.stdout) == sid("catalog")
    # a client offering h2 (first or only) gets it: the sidecar serves HTTP/2 (test_proxy_http2.py)
    out = s_client(openssl, catalog.inbound, bundle=env.bundle_file, cred=client, extra=("-alpn", "h2,http/1.1"))
    assert b"ALPN protocol: h2" in out.stdout


@pytest.mark.parametrize("kind,reason", [
    ("no certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("self-signed", "CERTIFICATE_VERIFY_FAILED: self-signed certificate"),
    ("another trust domain", "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"),
    ("expired", "CERTIFICATE_VERIFY_FAILED: certificate has expired"),
])
def test_strict_refuses_bad_clients_at_the_handshake(tls_mesh, openssl, curl, tmp_path, kind, reason):
    env, scs, apps = tls_mesh
    catalog = scs["catalog"]
    before = len(apps["catalog"].seen)
    cred = _bad_client(kind, env, openssl, tmp_path)
    out = s_client(openssl, catalog.inbound, bundle=env.bundle_file, cred=cred,
                   send=b"GET /bad HTTP/1.1\r\nHost: catalog\r\n\r\n")
    assert b"HTTP/1.1" not in out.stdout
    catalog.wait_log(f"refused: {reason}")
    r = curl_mtls(curl, catalog.inbound, "/bad", cred, env.bundle_file)
    assert r.returncode != 0 and not r.stdout.endswith("200"), r.stdout
    assert len(apps["catalog"].seen) == before  # nothing reached the app
    assert curl_mtls(curl, catalog.inbound, "/", env.cred(sid("web")), env.bundle_file).stdout.endswith("200")


def test_strict_refuses_plaintext_by_closing_the_connection(tls_mesh):
    env, scs, apps = tls_mesh
    assert plaintext_refused(scs["catalog"].inbound) == b""
    scs["catalog"].wait_log("inbound plaintext connection from 127.0.0.1:")
    assert "refused: mTLS is STRICT" in scs["catalog"].stderr()


# -- PERMISSIVE and DISABLE ---------------------------------------------------------------------


def test_permissive_takes_plaintext_and_mtls_on_one_port(tls_mesh, curl):
    env, scs, apps = tls_mesh
    pricing = scs["pricing"]
    status, body = http_get(pricing.inbound, "/p", {"x-request-id": "perm-plain"})
    assert status == 200 and "x-forwarded-client-cert" not in echo(body)["headers"]
    r = curl_mtls(curl, pricing.inbound, "/p", env.cred(sid("web")), env.bundle_file,
                  extra=("-H", "x-request-id: perm-tls"))
    assert r.stdout.endswith("200"), r.stderr
    plain = env.otlp.wait(service="pricing", **{"guid:x-request-id": "perm-plain"})[0].attrs
    tls = env.otlp.wait(service="pricing", **{"guid:x-request-id": "perm-tls"})[0].attrs
    assert plain["mesh.connection_security_policy"] == "none" and "mesh.source.principal" not in plain
    assert tls["mesh.connection_security_policy"] == "mutual_tls"
    assert tls["mesh.source.principal"] == str(sid("web"))


# -- sidecar to sidecar -------------------------------------------------------------------------


def test_sidecar_to_sidecar_is_mtls_with_both_principals_on_the_spans(tls_mesh):
    env, scs, apps = tls_mesh
    for svc in ("catalog", "pricing"):
        rid = f"s2s-{svc}"
        status, body = http_get(scs["frontend"].outbound, "/hop", {"host": svc, "x-request-id": rid})
        assert status == 200, body
        assert echo(body)["headers"]["x-forwarded-client-cert"] == f"By={sid(svc)};URI={sid('frontend')}"
        client = env.otlp.wait(service="frontend", **{"guid:x-request-id": rid, "mesh.direction": "outbound"})[0]
        server = env.otlp.wait(service=svc, **{"guid:x-request-id": rid})[0]
        assert client.attrs["mesh.connection_security_policy"] == "mutual_tls"
        assert client.attrs["mesh.destination.principal"] == str(sid(svc))
        assert client.attrs["mesh.source.principal"] == str(sid("frontend"))
        assert server.attrs["mesh.connection_security_policy"] == "mutual_tls"
        assert server.attrs["mesh.source.principal"] == str(sid("frontend"))
        assert server.attrs["mesh.source.service"] == "frontend"  # mapped by the config's identity
        assert server.attrs["mesh.source.version"] == "v1"  # the version claim of the proven service
        assert server.parent_span_id == client.span_id


def test_the_sidecars_hold_certificates_without_loading_cryptography(tls_mesh):
    # keys, CSRs and certificate checks run in a short-lived child (identity.ChildProcessCrypto):
    # cryptography's extension, ~8 MB resident for the process's life, is never mapped by a sidecar
    _, scs, _ = tls_mesh
    status, body = http_get(scs["frontend"].outbound, "/hop", {"host": "catalog"})  # mTLS both ways
    assert status == 200, body
    for sc in scs.values():
        maps = Path(f"/proc/{sc.proc.pid}/maps").read_text()
        assert "python" in maps and "/cryptography/" not in maps, sc.service


def test_an_upstream_with_another_identity_than_configured_is_refused(tls_mesh):
    env, scs, apps = tls_mesh
    status, body = http_get(scs["frontend"].outbound, "/", {"host": "imposter", "x-request-id": "s2s-imposter"})
    assert status == 503
    assert f"is {sid('catalog')}, not {sid('imposter')}" in body.decode()
    span = env.otlp.wait(service="frontend", **{"guid:x-request-id": "s2s-imposter"})[0]
    assert span.attrs["mesh.response_flags"] == "UF"


def test_a_disable_destination_is_called_in_plaintext(tls_mesh):
    env, scs, apps = tls_mesh
    status, body = http_get(scs["frontend"].outbound, "/", {"host": "plain", "x-request-id": "s2s-plain"})
    assert status == 200 and "x-forwarded-client-cert" not in echo(body)["headers"]
    span = env.otlp.wait(service="frontend", **{"guid:x-request-id": "s2s-plain"})[0]
    assert span.attrs["mesh.connection_security_policy"] == "none"
    assert "mesh.destination.principal" not in span.attrs


# -- starting up --------------------------------------------------------------------------------


def test_a_sidecar_retries_until_the_ca_answers(tmp_path):
    """Started before its collector: it keeps asking with backoff, then listens once it has a
    certificate."""
    env = MeshCaEnv(tmp_path)
    app = Upstream("late")
    port = distinct_ports(1)[0]
    sc = SidecarProc(tmp_path, "late", app.addr, Addr("127.0.0.1", port),
                     extra=env.sidecar_args(sid("late"), "strict")).spawn()
    server = None
    try:
        sc.wait_log("failed: UNAVAILABLE", timeout=15)
        with socket.socket() as probe:  # not listening without a certificate
            assert probe.connect_ex(tuple(sc.inbound)) != 0
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers((env.service.handler(renewal=False),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        sc.wait_ready()
        ctx = tls_context(env.cred(sid("web")), env.ca.bundle_pem())
        assert https_get(sc.inbound, ctx, "/")[0] == 200
        assert sc.terminate() == 0
    finally:
        sc.close()
        if server is not None:
            server.stop(None)
        app.close()
        env.close()


def test_a_refused_token_is_retried_and_logged_and_sigterm_still_stops_it(tmp_path):
    env = MeshCaEnv(tmp_path)
    try:
        token = env.token_file(sid("used"))
        key = generate_key()
        env.ca.issue(make_csr(key, sid("used")), token.read_text().strip())  # someone else used it
        sc = SidecarProc(tmp_path, "used", Addr("127.0.0.1", 9), env.addr,
                         extra=("--identity", str(sid("used")), "--token-file", str(token))).spawn()
        try:
            sc.wait_log("PERMISSION_DENIED: join token already used", timeout=10)
            assert sc.terminate() == 0
        finally:
            sc.close()
    finally:
        env.close()


@pytest.mark.parametrize("args,message", [
    (("--mtls", "strict"), "--mtls strict needs --identity"),
    (("--identity", "spiffe://cluster.local/ns/a/sa/b"), "needs a join token"),
    (("--identity", "spiffe://cluster.local/web", "--token", "t"), "is not a workload identity"),
    (("--token", "t"), "--token and --token-file go with --identity"),
])
def test_identity_flags_that_do_not_go_together_exit_2(otlp, args, message):
    p = distinct_ports(3)
    cmd = sidecar_cmd(service="s", version="v1", app=Addr("127.0.0.1", p[0]), inbound=Addr("127.0.0.1", p[1]),
                      outbound=Addr("127.0.0.1", p[2]), collector=otlp.addr, config=None, extra=args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and message in r.stderr, r.stderr


# -- the acceptor, in process -------------------------------------------------------------------


def test_handshake_timeouts_close_silent_and_stalled_clients(tmp_path, monkeypatch):
    """A client that says nothing, or starts a handshake and stalls, is closed at the deadline
    and counted; it never holds a connection task for longer."""
    monkeypatch.setattr(_mtls, "HANDSHAKE_TIMEOUT_S", 0.3)
    ca = MeshCA.init(tmp_path / "ca")
    from tracemesh.identity import Issued, RotatingCredentials

    creds = RotatingCredentials(sid("t"), lambda csr: Issued(ca.renew(csr, sid("t")), ca.bundle_pem()))
    creds.renew()

    async def main():
        for mode in ("strict", "permissive"):
            tls = MeshTls(creds, mode)
            results = []
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def serve(stream):
                results.append(await tls.accept(stream))

            async with trio.open_nursery() as n:
                await n.start(trio.serve_listeners, serve, listeners)
                silent = await trio.open_tcp_stream("127.0.0.1", port)
                stalled = await trio.open_tcp_stream("127.0.0.1", port)
                await stalled.send_all(b"\x16\x03\x01\x00\x05")  # a handshake record header, then nothing
                t0 = trio.current_time()
                while len(results) < 2:
                    await trio.sleep(0.05)
                assert trio.current_time() - t0 < 2
                assert await silent.receive_some(10) == b"" and await stalled.receive_some(10) == b""
                n.cancel_scope.cancel()
            assert results == [None, None] and tls.stats.timeouts == 2, (mode, tls.stats)

    trio.run(main)


# -- rotation under load ------------------------------------------------------------------------

#: Workload certificates live 4 s and are renewed every 2 s: an 8 s run sees several renewals on
#: every side and outlives every certificate the sidecars started with.
SHORT_TTL = timedelta(seconds=4)
LOAD_S = 8.0


def test_workload_certificate_rotation_under_load_fails_no_request(tmp_path):
    env = MeshCaEnv(tmp_path, workload_ttl=SHORT_TTL)
    apps = {n: Upstream(n) for n in ("catalog", "frontend")}
    cfg = tmp_path / "mesh.yaml"
    catalog = SidecarProc(tmp_path, "catalog", apps["catalog"].addr, env.addr, config=cfg,
                          extra=env.sidecar_args(sid("catalog"), "strict"))
    frontend = SidecarProc(tmp_path, "frontend", apps["frontend"].addr, env.addr, config=cfg,
                           extra=env.sidecar_args(sid("frontend")))
    write_mesh(cfg, {"services": {
        "catalog": {"endpoints": [{"address": str(catalog.inbound)}], "mtls": "strict", "identity": str(sid("catalog"))},
        "frontend": {"endpoints": [{"address": str(frontend.inbound)}], "identity": str(sid("frontend"))},
    }})
    # a direct client with a long-lived certificate makes a new handshake for every request
    direct = tls_context(env.cred(sid("load"), ttl=timedelta(hours=1)), env.ca.bundle_pem())
    stats: Counter = Counter()
    errors: list[str] = []
    serials: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def via_frontend():
        import http.client

        conn = http.client.HTTPConnection(*frontend.outbound, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/rot", headers={"host": "catalog"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                detail = f"frontend: {resp.status}"
            except OSError as exc:
                conn.close()
                ok, detail = False, f"frontend: {exc!r}"
            with lock:
                stats["ok" if ok else "failed"] += 1
                if not ok:
                    errors.append(detail)

    def new_handshakes():
        while not stop.is_set():
            try:
                with socket.create_connection(tuple(catalog.inbound), timeout=10) as raw, \
                        direct.wrap_socket(raw) as s:
                    from cryptography import x509

                    serial = x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number
                    s.sendall(b"GET /direct HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
                    head = s.recv(64)
                ok = head.startswith(b"HTTP/1.1 200")
                detail = f"direct: {head[:40]!r}"
            except (OSError, ssl.SSLError) as exc:
                ok, detail, serial = False, f"direct: {exc!r}", None
            with lock:
                stats["ok" if ok else "failed"] += 1
                if serial:
                    serials.add(serial)
                if not ok:
                    errors.append(detail)
            time.sleep(0.02)

    try:
        start_all([catalog, frontend])
        threads = [threading.Thread(target=f, daemon=True) for f in (via_frontend, via_frontend, new_handshakes,
                                                                     new_handshakes)]
        run_load(threads, LOAD_S, stop)
        assert errors == [], errors[:5]
        assert stats["failed"] == 0 and stats["ok"] > 100, stats
        assert len(serials) >= 3, f"the catalog sidecar presented {len(serials)} certificates during the run"
        for sc in (catalog, frontend):
            sc.wait_log("installed certificate 4")  # the first, then three renewals at least
            assert "failed" not in "".join(line for line in sc.stderr().splitlines() if "renewal" in line)
        assert env.service.renewed >= 6 and env.service.issued == 2
    finally:
        stop.set()
        for sc in (catalog, frontend):
            sc.close()
        for app in apps.values():
            app.close()
        env.close()


def test_root_rotation_under_load_fails_no_request(tmp_path):
    """``ca rotate`` while traffic flows: the new root signs from then on (its certificates carry
    the bridge to the old root), sidecars pick up the two-root bundle at their next renewal, and
    once every certificate is from the new root, ``ca rotate --finish`` drops the old one. Sidecar
    to sidecar and fresh handshakes from a client that renews as sidecars do: no request fails."""
    env = MeshCaEnv(tmp_path, workload_ttl=SHORT_TTL)
    apps = {n: Upstream(n) for n in ("catalog", "frontend")}
    cfg = tmp_path / "mesh.yaml"
    catalog = SidecarProc(tmp_path, "catalog", apps["catalog"].addr, env.addr, config=cfg,
                          extra=env.sidecar_args(sid("catalog"), "strict"))
    frontend = SidecarProc(tmp_path, "frontend", apps["frontend"].addr, env.addr, config=cfg,
                           extra=env.sidecar_args(sid("frontend")))
    write_mesh(cfg, {"services": {
        "catalog": {"endpoints": [{"address": str(catalog.inbound)}], "mtls": "strict", "identity": str(sid("catalog"))},
        "frontend": {"endpoints": [{"address": str(frontend.inbound)}], "identity": str(sid("frontend"))},
    }})
    stats: Counter = Counter()
    errors: list[str] = []
    roots_seen: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def via_frontend():
        while not stop.is_set():
            try:  # a new downstream connection each time; the frontend keeps its upstream ones
                status, _ = http_get(frontend.outbound, "/root", {"host": "catalog"})
                ok, detail = status == 200, f"frontend: {status}"
            except OSError as exc:
                ok, detail = False, f"frontend: {exc!r}"
            with lock:
                stats["ok" if ok else "failed"] += 1
                if not ok:
                    errors.append(detail)
            time.sleep(0.01)

    def renewing_client():
        from cryptography import x509

        ctx, made = None, 0.0
        while not stop.is_set():
            if time.monotonic() - made > 0.5:  # a client that renews (and refreshes its bundle) often
                ctx, made = tls_context(env.cred(sid("load")), env.ca.bundle_pem()), time.monotonic()
            try:
                with socket.create_connection(tuple(catalog.inbound), timeout=10) as raw, ctx.wrap_socket(raw) as s:
                    chain = s.get_verified_chain() if hasattr(s, "get_verified_chain") else []
                    s.sendall(b"GET /direct HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
                    head = s.recv(64)
                ok, detail = head.startswith(b"HTTP/1.1 200"), f"direct: {head[:40]!r}"
                if chain:
                    root = x509.load_der_x509_certificate(chain[-1]).subject.rfc4514_string()
                    with lock:
                        roots_seen.add(root)
            except (OSError, ssl.SSLError) as exc:
                ok, detail = False, f"direct: {exc!r}"
            with lock:
                stats["ok" if ok else "failed"] += 1
                if not ok:
                    errors.append(detail)
            time.sleep(0.02)

    try:
        start_all([catalog, frontend])
        threads = [threading.Thread(target=f, daemon=True) for f in (via_frontend, via_frontend, renewing_client)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        env.ca.rotate()
        time.sleep(SHORT_TTL.total_seconds() + 0.5)  # every certificate from the old root has been replaced
        assert env.ca.finish_rotation()  # refused before one workload lifetime: it is not forced here
        time.sleep(2.5)  # a renewal on each side with the one-root bundle
        stop.set()
        for t in threads:
            t.join(15)
        assert errors == [], errors[:5]
        assert stats["failed"] == 0 and stats["ok"] > 100, stats
        if roots_seen:  # Python 3.13+ exposes the verified chain: both roots were in use
            assert len(roots_seen) == 2, roots_seen
        for sc in (catalog, frontend):
            assert "renewal for" not in sc.stderr(), sc.stderr()[-2000:]  # no failed renewal on the way
    finally:
        stop.set()
        for sc in (catalog, frontend):
            sc.close()
        for app in apps.values():
            app.close()
        env.close()


def test_a_sidecar_without_identity_cannot_call_a_strict_service():
    from tracemesh.proxy._config import parse_config
    from tracemesh.proxy._http1 import ProxyError, Sidecar
    from tracemesh.proxy._pool import PLAINTEXT
    from tracemesh.proxy._recorder import SpanRecorder
    from tracemesh.proxy._router import Router

    cfg = parse_config("services:\n  s: {endpoints: [{address: 127.0.0.1:1}], mtls: strict}\n"
                       "  p: {endpoints: [{address: 127.0.0.1:2}]}\n")
    sc = Sidecar(service="me", version="v1", app=Addr("127.0.0.1", 3), router=Router(cfg), recorder=SpanRecorder())
    with pytest.raises(ProxyError) as err:
        sc._security_to("s")
    assert (err.value.status, err.value.flag) == (503, "UF") and "no workload identity" in str(err.value)
    assert sc._security_to("p") == PLAINTEXT  # PERMISSIVE takes plaintext from a caller without one
