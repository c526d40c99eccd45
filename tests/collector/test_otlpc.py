"""The C extension (_otlpc) against the references, in process (no ClickHouse):

- ``check`` accepts and rejects exactly what upb's parse does, and for what parses gives the same
  counts and messages as the Python checks (validate_traces / _span_problem);
- ``encode`` gives exactly the rows of the Python encoder (encode_traces), read back here from the
  Native block it writes (test_native.py stores blocks in ClickHouse and compares what it reads).

Inputs: wire data generated from the OTLP descriptors with the awkward cases protobuf allows
(fields repeated or out of order, singular messages sent twice, known fields with another wire
type, unknown fields and groups, invalid UTF-8, deep nesting), then mutated bytewise; random bytes.
"""

from __future__ import annotations

import math
import random
import struct

import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracemesh.collector import _native
from tracemesh.collector._encode import SpanColumns, encode_traces
from tracemesh.collector._schema import TRACE_COLUMNS

_otlpc = _native._otlpc
pytestmark = pytest.mark.skipif(_otlpc is None, reason="the C extension _otlpc is not built")


# -- wire data from the descriptors ----------------------------------------------------------

def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _tag(num: int, wt: int) -> bytes:
    return _varint(num << 3 | wt)


_WIRE = {F.TYPE_STRING: 2, F.TYPE_BYTES: 2, F.TYPE_MESSAGE: 2, F.TYPE_FIXED64: 1, F.TYPE_DOUBLE: 1,
         F.TYPE_FIXED32: 5}

_texts = st.one_of(st.sampled_from(["", "a", "service.name", "k", "<&>", "é", "\u2028", "x\ny", "\x00"]),
                   st.text(max_size=8))
_bad_utf8 = st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xe2\x80", b"\xc2"])
_doubles = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, 1e21, 1e-7, 2.0 ** 70, 2.0 ** -1074, 0.1,
                                                   1e16, 123456789.125, 2.0 ** 63, -(2.0 ** 64), 1e300]))


def _scalar(draw, f) -> bytes:
    t = f.type
    if t == F.TYPE_STRING:
        if draw(st.integers(0, 30)) == 0:
            return draw(_bad_utf8)
        return draw(_texts).encode()
    if t == F.TYPE_BYTES:
        n = draw(st.sampled_from([0, 8, 16, 16, 8, 3, 17]))
        return draw(st.sampled_from([bytes(n), bytes(range(1, n + 1)), draw(st.binary(min_size=n, max_size=n))]))
    if t == F.TYPE_FIXED64:
        return struct.pack("<Q", draw(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 1_700_000_000_000_000_000])))
    if t == F.TYPE_DOUBLE:
        return struct.pack("<d", draw(_doubles))
    if t == F.TYPE_FIXED32:
        return struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    # varints: bool, enum, int32/64, uint32
    return _varint(draw(st.one_of(st.integers(-3, 8), st.integers(-2**63, 2**64 - 1))))


def _field_value(draw, f, depth: int) -> bytes:
    if f.type == F.TYPE_MESSAGE:
        body = draw(_message(f.message_type, depth + 1)) if depth < 12 else b""
        return _varint(len(body)) + body
    if _WIRE.get(f.type) == 2:
        v = _scalar(draw, f)
        return _varint(len(v)) + v
    return _scalar(draw, f)


def _unknown(draw, depth: int) -> bytes:
    num = draw(st.sampled_from([17, 20, 99, 1000, 2**29 - 1]))
    wt = draw(st.sampled_from([0, 1, 2, 3, 5]))
    if wt == 0:
        return _tag(num, 0) + _varint(draw(st.integers(0, 2**64 - 1)))
    if wt == 1:
        return _tag(num, 1) + bytes(8)
    if wt == 5:
        return _tag(num, 5) + bytes(4)
    if wt == 2:
        v = draw(st.binary(max_size=4))
        return _tag(num, 2) + _varint(len(v)) + v
    inner = _unknown(draw, depth + 1) if depth < 4 and draw(st.booleans()) else b""
    return _tag(num, 3) + inner + _tag(num, 4)


