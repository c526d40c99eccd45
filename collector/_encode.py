"""OTLP protobuf messages to the exporter's columns. Pure: no I/O, no ClickHouse.

Values are rendered as the OpenTelemetry Collector renders them (``pcommon.Value.AsString``):
strings as they are, booleans ``true``/``false``, integers in decimal, doubles in the shortest
decimal form without exponent, bytes in base64, arrays and maps as JSON. Malformed items (a trace
or span id of the wrong length, say) are counted and described, never stored half-right.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
_STATUS = ("Unset", "Ok", "Error")
#: The largest timestamp a DateTime64(9) column can hold.
MAX_TIME_NS = 2**63 - 1
#: At most this many distinct rejection reasons are quoted back to the sender.
MAX_REASONS = 3
_GO_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def format_double(v: float) -> str:
    """Go's ``strconv.FormatFloat(v, 'f', -1, 64)``, as the OTel Collector renders doubles."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    s = repr(v)
    if "e" in s or "E" in s:
        s = format(Decimal(s), "f")
    if s.endswith(".0"):
        s = s[:-2]
    return s


def _json_value(v):
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        d = v.double_value
        if not math.isfinite(d):
            return format_double(d)
        # Go's encoding/json writes 1.0 as 1 (Python's json would write 1.0)
        return int(d) if d.is_integer() and abs(d) < 1e21 else d
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "array_value":
        return [_json_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _json_value(kv.value) for kv in v.kvlist_value.values}
    return None


