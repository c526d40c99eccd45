"""Rotation without failed handshakes: workload certificates renewed at half-life while clients
keep connecting, and a root rotation seen through real handshakes."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import trio
from cryptography import x509
from idhelpers import API, WEB, issue, s_client

from tracemesh.collector._ca import MeshCA
from tracemesh.identity import (
    ChildProcessCrypto,
    CredentialError,
    InProcessCrypto,
    Issued,
    RotatingCredentials,
    authenticate_peer,
    load_pem_certs,
    server_context,
)

#: Workload certificate lifetime in the load test: renewed every 3 s, so a 9 s run sees three
#: renewals on each side and outlives the first certificates.
SHORT_TTL = timedelta(seconds=6)
LOAD_SECONDS = 9.0


def obtainer(ca: MeshCA, sid):
    """``obtain`` as a sidecar would do it: the join token once, then renewals authenticated by
    the current certificate (here taken as given: the CA's transport is not under test)."""
    token = ca.create_token(sid)
    calls = []

    def obtain(csr: bytes) -> Issued:
        chain = ca.issue(csr, token) if not calls else ca.renew(csr, sid)
        calls.append(csr)
        return Issued(chain, ca.bundle_pem())

    return obtain


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def test_workload_rotation_under_load_has_zero_failed_handshakes(tmp_path, openssl):
    ca = MeshCA.init(tmp_path / "ca", workload_ttl=SHORT_TTL)
    server = RotatingCredentials(API, obtainer(ca, API))
    client = RotatingCredentials(WEB, obtainer(ca, WEB))
    # openssl s_client joins in with a long-lived certificate of its own.
    ossl_cred = issue(ca, WEB, tmp_path, name="ossl", ttl=timedelta(hours=1))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem())

    stats: Counter = Counter()
    errors: list[str] = []
    client_serials_seen_by_server: set[int] = set()
    server_serials_seen_by_client: set[int] = set()

    async def handshake(tcp) -> trio.SSLStream | None:
        stream = trio.SSLStream(tcp, server.server_context, server_side=True)
        try:
            await stream.do_handshake()
            authenticate_peer(stream, "cluster.local")
            client_serials_seen_by_server.add(serial_of(stream.getpeercert(binary_form=True)))
            stats["server_ok"] += 1
            await stream.send_all(b"ok\n")
            return stream
        except Exception as exc:  # noqa: BLE001 - every failure counts
            stats["server_failed"] += 1
            errors.append(f"server: {exc!r}")
            await trio.aclose_forcefully(stream)
            return None

    async def answer_and_close(tcp):
        stream = await handshake(tcp)
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def echo(tcp):
        stream = await handshake(tcp)
        if stream is not None:
            try:
                while data := await stream.receive_some(4096):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # the client's forceful close at the end of the run
            finally:
                await trio.aclose_forcefully(stream)

    async def short_connections(port, deadline):
        while trio.current_time() < deadline:
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client.client_context,
                                    server_hostname="api")
            try:
                await stream.do_handshake()
                assert authenticate_peer(stream, "cluster.local") == API
                server_serials_seen_by_client.add(serial_of(stream.getpeercert(binary_form=True)))
                assert await stream.receive_some(3) == b"ok\n"
                stats["client_ok"] += 1
            except Exception as exc:  # noqa: BLE001
                stats["client_failed"] += 1
                errors.append(f"client: {exc!r}")
            finally:
                await trio.aclose_forcefully(stream)

    async def openssl_clients(port, deadline):
        while trio.current_time() < deadline:
            out = await trio.to_thread.run_sync(
                lambda: s_client(openssl, port, bundle=bundle, cred=ossl_cred, extra=("-quiet",)))
            if out.stdout == b"ok\n":
                stats["openssl_ok"] += 1
            else:
                stats["openssl_failed"] += 1
                errors.append(f"openssl: {out.stdout[-500:]!r} {out.stderr[-500:]!r}")

    async def long_lived_connection(port, deadline):
        """Made with the first certificates, used after they expired: established connections
        are untouched by rotation."""
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client.client_context,
                                server_hostname="api")
        await stream.do_handshake()
        assert await stream.receive_some(3) == b"ok\n"
        n = 0
        while trio.current_time() < deadline:
            await stream.send_all(b"ping%d" % n)
            assert await stream.receive_some(100) == b"ping%d" % n
            n += 1
            stats["long_lived_echoes"] += 1
            # how many certificates both sides had been through when this echo came back
            stats["echoed_at_generation"] = min(server.generation, client.generation)
            await trio.sleep(0.25)
        await trio.aclose_forcefully(stream)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(client.run)
            listeners = await nursery.start(trio.serve_tcp, answer_and_close, 0)
            port = listeners[0].socket.getsockname()[1]
            listeners = await nursery.start(trio.serve_tcp, echo, 0)
            echo_port = listeners[0].socket.getsockname()[1]
            deadline = trio.current_time() + LOAD_SECONDS
            async with trio.open_nursery() as load:
                for _ in range(3):
                    load.start_soon(short_connections, port, deadline)
                load.start_soon(openssl_clients, port, deadline)
                load.start_soon(long_lived_connection, echo_port, deadline)
            nursery.cancel_scope.cancel()

    trio.run(main)

    assert errors == []
    assert stats["server_failed"] == stats["client_failed"] == stats["openssl_failed"] == 0
    assert stats["client_ok"] > 100 and stats["openssl_ok"] > 5, stats
    # The connection made with the first certificates still echoes after both sides renewed twice
    # (their first certificates long expired). Not a rate: on a loaded machine echoes come slower.
    assert stats["long_lived_echoes"] >= 10 and stats["echoed_at_generation"] >= 3, stats
    # Initial certificate plus renewals at about 3, 6 (and 9) seconds, on both sides.
    assert server.generation >= 3 and client.generation >= 3, (server.generation, client.generation)
    assert len(server_serials_seen_by_client) >= 3
    assert len(client_serials_seen_by_server) >= 3 + 1  # + the s_client's own certificate
    assert server.failures == client.failures == 0


