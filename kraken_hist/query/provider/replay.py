"""Replay for backtests: candles or trades of one or several symbols, merged in time order and
released on a replay clock (``streams``), with constant memory (a stream per symbol)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter

from kraken_hist.core.intervals import Interval
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade
from kraken_hist.query import trades_out
from kraken_hist.query.provider import streams
from kraken_hist.query.provider.arguments import IntervalArg, TimeArg, time_arg
from kraken_hist.query.provider.base import ProviderBase

#: Merge order of a multi-symbol candle replay: bucket time, then symbol.
_CANDLE_MERGE_KEY = attrgetter("time", "symbol")
#: When a replayed candle becomes known: when its bucket closes.
_CANDLE_DUE = attrgetter("end")


class Replays(ProviderBase):
    """The replays of ``HistoricalDataProvider``."""

    def replay_candles(
        self,
        symbol: str | Sequence[str],
        interval: IntervalArg,
        start: TimeArg = None,
        end: TimeArg = None,
        speed: float = 0.0,
        *,
        batch_size: int = 5000,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[HistoricalCandle]:
        """Stream complete candles in time order (several symbols merged by time, then symbol),
        each released when its bucket closes on the replay clock.

        `speed` is market time per wall time: 0 = as fast as possible, 60 = one market minute
        per second. The clock starts at `start` (or the first candle). Memory stays constant:
        each symbol is streamed on a connection of its own, `batch_size` rows at a time, and
        several symbols are merged in Python (``streams``).
        """
        if speed < 0:
            raise ValueError(f"speed must not be negative, got {speed}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        names = self._names(symbol)
        iv = Interval.parse(interval)
        lo_time = time_arg(start, "start")
        cutoff, _historical = self._cutoff(time_arg(end, "end"))
        lo = iv.first_bucket_at_or_after(lo_time) if lo_time is not None else None
        hi = iv.bucket_start(cutoff)
        symbol_streams = [self._reader.stream(name, iv, lo, hi, self._places(name), batch_size) for name in names]
        try:
            merged = streams.merge(symbol_streams, _CANDLE_MERGE_KEY)
            yield from streams.pace(merged, lo, speed, sleep, due=_CANDLE_DUE)
        finally:
            for stream in symbol_streams:  # closes their connections now, also when the caller stops early
                stream.close()

    def replay_trades(self, symbol: str | Sequence[str], start: TimeArg = None, end: TimeArg = None,
                      speed: float = 0.0, *, batch_size: int = 10_000,
                      sleep: Callable[[float], None] = time.sleep) -> Iterator[HistoricalTrade]:
        """Trades of one or several symbols merged in (time, id, symbol) order, each released
        when its time comes on the replay clock (`speed` as in ``replay_candles``; the clock
        starts at `start` or the first trade). Nothing after ``min(now, end)``."""
        if speed < 0:
            raise ValueError(f"speed must not be negative, got {speed}")
        names = self._names(symbol)
        lo, hi = self._trade_window(start, end)
        url = self._database_url()
        symbol_streams = [trades_out.read_trades(url, name, lo, hi, batch_size=batch_size) for name in names]
        try:
            yield from streams.pace(trades_out.merge(symbol_streams), time_arg(start, "start"), speed, sleep)
        finally:
            for stream in symbol_streams:  # closes their connections now, also when the caller stops early
                stream.close()
