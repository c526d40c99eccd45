"""``tracemesh proxy-status``: every sidecar connected to the control plane, the config version it
acknowledged, and whether that is the current one (from the collector's ``GET /api/proxies``)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
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


def render(doc: dict) -> str:
    """The table ``proxy-status`` prints, from an ``/api/proxies`` answer."""
    rows = []
    for p in doc.get("proxies", []):
        status = p["status"]
        if status == "NACK" and p.get("nack"):
            status = f"NACK ({p['nack']['error']})"
        # the status last: a NACK's reason can be long
        rows.append([p["instance_id"], f"{p['service']}/{p['version']}", p["address"],
                     p.get("acked_version") or "-", _since(p.get("connected_since")), status])
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
