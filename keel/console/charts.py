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
