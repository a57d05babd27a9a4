"""Committing batches: one transaction per batch, a batch the database refuses for its data
bisected down to the record it refuses.

Trades, per batch and symbol under the symbol's data lock (``ownership.lock_symbols``): one
index probe asks whether any id of the batch's [lowest, highest] range is stored (Kraken ids
are contiguous) and one whether the archive owns any second of its minutes; if neither, the
payload is COPY-ed straight into ``trades``; otherwise (or on a unique violation) it takes the
staging merge (COPY into a temporary table, insert what is not stored and whose second the
archive does not own: one owner per second). The touched minutes' candles follow in the same
transaction (``candles.maintain_candles``).

Errors are sorted in two: a data error (the batch is bisected, the bad record rejected and
reported, the rest kept) and anything else (:class:`Unavailable`: the caller spills the batch
and retries later, on a fresh pool).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from typing import Any, Callable, Iterable

import psycopg
import psycopg_pool
from psycopg.copy import LibpqWriter

from kraken_hist.core.pairs import PairRegistry
from kraken_hist.storage import ownership, store
from kraken_hist.storage.db import session_options
from kraken_hist.storage.writer import spool_labels, statements
from kraken_hist.storage.writer.batches import TradeChunk
from kraken_hist.storage.writer.candles import CandleSums, maintain_candles, store_candles
from kraken_hist.storage.writer.records import decode_trade_line, minute_number, minute_start
from kraken_hist.storage.writer.spool_labels import DatabaseIdentity

logger = logging.getLogger(__name__)

#: bytes handed to libpq before waiting for the socket during a COPY: each wait gives the GIL
#: away, and getting it back from a busy producer thread takes up to the switch interval
_COPY_FLUSH_BYTES = 64 * 1024 * 1024
#: while stopping, a wait for a database connection longer than this means the database is away
_STOP_CONNECT_GRACE = 1.0
_CONNECT_SLICE = 0.1  # seconds: a connection wait is cut into slices, to notice a stop


class Unavailable(Exception):
    """The batch could not be committed for a reason other than its data: retry later."""


class _BadData(Exception):
    """The database refused the batch's data: bisect to find the record."""


