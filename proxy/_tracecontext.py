"""Trace context in and out of a request, sans-I/O: W3C ``traceparent`` and ``tracestate``, and B3.

https://www.w3.org/TR/trace-context/: ``version-traceid-parentid-flags``, lowercase hex. A header
that does not parse is ignored (a new trace starts), as the spec asks; a future version is read by
its first four fields. All-zero ids are invalid. B3 (Zipkin's, as Envoy and Istio take it) is read
when there is no valid ``traceparent``: :func:`extract` does both in one pass over the headers.
"""

from __future__ import annotations

import re
from random import getrandbits as _getrandbits
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


# Ids come from ``random`` (as the OpenTelemetry SDK's do), not os.urandom: a system call per id
# costs more than the rest of making a span; ids need to be unique, not unpredictable. The module's
# generator is reseeded in a forked child (--workers), so workers never share a sequence.
def new_trace_id() -> bytes:
    while True:
        n = _getrandbits(128)
        if n:
            return n.to_bytes(16, "big")


def new_span_id() -> bytes:
    while True:
        n = _getrandbits(64)
        if n:
            return n.to_bytes(8, "big")


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_request_id() -> bytes:
    """A random (version 4) UUID in its text form, as ``str(uuid.uuid4())`` makes, for ``x-request-id``."""
    h = (_getrandbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16, "big").hex().encode()
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


# -- tracestate ------------------------------------------------------------------------------
# https://www.w3.org/TR/trace-context/#tracestate-header: list-members ``key=value`` separated by
# commas (optional whitespace around each; empty members allowed and dropped), several header lines
# concatenated. A member that breaks the grammar, a duplicated key, or more than 32 members make the
# whole value invalid: it is dropped, as the W3C test suite and the OpenTelemetry SDKs do.

MAX_TRACESTATE_MEMBERS = 32
#: Vendors must propagate at least this much; longer values are cut as the spec says (below).
MAX_TRACESTATE_CHARS = 512
#: Over MAX_TRACESTATE_CHARS, members longer than this go first, then members from the end.
LONG_TRACESTATE_MEMBER = 128
_KEY_CHARS = r"[a-z0-9_\-*/]"
_MEMBER = re.compile(
    rf"(?:[a-z]{_KEY_CHARS}{{0,255}}|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", re.ASCII)


def parse_tracestate(values) -> str:
    """The ``tracestate`` to propagate, from the header's values (a str, or a list of the lines
    received, in order): its list-members joined by ``,``, cut to MAX_TRACESTATE_CHARS; ``""`` when
    absent or invalid. Never raises."""
    if not values:
        return ""
    if isinstance(values, str):
        values = (values,)
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        for m in value.split(","):
            m = m.strip(" \t")
            if not m:
                continue
            if not _MEMBER.fullmatch(m):
                return ""
            key = m.partition("=")[0]
            if key in keys:
                return ""
            keys.add(key)
            members.append(m)
            if len(members) > MAX_TRACESTATE_MEMBERS:
                return ""
    size = sum(map(len, members)) + max(len(members) - 1, 0)
    if size > MAX_TRACESTATE_CHARS:
        for m in [m for m in members if len(m) > LONG_TRACESTATE_MEMBER]:
            members.remove(m)
            size -= len(m) + 1
        while size > MAX_TRACESTATE_CHARS:
            size -= len(members.pop()) + 1
    return ",".join(members)


# -- B3 ----------------------------------------------------------------------------------------
# https://github.com/openzipkin/b3-propagation: ``b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]``
# or ``b3: {SamplingState}`` alone; or the multi headers X-B3-TraceId, X-B3-SpanId, X-B3-ParentSpanId,
# X-B3-Sampled, X-B3-Flags. Ids are lowercase hex; a 64-bit trace id is left-padded with zeros to
# 128 bits. Sampling state: 1 accept, 0 deny, d debug (accept), absent: deferred to us.


class B3(NamedTuple):
    trace_id: bytes | None  # 16 bytes; None: a sampling decision only (a new trace starts)
    span_id: bytes | None  # 8 bytes: the caller's span
    sampled: bool | None  # None: deferred (the receiver decides)
    debug: bool = False
    parent_span_id: bytes | None = None
    short: bool = False  # the trace id came as 64 bits

    def traceparent(self) -> TraceParent | None:
        """As a W3C context (a deferred decision counts as sampled: the sidecar records), or None
        when it carries no ids."""
        if self.trace_id is None or self.span_id is None:
            return None
        return TraceParent(self.trace_id, self.span_id, 0 if self.sampled is False else SAMPLED)

    def _trace_hex(self) -> str:
        h = self.trace_id.hex()
        return h[16:] if self.short and h.startswith("0" * 16) else h

    def _state(self) -> str:
        return "d" if self.debug else "" if self.sampled is None else "1" if self.sampled else "0"

    def single(self) -> str:
        """The ``b3`` header's value."""
        state = self._state()
        if self.trace_id is None or self.span_id is None:
            return state or "1"
        out = f"{self._trace_hex()}-{self.span_id.hex()}"
        if state:
            out += f"-{state}"
            if self.parent_span_id:
                out += f"-{self.parent_span_id.hex()}"
        return out

    def multi(self) -> list[tuple[bytes, bytes]]:
        """The X-B3-* headers (lowercase names, as HTTP/2 wants them)."""
        out = []
        if self.trace_id is not None and self.span_id is not None:
            out += [(b"x-b3-traceid", self._trace_hex().encode()), (b"x-b3-spanid", self.span_id.hex().encode())]
            if self.parent_span_id:
                out.append((b"x-b3-parentspanid", self.parent_span_id.hex().encode()))
        if self.debug:
            out.append((b"x-b3-flags", b"1"))  # debug implies accept: X-B3-Sampled is not sent with it
        elif self.sampled is not None:
            out.append((b"x-b3-sampled", b"1" if self.sampled else b"0"))
        return out