@pytest.mark.parametrize("crypto", [InProcessCrypto(), ChildProcessCrypto()], ids=["in-process", "child-process"])
def test_renewal_is_scheduled_at_half_life_and_checked(ca, crypto):
    # the sidecar makes its keys and checks what the CA answers in a short-lived child
    # (ChildProcessCrypto): the same checks, the same words
    creds = RotatingCredentials(WEB, obtainer(ca, WEB), crypto=crypto)
    assert not creds.ready
    with pytest.raises(CredentialError, match="no certificate yet"):
        creds.server_context  # noqa: B018
    creds.renew()
    leaf = load_pem_certs(creds.chain_pem)[0]
    lifetime = creds.not_after - (leaf.not_valid_before_utc.timestamp() + 300)  # minus the backdating
    assert abs(lifetime - 24 * 3600) < 5
    assert abs((creds.renew_at - (creds.not_after - lifetime)) - lifetime / 2) < 5
    first = creds.server_context

    # An answer for another identity or another key is refused, and the current credential stays.
    other = RotatingCredentials(API, obtainer(ca, API))
    other.renew()
    bad = RotatingCredentials(WEB, lambda csr: Issued(other.chain_pem, ca.bundle_pem()), crypto=crypto)
    with pytest.raises(CredentialError, match="for spiffe://cluster.local/ns/default/sa/api"):
        bad.renew()
    token = ca.create_token(WEB)
    stolen = ca.issue(_csr_for_new_key(), token)
    wrong_key = RotatingCredentials(WEB, lambda csr: Issued(stolen, ca.bundle_pem()), crypto=crypto)
    with pytest.raises(CredentialError, match="another key"):
        wrong_key.renew()
    yesterday = datetime.now(timezone.utc) - timedelta(days=1)
    expired = RotatingCredentials(WEB, lambda csr: Issued(
        ca.issue(csr, ca.create_token(WEB), ttl=timedelta(hours=1), _now=yesterday), ca.bundle_pem()), crypto=crypto)
    with pytest.raises(CredentialError, match="expired"):
        expired.renew()
    assert creds.server_context is first

    creds.renew()
    assert creds.server_context is not first and creds.generation == 2

    ca.rotate()
    creds.update_bundle(ca.bundle_pem())
    assert len(load_pem_certs(creds.bundle_pem)) == 2 and creds.generation == 2


