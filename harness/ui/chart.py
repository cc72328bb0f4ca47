"""The page's chart: one stacked bar per optimizer (bytes by category at the peak) against GPU memory lines, as SVG.

SVG written here rather than a matplotlib PNG (about 90 ms a figure on this project's CI machine, most of a warm
request's budget) or Gradio's Vega plots (which cannot draw the GPU's memory line over stacked bars). Every
segment carries its exact figure (``data-optim``, ``data-category``, ``data-bytes``) and a tooltip, so what the
page draws can be read back and checked against ``estimate()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

from optimem.estimators.categories import LABELS, Category
from optimem.harness.plots import CATEGORY_COLORS
from optimem.harness.units import human_bytes

CUDA_TERMS = "cuda_terms"
"""The segment above the tensor peak: allocation rounding, cuBLAS workspaces and the caching allocator's
reserve (``Estimate.cuda``: ``peak_reserved`` - ``peak``); the CUDA context is in the GPU line instead."""
SEGMENTS = (Category.WEIGHTS, Category.GRADIENTS, Category.OPTIMIZER_STATE, Category.ACTIVATIONS,
            Category.TEMPORARIES, Category.OTHER, Category.SHARDING_OVERHEAD, CUDA_TERMS)
"""Stacking order, bottom up."""
COLORS = {**{str(k): v for k, v in CATEGORY_COLORS.items()}, "temporaries": "#e5ae38", "other": "#8c8c8c",
          "sharding_overhead": "#8172b3", CUDA_TERMS: "#c7c7c7"}
NAMES = {**{str(k): v for k, v in LABELS.items()}, CUDA_TERMS: "CUDA terms"}


@dataclass
class Bar:
    """One optimizer's bar: ``parts`` bytes per segment name (any of :data:`SEGMENTS`)."""

    label: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class Line:
    """A horizontal memory line (bytes) with its label, e.g. a GPU's usable memory."""

    label: str
    bytes: int


W, H = 820, 380
LEFT, RIGHT, TOP, BOTTOM = 72, 250, 28, 70


def _ticks(top: float) -> list[int]:
    """Round byte ticks (1, 2, 5, 10, 20, 25, 50... of a binary unit), at most six, from 0 up to ``top``."""
    steps = sorted(k << e for e in range(0, 61, 10) for k in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500))
    step = next((s for s in steps if top / s <= 6), steps[-1])
    return [i * step for i in range(int(top // step) + 1)]


def svg(bars: list[Bar], lines: list[Line], title: str) -> str:
    """The chart as one ``<svg>`` element (bars bottom-up in :data:`SEGMENTS` order, then the lines)."""
    if not bars:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60"><text x="10" y="30">' \
               'nothing to draw</text></svg>'
    top = max([b.total for b in bars] + [ln.bytes for ln in lines] + [1]) * 1.08
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    y = lambda v: TOP + plot_h * (1 - v / top)  # noqa: E731
    slot = plot_w / len(bars)
    width = min(56.0, slot * 0.6)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="memory-chart" role="img" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           f'<title>{escape(title)}</title>',
           f'<text x="{LEFT}" y="16" font-size="13">{escape(title)}</text>']
    for t in _ticks(top):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e6e6e6"/>'
                   f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{human_bytes(t)}</text>')
    for i, bar in enumerate(bars):
        x = LEFT + slot * i + (slot - width) / 2
        base = 0
        for seg in SEGMENTS:
            n = int(bar.parts.get(str(seg), 0))
            if n <= 0:
                continue
            y0, y1 = y(base + n), y(base)
            out.append(f'<rect class="segment" data-optim="{escape(bar.label)}" data-category="{seg}" '
                       f'data-bytes="{n}" x="{x:.1f}" y="{y0:.2f}" width="{width:.1f}" '
                       f'height="{max(y1 - y0, 0.0):.2f}" fill="{COLORS[str(seg)]}" stroke="white" stroke-width="0.5">'
                       f'<title>{escape(bar.label)}: {escape(NAMES[str(seg)])} {human_bytes(n)} ({n:,} B)</title>'
                       '</rect>')
            base += n
        out.append(f'<text class="bar-total" data-optim="{escape(bar.label)}" data-bytes="{bar.total}" '
                   f'x="{x + width / 2:.1f}" y="{y(base) - 4:.1f}" text-anchor="middle">{human_bytes(bar.total)}</text>')
        cx, cy = x + width / 2, TOP + plot_h + 12
        out.append(f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="end" transform="rotate(-30 {cx:.1f} {cy:.1f})">'
                   f'{escape(bar.label)}</text>')
    last = None
    for j, line in enumerate(sorted(lines, key=lambda ln: -ln.bytes)):
        ly = y(line.bytes)
        ty = ly + 4 if last is None else max(ly + 4, last + 13)  # labels of close lines one under the other
        last = ty
        out.append(f'<line class="gpu-line" data-bytes="{line.bytes}" x1="{LEFT}" x2="{LEFT + plot_w}" '
                   f'y1="{ly:.1f}" y2="{ly:.1f}" stroke="#222" stroke-dasharray="{6 - j % 3 * 2},3">'
                   f'<title>{escape(line.label)}</title></line>'
                   f'<text x="{LEFT + plot_w + 4}" y="{ty:.1f}">{escape(line.label)}</text>')
    used = [s for s in SEGMENTS if any(b.parts.get(str(s), 0) > 0 for b in bars)]
    for k, seg in enumerate(used):
        ly = TOP + 60 + 16 * k + 13 * len(lines)
        out.append(f'<rect x="{LEFT + plot_w + 8}" y="{ly - 9}" width="10" height="10" fill="{COLORS[str(seg)]}"/>'
                   f'<text x="{LEFT + plot_w + 22}" y="{ly}">{escape(NAMES[str(seg)])}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#444"/></svg>')
    return "".join(out)


__all__ = ["Bar", "CUDA_TERMS", "Line", "SEGMENTS", "svg"]
