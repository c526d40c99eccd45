"""The OTLP/HTTP receiver: ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``.

Binary protobuf (``application/x-protobuf``) and OTLP/JSON (``application/json``), optionally
``Content-Encoding: gzip``; the answer uses the request's encoding, as the spec asks. Errors carry a
``google.rpc.Status`` body: 400 malformed, 413 too large (also after decompression: a gzip bomb is
cut off at the limit, not inflated), 415 unsupported content type or encoding, 429 with
``Retry-After`` when the collector pushes back (OTLP exporters retry on 429/503 and honour it).
"""

from __future__ import annotations

import zlib

import trio
from google.protobuf import json_format
from google.rpc import status_pb2

from tracemesh.collector._otlp import SIGNALS, OTLPError
from tracemesh.collector._pipeline import Backpressure, Pipeline
from tracemesh.httpserve import Request, Response

_BY_PATH = {s.http_path: s for s in SIGNALS.values()}
PROTOBUF, JSON = "application/x-protobuf", "application/json"
#: Exports wait in threads for the WAL's group commit.
MAX_CONCURRENT_EXPORTS = 32


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Inflate gzip *data*; raise ValueError past *limit* bytes of output or on corrupt input."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt gzip body: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise OverflowError(f"the body inflates past the {limit} byte limit")
    if not d.eof:
        raise ValueError("truncated gzip body")
    return out


class OTLPHttp:
    def __init__(self, pipeline: Pipeline, max_message: int) -> None:
        self.pipeline = pipeline
        self.max_message = max_message
        self.ready = False
        self._limit = trio.CapacityLimiter(MAX_CONCURRENT_EXPORTS)

    @staticmethod
    def _status(code: int, message: str, json_body: bool, http_status: int, headers=()) -> Response:
        st = status_pb2.Status(code=code, message=message)
        if json_body:
            body, ctype = json_format.MessageToJson(st, indent=None).encode(), JSON
        else:
            body, ctype = st.SerializeToString(), PROTOBUF
        return Response(http_status, body, ctype, list(headers))

    async def __call__(self, req: Request) -> Response:
        signal = _BY_PATH.get(req.path)
        ctype = req.header("content-type").split(";")[0].strip().lower()
        as_json = ctype == JSON
        if signal is None:
            return self._status(5, f"no OTLP endpoint {req.path!r}; use /v1/traces, /v1/metrics or /v1/logs", as_json, 404)
        if req.method != "POST":
            return Response(405, b"OTLP/HTTP takes POST\n", headers=[("allow", "POST")])
        if ctype not in (PROTOBUF, JSON):
            return self._status(3, f"unsupported content type {ctype or '(none)'!r}; use {PROTOBUF} or {JSON}",
                                False, 415)
        if not self.ready:
            return self._status(14, "the collector is starting", as_json, 503, [("retry-after", "1")])
        body = req.body
        encoding = req.header("content-encoding").strip().lower()
        if encoding == "gzip":
            try:
                body = gunzip_bounded(body, self.max_message)
            except OverflowError as exc:
                return self._status(8, str(exc), as_json, 413)
            except ValueError as exc:
                return self._status(3, str(exc), as_json, 400)
        elif encoding not in ("", "identity"):
            return self._status(3, f"unsupported content encoding {encoding!r}; use gzip or none", as_json, 415)
        if len(body) > self.max_message:
            return self._status(8, f"the message is larger than {self.max_message} bytes", as_json, 413)
        try:
            status, payload = await trio.to_thread.run_sync(self._export, signal, body, as_json, limiter=self._limit)
        except OTLPError as exc:
            return self._status(3, str(exc), as_json, 400)
        except Backpressure as exc:
            return self._status(8, str(exc), as_json, 429, [("retry-after", str(exc.retry_after_s))])
        return Response(status, payload, JSON if as_json else PROTOBUF)

    def _export(self, signal, body: bytes, as_json: bool) -> tuple[int, bytes]:
        result = signal.accept_json(body) if as_json else signal.accept(body)
        # the log keeps binary protobuf: JSON is re-serialized (only when there is something to keep)
        payload = (result.request.SerializeToString() if as_json else body) if result.rows else b""
        self.pipeline.submit(signal.kind, payload, result.batches, result.rejected)
        return 200, signal.response_json(result) if as_json else signal.response(result)
