"""The read-only guard, judged by ClickHouse's real parser (chdb's formatQuery)."""

import pytest
from chdb import session
from hypothesis import given, settings, strategies as st

from tracemesh.query import QueryError, ReadOnlyError, prepare_readonly


@pytest.fixture(scope="module")
def format_query():
    sess = session.Session(":memory:")

    def fmt(sql: str) -> str:
        try:
            return sess.query("SELECT formatQuery({q:String})", "TSVRaw", params={"q": sql}).bytes().decode()
        except Exception as exc:
            raise QueryError(str(exc)) from None

    yield fmt
    sess.close()


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "select count() from otel_traces where TraceId = 'abc;DROP TABLE x'",
    "WITH 1 AS x SELECT x",
    "(SELECT 1) UNION ALL (SELECT 2)",
    "SHOW TABLES",
    "DESCRIBE TABLE otel_traces",
    "desc otel_traces",
    "EXPLAIN SELECT 1",
    "EXISTS TABLE otel_traces",
    "SELECT 1;",
    "  SELECT 'into outfile' AS s  ",
])
def test_reads_pass(format_query, sql):
    assert prepare_readonly(sql, format_query)


@pytest.mark.parametrize("sql, word", [
    ("INSERT INTO t VALUES (1)", "INSERT"),
    ("DROP TABLE otel_traces", "DROP"),
    ("ALTER TABLE otel_traces DELETE WHERE 1", "ALTER"),
    ("TRUNCATE TABLE otel_traces", "TRUNCATE"),
    ("CREATE TABLE x (a Int8) ENGINE = Memory", "CREATE"),
    ("SET readonly = 0", "SET"),
    ("SYSTEM FLUSH LOGS", "SYSTEM"),
    ("OPTIMIZE TABLE otel_traces", "OPTIMIZE"),
    ("KILL QUERY WHERE 1", "KILL"),
])
def test_writes_refused(format_query, sql, word):
    with pytest.raises(ReadOnlyError, match=word):
        prepare_readonly(sql, format_query)


def test_multi_statement_refused_by_the_parser(format_query):
    # chdb runs every statement of "SELECT 1; DROP TABLE t" when given it directly
    with pytest.raises(QueryError, match="Multi-statements"):
        prepare_readonly("SELECT 1; DROP TABLE otel_traces", format_query)


def test_into_outfile_refused(format_query):
    with pytest.raises(ReadOnlyError, match="OUTFILE"):
        prepare_readonly("SELECT 1 INTO OUTFILE '/tmp/x.csv'", format_query)


def test_syntax_error_carries_clickhouse_message(format_query):
    with pytest.raises(QueryError, match="Syntax error"):
        prepare_readonly("SELEC 1", format_query)


def test_empty_and_oversized(format_query):
    with pytest.raises(QueryError, match="empty"):
        prepare_readonly(" ; ", format_query)
    with pytest.raises(QueryError, match="larger"):
        prepare_readonly("SELECT '" + "x" * 300_000 + "'", format_query)


def test_format_clause_refused(format_query):
    with pytest.raises(QueryError, match="--format"):
        prepare_readonly("SELECT 1 FORMAT JSON", format_query)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_a_read_or_a_clear_error(format_query, text):
    try:
        out = prepare_readonly(text, format_query)
    except QueryError as exc:
        assert str(exc)
    else:
        assert out.lstrip("( \n").split()[0].upper() in ("SELECT", "WITH", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS")
