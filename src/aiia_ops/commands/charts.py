"""The one chart engine: data → plain SVG (no script, no web font, no external asset).

Used by the status page (one small chart per figure, styled by the page's CSS) and the load
test (panels stacked in one standalone file with its own <style>). A chart is data
(`Chart`: series, thresholds, ticks, labels); `plot()` draws it into a box, `chart_svg()`
makes it a standalone <svg>, `document()` puts several panels in one file.

Class names the drawing uses (styled by whoever embeds it): grid, axis, frame, yl / xl
(tick labels), label (axis names), title, legend, th / th-above (thresholds), empty, note.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
NICE = (1, 2, 2.5, 5, 10)


def esc(text: object) -> str:
    """Text for SVG content or an attribute value."""
    return html.escape(str(text), quote=True)


# --- numbers and ticks -------------------------------------------------------------------


def nice_step(span: float, most: int = 5) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that cuts `span` into at most
    `most` parts."""
    if span <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(span / most))
    for m in NICE:
        if span / (m * exp) <= most * (1 + 1e-9):
            return m * exp
    return 10 * exp  # pragma: no cover (NICE ends at 10)


def value_ticks(top: float, most: int = 5) -> list[float]:
    """Nice ticks from 0 up to the first one at or above `top` (0..1 when there is none)."""
    top = top if top > 0 else 1.0
    step = nice_step(top, most)
    n = max(1, math.ceil(top / step * (1 - 1e-9)))
    return [round(i * step, 10) for i in range(n + 1)]


def nice_max(value: float) -> float:
    """The top of the value axis for `value`."""
    return value_ticks(value)[-1]


def fmt_number(v: float) -> str:
    """A tick label: 2500 → 2.5k, 0.25 → 0.25, 12 → 12."""
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def number_ticks(lo: float, hi: float, most: int = 6) -> list[tuple[float, str]]:
    """Nice numbers between lo and hi, for an x axis of numbers (seconds, users)."""
    step = nice_step(hi - lo, most)
    first = math.ceil(lo / step - 1e-9) * step
    out, i = [], 0
    while (x := round(first + i * step, 10)) <= hi + 1e-9:
        out.append((x, fmt_number(x)))
        i += 1
    return out


