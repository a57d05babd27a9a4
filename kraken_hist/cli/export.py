"""``kraken-hist export``: stored trades or candles to Parquet or CSV files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import click
from tqdm import tqdm

from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.query.export import ExportKind, Partition, Piece, export, plan_pieces
from kraken_hist.core.intervals import Interval
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.core.timeutils import utcnow
from kraken_hist.cli.candles import _interval_option, _time_option
from kraken_hist.cli.common import friendly_errors, resolve_symbols, settings_from


def _stored_range(url: str, kind: ExportKind, symbol: str) -> tuple[datetime | None, datetime | None]:
    """Time of the first and last stored row (index probes on (symbol, time))."""
    table = "trades" if kind is ExportKind.TRADES else "candles"
    with connect(url, options="-c TimeZone=UTC") as conn, translate_errors():
        row = conn.execute(f"SELECT min(time), max(time) FROM {table} WHERE symbol = %s", (symbol,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


def default_output(symbol: str, kind: ExportKind, interval: Interval, fmt: str, partitioned: bool) -> Path:
    """``BTC-USD_trades.parquet``, ``BTC-USD_candles_1h/`` (a directory when partitioned)."""
    stem = f"{symbol.replace('/', '-')}_{kind.value}" + (f"_{interval}" if kind is ExportKind.CANDLES else "")
    return Path(stem if partitioned else f"{stem}.{fmt}")


@click.command("export")
@click.argument("symbol")
@click.option("--kind", type=click.Choice([k.value for k in ExportKind]), default="trades", show_default=True)
@click.option("--interval", "-i", default="1m", show_default=True, callback=_interval_option,
              help="Candle interval (--kind candles): 1m, 5m, 1h, 1d, 45m, ...")
@click.option("--start", callback=_time_option, help="From here (default: the first stored row).")
@click.option("--end", callback=_time_option, help="Up to here, exclusive (default now; candles: complete ones).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
@click.option("--partition", type=click.Choice([p.value for p in Partition]), default="auto", show_default=True,
              help="One file per day or month (auto: months when the range is longer than 31 days).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="File, or directory when partitioned (default: SYMBOL_KIND[_INTERVAL][.FORMAT]).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
@friendly_errors
def export_command(ctx: click.Context, symbol: str, kind: str, interval: Interval, start: datetime | None,
                   end: datetime | None, fmt: str, partition: str, output: Path | None, progress: bool) -> None:
    """Write SYMBOL's stored trades or candles to Parquet or CSV (exact decimals) and print a
    JSON summary (files, rows, bytes, seconds)."""
    settings = settings_from(ctx)
    what = ExportKind(kind)
    url = prepare_database(None, settings)
    name = resolve_symbols(settings, url, [symbol])[0]
    first, last = _stored_range(url, what, name)
    if first is None or last is None:
        raise click.ClickException(f"nothing stored for {name}")
    # Without --end, through the newest stored row (never past now); candles: complete buckets.
    if what is ExportKind.CANDLES:
        hi = interval.bucket_start(min(end if end is not None else interval.bucket_end(last), utcnow()))
        lo = interval.bucket_start(first) if start is None else interval.first_bucket_at_or_after(start)
    else:
        hi = min(end if end is not None else last + timedelta(microseconds=1), utcnow())
        lo = start if start is not None else first
    if lo >= hi:
        raise click.ClickException(f"nothing stored for {name} in that range")
    if Partition(partition) is Partition.AUTO and output is not None and output.suffix == f".{fmt}":
        partition = Partition.NONE.value  # asked for one file by name
    target = output or default_output(name, what, interval, fmt, len(plan_pieces(lo, hi, partition)) > 1)
    bar = tqdm(desc=f"export {name} {what.value}", unit=" rows", disable=not progress, leave=False)

    def on_progress(piece: Piece, rows: int) -> None:
        bar.set_postfix_str(piece.label or "")
        bar.update(rows)

    try:
        result = export(url, name, what, lo, hi, target, fmt=fmt, partition=partition, interval=interval,
                        on_progress=on_progress)
    finally:
        bar.close()
    click.echo(json.dumps(result.to_dict(), indent=2))
