"""Charts and the coverage map: files rendered, and what they draw is what is stored."""

import base64
import json
import re
from datetime import datetime, timedelta, timezone

import matplotlib.dates as mdates
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kraken_hist.query import charts

from kraken_hist.storage import store
from kraken_hist.cli.main import cli
from kraken_hist.query.coverage_map import merge_days, read_coverage_map
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.testing.history import generate_trades

from .trade_data import store_trades

UTC = timezone.utc
T0 = datetime(2025, 3, 3, tzinfo=UTC)


@pytest.fixture
def hours(db_url, conn):
    """Thirty hours of SOL/USD trades, refreshed; returns the stored 1h candles (plain SQL)."""
    store_trades(conn, generate_trades("SOL/USD", T0, T0 + timedelta(hours=30), seed=6, trades_per_minute=3))
    refresh_aggregates(db_url)
    return conn.execute("SELECT time, open, high, low, close, volume FROM candles_1h WHERE symbol = 'SOL/USD' "
                        "ORDER BY time").fetchall()


def env(db_url, tmp_path):
    return {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data")}


def test_png_chart_draws_the_stored_candles(db_url, hours, tmp_path):
    out = tmp_path / "chart.png"
    run = CliRunner().invoke(cli, ["chart", "SOLUSD", "-i", "1h", "--last", "12", "-o", str(out)], env=env(db_url, tmp_path))
    assert run.exit_code == 0, run.output
    assert "12 candles" in run.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 700) and out.stat().st_size > 20_000
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in (charts.UP, charts.DOWN):  # rising and falling bodies are both there
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 30).sum() > 200

    # what the picture is made of: bodies (open..close), wicks (low..high), volume bars
    last = hours[-12:]
    with HistoricalDataProvider(db_url) as provider:
        figure = charts.draw_candles(provider.get_latest_candles("SOL/USD", "1h", 12), "t")
    price_ax, volume_ax = figure.axes
    bodies = [(p.get_x() + p.get_width() / 2, p.get_y(), p.get_y() + p.get_height()) for p in price_ax.patches]
    wicks = [seg for seg in price_ax.collections[0].get_segments()]
    volumes = [p.get_height() for p in volume_ax.patches]
    assert len(bodies) == len(wicks) == len(volumes) == 12
    for (x, lo, hi), wick, volume, row in zip(bodies, wicks, volumes, last):
        when, open_, high, low, close, vol = row
        assert mdates.num2date(x) == when + timedelta(minutes=30)
        assert (lo, hi) == pytest.approx((float(min(open_, close)), float(max(open_, close))))
        assert (wick[0][1], wick[1][1]) == pytest.approx((float(low), float(high)))
        assert volume == pytest.approx(float(vol))


def _plotly_data(html):
    """The traces passed to Plotly.newPlot in a written HTML file (typed arrays decoded)."""
    start = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html).end()
    traces, _end = json.JSONDecoder().raw_decode(html, start)

    def plain(value):
        if isinstance(value, dict) and "bdata" in value:
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
        return value

    return [{k: plain(v) for k, v in trace.items()} for trace in traces]


def test_html_chart_holds_the_stored_candles(db_url, hours, tmp_path):
    out = tmp_path / "chart.html"
    run = CliRunner().invoke(cli, ["chart", "SOL/USD", "-i", "1h", "--last", "20", "-o", str(out)],
                             env=env(db_url, tmp_path))
    assert run.exit_code == 0, run.output
    html = out.read_text()
    assert out.stat().st_size > 1_000_000  # plotly.js inlined: opens offline
    candles, volume = _plotly_data(html)
    last = hours[-20:]
    assert [datetime.fromisoformat(x) for x in candles["x"]] == [r[0] for r in last]
    for name, column in (("open", 1), ("high", 2), ("low", 3), ("close", 4)):
        assert candles[name] == [float(r[column]) for r in last]
    assert volume["y"] == [float(r[5]) for r in last]


def test_chart_refuses_other_outputs_and_empty_series(db_url, tmp_path):
    run = CliRunner().invoke(cli, ["chart", "SOL/USD", "-o", str(tmp_path / "x.jpg")], env=env(db_url, tmp_path))
    assert run.exit_code == 2 and ".png or .html" in run.output
    run = CliRunner().invoke(cli, ["chart", "SOL/USD", "-o", str(tmp_path / "x.png")], env=env(db_url, tmp_path))
    assert run.exit_code == 1 and "no complete 1h candles" in run.output


def test_merge_days_joins_consecutive_days():
    days = [datetime(2025, 1, d, tzinfo=UTC) for d in (5, 1, 2, 3, 2)]
    assert merge_days(days) == [(days[1], days[0] - timedelta(days=1)), (days[0], days[0] + timedelta(days=1))]


def test_coverage_map_draws_sources_candle_days_and_gaps(db_url, conn, tmp_path):
    trades = generate_trades("BTC/USD", T0, T0 + timedelta(days=2), seed=3, trades_per_minute=1)
    kept = [t for t in trades if not 100 <= t.trade_id < 120]  # a hole of 20 trade ids
    store_trades(conn, kept)
    rest = (T0, T0 + timedelta(days=1, hours=6))
    ws = (T0 + timedelta(days=1, hours=6), kept[-1].time + timedelta(seconds=1))
    store.add_coverage(conn, "BTC/USD", "rest", *rest)
    store.add_coverage(conn, "BTC/USD", "ws", *ws)
    conn.commit()
    hole = (trades[98].time, trades[120].time)  # between the stored neighbours of the missing ids

    pairs = read_coverage_map(db_url, ["BTC/USD"])
    figure = charts.draw_coverage(pairs)
    ax = figure.axes[0]
    drawn = {}
    for collection in ax.collections:
        spans = [(mdates.num2date(p.vertices[:, 0].min()), mdates.num2date(p.vertices[:, 0].max()))
                 for p in collection.get_paths()]
        drawn[collection.get_label()] = spans
    days = [(T0, T0 + timedelta(days=2))]
    close = lambda spans, want: len(spans) == len(want) and all(  # noqa: E731 - matplotlib dates are float days
        abs((a - c).total_seconds()) < 1 and abs((b - d).total_seconds()) < 1 for (a, b), (c, d) in zip(spans, want))
    assert set(drawn) == {"BTC/USD coverage rest", "BTC/USD coverage ws", "BTC/USD candles", "BTC/USD gap trade_ids"}
    assert close(drawn["BTC/USD coverage rest"], [rest]) and close(drawn["BTC/USD coverage ws"], [ws])
    assert close(drawn["BTC/USD candles"], days)
    assert len(drawn["BTC/USD gap trade_ids"]) == 1
    (lo, hi), = drawn["BTC/USD gap trade_ids"]
    assert hole[0] - timedelta(seconds=1) <= lo and hi <= hole[1] + timedelta(seconds=1)

    out = tmp_path / "coverage.png"
    run = CliRunner().invoke(cli, ["coverage", "-o", str(out)], env=env(db_url, tmp_path))
    assert run.exit_code == 0, run.output
    assert run.output.strip() == f"{out}: 1 pairs, 1 gaps"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] == 1200 and out.stat().st_size > 10_000
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels - np.array([0xCC, 0, 0])).sum(axis=1) < 30).sum() > 10
