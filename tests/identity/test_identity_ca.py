"""The mesh CA: what it issues (read back with openssl), what it refuses, join tokens, key file
permissions, operator roots, and root rotation seen by `openssl verify`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from idhelpers import API, WEB, issue

from tracemesh.collector._ca import (
    CLOCK_SKEW_BACKDATE,
    CaError,
    IssueRefused,
    KeyPermissionError,
    MeshCA,
    TokenRefused,
)
from tracemesh.identity import (
    SpiffeId,
    generate_key,
    load_pem_certs,
    make_csr,
    spiffe_id_of,
)


def x509_text(openssl, path) -> str:
    return subprocess.run([openssl, "x509", "-in", str(path), "-noout", "-text"], check=True,
                          capture_output=True, text=True).stdout


def verify(openssl, bundle, cert, untrusted=None) -> subprocess.CompletedProcess:
    cmd = [openssl, "verify", "-CAfile", str(bundle)]
    if untrusted is not None:
        cmd += ["-untrusted", str(untrusted)]
    return subprocess.run(cmd + [str(cert)], capture_output=True, text=True)


def split_chain(chain_pem: bytes, tmp_path, name: str):
    """(leaf file, file of the rest or None), as `openssl verify` wants them."""
    certs = load_pem_certs(chain_pem)
    leaf = tmp_path / f"{name}.leaf.pem"
    leaf.write_bytes(certs[0].public_bytes(serialization.Encoding.PEM))
    rest = None
    if len(certs) > 1:
        rest = tmp_path / f"{name}.rest.pem"
        rest.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:]))
    return leaf, rest


def csr_with(key, sans, sign_key=None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    signer = sign_key or key
    algo = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algo).public_bytes(serialization.Encoding.PEM)


# -- the root and the workload certificates ------------------------------------------------------


def test_root_as_openssl_sees_it(ca, openssl, bundle_file):
    text = x509_text(openssl, bundle_file)
    assert "CA:TRUE, pathlen:1" in text
    assert "Certificate Sign, CRL Sign" in text
    assert "X509v3 Name Constraints: critical" in text and "URI:cluster.local" in text
    assert "ASN1 OID: prime256v1" in text
    root = load_pem_certs(bundle_file.read_bytes())[0]
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)


def test_workload_certificate_as_openssl_sees_it(ca, openssl, bundle_file, tmp_path):
    before = datetime.now(timezone.utc)
    cred = issue(ca, WEB, tmp_path)
    assert verify(openssl, bundle_file, cred.chain_file).returncode == 0
    text = x509_text(openssl, cred.chain_file)
    assert "CA:FALSE" in text
    assert "Digital Signature" in text and "Key Encipherment" not in text  # EC key: RFC 5480
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    san = r"X509v3 Subject Alternative Name: critical\n +URI:spiffe://cluster.local/ns/default/sa/web\n"
    assert re.search(san, text)
    assert "X509v3 Subject Key Identifier" in text and "X509v3 Authority Key Identifier" in text
    leaf = load_pem_certs(cred.chain_pem)[0]
    assert len(load_pem_certs(cred.chain_pem)) == 1  # the root is never in the chain
    assert spiffe_id_of(leaf) == WEB
    assert leaf.subject == x509.Name([])
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert abs((before - CLOCK_SKEW_BACKDATE) - nb) < timedelta(seconds=5)
    assert abs((before + timedelta(hours=24)) - na) < timedelta(seconds=5)
    root = load_pem_certs(bundle_file.read_bytes())[0]
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert ski == aki


def test_serials_are_random_and_lifetime_is_configurable(tmp_path, ca):
    a, b = (load_pem_certs(issue(ca, WEB, tmp_path, name=n).chain_pem)[0] for n in ("a", "b"))
    assert a.serial_number != b.serial_number and a.serial_number.bit_length() > 64
    short = load_pem_certs(issue(ca, WEB, tmp_path, name="c", ttl=timedelta(minutes=10)).chain_pem)[0]
    assert short.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(minutes=11)
    ca2 = MeshCA.init(tmp_path / "ca2", workload_ttl=timedelta(hours=2))
    assert MeshCA.open(tmp_path / "ca2").workload_ttl == timedelta(hours=2)
    c = load_pem_certs(issue(ca2, WEB, tmp_path, name="d").chain_pem)[0]
    assert timedelta(minutes=119) < c.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(minutes=121)


def test_rsa_2048_csr_is_accepted_with_key_encipherment(ca, openssl, tmp_path):
    key = rsa.generate_private_key(65537, 2048)
    chain = ca.issue(csr_with(key, [x509.UniformResourceIdentifier(str(WEB))]), ca.create_token(WEB))
    path = tmp_path / "rsa.pem"
    path.write_bytes(chain)
    assert "Digital Signature, Key Encipherment" in x509_text(openssl, path)


# -- what a CSR must be --------------------------------------------------------------------------


def _refused(ca, csr: bytes, match: str, identity=WEB):
    token = ca.create_token(identity)
    with pytest.raises(IssueRefused, match=match):
        ca.issue(csr, token)
    return token


@pytest.mark.parametrize("make_key, match", [
    (lambda: ec.generate_private_key(ec.SECP384R1()), "P-256"),
    (lambda: rsa.generate_private_key(65537, 1024), "2048"),
    (lambda: ed25519.Ed25519PrivateKey.generate(), "ECDSA P-256 or RSA"),
])
def test_weak_or_unexpected_keys_are_refused(ca, make_key, match):
    _refused(ca, csr_with(make_key(), [x509.UniformResourceIdentifier(str(WEB))]), match)


@pytest.mark.parametrize("sans, match", [
    (None, "no subject alternative name"),
    ([x509.UniformResourceIdentifier(str(WEB)), x509.UniformResourceIdentifier(str(API))], "exactly one"),
    ([x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web.default.svc")], "exactly one"),
    ([x509.DNSName("web.default.svc")], "exactly one"),
    ([x509.UniformResourceIdentifier("https://web.default.svc/")], "not a SPIFFE ID"),
    ([x509.UniformResourceIdentifier("spiffe://other.domain/ns/default/sa/web")], "trust domain"),
])
def test_csr_names_are_checked(ca, sans, match):
    _refused(ca, csr_with(generate_key(), sans), match)


def test_csr_with_a_broken_signature_is_refused(ca):
    der = x509.load_pem_x509_csr(make_csr(generate_key(), WEB)).public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"sa/web", b"sa/wex"))
    assert not tampered.is_signature_valid
    _refused(ca, tampered.public_bytes(serialization.Encoding.PEM), "signature is invalid",
             identity=SpiffeId.workload("default", "wex"))


def test_garbage_is_refused(ca):
    _refused(ca, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "signing request")
    _refused(ca, b"x" * 100_000, "larger")


# -- join tokens ---------------------------------------------------------------------------------


def test_single_use_token_is_refused_on_second_use(ca):
    token = ca.create_token(WEB)
    ca.issue(make_csr(generate_key(), WEB), token)
    with pytest.raises(TokenRefused, match="already used"):
        ca.issue(make_csr(generate_key(), WEB), token)


def test_token_with_several_uses(ca):
    token = ca.create_token(WEB, uses=2)
    for _ in range(2):
        ca.issue(make_csr(generate_key(), WEB), token)
    with pytest.raises(TokenRefused, match="already used"):
        ca.issue(make_csr(generate_key(), WEB), token)


def test_expired_token_is_refused(ca):
    token = ca.create_token(WEB, ttl=timedelta(hours=1), now=datetime.now(timezone.utc) - timedelta(hours=2))
    with pytest.raises(TokenRefused, match="expired"):
        ca.issue(make_csr(generate_key(), WEB), token)


def test_csr_for_another_identity_is_refused_and_the_token_kept(ca):
    token = ca.create_token(WEB)
    with pytest.raises(TokenRefused, match="the join token is for spiffe://cluster.local/ns/default/sa/web"):
        ca.issue(make_csr(generate_key(), API), token)
    ca.issue(make_csr(generate_key(), WEB), token)  # a refusal did not use it up


def test_unknown_tokens_are_refused(ca):
    for token in ("tmj.nope", "", "x" * 1000, None):
        with pytest.raises(TokenRefused, match="unknown"):
            ca.issue(make_csr(generate_key(), WEB), token)


def test_tokens_are_stored_hashed_in_a_private_file(ca):
    token = ca.create_token(WEB, uses=3)
    path = ca.dir / "tokens.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert token not in text and token.split(".", 1)[1] not in text
    (entry,) = json.loads(text)["tokens"].values()
    assert entry["identity"] == str(WEB) and entry["uses_left"] == 3


def test_token_identity_must_be_a_workload_of_this_trust_domain(ca):
    with pytest.raises(CaError, match="trust domain"):
        ca.create_token("spiffe://other.domain/ns/a/sa/b")
    with pytest.raises(CaError, match="workload"):
        ca.create_token("spiffe://cluster.local/just/a/path")


def test_single_use_token_raced_from_many_ca_instances_issues_once(ca):
    """Each thread opens the CA directory itself (as separate processes would), so only the
    flock on the directory stands between them."""
    token = ca.create_token(WEB)
    csrs = [make_csr(generate_key(), WEB) for _ in range(8)]
    results: list[str] = []
    barrier = threading.Barrier(len(csrs))

    def attempt(csr):
        mine = MeshCA.open(ca.dir)
        barrier.wait()
        try:
            mine.issue(csr, token)
            results.append("ok")
        except TokenRefused:
            results.append("refused")

    threads = [threading.Thread(target=attempt, args=(c,)) for c in csrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7


# -- key files -----------------------------------------------------------------------------------


def test_key_file_is_0600_even_with_a_lax_umask(tmp_path):
    old = os.umask(0)
    try:
        ca = MeshCA.init(tmp_path / "ca")
    finally:
        os.umask(old)
    keys = list((ca.dir / "authorities").glob("*.key.pem"))
    assert len(keys) == 1 and (keys[0].stat().st_mode & 0o777) == 0o600
    assert (ca.dir.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_ca_refuses_to_start_with_a_readable_key(ca, mode):
    (key,) = (ca.dir / "authorities").glob("*.key.pem")
    key.chmod(mode)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        MeshCA.open(ca.dir)
    key.chmod(0o600)
    MeshCA.open(ca.dir)


def test_ca_refuses_a_readable_token_file(ca):
    (ca.dir / "tokens.json").chmod(0o644)
    with pytest.raises(KeyPermissionError):
        MeshCA.open(ca.dir)


def test_init_refuses_an_existing_ca(ca):
    with pytest.raises(CaError, match="already holds a CA"):
        MeshCA.init(ca.dir)


# -- operator roots and intermediates (made with openssl, as an operator would) --------------------


def _openssl_ca(openssl, tmp_path):
    """An operator's offline root and an intermediate for the mesh, both made with openssl."""
    run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "root.key", "-out", "root.pem", "-days", "30", "-subj", "/O=Example/CN=Example Root",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "int.key", "-out", "int.csr", "-subj", "/O=Example/CN=Mesh Intermediate")
    (tmp_path / "int.ext").write_text("basicConstraints=critical,CA:TRUE,pathlen:0\n"
                                      "keyUsage=critical,keyCertSign,cRLSign\n"
                                      "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key", "-CAcreateserial",
        "-days", "20", "-extfile", "int.ext", "-out", "int.pem")
    return tmp_path


