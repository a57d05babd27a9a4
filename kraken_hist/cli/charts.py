"""``kraken-hist chart``: a candlestick chart; ``kraken-hist coverage``: a map of what is stored."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from kraken_hist.query.charts import write_candles_chart, write_coverage_map
from kraken_hist.query.coverage_map import read_coverage_map
from kraken_hist.core.intervals import Interval
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.cli.candles import _interval_option, _time_option
from kraken_hist.cli.common import friendly_errors, resolve_symbols, settings_from


@click.command()
@click.argument("symbol")
@click.option("--interval", "-i", default="1h", show_default=True, callback=_interval_option)
@click.option("--last", type=click.IntRange(min=1), default=200, show_default=True, help="Number of candles.")
@click.option("--end", callback=_time_option, help="The last candle closes by then (default now).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("chart.png"), show_default=True,
              help="A .png (matplotlib) or .html (interactive, plotly) file.")
@click.pass_context
@friendly_errors
def chart(ctx: click.Context, symbol: str, interval: Interval, last: int, end: datetime | None, output: Path) -> None:
    """Draw SYMBOL's last complete candles with their volume."""
    if output.suffix.lower() not in (".png", ".html"):
        raise click.BadParameter("must end in .png or .html", param_hint="--output")
    settings = settings_from(ctx)
    url = prepare_database(None, settings)
    name = resolve_symbols(settings, url, [symbol])[0]
    with HistoricalDataProvider(url) as provider:
        series = provider.get_multi_timeframe_candles(name, end, [interval], last)[interval.minutes]
    if not series:
        raise click.ClickException(f"no complete {interval} candles stored for {name}")
    title = f"{name} {interval}  {series[0].time:%Y-%m-%d %H:%M} - {series[-1].end:%Y-%m-%d %H:%M} UTC"
    write_candles_chart(series, output, title)
    click.echo(f"{output}: {len(series)} candles")


@click.command()
@click.argument("symbols", nargs=-1)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("coverage.png"), show_default=True,
              help="A .png file.")
@click.option("--min-gap-minutes", type=float, default=2.0, show_default=True,
              help="Uncovered stretches shorter than this are not drawn as gaps.")
@click.pass_context
@friendly_errors
def coverage(ctx: click.Context, symbols: tuple[str, ...], output: Path, min_gap_minutes: float) -> None:
    """Draw, per pair (default: every stored one), what each source covered, the days holding
    candles, and the gaps (red)."""
    if output.suffix.lower() != ".png":
        raise click.BadParameter("must end in .png", param_hint="--output")
    settings = settings_from(ctx)
    url = prepare_database(None, settings)
    names = resolve_symbols(settings, url, symbols) if symbols else []
    if not names:
        with HistoricalDataProvider(url) as provider:
            names = provider.get_symbols()
    pairs = read_coverage_map(url, names, min_gap_minutes=min_gap_minutes)
    write_coverage_map(pairs, output)
    gaps = sum(len(spans) for p in pairs for spans in p.gaps.values())
    click.echo(f"{output}: {len(pairs)} pairs, {gaps} gaps")
