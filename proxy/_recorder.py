"""The sidecar's span recorder and OTLP/gRPC exporter: no OpenTelemetry SDK on the request path.

:meth:`SpanRecorder.record` appends one tuple to a bounded deque (about a microsecond) and never
blocks: when the queue is full the span is dropped and counted. :class:`OTLPExporter` takes
batches off the queue, encodes them into an ``ExportTraceServiceRequest`` (:class:`SpanEncoder`:
protobuf's wire format written directly, byte for byte what the reference message encoder,
:func:`encode_request`, writes, with what repeats from span to span encoded once) and sends them
over :mod:`._otlp`'s HTTP/2 connection, all in the Trio thread: encoding a slice at a time, no
worker thread, no grpcio.

Cancellation: cancelling :meth:`OTLPExporter.run` stops exporting; call :meth:`OTLPExporter.flush`
(shielded, bounded) at shutdown to send what is still queued.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import trio

from tracemesh.proxy._otlp import ExportError, OtlpClient

log = logging.getLogger(__name__)

SCOPE_NAME = "tracemesh.proxy"
#: Spans held for export at most; beyond this they are dropped and counted (memory stays bounded).
MAX_QUEUED_SPANS = 16_384
#: One export request carries at most this many spans (~0.7 MB), well under gRPC's 4 MiB default.
MAX_BATCH = 1024
#: A span is exported at most about this long after it ends. Each export costs the sidecar ~0.2 ms
#: besides its records (a call, its frames, the wake-ups): at 0.5 s that was ~2 us a request at
#: 200 req/s for spans and access logs; a busier sidecar fills MAX_BATCH first.
EXPORT_INTERVAL_S = 1.0
EXPORT_TIMEOUT_S = 10.0
#: Records encoded between two checkpoints of the exporter (~0.1-0.2 ms of the event loop's time).
ENCODE_SLICE = 32
#: A batch that fails this many times in a row is dropped (counted), so one outage cannot pin memory.
MAX_ATTEMPTS = 5
EXPORT_PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

# Span.SpanKind and Status.StatusCode of opentelemetry-proto, as numbers: the sidecar writes the wire
# format itself and never loads the protobuf runtime (~2.5 MB resident); the tests check them.
KIND_SERVER = 2
KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2


class SpanRecord(NamedTuple):
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    status: int
    status_message: str
    trace_state: str = ""  # W3C tracestate as received (Span.trace_state)


@dataclass
class RecorderStats:
    recorded: int = 0
    dropped: int = 0
    exported: int = 0
    export_failures: int = 0
    export_dropped: int = 0


def any_value(v):
    """A Python attribute value as OTLP's AnyValue message (bool before int: bool is an int in
    Python). For the reference encoders (tests); it imports the protobuf messages."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def _kv(key: str, value):
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    return KeyValue(key=key, value=any_value(value))


def encode_request(resource: dict, scope_version: str, spans: list[SpanRecord]) -> bytes:
    """One ExportTraceServiceRequest (serialized) for *spans* under one resource and scope, built
    with the OpenTelemetry protobuf messages: the reference :class:`SpanEncoder` is held to."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    out = []
    for s in spans:
        out.append(Span(
            trace_id=s.trace_id, span_id=s.span_id, trace_state=s.trace_state, parent_span_id=s.parent_span_id,
            name=s.name,
            kind=s.kind, start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
            attributes=[_kv(k, v) for k, v in s.attributes.items()],
            status=Status(code=s.status, message=s.status_message),
        ))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[_kv(k, v) for k, v in resource.items()]),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name=SCOPE_NAME, version=scope_version), spans=out)],
    )])
    return req.SerializeToString()


# -- the same request, written straight to protobuf's wire format ----------------------------
# encode_request builds message objects (~47 us a span here); this writes the bytes directly with
# cached key prefixes (~8 us). The test suite checks both parse to the same message.

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack


_V1 = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _V1[n]
    if 0 < n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 is ten bytes, two's complement
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_KEY_CACHE: dict[str, bytes] = {}
_KEY_CACHE_MAX = 4096


def _any_value(v) -> bytes:
    if isinstance(v, str):
        return _ld(b"\x0a", v.encode())
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v)
    if isinstance(v, float):
        return b"\x21" + _pack_d(v)
    return _ld(b"\x0a", str(v).encode())


def encode_request_fast(resource: dict, scope_version: str, spans: list["SpanRecord"]) -> bytes:
    """The bytes of ``encode_request(resource, scope_version, spans)``, without message objects."""
    return SpanEncoder(resource, scope_version).encode(spans)


#: Encoded values kept per attribute key (and per kind: str, int); past it that key's are forgotten
#: and it starts over, so a key whose values never repeat (a request id) costs a bounded dict.
VALUES_PER_KEY = 256
#: Attribute keys with cached values at most (keys come from code: a few dozen).
CACHED_KEYS = 512


def _field_head(tag: int, n: int) -> bytes:
    """A length-delimited field's tag and length (the payload follows)."""
    if n < 0x80:
        return bytes((tag, n))
    if n < 0x4000:
        return bytes((tag, (n & 0x7F) | 0x80, n >> 7))
    return bytes((tag,)) + _varint(n)


