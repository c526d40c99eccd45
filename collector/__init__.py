"""The collector: OTLP receivers, write-ahead log, ClickHouse store, query API, mesh CA.

Public surface: :func:`serve` and :func:`status` (``tracemesh collector``), :class:`CollectorOptions`,
:func:`open_store` and :class:`StoreBusy` (``tracemesh sql --store``), :class:`EmbeddedStore`.
Imports are lazy: chdb and grpcio take a noticeable time to load, and commands such as
``tracemesh token create`` need neither.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EmbeddedStore": "tracemesh.collector._store", "StoreBusy": "tracemesh.collector._store",
    "open_store": "tracemesh.collector._store", "CollectorOptions": "tracemesh.collector._serve",
    "serve": "tracemesh.collector._serve", "status": "tracemesh.collector._serve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
