"""The provider's database side: the connection pool, the compiled candle queries and the reads.

The candle queries (get_candles, warm-up, latest, replay) are compiled once per request shape and
run on the psycopg connection itself — pooled and in autocommit for reads, streamed on a
connection of their own for replay — because SQLAlchemy's per-call execution and result layers
cost as much as the query.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kraken_hist.core.config import Settings
from kraken_hist.core.errors import ConfigurationError
from kraken_hist.core.intervals import Interval
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.types import HistoricalCandle
from kraken_hist.query.provider.candle_rows import candles_from_rows, iter_candles
from kraken_hist.query.provider.candle_sql import CompiledQuery, ordered, select_candles
from kraken_hist.query.provider.streams import open_stream
from kraken_hist.storage.db import has_timescaledb, libpq_url, sqlalchemy_url, translate_errors


def _drop_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout without a round trip: a pooled connection whose server has gone (a
    restart, pg_terminate_backend) has something to read — the server's last message, the end
    of the stream — and is replaced (SQLAlchemy connects anew); an idle live one has nothing.
    (``pool_pre_ping`` sends SELECT 1 at every checkout: 0.1-0.25 ms, 3-5% of a 1,000-bar read.)"""
    if dbapi_connection.closed or select.select([dbapi_connection.fileno()], [], [], 0)[0]:
        raise sa.exc.DisconnectionError("the server closed this pooled connection")


class CandleReader:
    """Reads candles for a provider: a pool of ``pool`` (min, max) connections to `db_url`
    (None: the configured or embedded database, resolved by ``open``), or an injected `engine`
    used as is and not disposed by ``close``."""

    def __init__(self, db_url: str | None, pool: tuple[int, int], settings: Settings | None,
                 engine: Engine | None) -> None:
        self._db_url = db_url
        self._settings = settings
        self._pool = pool
        self.engine = engine
        self._owns_engine = engine is None
        #: The libpq URL (None until ``open`` resolves a configured database).
        self.url: str | None = (
            libpq_url(db_url) if db_url else
            libpq_url(engine.url.render_as_string(hide_password=False)) if engine is not None else None
        )
        # Compiled candle queries by request shape (see read); compiling is pure and
        # idempotent, so concurrent threads at worst compile one twice.
        self._queries: dict[tuple[Any, ...], CompiledQuery] = {}
        self._views: bool | None = None  # are 5m … 1w continuous aggregates (TimescaleDB)?

    def open(self) -> None:
        """Resolve the database, check its schema, open the pool and check it answers."""
        if self.engine is None:
            from kraken_hist.storage.migrate import prepare_database

            self.url = prepare_database(self._db_url, self._settings)
            low, high = self._pool
            # PostgreSQL's plan cache as it is (see read); no SELECT 1 at every checkout
            # (``_drop_if_closed`` instead)
            self.engine = sa.create_engine(
                sqlalchemy_url(self.url), pool_size=max(low, 1), max_overflow=high - max(low, 1),
                connect_args={"options": "-c TimeZone=UTC"},
            )
            sa.event.listen(self.engine, "checkout", _drop_if_closed)
        with self.connection() as conn:
            self._views = has_timescaledb(conn)

    def close(self) -> None:
        """Close the pool (only if this reader created it)."""
        if self.engine is not None and self._owns_engine:
            self.engine.dispose()
            self.engine = None

    @contextlib.contextmanager
    def connection(self) -> Iterator[sa.Connection]:
        if self.engine is None:
            self.open()
        assert self.engine is not None
        with translate_errors(), self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def driver(self) -> Iterator[psycopg.Connection[Any]]:
        """The psycopg connection under a pooled one, in autocommit for the time it is lent.

        The candle reads go to the driver directly: a single SELECT needs no transaction, so
        autocommit saves the BEGIN and the ROLLBACK at check-in (and psycopg keeps its
        prepared statements, which a ROLLBACK would drop); rows come back as plain tuples,
        without the SQLAlchemy result layer, which costs as much as the query itself for
        1,000 candles. The statements are still built and compiled by SQLAlchemy Core."""
        if self.engine is None:
            self.open()
        assert self.engine is not None
        with translate_errors():
            pooled = self.engine.raw_connection()
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

    def reads_views(self) -> bool:
        """Whether 5m … 1w are continuous aggregates here (TimescaleDB), asked once."""
        if self._views is None:
            with self.connection() as conn:
                self._views = has_timescaledb(conn)
        return self._views

    def compiled(self, iv: Interval, lo: datetime | None, hi: datetime | None, desc: bool,
                 limit: int | None) -> CompiledQuery:
        """The candle query of this shape, compiled once per reader (vwap at the parameter
        ``places`` for every interval above 1m)."""
        key = (iv.minutes, lo is None, hi is None, desc, limit is None)
        query = self._queries.get(key)
        if query is None:
            if self.engine is None:
                self.open()
            assert self.engine is not None
            stmt = ordered(select_candles(iv, ["-"], lo, hi, vwap_places=iv.minutes != 1), desc=desc, limit=limit)
            query = self._queries[key] = CompiledQuery.compile(stmt, self.engine.dialect)
        return query

    def read(self, name: str, iv: Interval, lo: datetime | None, hi: datetime | None, desc: bool,
             limit: int | None, places: int | None) -> list[HistoricalCandle]:
        """`name`'s candles with bucket start in ``[lo, hi)``, by time (newest first if `desc`),
        at most `limit`, vwap at `places` decimals: one query."""
        query = self.compiled(iv, lo, hi, desc, limit)
        params = query.params(symbol=name, lo=lo, hi=hi, limit=limit, places=places)
        # Plans: psycopg prepares a statement from its fifth run and PostgreSQL may then keep a
        # generic plan. That is what a continuous aggregate wants (planning its nested real-time
        # views takes 1-6 ms, running the query well under 1 ms); a read of the ``candles``
        # hypertable wants a plan for its values (a generic plan opens every chunk at start).
        reads_minutes = (iv if iv.is_stored else iv.source_interval()).minutes == 1
        prepare = False if reads_minutes and self._views else None
        with self.driver() as driver:
            rows = driver.execute(query.sql, params, prepare=prepare).fetchall()
        return candles_from_rows(rows, iv.minutes, None)

    def stream(self, name: str, iv: Interval, lo: datetime | None, hi: datetime, places: int | None,
               batch_size: int) -> Iterator[HistoricalCandle]:
        """`name`'s candles with bucket start in ``[lo, hi)`` in time order, streamed on a
        connection opened for them (``streams.open_stream``), closed with the iterator."""
        query = self.compiled(iv, lo, hi, False, None)
        params = query.params(symbol=name, lo=lo, hi=hi, places=places)
        assert self.url is not None
        with open_stream(self.url, query.sql, params, batch_size) as rows:
            yield from iter_candles(rows, iv.minutes, None)

    def fetch_candles(self, stmt: sa.Select[Any], minutes: int, registry: PairRegistry) -> list[HistoricalCandle]:
        """Candles of a select through SQLAlchemy, an aggregated vwap rounded at each pair's decimals."""
        with self.connection() as conn:
            rows = conn.execute(stmt).all()
        return candles_from_rows(rows, minutes, registry)

    def scalar(self, stmt: sa.Select[Any]) -> Any:
        with self.connection() as conn:
            return conn.execute(stmt).scalar()

    def one(self, stmt: sa.Select[Any]) -> sa.Row[Any]:
        with self.connection() as conn:
            return conn.execute(stmt).one()