def _classify(exc: BaseException) -> Exception:
    """Driver error → _BadData (bisect) or Unavailable (spill and retry)."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return _BadData(str(exc).strip())
    return Unavailable(f"{type(exc).__name__}: {str(exc).strip()}")


class Committer:
    """The flush thread's side of the database: its connection pool, the transactions, and the
    counters of what they did (``counts``, taken by the caller under its lock) and the records
    the database refused (each reported to ``on_reject`` and kept in ``rejected``).

    ``stop_requested`` (a monotonic time, set by the writer's ``stop``) shortens waits for a
    connection: a database that gives none within a short grace then is treated as down."""

    def __init__(self, url: str, *, pool_min_size: int, pool_max_size: int, connect_timeout: float,
                 build_candles: bool, registry: Callable[[], PairRegistry],
                 on_reject: Callable[[str, tuple, str], None] | None,
                 rejected: deque[tuple[str, tuple, str]]) -> None:
        self.url = url
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.connect_timeout = connect_timeout
        self.build_candles = build_candles
        self._registry = registry
        self._on_reject = on_reject
        self._price_decimals: dict[str, int] = {}
        self._pool: psycopg_pool.ConnectionPool | None = None
        self.stop_requested: float | None = None
        self.candle_sums = CandleSums()
        self.counts: dict[str, int] = {}  # not yet in the writer's stats
        self.rejected = rejected  # the last records refused, with the reason (the writer's)

    # ------------------------------------------------------------ connections
    def open_pool(self) -> psycopg_pool.ConnectionPool:
        """The pool, opened at start and again after an outage (a fresh pool connects at once,
        where a pool that lost its server reconnects on its own, slowing, back-off).

        Connections are not checked when taken (a round trip per batch): one that died while
        idle fails its batch like any outage, and the batch is spilled and retried on a new
        pool."""
        if self._pool is None:
            self._pool = psycopg_pool.ConnectionPool(
                self.url,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, math.ceil(self.connect_timeout)),
                        "options": session_options()},
                name="kraken_hist-writer",
                timeout=self.connect_timeout,
            )
            self._pool.open(wait=False)
        return self._pool

    def drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # (stopping: do not wait for a worker still trying to connect)
            pool.close(timeout=1.0 if self.stop_requested is None else 0.2)

    @contextlib.contextmanager
    def _connection(self) -> Any:
        """A pooled connection, waited for up to connect_timeout — or, while stopping, about
        _STOP_CONNECT_GRACE."""
        pool = self.open_pool()
        started = time.monotonic()
        deadline = started + self.connect_timeout
        while True:
            try:
                conn = pool.getconn(timeout=max(0.001, min(_CONNECT_SLICE, deadline - time.monotonic())))
                break
            except psycopg_pool.PoolTimeout:
                now = time.monotonic()
                stop_requested = self.stop_requested
                if now >= deadline or (stop_requested is not None
                                       and now - max(started, stop_requested) >= _STOP_CONNECT_GRACE):
                    raise psycopg_pool.PoolTimeout(f"no database connection within {now - started:.1f}s") from None
        try:
            with conn:
                yield conn
        finally:
            pool.putconn(conn)

    def identify(self, description: str) -> DatabaseIdentity:
        """The identity of the database the pool reaches (Unavailable if it does not answer)."""
        try:
            with self._connection() as conn:
                return spool_labels.read_identity(conn, description)
        except psycopg_pool.PoolTimeout as exc:
            self.drop_pool()
            raise Unavailable(str(exc)) from exc
        except psycopg.Error as exc:
            self.drop_pool()
            raise Unavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc

    # ------------------------------------------------------------ committing (bisect on bad data)
    def commit_trades(self, chunk: TradeChunk) -> None:
        """Commit a trade chunk; one the database refuses for its data is bisected until the
        bad record is found and rejected."""
        try:
            counts = self._transaction("trades", chunk)
        except _BadData as exc:
            if chunk.count == 1:
                self._reject("trades", decode_trade_line(chunk.payload), str(exc))
                return
            lines = chunk.payload.splitlines(keepends=True)
            half = len(lines) // 2
            self.commit_trades(TradeChunk.from_lines(lines[:half]))
            self.commit_trades(TradeChunk.from_lines(lines[half:]))
            return
        self._count(counts)

    def commit_rows(self, kind: str, entries: list[tuple]) -> None:
        """Commit candle or sync `entries` ((seq, accepted_at, row) tuples), consuming the
        list from the front."""
        if entries:
            self._commit_prefix(kind, entries, len(entries))

    def _commit_prefix(self, kind: str, entries: list[tuple], count: int) -> None:
        """Commit the first `count` entries and delete them from `entries`; a batch the database
        refuses for its data is bisected until the bad record is found and rejected."""
        try:
            counts = self._transaction(kind, [e[2] for e in entries[:count]])
        except _BadData as exc:
            if count == 1:
                self._reject(kind, entries[0][2], str(exc))
                del entries[0]
                return
            half = count // 2
            self._commit_prefix(kind, entries, half)
            self._commit_prefix(kind, entries, count - half)
            return
        del entries[:count]
        self._count(counts)

    def _count(self, counts: dict[str, int]) -> None:
        """Add a committed transaction's counters to ``counts``."""
        mine = self.counts
        mine["flushes"] = mine.get("flushes", 0) + 1
        for name, value in counts.items():
            mine[name] = mine.get(name, 0) + value

    def _reject(self, kind: str, row: tuple, reason: str) -> None:
        logger.error("writer: %s record refused by the database and dropped: %s (%r)", kind, reason, row,
                     extra={"event": "writer_reject"})
        self.counts[kind + "_rejected"] = self.counts.get(kind + "_rejected", 0) + 1
        self.rejected.append((kind, row, reason))
        if self._on_reject is not None:
            self._on_reject(kind, row, reason)

    # ------------------------------------------------------------ one transaction
    def _transaction(self, kind: str, rows: Any) -> dict[str, int]:
        try:
            return self._transaction_once(kind, rows)
        except Unavailable:
            self.drop_pool()
            raise

    def _transaction_once(self, kind: str, rows: Any) -> dict[str, int]:
        try:
            with self._connection() as conn:
                if kind == "trades":
                    try:
                        with conn.transaction():
                            counts = self._store_trades(conn, rows, merge=rows.overlap)
                    except psycopg.errors.UniqueViolation:
                        # stored meanwhile (every writer takes the symbol lock, so this is a last resort)
                        with conn.transaction():
                            counts = self._store_trades(conn, rows, merge=True)
                    self.candle_sums.commit()  # only now: the summaries describe what is stored
                    return counts
                with conn.transaction():
                    if kind == "candles":
                        return store_candles(conn, rows)
                    for row in rows:
                        conn.execute(statements.UPSERT_SYNC, row)
                    return {"syncs_written": len(rows)}
        except psycopg_pool.PoolTimeout as exc:
            raise Unavailable(str(exc)) from exc
        except psycopg.Error as exc:
            raise _classify(exc) from exc

    def _store_trades(self, conn: psycopg.Connection, chunk: TradeChunk, *, merge: bool) -> dict[str, int]:
        meta = chunk.meta
        cache = self.candle_sums
        cache.begin({symbol: entry[2] for symbol, entry in meta.items()})
        batch_sums = chunk.sums if self.build_candles and not merge else None
        # the locks, probes and candle checks: one statement each for all symbols, one round trip
        with conn.pipeline():
            ownership.lock_symbols(conn, meta)
            params = None if merge else statements.probe_params(meta)
            probes = [] if params is None else [
                conn.execute(statements.PROBE_TRADES, params),
                # seconds the archive owns are not ours to store: the merge leaves them out
                conn.execute(ownership.ARCHIVE_TOUCHES_ANY, params),
            ]
            checks = cache.queue_checks(conn, batch_sums) if batch_sums else None
        merge = merge or any(cursor.fetchone()[0] for cursor in probes)
        minutes: dict[str, Iterable[int]]
        if not merge:
            cursor = conn.cursor()
            with cursor.copy(statements.COPY_TRADES,
                             writer=LibpqWriter(cursor, flush_threshold=_COPY_FLUSH_BYTES)) as copy:
                copy.write(chunk.payload)
            written = chunk.count
            minutes = {symbol: entry[2] for symbol, entry in meta.items()}
        else:
            conn.execute(statements.CREATE_STAGE)
            with conn.cursor().copy(statements.COPY_STAGE) as copy:
                copy.write(chunk.payload)
            touched = [minute for _, _, symbol_minutes in meta.values() for minute in symbol_minutes]
            inserted = conn.execute(statements.MERGE_TRADES, store.identity_window(
                minute_start(min(touched)), minute_start(max(touched) + 1))).fetchall()
            written = len(inserted)
            by_symbol: dict[str, set[int]] = {}
            for symbol, when in inserted:
                by_symbol.setdefault(symbol, set()).add(minute_number(when))
            minutes = by_symbol
        counts = {
            "trades_written": written, "trades_duplicate": chunk.count - written, "merge_fallbacks": int(merge),
            "candles_rebuilt": 0, "candles_incremental": 0, "candles_fallback": 0, "candles_seeded": 0,
        }
        if self.build_candles:
            maintain_candles(conn, cache, self._decimals, minutes, None if merge else checks, batch_sums, counts,
                             fast=not merge)
        return counts

    def _decimals(self, symbol: str) -> int:
        """The pair's price decimals (looked up once per symbol: the flush asks for hundreds)."""
        places = self._price_decimals.get(symbol)
        if places is None:
            places = self._price_decimals[symbol] = self._registry().get(symbol).price_decimals
        return places
