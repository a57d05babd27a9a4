"""Exchange candles (imported OHLCVT rows of intervals above a minute) against our aggregates
over the same buckets, field by field."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql

from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import EPOCH
from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage.db import connect
from kraken_hist.storage.pair_store import database_registry

#: Where Kraken's OHLC buckets start, for every interval: the epoch (a Thursday, so its weeks
#: start on Thursdays, where ours start on Mondays).
EXCHANGE_ORIGIN = EPOCH

@dataclass(frozen=True, slots=True)
class CandleMismatch:
    """One bucket where the exchange's candle and ours differ (None: that side has no candle)."""

    time: datetime
    fields: tuple[str, ...]
    exchange: dict[str, Any] | None
    ours: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(), "fields": list(self.fields),
                "exchange": {k: str(v) for k, v in self.exchange.items()} if self.exchange else None,
                "ours": {k: str(v) for k, v in self.ours.items()} if self.ours else None}


@dataclass(frozen=True, slots=True, kw_only=True)
class CandleComparison:
    """Exchange candles (OHLCVT import) against our aggregates over the same buckets."""

    symbol: str
    interval: int
    compared: int  # buckets present on either side
    matching: int
    mismatched: int  # both sides present, some field differs
    missing_ours: int  # the exchange has a candle, we have none
    missing_exchange: int  # we have a candle, the exchange none
    examples: tuple[CandleMismatch, ...] = ()

    @property
    def ok(self) -> bool:
        return self.compared == self.matching

    def to_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "interval": self.interval, "compared": self.compared,
                "matching": self.matching, "mismatched": self.mismatched, "missing_ours": self.missing_ours,
                "missing_exchange": self.missing_exchange, "ok": self.ok,
                "examples": [m.to_dict() for m in self.examples]}


_FIELDS = ("open", "high", "low", "close", "volume", "trades")


def _ours_query(interval: int, use_relation: bool) -> sql.Composable:
    """Our candles of `interval` in the exchange's buckets: the stored relation where its
    buckets are the exchange's, else computed from 1-minute candles by the bucket rule
    (``rules.sql.bucket_columns``) from the exchange's origin.

    Kraken's buckets start at the epoch (its weeks on Thursdays); our weekly relation starts
    on Mondays (``Interval.origin``, a convention, KRAKEN.md), so weekly buckets are always
    computed: like is compared with like."""
    if use_relation and interval in INTERVAL_RELATIONS and Interval(interval).origin == EXCHANGE_ORIGIN:
        return sql.SQL("SELECT time, open, high, low, close, volume, trades FROM {} "
                       "WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s").format(
            sql.Identifier(INTERVAL_RELATIONS[interval]))
    return sql.SQL(
        """SELECT date_bin(make_interval(mins => %(interval)s), p.time, %(origin)s) AS time, {columns}
           FROM candles p WHERE p.symbol = %(symbol)s AND p.time >= %(lo)s AND p.time < %(hi)s
           GROUP BY 1""").format(columns=sql.SQL(sql_rules.bucket_columns(1).strip()))


def compare_exchange_candles(
    db_url: str,
    symbol: str,
    interval: int,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    use_relation: bool = True,
    max_examples: int = 20,
    registry: PairRegistry | None = None,
) -> CandleComparison:
    """Compare ``exchange_candles`` of `interval` (imported OHLCVT rows) with our candles of
    the same buckets: the stored relation of that interval (``use_relation``, after a
    refresh) or buckets computed from 1-minute candles (always, and for 720 which is not
    stored). Compares open, high, low, close, volume and trade count, exactly."""
    symbol = (registry if registry is not None else database_registry(db_url)).normalize(symbol)
    with contextlib.closing(connect(db_url, autocommit=True)) as conn:
        lo, hi = conn.execute(
            "SELECT min(time), max(time) FROM exchange_candles WHERE symbol = %s AND interval = %s "
            "AND (%s::timestamptz IS NULL OR time >= %s) AND (%s::timestamptz IS NULL OR time < %s)",
            (symbol, interval, start, start, end, end),
        ).fetchone()
        if lo is None:
            return CandleComparison(symbol=symbol, interval=interval, compared=0, matching=0, mismatched=0,
                                    missing_ours=0, missing_exchange=0)
        hi = hi + timedelta(minutes=interval)
        query = sql.SQL(
            """WITH ex AS (SELECT time, open, high, low, close, volume, trades FROM exchange_candles
                           WHERE symbol = %(symbol)s AND interval = %(interval)s
                             AND time >= %(lo)s AND time < %(hi)s),
                    ours AS ({ours})
               SELECT coalesce(ex.time, ours.time), ex.open, ex.high, ex.low, ex.close, ex.volume, ex.trades,
                      ours.time IS NOT NULL, ours.open, ours.high, ours.low, ours.close, ours.volume, ours.trades,
                      ex.time IS NOT NULL
               FROM ex FULL JOIN ours ON ours.time = ex.time ORDER BY 1""").format(ours=_ours_query(interval, use_relation))
        params = {"symbol": symbol, "interval": interval, "lo": lo, "hi": hi, "origin": EXCHANGE_ORIGIN}
        counts = {"compared": 0, "matching": 0, "mismatched": 0, "missing_ours": 0, "missing_exchange": 0}
        examples: list[CandleMismatch] = []
        with conn.transaction(), conn.cursor(name="csv_compare") as cur:
            cur.execute(query, params)
            for row in cur:
                counts["compared"] += 1
                theirs = dict(zip(_FIELDS, row[1:7])) if row[14] else None
                ours = dict(zip(_FIELDS, row[8:14])) if row[7] else None
                if theirs is None or ours is None:
                    counts["missing_ours" if ours is None else "missing_exchange"] += 1
                    differing = _FIELDS
                else:
                    differing = tuple(f for f in _FIELDS if theirs[f] != ours[f])
                    if not differing:
                        counts["matching"] += 1
                        continue
                    counts["mismatched"] += 1
                if len(examples) < max_examples:
                    examples.append(CandleMismatch(row[0], differing, theirs, ours))
    return CandleComparison(symbol=symbol, interval=interval, examples=tuple(examples), **counts)
