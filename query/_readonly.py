"""Read-only SQL, decided by ClickHouse's parser and enforced by ClickHouse's ``readonly`` setting.

String checks alone are not enough (``SELECT 1; DROP TABLE t`` ran both statements in chdb when we
tried), so a statement goes through ``formatQuery`` first: that is ClickHouse's own parser, it
refuses multi-statements, and its output is canonical, so the kind of statement is its first
keyword. The canonical text is then run with ``SETTINGS readonly = 1`` appended (chdb) or with
``readonly=1`` in the native protocol's query settings (clickhouse-driver), so even a statement
we misjudged cannot write: ClickHouse refuses it with READONLY.
"""

from __future__ import annotations

import re
from typing import Callable

#: Statement kinds that only read. ``formatQuery`` writes them as their first keyword.
READONLY_KINDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS")

#: Refuse absurd inputs before they reach the parser.
MAX_SQL_BYTES = 256 * 1024

_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
# Only outside string literals: formatQuery quotes literals with single quotes and escapes them.
_LITERALS = re.compile(r"'(?:[^'\\]|\\.)*'")


class QueryError(Exception):
    """ClickHouse refused or failed the query; ``str()`` is ClickHouse's message."""


class ReadOnlyError(QueryError):
    """The statement is not a read; refused before it ran."""


def prepare_readonly(sql: str, format_query: Callable[[str], str]) -> str:
    """Return the canonical text of *sql* if it is one read-only statement; raise otherwise.

    *format_query* runs ClickHouse's ``formatQuery`` on its argument and returns the result,
    raising :class:`QueryError` with ClickHouse's message on a syntax error.
    """
    if len(sql.encode("utf-8", "surrogatepass")) > MAX_SQL_BYTES:
        raise QueryError(f"query is larger than {MAX_SQL_BYTES} bytes")
    stripped = sql.strip().rstrip(";").strip()
    if not stripped:
        raise QueryError("empty query")
    canonical = format_query(stripped).strip()
    m = _FIRST_WORD.match(canonical)
    kind = m.group(1).upper() if m else ""
    if kind not in READONLY_KINDS:
        raise ReadOnlyError(
            f"{kind or 'this'} statements are not allowed: tracemesh sql is read-only "
            f"({', '.join(READONLY_KINDS)})"
        )
    bare = _LITERALS.sub("''", canonical).upper()
    if "INTO OUTFILE" in bare:
        raise ReadOnlyError("INTO OUTFILE is not allowed: tracemesh sql is read-only")
    if re.search(r"\bFORMAT\s+\w+\s*$", bare):
        raise QueryError("leave out FORMAT: choose the output with --format (table, json, csv)")
    return canonical
