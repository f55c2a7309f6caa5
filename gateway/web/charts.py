"""Server-rendered SVG charts for the auditors' view: pure functions from numbers to SVG text.

No script, no inline style (the pages' CSP forbids both): presentation attributes and classes
styled by audit.css only. Imports only the standard library.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# The geometry of the time chart (SVG user units; the CSS scales the whole picture to fit).
_TIME_WIDTH = 960
_TIME_HEIGHT = 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 34, 52
_Y_TICKS = 4
_MAX_X_LABELS = 6
# The bar charts: one row per item, the label column measured in half-width character cells.
_BAR_WIDTH = 420
_ROW = 24
_BAR_TOP = 10
_LABEL_CELLS = 26
_LABEL_WIDTH = 200
_VALUE_WIDTH = 46


@dataclass(frozen=True, slots=True)
class TimePoint:
    """One time bucket: every request in it and how many of those were refused."""

    label: str  # under the axis, e.g. "11/26 09:00"
    title: str  # the bucket's full description, shown as the bar's tooltip
    total: int
    refused: int


@dataclass(frozen=True, slots=True)
class Bar:
    """One row of a horizontal bar chart; `href` (optional) links the row, e.g. to a filter."""

    label: str
    value: int
    title: str = ""  # the tooltip: the full label when the shown one is shortened
    href: str | None = None


@dataclass(frozen=True, slots=True)
class TimeLabels:
    """The words of the time chart, in the reader's language (from the message catalogue)."""

    title: str
    allowed: str
    refused: str
    y_axis: str
    x_axis: str
    empty: str


def _text(value: str) -> str:
    """Escape for XML text and attributes; drop characters XML 1.0 cannot carry (§2.2)."""
    clean = "".join(
        c
        if c in "\t\n" or (unicodedata.category(c) not in ("Cc", "Cs") and c != "\ufffe")
        else "\ufffd"
        for c in value
    )
    return escape(clean, quote=True)


def _cells(character: str) -> int:
    """How many half-width cells a character takes: two for wide (e.g. kanji), else one."""
    return 2 if unicodedata.east_asian_width(character) in ("W", "F") else 1


def fit(text: str, cells: int) -> str:
    """`text` shortened with an ellipsis so that it takes at most `cells` half-width cells."""
    if sum(_cells(c) for c in text) <= cells:
        return text
    kept, used = [], 0
    for character in text:
        width = _cells(character)
        if used + width > cells - 1:
            break
        kept.append(character)
        used += width
    return "".join(kept) + "…"


def axis_step(peak: int, ticks: int) -> int:
    """The whole-number tick step (1, 2, 2.5, 3, 4 or 5 × 10ⁿ) whose `ticks` steps reach `peak`."""
    need = max(peak, 1) / ticks
    magnitude = 10 ** math.floor(math.log10(need)) if need >= 1 else 1
    for factor in (1, 2, 2.5, 3, 4, 5, 10):
        step = factor * magnitude
        if step >= need and step == int(step):
            return int(step)
    return int(10 * magnitude)  # pragma: no cover - factor 10 always qualifies


