"""The mesh config endpoints of the collector's query API (``/api/config...``).

    POST /api/config/validate[?replace=1]        would this apply? 200 {"valid": true, ...} or 400
    POST /api/config[?replace=1&message=M]      apply: 200 {"version": N, "changed": bool, ...} or 400
    GET  /api/config[?version=N&format=yaml]    the current (or version N) config: JSON with "yaml"
                                                and "mesh", or the YAML alone; 409 before the first apply
    GET  /api/config/history                    {"current": N, "versions": [summaries, oldest first]}
    POST /api/config/rollback?version=N         a new version with N's content

A body is the YAML (``?source=NAME`` names it in errors), or, for several files applied as one,
``Content-Type: application/vnd.tracemesh.files+json`` with ``{"files": [{"source", "text"}]}``.

Changing the config is privileged: the API listens on loopback by default, and requests that carry
an ``Origin`` header (sent by browsers, never by the CLI or curl) are refused, so a web page cannot
post a config to a collector on the operator's machine.
"""

from __future__ import annotations

import json

import trio

from tracemesh.collector._config_store import ConfigStore, UnknownVersion, describe
from tracemesh.httpserve import Request, Response
from tracemesh.proxy._config import ConfigError

FILES_TYPE = "application/vnd.tracemesh.files+json"
YAML_TYPE = "application/yaml"


def _flag(req: Request, name: str) -> bool:
    return req.query.get(name, "").lower() in ("1", "true", "yes")


def _files(req: Request) -> list[tuple[str, str]]:
    try:
        text = req.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{req.query.get('source') or '<request>'}: not UTF-8 text (at byte {exc.start})") from None
    if req.header("content-type").split(";")[0].strip().lower() != FILES_TYPE:
        return [(req.query.get("source") or "<request>", text)]
    try:
        doc = json.loads(text)
        files = [(str(f["source"]), f["text"]) for f in doc["files"]]
        if not files or not all(isinstance(t, str) for _, t in files):
            raise ValueError("no files")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"<request>: expected {{\"files\": [{{\"source\": NAME, \"text\": YAML}}, ...]}}: {exc}") from None
    return files


def _version_arg(req: Request) -> int:
    raw = req.query.get("version", "")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"version must be a positive integer, got {raw!r}")
    return int(raw)


class ConfigAPI:
    """Serves ``/api/config...`` from a :class:`ConfigStore` (None while the collector starts: 503)."""

    def __init__(self, store: ConfigStore | None) -> None:
        self.store = store

    async def __call__(self, req: Request) -> Response:
        store = self.store
        if store is None:
            return Response.error(503, "the config history is not open yet")
        path = req.path.rstrip("/")
        routes = {"/api/config": ("GET", "POST"), "/api/config/validate": ("POST",),
                  "/api/config/history": ("GET",), "/api/config/rollback": ("POST",)}
        if path not in routes:
            return Response.error(404, f"no such endpoint {req.path!r}; try GET /api/config, GET /api/config/history, "
                                       f"POST /api/config, POST /api/config/validate, POST /api/config/rollback?version=N")
        allowed = routes[path]
        if req.method not in allowed and not (req.method == "HEAD" and "GET" in allowed):
            return Response(405, f"use {' or '.join(allowed)}\n".encode(), headers=[("allow", ", ".join(allowed))])
        if req.method == "POST" and req.header("origin"):
            return Response.error(403, "config changes are not taken from web pages (the request has an Origin header)")
        try:
            if path == "/api/config/history":
                cur = store.current()
                return Response.json({"current": cur.version if cur else None, "versions": store.history()})
            if path == "/api/config" and req.method != "POST":
                return self._get(store, req)
            if path == "/api/config/rollback":
                return await self._rollback(store, req)
            files = _files(req)
            replace = _flag(req, "replace")
            if path == "/api/config/validate":
                cfg = await trio.to_thread.run_sync(lambda: store.validate_files(files, replace=replace))
                return Response.json({"valid": True, "summary": describe(cfg), "replace": replace})
            before = store.current()
            new = await trio.to_thread.run_sync(
                lambda: store.apply_files(files, replace=replace, message=req.query.get("message") or None))
            return Response.json({**new.summary(), "changed": before is None or new.version != before.version,
                                  "summary": describe(new.config())})
        except ConfigError as exc:
            return Response.error(400, str(exc))
        except UnknownVersion as exc:
            return Response.error(404, str(exc))
        except ValueError as exc:
            return Response.error(400, str(exc))

    def _get(self, store: ConfigStore, req: Request) -> Response:
        if "version" in req.query:
            v = store.get(_version_arg(req))
        else:
            v = store.current()
            if v is None:
                return Response.error(409, "no config applied yet; apply one with `tracemesh apply -f FILE`")
        fmt = req.query.get("format", "json").lower()
        if fmt == "yaml":
            return Response(200, v.yaml.encode(), f"{YAML_TYPE}; charset=utf-8")
        if fmt != "json":
            return Response.error(400, f"format must be json or yaml, got {fmt!r}")
        return Response.json(v.to_json())

    async def _rollback(self, store: ConfigStore, req: Request) -> Response:
        target = _version_arg(req)
        before = store.current()
        new = await trio.to_thread.run_sync(store.rollback, target)
        return Response.json({**new.summary(), "changed": before is None or new.version != before.version,
                              "rolled_back_to": target})
