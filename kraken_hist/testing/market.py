"""The fake exchange's state: trade histories per pair and a controllable clock.

Shared by the fake REST and WebSocket servers so both tell the same story. Only trades at
or before the clock's "now" are visible, so a test can let time pass (and trades appear)
without sleeping. ``append`` adds live trades.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from kraken_hist.core.timeutils import EPOCH, check_aware, utcnow
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade
from kraken_hist.testing.history import trade_time_ns
from kraken_hist.testing.universe import Universe, default_universe

Clock = Callable[[], datetime]


class ManualClock:
    """A clock that only moves when told to; thread-safe. Call it to read the time."""

    def __init__(self, start: datetime) -> None:
        self._lock = threading.Lock()
        self._now = check_aware(start, "start")

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = check_aware(when, "when")

    def advance(self, delta: timedelta | float) -> datetime:
        """Move forward by `delta` (a timedelta or seconds); returns the new time."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        with self._lock:
            self._now += step
            return self._now


def _micros(when: datetime) -> int:
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class _Book:
    """One pair's trades plus sorted keys for bisecting (microseconds and reported ns)."""

    __slots__ = ("trades", "micros", "ns")

    def __init__(self) -> None:
        self.trades: list[HistoricalTrade] = []
        self.micros: list[int] = []
        self.ns: list[int] = []

    def extend(self, symbol: str, trades: Iterable[HistoricalTrade]) -> None:
        for trade in trades:
            if trade.symbol != symbol:
                raise ValueError(f"trade {trade.trade_id} is for {trade.symbol}, not {symbol}")
            if self.trades:
                previous = self.trades[-1]
                if trade.trade_id != previous.trade_id + 1:
                    raise ValueError(
                        f"{symbol}: trade id {trade.trade_id} does not follow {previous.trade_id} "
                        "(Kraken's ids are contiguous)"
                    )
                if trade.time < previous.time:
                    raise ValueError(f"{symbol}: trade {trade.trade_id} is older than the one before it")
            self.trades.append(trade)
            self.micros.append(_micros(trade.time))
            self.ns.append(trade_time_ns(trade.time))


