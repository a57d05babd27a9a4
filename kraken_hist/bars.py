"""Information bars from stored trades, in SQL: tick bars (every N trades), volume bars (every V
base units), value bars (every Q quote units).

The rule (one place; ``tests/test_bars.py`` holds a plain-Python twin):

* Trades are taken in Kraken's order (time, then id) from `start`, and a running total is
  kept of the bar's measure — 1 per trade, the volume, or price × volume. A trade belongs to
  bar ``k = floor(total before it / size)``: bar k closes with the trade that makes the total
  reach ``(k + 1) · size``, and the next trade opens the next bar. A trade is never split; a
  trade that carries the total past several thresholds closes one bar (bar numbers then skip).
  Tick bars hold exactly N trades. Bars are fixed to the thresholds of the running total (not
  restarted at each bar), which is what lets SQL compute them without visiting trades one by one.
* A bar is complete when the total over ``[start, end)`` reached its threshold; only complete
  bars are returned unless asked (the last one is usually still forming — no look-ahead).
* Columns: those of a candle (open/close = first/last trade, high, low, volume, trades, vwap)
  plus the first and last trade's id and time. vwap is volume-weighted like every candle
  interval: a minute during which the running total crosses no threshold lies wholly inside
  one bar and counts with its 1-minute vwap (Kraken's rule: Σp·v/Σv rounded down to the pair's
  price decimals); the trades of a minute in which a threshold falls count with their own
  price. So vwap is within one price tick of Σp·v/Σv of the bar's trades.

How it is fast: the minutes of ``[start, end)`` come from the stored 1-minute candles built
from trades (the "minute index"; minutes cut by `start`/`end` are summed from their trades),
so a year is ~525k minute rows, not millions of trades; only the minutes in which a threshold
falls are read trade by trade. Value bars need Σp·v per minute, which candles do not keep, so
they (and ``from_trades=True``) build the minute index from the trades themselves — exact
whatever the candles say, and slower. The candle index is as good as the candles: a minute
whose candle disagrees with its trades is a ``candles`` gap (``kraken-hist gaps`` finds it,
``--fill`` repairs it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
import psycopg

from .timeutils import UTC, floor_minute


class BarKind(str, enum.Enum):
    """What a bar's running total counts."""

    TICK = "tick"  # trades
    VOLUME = "volume"  # base units
    VALUE = "value"  # quote units (price × volume)


@dataclass(frozen=True, slots=True, kw_only=True)
class InformationBar:
    """One bar: candle columns plus its first/last trade. ``time`` is its first trade's time,
    ``end_time`` its last trade's; ``number`` is k (the threshold it closes at is (k+1)·size)."""

    symbol: str
    kind: BarKind
    size: Decimal
    number: int
    time: datetime
    end_time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None
    trades: int
    first_trade_id: int
    last_trade_id: int
    complete: bool


#: Columns of a bar DataFrame, in order (index: UTC ``DatetimeIndex`` named ``time``).
BAR_FRAME_COLUMNS = ("end_time", "open", "high", "low", "close", "volume", "vwap", "trades",
                     "first_trade_id", "last_trade_id", "complete")

# The minute measure and the trade measure of each kind (SQL fragments, never user input).
_MEASURES = {BarKind.TICK: ("n", "1"), BarKind.VOLUME: ("v", "t.volume"), BarKind.VALUE: ("val", "t.price * t.volume")}

#: Per-minute sums of one symbol's trades in ``[lo, hi)`` {where}: the 1-minute candle rule of
#: ``store.MINUTE_CANDLES_FROM_TRADES`` (vwap truncated to the pair's decimals) plus Σp·v.
_MINUTES_FROM_TRADES = """
    SELECT date_trunc('minute', time) AS minute, count(*)::bigint AS n, sum(volume) AS v,
           sum(price * volume) AS val, max(price) AS high, min(price) AS low,
           CASE WHEN sum(volume) > 0 THEN trunc(sum(price * volume) / sum(volume), %(decimals)s) ELSE 0 END AS vwap
    FROM trades
    WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s {where}
    GROUP BY 1"""

#: The same sums read from candles built from trades, for the whole minutes ``[lo_min, hi_min)``
#: (read in key order, so the running total needs no sort) ...
_MINUTES_FROM_CANDLES = """
    SELECT time AS minute, trades::bigint AS n, volume AS v, NULL::numeric AS val, high, low, vwap
    FROM candles
    WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(lo_min)s AND time < %(hi_min)s"""

