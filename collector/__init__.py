"""The collector: OTLP receiver, ClickHouse store, query API.

Public surface: :func:`serve` (the ``tracemesh collector`` command), :func:`open_store` and
:class:`StoreBusy` (for ``tracemesh sql --store``), :class:`EmbeddedStore`.
"""

from tracemesh.collector._store import EmbeddedStore, StoreBusy, open_store
from tracemesh.collector._serve import CollectorOptions, serve, status

__all__ = ["CollectorOptions", "EmbeddedStore", "StoreBusy", "open_store", "serve", "status"]