class AttrCache:
    """The encoded ``KeyValue`` fields (tag *tag* and length included) of attribute (key, value)
    pairs, for str and int values: the service, version, route, method... of a sidecar's requests
    repeat, so each is encoded once, not once per record. Other value kinds (and a bool, which
    would compare equal to 1) are encoded each time."""

    __slots__ = ("ints", "strs", "tag")

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.strs: dict[str, dict[str, bytes]] = {}
        self.ints: dict[str, dict[int, bytes]] = {}

    def plain(self, k: str, v) -> bytes:
        """The field of (*k*, *v*), not kept (for values that seldom repeat)."""
        prefix = _KEY_CACHE.get(k)
        if prefix is None:
            prefix = _ld(b"\x0a", k.encode()) if k else b""  # proto3 leaves out a default (empty) field
            if len(_KEY_CACHE) < _KEY_CACHE_MAX:
                _KEY_CACHE[k] = prefix
        if v.__class__ is str:
            b = v.encode()
            n = len(b)
            if n + len(prefix) < 120:  # every length below fits one varint byte
                return b"".join((self.tag, _V1[len(prefix) + n + 4], prefix, b"\x12", _V1[n + 2], b"\x0a", _V1[n], b))
        return _ld(self.tag, prefix + _ld(b"\x12", _any_value(v)))

    def miss(self, k: str, v) -> bytes:
        """The field of (*k*, *v*), kept for the next time when *v* is a str or an int."""
        b = self.plain(k, v)
        cls = v.__class__
        cache = self.strs if cls is str else self.ints if cls is int else None
        if cache is not None:
            vals = cache.get(k)
            if vals is None:
                if len(cache) >= CACHED_KEYS:
                    return b
                vals = cache[k] = {}
            elif len(vals) >= VALUES_PER_KEY:
                vals.clear()
            vals[v] = b
        return b


_pack_times = struct.Struct("<BQBQ").pack
_STATUS_OK = b"\x7a\x00"
_EMPTY: dict = {}


class WireEncoder:
    """An OTLP export request (traces or logs: their envelopes have the same field numbers) of one
    resource and scope, written straight to protobuf's wire format with the encoded resource and
    scope kept, and repeated attribute (key, value) pairs (:class:`AttrCache`, its field tag
    *attr_tag*). Subclasses write the records: :meth:`add` encodes some into a list of pieces and
    :meth:`request` wraps the pieces in one request, so a batch can be encoded a slice at a time
    between other work."""

    def __init__(self, resource: dict, scope_name: str, scope_version: str, attr_tag: bytes) -> None:
        self.resource = _resource_bytes(resource)
        self.scope = _scope_bytes(scope_name, scope_version)
        self.attrs = AttrCache(attr_tag)

    def add(self, pieces: list[bytes], records) -> None:
        raise NotImplementedError

    def encode(self, records) -> bytes:
        pieces: list[bytes] = []
        self.add(pieces, records)
        return self.request(pieces)

    def request(self, pieces: list[bytes]) -> bytes:
        body = b"".join(pieces)
        scope_part = len(self.scope) + len(body)
        head = _field_head(0x12, scope_part)  # Resource{Spans,Logs}.scope_{spans,logs} = 2
        resource_part = len(self.resource) + len(head) + scope_part
        return b"".join((_field_head(0x0A, resource_part), self.resource, head, self.scope, body))


