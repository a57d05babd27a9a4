"""Filling a gap from trades: page the Trades endpoint over it, or rebuild its candles from the
trades already stored.

A trade-id hole is filled when every missing id is stored, refused for good (``bounds``), or
explained by the archive (``ownership``); an uncovered range when the exchange answered up to
its end — storing nothing then proves the range quiet (the page store records the coverage).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from kraken_hist.core.types import DataGap, GapKind, TradeSource
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.gaps.report import GapFill
from kraken_hist.rules import ranges
from kraken_hist.storage import ownership, store
from kraken_hist.storage.db import connect, translate_errors

if TYPE_CHECKING:
    from kraken_hist.ingest.backfill import KrakenTradesBackfill

MICROSECOND = timedelta(microseconds=1)


def rebuild_gap_candles(gap: DataGap, backfill: "KrakenTradesBackfill") -> GapFill:
    """Rebuild the gap's 1-minute candles from the stored trades (no network)."""
    candles = backfill.build_candles_from_trades(gap.symbol, gap.start, gap.end)
    return GapFill(gap=gap, status="filled", method=FillMethod.REBUILD, candles_written=candles)


def fill_from_trades(gap: DataGap, backfill: "KrakenTradesBackfill", db_url: str) -> GapFill:
    """Fetch the gap's trades (since = ns just before its start, up to its end) and store
    them page by page with the backfill's idempotent store; then rebuild the window's
    candles. Raises the exchange's errors (the caller retries)."""
    if gap.kind is GapKind.CANDLES:
        return rebuild_gap_candles(gap, backfill)
    until = gap.end + MICROSECOND if gap.kind is GapKind.TRADE_IDS else gap.end
    after_id = gap.first_missing_id - 1 if gap.first_missing_id is not None else None
    stored = 0
    reached_end = False
    for page in backfill.fetch_all_trades(gap.symbol, gap.start, until, after_id=after_id, covered_from=gap.start):
        trades = page.trades
        if gap.kind is GapKind.TRADE_IDS:
            # keep the stored neighbours' coverage as it is; only the missing ids matter
            trades = [t for t in trades if gap.first_missing_id <= t.trade_id <= gap.last_missing_id]  # type: ignore[operator]
        stored += backfill.store_trades(gap.symbol, trades, source=TradeSource.REST, covered=page.covered,
                                        refused=page.refused)
        reached_end = reached_end or page.reached_until
    candles = backfill.build_candles_from_trades(gap.symbol, gap.start, until)
    done = GapFill(gap=gap, status="filled", method=FillMethod.TRADES, trades_stored=stored, candles_written=candles)
    if gap.kind is GapKind.TRADE_IDS:
        still = count_missing_ids(db_url, gap)
        if still:
            return GapFill(gap=gap, status="failed", method=FillMethod.TRADES, trades_stored=stored,
                           candles_written=candles,
                           reason=f"the exchange did not return {still} of {gap.missing_ids} missing trade ids")
        return done
    if not reached_end:
        return GapFill(gap=gap, status="partial", method=FillMethod.TRADES, trades_stored=stored,
                       candles_written=candles, reason="the exchange has no trades up to the gap's end yet")
    return done if stored else GapFill(gap=gap, status="empty", method=FillMethod.TRADES, candles_written=candles)


def count_missing_ids(db_url: str, gap: DataGap) -> int:
    """Ids of `gap` still missing; none when the rest are the archive's (ownership.py)."""
    with connect(db_url) as conn, translate_errors():
        row = conn.execute(  # the missing ids lie in the gap's time (bounded: TimescaleDB prunes chunks)
            "SELECT count(*) FROM trades WHERE symbol = %(symbol)s AND trade_id BETWEEN %(first)s AND %(last)s "
            "AND time >= %(lo)s AND time <= %(hi)s",
            {"symbol": gap.symbol, "first": gap.first_missing_id, "last": gap.last_missing_id,
             **store.identity_window(gap.start, gap.end)},
        ).fetchone()
        missing = (gap.missing_ids or 0) - int(row[0])  # type: ignore[index]
        if missing:  # a refused id is accounted for: fetching it again gives the same refusal
            missing -= len(store.read_refused_ids(conn, gap.symbol, gap.first_missing_id,  # type: ignore[arg-type]
                                                  gap.last_missing_id))  # type: ignore[arg-type]
        if missing:
            archive = store.read_coverage(conn, gap.symbol, ownership.ARCHIVE_SOURCE)
            by_id = ranges.union(*(store.read_coverage(conn, gap.symbol, s) for s in ownership.ID_SOURCES))
            if ownership.hole_explained((gap.start, gap.end), archive, by_id):
                return 0
    return missing
