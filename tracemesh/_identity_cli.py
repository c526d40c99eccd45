"""The operator's identity commands: ``tracemesh ca init|status|rotate``, ``tracemesh token create``,
``tracemesh cert show``.

Argument parsing lives here (:func:`add_identity_commands`), the work in
:mod:`tracemesh.collector._ca` and :mod:`tracemesh.identity`, imported only when a command runs.
Errors the operator can fix are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timedelta, timezone

from tracemesh._args import positive_int

#: Where the CA lives when --dir and $TRACEMESH_CA_DIR are not given.
DEFAULT_CA_DIR = "tracemesh-ca"
CA_DIR_ENV = "TRACEMESH_CA_DIR"

_DURATION = re.compile(r"(\d+)(y|d|h|m|s)")
_UNIT_S = {"y": 365 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``10y`` or sums like ``1h30m``; positive."""
    t = text.strip().lower()
    pos, total = 0, 0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m, 24h, 7d or 1h30m, got {text!r}")
    if total <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return timedelta(seconds=total)


def _when(text: str) -> datetime:
    """An ISO 8601 date or time (UTC when no offset is given), or a duration from now."""
    try:
        return datetime.now(timezone.utc) + parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date/time (2027-01-31, 2027-01-31T12:00Z) or a duration (72h), got {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help=f"CA directory (default: ${CA_DIR_ENV}, else ./{DEFAULT_CA_DIR})")


def add_identity_commands(sub) -> None:
    """Register ``ca``, ``token`` and ``cert`` on the ``tracemesh`` subparsers."""
    ca = sub.add_parser("ca", help="the mesh certificate authority: init, status, rotate")
    ca_sub = ca.add_subparsers(dest="ca_action", required=True, metavar="ACTION")

    init = ca_sub.add_parser("init", help="create the CA: a new root, or the operator's root/intermediate")
    _add_dir(init)
    init.add_argument("--trust-domain", default=None, help="SPIFFE trust domain (default: cluster.local)")
    init.add_argument("--root-cert", help="operator's CA certificate (PEM; an intermediate followed by its "
                                          "issuers up to the root); needs --root-key")
    init.add_argument("--root-key", help="its private key (unencrypted PEM)")
    init.add_argument("--root-ttl", type=parse_duration, default=None,
                      help="lifetime of a new root (default: 10y)")
    init.add_argument("--workload-ttl", type=parse_duration, default=None,
                      help="lifetime of workload certificates (default: 24h; renewed at half-life)")

    st = ca_sub.add_parser("status", help="roots with expiry and fingerprints, rotation, join tokens")
    _add_dir(st)

    rot = ca_sub.add_parser("rotate", help="start a root rotation (old root trusted until --finish), or finish it")
    _add_dir(rot)
    rot.add_argument("--finish", action="store_true", help="end the rotation: drop the old root from the bundle")
    rot.add_argument("--until", type=_when, default=None,
                     help="drop the old root from the bundle at this time (ISO date/time or a duration "
                          "such as 72h) instead of waiting for --finish")
    rot.add_argument("--force", action="store_true",
                     help="allow dropping the old root before one workload lifetime has passed")
    rot.add_argument("--root-cert", help="use the operator's new CA certificate instead of a generated root")
    rot.add_argument("--root-key", help="its private key (unencrypted PEM)")
    rot.add_argument("--root-ttl", type=parse_duration, default=None, help="lifetime of a new root (default: 10y)")

    tok = sub.add_parser("token", help="join tokens that let a workload get its first certificate")
    tok_sub = tok.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    create = tok_sub.add_parser("create", help="create a join token bound to one identity; prints the token")
    _add_dir(create)
    create.add_argument("--identity", required=True, help="spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    create.add_argument("--ttl", type=parse_duration, default=timedelta(hours=1),
                        help="how long the token is valid (default: 1h)")
    create.add_argument("--uses", type=positive_int, default=1, help="how many CSRs it may authenticate (default: 1)")

    cert = sub.add_parser("cert", help="inspect workload certificates")
    cert_sub = cert.add_subparsers(dest="cert_action", required=True, metavar="ACTION")
    show = cert_sub.add_parser("show", help="the SPIFFE ID, issuer and expiry of a certificate file "
                                            "(exit status 1 when expired)")
    where = show.add_mutually_exclusive_group(required=True)
    where.add_argument("file", nargs="?", help="PEM certificate or chain (the first certificate is shown)")
    where.add_argument("--admin", metavar="URL", help="ask a running sidecar's admin endpoint (--admin ADDR) instead")


def _ca_dir(args) -> str:
    return args.dir or os.environ.get(CA_DIR_ENV) or DEFAULT_CA_DIR


