"""W3C Trace Context (``traceparent``), sans-I/O.

https://www.w3.org/TR/trace-context/: ``version-traceid-parentid-flags``, lowercase hex. A header
that does not parse is ignored (a new trace starts), as the spec asks; a future version is read by
its first four fields. All-zero ids are invalid.
"""

from __future__ import annotations

import os
from typing import NamedTuple

_HEX = frozenset("0123456789abcdef")
SAMPLED = 0x01


class TraceParent(NamedTuple):
    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes: the caller's span, our span's parent
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{self.flags:02x}"


def _hex(s: str, n: int) -> bytes | None:
    if len(s) != n or not _HEX.issuperset(s):
        return None
    b = bytes.fromhex(s)
    return b if any(b) else None


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The parsed header, or None when absent or invalid (the caller then starts a new trace)."""
    if not value:
        return None
    value = value.strip()
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace_hex, span_hex, flags_hex = parts[:4]
    if len(version) != 2 or not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    trace_id, span_id = _hex(trace_hex, 32), _hex(span_hex, 16)
    if trace_id is None or span_id is None or len(flags_hex) != 2 or not _HEX.issuperset(flags_hex):
        return None
    return TraceParent(trace_id, span_id, int(flags_hex, 16))


def new_trace_id() -> bytes:
    while True:
        b = os.urandom(16)
        if any(b):
            return b


def new_span_id() -> bytes:
    while True:
        b = os.urandom(8)
        if any(b):
            return b
