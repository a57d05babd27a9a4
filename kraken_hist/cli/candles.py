"""``kraken-hist candles``: print stored candles of any interval; ``kraken-hist refresh``: update aggregates."""

from __future__ import annotations

import csv
import json
import sys
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Sequence

import click

from ..intervals import Interval
from ..pairs import DEFAULT_REGISTRY
from ..provider import HistoricalDataProvider
from ..refresh import refresh_aggregates
from ..types import HistoricalCandle
from .common import friendly_errors, parse_time_option, settings_from

FIELDS = ("time", "open", "high", "low", "close", "volume", "vwap", "trades")


def _vwap_text(vwap: Decimal | None, price_decimals: int) -> str:
    """An aggregated vwap is an exact quotient with dozens of digits; show two more than the
    pair quotes prices in (1-minute vwaps, already at the pair's decimals, stay as they are)."""
    if vwap is None:
        return ""
    digits = price_decimals + 2
    exponent = vwap.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -digits:
        vwap = vwap.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_EVEN)
    return str(vwap)


def _row(candle: HistoricalCandle) -> list[str]:
    decimals = DEFAULT_REGISTRY.get(candle.symbol).price_decimals if DEFAULT_REGISTRY.is_known(candle.symbol) else 8
    return [
        candle.time.isoformat(), str(candle.open), str(candle.high), str(candle.low), str(candle.close),
        str(candle.volume), _vwap_text(candle.vwap, decimals), str(candle.trades),
    ]


def _show(candles: Sequence[HistoricalCandle], fmt: str) -> None:
    rows = [_row(c) for c in candles]
    if fmt == "json":
        # Decimals as strings (exact), trades as a number, a missing vwap as null.
        objects = [dict(zip(FIELDS, r)) | {"vwap": r[6] or None, "trades": c.trades} for r, c in zip(rows, candles)]
        click.echo(json.dumps(objects, indent=2))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows(rows)
    else:
        widths = [max([len(f), *(len(r[i]) for r in rows)]) for i, f in enumerate(FIELDS)]
        click.echo("  ".join(f.ljust(w) if i == 0 else f.rjust(w) for i, (f, w) in enumerate(zip(FIELDS, widths))))
        for r in rows:
            click.echo("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        click.echo(f"({len(rows)} candles)", err=True)


_time_option = parse_time_option  # (the name other commands import)


def _interval_option(_ctx: click.Context, _param: click.Parameter, value: str) -> Interval:
    try:
        return Interval.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("symbol")
@click.option("--interval", "-i", default="1h", show_default=True, callback=_interval_option,
              help="Whole minutes (60) or 1m, 15m, 1h, 4h, 1d, 1w, 3m, 45m, 12h, 2w ...")
@click.option("--start", callback=parse_time_option, help="First bucket start (ISO-8601 or unix seconds, UTC).")
@click.option("--end", callback=parse_time_option, help="Only buckets closed by then (default now).")
@click.option("--last", "last", type=click.IntRange(min=1), help="The N most recent complete candles up to --end.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--include-forming", is_flag=True, help="Also the bucket still forming (from closed minutes only).")
@click.option("--fill-quiet", is_flag=True, help="Fill intervals without trades (volume 0, price = previous close).")
@click.pass_context
@friendly_errors
def candles(ctx: click.Context, symbol: str, interval: Interval, start: object, end: object, last: int | None,
            fmt: str, include_forming: bool, fill_quiet: bool) -> None:
    """Print SYMBOL's candles (any Kraken name: BTC/USD, XBTUSD, XXBTZUSD).

    With neither --start nor --last, shows the last 20. Only complete candles unless
    --include-forming; only intervals that traded unless --fill-quiet.
    """
    if start is not None and last is not None:
        raise click.UsageError("use either --start/--end or --last, not both")
    settings = settings_from(ctx)
    with HistoricalDataProvider(settings=settings) as provider:
        if start is None:
            series = provider.get_multi_timeframe_candles(
                symbol, end, [interval], last or 20, include_forming=include_forming, fill_quiet=fill_quiet
            )[interval.minutes]
        else:
            series = provider.get_candles(symbol, interval, start, end, include_forming=include_forming,
                                          fill_quiet=fill_quiet)
    _show(series, fmt)


@click.command()
@click.argument("symbol", required=False)
@click.option("--start", callback=parse_time_option, help="Recompute from here regardless of pending changes.")
@click.option("--end", callback=parse_time_option, help="Recompute up to here regardless of pending changes.")
@click.pass_context
@friendly_errors
def refresh(ctx: click.Context, symbol: str | None, start: object, end: object) -> None:
    """Update the 5m … 1w aggregates from the 1-minute candles (all symbols, or SYMBOL)."""
    from ..migrate import prepare_database

    settings = settings_from(ctx)
    url = prepare_database(None, settings)
    result = refresh_aggregates(url, symbol, start, end)  # type: ignore[arg-type]
    click.echo(json.dumps(result.to_dict(), indent=2))
