"""Line charts as SVG text: every run's learning curve, drawn in about a millisecond.

A run used to draw its curve with matplotlib, whose import and layout took 0.37 s at the end of
every run: 8% of a 65k-step PPO run (bench/ppo.py). The chart a run needs is a few lines on
labelled axes, which SVG states directly; any browser or editor shows it, and it scales without
blur. Reports, which draw many panels and bands, keep matplotlib (``training/report.py``).
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 700, 450
LEFT, RIGHT, TOP, BOTTOM = 80, 20, 40, 60
"""The figure and its margins in pixels: room for tick labels on the left and below, the title above."""
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
"""matplotlib's default cycle, so these charts look like the reports'."""
TARGET_TICKS = 6


def nice_ticks(low: float, high: float, target: int = TARGET_TICKS) -> list[float]:
    """Round tick values covering ``[low, high]``: steps of 1, 2 or 5 times a power of ten.

    >>> nice_ticks(0, 65536)
    [0.0, 20000.0, 40000.0, 60000.0, 80000.0]
    """
    if not high > low:
        low, high = low - 1.0, high + 1.0
    rough = (high - low) / max(1, target - 1)
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(power * factor for factor in (1, 2, 5, 10) if power * factor >= rough)
    first = math.floor(low / step)
    last = math.ceil(high / step)
    return [round(index * step, 12) for index in range(first, last + 1)]


def tick_label(value: float) -> str:
    """Short labels: 60000 as 60k, 0.25 as 0.25, -100 as -100."""
    if abs(value) >= 10_000 and value == round(value):
        for divisor, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= divisor:
                return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def line_chart_svg(curves: dict[str, tuple[list[int], list[float]]], title: str, xlabel: str,
                   ylabel: str) -> str:
    """One SVG line (with point markers) per label of ``curves``, on shared axes, with a legend.

    Non-finite values are left out of their line. With no finite point at all the axes are drawn
    empty, so a caller never has to special-case a run that diverged.
    """
    points = {label: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
              for label, (xs, ys) in curves.items()}
    every = [point for line in points.values() for point in line] or [(0.0, 0.0)]
    x_ticks = nice_ticks(min(x for x, _ in every), max(x for x, _ in every))
    y_ticks = nice_ticks(min(y for _, y in every), max(y for _, y in every))
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_x(x: float) -> float:
        return LEFT + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * plot_width

    def to_y(y: float) -> float:
        return TOP + plot_height - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * plot_height

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT + plot_width / 2:.1f}" y="{TOP - 14}" text-anchor="middle" font-size="14">'
        f'{escape(title)}</text>',
    ]
    for x in x_ticks:
        parts.append(f'<line x1="{to_x(x):.1f}" y1="{TOP}" x2="{to_x(x):.1f}" y2="{TOP + plot_height}" '
                     f'stroke="#ddd"/>')
        parts.append(f'<text x="{to_x(x):.1f}" y="{TOP + plot_height + 18}" text-anchor="middle">'
                     f'{tick_label(x)}</text>')
    for y in y_ticks:
        parts.append(f'<line x1="{LEFT}" y1="{to_y(y):.1f}" x2="{LEFT + plot_width}" y2="{to_y(y):.1f}" '
                     f'stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{to_y(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    parts += [
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#333"/>',
        f'<text x="{LEFT + plot_width / 2:.1f}" y="{HEIGHT - 16}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text transform="translate(18 {TOP + plot_height / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f'{escape(ylabel)}</text>',
    ]
    for index, (label, line) in enumerate(points.items()):
        colour = COLOURS[index % len(COLOURS)]
        coordinates = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in line)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts += [f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in line]
        legend_y = TOP + 16 + 18 * index
        parts.append(f'<line x1="{LEFT + 10}" y1="{legend_y - 4}" x2="{LEFT + 30}" y2="{legend_y - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{LEFT + 36}" y="{legend_y}">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
