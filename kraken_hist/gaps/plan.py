"""The pure choice of how to fill a gap: rebuild locally, page Trades, or fall back to OHLC."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

from kraken_hist.core.timeutils import check_aware, floor_minute
from kraken_hist.core.types import DataGap, GapKind

#: Kraken's OHLC endpoint serves only the 720 most recent candles of an interval.
OHLC_REACH_CANDLES = 720


class FillMethod(str, enum.Enum):
    """How a gap is filled."""

    REBUILD = "rebuild"  # candles rebuilt from stored trades; no network
    TRADES = "trades"  # Trades endpoint from just before the gap to its end, candles rebuilt
    OHLC = "ohlc"  # OHLC endpoint (1m); only inside its reach of the 720 newest candles


def ohlc_reach_start(now: datetime, interval_minutes: int = 1) -> datetime:
    """Oldest candle start the OHLC endpoint still serves at `now` (the unfinished candle
    counts as one of the 720)."""
    width = timedelta(minutes=interval_minutes)
    current = floor_minute(check_aware(now, "now"))
    if interval_minutes > 1:
        epoch_minutes = int(current.timestamp()) // 60
        current -= timedelta(minutes=epoch_minutes % interval_minutes)
    return current - (OHLC_REACH_CANDLES - 1) * width


def within_ohlc_reach(gap: DataGap, now: datetime) -> bool:
    """True when every minute of `gap` is still served by the OHLC endpoint."""
    return floor_minute(gap.start) >= ohlc_reach_start(now)


def choose_fill_method(gap: DataGap, now: datetime, *, trades_unavailable: bool = False) -> FillMethod:
    """Pick how to fill `gap`.

    * candle gaps (trades stored, candle missing or stale): rebuild locally;
    * trade-id holes and uncovered ranges: Trades, because only trades restore the exact
      history (and prove a quiet range empty) — an OHLC candle cannot fill a trade-id hole;
    * when Trades cannot be had (the fill failed for good) and the gap is inside the OHLC
      reach: OHLC, so at least the minutes' candles exist. Outside the reach nothing can.
    """
    if gap.kind is GapKind.CANDLES:
        return FillMethod.REBUILD
    if trades_unavailable and within_ohlc_reach(gap, now):
        return FillMethod.OHLC
    return FillMethod.TRADES
