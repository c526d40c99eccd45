"""The mesh CA's wire protocol (``/tracemesh.ca.v1.CertificateAuthority/Sign``): its names and its
JSON messages, shared by the CA (:mod:`tracemesh.collector._ca_service`, which documents the
protocol) and its client in the sidecar (:mod:`tracemesh.proxy._mtls`). No grpcio and no
cryptography here: a sidecar imports this without loading either."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tracemesh.identity import SpiffeId

SERVICE = "tracemesh.ca.v1.CertificateAuthority"
METHOD = "Sign"
PATH = f"/{SERVICE}/{METHOD}"
#: istiod serves XDS and its CA over mTLS on 15012; the same job, the same port by default.
DEFAULT_MTLS_PORT = 15012
#: The CA's own serving identity; sidecars accept the renewal port only if it proves this ID.
COLLECTOR_NAMESPACE, COLLECTOR_ACCOUNT = "tracemesh-system", "collector"
#: A CSR is a few hundred bytes and a token ~50: anything past this is not a Sign request.
MAX_REQUEST_BYTES = 64 * 1024


def collector_id(trust_domain: str) -> SpiffeId:
    """The SPIFFE ID the collector's renewal port presents in ``trust_domain``."""
    return SpiffeId.workload(COLLECTOR_NAMESPACE, COLLECTOR_ACCOUNT, trust_domain)


# -- messages --------------------------------------------------------------------------------


class MessageError(ValueError):
    """A Sign request or response that is not what the protocol says."""


def encode_request(csr_pem: bytes, token: str | None = None) -> bytes:
    msg = {"csr": csr_pem.decode("ascii")}
    if token is not None:
        msg["token"] = token
    return json.dumps(msg).encode()


def decode_request(data: bytes) -> tuple[bytes, str | None]:
    if len(data) > MAX_REQUEST_BYTES:
        raise MessageError(f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"request is not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("csr"), str):
        raise MessageError('request must be a JSON object with "csr" (a PEM string)')
    unknown = set(msg) - {"csr", "token"}
    if unknown:
        raise MessageError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    token = msg.get("token")
    if token is not None and not isinstance(token, str):
        raise MessageError('"token" must be a string')
    return msg["csr"].encode("ascii", "replace"), token


@dataclass(frozen=True)
class SignResponse:
    chain_pem: bytes
    bundle_pem: bytes
    trust_domain: str
    renew_port: int
    not_after: str


def encode_response(r: SignResponse) -> bytes:
    return json.dumps({"chain": r.chain_pem.decode(), "bundle": r.bundle_pem.decode(),
                       "trust_domain": r.trust_domain, "renew_port": r.renew_port,
                       "not_after": r.not_after}).encode()


def decode_response(data: bytes) -> SignResponse:
    try:
        msg = json.loads(data)
        return SignResponse(msg["chain"].encode(), msg["bundle"].encode(), str(msg["trust_domain"]),
                            int(msg.get("renew_port") or 0), str(msg.get("not_after", "")))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise MessageError(f"not a Sign response: {exc!r}") from None
