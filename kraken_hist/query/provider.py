"""The query layer: candles of any whole-minute interval for strategies, without look-ahead.

Stored intervals (1m, 5m, 15m, 30m, 1h, 4h, 1d, 1w) are read from their relation; any other
whole-minute interval is aggregated in SQL from the largest stored interval dividing it
(``Interval.source_interval``). Buckets follow KRAKEN.md: epoch-aligned, days at 00:00 UTC,
weeks (and multi-week intervals) from Monday 00:00 UTC.

No look-ahead: a bucket is *complete* when its end is at or before ``min(now, end)``; only
complete buckets are returned unless ``include_forming=True``, and a forming bucket at a
past ``end`` is built only from 1-minute candles that had closed by then.

Reads are built with SQLAlchemy Core. The candle queries (get_candles, warm-up, latest,
replay) are compiled once per request shape and run on the psycopg connection itself —
pooled and in autocommit for get_candles, streamed on a connection of their own for replay —
because SQLAlchemy's per-call execution and result layers cost as much as the query.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import operator
import select
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import repeat
from typing import Any

import pandas as pd
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Engine

from kraken_hist.query import bars as bars_module
from kraken_hist.storage import refresh as refresh_module
from kraken_hist.query import trades_out
from kraken_hist.rules.candles import vwap_at_decimals
from kraken_hist.core.config import Settings
from kraken_hist.storage.db import connect, has_timescaledb, libpq_url, sqlalchemy_url, translate_errors
from kraken_hist.core.errors import ConfigurationError, KrakenHistError, PermanentError
from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.storage.schema import candle_changes, candles, interval_tables, sync_status
from kraken_hist.core.timeutils import EPOCH, ONE_MINUTE, UTC, check_aware, floor_minute, parse_time, utcnow
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade

log = logging.getLogger(__name__)

#: Stored relation of each standard interval (minutes → table or continuous aggregate).
INTERVAL_VIEWS: dict[int, str] = dict(INTERVAL_RELATIONS)

#: Columns of the candle DataFrames, in order (index: UTC DatetimeIndex named ``time``).
FRAME_COLUMNS = ("open", "high", "low", "close", "volume", "vwap", "trades")

DEFAULT_TIMEFRAMES = (1, 5, 15, 60, 240, 1440)

TimeArg = datetime | str | None
IntervalArg = Interval | int | str


class InsufficientDataError(PermanentError, LookupError):
    """Fewer complete candles are stored than were asked for (warm-up)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRange:
    """First and last stored 1-minute candle of a symbol (``end`` = last + 1 minute)."""

    symbol: str
    first: datetime
    last: datetime

    @property
    def end(self) -> datetime:
        return self.last + ONE_MINUTE

    def to_dict(self) -> dict[str, str]:
        return {"symbol": self.symbol, "first": self.first.isoformat(), "last": self.last.isoformat(),
                "end": self.end.isoformat()}


def candles_to_frame(candles: Sequence[HistoricalCandle], *, exact: bool = False) -> pd.DataFrame:
    """Candles → the DataFrame backtesting libraries take: UTC ``DatetimeIndex`` named ``time``,
    columns open, high, low, close, volume, vwap, trades.

    Prices and volumes become float64 (what backtrader/vectorbt/backtesting.py compute with;
    vwap NaN where unknown) unless ``exact=True``, which keeps Decimal objects (object dtype).
    ``trades`` is int64. ``attrs`` carries ``symbol`` and ``interval`` (minutes).
    """
    index = pd.DatetimeIndex([c.time for c in candles], name="time").tz_convert(UTC) if candles else \
        pd.DatetimeIndex([], tz=UTC, name="time")
    if exact:
        data: dict[str, Any] = {
            name: pd.Series([getattr(c, name) for c in candles], index=index, dtype=object)
            for name in FRAME_COLUMNS[:-1]
        }
    else:
        data = {
            name: pd.Series([float(getattr(c, name)) for c in candles], index=index, dtype="float64")
            for name in ("open", "high", "low", "close", "volume")
        }
        data["vwap"] = pd.Series(
            [float(c.vwap) if c.vwap is not None else float("nan") for c in candles], index=index, dtype="float64"
        )
    data["trades"] = pd.Series([c.trades for c in candles], index=index, dtype="int64")
    frame = pd.DataFrame(data, index=index, columns=list(FRAME_COLUMNS))
    if candles:
        frame.attrs["symbol"] = candles[0].symbol
        frame.attrs["interval"] = candles[0].interval
    return frame


def _time(value: TimeArg, field: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value)
    return check_aware(value, field)


def _ceil(interval: Interval, when: datetime) -> datetime:
    """First bucket start at or after `when`."""
    start = interval.bucket_start(when)
    return start if start == when else start + interval.delta