#: ... and the minutes cut by a `start` or `end` inside them from their trades.
_CUT_MINUTES = "\n    UNION ALL" + _MINUTES_FROM_TRADES.format(where="AND (time < %(lo_min)s OR time >= %(hi_min)s)")

_BARS = """
WITH cum AS (
    SELECT minute, n, v, high, low, vwap, {mx} AS x, sum({mx}) OVER (ORDER BY minute ROWS UNBOUNDED PRECEDING) AS after
    FROM ({minutes}) m
), marked AS MATERIALIZED (
    SELECT minute, n, v, high, low, vwap, after - x AS before,
           floor((after - x) / %(size)s) AS bar, floor(after / %(size)s) AS bar_after
    FROM cum
), whole AS (          -- minutes inside one bar: summed as they are
    SELECT bar, min(minute) AS first_minute, max(minute) AS last_minute, max(high) AS high, min(low) AS low,
           sum(v) AS volume, sum(vwap * v) AS weight, sum(n) AS trades
    FROM marked WHERE bar = bar_after GROUP BY bar
), split AS (          -- minutes in which a threshold falls: trade by trade
    SELECT floor((m.before + sum({tx}) OVER w - {tx}) / %(size)s) AS bar, t.time, t.trade_id, t.price, t.volume
    FROM marked m
    JOIN trades t ON t.symbol = %(symbol)s AND t.time >= m.minute AND t.time < m.minute + interval '1 minute'
                 AND t.time >= %(lo)s AND t.time < %(hi)s
    WHERE m.bar <> m.bar_after
    WINDOW w AS (PARTITION BY m.minute ORDER BY t.time, t.trade_id ROWS UNBOUNDED PRECEDING)
), parts AS (
    SELECT bar,
           min(ARRAY[extract(epoch FROM time) * 1000000, trade_id, price]) AS first,
           max(ARRAY[extract(epoch FROM time) * 1000000, trade_id, price]) AS last,
           max(price) AS high, min(price) AS low, sum(volume) AS volume, sum(price * volume) AS weight,
           count(*) AS trades
    FROM split GROUP BY bar
), bars AS (
    SELECT bar, w.first_minute, w.last_minute,
           timestamptz 'epoch' + p.first[1] * interval '1 microsecond' AS first_time, p.first[2] AS first_id,
           p.first[3] AS first_price,
           timestamptz 'epoch' + p.last[1] * interval '1 microsecond' AS last_time, p.last[2] AS last_id,
           p.last[3] AS last_price,
           greatest(w.high, p.high) AS high, least(w.low, p.low) AS low,
           coalesce(w.volume, 0) + coalesce(p.volume, 0) AS volume,
           coalesce(w.weight, 0) + coalesce(p.weight, 0) AS weight,
           coalesce(w.trades, 0) + coalesce(p.trades, 0) AS trades
    FROM whole w FULL JOIN parts p USING (bar)
)
SELECT b.bar, coalesce(f.time, b.first_time), coalesce(l.time, b.last_time),
       coalesce(f.price, b.first_price), b.high, b.low, coalesce(l.price, b.last_price),
       b.volume, b.weight / nullif(b.volume, 0), b.trades,
       coalesce(f.trade_id, b.first_id::bigint), coalesce(l.trade_id, b.last_id::bigint),
       b.bar < (SELECT max(bar_after) FROM marked)
FROM bars b
-- a bar that opens (closes) with a whole minute: that minute's first (last) trade in [lo, hi)
LEFT JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE b.first_minute < coalesce(b.first_time, 'infinity') AND symbol = %(symbol)s
      AND time >= greatest(b.first_minute, %(lo)s) AND time < least(b.first_minute + interval '1 minute', %(hi)s)
    ORDER BY time, trade_id LIMIT 1) f ON true
LEFT JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE b.last_minute > coalesce(b.last_time, '-infinity') AND symbol = %(symbol)s
      AND time >= greatest(b.last_minute, %(lo)s) AND time < least(b.last_minute + interval '1 minute', %(hi)s)
    ORDER BY time DESC, trade_id DESC LIMIT 1) l ON true
ORDER BY b.bar
"""


def bars_sql(kind: BarKind, *, from_trades: bool, cut_minutes: bool = True) -> str:
    """The bar query for `kind`, its minute index from candles (plus, if `cut_minutes`, the
    minutes cut by the range's ends) or from trades. Parameters: symbol, lo, hi, lo_min,
    hi_min, size, decimals."""
    kind = BarKind(kind)
    mx, tx = _MEASURES[kind]
    if from_trades or kind is BarKind.VALUE:
        minutes = _MINUTES_FROM_TRADES.format(where="")
    else:
        minutes = _MINUTES_FROM_CANDLES + (_CUT_MINUTES if cut_minutes else "")
    return _BARS.format(mx=mx, tx=tx, minutes=minutes)


