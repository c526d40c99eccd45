"""h11 with the sidecar's common path made cheap: :class:`Connection` is an ``h11.Connection``
(the same events, states, errors and bytes) that takes shortcuts where h11's general machinery
costs most per request. h11 was ~28% of a sidecar's busy CPU under HTTP/1.1 load (issue 4):
~95 us per proxied request over its two connections (one request and response each way, in a
loop on this machine); with these shortcuts ~38 us. httptools (llhttp) was measured as the other
way: its head parse costs about what the one regex here does (~1.6 us for a typical head), it would
have added a second parser whose verdicts then had to be held to h11's, and most of h11's cost
was its state machine and event building, not its parsing.

- A message head of the plain form (CRLF line ends, no obs-fold, every line in h11's own grammar,
  the regexes built from :mod:`h11._abnf`) is checked by one regex over the whole head, then split,
  instead of h11's regex per line. Any other head (bare LF, obs-fold, a malformed line, a head not
  complete yet, a status below 100) goes to h11's own reader, so it is taken or refused exactly as
  h11 takes or refuses it. The header semantics (Content-Length and Transfer-Encoding checks, Host
  count) are h11's: its ``normalize_and_validate`` runs whenever either framing header is present.
- The state transitions of a plain exchange are applied directly: a request head (HTTP/1.1, no
  ``Upgrade``, not CONNECT, keep-alive unchanged), a response head (HTTP/1.1, keep-alive), Data,
  EndOfMessage, the next cycle, a response sent with a Content-Length. Anything else (HTTP/1.0,
  ``Connection: close``, upgrades, 1xx, errors, re-framing a response) takes h11's own path.

- A complete head that is not plain is checked line by line in linear time before h11's reader
  sees it, and refused with h11's own error when h11 would refuse it: h11's header-line regex is
  quadratic in a run of whitespace before a bad byte (~10 s of CPU for one 60 KB head), which would
  stall every connection of a single-threaded server. So the HTTP servers of the collector and the
  sidecar's admin port (:mod:`tracemesh.httpserve`) use it too.

It leans on h11 internals (``_cstate``, ``_reader``/``_writer``, the receive buffer's ``_data``
and ``_extract``); :func:`connection` checks them once and returns a plain ``h11.Connection``
with an h11 it does not know. tests/proxy/test_proxy_h1fast.py holds the two to the same answers
(hypothesis differential tests over generated and mutated heads and exchanges).
"""

from __future__ import annotations

import os
import re

import h11

try:  # h11 0.16's internals (pyproject.toml pins it); otherwise this module stays off
    from h11 import _abnf
    from h11._events import Data, EndOfMessage, Request, Response, method_re, request_target_re
    from h11._headers import Headers, get_comma_header, normalize_and_validate
    from h11._readers import (READERS, _obsolete_line_fold, maybe_read_from_IDLE_client,
                              maybe_read_from_SEND_RESPONSE_server)
    from h11._readers import request_line_re as _request_line_re
    from h11._readers import status_line_re as _status_line_re
    from h11._receivebuffer import blank_line_regex
    from h11._state import CLIENT, CLOSED, DONE, ERROR, IDLE, SEND_BODY, SEND_RESPONSE, SERVER
    from h11._util import LocalProtocolError, validate
    from h11._writers import WRITERS

    # the grammar pieces the regexes below are built from (AttributeError if one is gone)
    _abnf.vchar_or_obs_text, _abnf.field_name, _abnf.method, _abnf.request_target  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover
    _IMPORTED = False
else:
    _IMPORTED = True

#: Off (``TRACEMESH_H1FAST=0`` in the environment, or False here): plain h11 connections and events.
ENABLED = os.environ.get("TRACEMESH_H1FAST", "1") != "0"

