"""Interval arithmetic for gap management, and the pure choice of how to fill a gap.

A *range list* is a list of half-open ``(start, end)`` pairs. Every function that returns
one guarantees the invariants, whatever order or overlap its input had:

* sorted by start;
* disjoint and not touching (``a.end < b.start`` for consecutive ranges: touching or
  overlapping input is merged);
* no empty ranges (``start < end``) — so a complete history gives ``[]``.

The functions are generic: datetimes, ints (trade ids as ``[first, last + 1)``), anything
ordered. The database side (``gap_filler``) plans with these before making any call.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from .timeutils import check_aware, floor_minute
from .types import DataGap, GapKind

T = TypeVar("T", bound=Any)
Range = tuple[T, T]

ONE_MINUTE = timedelta(minutes=1)
#: Kraken's OHLC endpoint serves only the 720 most recent candles of an interval.
OHLC_REACH_CANDLES = 720


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sort, merge overlapping or touching ranges, drop empty ones."""
    out: list[Range] = []
    for start, end in sorted((r for r in ranges if r[0] < r[1]), key=lambda r: r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def union(*range_lists: Iterable[Range]) -> list[Range]:
    """Everything in any of the lists."""
    return normalize(r for ranges in range_lists for r in ranges)


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> list[Range]:
    """The parts of `ranges` not in `holes` (one merge-like pass over both sorted lists)."""
    base, cut = normalize(ranges), normalize(holes)
    out: list[Range] = []
    j = 0
    for start, end in base:
        cursor = start
        while j < len(cut) and cut[j][1] <= cursor:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > cursor:
                out.append((cursor, cut[k][0]))
            cursor = max(cursor, cut[k][1])
            if cursor >= end:
                break
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def intersect(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    """The parts present in both lists."""
    left, right = normalize(a), normalize(b)
    out: list[Range] = []
    i = j = 0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if start < end:
            out.append((start, end))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def complement(ranges: Iterable[Range], lo: T, hi: T) -> list[Range]:
    """What ``[lo, hi)`` holds outside `ranges`: the holes of a span."""
    return subtract([(lo, hi)], ranges)


def clip(ranges: Iterable[Range], lo: T | None = None, hi: T | None = None) -> list[Range]:
    """`ranges` cut to ``[lo, hi)`` (an open side when None)."""
    out: list[Range] = []
    for start, end in normalize(ranges):
        start = start if lo is None or start >= lo else lo
        end = end if hi is None or end <= hi else hi
        if start < end:
            out.append((start, end))
    return out


def total(ranges: Iterable[Range], zero: Any = 0) -> Any:
    """Summed length of the (normalized) ranges; pass ``timedelta(0)`` for datetimes."""
    length = zero
    for start, end in normalize(ranges):
        length = length + (end - start)
    return length


def missing_id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Runs ``(first_missing, last_missing)`` between consecutive ids of an ascending sequence.

    The pure twin of the SQL hole finder (``lag(trade_id)`` over the primary key): Kraken's
    trade ids are contiguous per pair, so any jump is exactly the ids that are missing.
    """
    runs: list[tuple[int, int]] = []
    previous: int | None = None
    for trade_id in ids:
        if previous is not None:
            if trade_id <= previous:
                raise ValueError(f"ids must be strictly ascending: {trade_id} after {previous}")
            if trade_id > previous + 1:
                runs.append((previous + 1, trade_id - 1))
        previous = trade_id
    return runs


def minute_runs(minutes: Iterable[datetime]) -> list[Range]:
    """Whole-minute ranges covering the given minute starts, consecutive minutes merged."""
    return normalize((floor_minute(m), floor_minute(m) + ONE_MINUTE) for m in minutes)


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