def _number(value: float) -> str:
    """SVG coordinates with at most one decimal: small, exact enough, deterministic."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def time_chart(points: Sequence[TimePoint], labels: TimeLabels) -> str:
    """Stacked bars over time: allowed below, refused on top; labelled axes, legend, tooltips.

    Bar heights are proportional to the counts against a rounded axis maximum. With no points
    (or only empty buckets) the axes are still drawn, with the `empty` sentence in the middle.
    """
    width, height = _TIME_WIDTH, _TIME_HEIGHT
    plot_w = width - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM
    base = _TOP + plot_h
    peak = max((max(p.total, p.refused) for p in points), default=0)
    step = axis_step(peak, _Y_TICKS)
    top = step * _Y_TICKS
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-time" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="chart-time-title">',
        f'<title id="chart-time-title">{_text(labels.title)}</title>',
    ]
    # The y axis: gridlines and counts at even steps of the rounded maximum.
    for tick in range(_Y_TICKS + 1):
        y = base - plot_h * tick / _Y_TICKS
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" '
            f'y1="{_number(y)}" y2="{_number(y)}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{_number(y + 4)}" '
            f'text-anchor="end">{step * tick}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{base}"/>'
        f'<line class="axis" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{base}" y2="{base}"/>'
        f'<text class="axis-label" x="14" y="{_number(_TOP + plot_h / 2)}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_number(_TOP + plot_h / 2)})">{_text(labels.y_axis)}</text>'
        f'<text class="axis-label" x="{_number(_LEFT + plot_w / 2)}" y="{height - 6}" '
        f'text-anchor="middle">{_text(labels.x_axis)}</text>'
    )
    # The legend, top right.
    legend_x = width - _RIGHT - 250
    parts.append(
        f'<rect class="bar-allow" x="{legend_x}" y="8" width="12" height="12"/>'
        f'<text class="legend" x="{legend_x + 16}" y="18">{_text(labels.allowed)}</text>'
        f'<rect class="bar-deny" x="{legend_x + 110}" y="8" width="12" height="12"/>'
        f'<text class="legend" x="{legend_x + 126}" y="18">{_text(labels.refused)}</text>'
    )
    if peak == 0:
        parts.append(
            f'<text class="empty" x="{_number(_LEFT + plot_w / 2)}" '
            f'y="{_number(_TOP + plot_h / 2)}" text-anchor="middle">{_text(labels.empty)}</text>'
        )
    else:
        slot = plot_w / len(points)
        bar_w = max(slot * 0.8, 1.0)
        every = max(1, math.ceil(len(points) / _MAX_X_LABELS))
        for index, point in enumerate(points):
            x = _LEFT + slot * index + (slot - bar_w) / 2
            refused = min(max(point.refused, 0), max(point.total, 0))
            allowed = max(point.total, 0) - refused
            allowed_h = plot_h * allowed / top
            refused_h = plot_h * refused / top
            tooltip = f"{point.title}: {labels.allowed} {allowed}, {labels.refused} {refused}"
            parts.append(f'<g class="bucket"><title>{_text(tooltip)}</title>')
            if allowed:
                parts.append(
                    f'<rect class="bar-allow" x="{_number(x)}" '
                    f'y="{_number(base - allowed_h)}" width="{_number(bar_w)}" '
                    f'height="{_number(allowed_h)}" data-count="{allowed}"/>'
                )
            if refused:
                parts.append(
                    f'<rect class="bar-deny" x="{_number(x)}" '
                    f'y="{_number(base - allowed_h - refused_h)}" width="{_number(bar_w)}" '
                    f'height="{_number(refused_h)}" data-count="{refused}"/>'
                )
            parts.append("</g>")
            if index % every == 0:
                parts.append(
                    f'<text class="tick" x="{_number(x + bar_w / 2)}" y="{base + 16}" '
                    f'text-anchor="middle">{_text(point.label)}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: Sequence[Bar], *, title: str, empty: str, chart_id: str) -> str:
    """Horizontal bars, longest first as given; each bar's length is proportional to its value.

    Labels are shortened to fit their column (the full text stays in the tooltip); `chart_id`
    keeps the accessible-name ids unique when several charts share a page.
    """
    rows = [bar for bar in bars if bar.value > 0]
    height = _BAR_TOP * 2 + _ROW * max(len(rows), 1)
    plot_w = _BAR_WIDTH - _LABEL_WIDTH - _VALUE_WIDTH
    safe_id = "".join(c for c in chart_id if c.isascii() and (c.isalnum() or c in "-_"))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-bars" '
        f'viewBox="0 0 {_BAR_WIDTH} {height}" role="img" aria-labelledby="{safe_id}-title">',
        f'<title id="{safe_id}-title">{_text(title)}</title>',
    ]
    if not rows:
        parts.append(
            f'<text class="empty" x="{_BAR_WIDTH // 2}" y="{_BAR_TOP + _ROW // 2 + 4}" '
            f'text-anchor="middle">{_text(empty)}</text></svg>'
        )
        return "".join(parts)
    peak = max(bar.value for bar in rows)
    for index, bar in enumerate(rows):
        y = _BAR_TOP + _ROW * index
        length = plot_w * bar.value / peak
        tooltip = f"{bar.title or bar.label}: {bar.value}"
        row = (
            f"<title>{_text(tooltip)}</title>"
            f'<text class="bar-label" x="{_LABEL_WIDTH - 6}" y="{y + 16}" '
            f'text-anchor="end">{_text(fit(bar.label, _LABEL_CELLS))}</text>'
            f'<rect class="bar-deny" x="{_LABEL_WIDTH}" y="{y + 4}" '
            f'width="{_number(max(length, 1.0))}" height="{_ROW - 8}" data-count="{bar.value}"/>'
            f'<text class="bar-value" x="{_number(_LABEL_WIDTH + max(length, 1.0) + 4)}" '
            f'y="{y + 16}">{bar.value}</text>'
        )
        if bar.href is not None:
            parts.append(f'<a class="bar-row" href="{_text(bar.href)}">{row}</a>')
        else:
            parts.append(f'<g class="bar-row">{row}</g>')
    parts.append("</svg>")
    return "".join(parts)
