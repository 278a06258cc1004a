"""Predicted accuracy against hours, one line per configuration, as inline SVG
(no JavaScript, no network: the page works offline)."""

from __future__ import annotations

from html import escape

import numpy as np

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


def accuracy_vs_hours_svg(series, target: float, width: int = 640, height: int = 360) -> str:
    """Args:
        series: list of dicts: ``label``, ``hours``, ``accuracy`` (arrays), optionally
            ``low`` and ``high`` (the 80% band, drawn shaded) and ``reached_hours`` (where
            the table says the target is reached: a dot on the target line).
        target: drawn as a dashed horizontal line.

    Returns:
        an ``<svg>`` element as a string.
    """
    left, right, top, bottom = 50, 170, 15, 40
    x_max = max((float(np.max(s["hours"])) for s in series), default=1.0) or 1.0
    sx = lambda h: left + (width - left - right) * h / x_max  # noqa: E731
    sy = lambda a: top + (height - top - bottom) * (1 - a)  # noqa: E731
    parts = [f'<svg id="accuracy-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#888"/>']
    for tick in np.linspace(0, 1, 6):
        parts.append(f'<text x="{left - 5}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    for tick in np.linspace(0, x_max, 5):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 15}" text-anchor="middle">{tick:.2g}</text>')
    parts.append(f'<text x="{(width - right + left) / 2}" y="{height - 5}" text-anchor="middle">hours</text>')
    parts.append(f'<text x="12" y="{(height - bottom) / 2}" transform="rotate(-90 12 {(height - bottom) / 2})" '
                 f'text-anchor="middle">predicted test accuracy</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(target):.1f}" y2="{sy(target):.1f}" '
                 f'stroke="#444" stroke-dasharray="4 3"/>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        label, hours, accuracy = s["label"], s["hours"], s["accuracy"]
        if s.get("low") is not None and s.get("high") is not None:
            outline = list(zip(hours, s["high"])) + list(zip(hours[::-1], s["low"][::-1]))
            band = " ".join(f"{sx(h):.1f},{sy(a):.1f}" for h, a in outline)
            parts.append(f'<polygon class="band" fill="{color}" fill-opacity="0.12" stroke="none" points="{band}"/>')
        points = " ".join(f"{sx(h):.1f},{sy(a):.1f}" for h, a in zip(hours, accuracy))
        parts.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        reached = s.get("reached_hours")
        if reached is not None and np.isfinite(reached):
            parts.append(f'<circle class="reached" cx="{sx(reached):.1f}" cy="{sy(target):.1f}" r="3.5" fill="{color}"/>')
        y = top + 14 * i + 10
        parts.append(f'<line x1="{width - right + 8}" x2="{width - right + 24}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 28}" y="{y}">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