def _aggregate_columns(p: sa.FromClause) -> list[sa.ColumnElement[Any]]:
    """SQL twin of ``aggregates.resample`` over 1-minute candles (and of ``refresh.AGGREGATE_COLUMNS``).

    vwap is weighted by the volume of the 1-minute candles that have one: the minutes' own
    volume on ``candles``; on a higher relation its stored exact sums ``vwap_notional`` and
    ``vwap_volume`` — so a bucket built from 5m or 1d rows has, digit for digit, the vwap of one
    built from its minutes."""
    if "vwap_notional" in p.c:
        weighted_sum = sa.func.sum(p.c.vwap_notional)
        weight_sum = sa.func.sum(p.c.vwap_volume)
    else:
        weighted_sum = sa.func.sum(p.c.vwap * p.c.volume)
        weight_sum = sa.func.sum(p.c.volume).filter(p.c.vwap.isnot(None))
    return [
        sa.func.array_agg(aggregate_order_by(p.c.open, p.c.time))[1].label("open"),
        sa.func.max(p.c.high).label("high"),
        sa.func.min(p.c.low).label("low"),
        sa.func.array_agg(aggregate_order_by(p.c.close, p.c.time.desc()))[1].label("close"),
        sa.func.sum(p.c.volume).label("volume"),
        (weighted_sum / sa.func.nullif(weight_sum, 0)).label("vwap"),
        sa.cast(sa.func.sum(p.c.trades), sa.BigInteger).label("trades"),
    ]


_TIMESTAMPTZ = sa.DateTime(timezone=True)


def _symbol_filter(column: sa.ColumnElement[Any], symbols: Sequence[str]) -> sa.ColumnElement[bool]:
    if len(symbols) == 1:
        return column == sa.bindparam("symbol", symbols[0], type_=sa.Text)
    return column.in_(list(symbols))