class SpanEncoder(WireEncoder):
    """``ExportTraceServiceRequest`` bytes for :class:`SpanRecord` lists (byte for byte what the
    message encoder writes, as :func:`encode_request` builds it), span names kept too."""

    def __init__(self, resource: dict, scope_version: str, scope_name: str = SCOPE_NAME) -> None:
        super().__init__(resource, scope_name, scope_version, b"\x4a")  # Span.attributes = 9
        self._names: dict[str, bytes] = {}

    def _name(self, name: str) -> bytes:
        b = self._names.get(name)
        if b is None:
            b = _ld(b"\x2a", name.encode()) if name else b""
            if len(self._names) >= VALUES_PER_KEY:
                self._names.clear()
            self._names[name] = b
        return b

    def add(self, pieces: list[bytes], spans) -> None:
        """Append the ``ScopeSpans.spans`` fields of *spans* to *pieces*."""
        cache = self.attrs
        strs, ints, miss = cache.strs, cache.ints, cache.miss
        names = self._names
        out = pieces.append
        for (trace_id, span_id, parent, name, kind, start, end, attributes, status, message,
             trace_state) in spans:
            parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
            add = parts.append
            if trace_state:
                add(_ld(b"\x1a", trace_state.encode()))  # Span.trace_state = 3
            if parent:
                add(_field_head(0x22, len(parent)))
                add(parent)
            b = names.get(name)
            add(b if b is not None else self._name(name))
            if kind:
                add(b"\x30" + _varint(kind))
            if start and end:
                add(_pack_times(0x39, start, 0x41, end))
            else:
                if start:
                    add(b"\x39" + _pack_q(start))
                if end:
                    add(b"\x41" + _pack_q(end))
            for k, v in attributes.items():
                cls = v.__class__
                if cls is str:
                    b = strs.get(k, _EMPTY).get(v)
                elif cls is int:
                    b = ints.get(k, _EMPTY).get(v)
                else:
                    b = None
                add(b if b is not None else miss(k, v))
            if status or message:
                st = (_ld(b"\x12", message.encode()) if message else b"") + (b"\x18" + _varint(status) if status else b"")
                add(_ld(b"\x7a", st))  # Span.status = 15, always present (as the message encoder writes it)
            else:
                add(_STATUS_OK)
            body = b"".join(parts)
            out(_field_head(0x12, len(body)))  # ScopeSpans.spans = 2
            out(body)


def _resource_bytes(resource: dict) -> bytes:
    """``ResourceSpans.resource`` (or ResourceLogs', also field 1) for *resource*."""
    # Resource.attributes is field 1 (tag 0x0a), where Span.attributes is 9
    res = b"".join(_ld(b"\x0a", (_ld(b"\x0a", k.encode()) if k else b"") + _ld(b"\x12", _any_value(v)))
                   for k, v in resource.items())
    return _ld(b"\x0a", res)


def _scope_bytes(name: str, version: str) -> bytes:
    """``ScopeSpans.scope`` (or ScopeLogs', also field 1)."""
    return _ld(b"\x0a", _ld(b"\x0a", name.encode()) + (_ld(b"\x12", version.encode()) if version else b""))


class SpanRecorder:
    def __init__(self, max_queued: int = MAX_QUEUED_SPANS) -> None:
        self._q: deque[SpanRecord] = deque()
        self._max = max_queued
        self.stats = RecorderStats()
        self.wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._q)

    def record(self, span: SpanRecord) -> None:
        """Queue *span* for export; never blocks, drops (counted) when the queue is full."""
        if len(self._q) >= self._max:
            self.stats.dropped += 1
            return
        self._q.append(span)
        self.stats.recorded += 1
        if len(self._q) >= MAX_BATCH:
            self.wakeup.set()

    def take(self, n: int = MAX_BATCH) -> list[SpanRecord]:
        q = self._q
        if n >= len(q):
            batch = list(q)
            q.clear()
            return batch
        return [q.popleft() for _ in range(n)]


