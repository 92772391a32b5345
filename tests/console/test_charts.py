"""The console's server-drawn SVG charts: names from the ledger (a team, a model, a use case anyone may set)
are escaped, and each chart says its figures to a screen reader."""

from keel.console import charts


def test_labels_from_the_ledger_are_escaped():
    evil = '<script>alert(1)</script>"'
    for svg in (charts.bars([(evil, 2.0), ("b", 1.0)], "cost by use case", " USD"),
                charts.series([(evil, 1.0), ("2026-12-02", 3.0)], evil)):
        assert "<script>" not in svg and "&lt;script&gt;" in svg
        assert svg.startswith('<svg class="chart"') and 'role="img"' in svg


def test_bars_keep_the_seven_largest_and_sum_the_rest():
    svg = charts.bars([(f"m{i}", float(i)) for i in range(1, 11)], "requests by model")
    assert "m10" in svg and "m4" in svg and "m3:" not in svg.split("aria-label")[1].split('"')[1]
    assert "other: 6" in svg  # 1 + 2 + 3


def test_an_empty_period_says_so():
    assert "No requests in this period." in charts.series([], "requests")
