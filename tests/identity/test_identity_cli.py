"""The operator's commands: `tracemesh ca init|status|rotate`, `token create`, `cert show`."""

from __future__ import annotations

import argparse
import subprocess
from datetime import timedelta

import pytest
from idhelpers import WEB, write_cred

from tracemesh._identity_cli import parse_duration
from tracemesh.cli import main
from tracemesh.collector._ca import MeshCA
from tracemesh.identity import generate_key, load_pem_certs, make_csr, private_key_pem


def test_the_console_script_end_to_end(tracemesh_cmd, tmp_path, openssl):
    """As an operator types it: init, a token, a certificate for it, `cert show`."""
    ca_dir = tmp_path / "ca"
    run = lambda *a: subprocess.run([*tracemesh_cmd, *a], capture_output=True, text=True, timeout=60)  # noqa: E731
    out = run("ca", "init", "--dir", str(ca_dir), "--trust-domain", "prod.example", "--workload-ttl", "2h")
    assert out.returncode == 0, out.stderr
    assert "trust domain:  prod.example" in out.stdout and "signing authority" in out.stdout

    out = run("token", "create", "--dir", str(ca_dir), "--identity", "spiffe://prod.example/ns/shop/sa/cart",
              "--ttl", "10m")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("tmj.") and "1 use," in out.stderr

    ca = MeshCA.open(ca_dir)
    key = generate_key()
    chain = ca.issue(make_csr(key, "spiffe://prod.example/ns/shop/sa/cart"), token)
    cert_file = tmp_path / "cart.pem"
    cert_file.write_bytes(chain)
    out = run("cert", "show", str(cert_file))
    assert out.returncode == 0, out.stderr
    assert "spiffe id:  spiffe://prod.example/ns/shop/sa/cart" in out.stdout
    assert "issuer:     CN=tracemesh root" in out.stdout
    assert "remaining:  1h59m left" in out.stdout or "remaining:  2h0m left" in out.stdout
    subprocess.run([openssl, "verify", "-CAfile", str(ca_dir / "bundle.pem"), str(cert_file)], check=True,
                   capture_output=True)


def test_status_and_rotation(tmp_path, capsys):
    d = str(tmp_path / "ca")
    assert main(["ca", "init", "--dir", d, "--workload-ttl", "1h"]) == 0
    assert main(["token", "create", "--dir", d, "--identity", str(WEB), "--uses", "3"]) == 0
    capsys.readouterr()

    assert main(["ca", "status", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "join tokens:   1 active, 0 used, 0 expired" in out
    assert "sha256:" in out and "not after:" in out and "3649d" in out

    assert main(["ca", "rotate", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "retiring authority" in out and out.count("sha256:") == 2
    assert "warning: root rotation in progress" in out
    assert len(load_pem_certs((tmp_path / "ca" / "bundle.pem").read_bytes())) == 2

    assert main(["ca", "rotate", "--dir", d, "--finish"]) == 1  # too early: certificates may be live
    assert "--force" in capsys.readouterr().err
    assert main(["ca", "rotate", "--dir", d, "--finish", "--force"]) == 0
    out = capsys.readouterr().out
    assert "rotation finished" in out and out.count("sha256:") == 1
    assert len(load_pem_certs((tmp_path / "ca" / "bundle.pem").read_bytes())) == 1


def test_rotate_until_a_date(tmp_path, capsys):
    d = str(tmp_path / "ca")
    main(["ca", "init", "--dir", d])
    assert main(["ca", "rotate", "--dir", d, "--until", "2h"]) == 1  # inside the workload lifetime
    assert main(["ca", "rotate", "--dir", d, "--until", "2099-01-01"]) == 0
    assert "trusted until: 2099-01-01T00:00:00+00:00" in capsys.readouterr().out


def test_ca_dir_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACEMESH_CA_DIR", str(tmp_path / "envca"))
    assert main(["ca", "init", "--trust-domain", "env.example"]) == 0
    assert (tmp_path / "envca" / "state.json").exists()


def test_operator_errors_are_one_line_and_status_1(tmp_path, capsys):
    d = tmp_path / "ca"
    assert main(["ca", "status", "--dir", str(d)]) == 1
    assert "holds no CA: run `tracemesh ca init" in capsys.readouterr().err
    main(["ca", "init", "--dir", str(d)])
    capsys.readouterr()
    assert main(["token", "create", "--dir", str(d), "--identity", "spiffe://Bad/x"]) == 1
    assert "lowercase" in capsys.readouterr().err
    (key,) = (d / "authorities").glob("*.key.pem")
    key.chmod(0o644)
    assert main(["ca", "status", "--dir", str(d)]) == 1
    err = capsys.readouterr().err
    assert "mode 0644" in err and "chmod 600" in err and len(err.strip().splitlines()) == 1
    assert main(["ca", "init", "--dir", str(tmp_path / "x"), "--root-cert", str(key)]) == 1
    assert "go together" in capsys.readouterr().err


def test_cert_show_of_an_expired_certificate_exits_1(ca, tmp_path, capsys):
    from datetime import datetime, timezone

    key = generate_key()
    chain = ca.issue(make_csr(key, WEB), ca.create_token(WEB), ttl=timedelta(hours=1),
                     _now=datetime.now(timezone.utc) - timedelta(days=1))
    cred = write_cred(tmp_path, "old", private_key_pem(key), chain)
    assert main(["cert", "show", str(cred.chain_file)]) == 1
    assert "remaining:  expired 23h" in capsys.readouterr().out
    (tmp_path / "junk.pem").write_text("nope")
    assert main(["cert", "show", str(tmp_path / "junk.pem")]) == 1


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("1h30m", 5400),
                                           ("7d", 604800), ("10y", 3650 * 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "h", "1x", "1h 30m", "-1h", "1.5h"])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)
