"""A minute's exact summary of a set of trades: what its 1-minute candle is made of.

The writer keeps one per touched minute while a batch is open and, for the last few minutes,
one of what is stored; two summaries of disjoint sets of trades merge into the summary of
their union, so a flush can write a minute's candle without reading its trades again. Sums
are exact (no rounding, ever), and Decimal exponents follow PostgreSQL's numeric scales, so
the vwap the database divides out of them is the very one a rebuild from the trades gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal

#: add and multiply never round here (unbounded precision in practice): candle sums are exact
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
_ONE = Decimal(1)
_add = EXACT.add


@dataclass(slots=True, eq=False)
class MinuteSums:
    """Count, Σvolume, Σprice·volume, high, low, and the first and last trade by (time, id)."""

    trades: int
    volume: Decimal
    notional: Decimal
    high: Decimal
    low: Decimal
    first_time: datetime
    first_id: int
    first_price: Decimal
    last_time: datetime
    last_id: int
    last_price: Decimal

    @classmethod
    def of_trade(cls, when: datetime, trade_id: int, price: Decimal, volume: Decimal,
                 notional: Decimal) -> "MinuteSums":
        """The summary of one trade (`notional`: its exact price·volume)."""
        return cls(1, volume, notional, price, price, when, trade_id, price, when, trade_id, price)

    def add(self, when: datetime, trade_id: int, price: Decimal, volume: Decimal, notional: Decimal) -> None:
        """Take one more trade in (in place; trades arrive mostly in order, so the last-trade
        test comes first)."""
        self.trades += 1
        self.volume = _add(self.volume, volume)
        self.notional = _add(self.notional, notional)
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        last = self.last_time
        if when > last or (when == last and trade_id > self.last_id):
            self.last_time, self.last_id, self.last_price = when, trade_id, price
        else:
            first = self.first_time
            if when < first or (when == first and trade_id < self.first_id):
                self.first_time, self.first_id, self.first_price = when, trade_id, price

    def merged(self, other: "MinuteSums") -> "MinuteSums":
        """The summary of the union of two disjoint sets of trades (a new one)."""
        first = self if (self.first_time, self.first_id) <= (other.first_time, other.first_id) else other
        last = self if (self.last_time, self.last_id) >= (other.last_time, other.last_id) else other
        return MinuteSums(self.trades + other.trades, _add(self.volume, other.volume),
                          _add(self.notional, other.notional), max(self.high, other.high),
                          min(self.low, other.low), first.first_time, first.first_id, first.first_price,
                          last.last_time, last.last_id, last.last_price)


#: {symbol: {minute number: MinuteSums}}
BatchSums = dict[str, dict[int, MinuteSums]]


def plain(value: Decimal) -> Decimal:
    """`value` with a non-positive exponent, as PostgreSQL stores it (``6E+4`` → ``60000``), so
    Python's exponents of sums and products match PostgreSQL's numeric scales."""
    return value.quantize(_ONE, context=EXACT) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def sums_size(sums: BatchSums | None) -> int:
    """How many minute summaries `sums` holds (what the spool's memory bound counts)."""
    return sum(len(minutes) for minutes in sums.values()) if sums else 0
