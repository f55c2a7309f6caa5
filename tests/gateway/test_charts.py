"""The auditors' SVG charts: well-formed, proportional, labelled, safe with any label, and empty."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from gateway.web.charts import Bar, TimeLabels, TimePoint, axis_step, bar_chart, fit, time_chart

SVG = "{http://www.w3.org/2000/svg}"
LABELS = TimeLabels(
    title="Requests and refusals",
    allowed="Allowed",
    refused="Refused",
    y_axis="Requests",
    x_axis="Time (Japan)",
    empty="No records",
)


def parse(svg: str) -> ET.Element:
    """The chart as XML: ElementTree raises on anything that is not well-formed."""
    root = ET.fromstring(svg)  # noqa: S314 - our own output under test, no external entities
    assert root.tag == f"{SVG}svg"
    return root


def rects(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [
        r
        for r in root.iter(f"{SVG}rect")
        if r.get("data-count") and css_class in r.get("class", "")
    ]


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_time_chart_is_well_formed_with_labelled_axes() -> None:
    """The time chart parses as SVG and names both axes, the legend and its title."""
    points = [TimePoint(f"11/26 {h:02d}:00", f"bucket {h}", 10 * h, h) for h in range(1, 7)]
    root = parse(time_chart(points, LABELS))
    shown = texts(root)
    assert {"Requests", "Time (Japan)", "Allowed", "Refused"} <= set(shown)
    assert root.find(f"{SVG}title") is not None
    assert root.find(f"{SVG}title").text == "Requests and refusals"  # type: ignore[union-attr]
    assert "11/26 01:00" in shown
    assert root.get("role") == "img"


def test_time_chart_bars_are_proportional() -> None:
    """Bar heights are proportional to the counts: allowed and refused parts stack per bucket."""
    points = [
        TimePoint("a", "A", total=40, refused=10),
        TimePoint("b", "B", total=20, refused=0),
        TimePoint("c", "C", total=10, refused=10),
    ]
    root = parse(time_chart(points, LABELS))
    allowed = {
        int(r.get("data-count", "0")): float(r.get("height", "0")) for r in rects(root, "bar-allow")
    }
    refused = [
        (int(r.get("data-count", "0")), float(r.get("height", "0")))
        for r in rects(root, "bar-deny")
    ]
    assert set(allowed) == {30, 20}  # 40-10 and 20-0; bucket c has nothing allowed
    assert allowed[30] == pytest.approx(allowed[20] * 1.5, abs=0.2)
    assert [count for count, _ in refused] == [10, 10]
    assert refused[0][1] == pytest.approx(refused[1][1], abs=0.1)
    assert allowed[20] == pytest.approx(refused[0][1] * 2, abs=0.2)


def test_time_chart_axis_reaches_the_highest_bucket() -> None:
    """The tallest bar fits under the axis maximum and the axis labels are whole numbers."""
    points = [TimePoint("a", "A", total=37, refused=5)]
    root = parse(time_chart(points, LABELS))
    ticks = [int(t) for t in texts(root) if t.isdigit()]
    assert max(ticks) >= 37
    assert ticks == sorted(ticks)
    assert 0 in ticks


def test_time_chart_without_data_shows_the_empty_sentence() -> None:
    """No buckets (or only empty ones) draw the axes and the 'no records' sentence, no bars."""
    for points in ([], [TimePoint("a", "A", 0, 0)]):
        root = parse(time_chart(points, LABELS))
        assert "No records" in texts(root)
        assert rects(root, "bar-") == []


def test_refused_never_exceeds_total() -> None:
    """Inconsistent input (more refused than total) cannot draw a bar taller than the total."""
    root = parse(time_chart([TimePoint("a", "A", total=5, refused=9)], LABELS))
    assert [int(r.get("data-count", "0")) for r in rects(root, "bar-deny")] == [5]
    assert rects(root, "bar-allow") == []


def test_bar_chart_lengths_are_proportional_and_linked() -> None:
    """Horizontal bars are as long as their share of the largest value; rows link when asked."""
    bars = [
        Bar("alice@town.example", 12, href="/.tabiji/audit?user=alice%40town.example&a=1"),
        Bar("bob@town.example", 6),
        Bar("carol@town.example", 3),
    ]
    root = parse(bar_chart(bars, title="Most refused users", empty="None", chart_id="users"))
    widths = [float(r.get("width", "0")) for r in rects(root, "bar-deny")]
    assert widths[0] == pytest.approx(widths[1] * 2, abs=0.2)
    assert widths[1] == pytest.approx(widths[2] * 2, abs=0.2)
    links = list(root.iter(f"{SVG}a"))
    assert [a.get("href") for a in links] == ["/.tabiji/audit?user=alice%40town.example&a=1"]
    assert {"12", "6", "3"} <= set(texts(root))


def test_bar_chart_empty() -> None:
    """No rows (or only zeros) give a well-formed chart with the empty sentence."""
    for bars in ([], [Bar("x", 0)]):
        root = parse(bar_chart(bars, title="t", empty="Nothing refused", chart_id="x"))
        assert texts(root) == ["Nothing refused"]
        assert rects(root, "bar-") == []


def test_labels_cannot_inject_markup_or_break_xml() -> None:
    """A hostile label (markup, quotes, control characters) stays text and the SVG stays valid."""
    hostile = '<script>alert(1)</script>"\' onload="x\x00\x1b[31m'
    svg = bar_chart(
        [Bar(hostile, 3, title=hostile, href='/x?a="><script>')],
        title=hostile,
        empty="",
        chart_id='id"><script>',
    )
    root = parse(svg)
    assert "<script" not in svg
    assert not list(root.iter(f"{SVG}script"))
    assert all(not name.startswith("on") for element in root.iter() for name in element.attrib)
    time_svg = time_chart([TimePoint(hostile, hostile, 2, 1)], LABELS)
    parse(time_svg)
    assert "<script" not in time_svg


def test_long_labels_are_shortened_to_fit() -> None:
    """Wide (Japanese) characters count double; shortened labels end with an ellipsis."""
    assert fit("short", 10) == "short"
    assert fit("端末の暗号化が有効ではありません", 10) == "端末の暗…"
    assert fit("abcdefghijkl", 6) == "abcde…"
    root = parse(bar_chart([Bar("x" * 80, 1)], title="t", empty="", chart_id="c"))
    assert any(t.endswith("…") for t in texts(root))
    assert any("x" * 80 in (title.text or "") for title in root.iter(f"{SVG}title"))


@pytest.mark.parametrize(
    ("peak", "step"), [(0, 1), (1, 1), (4, 1), (7, 2), (10, 3), (37, 10), (1000, 250), (9, 3)]
)
def test_axis_step_is_whole_and_covers_the_peak(peak: int, step: int) -> None:
    """The axis step is a whole number and four steps reach the peak."""
    assert axis_step(peak, 4) == step
    assert axis_step(peak, 4) * 4 >= peak