def test_operator_root_is_imported(openssl, tmp_path):
    d = _openssl_ca(openssl, tmp_path)
    ca = MeshCA.init(tmp_path / "ca", ca_cert_pem=(d / "root.pem").read_bytes(),
                     ca_key_pem=(d / "root.key").read_bytes())
    chain = ca.issue(make_csr(generate_key(), WEB), ca.create_token(WEB))
    (tmp_path / "leaf.pem").write_bytes(chain)
    assert ca.bundle_pem() == (d / "root.pem").read_bytes()
    assert verify(openssl, d / "root.pem", tmp_path / "leaf.pem").returncode == 0


def test_operator_intermediate_is_imported_and_chained(openssl, tmp_path):
    d = _openssl_ca(openssl, tmp_path)
    ca = MeshCA.init(tmp_path / "ca", ca_cert_pem=(d / "int.pem").read_bytes() + (d / "root.pem").read_bytes(),
                     ca_key_pem=(d / "int.key").read_bytes())
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem())
    assert load_pem_certs(ca.bundle_pem())[0].subject.rfc4514_string() == "CN=Example Root,O=Example"
    chain = ca.issue(make_csr(generate_key(), WEB), ca.create_token(WEB))
    certs = load_pem_certs(chain)
    assert [c.subject.rfc4514_string() for c in certs[1:]] == ["CN=Mesh Intermediate,O=Example"]
    leaf, rest = split_chain(chain, tmp_path, "w")
    assert verify(openssl, bundle, leaf, rest).returncode == 0
    assert verify(openssl, bundle, leaf).returncode != 0  # the intermediate is needed