def check_size(kind: BarKind, size: Decimal | int | str) -> Decimal:
    """The bar size as an exact Decimal: positive and finite; a whole number of trades for tick bars."""
    if isinstance(size, (float, bool)):
        raise ValueError(f"bar size must be a Decimal, int or str (never float), got {size!r}")
    try:
        value = Decimal(size)
    except ArithmeticError:
        raise ValueError(f"bar size is not a number: {size!r}") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"bar size must be positive, got {size!r}")
    if BarKind(kind) is BarKind.TICK and value != value.to_integral_value():
        raise ValueError(f"tick bars need a whole number of trades, got {size!r}")
    return value


def _ceil_minute(when: datetime) -> datetime:
    start = floor_minute(when)
    return start if start == when else start + timedelta(minutes=1)


def read_bars(
    conn: psycopg.Connection[Any],
    symbol: str,
    kind: BarKind,
    size: Decimal,
    lo: datetime,
    hi: datetime,
    *,
    price_decimals: int,
    from_trades: bool = False,
    include_forming: bool = False,
) -> list[InformationBar]:
    """Bars of `symbol`'s trades in ``[lo, hi)`` counted from `lo` (see the module's rule)."""
    kind = BarKind(kind)
    size = check_size(kind, size)
    if hi <= lo:
        return []
    lo_min, hi_min = _ceil_minute(lo), floor_minute(hi)
    if hi_min < lo_min:  # the whole range lies inside one minute
        lo_min = hi_min = floor_minute(lo)
    params = {"symbol": symbol, "lo": lo, "hi": hi, "lo_min": lo_min, "hi_min": hi_min, "size": size,
              "decimals": price_decimals}
    with conn.transaction():
        conn.execute("SET LOCAL jit = off")  # compiling costs more than these scans (planners overestimate them)
        conn.execute("SET LOCAL work_mem = '256MB'")  # the minute window and the piece sums stay in memory
        query = bars_sql(kind, from_trades=from_trades, cut_minutes=(lo, hi) != (lo_min, hi_min))
        rows = conn.execute(query, params).fetchall()
    out = [
        InformationBar(symbol=symbol, kind=kind, size=size, number=int(bar), time=first, end_time=last, open=open_,
                       high=high, low=low, close=close, volume=volume, vwap=vwap, trades=int(trades),
                       first_trade_id=int(first_id), last_trade_id=int(last_id), complete=complete)
        for bar, first, last, open_, high, low, close, volume, vwap, trades, first_id, last_id, complete in rows
    ]
    return out if include_forming else [b for b in out if b.complete]


def bars_to_frame(bars: Sequence[InformationBar], *, exact: bool = False) -> pd.DataFrame:
    """Bars → a DataFrame indexed by the first trade's time (UTC, named ``time``): float64
    prices and volumes unless `exact` (Decimals); ``attrs`` carries symbol, kind and size."""
    index = pd.DatetimeIndex([b.time for b in bars], name="time").tz_convert(UTC) if bars else \
        pd.DatetimeIndex([], tz=UTC, name="time")

    def numbers(name: str) -> pd.Series:
        values = [getattr(b, name) for b in bars]
        if exact:
            return pd.Series(values, index=index, dtype=object)
        return pd.Series([float(v) if v is not None else float("nan") for v in values], index=index, dtype="float64")

    data: dict[str, Any] = {name: numbers(name) for name in ("open", "high", "low", "close", "volume", "vwap")}
    data["end_time"] = pd.Series(pd.to_datetime([b.end_time for b in bars], utc=True), index=index)
    for name in ("trades", "first_trade_id", "last_trade_id"):
        data[name] = pd.Series([getattr(b, name) for b in bars], index=index, dtype="int64")
    data["complete"] = pd.Series([b.complete for b in bars], index=index, dtype=bool)
    frame = pd.DataFrame(data, index=index, columns=list(BAR_FRAME_COLUMNS))
    if bars:
        frame.attrs.update(symbol=bars[0].symbol, kind=bars[0].kind.value, size=str(bars[0].size))
    return frame


__all__ = ["BAR_FRAME_COLUMNS", "BarKind", "InformationBar", "bars_sql", "bars_to_frame", "check_size", "read_bars"]