class FakeMarket:
    """Trade histories by canonical symbol, seen through an injected clock (default: real time)."""

    def __init__(
        self,
        histories: Mapping[str, list[HistoricalTrade]],
        clock: Clock | None = None,
        *,
        universe: Universe | None = None,
        generate: Callable[[str], list[HistoricalTrade]] | None = None,
    ) -> None:
        """`histories` by any name the fake lists; `generate` makes the history of any other
        pair of `universe` the first time it is asked for (a whole market without building
        hundreds of histories up front)."""
        self._lock = threading.Lock()
        self._clock: Clock = clock or utcnow
        self.universe = universe or default_universe()
        self._generate = generate
        self._books: dict[str, _Book] = {}
        for name, trades in histories.items():
            symbol = self.canonical(name)
            book = _Book()
            book.extend(symbol, trades)
            self._books[symbol] = book

    # --- time and pairs -------------------------------------------------------------------

    def now(self) -> datetime:
        """The market's current time (aware UTC)."""
        return check_aware(self._clock(), "clock()")

    def canonical(self, name: str) -> str:
        """The v2 name of any name the fake lists (KeyError for others)."""
        listing = self.universe.find(name)
        if listing is None:
            raise KeyError(f"the fake exchange lists no pair {name!r}")
        return listing.symbol

    def symbols(self) -> list[str]:
        """Pairs with a history (every pair of the universe when histories are generated)."""
        with self._lock:
            if self._generate is not None:
                return sorted(set(self._books) | set(self.universe.symbols()))
            return sorted(self._books)

    def has(self, symbol: str) -> bool:
        with self._lock:
            return symbol in self._books or (self._generate is not None and symbol in self.universe.listings)

    def has_history_source(self, symbol: str) -> bool:
        """Whether the pair's past is generated on demand (its book must be made before appending)."""
        return self._generate is not None and symbol in self.universe.listings

    def _book(self, symbol: str) -> _Book:
        """The pair's book (caller holds the lock), generated on first use when it can be."""
        book = self._books.get(symbol)
        if book is None:
            if self._generate is None or symbol not in self.universe.listings:
                raise KeyError(symbol)
            book = self._books[symbol] = _Book()
            book.extend(symbol, self._generate(symbol))
        return book

    # --- trades ---------------------------------------------------------------------------

    def append(self, symbol: str, trades: Iterable[HistoricalTrade]) -> None:
        """Add newer trades (live trading); ids must continue the pair's sequence."""
        canonical = self.canonical(symbol)
        with self._lock:
            if canonical not in self._books and not self.has_history_source(canonical):
                self._books[canonical] = _Book()
            book = self._book(canonical)
            book.extend(canonical, list(trades))

    def next_trade_id(self, symbol: str) -> int:
        """The id the pair's next trade gets."""
        with self._lock:
            canonical = self.canonical(symbol)
            book = self._book(canonical) if canonical in self._books or self._generate else None
            return book.trades[-1].trade_id + 1 if book and book.trades else 1

    def trades(self, symbol: str, start: datetime | None = None, end: datetime | None = None) -> list[HistoricalTrade]:
        """Visible trades (time <= now) in ``[start, end)``, oldest first."""
        with self._lock:
            book = self._book(symbol)
            hi = self._visible(book)
            lo = 0 if start is None else bisect_left(book.micros, _micros(check_aware(start)), 0, hi)
            if end is not None:
                hi = bisect_left(book.micros, _micros(check_aware(end)), lo, hi)
            return book.trades[lo:hi]

    def trades_since(
        self, symbol: str, since_ns: int | None, count: int, *, inclusive: bool = False
    ) -> list[tuple[HistoricalTrade, int]]:
        """Up to `count` visible trades with reported time > `since_ns` (>= when `inclusive`),
        each with its nanosecond time; with `since_ns` None the `count` most recent."""
        with self._lock:
            book = self._book(symbol)
            hi = self._visible(book)
            if since_ns is None:
                lo = max(0, hi - count)
            else:
                find = bisect_left if inclusive else bisect_right
                lo = find(book.ns, since_ns, 0, hi)
            stop = min(hi, lo + count)
            return list(zip(book.trades[lo:stop], book.ns[lo:stop]))

    def last_trade_before(self, symbol: str, when: datetime) -> HistoricalTrade | None:
        """The newest visible trade strictly before `when`."""
        with self._lock:
            book = self._book(symbol)
            index = bisect_left(book.micros, _micros(check_aware(when)), 0, self._visible(book))
            return book.trades[index - 1] if index else None

    def _visible(self, book: _Book) -> int:
        return bisect_right(book.micros, _micros(self.now()))

    # --- candles --------------------------------------------------------------------------

    def candles(self, symbol: str, interval: int, start: datetime, end: datetime) -> list[HistoricalCandle]:
        """Candles of the minutes/buckets in ``[start, end)`` that hold visible trades, by
        Kraken's rule (vwap rounded down to the pair's decimals). Buckets are aligned to the
        epoch, as Kraken's OHLC endpoint aligns them. Quiet buckets are absent."""
        seconds = interval * 60
        decimals = self.universe.get(symbol).price_decimals
        out: list[HistoricalCandle] = []
        bucket: list[HistoricalTrade] = []
        bucket_key: int | None = None
        for trade in self.trades(symbol, start, end):
            key = _micros(trade.time) // 1_000_000 // seconds
            if key != bucket_key and bucket:
                out.append(_candle(symbol, interval, bucket_key, bucket, decimals))  # type: ignore[arg-type]
                bucket = []
            bucket_key = key
            bucket.append(trade)
        if bucket:
            out.append(_candle(symbol, interval, bucket_key, bucket, decimals))  # type: ignore[arg-type]
        return out


def _candle(symbol: str, interval: int, key: int, trades: list[HistoricalTrade], decimals: int) -> HistoricalCandle:
    prices = [t.price for t in trades]
    return HistoricalCandle(
        symbol=symbol,
        interval=interval,
        time=EPOCH + timedelta(seconds=key * interval * 60),
        open=trades[0].price,
        high=max(prices),
        low=min(prices),
        close=trades[-1].price,
        volume=sum((t.volume for t in trades), Decimal(0)),
        vwap=_vwap(trades, decimals),
        trades=len(trades),
    )


def _vwap(trades: list[HistoricalTrade], decimals: int) -> Decimal:
    """Kraken's candle vwap — Σ(price·volume)/Σvolume rounded down to the pair's price decimals
    (0 without volume) — in exact rational arithmetic: the fake's own truth, computed apart
    from the code under test (which divides in Decimal and in SQL)."""
    volume = sum((Fraction(t.volume) for t in trades), Fraction(0))
    if volume == 0:
        return Decimal(0)
    scaled = sum((Fraction(t.price) * Fraction(t.volume) for t in trades), Fraction(0)) / volume * 10**decimals
    return Decimal(math.floor(scaled)).scaleb(-decimals)