def test_bad_operator_material_is_refused(openssl, tmp_path):
    d = _openssl_ca(openssl, tmp_path)
    with pytest.raises(CaError, match="does not belong"):
        MeshCA.init(tmp_path / "a", ca_cert_pem=(d / "root.pem").read_bytes(), ca_key_pem=(d / "int.key").read_bytes())
    with pytest.raises(CaError, match="self-signed root"):
        MeshCA.init(tmp_path / "b", ca_cert_pem=(d / "int.pem").read_bytes(), ca_key_pem=(d / "int.key").read_bytes())
    with pytest.raises(CaError, match="both"):
        MeshCA.init(tmp_path / "c", ca_cert_pem=(d / "root.pem").read_bytes())


# -- root rotation -------------------------------------------------------------------------------


def test_root_rotation_overlap_then_finish(ca, openssl, tmp_path):
    old_bundle = tmp_path / "old-bundle.pem"
    old_bundle.write_bytes(ca.bundle_pem())
    old_leaf, _ = split_chain(issue(ca, WEB, tmp_path, name="old").chain_pem, tmp_path, "old")

    ca.rotate()
    overlap_bundle = tmp_path / "overlap-bundle.pem"
    overlap_bundle.write_bytes(ca.bundle_pem())
    assert len(load_pem_certs(overlap_bundle.read_bytes())) == 2
    assert (ca.dir / "bundle.pem").read_bytes() == overlap_bundle.read_bytes()
    new_chain = issue(ca, WEB, tmp_path, name="new").chain_pem
    new_leaf, cross = split_chain(new_chain, tmp_path, "new")
    assert load_pem_certs(new_chain)[0].issuer != load_pem_certs(old_leaf.read_bytes())[0].issuer

    # During the overlap both verify against the bundle...
    assert verify(openssl, overlap_bundle, old_leaf).returncode == 0
    assert verify(openssl, overlap_bundle, new_leaf, cross).returncode == 0
    # ...and a peer still holding only the old bundle accepts the new certificate through the
    # cross-signed new root carried in its chain.
    assert verify(openssl, old_bundle, new_leaf, cross).returncode == 0
    assert verify(openssl, old_bundle, new_leaf).returncode != 0

    with pytest.raises(CaError, match="--force"):
        ca.finish_rotation()
    assert ca.finish_rotation(force=True)
    final = tmp_path / "final-bundle.pem"
    final.write_bytes(ca.bundle_pem())
    assert len(load_pem_certs(final.read_bytes())) == 1
    assert verify(openssl, final, old_leaf).returncode != 0
    assert verify(openssl, final, new_leaf, cross).returncode == 0
    assert len(list((ca.dir / "authorities").glob("*.key.pem"))) == 1  # the old key is gone
    # After the rotation the chain no longer carries the cross-signed root.
    assert len(load_pem_certs(issue(ca, WEB, tmp_path, name="later").chain_pem)) == 1


