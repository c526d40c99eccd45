"""Queries over the trace store: read-only SQL today, the trace query language later.

Public surface:

- :class:`QueryError` -- ClickHouse refused or failed the query; its message is ClickHouse's.
- :class:`ReadOnlyError` -- the statement would change something; refused before it runs.
- :func:`prepare_readonly` -- canonicalise one statement with ClickHouse's own parser and
  return the text to run; the caller must also run it with the ``readonly=1`` setting.
"""

from tracemesh.query._readonly import READONLY_KINDS, QueryError, ReadOnlyError, prepare_readonly

__all__ = ["QueryError", "ReadOnlyError", "prepare_readonly", "READONLY_KINDS"]
