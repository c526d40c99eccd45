"""tracemesh._h1fast against h11 itself: for generated and mutated request and response
heads, bodies, pipelined requests and the responses sent back, both connections give the same
events (types, fields, raw header names), the same states after each step, the same bytes to send,
and the same errors (type, message, status hint), or both refuse."""

from __future__ import annotations

import re
import time

import h11
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tracemesh import _h1fast
from tracemesh._h1fast import Connection

SETTINGS = dict(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def _event(ev):
    if ev is h11.NEED_DATA or ev is h11.PAUSED:
        return ev
    out = [type(ev).__name__]
    for f in ("method", "target", "http_version", "status_code", "reason", "chunk_start", "chunk_end"):
        if hasattr(ev, f):
            v = getattr(ev, f)
            out.append((f, bytes(v) if isinstance(v, (bytes, bytearray)) else v, type(v).__name__))
    if hasattr(ev, "data"):
        out.append(("data", bytes(ev.data)))
    if hasattr(ev, "headers"):
        out.append(("headers", [tuple(bytes(x) for x in item) for item in ev.headers._full_items]))
    return tuple(out)


def _io(x):
    """A reader or writer: a function by name, an object by type and state."""
    if x is None or hasattr(x, "__name__"):
        return getattr(x, "__name__", None)
    return type(x).__name__, sorted(vars(x).items())


def _state(c: h11.Connection):
    return (c.our_state, c.their_state, c.client_is_waiting_for_100_continue, c.their_http_version,
            c.trailing_data, c._cstate.keep_alive, frozenset(c._cstate.pending_switch_proposals),
            c._request_method, _io(c._reader), _io(c._writer))


def _error(exc):
    return (type(exc).__name__, str(exc), getattr(exc, "error_status_hint", None))


def _pull(c, log, limit=50):
    """Events until NEED_DATA or PAUSED (or an error), each with the state after it."""
    for _ in range(limit):
        try:
            ev = c.next_event()
        except h11.RemoteProtocolError as exc:
            log.append(("error", _error(exc), _state(c)))
            return "error"
        log.append((_event(ev), _state(c)))
        if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
            return ev
    return None


def _send(c, ev, log):
    try:
        data = c.send(ev)
    except h11.LocalProtocolError as exc:
        log.append(("send error", _error(exc), _state(c)))
        return False
    log.append(("sent", data, _state(c)))
    return True


def _cycle(c, log):
    try:
        c.start_next_cycle()
        log.append(("cycle", _state(c)))
    except h11.LocalProtocolError as exc:
        log.append(("cycle error", _error(exc), _state(c)))


# -- generated messages ---------------------------------------------------------------------------

_NAMES = [b"Host", b"host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Upgrade",
          b"Expect", b"X-A", b"traceparent", b"Te", b"Content-length", b"", b"X A", b"X\x00", b"X:Y", b"\xff"]
_VALUES = [b"server", b"5", b"0", b"05", b"5, 5", b"5,6", b" 5 ", b"-1", b"99999999999999999999999", b"chunked",
           b"Chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"close", b"keep-alive", b"Upgrade",
           b"upgrade, close", b"websocket", b"h2c", b"100-continue", b"100-Continue", b"", b"a  b", b"a\tb",
           b"\x01", b"\x7f", b"\xff\xfe", b"a\x00b", b"a\rb", b"a\x0bb", b" ", b"\t", b"x" * 40, b"a \t \x00",
           b" \t \x0b", b"a \t b\x0c"]
_SEPS = [b":", b": ", b":\t", b":  ", b" :", b"\t:"]
_TRAILS = [b"", b"", b"", b" ", b"\t", b" \t"]
_EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"]
_METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b"", b"get", b"X-Y!"]
_TARGETS = [b"/", b"/a?b=c", b"*", b"http://server/x", b"server:443", b"/\x7f", b"/a b", b"/\xff", b""]
_VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/11", b"HTTP/1.x"]
_STATUS = [b"200 OK", b"200", b"200 ", b"204 No Content", b"304 Not Modified", b"404 Not Found", b"101 Switching",
           b"100 Continue", b"103 Early", b"099 x", b"000", b"2000 OK", b"20 OK", b"500 \xff\x80", b"200 a\x00b",
           b"200 \t"]
_RVERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"HTTP/1"]
_JUNK = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b",", b"\r\n", b"\r\n\r\n", b"\n\n", b"\xff", b"a", b"0", b"\x7f",
         b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b" folded\r\n"]


@st.composite
def _header_lines(draw):
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 15)) == 0:
            out += draw(st.sampled_from([b" folded", b"\tfolded", b"  "])) + draw(st.sampled_from(_EOLS))
            continue
        name = draw(st.sampled_from(_NAMES))
        value = draw(st.sampled_from(_VALUES))
        out += (name + draw(st.sampled_from(_SEPS)) + value + draw(st.sampled_from(_TRAILS))
                + draw(st.sampled_from(_EOLS)))
    return out


@st.composite
def _body(draw):
    kind = draw(st.sampled_from(["none", "bytes", "chunked"]))
    if kind == "none":
        return b""
    if kind == "bytes":
        return draw(st.sampled_from([b"hello", b"x" * 5, b"0123456789", b"he"]))
    chunks = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.sampled_from([b"hello", b"a", b"\r\n\r\n"]))
        chunks += b"%x%s\r\n%s\r\n" % (len(data), draw(st.sampled_from([b"", b";ext=1", b" "])), data)
    end = draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nx-trailer: t\r\n\r\n", b"0\r\n", b"", b"zz\r\n\r\n"]))
    return chunks + end


def _mutate(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(_JUNK))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 4))]
    return bytes(data)


@st.composite
def _request_bytes(draw):
    plain = draw(st.booleans())
    method = b"GET" if plain else draw(st.sampled_from(_METHODS))
    target = b"/" if plain else draw(st.sampled_from(_TARGETS))
    version = b"HTTP/1.1" if plain else draw(st.sampled_from(_VERSIONS))
    head = method + b" " + target + b" " + version + draw(st.sampled_from(_EOLS))
    if plain or draw(st.booleans()):
        head += b"Host: server\r\n"
    head += draw(_header_lines()) + draw(st.sampled_from(_EOLS))
    data = head + draw(_body())
    if draw(st.booleans()):  # pipelined
        data += draw(st.sampled_from([b"GET /2 HTTP/1.1\r\nHost: s\r\n\r\n", b"POST /3 HTTP/1.1\r\nHost: s\r\n"
                                      b"Content-Length: 2\r\n\r\nhi", b"GET / HTTP/1.0\r\n\r\n", b"\r\n"]))
    return _mutate(draw, data) if draw(st.booleans()) else data


@st.composite
def _response_bytes(draw):
    head = (draw(st.sampled_from(_RVERSIONS)) + b" " + draw(st.sampled_from(_STATUS))
            + draw(st.sampled_from(_EOLS)) + draw(_header_lines()) + draw(st.sampled_from(_EOLS)))
    data = head + draw(_body())
    if draw(st.booleans()):
        data = b"HTTP/1.1 100 Continue\r\n\r\n" + data
    return _mutate(draw, data) if draw(st.booleans()) else data