def test_a_credential_helper_that_fails_is_a_credential_error():
    with pytest.raises(CredentialError, match="the credential helper failed: .*unknown operation 'bogus'"):
        ChildProcessCrypto()._run("bogus", {})
    with pytest.raises(CredentialError, match="not a SPIFFE ID|spiffe"):
        ChildProcessCrypto().new_key_and_csr("not-an-id")
    key_pem, csr_pem = ChildProcessCrypto().new_key_and_csr(WEB)  # what the CA is sent
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid and b"PRIVATE KEY" in key_pem
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [str(WEB)]


def _csr_for_new_key() -> bytes:
    from tracemesh.identity import generate_key, make_csr

    return make_csr(generate_key(), WEB)


def test_failed_renewals_are_retried(ca):
    fails = [RuntimeError("CA unreachable")] * 2
    inner = obtainer(ca, WEB)

    def flaky(csr):
        if fails:
            raise fails.pop()
        return inner(csr)

    creds = RotatingCredentials(WEB, flaky, max_retry_s=0.05)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(creds.run)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert creds.ready and creds.failures == 2 and "unreachable" in str(creds.last_error)


def test_root_rotation_through_real_handshakes(ca, tmp_path, openssl, tls_server):
    """During the overlap, certificates from the old and the new root are both accepted, by a
    server with the new bundle and by one still on the old bundle; after --finish, the old root's
    certificates are refused."""
    old_bundle = tmp_path / "old-bundle.pem"
    old_bundle.write_bytes(ca.bundle_pem())
    old_client = issue(ca, WEB, tmp_path, name="old-web")
    old_server = issue(ca, API, tmp_path, name="old-api")
    stale_server = tls_server(server_context(old_server.chain_pem, old_server.key_pem, old_bundle.read_bytes()))

    ca.rotate()
    overlap = tmp_path / "overlap-bundle.pem"
    overlap.write_bytes(ca.bundle_pem())
    new_client = issue(ca, WEB, tmp_path, name="new-web")
    new_server = issue(ca, API, tmp_path, name="new-api")
    assert len(load_pem_certs(new_client.chain_pem)) == 2  # leaf + new root cross-signed by the old
    server = tls_server(server_context(new_server.chain_pem, new_server.key_pem, overlap.read_bytes()))

    for cred in (old_client, new_client):
        s_client(openssl, server.port, bundle=overlap, cred=cred)
        assert server.next_outcome()[:2] == ("ok", str(WEB))
    # A server that has not yet fetched the new bundle still accepts the new root's workloads,
    # and a client on the old bundle accepts a server from the new root.
    s_client(openssl, stale_server.port, bundle=overlap, cred=new_client)
    assert stale_server.next_outcome()[:2] == ("ok", str(WEB))
    out = s_client(openssl, server.port, bundle=old_bundle, cred=old_client)
    assert server.next_outcome()[:2] == ("ok", str(WEB)) and b"Verify return code: 0 (ok)" in out.stdout

    ca.finish_rotation(force=True)
    final = tmp_path / "final-bundle.pem"
    final.write_bytes(ca.bundle_pem())
    server.context = server_context(new_server.chain_pem, new_server.key_pem, final.read_bytes())
    s_client(openssl, server.port, bundle=final, cred=old_client)
    verdict, reason = server.next_outcome()
    assert verdict == "refused" and "unable to get local issuer certificate" in reason
    s_client(openssl, server.port, bundle=final, cred=new_client)
    assert server.next_outcome()[:2] == ("ok", str(WEB))


def test_contexts_swap_while_another_thread_handshakes(ca, tmp_path, openssl, tls_server):
    """The swap is a reference assignment: a server thread picking up ``server_context`` for every
    connection never sees a half-loaded context while renewals run in another thread."""
    creds = RotatingCredentials(API, obtainer(ca, API))
    creds.renew()
    bundle = tmp_path / "b.pem"
    bundle.write_bytes(ca.bundle_pem())

    server = tls_server(creds.server_context)  # it reads server.context at every accept
    stop = threading.Event()

    def renew_forever():
        while not stop.is_set():
            creds.renew()
            server.context = creds.server_context

    t = threading.Thread(target=renew_forever)
    t.start()
    try:
        client = issue(ca, WEB, tmp_path)
        for _ in range(15):
            s_client(openssl, server.port, bundle=bundle, cred=client)
            assert server.next_outcome()[:2] == ("ok", str(WEB))
    finally:
        stop.set()
        t.join()
    assert creds.generation > 15
