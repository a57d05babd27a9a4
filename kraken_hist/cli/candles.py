"""``kraken-hist candles``: print stored candles of any interval; ``kraken-hist refresh``: update aggregates."""

from __future__ import annotations

import csv
import json
import sys
from decimal import ROUND_DOWN, Decimal
from typing import Any, Sequence

import click

from kraken_hist.rules.candles import vwap_at_decimals
from kraken_hist.core.intervals import Interval
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.core.types import HistoricalCandle
from kraken_hist.cli.common import friendly_errors, parse_time_option, resolve_symbols, settings_from

FIELDS = ("time", "open", "high", "low", "close", "volume", "vwap", "trades")


def _price_text(value: Decimal | None, price_decimals: int | None) -> str:
    """A price at the pair's decimals, so one column has one length: REST pads prices with
    zeros (98380.00000) where the archive does not (98655.0). A vwap with more digits (an
    exact aggregate) is rounded down, Kraken's rule; any other value is never rounded."""
    if value is None:
        return ""
    if price_decimals is None:
        return str(value)
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        return str(value)
    at_decimals = value.quantize(Decimal(1).scaleb(-price_decimals), rounding=ROUND_DOWN)
    return str(at_decimals) if at_decimals == value or exponent >= -price_decimals else str(value)


def _row(candle: HistoricalCandle, decimals: int | None) -> list[str]:
    vwap = candle.vwap if candle.vwap is None or decimals is None else vwap_at_decimals(candle.vwap, decimals)
    return [
        candle.time.isoformat(), *(_price_text(v, decimals) for v in (candle.open, candle.high, candle.low, candle.close)),
        str(candle.volume), _price_text(vwap, decimals), str(candle.trades),
    ]


def _show(candles: Sequence[HistoricalCandle], fmt: str, decimals: int | None) -> None:
    rows = [_row(c, decimals) for c in candles]
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
    if start is not None and end is not None and end <= start:  # was: nothing printed, silently
        raise click.BadParameter(f"{end.isoformat()} is not after --start {start.isoformat()}",  # type: ignore[attr-defined]
                                 param_hint="'--end'")
    settings = settings_from(ctx)
    url = prepare_database(None, settings)
    pair = database_registry(url).get(resolve_symbols(settings, url, [symbol])[0])
    symbol = pair.symbol
    with HistoricalDataProvider(url) as provider:
        if start is None:
            series = provider.get_multi_timeframe_candles(
                symbol, end, [interval], last or 20, include_forming=include_forming, fill_quiet=fill_quiet
            )[interval.minutes]
        else:
            series = provider.get_candles(symbol, interval, start, end, include_forming=include_forming,
                                          fill_quiet=fill_quiet)
    _show(series, fmt, pair.price_decimals)


@click.command()
@click.argument("symbol", required=False)
@click.option("--start", callback=parse_time_option, help="Recompute from here regardless of pending changes.")
@click.option("--end", callback=parse_time_option, help="Recompute up to here regardless of pending changes.")
@click.option("--json", "as_json", is_flag=True, help="Print everything the refresh did as JSON.")
@click.pass_context
@friendly_errors
def refresh(ctx: click.Context, symbol: str | None, start: object, end: object, as_json: bool = False) -> None:
    """Update the 5m … 1w aggregates from the 1-minute candles (all symbols, or SYMBOL)."""
    settings = settings_from(ctx)
    url = prepare_database(None, settings)
    result = refresh_aggregates(url, symbol, start, end)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for line in refresh_summary(result):
        click.echo(line)


def refresh_summary(result: Any) -> list[str]:
    """``refreshed BTC/USD, ETH/USD: 42 changes, 310 buckets written, 0 deleted, 0.05 s`` and a line
    per failed symbol (``--json`` has the windows and per-interval counts)."""
    if not result.symbols and not result.changes_consumed:
        head = f"nothing to refresh: the aggregates are current ({result.seconds:.2f} s)"
    else:
        names = ", ".join(result.symbols) if len(result.symbols) <= 5 else f"{len(result.symbols)} symbols"
        counts = ("" if result.timescaledb else
                  f", {sum(result.written.values()):,} buckets written, {sum(result.deleted.values()):,} deleted")
        head = f"refreshed {names or 'all symbols'}: {result.changes_consumed:,} changes{counts}, {result.seconds:.2f} s"
    return [head] + [f"  {symbol} failed: {reason} (its changes stay queued)" for symbol, reason in sorted(result.failed.items())]