def _vwap_at_places(vwap: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """`vwap` at the price decimals of the named parameter ``places``, rounded down: the rule of
    ``aggregates.vwap_at_decimals`` in SQL (a vwap with no more decimals stays as it is, digit
    for digit; ``places`` NULL leaves every vwap as it is). PostgreSQL sends a few digits instead
    of an exact quotient's 20-40, and Python need not round each candle (~3 µs a candle)."""
    places = sa.bindparam("places", None, type_=sa.Integer)
    return sa.func.trunc(vwap, sa.func.least(places, sa.func.scale(vwap)))


def select_candles(
    interval: Interval, symbols: Sequence[str], lo: datetime | None, hi: datetime | None, *,
    vwap_places: bool = False,
) -> sa.Select[Any]:
    """Buckets of `interval` starting in ``[lo, hi)`` (bounds aligned by the caller), unordered.

    Columns: symbol, time, open, high, low, close, volume, vwap, trades. The single symbol and
    the bounds are the named parameters ``symbol``, ``lo`` and ``hi``, so the compiled text
    depends only on the shape of the request (see ``_CompiledQuery``). With `vwap_places`, the
    vwap comes at the price decimals of the parameter ``places`` (``_vwap_at_places``).
    """
    if interval.is_stored:
        t = interval_tables[interval.minutes]
        vwap: sa.ColumnElement[Any] = t.c.vwap
        if vwap_places:
            vwap = _vwap_at_places(vwap).label("vwap")
        stmt = sa.select(t.c.symbol, t.c.time, t.c.open, t.c.high, t.c.low, t.c.close, t.c.volume, vwap,
                         t.c.trades).where(_symbol_filter(t.c.symbol, symbols))
        time_col = t.c.time
    else:
        p = interval_tables[interval.source_interval().minutes].alias("p")
        bucket = sa.func.date_bin(
            sa.literal(interval.delta, sa.Interval), p.c.time, sa.literal(interval.origin, sa.DateTime(timezone=True))
        ).label("time")
        columns = _aggregate_columns(p)
        if vwap_places:
            columns = [_vwap_at_places(c.element).label("vwap") if c.name == "vwap" else c for c in columns]
        stmt = (
            sa.select(p.c.symbol, bucket, *columns)
            .where(_symbol_filter(p.c.symbol, symbols))
            .group_by(p.c.symbol, bucket)
        )
        time_col = p.c.time
    if lo is not None:
        stmt = stmt.where(time_col >= sa.bindparam("lo", lo, type_=_TIMESTAMPTZ))
    if hi is not None:
        stmt = stmt.where(time_col < sa.bindparam("hi", hi, type_=_TIMESTAMPTZ))
    return stmt


def _ordered(stmt: sa.Select[Any], *, desc: bool = False, limit: int | None = None) -> sa.Select[Any]:
    """`stmt` ordered by bucket time, the row limit as the named parameter ``limit``."""
    stmt = stmt.order_by(sa.column("time").desc() if desc else sa.column("time"))
    if limit is not None:
        stmt = stmt.limit(sa.bindparam("limit", limit, type_=sa.Integer))
    return stmt


@dataclass(frozen=True, slots=True)
class _CompiledQuery:
    """A Core statement compiled once for the driver: SQL text with ``%(name)s`` placeholders
    and every parameter's value as compiled. Per call only the named ones change."""

    sql: str
    defaults: dict[str, Any]

    @classmethod
    def compile(cls, stmt: sa.Select[Any], dialect: sa.Dialect) -> "_CompiledQuery":
        compiled = stmt.compile(dialect=dialect)
        if compiled.positiontup is not None:
            raise RuntimeError(f"expected a named paramstyle, not {dialect.paramstyle!r}")
        return cls(sql=compiled.string, defaults=dict(compiled.params))

    def params(self, **values: Any) -> dict[str, Any]:
        out = dict(self.defaults)
        for name, value in values.items():
            if name in out:
                out[name] = value
        return out


_CANDLE_FIELDS = ("symbol", "interval", "time", "open", "high", "low", "close", "volume", "vwap", "trades")
_SETTERS = tuple(getattr(HistoricalCandle, name).__set__ for name in _CANDLE_FIELDS)
_new = object.__new__
_MERGE_KEY = operator.attrgetter("time", "symbol")


class _PairDecimals(dict):
    """Price decimals by symbol, looked up in a registry once each (None: a pair it does not know)."""

    def __init__(self, registry: PairRegistry) -> None:
        super().__init__()
        self.registry = registry

    def __missing__(self, symbol: str) -> int | None:
        places = self[symbol] = self.registry.get(symbol).price_decimals if self.registry.is_known(symbol) else None
        return places


def _vwap_at_pair_decimals(vwap: Decimal, symbol: str, decimals: _PairDecimals) -> Decimal:
    """An interval's vwap at the pair's price decimals, rounded down (aggregates.vwap_at_decimals)."""
    places = decimals[symbol]
    return vwap if places is None else vwap_at_decimals(vwap, places)


def _candles(rows: Sequence[Sequence[Any]], minutes: int, registry: PairRegistry | None) -> list[HistoricalCandle]:
    """HistoricalCandles from result rows (symbol, time, open, high, low, close, volume, vwap,
    trades); `registry` None: their vwap is at the pair's decimals already (``_vwap_at_places``).

    Column by column: each slot setter is mapped over the whole column (``_iter_candles``
    calls ten setters a row from Python; mapped, the calls stay in C: ~20% less time)."""
    if not rows or (minutes != 1 and registry is not None):
        return list(_iter_candles(rows, minutes, registry))
    out = list(map(_new, repeat(HistoricalCandle, len(rows))))
    columns = list(zip(*rows))
    columns.insert(1, repeat(minutes))
    consume = deque(maxlen=0).extend
    for setter, values in zip(_SETTERS, columns):
        consume(map(setter, out, values))
    return out


def _iter_candles(rows: Iterable[Sequence[Any]], minutes: int, registry: PairRegistry | None) -> Iterator[HistoricalCandle]:
    """HistoricalCandles from result rows, one at a time (`registry` as in ``_candles``). Fills
    the slots directly: HistoricalCandle has no validation to skip, and the keyword call of a
    frozen dataclass costs twice as much — this bounds get_candles and replay throughput."""
    s_symbol, s_interval, s_time, s_open, s_high, s_low, s_close, s_volume, s_vwap, s_trades = _SETTERS
    quanta = None if minutes == 1 or registry is None else _PairDecimals(registry)
    for symbol, when, open_, high, low, close, volume, vwap, trades in rows:
        if quanta is not None and vwap is not None:  # an aggregated vwap: an exact quotient, 40+ digits
            vwap = _vwap_at_pair_decimals(vwap, symbol, quanta)
        candle = _new(HistoricalCandle)
        s_symbol(candle, symbol)
        s_interval(candle, minutes)
        s_time(candle, when)
        s_open(candle, open_)
        s_high(candle, high)
        s_low(candle, low)
        s_close(candle, close)
        s_volume(candle, volume)
        s_vwap(candle, vwap)
        s_trades(candle, trades)
        yield candle


def fill_quiet(
    candles: Sequence[HistoricalCandle],
    interval: Interval,
    lo: datetime | None,
    hi: datetime,
    previous_close: Decimal | None,
    symbol: str,
) -> list[HistoricalCandle]:
    """A regular series over ``[lo, hi)``: every missing bucket becomes a quiet candle —
    volume 0, trades 0, open = high = low = close = the previous close, vwap None (there was
    no trade to weight). Buckets before the first known price are left out."""
    out: list[HistoricalCandle] = []
    by_time = {c.time: c for c in candles}
    when = lo if lo is not None else (candles[0].time if candles else hi)
    close = previous_close
    while when < hi:
        found = by_time.get(when)
        if found is not None:
            out.append(found)
            close = found.close
        elif close is not None:
            out.append(HistoricalCandle(symbol=symbol, interval=interval.minutes, time=when, open=close, high=close,
                                        low=close, close=close, volume=Decimal(0), vwap=None, trades=0))
        when += interval.delta
    return out


def _drop_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout without a round trip: a pooled connection whose server has gone (a
    restart, pg_terminate_backend) has something to read — the server's last message, the end
    of the stream — and is replaced (SQLAlchemy connects anew); an idle live one has nothing.
    (``pool_pre_ping`` sends SELECT 1 at every checkout: 0.1-0.25 ms, 3-5% of a 1,000-bar read.)"""
    if dbapi_connection.closed or select.select([dbapi_connection.fileno()], [], [], 0)[0]:
        raise sa.exc.DisconnectionError("the server closed this pooled connection")


class HistoricalDataProvider:
    """Read candles for strategies (backtests, warm-up, replay, multi-timeframe).

    Sync, thread-safe (a SQLAlchemy connection pool). ``db_url=None`` resolves the configured
    or embedded database (``migrate.prepare_database``). An injected ``engine`` is used as is
    and not disposed by ``close()``. ``pool_min_size`` connections are kept in the pool,
    up to ``pool_max_size`` open at once.

    By default only stored candles are returned: a minute without trades has no candle, so a
    series may have holes. ``fill_quiet=True`` fills them (see ``fill_quiet``).
    """

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
        self._db_url = db_url
        self._settings = settings
        self._pool = (pool_min_size, pool_max_size)
        self._engine = engine
        self._owns_engine = engine is None
        self._url: str | None = (
            libpq_url(db_url) if db_url else
            libpq_url(engine.url.render_as_string(hide_password=False)) if engine is not None else None
        )
        self._clock = clock
        self._registry = registry
        # Compiled candle queries by request shape (see _query_candles); compiling is pure and
        # idempotent, so concurrent threads at worst compile one twice.
        self._queries: dict[tuple[Any, ...], _CompiledQuery] = {}
        self._views: bool | None = None  # are 5m … 1w continuous aggregates (TimescaleDB)?

    @property
    def registry(self) -> PairRegistry:
        """The pairs this provider knows: the registry given, or its database's."""
        if self._registry is None:
            if self._url is None:
                self.connect()
            assert self._url is not None
            self._registry = database_registry(self._url)
        return self._registry

    # --- lifecycle ------------------------------------------------------------------------

    def connect(self) -> "HistoricalDataProvider":
        """Resolve the database, check its schema, open the pool and check it answers."""
        if self._engine is None:
            from kraken_hist.storage.migrate import prepare_database

            self._url = prepare_database(self._db_url, self._settings)
            low, high = self._pool
            # PostgreSQL's plan cache as it is (see _query_once); no SELECT 1 at every checkout
            # (``_drop_if_closed`` instead)
            self._engine = sa.create_engine(
                sqlalchemy_url(self._url), pool_size=max(low, 1), max_overflow=high - max(low, 1),
                connect_args={"options": "-c TimeZone=UTC"},
            )
            sa.event.listen(self._engine, "checkout", _drop_if_closed)
        with self._connection() as conn:
            self._views = has_timescaledb(conn)
        return self

    def close(self) -> None:
        """Close the pool (only if this provider created it)."""
        if self._engine is not None and self._owns_engine:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> "HistoricalDataProvider":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        if self._engine is None:
            self.connect()
        assert self._engine is not None
        with translate_errors(), self._engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _driver(self) -> Iterator[psycopg.Connection[Any]]:
        """The psycopg connection under a pooled one, in autocommit for the time it is lent.

        The candle reads go to the driver directly: a single SELECT needs no transaction, so
        autocommit saves the BEGIN and the ROLLBACK at check-in (and psycopg keeps its
        prepared statements, which a ROLLBACK would drop); rows come back as plain tuples,
        without the SQLAlchemy result layer, which costs as much as the query itself for
        1,000 candles. The statements are still built and compiled by SQLAlchemy Core."""
        if self._engine is None:
            self.connect()
        assert self._engine is not None
        with translate_errors():
            pooled = self._engine.raw_connection()
            try:
                driver = pooled.driver_connection
                if not isinstance(driver, psycopg.Connection):
                    raise ConfigurationError(f"HistoricalDataProvider needs a psycopg 3 engine, got {type(driver)!r}")
                previous = driver.autocommit
                driver.autocommit = True
                try:
                    yield driver
                finally:
                    if not driver.closed:
                        driver.autocommit = previous
            except psycopg.OperationalError:
                pooled.invalidate()  # the connection is not to be lent again
                raise
            finally:
                pooled.close()

    def _compiled(self, iv: Interval, lo: datetime | None, hi: datetime | None, desc: bool,
                  limit: int | None) -> _CompiledQuery:
        """The candle query of this shape, compiled once per provider."""
        key = (iv.minutes, lo is None, hi is None, desc, limit is None)
        query = self._queries.get(key)
        if query is None:
            assert self._engine is not None
            stmt = _ordered(select_candles(iv, ["-"], lo, hi, vwap_places=iv.minutes != 1), desc=desc, limit=limit)
            query = self._queries[key] = _CompiledQuery.compile(stmt, self._engine.dialect)
        return query

    def _query_candles(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime | None, *, desc: bool = False,
        limit: int | None = None,
    ) -> list[HistoricalCandle]:
        """Candles of one symbol with bucket start in ``[lo, hi)``, by time (newest first if
        `desc`), at most `limit`: the hot path of get_candles, warm-up and latest."""
        if self._engine is None:
            self.connect()
        if limit is not None and hi is not None and iv.is_stored and self._reads_views():
            return self._query_windows(name, iv, lo, hi, desc, limit)
        return self._query_once(name, iv, lo, hi, desc, limit)

    def _reads_views(self) -> bool:
        """Whether 5m … 1w are continuous aggregates here (TimescaleDB), asked once."""
        if self._views is None:
            with self._connection() as conn:
                self._views = has_timescaledb(conn)
        return self._views

    def _query_windows(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime, desc: bool, limit: int
    ) -> list[HistoricalCandle]:
        """``_query_once`` on TimescaleDB, `limit` buckets' worth of time at a time.

        A real-time continuous aggregate is a view: its materialized rows UNION ALL the rows
        aggregated on the fly past its watermark. PostgreSQL 15 does not push ``ORDER BY time
        LIMIT n`` into the union's branches (TimescaleDB does from PostgreSQL 16 on), so one
        query would read and sort every bucket from `lo` to `hi` (~70 ms for two years of 5m
        buckets, against ~3 ms for a table). The ``candles`` hypertable is planned for its
        values (``_query_once``): a window leaves all but one or two chunks out of the plan,
        while an open range (a warm-up: everything before `hi`) plans every chunk of the
        history (500 x 1m over 25 monthly chunks: 5.2 ms against 3.0 ms). A window of `limit`
        buckets holds at most `limit` candles; it widens (x4) over stretches without trades
        until the range is exhausted."""
        out: list[HistoricalCandle] = []
        floor = lo
        span = limit + limit // 4 + 1  # a little room for quiet buckets: one query where data is dense
        edge = lo if not desc else hi
        while len(out) < limit:
            if desc:
                if floor is not None and edge <= floor:
                    break
                start = edge - span * iv.delta
                if floor is not None:
                    start = max(start, floor)
                out.extend(self._query_once(name, iv, start, edge, True, limit - len(out)))
                edge = start
            else:
                if edge is None:
                    data_range = self.get_data_range(name)
                    if data_range is None:
                        break
                    edge = iv.bucket_start(data_range.first)
                if edge >= hi:
                    break
                end = min(hi, edge + span * iv.delta)
                out.extend(self._query_once(name, iv, edge, end, False, limit - len(out)))
                edge = end
            if len(out) < limit and floor is None and desc:
                data_range = self.get_data_range(name)  # how far back is there anything at all?
                if data_range is None:
                    break
                floor = iv.bucket_start(data_range.first)
            span *= 4
        return out

    def _query_once(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime | None, desc: bool, limit: int | None
    ) -> list[HistoricalCandle]:
        query = self._compiled(iv, lo, hi, desc, limit)
        params = query.params(symbol=name, lo=lo, hi=hi, limit=limit, places=self._places(name))
        # Plans: psycopg prepares a statement from its fifth run and PostgreSQL may then keep a
        # generic plan. That is what a continuous aggregate wants (planning its nested real-time
        # views takes 1-6 ms, running the query well under 1 ms); a read of the ``candles``
        # hypertable wants a plan for its values (a generic plan opens every chunk at start).
        reads_minutes = (iv if iv.is_stored else iv.source_interval()).minutes == 1
        prepare = False if reads_minutes and self._views else None
        with self._driver() as driver:
            rows = driver.execute(query.sql, params, prepare=prepare).fetchall()
        return _candles(rows, iv.minutes, None)

    def _places(self, name: str) -> int | None:
        """The pair's price decimals: the parameter ``places`` of the candle queries (``_vwap_at_places``)."""
        return _PairDecimals(self.registry)[name]

    def _now(self) -> datetime:
        return check_aware(self._clock(), "clock()")

    def _cutoff(self, end: datetime | None) -> tuple[datetime, bool]:
        """``min(now, end)`` and whether it lies in the past (a historical point in time)."""
        now = self._now()
        if end is not None and end < now:
            return end, True
        return now, False

    def _fetch(self, stmt: sa.Select[Any], minutes: int) -> list[HistoricalCandle]:
        with self._connection() as conn:
            rows = conn.execute(stmt).all()
        return _candles(rows, minutes, self.registry)

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
        lo_time, end_time = _time(start, "start"), _time(end, "end")
        cutoff, historical = self._cutoff(end_time)
        lo = _ceil(iv, lo_time) if lo_time is not None else None
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
        cutoff, _historical = self._cutoff(_time(end, "end"))
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
        cutoff, historical = self._cutoff(_time(end, "end"))
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

    # --- replay ---------------------------------------------------------------------------

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
        each symbol is streamed on a connection of its own (``_stream``), `batch_size` rows
        at a time, and several symbols are merged in Python (``heapq.merge``; PostgreSQL
        would sort them rather than merge the ordered index scans).
        """
        if speed < 0:
            raise ValueError(f"speed must not be negative, got {speed}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        names = [self.registry.normalize(symbol)] if isinstance(symbol, str) else [self.registry.normalize(s) for s in symbol]
        if not names:
            raise ValueError("replay needs at least one symbol")
        iv = Interval.parse(interval)
        lo_time = _time(start, "start")
        cutoff, _historical = self._cutoff(_time(end, "end"))
        lo = _ceil(iv, lo_time) if lo_time is not None else None
        hi = iv.bucket_start(cutoff)
        if self._engine is None:
            self.connect()
        query = self._compiled(iv, lo, hi, False, None)
        streams = [self._stream(query.sql, query.params(symbol=name, lo=lo, hi=hi, places=self._places(name)),
                                iv.minutes, batch_size) for name in names]
        try:
            merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_MERGE_KEY)
            if speed == 0:
                yield from merged
                return
            origin: datetime | None = lo
            wall_start = time.monotonic()
            for candle in merged:
                if origin is None:
                    origin = candle.time
                due = (candle.end - origin).total_seconds() / speed
                delay = due - (time.monotonic() - wall_start)
                if delay > 0:
                    sleep(delay)
                yield candle
        finally:
            for stream in streams:  # closes their connections now, also when the caller stops early
                stream.close()

    def _stream(self, query: str, params: dict[str, Any], minutes: int, batch_size: int) -> Iterator[HistoricalCandle]:
        """One symbol's candles in time order, streamed (psycopg ``Cursor.stream``: libpq
        chunked rows mode, `batch_size` rows a chunk; single-row mode before libpq 17) on a
        connection opened for it. Not from the pool: a paced replay holds it for hours, and a
        merge needs one per symbol. Streaming beats a server-side cursor's FETCH round trips
        (~1.7x here), and text results beat binary (psycopg's binary numeric loader is slower)."""
        assert self._url is not None
        capabilities = getattr(psycopg, "capabilities", None)  # psycopg >= 3.2
        chunked = capabilities is not None and capabilities.has_stream_chunked()
        with connect(self._url, autocommit=True, options="-c TimeZone=UTC") as driver, translate_errors():
            cursor = driver.cursor()
            rows = cursor.stream(query, params, size=batch_size) if chunked else cursor.stream(query, params)
            try:
                yield from _iter_candles(rows, minutes, None)
            finally:
                rows.close()  # cancels the query if the caller stopped early

    # --- trades and information bars (kraken_hist.query.trades_out, kraken_hist.query.bars) -------------

    def _trade_window(self, start: TimeArg, end: TimeArg) -> tuple[datetime, datetime]:
        """``[start, min(now, end))``: a trade is known from its own time on."""
        if self._url is None:
            self.connect()
        lo = _time(start, "start")
        return (lo if lo is not None else EPOCH), self._cutoff(_time(end, "end"))[0]

    def get_trades(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                   batch_size: int = 10_000) -> Iterator[HistoricalTrade]:
        """Stored trades with ``start <= time < min(now, end)`` in (time, id) order, streamed
        with constant memory on a connection of their own (closed with the iterator)."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        assert self._url is not None
        return trades_out.read_trades(self._url, name, lo, hi, batch_size=batch_size)

    def iter_trades_df(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                       chunk_rows: int = 100_000, exact: bool = False) -> Iterator[pd.DataFrame]:
        """``get_trades`` as DataFrames of at most `chunk_rows` rows (constant memory)."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        assert self._url is not None
        return trades_out.read_trade_frames(self._url, name, lo, hi, chunk_rows=chunk_rows, exact=exact)

    def get_trades_df(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                      exact: bool = False) -> pd.DataFrame:
        """``get_trades`` as one DataFrame: UTC index ``time``, columns trade_id, price, volume,
        side, ord_type; float64 prices and volumes unless ``exact=True`` (Decimals)."""
        return trades_out.concat_frames(self.iter_trades_df(symbol, start, end, exact=exact),
                                        self.registry.normalize(symbol), exact)

    def replay_trades(self, symbol: str | Sequence[str], start: TimeArg = None, end: TimeArg = None,
                      speed: float = 0.0, *, batch_size: int = 10_000,
                      sleep: Callable[[float], None] = time.sleep) -> Iterator[HistoricalTrade]:
        """Trades of one or several symbols merged in (time, id, symbol) order, each released
        when its time comes on the replay clock (`speed` as in ``replay_candles``; the clock
        starts at `start` or the first trade). Nothing after ``min(now, end)``."""
        if speed < 0:
            raise ValueError(f"speed must not be negative, got {speed}")
        names = [self.registry.normalize(symbol)] if isinstance(symbol, str) else [self.registry.normalize(s) for s in symbol]
        if not names:
            raise ValueError("replay needs at least one symbol")
        lo, hi = self._trade_window(start, end)
        assert self._url is not None
        streams = [trades_out.read_trades(self._url, name, lo, hi, batch_size=batch_size) for name in names]
        try:
            yield from trades_out.pace(trades_out.merge(streams), _time(start, "start"), speed, sleep)
        finally:
            for stream in streams:  # closes their connections now, also when the caller stops early
                stream.close()

    def get_bars(self, symbol: str, kind: bars_module.BarKind | str, size: Decimal | int | str,
                 start: TimeArg = None, end: TimeArg = None, *, include_forming: bool = False,
                 from_trades: bool = False) -> list[bars_module.InformationBar]:
        """Tick, volume or value bars of the trades in ``[start, min(now, end))``, counted from
        `start` (default: the first stored trade); complete bars only unless `include_forming`.
        See ``kraken_hist.query.bars`` for the rule."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        assert self._url is not None
        decimals = self.registry.get(name).price_decimals
        with connect(self._url, autocommit=True, options="-c TimeZone=UTC") as conn, translate_errors():
            if lo == EPOCH:
                first = conn.execute("SELECT min(time) FROM trades WHERE symbol = %s", (name,)).fetchone()
                if first is None or first[0] is None:
                    return []
                lo = first[0]
            return bars_module.read_bars(conn, name, bars_module.BarKind(kind), bars_module.check_size(kind, size),
                                         lo, hi, price_decimals=decimals, from_trades=from_trades,
                                         include_forming=include_forming)

    def get_bars_df(self, symbol: str, kind: bars_module.BarKind | str, size: Decimal | int | str,
                    start: TimeArg = None, end: TimeArg = None, *, include_forming: bool = False,
                    from_trades: bool = False, exact: bool = False) -> pd.DataFrame:
        """``get_bars`` as a DataFrame (see ``bars.bars_to_frame``)."""
        return bars_module.bars_to_frame(self.get_bars(symbol, kind, size, start, end, include_forming=include_forming,
                                                       from_trades=from_trades), exact=exact)

    # --- metadata -------------------------------------------------------------------------

    def get_symbols(self) -> list[str]:
        """Symbols that have stored 1-minute candles (a skip scan of the primary key)."""
        with self._connection() as conn:
            return [row[0] for row in conn.execute(sa.text(_SYMBOLS_SQL))]

    def get_data_range(self, symbol: str) -> DataRange | None:
        """First and last stored 1-minute candle, or None when nothing is stored."""
        name = self.registry.normalize(symbol)
        stmt = sa.select(sa.func.min(candles.c.time), sa.func.max(candles.c.time)).where(candles.c.symbol == name)
        with self._connection() as conn:
            first, last = conn.execute(stmt).one()
        return DataRange(symbol=name, first=first, last=last) if first is not None else None

    def get_sync_status(self, symbol: str | None = None) -> list[dict[str, Any]]:
        """Ingestion progress rows (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)."""
        stmt = sa.select(sync_status).order_by(sync_status.c.symbol, sync_status.c.data_type)
        if symbol is not None:
            stmt = stmt.where(sync_status.c.symbol == self.registry.normalize(symbol))
        with self._connection() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def health_check(self) -> dict[str, Any]:
        """Database reachability and latency, flavour, newest candle age per symbol and the
        aggregate refresh lag (pending ``candle_changes``). Never raises for an outage:
        reports ``ok: False`` with the error instead."""
        now = self._now()
        report: dict[str, Any] = {"ok": False, "checked_at": now.isoformat()}
        began = time.perf_counter()
        try:
            with self._connection() as conn:
                conn.execute(sa.text("SELECT 1"))
                latency = (time.perf_counter() - began) * 1000
                version = conn.execute(sa.text("SHOW server_version")).scalar_one()
                timescale = has_timescaledb(conn)
                newest = conn.execute(sa.text(_NEWEST_SQL)).all()
                pending, oldest = conn.execute(
                    sa.select(sa.func.count(), sa.func.min(candle_changes.c.created_at))
                ).one()
        except (KrakenHistError, sa.exc.SQLAlchemyError) as exc:  # reported, not raised: a health check answers
            log.warning("health check failed: %s", exc, extra={"event": "provider.health_failed"})
            report["database"] = {"reachable": False, "error": str(exc)}
            return report
        report["ok"] = True
        report["database"] = {
            "reachable": True, "latency_ms": round(latency, 3), "server_version": version,
            "timescaledb": timescale,
        }
        report["symbols"] = {
            sym: {"newest_candle": last.isoformat(), "age_seconds": round((now - (last + ONE_MINUTE)).total_seconds(), 3)}
            for sym, last in newest
        }
        report["aggregates"] = {
            "pending_changes": int(pending),
            "oldest_pending": oldest.isoformat() if oldest is not None else None,
            "lag_seconds": round((now - oldest).total_seconds(), 3) if oldest is not None else 0.0,
        }
        return report

    # --- refresh --------------------------------------------------------------------------

    def refresh_aggregates(
        self, symbol: str | None = None, start: TimeArg = None, end: TimeArg = None
    ) -> refresh_module.RefreshResult:
        """Bring the interval relations up to date (see ``kraken_hist.storage.refresh``)."""
        if self._url is None:
            self.connect()
        assert self._url is not None
        return refresh_module.refresh_aggregates(self._url, symbol, _time(start, "start"), _time(end, "end"))

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
        # Aggregated on the fly: read a window of `count` buckets and a little room for quiet
        # ones, widened where sparse, down to the first 1-minute candle, asked only then (it
        # bounds every level; on TimescaleDB min() over a continuous aggregate would scan its
        # view, over ``candles`` it is one index probe).
        first: datetime | None = None
        span = count + count // 4 + 1
        while True:
            lo = hi - span * iv.delta if first is None else max(hi - span * iv.delta, iv.bucket_start(first))
            rows = self._query_candles(name, iv, lo, hi, desc=True, limit=count)
            if len(rows) >= count:
                return rows[::-1]
            if first is None:
                with self._connection() as conn:
                    first = conn.execute(sa.select(sa.func.min(candles.c.time)).where(candles.c.symbol == name)).scalar()
                if first is None:
                    return []
            if lo <= first:
                return rows[::-1]
            span *= 4

    def _first_aggregated(
        self, name: str, iv: Interval, lo: datetime | None, hi: datetime, limit: int
    ) -> list[HistoricalCandle]:
        """The first `limit` on-the-fly buckets in ``[lo, hi)``, scanning the source in windows of
        `limit` buckets (widened over sparse stretches) rather than the rest of history."""
        if lo is None:
            data_range = self.get_data_range(name)
            if data_range is None:
                return []
            lo = iv.bucket_start(data_range.first)
        out: list[HistoricalCandle] = []
        span = limit
        while len(out) < limit and lo < hi:
            upper = min(hi, lo + span * iv.delta)
            out.extend(self._query_candles(name, iv, lo, upper, limit=limit - len(out)))
            lo, span = upper, span * 4
        return out

    def _read_forming(
        self, name: str, iv: Interval, cutoff: datetime, historical: bool
    ) -> HistoricalCandle | None:
        """The bucket in progress at `cutoff`, from 1-minute candles known by then: at a past
        point in time only minutes that had closed (``time + 1m <= cutoff``); live, every
        stored minute including the current one."""
        start = iv.bucket_start(cutoff)
        if start == cutoff:
            return None
        p = candles.alias("p")
        known = p.c.time < floor_minute(cutoff) if historical else p.c.time <= cutoff
        stmt = (
            sa.select(p.c.symbol, sa.literal(start, sa.DateTime(timezone=True)), *_aggregate_columns(p))
            .where(p.c.symbol == name, p.c.time >= start, known)
            .group_by(p.c.symbol)
        )
        rows = self._fetch(stmt, iv.minutes)
        return rows[0] if rows else None

    def _fill(
        self, rows: list[HistoricalCandle], iv: Interval, lo: datetime, hi: datetime, name: str
    ) -> list[HistoricalCandle]:
        """``fill_quiet`` with the previous close read from the 1-minute candles before `lo`."""
        previous = self._previous_close(name, lo) if (not rows or rows[0].time > lo) else None
        return fill_quiet(rows, iv, lo, hi, previous, name)

    def _previous_close(self, name: str, before: datetime) -> Decimal | None:
        stmt = (
            sa.select(candles.c.close).where(candles.c.symbol == name, candles.c.time < before)
            .order_by(candles.c.time.desc()).limit(1)
        )
        with self._connection() as conn:
            return conn.execute(stmt).scalar()


_SYMBOLS_SQL = """
WITH RECURSIVE s(symbol) AS (
    SELECT min(symbol) FROM candles
    UNION ALL
    SELECT (SELECT min(c.symbol) FROM candles c WHERE c.symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL
)
SELECT symbol FROM s WHERE symbol IS NOT NULL ORDER BY symbol
"""

_NEWEST_SQL = """
WITH RECURSIVE s(symbol) AS (
    SELECT min(symbol) FROM candles
    UNION ALL
    SELECT (SELECT min(c.symbol) FROM candles c WHERE c.symbol > s.symbol) FROM s WHERE s.symbol IS NOT NULL
)
SELECT s.symbol, (SELECT max(c.time) FROM candles c WHERE c.symbol = s.symbol)
FROM s WHERE s.symbol IS NOT NULL ORDER BY s.symbol
"""

__all__ = [
    "DataRange",
    "FRAME_COLUMNS",
    "HistoricalDataProvider",
    "INTERVAL_VIEWS",
    "InsufficientDataError",
    "candles_to_frame",
    "fill_quiet",
    "select_candles",
]
