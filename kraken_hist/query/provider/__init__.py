"""The query layer: candles of any whole-minute interval for strategies, without look-ahead.

Stored intervals (1m, 5m, 15m, 30m, 1h, 4h, 1d, 1w) are read from their relation; any other
whole-minute interval is aggregated in SQL from the largest stored interval dividing it
(``Interval.source_interval``). Buckets follow KRAKEN.md: epoch-aligned, days at 00:00 UTC,
weeks (and multi-week intervals) from Monday 00:00 UTC.

No look-ahead: a bucket is *complete* when its end is at or before ``min(now, end)``; only
complete buckets are returned unless ``include_forming=True``, and a forming bucket at a
past ``end`` is built only from 1-minute candles that had closed by then.

This module is the candle API (and metadata, refresh): it parses arguments, cuts every read at
the look-ahead cutoff and composes the rooms that do the work — ``candle_sql`` (the selects),
``reader`` (pool, compiled queries, reads and streams), ``windows`` (reads of `limit` candles
in windows of time), ``candle_rows`` (rows → candles, DataFrames, the quiet fill),
``metadata``. The provider's other parts: ``base`` (lifecycle, the cutoff, the one
read path), ``replay`` (candle and trade replay on ``streams``' clock), ``trade_reads``
(trades and information bars).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

import pandas as pd
import sqlalchemy as sa

from kraken_hist.core.errors import PermanentError
from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.core.timeutils import floor_minute
from kraken_hist.core.types import HistoricalCandle
from kraken_hist.query.provider import candle_sql, windows
from kraken_hist.query.provider.arguments import IntervalArg, TimeArg, time_arg
from kraken_hist.query.provider.candle_rows import FRAME_COLUMNS, candles_to_frame, fill_quiet
from kraken_hist.query.provider.candle_sql import select_candles
from kraken_hist.query.provider.metadata import DataRange, check_health
from kraken_hist.query.provider.replay import Replays
from kraken_hist.query.provider.trade_reads import TradeReads
from kraken_hist.storage import refresh as refresh_module
from kraken_hist.storage.schema import sync_status

#: Stored relation of each standard interval (minutes → table or continuous aggregate).
INTERVAL_VIEWS: dict[int, str] = dict(INTERVAL_RELATIONS)

DEFAULT_TIMEFRAMES = (1, 5, 15, 60, 240, 1440)


class InsufficientDataError(PermanentError, LookupError):
    """Fewer complete candles are stored than were asked for (warm-up)."""


class HistoricalDataProvider(Replays, TradeReads):
    """Read candles for strategies (backtests, warm-up, replay, multi-timeframe).

    Sync, thread-safe (a SQLAlchemy connection pool). ``db_url=None`` resolves the configured
    or embedded database (``migrate.prepare_database``). An injected ``engine`` is used as is
    and not disposed by ``close()``. ``pool_min_size`` connections are kept in the pool,
    up to ``pool_max_size`` open at once.

    By default only stored candles are returned: a minute without trades has no candle, so a
    series may have holes. ``fill_quiet=True`` fills them (see ``fill_quiet``).
    """

    # --- candles --------------------------------------------------------------------------

    def get_candles(
        self,
        symbol: str,
        interval: IntervalArg,
        start: TimeArg = None,
        end: TimeArg = None,
        limit: int | None = None,
        *,
        include_forming: bool = False,
        fill_quiet: bool = False,
    ) -> list[HistoricalCandle]:
        """Complete candles whose bucket starts at or after `start` and ends at or before
        ``min(now, end)``, oldest first, at most `limit` (the first ones).

        Stored candles only (holes where nothing traded) unless ``fill_quiet``; the bucket
        still forming at the cutoff is appended when ``include_forming``.
        """
        name, iv = self.registry.normalize(symbol), Interval.parse(interval)
        lo_time, end_time = time_arg(start, "start"), time_arg(end, "end")
        cutoff, historical = self._cutoff(end_time)
        lo = iv.first_bucket_at_or_after(lo_time) if lo_time is not None else None
        hi = iv.bucket_start(cutoff)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        if fill_quiet:
            if lo is None:
                data_range = self.get_data_range(name)
                lo = iv.bucket_start(data_range.first) if data_range else hi
            if limit is not None:
                hi = min(hi, lo + limit * iv.delta)
            result = self._fill(self._query_candles(name, iv, lo, hi), iv, lo, hi, name)
        elif limit is not None and not iv.is_stored:
            result = self._first_aggregated(name, iv, lo, hi, limit)
        else:
            result = self._query_candles(name, iv, lo, hi, limit=limit)
        if include_forming and (limit is None or len(result) < limit):
            forming = self._read_forming(name, iv, cutoff, historical)
            if forming is not None and (lo is None or forming.time >= lo):
                result.append(forming)
        return result

    def get_latest_candles(
        self, symbol: str, interval: IntervalArg, count: int, *, include_forming: bool = False,
        fill_quiet: bool = False,
    ) -> list[HistoricalCandle]:
        """The `count` most recent complete candles, oldest first (plus the forming one if asked)."""
        name, iv = self.registry.normalize(symbol), Interval.parse(interval)
        cutoff, historical = self._cutoff(None)
        result = self._latest(name, iv, cutoff, count, fill_quiet)
        if include_forming:
            forming = self._read_forming(name, iv, cutoff, historical)
            if forming is not None:
                result.append(forming)
        return result

    def get_warmup_data(
        self, symbol: str, interval: IntervalArg, periods: int, end: TimeArg = None, *, fill_quiet: bool = False
    ) -> list[HistoricalCandle]:
        """Exactly `periods` complete candles ending at or before `end` (default now), oldest
        first — what an indicator needs before the first live bar, with nothing from after `end`.

        Raises InsufficientDataError when fewer are stored.
        """
        name, iv = self.registry.normalize(symbol), Interval.parse(interval)
        if periods < 1:
            raise ValueError(f"periods must be at least 1, got {periods}")
        cutoff, _historical = self._cutoff(time_arg(end, "end"))
        result = self._latest(name, iv, cutoff, periods, fill_quiet)
        if len(result) < periods:
            raise InsufficientDataError(
                f"warm-up of {periods} x {iv} {name} candles up to {cutoff.isoformat()}: only {len(result)} stored"
            )
        return result

    def get_multi_timeframe_candles(
        self,
        symbol: str,
        end: TimeArg = None,
        intervals: Sequence[IntervalArg] = DEFAULT_TIMEFRAMES,
        count: int = 100,
        *,
        include_forming: bool = False,
        fill_quiet: bool = False,
    ) -> dict[int, list[HistoricalCandle]]:
        """Every timeframe as it was known at `end`: per interval (minutes), the `count` latest
        candles that had closed by ``min(now, end)``; with ``include_forming`` also each
        interval's bucket in progress, built only from 1-minute candles closed by then."""
        name = self.registry.normalize(symbol)
        cutoff, historical = self._cutoff(time_arg(end, "end"))
        out: dict[int, list[HistoricalCandle]] = {}
        for value in intervals:
            iv = Interval.parse(value)
            series = self._latest(name, iv, cutoff, count, fill_quiet)
            if include_forming:
                forming = self._read_forming(name, iv, cutoff, historical)
                if forming is not None:
                    series.append(forming)
            out[iv.minutes] = series
        return out

    # DataFrame variants (float64 prices unless exact=True; see candles_to_frame).

    def get_candles_df(self, symbol: str, interval: IntervalArg, start: TimeArg = None, end: TimeArg = None,
                       limit: int | None = None, *, include_forming: bool = False, fill_quiet: bool = False,
                       exact: bool = False) -> pd.DataFrame:
        """``get_candles`` as a DataFrame."""
        return candles_to_frame(self.get_candles(symbol, interval, start, end, limit, include_forming=include_forming,
                                                 fill_quiet=fill_quiet), exact=exact)

    def get_latest_candles_df(self, symbol: str, interval: IntervalArg, count: int, *, include_forming: bool = False,
                              fill_quiet: bool = False, exact: bool = False) -> pd.DataFrame:
        """``get_latest_candles`` as a DataFrame."""
        return candles_to_frame(self.get_latest_candles(symbol, interval, count, include_forming=include_forming,
                                                        fill_quiet=fill_quiet), exact=exact)

    def get_warmup_df(self, symbol: str, interval: IntervalArg, periods: int, end: TimeArg = None, *,
                      fill_quiet: bool = False, exact: bool = False) -> pd.DataFrame:
        """``get_warmup_data`` as a DataFrame."""
        return candles_to_frame(self.get_warmup_data(symbol, interval, periods, end, fill_quiet=fill_quiet),
                                exact=exact)

    def get_multi_timeframe_df(self, symbol: str, end: TimeArg = None,
                               intervals: Sequence[IntervalArg] = DEFAULT_TIMEFRAMES, count: int = 100, *,
                               include_forming: bool = False, fill_quiet: bool = False,
                               exact: bool = False) -> dict[int, pd.DataFrame]:
        """``get_multi_timeframe_candles`` as one DataFrame per interval."""
        series = self.get_multi_timeframe_candles(symbol, end, intervals, count, include_forming=include_forming,
                                                  fill_quiet=fill_quiet)
        return {minutes: candles_to_frame(c, exact=exact) for minutes, c in series.items()}

    # --- metadata (kraken_hist.query.provider.metadata) ----------------------------------------------

    def get_symbols(self) -> list[str]:
        """Symbols that have stored 1-minute candles (a skip scan of the primary key)."""
        with self._reader.connection() as conn:
            return [row[0] for row in conn.execute(sa.text(candle_sql.SYMBOLS_SQL))]

    def get_data_range(self, symbol: str) -> DataRange | None:
        """First and last stored 1-minute candle, or None when nothing is stored."""
        name = self.registry.normalize(symbol)
        first, last = self._reader.one(candle_sql.select_data_range(name))
        return DataRange(symbol=name, first=first, last=last) if first is not None else None

    def get_sync_status(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """Ingestion progress rows (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)."""
        stmt = sa.select(sync_status).order_by(sync_status.c.symbol, sync_status.c.data_type)
        if symbol is not None:
            stmt = stmt.where(sync_status.c.symbol == self.registry.normalize(symbol))
        with self._reader.connection() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def health_check(self) -> dict[str, Any]:
        """Database reachability and latency, flavour, newest candle age per symbol and the
        aggregate refresh lag (pending ``candle_changes``). Never raises for an outage:
        reports ``ok: False`` with the error instead."""
        return check_health(self._reader.connection, self._now())

    # --- refresh --------------------------------------------------------------------------

    def refresh_aggregates(
        self, symbol: str | None = None, start: TimeArg = None, end: TimeArg = None
    ) -> refresh_module.RefreshResult:
        """Bring the interval relations up to date (see ``kraken_hist.storage.refresh``)."""
        return refresh_module.refresh_aggregates(self._database_url(), symbol, time_arg(start, "start"),
                                                 time_arg(end, "end"))

    # --- internals ------------------------------------------------------------------------

    def _latest(
        self, name: str, iv: Interval, cutoff: datetime, count: int, fill: bool
    ) -> list[HistoricalCandle]:
        """Up to `count` complete candles before `cutoff`, oldest first."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        hi = iv.bucket_start(cutoff)
        if count == 0:
            return []
        if fill:
            lo = hi - count * iv.delta
            return self._fill(self._query_candles(name, iv, lo, hi), iv, lo, hi, name)
        if iv.is_stored:
            return self._query_candles(name, iv, None, hi, desc=True, limit=count)[::-1]
        return windows.read_latest_in_windows(self._read_once(name, iv), partial(self._first_minute, name), iv, hi,
                                              count)

    def _first_aggregated(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime, limit: int
    ) -> list[HistoricalCandle]:
        """The first `limit` on-the-fly buckets in ``[lo, hi)`` (from the first minute when `lo`
        is None), read in windows rather than over the rest of history."""
        if lo is None:
            first_minute = self._first_minute(name)
            if first_minute is None:
                return []
            lo = iv.bucket_start(first_minute)
        return windows.read_first_in_windows(self._read_once(name, iv), iv, lo, hi, limit)

    def _read_forming(
        self, name: str, iv: Interval, cutoff: datetime, historical: bool
    ) -> HistoricalCandle | None:
        """The bucket in progress at `cutoff`, from 1-minute candles known by then: at a past
        point in time only minutes that had closed (``time + 1m <= cutoff``); live, every
        stored minute including the current one."""
        start = iv.bucket_start(cutoff)
        if start == cutoff:
            return None
        known = floor_minute(cutoff) if historical else cutoff
        rows = self._reader.fetch_candles(candle_sql.select_forming(name, start, known, historical=historical),
                                          iv.minutes, self.registry)
        return rows[0] if rows else None

    def _fill(
        self, rows: list[HistoricalCandle], iv: Interval, lo: datetime, hi: datetime, name: str
    ) -> list[HistoricalCandle]:
        """``fill_quiet`` with the previous close read from the 1-minute candles before `lo`."""
        previous = self._previous_close(name, lo) if (not rows or rows[0].time > lo) else None
        return fill_quiet(rows, iv, lo, hi, previous, name)

    def _previous_close(self, name: str, before: datetime) -> Decimal | None:
        return self._reader.scalar(candle_sql.select_previous_close(name, before))



class HealthCheckOnFirstUse:
    """:meth:`HistoricalDataProvider.health_check` of a one-connection provider built at the
    first call (a metrics scrape) rather than now: a process never scraped opens no pool."""

    def __init__(self, db_url: str | None, settings: Any = None) -> None:
        self._db_url, self._settings = db_url, settings
        self._provider: HistoricalDataProvider | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if self._provider is None:
                self._provider = HistoricalDataProvider(self._db_url, 0, 1, settings=self._settings)
            return self._provider.health_check()

    def close(self) -> None:
        with self._lock:
            if self._provider is not None:
                self._provider.close()
                self._provider = None


__all__ = [
    "DataRange",
    "FRAME_COLUMNS",
    "HealthCheckOnFirstUse",
    "HistoricalDataProvider",
    "INTERVAL_VIEWS",
    "InsufficientDataError",
    "candles_to_frame",
    "fill_quiet",
    "select_candles",
]