if _IMPORTED:
    #: h11 0.14's Content-Length has no digit limit; with one, a longer value goes to h11's check
    CONTENT_LENGTH_MAX_DIGITS = getattr(h11._headers, "CONTENT_LENGTH_MAX_DIGITS", 0)

    # One header line of the plain form: h11's ``header_field`` (token ":" OWS [field-content] OWS),
    # field-content being any run of field-vchars, spaces and tabs that starts and ends with a field-vchar
    # (h11: ``field-vchar+ ([ \t]+ field-vchar+)*``), written so that the regex runs in linear time (no
    # run of whitespace can be split two ways) and with few steps per byte (one character class for the
    # middle of a value, not a group per word), then CRLF. Same lines as h11's (a test checks).
    _VCHAR = _abnf.vchar_or_obs_text
    _FIELD_VALUE = rf"(?:{_VCHAR}(?:[^\x00\r\n\x0b\x0c]*{_VCHAR})?[ \t]*)?"
    _FIELD_LINE = rf"{_abnf.field_name}:[ \t]*{_FIELD_VALUE}\r\n"
    _REQUEST_HEAD = re.compile(
        rf"{_abnf.method} {_abnf.request_target} HTTP/[0-9]\.[0-9]\r\n(?:{_FIELD_LINE})*\r\n".encode("ascii"))
    # reason-phrase is ([ \t] | field-vchar)*: every byte but NUL, CR, LF, VT and FF
    _RESPONSE_HEAD = re.compile(
        rf"HTTP/[0-9]\.[0-9] [0-9]{{3}}(?: [^\x00\n\r\x0b\x0c]*)?\r\n(?:{_FIELD_LINE})*\r\n".encode("ascii"))

    # h11's header-line regex in the linear form above, for a line without its CRLF
    _FIELD_LINE_RE = re.compile(rf"{_abnf.field_name}:[ \t]*{_FIELD_VALUE}".encode("ascii"))

    _new = object.__new__
    _set = object.__setattr__
    _READ_REQUEST_HEAD = maybe_read_from_IDLE_client
    _READ_RESPONSE_HEAD = maybe_read_from_SEND_RESPONSE_server
    _BODY_READERS = READERS[SEND_BODY]
    _BODY_WRITERS = WRITERS[SEND_BODY]


def _headers(lines: list) -> Headers:
    """h11's Headers of the header lines of a plain head (checked by the head regex)."""
    full = []
    lengths = 0
    other = False
    for line in lines:
        name, _, value = line.partition(b":")
        lower = name.lower()
        value = value.strip(b" \t")
        if lower == b"content-length":
            lengths += 1
            other = other or not value.isdigit() or not 0 < len(value) <= CONTENT_LENGTH_MAX_DIGITS
        elif lower == b"transfer-encoding":
            other = True
        full.append((name, lower, value))
    if other or lengths > 1:
        # h11's own checks and normal form (one Content-Length, Transfer-Encoding chunked only);
        # a single Content-Length of digits is its own normal form
        return normalize_and_validate([(n, v) for n, _, v in full], _parsed=True)
    return Headers(full)


def _pairs_headers(headers) -> Headers:
    """``normalize_and_validate(headers, _parsed=True)``, without its loop when no framing header
    needs a check."""
    if isinstance(headers, Headers):
        return headers
    full = []
    lengths = 0
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths += 1
            if lengths > 1 or not value.isdigit() or not 0 < len(value) <= CONTENT_LENGTH_MAX_DIGITS:
                return normalize_and_validate(headers, _parsed=True)
        elif lower == b"transfer-encoding":
            return normalize_and_validate(headers, _parsed=True)
        full.append((name, lower, value))
    return Headers(full)


def request(method: bytes, target: bytes, headers: list) -> Request:
    """``h11.Request(method=..., target=..., headers=..., _parsed=True)``, for less: the same
    checks (Host count, method and target), the headers taken as checked already (they come from a
    parsed request, or are the sidecar's own)."""
    if not (ENABLED and _COMPATIBLE):
        return h11.Request(method=method, target=target, headers=headers, _parsed=True)
    hs = _pairs_headers(headers)
    host_count = 0
    for _, name, _ in hs._full_items:
        if name == b"host":
            host_count += 1
    if host_count == 0:
        raise LocalProtocolError("Missing mandatory Host: header")
    if host_count > 1:
        raise LocalProtocolError("Found multiple Host: headers")
    validate(method_re, method, "Illegal method characters")
    validate(request_target_re, target, "Illegal target characters")
    ev = _new(Request)
    _set(ev, "method", method)
    _set(ev, "target", target)
    _set(ev, "headers", hs)
    _set(ev, "http_version", b"1.1")
    return ev


def response(status_code: int, headers: list, reason: bytes) -> Response:
    """``h11.Response(status_code=..., headers=..., reason=..., _parsed=True)``, for less (the
    headers taken as checked already, as with ``_parsed``)."""
    if not (ENABLED and _COMPATIBLE):
        return h11.Response(status_code=status_code, headers=headers, reason=reason, _parsed=True)
    hs = _pairs_headers(headers)
    if not 200 <= status_code < 1000:
        raise LocalProtocolError(f"Response status_code should be in range [200, 1000), not {status_code}")
    ev = _new(Response)
    _set(ev, "headers", hs)
    _set(ev, "http_version", b"1.1")
    _set(ev, "reason", reason)
    _set(ev, "status_code", status_code)
    return ev


