"""Drawing query results for people: aligned tables and trace waterfalls (plain text, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

BAR_WIDTH = 40
NAME_WIDTH = 44


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Align *rows* under *headers*; columns whose index is in *right* are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class SpanRow:
    span_id: str
    parent_span_id: str
    service: str
    name: str
    kind: str
    start_ns: int
    duration_ns: int
    error: bool = False


def _fmt_ms(ns: int) -> str:
    ms = ns / 1e6
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def waterfall(trace_id: str, spans: Sequence[SpanRow], bar_width: int = BAR_WIDTH) -> str:
    """Draw one trace as a waterfall: a row per span, nested under its parent, a bar on a time axis.

    Spans whose parent is not in the trace (lost, or from outside the mesh) are drawn as roots.
    """
    if not spans:
        return f"trace {trace_id}: no spans"
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRow]] = {}
    roots: list[SpanRow] = []
    for s in spans:
        if s.parent_span_id and s.parent_span_id in by_id and s.parent_span_id != s.span_id:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    t0 = min(s.start_ns for s in spans)
    t1 = max(s.start_ns + s.duration_ns for s in spans)
    total = max(t1 - t0, 1)

    ordered: list[tuple[int, SpanRow]] = []
    seen: set[str] = set()

    def walk(span: SpanRow, depth: int) -> None:
        if span.span_id in seen:  # a cycle in hostile data must not hang the drawing
            return
        seen.add(span.span_id)
        ordered.append((depth, span))
        for child in sorted(children.get(span.span_id, ()), key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for r in sorted(roots, key=lambda r: r.start_ns):
        walk(r, 0)

    services = len({s.service for s in spans})
    head = f"trace {trace_id}  {len(spans)} spans  {services} services  {_fmt_ms(total)}"
    svc_w = min(max(len(s.service) for s in spans), 16)
    lines = [head, f"{'':{svc_w}}  {'':{NAME_WIDTH}}  0{' ' * (bar_width - 1 - len(_fmt_ms(total)))}{_fmt_ms(total)}"]
    for depth, s in ordered:
        start = int((s.start_ns - t0) * bar_width / total)
        length = max(1, round(s.duration_ns * bar_width / total))
        start = min(start, bar_width - 1)
        length = min(length, bar_width - start)
        bar = " " * start + ("█" if not s.error else "▓") * length + " " * (bar_width - start - length)
        label = ("  " * depth + f"{s.kind[:1]} {s.name}")[:NAME_WIDTH]
        mark = "  ERROR" if s.error else ""
        lines.append(f"{s.service[:svc_w]:{svc_w}}  {label:{NAME_WIDTH}}  {bar} {_fmt_ms(s.duration_ns):>9}{mark}")
    lines.append(f"{'':{svc_w}}  {'':{NAME_WIDTH}}  S server  C client  I internal   ▓ error")
    return "\n".join(lines)
