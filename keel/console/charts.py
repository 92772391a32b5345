"""Charts drawn on the server as inline SVG: no chart library, no script, nothing the CSP has to allow.

Each function returns SVG markup as text, safe to embed as it is (`|safe` in the templates: every label is escaped here) with a `role="img"` and an
`aria-label` that says what the chart shows, so a screen reader gets the figures too.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

W, H, PAD_L, PAD_B, PAD_T = 600, 180, 48, 22, 10


def _fmt(v: float) -> str:
    if abs(v) >= 1_000_000:
        return f"{v / 1_000_000:.1f}M"
    if abs(v) >= 1_000:
        return f"{v / 1_000:.1f}k"
    if v and abs(v) < 1:
        return f"{v:.4f}".rstrip("0")
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def series(points: Sequence[tuple[str, float]], label: str) -> str:
    """A time series (x: day labels, y: values) as a line over a filled area, with the axis' maximum."""
    e = html.escape
    if not points:
        return (f'<p class="empty">No {e(label)} in this period.</p>')
    top = max(v for _, v in points) or 1.0
    n = len(points)
    plot_w, plot_h = W - PAD_L - 8, H - PAD_B - PAD_T

    def xy(i: int, v: float) -> tuple[float, float]:
        x = PAD_L + (plot_w * (i / (n - 1)) if n > 1 else plot_w / 2)
        return round(x, 1), round(PAD_T + plot_h * (1 - v / top), 1)

    pts = [xy(i, v) for i, (_, v) in enumerate(points)]
    line = " ".join(f"{x},{y}" for x, y in pts)
    base = PAD_T + plot_h
    area = f"{pts[0][0]},{base} {line} {pts[-1][0]},{base}"
    summary = ", ".join(f"{d}: {_fmt(v)}" for d, v in points[-7:])
    dots = "".join(f'<circle cx="{x}" cy="{y}" r="2.5" class="dot"><title>{e(d)}: {_fmt(v)}</title></circle>'
                   for (x, y), (d, v) in zip(pts, points))
    return (
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{e(label)} per day; latest: {e(summary)}">'
        f'<line x1="{PAD_L}" y1="{base}" x2="{W - 8}" y2="{base}" class="axis"/>'
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{base}" class="axis"/>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" class="tick" text-anchor="end">{_fmt(top)}</text>'
        f'<text x="{PAD_L - 4}" y="{base}" class="tick" text-anchor="end">0</text>'
        f'<text x="{PAD_L}" y="{H - 4}" class="tick">{e(points[0][0])}</text>'
        f'<text x="{W - 8}" y="{H - 4}" class="tick" text-anchor="end">{e(points[-1][0])}</text>'
        f'<polygon points="{area}" class="area"/><polyline points="{line}" class="line"/>{dots}</svg>')


def bars(items: Sequence[tuple[str, float]], label: str, unit: str = "") -> str:
    """Horizontal bars, largest first (at most 8, the rest summed as “other”)."""
    e = html.escape
    items = sorted(items, key=lambda kv: kv[1], reverse=True)
    if len(items) > 8:
        items = [*items[:7], ("other", sum(v for _, v in items[7:]))]
    if not items:
        return (f'<p class="empty">No {e(label)} in this period.</p>')
    top = max(v for _, v in items) or 1.0
    row, label_w, bar_w = 24, 150, W - 150 - 90
    h = row * len(items) + 4
    parts = []
    for i, (name, v) in enumerate(items):
        y = i * row + 2
        w = max(1.0, bar_w * v / top) if v else 0.0
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" class="tick" text-anchor="end">{e(str(name)[:22])}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" class="bar">'
                     f'<title>{e(str(name))}: {_fmt(v)}{e(unit)}</title></rect>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" class="tick">{_fmt(v)}{e(unit)}</text>')
    summary = ", ".join(f"{n}: {_fmt(v)}{unit}" for n, v in items)
    return (f'<svg class="chart" viewBox="0 0 {W} {h}" role="img" aria-label="{e(label)}: {e(summary)}">'
                  + "".join(parts) + "</svg>")