def _b3_trace_id(s: str) -> tuple[bytes, bool] | None:
    if len(s) == 16:
        b = _hex(s, 16)
        return (b"\0" * 8 + b, True) if b is not None else None
    b = _hex(s, 32)
    return (b, False) if b is not None else None


_B3_STATES = {"1": (True, False), "0": (False, False), "d": (True, True)}


def parse_b3_single(value: str | None) -> B3 | None:
    """The ``b3`` header, or None when absent or malformed. Never raises."""
    if not value:
        return None
    value = value.strip(" \t")
    if value in _B3_STATES:
        sampled, debug = _B3_STATES[value]
        return B3(None, None, sampled, debug)
    parts = value.split("-")
    if not 2 <= len(parts) <= 4:
        return None
    tid = _b3_trace_id(parts[0])
    span_id = _hex(parts[1], 16)
    if tid is None or span_id is None:
        return None
    sampled, debug, parent = None, False, None
    if len(parts) >= 3:
        if parts[2] not in _B3_STATES:
            return None
        sampled, debug = _B3_STATES[parts[2]]
    if len(parts) == 4:
        parent = _hex(parts[3], 16)
        if parent is None:
            return None
    return B3(tid[0], span_id, sampled, debug, parent, tid[1])


#: X-B3-Sampled as the spec has it, and ``true``/``false``, which it asks lenient readers to take
_B3_SAMPLED = {"1": True, "0": False, "true": True, "false": False}


def parse_b3_multi(trace_id: str | None, span_id: str | None, sampled: str | None = None,
                   flags: str | None = None, parent_span_id: str | None = None) -> B3 | None:
    """The X-B3-* headers' values, or None when they carry nothing valid. A sampling decision
    alone (no ids) is valid; ids need both trace and span id. Never raises."""
    debug = (flags or "").strip() == "1"
    decision = _B3_SAMPLED.get((sampled or "").strip().lower())
    if sampled is not None and sampled.strip() and decision is None:
        return None
    if debug:
        decision = True
    if trace_id is None and span_id is None:
        return B3(None, None, decision, debug) if decision is not None else None
    tid = _b3_trace_id((trace_id or "").strip())
    sid = _hex((span_id or "").strip(), 16)
    if tid is None or sid is None:
        return None
    parent = None
    if parent_span_id is not None and parent_span_id.strip():
        parent = _hex(parent_span_id.strip(), 16)
        if parent is None:
            return None
    return B3(tid[0], sid, decision, debug, parent, tid[1])


B3_HEADERS = frozenset({b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
                        b"x-b3-flags"})


class Incoming(NamedTuple):
    """The trace context a request came with (:func:`extract`)."""

    parent: TraceParent | None  # the caller's context, from traceparent or else B3
    tracestate: str  # to propagate (and record); "" when none
    b3_single: bool  # a ``b3`` header came (it is replaced by one naming our span)
    b3_multi: bool  # X-B3-* headers came (likewise)
    b3: B3 | None  # the B3 context read, if any (the ids may have lost to traceparent's)

    @property
    def sampled(self) -> bool:
        """Record this request? The caller's decision; with none (a new trace), yes, unless a
        B3 decision alone (``b3: 0``) said no."""
        if self.parent is not None:
            return self.parent.sampled
        return not (self.b3 is not None and self.b3.sampled is False)


def extract(headers) -> tuple[Incoming, bytes | None]:
    """The trace context of a request's *headers* ((name, value) byte pairs, names lowercase), and
    its ``x-request-id`` (None if absent), in one pass. A valid ``traceparent`` wins; else B3 (the
    single header, else the multi ones). ``tracestate`` goes with a valid ``traceparent`` only (the
    spec's rule). Never raises."""
    tp_v = request_id = None
    ts: list[str] | None = None
    b3: dict | None = None
    for k, v in headers:
        if k == b"traceparent":
            if tp_v is None:  # the first one, as for x-request-id
                tp_v = v
        elif k == b"x-request-id":
            if request_id is None:
                request_id = v
        elif k == b"tracestate":
            (ts := ts or []).append(v.decode("latin-1"))
        elif k in B3_HEADERS:
            (b3 := b3 or {})[k] = v.decode("latin-1")
    tp = parse_traceparent(tp_v.decode("latin-1")) if tp_v else None
    state = parse_tracestate(ts) if tp is not None and ts else ""
    if b3 is None:
        return Incoming(tp, state, False, False, None), request_id
    single = b"b3" in b3
    multi = len(b3) > single
    ctx = parse_b3_single(b3.get(b"b3"))
    if ctx is None and multi:
        ctx = parse_b3_multi(b3.get(b"x-b3-traceid"), b3.get(b"x-b3-spanid"), b3.get(b"x-b3-sampled"),
                             b3.get(b"x-b3-flags"), b3.get(b"x-b3-parentspanid"))
    if tp is None and ctx is not None:
        tp = ctx.traceparent()
    return Incoming(tp, state, single, multi, ctx), request_id