def time_ticks(start: float, end: float, step: int, fmt: str) -> list[tuple[float, str]]:
    """Every whole `step` of UTC time after `start` and before `end`, labelled with `fmt`."""
    out, t = [], (start // step + 1) * step
    while t < end:
        out.append((t, _dt.datetime.fromtimestamp(t, _dt.UTC).strftime(fmt)))
        t += step
    return out


# --- what a chart is -----------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]  # None: a gap (no data there)
    colour: str = ""  # "" → the palette, by position
    dashed: bool = False
    area: bool = False  # filled under the line


@dataclass(frozen=True)
class Threshold:
    """A horizontal line with its label at the right; named above the plot when it lies
    beyond the scale (which stretches to show one up to twice the data's top)."""

    value: float
    label: str
    colour: str


@dataclass(frozen=True)
class Chart:
    series: Sequence[Series]
    title: str = ""  # drawn above the plot
    x_label: str = ""
    y_label: str = ""
    unit: str = ""  # after the top value label
    x_range: tuple[float, float] | None = None  # default: the points' own
    x_ticks: Sequence[tuple[float, str]] | None = None  # default: nice numbers
    x_grid: bool = False  # vertical grid lines at the x ticks
    thresholds: Sequence[Threshold] = ()
    headroom: float = 1.05  # the value axis reaches at least peak x headroom
    legend: bool = True
    markers: int = 12  # a dot on every point of a series with at most this many
    empty: str = ""  # said in the middle when there is no value at all
    framed: bool = False  # a frame around the plot (else two axis lines)


@dataclass(frozen=True)
class Box:
    """The plot area inside its SVG, in px."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height


# --- drawing ---------------------------------------------------------------------------


def _colour(s: Series, i: int) -> str:
    return s.colour or COLOURS[i % len(COLOURS)]


def y_scale(chart: Chart) -> list[float]:
    """The value axis' ticks: from the data's peak, stretched for a threshold just above."""
    values = [v for s in chart.series for _, v in s.points if v is not None]
    peak = max(values, default=0.0)
    ticks = value_ticks(peak * chart.headroom)
    for th in chart.thresholds:
        if peak < th.value <= ticks[-1] * 2 and th.value > ticks[-1]:
            ticks = value_ticks(th.value * 1.1)
    return ticks


def runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Consecutive points with a value: one line each, None splits them."""
    out, cur = [], []
    for x, y in points:
        if y is None:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append((x, y))
    if cur:
        out.append(cur)
    return out


def plot(chart: Chart, box: Box) -> list[str]:
    """The chart's SVG elements, its plot area in `box` (labels and legend around it)."""
    xs = [x for s in chart.series for x, _ in s.points]
    x_min, x_max = chart.x_range or (min(xs, default=0.0), max(xs, default=1.0))
    if x_max <= x_min:
        x_max = x_min + 1
    ticks = y_scale(chart)
    y_max = ticks[-1]

    def px(x: float) -> float:
        return box.left + (x - x_min) / (x_max - x_min) * box.width

    def py(y: float) -> float:
        return box.bottom - min(y, y_max) / y_max * box.height

    left, right, top, bottom = box.left, box.right, box.top, box.bottom
    out = []
    if chart.title:
        out.append(
            f'<text x="{left - 50:g}" y="{top - 14:g}" class="title">{esc(chart.title)}</text>'
        )
    if not chart.framed:
        out += [
            f'<line x1="{left:g}" y1="{bottom:g}" x2="{right:g}" y2="{bottom:g}" class="axis"/>',
            f'<line x1="{left:g}" y1="{bottom:g}" x2="{left:g}" y2="{top:g}" class="axis"/>',
        ]
    for i, v in enumerate(ticks):
        unit = f" {esc(chart.unit)}" if chart.unit and i == len(ticks) - 1 else ""
        out.append(
            f'<line x1="{left:g}" x2="{right:g}" y1="{py(v):.1f}" y2="{py(v):.1f}" class="grid"/>'
            f'<text x="{left - 6:g}" y="{py(v) + 4:.1f}" class="yl" text-anchor="end">'
            f"{fmt_number(v)}{unit}</text>"
        )
    x_ticks = chart.x_ticks if chart.x_ticks is not None else number_ticks(x_min, x_max)
    for x, label in x_ticks:
        if chart.x_grid:
            out.append(
                f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top:g}" y2="{bottom:g}" '
                'class="grid"/>'
            )
        out.append(
            f'<text x="{px(x):.1f}" y="{bottom + 16:g}" class="xl" text-anchor="middle">'
            f"{esc(label)}</text>"
        )
    if chart.x_label:
        out.append(
            f'<text x="{left + box.width / 2:g}" y="{bottom + 28:g}" class="label" '
            f'text-anchor="middle">{esc(chart.x_label)}</text>'
        )
    if chart.y_label:
        lx, ly = left - 48, top + box.height / 2
        out.append(
            f'<text x="{lx:g}" y="{ly:g}" class="label" text-anchor="middle" '
            f'transform="rotate(-90 {lx:g} {ly:g})">{esc(chart.y_label)}</text>'
        )
    for i, s in enumerate(chart.series):
        out += _series(s, _colour(s, i), px, py, bottom, chart.markers)
    above = []
    for th in chart.thresholds:
        if th.value > y_max:
            above.append(th.label)
            continue
        y = py(th.value)
        out.append(
            f'<line x1="{left:g}" x2="{right:g}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{esc(th.colour)}" stroke-dasharray="5 4" stroke-width="1.2"/>'
            f'<text x="{right - 4:g}" y="{y - 4:.1f}" class="th" text-anchor="end" '
            f'fill="{esc(th.colour)}">{esc(th.label)}</text>'
        )
    if above:
        out.append(
            f'<text x="{left + 2:g}" y="{top - 6:g}" class="th-above">'
            f"{esc(' · '.join(above))} (above the scale)</text>"
        )
    if chart.legend:
        for i, s in enumerate(chart.series):
            colour, ly, lx = _colour(s, i), top + 4 + 16 * i, right + 14
            dash = ' stroke-dasharray="6 4"' if s.dashed else ""
            out.append(
                f'<line x1="{lx:g}" y1="{ly - 4:g}" x2="{lx + 18:g}" y2="{ly - 4:g}" '
                f'stroke="{esc(colour)}" stroke-width="2"{dash}/>'
                f'<text x="{lx + 24:g}" y="{ly:g}" class="legend">{esc(s.label)}</text>'
            )
    if chart.empty and not any(v is not None for s in chart.series for _, v in s.points):
        out.append(
            f'<text x="{left + box.width / 2:g}" y="{top + box.height / 2:g}" class="empty" '
            f'text-anchor="middle">{esc(chart.empty)}</text>'
        )
    if chart.framed:
        out.append(
            f'<rect x="{left:g}" y="{top:g}" width="{box.width:g}" height="{box.height:g}" '
            'class="frame" fill="none"/>'
        )
    return out