def test_rotation_seen_by_another_process_view_of_the_directory(ca, tmp_path):
    collector_view = MeshCA.open(ca.dir)  # e.g. the running collector
    before = collector_view.bundle_pem()
    MeshCA.open(ca.dir).rotate()  # e.g. `tracemesh ca rotate`
    assert collector_view.bundle_pem() != before
    assert len(load_pem_certs(collector_view.bundle_pem())) == 2


def test_rotation_with_a_date_drops_the_old_root_then(ca):
    now = datetime.now(timezone.utc)
    with pytest.raises(CaError, match="--force"):
        ca.rotate(retire_after=now + timedelta(hours=1))
    ca.rotate(retire_after=now + timedelta(days=2))
    assert len(load_pem_certs(ca.bundle_pem(now=now + timedelta(days=1)))) == 2
    assert len(load_pem_certs(ca.bundle_pem(now=now + timedelta(days=3)))) == 1
    with pytest.raises(CaError, match="already in progress"):
        ca.rotate()
    status = ca.status(now=now + timedelta(days=3))
    assert [a.in_bundle for a in status.authorities] == [False, True]


def test_status_reports_roots_and_tokens(ca):
    ca.create_token(WEB)
    used = ca.create_token(API)
    ca.issue(make_csr(generate_key(), API), used)
    ca.create_token(WEB, ttl=timedelta(minutes=1), now=datetime.now(timezone.utc) - timedelta(hours=1))
    s = ca.status()
    assert (s.tokens_active, s.tokens_used, s.tokens_expired) == (1, 1, 1)
    (a,) = s.authorities
    assert a.role == "signing" and len(a.fingerprint) == 95
    assert s.warnings == ()
