"""What every part of ``HistoricalDataProvider`` shares: the pool and its lifecycle, the pairs,
the clock and the look-ahead cutoff, and the one path every candle read takes (``reader``,
``windows``). The API is built on it by parts: candles (``provider``), trades and bars
(``trade_reads``), replay (``replay``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Self

from sqlalchemy.engine import Engine

from kraken_hist.core.config import Settings
from kraken_hist.core.intervals import Interval
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import EPOCH, check_aware, utcnow
from kraken_hist.core.types import HistoricalCandle
from kraken_hist.query.provider import candle_sql, windows
from kraken_hist.query.provider.arguments import TimeArg, time_arg
from kraken_hist.query.provider.candle_rows import PairDecimals
from kraken_hist.query.provider.reader import CandleReader
from kraken_hist.storage.pair_store import database_registry


class ProviderBase:
    """The shared state and internals of the provider (see ``HistoricalDataProvider``)."""

    def __init__(
        self,
        db_url: str | None = None,
        pool_min_size: int = 2,
        pool_max_size: int = 10,
        *,
        settings: Settings | None = None,
        engine: Engine | None = None,
        clock: Callable[[], datetime] = utcnow,
        registry: PairRegistry | None = None,
    ) -> None:
        if pool_min_size < 0 or pool_max_size < max(1, pool_min_size):
            raise ValueError(f"need 0 <= pool_min_size <= pool_max_size >= 1, got {pool_min_size}, {pool_max_size}")
        self._reader = CandleReader(db_url, (pool_min_size, pool_max_size), settings, engine)
        self._clock = clock
        self._registry = registry

    @property
    def registry(self) -> PairRegistry:
        """The pairs this provider knows: the registry given, or its database's."""
        if self._registry is None:
            self._registry = database_registry(self._database_url())
        return self._registry

    # --- lifecycle ------------------------------------------------------------------------

    def connect(self) -> Self:
        """Resolve the database, check its schema, open the pool and check it answers."""
        self._reader.open()
        return self

    def close(self) -> None:
        """Close the pool (only if this provider created it)."""
        self._reader.close()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _database_url(self) -> str:
        """The database's libpq URL (resolving a configured one first)."""
        if self._reader.url is None:
            self.connect()
        assert self._reader.url is not None
        return self._reader.url

    def _query_candles(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime | None, *, desc: bool = False,
        limit: int | None = None,
    ) -> list[HistoricalCandle]:
        """Candles of one symbol with bucket start in ``[lo, hi)``, by time (newest first if
        `desc`), at most `limit`: the hot path of get_candles, warm-up and latest. On TimescaleDB
        a limited read of a stored interval goes in windows (``windows.read_stored_in_windows``)."""
        read = self._read_once(name, iv)
        if limit is not None and hi is not None and iv.is_stored and self._reader.reads_views():
            return windows.read_stored_in_windows(read, partial(self._first_minute, name), iv, lo, hi, desc, limit)
        return read(lo, hi, desc, limit)

    def _read_once(self, name: str, iv: Interval) -> windows.Read:
        """One query for `name`'s `iv` candles in a window: ``read(lo, hi, desc, limit)``."""
        return partial(self._reader.read, name, iv, places=self._places(name))

    def _places(self, name: str) -> int | None:
        """The pair's price decimals: the vwap of every read above 1m comes at them."""
        return PairDecimals(self.registry)[name]

    def _now(self) -> datetime:
        return check_aware(self._clock(), "clock()")

    def _cutoff(self, end: datetime | None) -> tuple[datetime, bool]:
        """``min(now, end)`` and whether it lies in the past (a historical point in time)."""
        now = self._now()
        if end is not None and end < now:
            return end, True
        return now, False

    def _trade_window(self, start: TimeArg, end: TimeArg) -> tuple[datetime, datetime]:
        """``[start, min(now, end))``: a trade is known from its own time on."""
        self._database_url()
        lo = time_arg(start, "start")
        return (lo if lo is not None else EPOCH), self._cutoff(time_arg(end, "end"))[0]

    def _names(self, symbols: str | Sequence[str]) -> list[str]:
        """The symbols of a replay, normalized: at least one."""
        names = [self.registry.normalize(symbols)] if isinstance(symbols, str) else \
            [self.registry.normalize(s) for s in symbols]
        if not names:
            raise ValueError("replay needs at least one symbol")
        return names

    def _first_minute(self, name: str) -> datetime | None:
        """`name`'s first stored 1-minute candle: the bound of every windowed read."""
        return self._reader.scalar(candle_sql.select_first_minute(name))
