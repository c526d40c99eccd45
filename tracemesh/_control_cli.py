"""``tracemesh proxy-status``: every sidecar connected to the control plane, the config version it
acknowledged, and whether that is the current one (from the collector's ``GET /api/proxies``)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import re
from datetime import datetime, timezone

from tracemesh.query.render import table


def fetch_proxies(api: str, timeout: float = 10.0) -> dict:
    base = api if "://" in api else f"http://{api}"
    with urllib.request.urlopen(f"{base.rstrip('/')}/api/proxies", timeout=timeout) as r:
        return json.load(r)


def _since(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


#: A ``--workers`` sidecar's workers each hold a control stream, as ``HOST:PID/wINDEX`` (PID: the
#: supervisor's): the table shows them as one sidecar.
_WORKER = re.compile(r"^(?P<sidecar>.+)/w(?P<index>\d+)$")
_WORST = {"NACK": 2, "STALE": 1, "SYNCED": 0}


def _status(p: dict) -> str:
    if p["status"] == "NACK" and p.get("nack"):
        return f"NACK ({p['nack']['error']})"
    return p["status"]


def render(doc: dict) -> str:
    """The table ``proxy-status`` prints, from an ``/api/proxies`` answer."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for p in doc.get("proxies", []):
        m = _WORKER.match(p["instance_id"])
        key = (m["sidecar"], p["service"], p["version"], p["address"]) if m else (p["instance_id"], id(p))
        groups.setdefault(key, []).append(p)
    for key, ps in groups.items():
        if len(ps) == 1 and not _WORKER.match(ps[0]["instance_id"]):
            name = ps[0]["instance_id"]
        else:
            name = f"{key[0]} ({len(ps)} worker{'s' if len(ps) != 1 else ''})"
        worst = max(ps, key=lambda p: _WORST.get(p["status"], 1))
        acked = {p.get("acked_version") or "-" for p in ps}
        since = min((p["connected_since"] for p in ps if p.get("connected_since")), default=None)
        p = ps[0]
        # the status last: a NACK's reason can be long
        rows.append([name, f"{p['service']}/{p['version']}", p["address"],
                     acked.pop() if len(acked) == 1 else "mixed", _since(since), _status(worst)])
    head = f"control plane version {doc.get('version') or '(none yet)'}"
    if doc.get("refused"):
        r = doc["refused"]
        head += f"; snapshot {r['version']} refused: {r['error']}"
    if not rows:
        return head + "\nno sidecar connected"
    return head + "\n" + table(["sidecar", "service/version", "address", "acked", "connected since", "status"], rows)


def proxy_status(api: str, as_json: bool = False) -> int:
    try:
        doc = fetch_proxies(api)
    except urllib.error.HTTPError as exc:
        try:
            msg = json.load(exc).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        print(f"tracemesh proxy-status: {api}: {msg}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tracemesh proxy-status: cannot reach {api}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    # like `istioctl proxy-status`, the answer is the table; a sidecar out of sync is not an error
    return 0