def _chunks(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    out, last = [], 0
    for c in cuts + [len(data)]:
        out.append(data[last:c])
        last = c
    return [c for c in out if c]


_RESPONSES = [
    (200, [(b"Content-Length", b"5")], [b"hello"], []),
    (200, [(b"content-length", b"0")], [], []),
    (200, [], [b"hel", b"lo"], []),  # re-framed: chunked, or close-delimited for HTTP/1.0
    (200, [(b"Transfer-Encoding", b"chunked")], [b"hello"], [(b"x-checksum", b"1")]),
    (200, [(b"Content-Length", b"5"), (b"Connection", b"close")], [b"hello"], []),
    (200, [(b"Content-Length", b"5"), (b"Connection", b"keep-alive")], [b"hello"], []),
    (204, [], [], []),
    (304, [(b"content-length", b"9")], [], []),
    (404, [(b"Content-Length", b"3")], [b"abcd"], []),  # too much data: an error
    (101, [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")], [], []),
    (100, [], None, []),
]


def _make_response(status, headers, trailers):
    if status < 200:
        return h11.InformationalResponse(status_code=status, headers=headers)
    return h11.Response(status_code=status, headers=headers, reason=b"R")


def _serve(cls, chunks, response, eof):
    """A server connection fed *chunks*, answering each request with *response*."""
    c = cls(h11.SERVER, max_incomplete_event_size=200)
    log = []
    status, headers, body, trailers = response
    for chunk in chunks + ([b""] if eof else []):
        c.receive_data(chunk)
        for _ in range(4):
            got = _pull(c, log)
            if got == "error" or not (c.their_state in (h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL)
                                      and c.our_state is h11.SEND_RESPONSE):
                break
            if not _send(c, _make_response(status, headers, trailers), log) or body is None:
                break
            for data in body:
                if not _send(c, h11.Data(data=data), log):
                    break
            else:
                _send(c, h11.EndOfMessage(headers=trailers), log)
            _cycle(c, log)
    return log


@given(st.data(), _request_bytes(), st.sampled_from(_RESPONSES), st.booleans())
@settings(**SETTINGS)
def test_server_side_as_h11(data, raw, response, eof):
    chunks = _chunks(data.draw, raw)
    assert _serve(Connection, chunks, response, eof) == _serve(h11.Connection, chunks, response, eof)


_REQUESTS = [
    (b"GET", [(b"Host", b"server")], []),
    (b"HEAD", [(b"Host", b"server")], []),
    (b"POST", [(b"Host", b"server"), (b"Content-Length", b"5")], [b"hello"]),
    (b"POST", [(b"Host", b"server"), (b"Transfer-Encoding", b"chunked")], [b"he", b"llo"]),
    (b"POST", [(b"Host", b"server"), (b"Content-Length", b"5"), (b"Expect", b"100-continue")], [b"hello"]),
    (b"GET", [(b"Host", b"server"), (b"Connection", b"close")], []),
    (b"GET", [(b"Host", b"server"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], []),
    (b"CONNECT", [(b"Host", b"server:443")], []),
    (b"PUT", [(b"Host", b"server"), (b"Content-Length", b"2")], [b"abc"]),  # too much data: an error
]


def _client(cls, request, chunks, eof, cycles=2):
    """A client connection sending *request* (up to *cycles* times on one connection), reading *chunks*."""
    c = cls(h11.CLIENT, max_incomplete_event_size=200)
    log = []
    method, headers, body = request
    chunks = list(chunks) + ([b""] if eof else [])
    for _ in range(cycles):
        if not _send(c, h11.Request(method=method, target=b"/", headers=headers), log):
            return log
        for data in body:
            if not _send(c, h11.Data(data=data), log):
                return log
        if not _send(c, h11.EndOfMessage(), log):
            return log
        while chunks:
            c.receive_data(chunks.pop(0))
            got = _pull(c, log)
            if got == "error" or c.their_state is not h11.SEND_RESPONSE and c.their_state is not h11.SEND_BODY:
                break
        _cycle(c, log)
        if c.our_state is not h11.IDLE:
            return log
    return log


@given(st.data(), st.sampled_from(_REQUESTS), _response_bytes(), st.booleans())
@settings(**SETTINGS)
def test_client_side_as_h11(data, request, raw, eof):
    chunks = _chunks(data.draw, raw + raw)  # the same response twice: the second one for a second cycle
    assert _client(Connection, request, chunks, eof) == _client(h11.Connection, request, chunks, eof)


# -- the sidecar's own event builders -------------------------------------------------------------

_HEADER_LISTS = st.lists(st.tuples(st.sampled_from([b"host", b"content-length", b"transfer-encoding", b"x-a",
                                                    b"Host", b"Content-Length", b"connection"]),
                                   st.sampled_from([b"server", b"5", b"05", b"5, 5", b"5,6", b" 5", b"chunked",
                                                    b"gzip", b"close", b"", b"99999999999999999999999"])),
                         max_size=5)


def _outcome(make):
    try:
        ev = make()
    except h11.LocalProtocolError as exc:
        return _error(exc)
    return _event(ev)


@given(st.sampled_from([b"GET", b"POST", b"G T", b"", b"get"]), st.sampled_from([b"/", b"/a?b", b"/a b", b""]),
       _HEADER_LISTS)
@settings(**SETTINGS)
def test_request_builder_as_h11(method, target, headers):
    assert _outcome(lambda: _h1fast.request(method, target, headers)) == _outcome(
        lambda: h11.Request(method=method, target=target, headers=headers, _parsed=True))


@given(st.sampled_from([200, 204, 404, 199, 1000, 999]), _HEADER_LISTS, st.sampled_from([b"OK", b""]))
@settings(**SETTINGS)
def test_response_builder_as_h11(status, headers, reason):
    assert _outcome(lambda: _h1fast.response(status, headers, reason)) == _outcome(
        lambda: h11.Response(status_code=status, headers=headers, reason=reason, _parsed=True))


# -- directed checks ------------------------------------------------------------------------------

def test_reason_phrase_class_is_h11s():
    """The head regex's reason-phrase class is h11's ``([ \\t] | field-vchar)*``, byte for byte."""
    from h11 import _abnf

    h11s = re.compile(rf"(?:{_abnf.reason_phrase})".encode())
    ours = re.compile(rb"[^\x00\n\r\x0b\x0c]*")
    for b in range(256):
        assert bool(h11s.fullmatch(bytes([b]))) == bool(ours.fullmatch(bytes([b]))), b


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a " * 30_000 + b"\x00\r\n\r\n",
    # h11's own header-line regex (OWS field-value OWS) is quadratic in a whitespace run before a bad
    # byte: ~10 s for this 60 KB head (Connection._refuse_bad_field_line)
    b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 60_000 + b"\x00\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\nX:" + b" " * 60_000 + b"\x00\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n \t" + b" " * 60_000 + b"\x00\r\n\r\n",
    b"HTTP/1.1 200 OK\nX: a" + b"\t" * 60_000 + b"\x0b\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 8_000 + b"\x00\r\n\r\n",
    b"HTTP/1.1 200 " + b" " * 60_000 + b"\x00\r\n\r\n",
])
def test_no_regex_blowup_on_hostile_heads(head):
    role = h11.CLIENT if head.startswith(b"HTTP/") else h11.SERVER
    c = Connection(role, max_incomplete_event_size=1 << 20)
    if role is h11.CLIENT:
        c.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        c.send(h11.EndOfMessage())
    c.receive_data(head)
    t = time.perf_counter()
    with pytest.raises(h11.RemoteProtocolError):
        c.next_event()
    assert time.perf_counter() - t < 0.5


@given(st.binary(max_size=30).map(lambda b: b.translate(bytes.maketrans(b"bcdefgh", b" \t:\x00\r\x0b\x80"))))
@settings(**SETTINGS)
def test_field_line_regex_is_h11s(line):
    from h11._readers import header_field_re

    assert bool(_h1fast._FIELD_LINE_RE.fullmatch(line)) == bool(header_field_re.fullmatch(line))


@pytest.mark.parametrize("n", [1, 50, 2000])
@pytest.mark.parametrize("template", [
    b"GET / HTTP/1.1\r\nHost: a\r\nX:%s\x00\r\n\r\n", b"GET / HTTP/1.1\nHost: a\nX: y%s\x00\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n %s\x00\r\nY: b\r\n\r\n", b"HTTP/1.1 200 OK\nX: a%s\x0b\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a%sb\r\n\r\n",
])
def test_hostile_heads_refused_as_h11_does(template, n):
    head = template % (b" \t" * n)
    logs = []
    for cls in (Connection, h11.Connection):
        if head.startswith(b"HTTP/"):
            logs.append(_client(cls, _REQUESTS[0], [head], False, cycles=1))
        else:
            logs.append(_serve(cls, [head], _RESPONSES[0], False))
    assert logs[0] == logs[1]


def test_plain_exchange_takes_the_fast_path():
    """The common exchange does not fall back to h11's reader or state machine (else no gain)."""
    calls = []
    s = Connection(h11.SERVER, max_incomplete_event_size=65536)
    orig = h11.Connection._process_event
    h11.Connection._process_event = lambda self, *a: (calls.append(a), orig(self, *a))[1]
    try:
        for _ in range(2):
            s.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            assert isinstance(s.next_event(), h11.Request)
            assert isinstance(s.next_event(), h11.EndOfMessage)
            s.send(_h1fast.response(200, [(b"content-length", b"2")], b"OK"))
            s.send(h11.Data(data=b"hi"))
            s.send(h11.EndOfMessage())
            s.start_next_cycle()
    finally:
        h11.Connection._process_event = orig
    assert calls == []


def test_switch_off(monkeypatch):
    monkeypatch.setattr(_h1fast, "ENABLED", False)
    assert type(_h1fast.connection(h11.SERVER, 100)) is h11.Connection
    monkeypatch.setattr(_h1fast, "ENABLED", True)
    assert type(_h1fast.connection(h11.SERVER, 100)) is Connection
