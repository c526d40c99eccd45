from tracemesh.query.render import SpanRow, table, waterfall


def test_table_aligns_and_right_aligns_numbers():
    out = table(["name", "n"], [["a", 1], ["long-name", 100]], right=[1])
    lines = out.splitlines()
    assert lines[0].startswith("name") and lines[1].startswith("----")
    assert lines[2].endswith("  1") and lines[3].endswith("100")
    assert len({len(line) for line in lines[2:]}) == 1


def _span(sid, parent, start, dur, service="svc", error=False):
    return SpanRow(sid, parent, service, f"op-{sid}", "Server", start, dur, error)


def test_waterfall_nests_children_under_parents_in_time_order():
    spans = [
        _span("c2", "root", 5_000_000, 2_000_000),
        _span("root", "", 0, 10_000_000, service="frontend"),
        _span("c1", "root", 1_000_000, 3_000_000),
        _span("g1", "c1", 1_500_000, 1_000_000, error=True),
    ]
    out = waterfall("t" * 32, spans, bar_width=20)
    lines = out.splitlines()
    assert "4 spans" in lines[0] and "2 services" in lines[0] and "10.0 ms" in lines[0]
    names = [line.split()[2] for line in lines[2:6]]
    assert names == ["op-root", "op-c1", "op-g1", "op-c2"]
    # the root's bar fills the axis; a child starting at 50% starts at column 10
    root_bar = lines[2].split("S op-root")[1]
    assert root_bar.strip().startswith("█" * 20)
    assert "ERROR" in lines[4]
    assert lines[4].index("S op-g1") == lines[3].index("S op-c1") + 2  # one level deeper


def test_waterfall_survives_orphans_and_cycles():
    spans = [_span("a", "b", 0, 10), _span("b", "a", 5, 10), _span("x", "missing", 3, 1)]
    out = waterfall("t", spans)
    assert "op-x" in out  # a span whose parent never arrived is drawn as a root
    assert waterfall("t", []) == "trace t: no spans"
