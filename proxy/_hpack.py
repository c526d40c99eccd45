"""An HPACK encoder without a dynamic table, whose header fields are encoded once and reused.

Why: h2's encoder (hpack.Encoder) searches the static and dynamic tables, Huffman-codes every
literal and updates its dynamic table for every field of every header block, in Python: ~7-10 % of
a gRPC sidecar's busy CPU. A proxy's header blocks repeat field for field (``:method POST``,
``content-type application/grpc``, ``:status 200``, ``grpc-status 0``, a service's ``:authority``
and ``:path``), and only a few values change per request (``traceparent``, ``x-request-id``).

Without a dynamic table a field's encoding depends on the field alone (RFC 7541 §6: an indexed
field for a full match in the static table, else a literal *without indexing* with the static
name's index or a literal name), so it can be kept and reused: a header block is a join of cached
bytes. The cost is on the wire: a repeated field the dynamic table would have sent as one byte is
sent whole every time (tens of bytes a block; nothing next to the bodies a mesh carries).

The first block, and the first after the peer changes SETTINGS_HEADER_TABLE_SIZE, starts with a
dynamic table size update to 0 (§6.3), so the peer's decoder knows no entry will ever be referenced
and every peer (grpcio, nghttp2, h2) accepts the blocks. Fields marked never-indexed
(:class:`hpack.NeverIndexedHeaderTuple`: h2 marks ``authorization`` and short ``cookie`` values so)
are sent as never-indexed literals (§6.2.3), which intermediaries must keep as such.

No Huffman coding (RFC 7541 §5.2 leaves it to the encoder): the peer of a sidecar's upstream
connection is most often another sidecar, whose decoder (hpack's, in Python) undoes Huffman coding a
nibble at a time: 3.6-4.7 % of a receiving sidecar's busy CPU under gRPC load, every field of every
block being a literal here. Raw literals cost ~30 % more bytes on those fields, ~40-60 bytes a block.

Drop-in for ``H2Connection.encoder``: h2 calls :meth:`Encoder.encode` with the (name, value) byte
pairs of a block and sets :attr:`Encoder.header_table_size`.
"""

from __future__ import annotations

from hpack import NeverIndexedHeaderTuple
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

#: Distinct values kept per header name: beyond this a name's values are taken to vary per request
#: (ids, trace context, dates) and are encoded each time (without Huffman coding), not kept.
VALUES_PER_NAME = 32
#: Header names with kept values, at most. With MAX_KEPT_VALUE, this bounds what is kept (one cache
#: for the process: an encoding does not depend on the connection) to ~2.5 MB whatever peers send.
NAMES = 256
#: Values longer than this are encoded each time, not kept.
MAX_KEPT_VALUE = 128

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_FULL: dict[tuple[bytes, bytes], int] = {}
_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _FULL.setdefault((_n, _v), _i)
    _NAME.setdefault(_n, _i)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: *value* with an N-bit prefix, the first byte's other bits from *first*."""
    if value < (1 << prefix_bits) - 1:  # one byte: the common case, without hpack's checks and logging
        return bytes((first | value,))
    out = encode_integer(value, prefix_bits)
    out[0] |= first
    return bytes(out)


def _string(data: bytes, huffman: bool) -> bytes:
    """RFC 7541 §5.2: a string literal, Huffman-coded when asked and shorter."""
    if huffman:
        coded = _huffman.encode(data)
        if len(coded) < len(data):
            return _integer(len(coded), 7, 0x80) + coded
    return _integer(len(data), 7, 0x00) + data


def encode_field(name: bytes, value: bytes, never_indexed: bool = False, huffman: bool = False) -> bytes:
    """One header field's representation, with no dynamic table (§6.1, §6.2.2, §6.2.3)."""
    first = 0x10 if never_indexed else 0x00
    if not never_indexed:
        index = _FULL.get((name, value))
        if index is not None:
            return _integer(index, 7, 0x80)
    index = _NAME.get(name)
    if index is not None:
        return _integer(index, 4, first) + _string(value, huffman)
    return bytes((first,)) + _string(name, huffman) + _string(value, huffman)


#: name -> value -> the field's encoding, for every connection of the process
_KEPT: dict[bytes, dict[bytes, bytes]] = {}


class Encoder:
    """Header blocks as joins of kept field encodings (see the module's notes); one per
    connection, for the table size updates it owes its peer."""

    __slots__ = ("_size_update", "_table_size")

    def __init__(self) -> None:
        self._size_update = b"\x20"  # dynamic table size update: 0
        self._table_size = 4096

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # whatever the peer now allows, this encoder's table stays empty: say so again
        self._table_size = value
        self._size_update = b"\x20"

    def encode(self, headers, huffman: bool = False) -> bytes:
        """The header block of *headers*: (name, value) byte pairs, (name, value, sensitive)
        triples, HPACK's HeaderTuple or NeverIndexedHeaderTuple (special headers first, as h2
        passes them). *huffman*: Huffman-code the fields that are kept (the others never are);
        off by default, which is how h2 calls it (see the module's notes)."""
        out = []
        if self._size_update:
            out.append(self._size_update)
            self._size_update = b""
        kept = _KEPT
        for field in headers:
            name, value = field[0], field[1]
            if field.__class__ is NeverIndexedHeaderTuple or (field.__class__ is tuple and len(field) > 2 and field[2]):
                # sensitive (hpack's 3-tuple form too): never kept, so never Huffman-coded either
                out.append(encode_field(name, value, True))
                continue
            values = kept.get(name)
            if values is not None:
                b = values.get(value)
                if b is not None:
                    out.append(b)
                    continue
                keep = len(values) < VALUES_PER_NAME and len(value) <= MAX_KEPT_VALUE
            else:
                keep = len(kept) < NAMES and len(value) <= MAX_KEPT_VALUE
            # Huffman coding (in Python, per byte) is paid once for a kept field, never for one-offs
            b = encode_field(name, value, False, huffman and keep)
            out.append(b)
            if keep:
                if values is None:
                    kept[name] = {value: b}
                else:
                    values[value] = b
        return b"".join(out)
