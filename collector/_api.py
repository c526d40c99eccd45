"""The collector's HTTP query API: ``/ready``, ``/api/sql``, ``/api/stats``, and the mesh config
(``/api/config...``, see :mod:`tracemesh.collector._config_api`).

``POST /api/sql?format=JSON`` with the SQL as the body (or ``GET /api/sql?query=...``) runs one
read-only statement; errors answer ``{"error": "..."}`` with 400 (the query's fault) or 503 (not
ready). Queries run in a worker thread (chdb releases the GIL), bounded by
:data:`MAX_CONCURRENT_QUERIES` so a burst of heavy queries cannot starve ingestion.
"""

from __future__ import annotations

import trio

from tracemesh.collector._config_api import ConfigAPI
from tracemesh.httpserve import Request, Response
from tracemesh.query import QueryError

#: Two cores here: more parallel scans than this only slow each other and the writer down.
MAX_CONCURRENT_QUERIES = 4

_CONTENT_TYPES = {
    "JSON": "application/json", "JSONCompact": "application/json", "JSONEachRow": "application/x-ndjson",
    "CSV": "text/csv", "CSVWithNames": "text/csv", "Arrow": "application/vnd.apache.arrow.file",
    "ArrowStream": "application/vnd.apache.arrow.stream", "Parquet": "application/vnd.apache.parquet",
}


class QueryAPI:
    def __init__(self, store, stats_fn, metrics_fn=None, config_store=None) -> None:
        self.store = store
        # /api/config...: the mesh config history (a ConfigStore); set it when open
        self.config = ConfigAPI(config_store)
        self.ready = False
        self.proxies = None  # () -> dict: GET /api/proxies, the sidecars of the config distribution
        self._stats_fn = stats_fn
        self._metrics_fn = metrics_fn
        self._limit = trio.CapacityLimiter(MAX_CONCURRENT_QUERIES)

    async def __call__(self, req: Request) -> Response:
        if req.path == "/ready":
            return Response(200, b"ready\n") if self.ready else Response(503, b"starting\n")
        if req.path == "/api/stats":
            return Response.json(self._stats_fn())
        if req.path == "/metrics":
            if self._metrics_fn is None or not self.ready:
                return Response(503, b"starting\n")
            return Response(200, self._metrics_fn(), "text/plain; version=0.0.4; charset=utf-8")
        if req.path == "/api/sql":
            return await self._sql(req)
        if req.path == "/api/proxies":
            if self.proxies is None:
                return Response.error(503, "config distribution is off or not started")
            summary = req.query.get("summary", "").lower() in ("1", "true", "yes")
            return await trio.to_thread.run_sync(lambda: Response.json(self.proxies(summary=summary)))
        if req.path == "/api/config" or req.path.startswith("/api/config/"):
            return await self.config(req)
        return Response.error(404, f"no such endpoint {req.path!r}; try POST /api/sql, GET /ready, GET /api/stats, GET /metrics")

    async def _sql(self, req: Request) -> Response:
        if req.method == "POST":
            try:
                sql = req.body.decode("utf-8")
            except UnicodeDecodeError:
                return Response.error(400, "the SQL body must be UTF-8")
        elif req.method == "GET":
            sql = req.query.get("query", "")
        else:
            return Response(405, b"use GET ?query= or POST\n", headers=[("allow", "GET, POST")])
        if not sql.strip():
            return Response.error(400, "empty query: send the SQL as the request body or as ?query=")
        if not self.ready:
            return Response.error(503, "the store is not open yet")
        fmt = req.query.get("format", "JSON")
        try:
            out = await trio.to_thread.run_sync(self.store.query_readonly, sql, fmt, limiter=self._limit)
        except QueryError as exc:
            return Response.error(400, str(exc))
        return Response(200, out, _CONTENT_TYPES.get(fmt, "text/plain; charset=utf-8"))
