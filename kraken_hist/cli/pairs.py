"""``kraken-hist pairs``: every pair the database knows, under all its names, with what is stored."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from typing import Any

import click

from kraken_hist.storage.db import connect
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.storage.pair_store import database_registry, matches, read_pairs, resolver_for, write_pairs
from kraken_hist.core.pairs import Pair
from kraken_hist.cli.common import friendly_errors, settings_from

# Per pair from the daily candles (small whatever the history): trades and the stored range.
_STORED = """
SELECT symbol, sum(trades), min(time), max(time) FROM candles_1d GROUP BY symbol
"""


def _stored(url: str) -> dict[str, tuple[int, Any, Any]]:
    with contextlib.closing(connect(url, autocommit=True)) as conn:
        return {row[0]: (int(row[1] or 0), row[2], row[3]) for row in conn.execute(_STORED)}


def _as_dict(pair: Pair, stored: tuple[int, Any, Any] | None) -> dict[str, Any]:
    trades, first, last = stored or (0, None, None)
    return {
        "symbol": pair.symbol, "altname": pair.altname, "rest_key": pair.rest_key, "wsname": pair.wsname,
        "price_decimals": pair.price_decimals, "decimals_inferred": pair.decimals_inferred,
        "lot_decimals": pair.lot_decimals, "status": pair.status, "origin": pair.origin,
        "trades": trades, "first_day": first.date().isoformat() if first else None,
        "last_day": last.date().isoformat() if last else None,
    }


def _set_decimals(url: str, spec: str) -> Pair:
    """``SYMBOL=N``: correct a pair's price decimals (one inferred from a file), rebuild its
    1-minute candles (their vwap is rounded to those decimals) and its aggregates."""
    from kraken_hist.storage import ownership
    from kraken_hist.storage import store
    from kraken_hist.storage.refresh import refresh_aggregates

    name, _, value = spec.partition("=")
    if not value.strip().isdigit():
        raise click.BadParameter(f"expected SYMBOL=DECIMALS, got {spec!r}", param_hint="--set-decimals")
    with contextlib.closing(connect(url, autocommit=True)) as conn:
        known = {p.symbol: p for p in read_pairs(conn)}
        pair = next((p for p in known.values() if name.strip().upper() in p.names()), None)
        if pair is None:
            raise click.BadParameter(f"no stored pair is named {name!r}", param_hint="--set-decimals")
        fixed = Pair(**{**{f: getattr(pair, f) for f in pair.__slots__}, "price_decimals": int(value),  # type: ignore[attr-defined]
                        "decimals_inferred": False})
        with conn.transaction():
            ownership.lock_symbol(conn, pair.symbol)
            write_pairs(conn, [fixed])
            span = conn.execute("SELECT min(time), max(time) FROM trades WHERE symbol = %s", (pair.symbol,)).fetchone()
        database_registry(url).add(fixed)
        if span and span[0] is not None:
            with conn.transaction():
                ownership.lock_symbol(conn, pair.symbol)
                store.rebuild_candles(conn, pair.symbol, span[0], span[1] + timedelta(microseconds=1),
                                      decimals=fixed.price_decimals)
    refresh_aggregates(url, pair.symbol)
    return fixed


@click.command("pairs")
@click.option("--refresh", is_flag=True, help="Fetch Kraken's AssetPairs now and store every pair it lists.")
@click.option("--search", "search", metavar="TEXT", help="Only pairs with a name containing TEXT (or matching a "
              "pattern such as '*/USD').")
@click.option("--set-decimals", "set_decimals", metavar="SYMBOL=N",
              help="Correct a pair's price decimals (e.g. one inferred from an archive file); its candles are rebuilt.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def pairs(ctx: click.Context, refresh: bool, search: str | None, set_decimals: str | None, as_json: bool) -> None:
    """List the pairs the database knows: every name, decimals, status, stored trades and range.

    The table fills itself from Kraken's AssetPairs the first time a name is not known (and
    again once it is older than KRAKEN_HIST_PAIRS_MAX_AGE seconds); pairs Kraken no longer
    lists come from archive file names (status 'inferred', decimals read off the file's
    prices, marked '~'). Use --set-decimals to correct such a pair.
    """
    settings = settings_from(ctx)
    url = prepare_database(settings=settings)
    if refresh:
        count = resolver_for(settings, url).refresh()
        click.echo(f"pair table refreshed: Kraken lists {count} pairs", err=True)
    if set_decimals:
        fixed = _set_decimals(url, set_decimals)
        click.echo(f"{fixed.symbol}: price decimals {fixed.price_decimals}; candles rebuilt", err=True)
    with contextlib.closing(connect(url, autocommit=True)) as conn:
        known = read_pairs(conn)
    stored = _stored(url)
    chosen = [p for p in known if search is None or matches(search, p)]
    rows = [_as_dict(p, stored.get(p.symbol)) for p in chosen]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no pair matches {search!r}" if search else "no pairs known")
        return
    header = ("symbol", "altname", "rest key", "wsname", "dec", "status", "trades", "from", "to")
    table = [header] + [
        (r["symbol"], r["altname"], r["rest_key"], r["wsname"] or "-",
         f"{r['price_decimals']}{'~' if r['decimals_inferred'] else ''}", r["status"], f"{r['trades']:,}",
         r["first_day"] or "-", r["last_day"] or "-")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo(f"{len(rows)} of {len(known)} pairs", err=True)
