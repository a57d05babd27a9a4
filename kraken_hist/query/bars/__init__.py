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
  price. The bar's vwap is handed out like every interval's: at the pair's price decimals,
  rounded down (``rules.candles.vwap_at_decimals``) — within one price tick of Σp·v/Σv of its trades.

How it is fast: the minutes of ``[start, end)`` come from the stored 1-minute candles built
from trades (the "minute index"), so a year is ~525k minute rows, not millions of trades: one
ordered pass keeps the running total and sums the minutes in which no threshold falls per bar.
Only the minutes in which a threshold falls — and the minutes cut by `start` and `end` — are
read trade by trade. Value bars need Σp·v per minute, which candles do not keep, so they (and
``from_trades=True``) build the minute index from the trades themselves — exact whatever the
candles say, and slower. The candle index is as good as the candles: a minute whose candle
disagrees with its trades is a ``candles`` gap (``kraken-hist gaps`` finds it, ``--fill``
repairs it). A long range from the candle index is cut into as many pieces as the server gives
one parallel query processes, computed at once on the caller's connection and others opened like
it, in one snapshot; a later piece's running total starts from the sum of the range before it
(from the same candles), and a bar two pieces share is joined.

Rooms: ``sql`` (the query and how a range is read), ``pieces`` (a range in pieces at
once); this module holds the records, the entry point and the DataFrame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import repeat
from typing import Any

import pandas as pd
import psycopg

from kraken_hist.core.timeutils import UTC
from kraken_hist.query.bars import pieces as bars_pieces
from kraken_hist.query.bars import sql as bar_query
from kraken_hist.query.bars.sql import BarKind, Row, bars_sql


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

#: A range at least this long (from the candle index) is computed in pieces at once.
PARALLEL_SPAN = timedelta(days=14)

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
    parallel_span: timedelta | None = PARALLEL_SPAN,
) -> list[InformationBar]:
    """Bars of `symbol`'s trades in ``[lo, hi)`` counted from `lo` (see the module's rule), vwap
    at `price_decimals`. A range of at least `parallel_span` (None: never) from the candle index
    is cut into as many pieces as the server gives one parallel query, computed at once on
    connections opened like `conn`."""
    kind = BarKind(kind)
    size = check_size(kind, size)
    if hi <= lo:
        return []
    candles = not (from_trades or kind is BarKind.VALUE)
    fixed = {"symbol": symbol, "size": size, "decimals": price_decimals}
    rows: list[Row] | None = None
    # not inside a transaction of the caller's: other connections would not see its writes
    if candles and parallel_span is not None and hi - lo >= parallel_span \
            and conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE:
        cuts = bars_pieces.cut_points(conn, lo, hi)
        if len(cuts) > 2:
            rows = bars_pieces.read_pieces(conn, kind, fixed, cuts)
    if rows is None:
        params = fixed | bar_query.query_ranges(lo, hi, candles=candles)
        with conn.transaction():
            query = bars_sql(kind, from_trades=from_trades, first_cut=params["f_hi"] > lo)
            rows = bar_query.run_query(conn, query, params)
    return _bars(symbol, kind, size, rows if include_forming else [r for r in rows if r[13]])


#: InformationBar's slots in the order of a row (weight, the row's 9th column, has none).
_ROW_FIELDS = ("number", "time", "end_time", "open", "high", "low", "close", "volume", None, "vwap", "trades",
               "first_trade_id", "last_trade_id", "complete")


def _bars(symbol: str, kind: BarKind, size: Decimal, rows: list[Row]) -> list[InformationBar]:
    """InformationBars from rows, column by column: each slot's setter mapped over its column
    (the provider's way with candles; the keyword call of a frozen dataclass costs twice as much)."""
    out = list(map(object.__new__, repeat(InformationBar, len(rows))))
    columns: list[Iterable[Any]] = [repeat(symbol), repeat(kind), repeat(size), *zip(*rows)] if rows else []
    consume = deque(maxlen=0).extend
    for name, values in zip(("symbol", "kind", "size", *_ROW_FIELDS), columns):
        if name is not None:
            consume(map(getattr(InformationBar, name).__set__, out, values))
    return out


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
