"""Pictures of stored data: a candlestick chart with volume (PNG with matplotlib, interactive HTML
with plotly) and a coverage map (PNG) of what is stored per pair, by source, and where the gaps are.

Drawing only: the callers read the candles (``HistoricalDataProvider``) and the coverage
(``coverage_map``). matplotlib is used through its object API on the Agg canvas (no pyplot,
no global figure state), so charts can be drawn from any thread. Both libraries come with the
``charts`` extra: ``pip install 'kraken-hist[charts]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from kraken_hist.query.coverage_map import PairCoverage
from kraken_hist.core.errors import ConfigurationError
from kraken_hist.core.types import HistoricalCandle

UP, DOWN = "#26a69a", "#ef5350"  # rising / falling candle colours (the common convention)
LANE_COLOURS = {"coverage csv": "#8e7cc3", "coverage rest": "#3d85c6", "coverage ws": "#6aa84f",
                "coverage ohlc": "#b7b7b7", "candles": "#f1c232"}
GAP_COLOUR = "#cc0000"


def _need(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ConfigurationError(f"charts need {module.split('.')[0]}: pip install 'kraken-hist[charts]'") from exc


def _figure(width: float, height: float) -> Any:
    figure_module = _need("matplotlib.figure")
    return figure_module.Figure(figsize=(width, height), dpi=100, layout="constrained")


def draw_candles(candles: Sequence[HistoricalCandle], title: str) -> Any:
    """A matplotlib Figure: candlesticks (wick low..high, body open..close) over a volume panel."""
    dates = _need("matplotlib.dates")
    figure = _figure(12, 7)
    price_ax, volume_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if candles:
        width = candles[0].interval / 1440 * 0.7  # days, as matplotlib dates count
        x = [dates.date2num(c.time + timedelta(minutes=c.interval) / 2) for c in candles]
        colours = [UP if c.close >= c.open else DOWN for c in candles]
        price_ax.vlines(x, [float(c.low) for c in candles], [float(c.high) for c in candles], colors=colours,
                        linewidth=1)
        bottoms = [float(min(c.open, c.close)) for c in candles]
        heights = [float(abs(c.close - c.open)) for c in candles]
        price_ax.bar(x, heights, width=width, bottom=bottoms, color=colours, edgecolor=colours, linewidth=0.5)
        volume_ax.bar(x, [float(c.volume) for c in candles], width=width, color=colours)
    price_ax.set_title(title)
    price_ax.set_ylabel("price")
    price_ax.grid(alpha=0.3)
    volume_ax.set_ylabel("volume")
    volume_ax.grid(alpha=0.3)
    volume_ax.xaxis_date()
    volume_ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(volume_ax.xaxis.get_major_locator()))
    return figure


def candles_figure_html(candles: Sequence[HistoricalCandle], title: str) -> Any:
    """A plotly Figure: candlesticks over volume bars, sharing the time axis."""
    go = _need("plotly.graph_objects")
    subplots = _need("plotly.subplots")
    figure = subplots.make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25],
                                    vertical_spacing=0.03)
    times = [c.time.isoformat() for c in candles]
    figure.add_trace(go.Candlestick(
        x=times, open=[float(c.open) for c in candles], high=[float(c.high) for c in candles],
        low=[float(c.low) for c in candles], close=[float(c.close) for c in candles], name="price",
        increasing_line_color=UP, decreasing_line_color=DOWN), row=1, col=1)
    figure.add_trace(go.Bar(x=times, y=[float(c.volume) for c in candles], name="volume",
                            marker_color=[UP if c.close >= c.open else DOWN for c in candles]), row=2, col=1)
    figure.update_layout(title=title, xaxis_rangeslider_visible=False, showlegend=False, template="plotly_white")
    return figure


def write_candles_chart(candles: Sequence[HistoricalCandle], path: Path | str, title: str) -> Path:
    """Draw `candles` to `path`: ``.png`` (matplotlib) or ``.html`` (plotly, self-contained:
    plotly.js is inlined, so the file opens offline)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".html":
        candles_figure_html(candles, title).write_html(target, include_plotlyjs=True, full_html=True)
    elif suffix == ".png":
        draw_candles(candles, title).savefig(target)
    else:
        raise ValueError(f"chart output must end in .png or .html, got {target.name!r}")
    return target


def draw_coverage(pairs: Sequence[PairCoverage], title: str = "coverage") -> Any:
    """A matplotlib Figure: one band per pair, one lane per source's coverage, days with
    candles, and each kind of gap (red), along a shared time axis."""
    dates = _need("matplotlib.dates")
    lanes = [(pair.symbol, label, spans) for pair in pairs for label, spans in pair.lanes()]
    figure = _figure(12, max(2.5, 0.35 * len(lanes) + 1.5))
    ax = figure.subplots()
    labels = []
    for row, (symbol, label, spans) in enumerate(lanes):
        colour = GAP_COLOUR if label.startswith("gap") else LANE_COLOURS.get(label, "#999999")
        bars = [(dates.date2num(lo), max(dates.date2num(hi) - dates.date2num(lo), 1e-6)) for lo, hi in spans]
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour, label=f"{symbol} {label}")
        if label.startswith("gap"):  # a tick at each gap, so a minute-long hole shows on a year's axis
            ax.plot([x + width / 2 for x, width in bars], [row] * len(bars), linestyle="none", marker="|",
                    markersize=14, color=colour)
        labels.append(f"{symbol}  {label}")
    ax.set_yticks(range(len(lanes)), labels)
    ax.invert_yaxis()
    ax.set_title(title if lanes else f"{title}: nothing stored")
    ax.grid(axis="x", alpha=0.3)
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    return figure


def write_coverage_map(pairs: Sequence[PairCoverage], path: Path | str, title: str = "coverage") -> Path:
    """Draw the coverage map to a ``.png`` file."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"coverage map output must end in .png, got {target.name!r}")
    draw_coverage(pairs, title).savefig(target)
    return target


__all__ = ["candles_figure_html", "draw_candles", "draw_coverage", "write_candles_chart", "write_coverage_map"]
