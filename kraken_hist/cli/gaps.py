"""``kraken-hist gaps [SYMBOL...] [--fill]``: list the holes in stored data, optionally fill them."""

from __future__ import annotations

import json
from typing import Any

import click
from tqdm import tqdm

from kraken_hist.gaps.filler import GapFill, GapFiller, GapFillReport
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.core.types import DataGap, GapKind
from kraken_hist.cli.common import friendly_errors, parse_time_option, resolve_symbols, settings_from


def _row(gap: DataGap) -> tuple[str, ...]:
    ids = (f"{gap.first_missing_id}..{gap.last_missing_id} ({gap.missing_ids})"
           if gap.kind in (GapKind.TRADE_IDS, GapKind.REFUSED) else "")
    return (gap.symbol, gap.kind.value, gap.start.strftime("%Y-%m-%d %H:%M:%S"),
            gap.end.strftime("%Y-%m-%d %H:%M:%S"), f"{gap.minutes:.1f}", ids)


def format_table(gaps: list[DataGap]) -> str:
    """Gaps as an aligned text table."""
    header = ("symbol", "kind", "start (UTC)", "end (UTC)", "minutes", "missing trade ids")
    rows = [header] + [_row(g) for g in gaps]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def format_report(report: GapFillReport) -> str:
    lines = []
    for name, r in sorted(report.symbols.items()):
        lines.append(
            f"{name}: {r.found} found, {r.filled} filled, {r.verified_empty} verified empty, "
            f"{len(r.failed)} failed; {r.trades_stored} trades stored, {r.candles_written} candles written"
        )
        lines.extend(f"  failed {g.kind.value} {g.start.isoformat()}: {reason}" for g, reason in r.failed)
    return "\n".join(lines) or "nothing to fill"


@click.command()
@click.argument("symbols", nargs=-1)
@click.option("--fill", is_flag=True, help="Fill the gaps found (Trades, OHLC or a local candle rebuild).")
@click.option("--since", callback=parse_time_option, help="Only look at data from this time on (ISO date/time, UTC, or unix seconds).")
@click.option("--min-gap-minutes", type=float, default=2.0, show_default=True,
              help="Ignore uncovered time ranges shorter than this (trade-id holes are always reported).")
@click.option("--concurrency", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Gaps filled at once (all share the REST pace).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar while filling.")
@click.option("--verify-candles", is_flag=True,
              help="Compare every 1-minute candle with its trades field by field (finds a hand-edited candle "
                   "whose trade count is unchanged; reads all the trades). Default: counts, then the days "
                   "whose counts disagree.")
@click.pass_context
@friendly_errors
def gaps(ctx: click.Context, symbols: tuple[str, ...], fill: bool, since: Any, min_gap_minutes: float,
         concurrency: int, as_json: bool, progress: bool, verify_candles: bool = False) -> None:
    """Find holes in the stored trades and candles of SYMBOL... (default: every stored symbol).

    A gap is a jump in Kraken's contiguous trade ids, a time range no source covered, or a
    minute whose candle disagrees with its stored trades. Quiet markets are not gaps. Trades
    Kraken sent with impossible values are listed as "refused": accounted for, never fetched.
    """
    settings = settings_from(ctx)
    wanted = resolve_symbols(settings, prepare_database(settings=settings), symbols) if symbols else None
    start = since
    with GapFiller(symbols=wanted, settings=settings) as service:
        scans = service.scan(min_gap_minutes, since=start, verify_candles=verify_candles)
        found = [g for scan in scans for g in scan.gaps]
        refused = [g for scan in scans for g in scan.refused]  # not missing: shown, never filled
        if as_json and not fill:
            click.echo(json.dumps([_gap_dict(g) for g in found + refused], indent=2))
            return
        if not as_json:
            click.echo(format_table(found + refused) if found or refused else "no gaps")
        if not fill:
            return
        bar = tqdm(total=len(found), unit="gap", desc="filling", disable=not progress or not found)

        def advance(result: GapFill) -> None:
            bar.update(1)
            bar.set_postfix(symbol=result.gap.symbol, last=result.status)

        try:
            report = service.fill_all_gaps(concurrency, gaps=found, on_fill=advance)
        finally:
            bar.close()
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if report.failed:
        ctx.exit(1)


def _gap_dict(gap: DataGap) -> dict[str, object]:
    return {
        "symbol": gap.symbol, "kind": gap.kind.value, "start": gap.start.isoformat(), "end": gap.end.isoformat(),
        "first_missing_id": gap.first_missing_id, "last_missing_id": gap.last_missing_id,
    }