class OTLPExporter:
    """Exports what *recorder* queued, in batches, off the request path. Subclasses export
    another signal from a queue of the same shape (:mod:`._accesslog`): they set
    :attr:`export_path`, :attr:`what` and :meth:`make_encoder`.

    All of it runs in the Trio thread: a batch is encoded :data:`ENCODE_SLICE` records at a time
    with a checkpoint between slices (so requests run between them, and no thread holds the GIL
    while the event loop waits for it), then sent by :class:`~tracemesh.proxy._otlp.OtlpClient`,
    whose network waits are the event loop's own. A batch that fails keeps its encoded bytes for
    the retries."""

    export_path = EXPORT_PATH
    what = "span"

    def __init__(self, recorder: SpanRecorder, collector: str, resource: dict, scope_version: str,
                 client: OtlpClient | None = None) -> None:
        self.recorder = recorder
        self.target = collector
        self.resource = resource
        self.scope_version = scope_version
        #: may be shared with the other exporters of the sidecar: one connection to the collector
        self.client = client if client is not None else OtlpClient(collector)
        self._own_client = client is None
        self.encoder = self.make_encoder()
        self._warned_at = 0.0

    def make_encoder(self):
        return SpanEncoder(self.resource, self.scope_version)

    def encode(self, batch: list) -> bytes:
        return self.encoder.encode(batch)

    async def encode_sliced(self, batch: list) -> bytes:
        """:meth:`encode`, a slice at a time, with a checkpoint between slices. *batch* is emptied
        as it is encoded: its records are freed a slice at a time too (freeing a thousand records
        at once, after the export, held the event loop for about a millisecond)."""
        enc = self.encoder
        if len(batch) <= ENCODE_SLICE:
            payload = enc.encode(batch)
            batch.clear()
            return payload
        pieces: list[bytes] = []
        while batch:
            enc.add(pieces, batch[:ENCODE_SLICE])
            del batch[:ENCODE_SLICE]
            await trio.lowlevel.checkpoint()
        return enc.request(pieces)

    async def _export(self, payload: bytes, n: int, timeout: float = EXPORT_TIMEOUT_S) -> bool:
        """Send the encoded request of *n* records; False (counted, logged) when it fails. A retry
        sends the same bytes: the records are gone once encoded."""
        try:
            await self.client.call(self.export_path, payload, timeout)
        except ExportError as exc:
            self.recorder.stats.export_failures += 1
            now = time.monotonic()
            if now - self._warned_at > 10:  # one line per 10 s, not one per batch, while the collector is away
                self._warned_at = now
                log.warning("%s export to %s failed: %s %s", self.what, self.target, exc.code, exc.details)
            return False
        self.recorder.stats.exported += n
        return True

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Export until cancelled: every EXPORT_INTERVAL_S what is queued, at once a full
        MAX_BATCH. After an export, only another full batch goes before the next interval: what
        arrived meanwhile waits (it used to go at once, so a busy sidecar sent an export of ~30
        records every few milliseconds, ~40 a second per signal, each a call and a WAL sync at the
        collector: a fifth of the sidecar's busy CPU). A failing batch is retried with backoff,
        then dropped (counted)."""
        task_status.started()
        held = 0  # records taken from the queue and neither exported nor dropped yet
        payload = b""  # their request, once encoded
        attempts = 0
        try:
            while True:
                with trio.move_on_after(EXPORT_INTERVAL_S):
                    await self.recorder.wakeup.wait()
                self.recorder.wakeup = trio.Event()
                while True:
                    if not held:
                        batch = self.recorder.take()
                        if not batch:
                            break
                        held, attempts = len(batch), 0
                        payload = await self.encode_sliced(batch)
                    if await self._export(payload, held):
                        held, payload = 0, b""
                        if len(self.recorder) < MAX_BATCH:
                            # a partial batch waits for the interval, or for a full batch's wake-up
                            # (not for one that came during this export: that batch has gone)
                            self.recorder.wakeup = trio.Event()
                            break
                        continue
                    attempts += 1
                    if attempts >= MAX_ATTEMPTS:
                        self.recorder.stats.export_dropped += held
                        held, payload = 0, b""
                    await trio.sleep(min(0.25 * 2 ** attempts, 5.0))
                    break
        finally:
            # cancelled while a batch was being encoded or sent, or waited for a retry
            self.recorder.stats.export_dropped += held

    async def flush(self, deadline_s: float = 3.0) -> None:
        """Send what is queued, for at most *deadline_s* (shielded: runs during shutdown).
        What it cannot send is counted as dropped."""
        unsent = 0
        with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
            while len(self.recorder):
                batch = self.recorder.take()
                unsent = len(batch)
                if not await self._export(await self.encode_sliced(batch), unsent, timeout=deadline_s):
                    break
                unsent = 0
        self.recorder.stats.export_dropped += unsent + len(self.recorder)

    def close(self) -> None:
        if self._own_client:
            self.client.close()
