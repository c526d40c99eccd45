"""`tracemesh cert show --admin`: the identity and expiry a running sidecar holds, as it holds it."""

from __future__ import annotations

import subprocess

from mtls_helpers import MeshCaEnv, sid
from sidecar_harness import SidecarProc, Upstream

from tracemesh.net import Addr, free_port


def test_cert_show_reads_a_running_sidecar(tmp_path, tracemesh_cmd):
    env = MeshCaEnv(tmp_path)
    app = Upstream("app")
    admin = Addr("127.0.0.1", free_port())
    sc = SidecarProc(tmp_path, "catalog", app.addr, env.addr,
                     extra=(*env.sidecar_args(sid("catalog"), "strict"), "--admin", str(admin)))
    try:
        sc.start()
        r = subprocess.run([*tracemesh_cmd, "cert", "show", "--admin", f"http://{admin}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"spiffe id:  {sid('catalog')}" in r.stdout
        assert "not after:" in r.stdout and "renews at:" in r.stdout
        r = subprocess.run([*tracemesh_cmd, "cert", "show", "--admin", f"http://127.0.0.1:{free_port()}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "cannot reach" in r.stderr
    finally:
        sc.close()
        app.close()
        env.close()