def value_str(v) -> str:
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return str(v.int_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "double_value":
        return format_double(v.double_value)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which is None:
        return ""
    # as Go's json.Marshal: map keys sorted, HTML-sensitive characters and U+2028/9 escaped
    # (outside strings JSON never has these characters, so replacing them on the text is exact)
    text = json.dumps(_json_value(v), separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return text.translate(_GO_JSON_ESCAPES)


def attrs(kvs) -> dict[str, str]:
    """Key-value list to a map; a repeated key keeps its last value (maps cannot hold two)."""
    return {kv.key: value_str(kv.value) for kv in kvs}


class MapColumn:
    """A column of string maps kept as Arrow lays a map out: flat keys, flat values, offsets.

    Converting Python dicts to an Arrow map costs ~2 µs per entry; building from flat lists is
    ~20x cheaper. It still reads like a list of dicts (index, iterate, compare) for its users.
    """

    __slots__ = ("keys", "values", "offsets")

    def __init__(self, rows=()) -> None:
        self.keys: list[str] = []
        self.values: list[str] = []
        self.offsets: list[int] = [0]
        for d in rows:
            self.append(d)

    def append(self, d: dict) -> None:
        self.keys.extend(d)
        self.values.extend(d.values())
        self.offsets.append(len(self.keys))

    def extend(self, other: "MapColumn") -> None:
        base = len(self.keys)
        self.keys.extend(other.keys)
        self.values.extend(other.values)
        self.offsets.extend([o + base for o in other.offsets[1:]])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return dict(zip(self.keys[a:b], self.values[a:b]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"MapColumn({list(self)!r})"

    def arrow(self):
        import pyarrow as pa

        return pa.MapArray.from_arrays(pa.array(self.offsets, pa.int32()), pa.array(self.keys, pa.string()),
                                       pa.array(self.values, pa.string()))


class MapListColumn:
    """A column of lists of maps (``Events.Attributes``, ``Links.Attributes``), in Arrow's layout."""

    __slots__ = ("maps", "offsets")

    def __init__(self, rows=()) -> None:
        self.maps = MapColumn()
        self.offsets: list[int] = [0]
        for r in rows:
            self.append(r)

    def append(self, dicts: list[dict]) -> None:
        for d in dicts:
            self.maps.append(d)
        self.offsets.append(len(self.maps))

    def extend(self, other: "MapListColumn") -> None:
        base = len(self.maps)
        self.maps.extend(other.maps)
        self.offsets.extend([o + base for o in other.offsets[1:]])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[dict]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return [self.maps[j] for j in range(self.offsets[i], self.offsets[i + 1])]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def arrow(self):
        import pyarrow as pa

        return pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), self.maps.arrow())


@dataclass
class SpanColumns:
    """Columns of ``otel_traces`` in :data:`TRACE_COLUMNS` order, one list per column."""

    Timestamp: list = field(default_factory=list)
    TraceId: list = field(default_factory=list)
    SpanId: list = field(default_factory=list)
    ParentSpanId: list = field(default_factory=list)
    TraceState: list = field(default_factory=list)
    SpanName: list = field(default_factory=list)
    SpanKind: list = field(default_factory=list)
    ServiceName: list = field(default_factory=list)
    ResourceAttributes: MapColumn = field(default_factory=MapColumn)
    ScopeName: list = field(default_factory=list)
    ScopeVersion: list = field(default_factory=list)
    SpanAttributes: MapColumn = field(default_factory=MapColumn)
    Duration: list = field(default_factory=list)
    StatusCode: list = field(default_factory=list)
    StatusMessage: list = field(default_factory=list)
    EventsTimestamp: list = field(default_factory=list)
    EventsName: list = field(default_factory=list)
    EventsAttributes: MapListColumn = field(default_factory=MapListColumn)
    LinksTraceId: list = field(default_factory=list)
    LinksSpanId: list = field(default_factory=list)
    LinksTraceState: list = field(default_factory=list)
    LinksAttributes: MapListColumn = field(default_factory=MapListColumn)

    def __len__(self) -> int:
        return len(self.TraceId)

    def extend(self, other: "SpanColumns") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def columns(self) -> list[list]:
        return [getattr(self, name) for name in self.__dataclass_fields__]


@dataclass
class Rejections:
    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str, n: int = 1) -> None:
        self.count += n
        if reason not in self.reasons and len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


_ZERO_TRACE_ID, _ZERO_SPAN_ID = bytes(16), bytes(8)


def _span_problem(span) -> str | None:
    # once per span on every trace export: each field is read once (upb builds a new object per read)
    tid, sid, psid = span.trace_id, span.span_id, span.parent_span_id
    if len(tid) != 16 or tid == _ZERO_TRACE_ID:
        return f"span {span.name!r}: trace_id must be 16 bytes, not all zero (got {len(tid)} bytes)"
    if len(sid) != 8 or sid == _ZERO_SPAN_ID:
        return f"span {span.name!r}: span_id must be 8 bytes, not all zero (got {len(sid)} bytes)"
    if psid and len(psid) != 8:
        return f"span {span.name!r}: parent_span_id must be empty or 8 bytes (got {len(psid)})"
    links = span.links
    if links:
        for link in links:
            if len(link.trace_id) != 16 or len(link.span_id) != 8:
                return f"span {span.name!r}: a link has a malformed trace_id or span_id"
    # DateTime64(9) holds nanoseconds in an Int64: later than 2262 cannot be stored (and would fail
    # the whole batch it travels in, so it is refused here, alone)
    if span.start_time_unix_nano > MAX_TIME_NS or span.end_time_unix_nano > MAX_TIME_NS:
        return _too_late(span)
    for e in span.events:
        if e.time_unix_nano > MAX_TIME_NS:
            return _too_late(span)
    return None


def _too_late(span) -> str:
    return f"span {span.name!r}: a timestamp is past the year 2262 (more than 2**63-1 ns)"


def encode_traces(req: ExportTraceServiceRequest, out: SpanColumns | None = None) -> tuple[SpanColumns, Rejections]:
    """Append the spans of *req* to *out* (a new one if None); return it and what was rejected."""
    cols = out if out is not None else SpanColumns()
    rej = Rejections()
    # bound methods: this loop runs once per span and is the collector's hot path
    ts, tid, sid, psid, tstate = cols.Timestamp.append, cols.TraceId.append, cols.SpanId.append, cols.ParentSpanId.append, cols.TraceState.append
    name_, kind_, svc_, res_ = cols.SpanName.append, cols.SpanKind.append, cols.ServiceName.append, cols.ResourceAttributes.append
    sname_, sver_, sattr_, dur_ = cols.ScopeName.append, cols.ScopeVersion.append, cols.SpanAttributes.append, cols.Duration.append
    scode_, smsg_ = cols.StatusCode.append, cols.StatusMessage.append
    ets_, ename_, eattr_ = cols.EventsTimestamp.append, cols.EventsName.append, cols.EventsAttributes.append
    ltid_, lsid_, lts_, lattr_ = cols.LinksTraceId.append, cols.LinksSpanId.append, cols.LinksTraceState.append, cols.LinksAttributes.append
    for rs in req.resource_spans:
        res = attrs(rs.resource.attributes)
        service = res.get("service.name", "")
        for ss in rs.scope_spans:
            scope_name, scope_version = ss.scope.name, ss.scope.version
            for span in ss.spans:
                problem = _span_problem(span)
                if problem:
                    rej.add(problem)
                    continue
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                ts(start)
                tid(span.trace_id.hex())
                sid(span.span_id.hex())
                # an all-zero id is no id: the exporter writes '' (a root span's parent, as Grafana expects)
                psid(span.parent_span_id.hex() if any(span.parent_span_id) else "")
                tstate(span.trace_state)
                name_(span.name)
                kind_(_KINDS[span.kind] if 0 <= span.kind < len(_KINDS) else "Unspecified")
                svc_(service)
                res_(res)
                sname_(scope_name)
                sver_(scope_version)
                # most values are non-empty strings: take them without value_str's dispatch
                sattr_({kv.key: (sv if (sv := (v := kv.value).string_value) else value_str(v)) for kv in span.attributes})
                dur_(end - start if end > start else 0)
                code = span.status.code
                scode_(_STATUS[code] if 0 <= code < 3 else "Unset")
                smsg_(span.status.message)
                if span.events:
                    ets_([e.time_unix_nano for e in span.events])
                    ename_([e.name for e in span.events])
                    eattr_([attrs(e.attributes) for e in span.events])
                else:
                    ets_([]), ename_([]), eattr_([])
                if span.links:
                    ltid_([lk.trace_id.hex() if any(lk.trace_id) else "" for lk in span.links])
                    lsid_([lk.span_id.hex() if any(lk.span_id) else "" for lk in span.links])
                    lts_([lk.trace_state for lk in span.links])
                    lattr_([attrs(lk.attributes) for lk in span.links])
                else:
                    ltid_([]), lsid_([]), lts_([]), lattr_([])
    return cols, rej