def workflow_graph(steps: Sequence[dict], label: str = "Workflow steps") -> str:
    """A workflow definition's steps as a top-to-bottom graph: one box per step (approvals and conditions marked),
    an arrow to the step that follows, and for a condition its `then`/`else` jumps, each forward jump in its own
    lane on the right. `steps` are the spec's step dicts (`id`, `type`, and `if`/`then`/`else`, `approvers`,
    `when` where set)."""
    e = html.escape
    if not steps:
        return '<p class="empty">This workflow has no steps.</p>'
    box_w, box_h, gap, left, top = 230, 42, 30, 10, 10
    index = {s["id"]: i for i, s in enumerate(steps)}
    edges: list[tuple[int, int, str]] = []  # (from, to, label)
    for i, s in enumerate(steps):
        nxt = i + 1 if i + 1 < len(steps) else None
        if s.get("type") == "condition":
            for key in ("then", "else"):
                target = index.get(s.get(key)) if s.get(key) else nxt
                if target is not None:
                    edges.append((i, target, key))
        elif nxt is not None:
            edges.append((i, nxt, ""))
    skips = [edge for edge in edges if edge[1] != edge[0] + 1]
    lane0 = left + box_w + 24
    width = lane0 + 26 * len(skips) + 40
    height = top + len(steps) * (box_h + gap) - gap + 10

    def y_of(i: int) -> int:
        return top + i * (box_h + gap)

    parts = ['<defs><marker id="wf-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    said = []
    cx = left + box_w / 2
    for frm, to, text in edges:
        if to == frm + 1:
            y1, y2 = y_of(frm) + box_h, y_of(to)
            parts.append(f'<line x1="{cx}" y1="{y1}" x2="{cx}" y2="{y2 - 1}" class="edge" marker-end="url(#wf-arrow)"/>')
            if text:
                parts.append(f'<text x="{cx + 6}" y="{(y1 + y2) / 2 + 4}" class="e-label">{e(text)}</text>')
    for k, (frm, to, text) in enumerate(skips):
        x = lane0 + 26 * k
        y1, y2 = y_of(frm) + box_h / 2, y_of(to) + box_h / 2
        parts.append(f'<path d="M{left + box_w},{y1} H{x} V{y2} H{left + box_w + 1}" class="edge" '
                     f'marker-end="url(#wf-arrow)"/>')
        parts.append(f'<text x="{x + 4}" y="{y1 + 14}" class="e-label">{e(text)}</text>')
    for i, s in enumerate(steps):
        kind = s.get("type", "")
        y = y_of(i)
        cls = {"approval": " n-approval", "condition": " n-condition"}.get(kind, "")
        detail = kind
        if kind == "approval" and s.get("approvers"):
            detail += " · " + ", ".join(map(str, s["approvers"]))
        if kind == "condition":
            detail += " · if " + str(s.get("if", "")).strip("{} ")
        if s.get("when"):
            detail += " · when " + str(s["when"]).strip("{} ")
        parts.append(f'<g><title>{e(s["id"])}: {e(detail)}</title>'
                     f'<rect x="{left}" y="{y}" width="{box_w}" height="{box_h}" rx="{12 if cls else 4}" '
                     f'class="n-box{cls}"/>'
                     f'<text x="{left + 10}" y="{y + 17}" class="n-label">{e(s["id"][:30])}</text>'
                     f'<text x="{left + 10}" y="{y + 33}" class="n-type">{e(detail[:40])}</text></g>')
        said.append(f"{s['id']} ({detail})")
    for frm, to, text in edges:
        if text:
            said.append(f"{steps[frm]['id']} {text}: {steps[to]['id']}")
    return (f'<svg class="chart wf-graph" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{e(label)}: {e("; ".join(said))}">' + "".join(parts) + "</svg>")
