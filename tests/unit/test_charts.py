"""The one chart engine, as data: ticks, scales, a series' points, thresholds, escaping."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from aiia_ops.commands import charts as c

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    "top, ticks",
    [
        (0, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),  # nothing yet: 0..1
        (1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (10.8, [0, 2.5, 5, 7.5, 10, 12.5]),
        (4543 * 1.05, [0, 1000, 2000, 3000, 4000, 5000]),
        (0.012, [0, 0.0025, 0.005, 0.0075, 0.01, 0.0125]),
        (100, [0, 20, 40, 60, 80, 100]),
    ],
)
def test_value_ticks_are_nice_and_reach_the_top(top, ticks):
    assert c.value_ticks(top) == ticks
    assert c.nice_max(top) == ticks[-1] >= top


def test_number_and_time_ticks():
    assert c.number_ticks(0, 60) == [(x, str(x)) for x in (0, 10, 20, 30, 40, 50, 60)]
    assert c.number_ticks(3, 7)[0] == (3, "3")
    start = 1764158400.0  # 2025-11-26 12:00 UTC
    assert c.time_ticks(start, start + 4 * 3600, 3600, "%H:%M") == [
        (start + 3600, "13:00"),
        (start + 7200, "14:00"),
        (start + 10800, "15:00"),
    ]


@pytest.mark.parametrize("v, text", [(0, "0"), (2.5, "2.5"), (0.25, "0.25"), (2500, "2.5k"),
                                     (10000, "10k"), (2_000_000, "2M")])  # fmt: skip
def test_tick_labels(v, text):
    assert c.fmt_number(v) == text


def test_a_series_is_a_polyline_through_its_points():
    chart = c.Chart([c.Series("s", [(0, 0), (5, 50), (10, 100)])], legend=False, markers=0)
    out = "".join(c.plot(chart, c.Box(left=10, top=20, width=100, height=100)))
    (points,) = re.findall(r'<polyline points="([^"]+)"', out)
    # x 0..10 → 10..110 px; y 0..100 (axis 0..125: 5 % headroom) → 120..40 px (y grows down)
    assert points == "10.0,120.0 60.0,80.0 110.0,40.0"
    assert "<circle" not in out


def test_gaps_split_a_line_and_a_lone_point_is_a_dot():
    pts = [(0, 1.0), (1, 2.0), (2, None), (3, 4.0), (4, None), (5, 1.0), (6, 2.0)]
    out = "".join(c.plot(c.Chart([c.Series("s", pts)], markers=0), c.Box(0, 0, 60, 60)))
    assert out.count("<polyline") == 2 and out.count("<circle") == 1


def test_few_points_get_markers_and_a_legend_entry_each():
    chart = c.Chart([c.Series("a", [(0, 1), (1, 2)]), c.Series("b", [(0, 2), (1, 1)], dashed=True)])
    out = "".join(c.plot(chart, c.Box(60, 30, 400, 200)))
    assert out.count("<circle") == 4
    assert re.findall(r'class="legend">([^<]+)<', out) == ["a", "b"]
    assert out.count('stroke-dasharray="6 4"') == 2  # b's line and its legend sample
    assert f'stroke="{c.COLOURS[0]}"' in out and f'stroke="{c.COLOURS[1]}"' in out


def test_thresholds_inside_stretched_or_above_the_scale():
    series = [c.Series("p95", [(0, 100.0), (1, 300.0)])]
    warn, crit = c.Threshold(500, "warn 500 ms", "#b7791f"), c.Threshold(2000, "crit", "#c00")
    chart = c.Chart(series, thresholds=[warn, crit], headroom=1.2)
    assert c.y_scale(chart)[-1] == 600  # 500 is within twice 400: the scale shows it
    out = "".join(c.plot(chart, c.Box(0, 20, 100, 100)))
    assert 'stroke="#b7791f" stroke-dasharray="5 4"' in out and "warn 500 ms</text>" in out
    assert "crit (above the scale)" in out


def test_values_beyond_the_axis_are_clipped_to_it():
    chart = c.Chart([c.Series("s", [(0, 1.0), (1, 2.0)])], x_range=(0, 1))
    assert c.y_scale(chart)[-1] == 2.5
    out = "".join(c.plot(chart, c.Box(0, 0, 10, 10)))
    assert "0.0,6.0 10.0,2.0" in out


def test_labels_are_escaped():
    chart = c.Chart(
        [c.Series('<script>"x"</script> & co', [(0, 1), (1, 2)])],
        title="a < b",
        x_ticks=[(0, "<0>")],
        thresholds=[c.Threshold(1e9, "crit > 5 & up", "#c00")],
    )
    svg = c.document(400, 300, "T & <t>", ["note <1>"], c.panel(chart, 0, 0, 400, 300))
    ET.fromstring(svg)  # well-formed XML
    assert "<script" not in svg
    assert "&lt;script&gt;&quot;x&quot;&lt;/script&gt; &amp; co" in svg
    assert "crit &gt; 5 &amp; up (above the scale)" in svg and "&lt;0&gt;" in svg


def test_a_standalone_chart():
    chart = c.Chart([c.Series("x", [(0, None)])], title="p95 <x>", empty="no requests yet",
                    legend=False, framed=True)  # fmt: skip
    svg = c.chart_svg(chart, 520, 210)
    root = ET.fromstring(svg)
    assert svg.startswith('<svg viewBox="0 0 520 210" role="img" aria-label="p95 &lt;x&gt;"')
    assert root.find(f"{SVG}title").text == "p95 <x>"
    assert "no requests yet" in svg and 'class="frame"' in svg and 'class="axis"' not in svg
    assert 'class="title"' not in svg  # the title names the chart, it is not drawn