def _fmt_remaining(delta: timedelta) -> str:
    s = int(abs(delta.total_seconds()))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    text = f"{d}d{h}h" if d else f"{h}h{m}m" if h else f"{m}m{s}s" if m else f"{s}s"
    return f"expired {text} ago" if delta.total_seconds() <= 0 else f"{text} left"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_identity_command(args) -> int:
    """Run a parsed ``ca``/``token``/``cert`` command; the exit status."""
    from tracemesh.collector._ca import CaError
    from tracemesh.identity import IdentityError

    try:
        if args.command == "ca":
            return {"init": _ca_init, "status": _ca_status, "rotate": _ca_rotate}[args.ca_action](args)
        if args.command == "token":
            return _token_create(args)
        if args.command == "cert":
            return _cert_show(args)
    except (CaError, IdentityError, OSError, ValueError) as exc:
        print(f"tracemesh {args.command}: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


def _import_pair(args) -> tuple[bytes | None, bytes | None]:
    if bool(args.root_cert) != bool(args.root_key):
        raise ValueError("--root-cert and --root-key go together")
    if not args.root_cert:
        return None, None
    return _read(args.root_cert), _read(args.root_key)


def _ca_init(args) -> int:
    from tracemesh.collector._ca import DEFAULT_ROOT_TTL, MeshCA
    from tracemesh.identity import DEFAULT_TRUST_DOMAIN, DEFAULT_WORKLOAD_TTL

    cert_pem, key_pem = _import_pair(args)
    ca = MeshCA.init(_ca_dir(args), trust_domain=args.trust_domain or DEFAULT_TRUST_DOMAIN,
                     root_ttl=args.root_ttl or DEFAULT_ROOT_TTL,
                     workload_ttl=args.workload_ttl or DEFAULT_WORKLOAD_TTL,
                     ca_cert_pem=cert_pem, ca_key_pem=key_pem)
    print(f"CA initialised in {ca.dir} for trust domain {ca.trust_domain}")
    print(f"trust bundle: {ca.bundle_path}")
    return _ca_status(args)


def _ca_status(args) -> int:
    from tracemesh.collector._ca import MeshCA

    ca = MeshCA.open(_ca_dir(args))
    s = ca.status()
    now = datetime.now(timezone.utc)
    print(f"directory:     {s.directory}")
    print(f"trust domain:  {s.trust_domain}")
    print(f"workload cert: {s.workload_ttl} (renewed at half-life)")
    print(f"bundle:        {ca.bundle_path}")
    for a in s.authorities:
        print(f"{a.role} authority {a.id}{'' if a.in_bundle else ' (no longer trusted)'}")
        if a.subject != a.root_subject:
            print(f"  issuer cert: {a.subject}")
        print(f"  root:        {a.root_subject}")
        print(f"  sha256:      {a.fingerprint}")
        print(f"  not after:   {a.not_after.isoformat()} ({_fmt_remaining(a.not_after - now)})")
        if a.role == "retiring":
            print(f"  trusted until: {a.retire_after.isoformat() if a.retire_after else 'ca rotate --finish'}")
    print(f"join tokens:   {s.tokens_active} active, {s.tokens_used} used, {s.tokens_expired} expired")
    for w in s.warnings:
        print(f"warning: {w}")
    return 0


def _ca_rotate(args) -> int:
    from tracemesh.collector._ca import DEFAULT_ROOT_TTL, MeshCA

    ca = MeshCA.open(_ca_dir(args))
    if args.finish:
        if args.until or args.root_cert or args.root_key:
            raise ValueError("--finish takes no --until, --root-cert or --root-key")
        removed = ca.finish_rotation(force=args.force)
        print(f"rotation finished; removed {', '.join(removed)}" if removed else "no rotation in progress")
        return _ca_status(args)
    cert_pem, key_pem = _import_pair(args)
    new_id = ca.rotate(root_ttl=args.root_ttl or DEFAULT_ROOT_TTL, retire_after=args.until,
                       ca_cert_pem=cert_pem, ca_key_pem=key_pem, force=args.force)
    print(f"new authority {new_id} signs from now on; the old root stays in the bundle "
          + (f"until {args.until.isoformat()}" if args.until else "until `tracemesh ca rotate --finish`"))
    return _ca_status(args)


def _token_create(args) -> int:
    from tracemesh.collector._ca import MeshCA

    ca = MeshCA.open(_ca_dir(args))
    token = ca.create_token(args.identity, ttl=args.ttl, uses=args.uses)
    print(token)
    expires = datetime.now(timezone.utc) + args.ttl
    print(f"join token for {args.identity}: {args.uses} use{'s' * (args.uses != 1)}, "
          f"expires {expires.isoformat(timespec='seconds')}", file=sys.stderr)
    return 0


def _cert_show(args) -> int:
    from tracemesh.identity import CredentialError, cert_fingerprint, load_pem_certs, spiffe_id_of

    renew_at = None
    if args.admin:
        import urllib.error
        import urllib.request

        base = args.admin if "://" in args.admin else f"http://{args.admin}"
        try:
            with urllib.request.urlopen(f"{base.rstrip('/')}/certificate", timeout=10) as r:
                pem, renew_at = r.read(), r.headers.get("x-tracemesh-renew-at")
        except urllib.error.HTTPError as exc:
            print(f"tracemesh cert show: {base}: {exc.read(2000).decode(errors='replace').strip()}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"tracemesh cert show: cannot reach {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            return 2
    else:
        pem = _read(args.file)
    certs = load_pem_certs(pem)
    leaf = certs[0]
    try:
        sid = str(spiffe_id_of(leaf))
    except CredentialError as exc:
        sid = f"(none: {exc})"
    now = datetime.now(timezone.utc)
    remaining = leaf.not_valid_after_utc - now
    print(f"spiffe id:  {sid}")
    print(f"issuer:     {leaf.issuer.rfc4514_string()}")
    print(f"serial:     {leaf.serial_number:x}")
    print(f"not before: {leaf.not_valid_before_utc.isoformat()}")
    print(f"not after:  {leaf.not_valid_after_utc.isoformat()}")
    print(f"remaining:  {_fmt_remaining(remaining)}")
    print(f"sha256:     {cert_fingerprint(leaf)}")
    if renew_at:
        print(f"renews at:  {datetime.fromtimestamp(float(renew_at), timezone.utc).isoformat()}")
    if len(certs) > 1:
        print(f"chain:      {len(certs) - 1} more: " + "; ".join(c.subject.rfc4514_string() for c in certs[1:]))
    return 1 if remaining.total_seconds() <= 0 else 0