def _series(s: Series, colour: str, px, py, bottom: float, markers: int) -> list[str]:
    out = []
    colour = esc(colour)
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    for run in runs(s.points):
        pts = [(px(x), py(y)) for x, y in run]
        if len(pts) == 1:
            out.append(
                f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="2.2" fill="{colour}"/>'
            )
            continue
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        if s.area:
            area = f"{pts[0][0]:.1f},{bottom:g} {line} {pts[-1][0]:.1f},{bottom:g}"
            out.append(f'<polygon points="{area}" fill="{colour}" fill-opacity="0.12"/>')
        out.append(
            f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.8" '
            f'stroke-linejoin="round"{dash}/>'
        )
        if len(s.points) <= markers:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
    return out


def chart_svg(
    chart: Chart,
    width: int = 520,
    height: int = 210,
    margins: tuple[int, int, int, int] = (58, 10, 22, 28),
    css_class: str = "chart",
) -> str:
    """One chart as a standalone, scalable <svg> (margins: left, right, top, bottom); its
    title becomes the accessible name, not drawn text."""
    left, right, top, bottom = margins
    box = Box(left, top, width - left - right, height - top - bottom)
    name = esc(chart.title)
    body = plot(replace(chart, title=""), box)
    return (
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{name}" '
        f'xmlns="http://www.w3.org/2000/svg" class="{esc(css_class)}">'
        f"<title>{name}</title>" + "".join(body) + "</svg>"
    )


# A standalone file's own style (the status page's CSS styles its charts instead).
STYLE = (
    "<style>text{font-family:sans-serif;fill:#222}.title{font-size:14px;font-weight:bold}"
    ".label,.legend,.note,.th{font-size:11px}.yl,.xl{font-size:10px;fill:#555}.note{fill:#555}"
    ".axis{stroke:#333}.grid{stroke:#ddd}.frame{stroke:#333}.empty{font-size:12px;fill:#777}"
    "</style>"
)

PANEL_MARGINS = (60, 280, 30, 30)  # left, right (the legend), top (the title), bottom


def panel(chart: Chart, x0: float, y0: float, width: float, height: float) -> list[str]:
    """One chart of a document in the rectangle (x0, y0, width, height), legend at right."""
    left, right, top, bottom = PANEL_MARGINS
    return plot(chart, Box(x0 + left, y0 + top, width - left - right, height - top - bottom))


def document(width: int, height: int, title: str, notes: Sequence[str], body: list[str]) -> str:
    """A standalone SVG file: white ground, a title, lines of notes, then the panels."""
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        STYLE,
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="22" class="title" style="font-size:16px">{esc(title)}</text>',
    ]
    head += [
        f'<text x="10" y="{40 + 14 * i}" class="note">{esc(n)}</text>' for i, n in enumerate(notes)
    ]
    return "\n".join([*head, *body, "</svg>"]) + "\n"