@st.composite
def _message(draw, desc, depth: int = 0) -> bytes:
    out = bytearray()
    fields = list(desc.fields)
    if desc.name in ("Span", "Link") and draw(st.integers(0, 4)):  # mostly well-formed ids: spans are stored
        out += _ld(1, draw(st.binary(min_size=15, max_size=15)) + b"\x01") + _ld(2, b"\x01" + draw(st.binary(min_size=7, max_size=7)))
    for _ in range(draw(st.integers(0, 6 if depth < 4 else 3))):
        r = draw(st.integers(0, 19))
        if r == 0:
            out += _unknown(draw, 0)
            continue
        f = draw(st.sampled_from(fields))
        wt = _WIRE.get(f.type, 0)
        if r == 1:  # a known field with another wire type: an unknown field to protobuf
            other = draw(st.sampled_from([w for w in (0, 1, 2, 5) if w != wt]))
            out += _tag(f.number, other) + {0: b"\x01", 1: bytes(8), 2: b"\x01\xff", 5: bytes(4)}[other]
            continue
        out += _tag(f.number, wt) + _field_value(draw, f, depth)
    return bytes(out)


def _request_wire():
    return _message(ExportTraceServiceRequest.DESCRIPTOR)


def _mutate(draw, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(b))) if b else 0
        if op == 0 and b:
            b[min(i, len(b) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            b[i:i] = draw(st.sampled_from([b"\x80", b"\xff", b"\x0b", b"\x0c", b"\x16", b"\x00", b"\xff" * 10,
                                           b"\x12\x05", b"\x0a\x00"]))
        elif op == 2:
            del b[i:i + draw(st.integers(1, 4))]
        elif op == 3:
            b = b[:i]
        else:
            b[i:i] = draw(st.binary(max_size=3))
    return bytes(b)


# -- the references --------------------------------------------------------------------------

def _upb(payload: bytes):
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(payload)
    except DecodeError:
        return None
    return req


def _compare_check(payload: bytes):
    req = _upb(payload)
    if req is None:
        with pytest.raises(_otlpc.DecodeError):
            _otlpc.check(payload)
        with pytest.raises(_otlpc.DecodeError):
            _otlpc.encode([payload])
        _otlpc.encode([payload], checked=True)  # not validated again: wrong rows, but no crash
        return None
    batches, rej = _native.validate_traces(req, payload)
    assert _otlpc.check(payload) == (len(batches["otel_traces"]), rej.count, rej.reasons)
    return req


def _read_native(block: bytes) -> dict:
    """The columns of a Native block as Python values (only the types _otlpc writes)."""
    pos = 0

    def varint():
        nonlocal pos
        v = shift = 0
        while True:
            c = block[pos]
            pos += 1
            v |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return v

    def string():
        nonlocal pos
        n = varint()
        s = block[pos:pos + n].decode()
        pos += n
        return s

    def u64s(n):
        nonlocal pos
        out = list(struct.unpack_from(f"<{n}Q", block, pos))
        pos += 8 * n
        return out

    def low_cardinality(n: int) -> list:
        # ClickHouse's SerializationLowCardinality in Native: nothing for no rows; else flags (index
        # width and HasAdditionalKeys; never a global dictionary), the keys, the rows' indexes
        if n == 0:
            return []
        flags, = u64s(1)
        width = flags & 0xFF
        assert flags & (1 << 9) and not flags & (1 << 8) and width <= 2, hex(flags)
        nkeys, = u64s(1)
        keys = [string() for _ in range(nkeys)]
        rows, = u64s(1)
        assert rows == n
        nonlocal pos
        fmt = "<" + "BHI"[width] * n
        idx = struct.unpack_from(fmt, block, pos)
        pos += struct.calcsize(fmt)
        assert max(idx) < nkeys
        # the narrowest width for the dictionary (which may hold a value no row kept: a resource's
        # attributes when all of its spans were refused; ClickHouse keeps only those indexed)
        assert width == (0 if nkeys <= 0x100 else 1 if nkeys <= 0x10000 else 2)
        assert len(set(keys)) == nkeys
        return [keys[i] for i in idx]

    def column(typ: str, n: int) -> list:
        if typ in ("DateTime64(9)", "UInt64"):
            return u64s(n)
        if typ == "String":
            return [string() for _ in range(n)]
        if typ == "LowCardinality(String)":
            return low_cardinality(n)
        if typ.startswith("Array("):
            ends = u64s(n)
            flat = column(typ[6:-1], ends[-1] if ends else 0)
            return [flat[a:b] for a, b in zip([0] + ends, ends)]
        if typ.startswith("Map("):
            key_type, value_type = typ[4:-1].split(", ")
            ends = u64s(n)
            total = ends[-1] if ends else 0
            keys = column(key_type, total)
            vals = column(value_type, total)
            return [list(zip(keys[a:b], vals[a:b])) for a, b in zip([0] + ends, ends)]
        raise AssertionError(typ)

    if not block:
        return {}
    ncols, nrows = varint(), varint()
    out = {}
    for _ in range(ncols):
        name, typ = string(), string()
        if "LowCardinality" in typ:  # the key version, before the column's data
            assert u64s(1) == [1], name
        out[name] = column(typ, nrows)
    assert pos == len(block)
    return out


def _python_rows(reqs) -> dict:
    cols = SpanColumns()
    for r in reqs:
        encode_traces(r, cols)
    out = {}
    for name, col in zip(TRACE_COLUMNS, cols.columns()):
        if name.endswith("Attributes") and name.startswith(("Events", "Links")):
            out[name] = [[list(d.items()) for d in row] for row in col]
        elif name.endswith("Attributes"):
            out[name] = [list(d.items()) for d in col]
        else:
            out[name] = list(col)
    return out


def _compare_encode(payloads, reqs):
    rows, block = _otlpc.encode(payloads)
    assert _otlpc.encode(payloads, checked=True) == (rows, block)
    expect = _python_rows(reqs)
    assert rows == len(expect["TraceId"])
    got = _read_native(block)
    if not rows:
        assert block == b""
        return
    assert list(got) == list(TRACE_COLUMNS)
    for name in TRACE_COLUMNS:
        assert got[name] == expect[name], name


# -- properties ------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@given(st.lists(_request_wire(), min_size=1, max_size=3))
@_SETTINGS
def test_generated_wire_data_checks_and_encodes_as_the_references(payloads):
    reqs = [_compare_check(p) for p in payloads]
    ok = [(p, r) for p, r in zip(payloads, reqs) if r is not None]
    if ok:
        _compare_encode([p for p, _ in ok], [r for _, r in ok])


@given(st.data())
@_SETTINGS
def test_mutated_wire_data_is_refused_exactly_when_upb_refuses_it(data):
    payload = _mutate(data.draw, data.draw(_request_wire()))
    req = _compare_check(payload)
    if req is not None:
        _compare_encode([payload], [req])


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_random_bytes(payload):
    _compare_check(payload)


def _ld(num: int, body: bytes) -> bytes:
    return _tag(num, 2) + _varint(len(body)) + body


def _nested_value(levels: int) -> bytes:
    v = b"\x18\x01"  # int_value = 1
    for _ in range(levels):
        v = _ld(5, _ld(1, v))  # AnyValue.array_value(ArrayValue.values = [v])
    return v


def _request_with_value(value: bytes) -> bytes:
    span = _ld(1, bytes(range(1, 17))) + _ld(2, bytes(range(1, 9))) + _ld(9, _ld(1, b"k") + _ld(2, value))
    return _ld(1, _ld(2, _ld(2, span)))


_KEYS = [b"", b"k", b"service.name", b"x" * 127, b"x" * 128, "é".encode(), b"\xff", b"ok\xed\xa0\x80",
         b"service.nam\xff", "host.namé".encode()]
_VALUES = [
    b"", _ld(1, b""), _ld(1, b"GET"), _ld(1, b"v" * 125), _ld(1, b"v" * 126), _ld(1, b"v" * 200),
    _ld(1, "ü€😀".encode()), _ld(1, b"\xc0\x80"), _ld(1, b"bad\xf4\x90\x80\x80"), _ld(1, b"abcdefghij\xc0\x80"),
    _ld(1, b"abcdefg\xffhijklmno"), _ld(1, b"ab\x80d"), _ld(1, b"x" * 17 + b"\xff"),
    # 17-64 bytes: words OR-ed together, the last one overlapping; a bad byte in each word's place
    *(_ld(1, b"y" * i + b"\xc3" + b"z" * (n - i - 1)) for n in (23, 40, 64) for i in (0, 5, 8, 13, n - 9, n - 1)),
    _ld(1, "https://catalog.default.svc/ü".encode()), _ld(1, b"w" * 65 + b"\xe2\x82"),
    b"\x10\x01", b"\x10\x00", b"\x10" + b"\xff" * 9 + b"\x01", b"\x18\x05", b"\x18\x96\x01",
    b"\x18" + b"\xff" * 9 + b"\x01", b"\x18" + b"\xff" * 10 + b"\x01", b"\x18\xff", b"\x18",
    b"\x21" + struct.pack("<d", 1.5), b"\x21" + b"\x00" * 7, _ld(7, b"\xff\xfe"),
    _ld(1, b"a") + b"\x18\x01", b"\x18\x01" + _ld(1, b"a"), _ld(1, b"a") + _tag(99, 0) + b"\x01",
    _ld(5, _ld(1, b"\x18\x01")), _tag(12, 3) + _tag(12, 4),
]


def _request_with_kv(kv: bytes) -> bytes:
    span = _ld(1, bytes(range(1, 17))) + _ld(2, bytes(range(1, 9))) + _ld(9, kv) + _ld(9, _ld(1, b"b") + _ld(2, b"\x18\x02"))
    return _ld(1, _ld(2, _ld(2, span)))


@pytest.mark.parametrize("key", _KEYS)
def test_attributes_of_the_common_shape_are_judged_as_upb_judges_them(key):
    # the checker takes the usual attribute (a key, then a value with one string, bool, int or
    # double, short lengths) straight through; every edge of that shape, and just past it, must
    # still be accepted or refused exactly as upb does, with the same encoding
    for value in _VALUES:
        for kv in (_ld(1, key) + _ld(2, value),  # the common shape
                   _ld(2, value) + _ld(1, key),  # value first
                   _ld(1, key) + _ld(2, value) + b"\x18\x07",  # a third field after it
                   _ld(1, key) + _ld(2, value)[:-1] if value else _ld(1, key) + b"\x12"):  # cut short
            payload = _request_with_kv(kv)
            req = _compare_check(payload)
            if req is not None:
                _compare_encode([payload], [req])


@pytest.mark.parametrize("levels", [0, 1, 20, 46, 47, 48, 49, 60, 500])
def test_nesting_depth_limit_is_upbs(levels):
    payload = _request_with_value(_nested_value(levels))
    req = _compare_check(payload)
    if req is not None:
        _compare_encode([payload], [req])


@pytest.mark.parametrize("groups", [1, 95, 96, 97, 100, 101, 2000])
def test_group_nesting_limit_is_upbs(groups):
    _compare_check(_ld(1, _ld(2, _ld(2, _tag(19, 3) * groups + _tag(19, 4) * groups))))
    _compare_check(_tag(7, 3) * groups + _tag(7, 4) * groups)


@pytest.mark.parametrize("payload", [
    b"", b"\x00\x01", b"\x10" + b"\xff" * 9 + b"\x01", b"\x10" + b"\xff" * 9 + b"\x7f", b"\x10" + b"\xff" * 10 + b"\x01",
    b"\xf8\xff\xff\xff\x0f\x01", b"\xf8\xff\xff\xff\x1f\x01", b"\x88\x80\x80\x80\x80\x00\x01", b"\x16", b"\x17",
    b"\x14", b"\x13\x08\x01\x14", b"\x13\x08\x01\x1c", b"\x13\x08\x01", b"\x15\x01\x02", b"\x11\x01\x02",
    b"\x12\x05ab", b"\x08\x01", b"\x0b\x0c", b"\x0b\x1a\x01a\x0c", b"\x12\x80\x80\x80\x80\x00",
    b"\x12\x80\x80\x80\x80\x80\x00", b"\x12\xff\xff\xff\xff\x07", b"\x0a\x02\x0c\x00", b"\x0a\x02\x23\x24",
])
def test_wire_edge_cases(payload):
    _compare_check(payload)


def test_merged_singular_messages_and_oneof_switches():
    kv = lambda k, *vals: _ld(1, k) + b"".join(_ld(2, v) for v in vals)  # noqa: E731
    arr = lambda *vs: _ld(5, b"".join(_ld(1, v) for v in vs))  # noqa: E731
    s = lambda x: _ld(1, x.encode())  # noqa: E731
    attrs = [
        kv(b"merged-array", arr(s("a")), arr(s("b"))),  # ["a","b"]
        kv(b"switched", arr(s("a")), b"\x18\x05", arr(s("c"))),  # ["c"]
        kv(b"scalar-then-empty", b"\x18\x07", b""),  # 7
        kv(b"string-then-bool", s("x"), b"\x10\x01"),  # true
        kv(b"kvlist", _ld(6, _ld(1, _ld(1, b"z") + _ld(2, b"\x18\x01")) + _ld(1, _ld(1, b"a") + _ld(2, s("<"))))),
        kv(b"dup", s("1")), kv(b"other", s("o")), kv(b"dup", s("2")),
        kv(b"strindex", b"\x40\x03"),
        kv(b"doubles", arr(*[b"\x21" + struct.pack("<d", d) for d in (0.1, 1e21, 2.0**70, -0.0, 1e-7, math.inf)])),
    ]
    span = (_ld(1, bytes(range(1, 17))) + _ld(2, bytes(range(1, 9))) + _ld(5, b"n1") + _ld(5, b"n2")
            + b"".join(_ld(9, a) for a in attrs) + _ld(15, b"\x18\x02") + _ld(15, _ld(2, b"msg")))
    res = _ld(1, _ld(1, b"service.name") + _ld(2, s("a"))) + _ld(1, _ld(1, b"service.name") + _ld(2, s("b")))
    payload = _ld(1, _ld(2, _ld(2, span)) + _ld(1, res))  # the resource after its spans, in two parts
    req = _compare_check(payload)
    _compare_encode([payload], [req])
    got = _read_native(_otlpc.encode([payload])[1])
    assert got["ServiceName"] == ["b"] and got["SpanName"] == ["n2"] and got["StatusCode"] == ["Error"]
    assert dict(got["SpanAttributes"][0])["merged-array"] == '["a","b"]'


@pytest.mark.parametrize("n_keys", [2, 23, 24, 25, 64, 300])
def test_repeated_keys_keep_first_place_and_last_value_at_every_map_size(n_keys):
    # small maps are deduplicated by signature bits and pairwise checks, larger ones by a hash table;
    # keys share lengths, prefixes and suffixes so that signatures collide, and events and links,
    # each with a map of their own, come between the span's attributes
    rnd = random.Random(n_keys)
    keys = [f"k{i:03d}.same-suffix" if i % 3 else f"key.{i % 7}" for i in range(n_keys)]
    s = lambda x: _ld(1, x.encode())  # noqa: E731
    kv = lambda k, v: _ld(1, k.encode()) + _ld(2, s(v))  # noqa: E731
    fields = []
    for i in range(n_keys + n_keys // 2):
        fields.append(_ld(9, kv(rnd.choice(keys), f"v{i}")))
        if i % 10 == 3:
            fields.append(_ld(11, b"\x09" + struct.pack("<Q", i) + _ld(2, f"ev{i}".encode())
                              + b"".join(_ld(3, kv(rnd.choice(keys[:30]), str(j))) for j in range(i % 30))))
        if i % 10 == 7:
            fields.append(_ld(13, _ld(1, bytes(range(1, 17))) + _ld(2, bytes(range(1, 9)))
                              + b"".join(_ld(4, kv(rnd.choice(keys[:5]), str(j))) for j in range(3))))
    span = _ld(1, bytes(range(1, 17))) + _ld(2, bytes(range(1, 9))) + b"".join(fields)
    payload = _ld(1, _ld(2, _ld(2, span)))
    req = _compare_check(payload)
    _compare_encode([payload], [req])
    attrs = _read_native(_otlpc.encode([payload])[1])["SpanAttributes"][0]
    assert len(attrs) == len({k for k, _ in attrs}) == len({kv.key for kv in req.resource_spans[0].scope_spans[0].spans[0].attributes})


def test_benchmark_requests_are_valid_and_encode_as_python_does():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.collector import build_requests

    payloads = build_requests(2)
    reqs = [_compare_check(p) for p in payloads]
    _compare_encode(payloads, reqs)


def test_threads_encode_and_check_at_once():
    """The GIL is released while checking and encoding: concurrent calls give the same answers."""
    import sys
    import threading
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.collector import build_requests

    payloads = build_requests(3)
    want = _otlpc.encode(payloads)
    want_check = [_otlpc.check(p) for p in payloads]
    bad = []

    def work():
        for _ in range(5):
            if _otlpc.encode(list(payloads), checked=True) != want or [_otlpc.check(p) for p in payloads] != want_check:
                bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_a_block_is_written_again_only_once_nobody_holds_it():
    """encode() reuses its last block (no fresh pages per batch), never one a caller still holds,
    and the bytes it hands out are always the batch's own, whatever size came before."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.collector import build_requests

    payloads = build_requests(6)
    sizes = [4, 3, 4, 2, 6, 6, 5, 1, 6]  # smaller, equal and larger than the block before
    want = {n: bytes(bytearray(_otlpc.encode(payloads[:n])[1])) for n in set(sizes)}  # copies
    held = []
    for i, n in enumerate(sizes):
        rows, block = _otlpc.encode(payloads[:n], checked=True)
        assert rows == n * 500 and block == want[n]
        assert hash(block) == hash(want[n])  # not the hash cached in the block's last life
        if i % 3 == 2:
            held.append((n, block))  # kept: later batches must not write into it
        del block
    for n, block in held:
        assert block == want[n]


def test_a_kept_block_has_room_for_a_batch_a_little_larger():
    """Batches of the same span count differ by a few per cent in bytes: the block kept for the next
    batch is made with an eighth more room, so a batch ~6 % larger is written into it instead of a
    fresh block (whose every page would be faulted in again)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.collector import build_requests

    payloads = build_requests(6)
    small, larger = payloads * 3, payloads * 3 + payloads[:1]  # 18 requests, then 19
    block = _otlpc.encode(payloads * 13, checked=True)[1]  # a kept block over 4x the small one's size
    del block
    block = _otlpc.encode(small, checked=True)[1]  # too small for that one: a fresh block, kept
    made = id(block)
    del block  # only the encoder holds it now
    block = _otlpc.encode(larger, checked=True)[1]
    # without the room the old block is still alive when the new one is made: another object
    assert id(block) == made
    assert block == bytes(bytearray(_otlpc.encode(larger)[1]))


def test_encode_takes_bytes_like_payloads_and_refuses_the_rest():
    """The write-ahead log hands spooled records back as views of its mapped pages."""
    import mmap
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.collector import build_requests

    payloads = build_requests(3)
    want = bytes(bytearray(_otlpc.encode(payloads)[1]))
    m = mmap.mmap(-1, sum(map(len, payloads)))
    views, off = [], 0
    for p in payloads:
        m[off:off + len(p)] = p
        views.append(memoryview(m)[off:off + len(p)])
        off += len(p)
    assert _otlpc.encode(views, checked=True)[1] == want
    assert _otlpc.encode([bytearray(p) for p in payloads])[1] == want
    for bad in (["text"], [views[0], 5], [None]):
        with pytest.raises(TypeError):
            _otlpc.encode(bad)
    del views
    m.close()  # BufferError if encode kept an export of the mapping (on success or on error)


def test_low_cardinality_indexes_take_the_narrowest_width_the_dictionary_allows():
    """Over 65,536 distinct span names: UInt32 indexes; 300 attribute keys: UInt16; kinds: UInt8
    (_read_native checks each column's width against its dictionary's size, and _compare_encode the
    rows against Python's)."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    spans = [Span(trace_id=(i + 1).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name=f"op-{i}", kind=i % 6,
                  attributes=[KeyValue(key=f"key.{i % 300}", value=AnyValue(int_value=i))]) for i in range(66_000)]
    reqs = [ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans[n::2])])])
            for n in range(2)]
    _compare_encode([r.SerializeToString() for r in reqs], reqs)
