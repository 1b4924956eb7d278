"""Draw the benchmark's figures as an SVG bar chart, with no plotting library.

Usage: .venv/bin/python scripts/plot_bench.py bench.json docs/performance.svg

Left: throughput of each scenario as a multiple of the pipelined baseline (a), with
issue 14's targets marked. Right: p50 and p99 end-to-end latency at half of each one's saturation.
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path
from typing import Any

import orjson

WIDTH, HEIGHT, TOP, BOTTOM, GAP = 880, 360, 40, 300, 40
PANEL = (WIDTH - 3 * GAP) // 2


def _text(x: float, y: float, text: str, anchor: str = "middle", size: int = 11) -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-family="sans-serif">{escape(text)}</text>')


def _bars(x0: float, title: str, names: list[str], series: list[tuple[str, list[float]]],
          unit: str, marks: list[tuple[float, str]]) -> list[str]:
    top = max([v for _, values in series for v in values] + [m for m, _ in marks]) * 1.15
    scale = (BOTTOM - TOP) / top
    out = [_text(x0 + PANEL / 2, TOP - 18, title, size=13)]
    slot = PANEL / len(names)
    width = slot * 0.7 / len(series)
    colours = ["#4c72b0", "#dd8452"]
    for i, name in enumerate(names):
        for j, (_, values) in enumerate(series):
            height = values[i] * scale
            x = x0 + i * slot + slot * 0.15 + j * width
            out.append(f'<rect x="{x:.1f}" y="{BOTTOM - height:.1f}" width="{width:.1f}" '
                       f'height="{height:.1f}" fill="{colours[j]}"/>')
            out.append(_text(x + width / 2, BOTTOM - height - 4, f"{values[i]:.3g}", size=9))
        out.append(_text(x0 + i * slot + slot / 2, BOTTOM + 16, name))
    for value, label in marks:
        y = BOTTOM - value * scale
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + PANEL}" y2="{y:.1f}" '
                   'stroke="#c44e52" stroke-dasharray="4 3"/>')
        out.append(_text(x0 + PANEL, y - 4, label, anchor="end", size=9))
    out.append(f'<line x1="{x0}" y1="{BOTTOM}" x2="{x0 + PANEL}" y2="{BOTTOM}" stroke="black"/>')
    out.append(_text(x0 - 6, TOP, unit, anchor="end", size=9))
    for j, (label, _) in enumerate(series):
        if len(series) > 1:
            out.append(f'<rect x="{x0 + 10 + j * 70}" y="{BOTTOM + 30}" width="10" '
                       f'height="10" fill="{colours[j]}"/>')
            out.append(_text(x0 + 24 + j * 70, BOTTOM + 39, label, anchor="start", size=10))
    return out


def render(figures: dict[str, Any]) -> str:
    results = figures["results"]
    base = results[0]["rate"]
    names = [r["name"].split()[0] for r in results]
    left = _bars(GAP, "throughput, multiple of (a)", names,
                 [("x(a)", [r["rate"] / base for r in results])], "x(a)",
                 [(0.6, "b >= 0.6"), (0.5, "d >= 0.5"), (0.3, "c3 >= 0.3")])
    right = _bars(2 * GAP + PANEL, "end-to-end latency at half saturation", names,
                  [("p50", [r["p50_ms"] for r in results]),
                   ("p99", [r["p99_ms"] for r in results])], "ms",
                  [(2 * results[0]["p99_ms"], "p99 <= 2 x (a)'s")])
    body = "\n".join(left + right)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}"><rect width="100%" height="100%" fill="white"/>'
            f"\n{body}\n</svg>\n")


def main() -> int:
    source, target = sys.argv[1:3]
    Path(target).write_text(render(orjson.loads(Path(source).read_bytes())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
