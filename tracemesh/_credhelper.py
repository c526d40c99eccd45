"""``python -m tracemesh._credhelper new|check``: a sidecar's key, CSR and certificate checks, run
in a short-lived child so that the sidecar never loads cryptography (see
:class:`tracemesh.identity.ChildProcessCrypto`). One JSON document in on stdin, one out on stdout:

- ``new`` ``{"spiffe_id"}`` -> ``{"key", "csr"}`` (PEM);
- ``check`` ``{"key", "chain", "spiffe_id", "now", "issued"}`` -> ``{"not_before", "not_after"}``.

A refusal is ``{"error": message}`` (a :class:`~tracemesh.identity.CredentialError`'s words);
anything else is a crash, with a non-zero exit.
"""

from __future__ import annotations

import json
import sys

from tracemesh.identity import (
    CredentialError,
    SpiffeId,
    check_credential,
    new_key_and_csr,
)


def main(op: str, doc: dict) -> dict:
    try:
        if op == "new":
            key_pem, csr_pem = new_key_and_csr(SpiffeId.parse(doc["spiffe_id"]))
            return {"key": key_pem.decode(), "csr": csr_pem.decode()}
        if op == "check":
            facts = check_credential(doc["key"].encode(), doc["chain"].encode(), SpiffeId.parse(doc["spiffe_id"]),
                                     float(doc["now"]), issued=bool(doc["issued"]))
            return {"not_before": facts.not_before, "not_after": facts.not_after}
    except CredentialError as exc:
        return {"error": str(exc)}
    raise SystemExit(f"unknown operation {op!r}: new or check")


if __name__ == "__main__":
    json.dump(main(sys.argv[1] if len(sys.argv) > 1 else "", json.load(sys.stdin)), sys.stdout)
