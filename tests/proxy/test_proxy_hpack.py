"""The sidecar's HPACK encoder (proxy/_hpack.py): what hpack's own decoder (and so any peer's)
reads back is exactly what was encoded, block after block, with no dynamic table."""

from __future__ import annotations

from hpack import Decoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable
from hypothesis import given, settings
from hypothesis import strategies as st

from tracemesh.proxy import _hpack
from tracemesh.proxy._hpack import MAX_KEPT_VALUE, NAMES, VALUES_PER_NAME, Encoder

_static_names = sorted({n for n, _ in HeaderTable.STATIC_TABLE})
_names = st.one_of(st.sampled_from(_static_names), st.binary(min_size=1, max_size=40),
                   st.sampled_from([b"traceparent", b"x-request-id", b"grpc-status", b"grpc-message"]))
_values = st.one_of(st.sampled_from([v for _, v in HeaderTable.STATIC_TABLE]), st.binary(max_size=300),
                    st.sampled_from([b"0", b"application/grpc", b"trailers", b"x" * 200]))
_field = st.builds(lambda n, v, form: NeverIndexedHeaderTuple(n, v) if form == "never" else (n, v, form == "sensitive")
                   if form in ("sensitive", "plain3") else (n, v),
                   _names, _values, st.sampled_from(["pair", "never", "sensitive", "plain3"]))


def _never(field) -> bool:
    return type(field) is NeverIndexedHeaderTuple or (len(field) > 2 and bool(field[2]))
_blocks = st.lists(st.lists(_field, max_size=20), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(_blocks, st.booleans())
def test_blocks_decode_to_what_was_encoded(blocks, huffman):
    enc, dec = Encoder(), Decoder()
    for block in blocks:
        got = dec.decode(enc.encode(block, huffman), raw=True)
        assert got == [(f[0], f[1]) for f in block]
        # never-indexed stays never-indexed for whoever re-encodes it; nothing else is marked so
        assert [type(g) is NeverIndexedHeaderTuple for g in got] == [_never(f) for f in block]
        assert len(dec.header_table.dynamic_entries) == 0  # nothing was ever added to the peer's table


def test_table_size_update_to_zero_first_and_after_the_peer_changes_its_setting():
    enc = Encoder()
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    first, second = enc.encode(fields), enc.encode(fields)
    assert first[:1] == b"\x20" and second[:1] != b"\x20"
    assert first[1:] == second
    enc.header_table_size = 0  # as h2 sets it when the peer's SETTINGS_HEADER_TABLE_SIZE changes
    assert enc.header_table_size == 0
    third = enc.encode(fields)
    assert third[:1] == b"\x20" and third[1:] == second
    # a decoder that allows no table at all reads every block
    dec = Decoder()
    dec.max_allowed_table_size = 0
    for b in (first, second, third):
        assert dec.decode(b, raw=True) == fields


def test_static_matches_are_one_byte_and_header_tuples_are_plain_fields():
    enc = Encoder()
    enc.encode([])  # the size update
    assert enc.encode([(b":method", b"GET")]) == b"\x82"  # static table entry 2 (RFC 7541 Appendix A)
    assert enc.encode([HeaderTuple(b":status", b"200")]) == b"\x88"
    # a literal without indexing (0000xxxx) naming static entry 31, content-type
    assert enc.encode([(b"content-type", b"text/x")], huffman=False) == b"\x0f\x10\x06text/x"
    assert enc.encode([NeverIndexedHeaderTuple(b"authorization", b"k")], huffman=False) == b"\x1f\x08\x01k"


def test_blocks_as_h2_asks_for_them_are_raw_literals_that_the_decoder_need_not_huffman_decode(monkeypatch):
    monkeypatch.setattr(_hpack, "_KEPT", {})
    enc = Encoder()
    enc.encode([])  # the size update
    fields = [(b"te", b"trailers"), (b"content-type", b"application/grpc"), (b":authority", b"server-grpc")]
    for _ in range(2):  # encoded, then kept: the same bytes
        block = enc.encode(fields)  # as h2 calls it
        # literal name "te" (0x00, length 2), then static names 31 and 1 (0000xxxx): no H bit anywhere
        assert block == (b"\x00\x02te\x08trailers" + b"\x0f\x10\x10application/grpc"
                         + b"\x01\x0bserver-grpc")
        assert Decoder().decode(block, raw=True) == fields


def test_what_is_kept_is_bounded_whatever_the_peers_send(monkeypatch):
    monkeypatch.setattr(_hpack, "_KEPT", {})  # the process-wide cache, filled here for this test only
    enc = Encoder()
    for i in range(5 * VALUES_PER_NAME):  # a value that changes every request
        enc.encode([(b"x-test-varying", str(i).encode())])
    assert len(_hpack._KEPT[b"x-test-varying"]) == VALUES_PER_NAME
    enc.encode([(b"x-test-long", b"v" * (MAX_KEPT_VALUE + 1))])
    assert b"x-test-long" not in _hpack._KEPT
    for i in range(NAMES + 10):
        enc.encode([(b"x-test-name-%d" % i, b"1")])
    assert len(_hpack._KEPT) == NAMES
    # still encoded right once nothing more is kept
    assert Decoder().decode(enc.encode([(b"x-test-name-new", b"2")]), raw=True) == [(b"x-test-name-new", b"2")]