def _request(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    del lines[-2:]
    method, target, version = lines[0].split(b" ")
    headers = _headers(lines[1:])
    version = version[5:]
    # as h11.Request.__init__ (method and target are checked by the head regex, with h11's grammar)
    host_count = 0
    for _, name, _ in headers._full_items:
        if name == b"host":
            host_count += 1
    if version == b"1.1" and host_count == 0:
        raise LocalProtocolError("Missing mandatory Host: header")
    if host_count > 1:
        raise LocalProtocolError("Found multiple Host: headers")
    ev = _new(Request)
    _set(ev, "method", method)
    _set(ev, "target", target)
    _set(ev, "headers", headers)
    _set(ev, "http_version", version)
    return ev


def _response(head: bytes):
    lines = head.split(b"\r\n")
    del lines[-2:]
    first = lines[0]
    status = int(first[9:12])
    ev = _new(Response if status >= 200 else h11.InformationalResponse)
    _set(ev, "headers", _headers(lines[1:]))
    _set(ev, "http_version", first[5:8])
    _set(ev, "reason", first[13:])
    _set(ev, "status_code", status)
    return ev


def _scan(headers: Headers):
    """(framing, arguments, plain) of a message's headers: ``"chunked"``, ``"content-length"`` with
    the length, or None (neither header); *plain* is False when a header asks for more than the
    common path (``Connection: close``, Upgrade, Expect). Headers of an h11 event are normalized
    already: one Content-Length of digits at most, a Transfer-Encoding only if ``chunked``, which wins."""
    framing, args, plain = None, (), True
    for _, name, value in headers._full_items:
        if name == b"transfer-encoding":
            framing, args = "chunked", ()
        elif name == b"content-length":
            if framing is None:
                framing, args = "content-length", (int(value),)
        elif name == b"upgrade" or name == b"expect":
            plain = False
        elif name == b"connection" and plain:
            plain = b"close" not in get_comma_header(headers, b"connection")
    return framing, args, plain


class Connection(h11.Connection):
    """An ``h11.Connection``; see the module's docstring for what it does faster."""

    def _extract_next_receive_event(self):
        reader = self._reader
        if reader is _READ_REQUEST_HEAD or reader is _READ_RESPONSE_HEAD:
            event = self._read_plain_head(reader is _READ_REQUEST_HEAD)
            if event is not None:
                return event
            self._refuse_bad_field_line()
        return super()._extract_next_receive_event()

    def _read_plain_head(self, request: bool):
        buf = self._receive_buffer
        data = buf._data
        if not data or data[0] == 10 or data[0] == 13:
            return None
        m = blank_line_regex.search(data, buf._multiple_lines_search)
        if m is None:
            return None
        end = m.end()
        if request:
            if _REQUEST_HEAD.fullmatch(data, 0, end) is None:
                return None
            return _request(bytes(buf._extract(end)))
        if _RESPONSE_HEAD.fullmatch(data, 0, end) is None or data[9:12] < b"100":
            return None
        return _response(bytes(buf._extract(end)))

    def _refuse_bad_field_line(self) -> None:
        """For a complete head that is not plain, raise h11's error for its first header line that
        h11 would refuse, as h11 would (the head taken out of the buffer, the same message), but in
        linear time: h11's regex takes seconds of CPU over one such 64 KB line (a whitespace run
        before a bad byte), during which no other connection of the sidecar is served. A head whose
        lines are all good is left to h11's reader, which is fast on it."""
        buf = self._receive_buffer
        data = buf._data
        if not data or data[:1] == b"\n" or data[:2] == b"\r\n":
            return
        m = blank_line_regex.search(data, buf._multiple_lines_search)
        if m is None:
            return
        lines = data[:m.end()].split(b"\n")  # as h11's maybe_extract_lines
        for line in lines:
            if line.endswith(b"\r"):
                del line[-1]
        del lines[-2:]
        first = _request_line_re if self.their_role is CLIENT else _status_line_re
        if first.fullmatch(lines[0]) is None:
            return  # h11 refuses the first line before any header line
        try:
            for line in _obsolete_line_fold(lines[1:]):
                if _FIELD_LINE_RE.fullmatch(line) is None:
                    break
            else:
                return
        except LocalProtocolError:
            return  # a continuation line first: h11 refuses it before any regex
        buf._extract(m.end())
        raise LocalProtocolError(f"illegal header line: {line!r}")

    def _process_event(self, role, event) -> None:
        cs = self._cstate
        if cs.keep_alive and not cs.pending_switch_proposals:
            states = cs.states
            t = type(event)
            if t is Data:
                if states[role] is SEND_BODY:
                    if role is CLIENT:
                        self.client_is_waiting_for_100_continue = False
                    return
            elif t is EndOfMessage:
                other = states[SERVER if role is CLIENT else CLIENT]
                if states[role] is SEND_BODY and other is not CLOSED and other is not ERROR:
                    states[role] = DONE
                    if role is CLIENT:
                        self.client_is_waiting_for_100_continue = False
                    if role is self.our_role:
                        self._writer = WRITERS.get((role, DONE))
                    else:
                        self._reader = READERS.get((role, DONE))
                    return
            elif t is Request:
                if (role is CLIENT and states[CLIENT] is IDLE and states[SERVER] is IDLE
                        and event.http_version == b"1.1" and event.method != b"CONNECT"):
                    framing, args, plain = _scan(event.headers)
                    if plain:
                        if framing is None:
                            framing, args = "content-length", (0,)
                        states[CLIENT], states[SERVER] = SEND_BODY, SEND_RESPONSE
                        self._request_method = event.method
                        if self.our_role is SERVER:
                            self.their_http_version = event.http_version
                            self._writer = WRITERS[(SERVER, SEND_RESPONSE)]
                            self._reader = _BODY_READERS[framing](*args)
                        else:
                            self._writer = _BODY_WRITERS[framing](*args)
                            self._reader = READERS[(SERVER, SEND_RESPONSE)]
                        return
            elif t is Response:
                if role is SERVER and states[SERVER] is SEND_RESPONSE and event.http_version == b"1.1":
                    framing, args, plain = _scan(event.headers)
                    if plain:
                        method = self._request_method
                        status = event.status_code
                        if status == 204 or status == 304 or method == b"HEAD" or (
                                method == b"CONNECT" and 200 <= status < 300):
                            framing, args = "content-length", (0,)
                        elif framing is None:
                            framing = "http/1.0"  # a response without framing ends at the close
                        states[SERVER] = SEND_BODY
                        self.client_is_waiting_for_100_continue = False
                        if self.our_role is SERVER:
                            self._writer = _BODY_WRITERS[framing](*args)
                        else:
                            self.their_http_version = event.http_version
                            self._reader = _BODY_READERS[framing](*args)
                        return
        super()._process_event(role, event)

    def _clean_up_response_headers_for_sending(self, response):
        # h11 rewrites the framing and Connection headers only for a chunked or close-delimited
        # body, or when the connection will close; otherwise it sends the response as it is
        if (self._cstate.keep_alive and type(response) is Response and type(response.reason) is bytes
                and type(response.status_code) is int):
            method = self._request_method
            status = response.status_code
            if status == 204 or status == 304 or (method == b"CONNECT" and 200 <= status < 300):
                return response
            if _scan(response.headers)[0] == "content-length":
                return response
        return super()._clean_up_response_headers_for_sending(response)

    def start_next_cycle(self) -> None:
        cs = self._cstate
        states = cs.states
        if states[CLIENT] is DONE and states[SERVER] is DONE and cs.keep_alive and not cs.pending_switch_proposals:
            assert not self.client_is_waiting_for_100_continue
            cs.states = {CLIENT: IDLE, SERVER: IDLE}
            self._request_method = None
            self._writer = WRITERS.get((self.our_role, IDLE))
            self._reader = READERS.get((self.their_role, IDLE))
            return
        super().start_next_cycle()


def _compatible() -> bool:
    """Whether this h11 has the internals :class:`Connection` relies on (h11 0.16 does; pyproject.toml pins it)."""
    if not _IMPORTED:
        return False
    try:
        c = h11.Connection(h11.SERVER)
        buf = c._receive_buffer
        return (hasattr(c, "_cstate") and c._reader is _READ_REQUEST_HEAD and isinstance(buf._data, bytearray)
                and hasattr(buf, "_extract") and hasattr(buf, "_multiple_lines_search")
                and c._cstate.states == {CLIENT: IDLE, SERVER: IDLE} and hasattr(c, "_request_method")
                and h11.Connection(h11.CLIENT)._reader is _READ_RESPONSE_HEAD)
    except Exception:
        return False


_COMPATIBLE = _compatible()


def connection(role, max_incomplete_event_size: int) -> h11.Connection:
    """A connection for *role* (``h11.CLIENT`` or ``h11.SERVER``): this module's when it is enabled
    and fits the installed h11, else h11's own."""
    cls = Connection if ENABLED and _COMPATIBLE else h11.Connection
    return cls(role, max_incomplete_event_size=max_incomplete_event_size)
