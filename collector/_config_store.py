"""The mesh config's versioned history, owned by the collector: validate, apply, get, roll back.

A directory holds it::

    LOCK                  flock()ed by the collector that owns the history (its pid inside)
    versions/00000001.json  one file per version, written once and never changed

The history keeps the newest ``keep`` versions (default :data:`DEFAULT_KEEP`, as Kubernetes keeps
a Deployment's last revisions; Argo CD keeps 10): older version files are removed after each new
version is durable. Numbers are never reused, so a removed version is reported as removed, not
unknown.

Each version file is written with :func:`tracemesh._fs.write_atomic` (beside, fsync, rename,
fsync the directory), so a crash at any point leaves every earlier version whole and either the
new one whole or none of it; :meth:`ConfigStore.apply` returns only once the new version is
durable. A file that does not read back whole (its digest) stops the store from opening, naming
the file, instead of silently serving an older config as the current one.

Thread-safe: apply and rollback serialise on a lock; reads take the current version without it.
Blocking (fsync): from Trio, call the mutating methods through ``trio.to_thread``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from tracemesh._fs import fsync_dir, write_atomic
# the config model itself, not the sidecar (importing tracemesh.proxy would load its data path too)
from tracemesh.proxy._config import ConfigError, MeshConfig, compose_config, parse_config

log = logging.getLogger("tracemesh.collector.config")

#: The version files' layout; a newer collector that changes it bumps this and reads both.
FORMAT = 1
_VERSIONS = "versions"
_LOCK = "LOCK"
#: Versions kept in the history (the newest ones; the current one is always among them).
DEFAULT_KEEP = 100

__all__ = ["ConfigError", "ConfigStore", "ConfigStoreError", "ConfigVersion", "ControlDirBusy", "UnknownVersion"]


class ConfigStoreError(Exception):
    """The history cannot be used (unreadable directory, damaged version file)."""


class ControlDirBusy(ConfigStoreError):
    """Another process (a second collector) owns the directory."""


class UnknownVersion(ConfigStoreError, LookupError):
    """No such version in the history."""


def digest(mesh: dict) -> str:
    """A config's identity: the SHA-256 of its canonical JSON (what sidecars can report back)."""
    return hashlib.sha256(json.dumps(mesh, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def render_yaml(mesh: dict) -> str:
    return yaml.safe_dump(mesh, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


@dataclass(frozen=True)
class ConfigVersion:
    """One version of the whole mesh config. ``mesh`` is plain JSON-able data in the shape
    ``parse_config`` takes: treat it as read-only (it is shared with every subscriber)."""

    version: int
    applied_at: float  # unix seconds
    message: str  # what made it: "apply mesh.yaml", "apply mesh.yaml (replace)", "rollback to 3"
    yaml: str  # the whole config as YAML, as `tracemesh get` prints it
    mesh: dict
    digest: str

    def config(self) -> MeshConfig:
        """The validated config objects (what a sidecar builds from ``mesh``)."""
        return parse_config(json.dumps(self.mesh), f"config version {self.version}")

    def summary(self) -> dict:
        m = self.mesh
        return {"version": self.version, "applied_at": self.applied_at, "message": self.message,
                "digest": self.digest, "services": len(m.get("services", {})), "routes": len(m.get("routes", [])),
                "policies": len(m.get("policies", [])), "canaries": len(m.get("canaries", []))}

    def to_json(self) -> dict:
        return {**self.summary(), "yaml": self.yaml, "mesh": self.mesh}


def _source_of(version: ConfigVersion) -> tuple[str, str]:
    # errors in objects kept from the current config name it, with lines of `tracemesh get`'s output
    return f"config version {version.version}", version.yaml


def describe(cfg: MeshConfig) -> str:
    """``3 services, 4 routes, 1 policy, 0 canaries``."""

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    return ", ".join([count(len(cfg.services), "service", "services"),
                      count(sum(len(r) for r in cfg.routes.values()), "route", "routes"),
                      count(len(cfg.policies), "policy", "policies"), count(len(cfg.canaries), "canary", "canaries")])


class ConfigStore:
    """The persisted, versioned mesh config of one collector (see the module docstring).

    Opening takes the directory's lock (:class:`ControlDirBusy` if another process holds it) and
    reads the history; :meth:`close` releases it (so does the process ending, however it ends).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"config history: keep must be at least 1 version, not {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._versions_dir = self.directory / _VERSIONS
        try:
            if not self._versions_dir.is_dir():
                self._versions_dir.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.directory)
            self._lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigStoreError(f"config history {self.directory}: cannot use it: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                os.close(self._lock_fd)
                raise ConfigStoreError(f"config history {self.directory}: cannot lock it: {exc.strerror}") from None
            holder = ""
            try:
                holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(self._lock_fd)
            raise ControlDirBusy(f"config history {self.directory} is in use by another collector"
                                 + (f" (pid {holder})" if holder else "")
                                 + "; give this one its own --control-dir") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._mutex = threading.Lock()
        self._callbacks: list[Callable[[ConfigVersion], None]] = []
        self._summaries: list[dict] = []
        self._current: ConfigVersion | None = None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- reading ------------------------------------------------------------------------------

    def _path(self, version: int) -> Path:
        return self._versions_dir / f"{version:08d}.json"

    def _read(self, path: Path) -> ConfigVersion:
        try:
            doc = json.loads(path.read_bytes())
            v = ConfigVersion(int(doc["version"]), float(doc["applied_at"]), str(doc["message"]), str(doc["yaml"]),
                              doc["mesh"], str(doc["digest"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigStoreError(f"config history: {path} is damaged ({exc}); move it away to go on without it") from None
        if doc.get("format") != FORMAT or not isinstance(v.mesh, dict) or digest(v.mesh) != v.digest \
                or path.name != f"{v.version:08d}.json":
            raise ConfigStoreError(f"config history: {path} is damaged (format, digest or number); "
                                   f"move it away to go on without it")
        return v

    def _load(self) -> None:
        for p in self._versions_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # write_atomic's leftover from a crash: never renamed, never acknowledged
        files = sorted(p for p in self._versions_dir.iterdir() if p.suffix == ".json" and p.stem.isdigit())
        last = None
        for p in files:
            last = self._read(p)
            self._summaries.append(last.summary())
        self._current = last
        self._prune()

    def _prune(self) -> None:
        """Remove the version files beyond the newest ``keep`` (never the current one)."""
        excess = len(self._summaries) - self.keep
        if excess <= 0:
            return
        for old in self._summaries[:excess]:
            try:
                self._path(old["version"]).unlink(missing_ok=True)
            except OSError as exc:  # a history that cannot shrink still works; say so and go on
                log.warning("config history: cannot remove version %d: %s", old["version"], exc.strerror or exc)
                return
        del self._summaries[:excess]
        fsync_dir(self._versions_dir)

    def current(self) -> ConfigVersion | None:
        """The config in force; None until the first apply."""
        return self._current

    def get(self, version: int) -> ConfigVersion:
        cur = self._current
        if cur is not None and version == cur.version:
            return cur
        if not any(s["version"] == version for s in self._summaries):
            if cur is None:
                raise UnknownVersion(f"no config version {version} (nothing applied yet)")
            first = self._summaries[0]["version"]
            if 0 < version < first:
                raise UnknownVersion(f"config version {version} was removed from the history, which keeps the "
                                     f"newest {self.keep} (versions {first}-{cur.version})")
            raise UnknownVersion(f"no config version {version} (versions {first}-{cur.version})")
        return self._read(self._path(version))

    def history(self) -> list[dict]:
        """Every kept version's summary (number, applied_at, message, digest, counts), oldest first."""
        return list(self._summaries)

    # -- changing -----------------------------------------------------------------------------

    def on_change(self, callback: Callable[[ConfigVersion], None]) -> Callable[[], None]:
        """Call *callback(version)* after every new version, once it is durable, in the thread that
        made it (an API worker thread), with the store's lock held so calls come in version order:
        keep it quick (hand over to your own loop, e.g. ``trio.from_thread.run_sync``). Its
        exceptions are logged and do not undo the version. Returns an unsubscribe function."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def validate(self, text: str, source: str, *, replace: bool = False) -> MeshConfig:
        """What :meth:`apply` would make of *text*, without applying it; raises ConfigError."""
        return self._compose([(source, text)], replace)[0]

    def validate_files(self, files: list[tuple[str, str]], *, replace: bool = False) -> MeshConfig:
        return self._compose(files, replace)[0]

    def _compose(self, files: list[tuple[str, str]], replace: bool) -> tuple[MeshConfig, dict]:
        cur = self._current
        base = None if replace or cur is None else _source_of(cur)
        try:
            return compose_config(files, base, strict=True)
        except ConfigError as exc:
            if base is not None and str(exc).startswith(base[0] + ":"):
                raise ConfigError(f"{exc} (an object kept from the current config; change it in the same apply, "
                                  f"or apply the whole config with --replace)") from None
            raise

    def apply(self, text: str, source: str, *, replace: bool = False, message: str | None = None) -> ConfigVersion:
        """Merge the documents of *text* into the current config (``replace``: *text* is the whole
        config), validate the result and make it the next version; all documents or none.

        Raises ConfigError (naming *source*, the line and the field) and changes nothing when the
        result is invalid. When the result equals the current config, returns the current version."""
        return self.apply_files([(source, text)], replace=replace, message=message)

    def apply_files(self, files: list[tuple[str, str]], *, replace: bool = False,
                    message: str | None = None) -> ConfigVersion:
        """:meth:`apply` for several files at once (one version, all of them or none)."""
        if message is None:
            message = "apply " + ", ".join(s for s, _ in files) + (" (replace)" if replace else "")
        with self._mutex:
            _, mesh = self._compose(files, replace)
            return self._commit(mesh, message)

    def rollback(self, version: int, message: str | None = None) -> ConfigVersion:
        """A new version whose content is *version*'s (re-validated); the current one when they are equal."""
        with self._mutex:
            old = self.get(version)
            # re-validated (the model may have grown stricter since), and its data taken afresh from its YAML
            _, mesh = compose_config([_source_of(old)], None, strict=True)
            return self._commit(mesh, message or f"rollback to {version}")

    def _commit(self, mesh: dict, message: str) -> ConfigVersion:
        cur = self._current
        new_digest = digest(mesh)
        if cur is not None and cur.digest == new_digest:  # by digest: a subscriber may have touched cur.mesh
            return cur
        number = (cur.version if cur else 0) + 1
        applied_at = round(time.time(), 3)
        header = f"# tracemesh mesh config, version {number}: {message}\n"
        new = ConfigVersion(number, applied_at, message, header + render_yaml(mesh), mesh, new_digest)
        doc = {"format": FORMAT, "version": number, "applied_at": applied_at, "message": message,
               "digest": new.digest, "mesh": mesh, "yaml": new.yaml}
        write_atomic(self._path(number), json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
        self._summaries.append(new.summary())
        self._current = new
        self._prune()
        for cb in list(self._callbacks):
            try:
                cb(new)
            except Exception:
                log.exception("config change subscriber %r failed on version %d", cb, number)
        return new

    def close(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)  # releases the flock

    def __enter__(self) -> "ConfigStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
