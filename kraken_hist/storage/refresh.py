"""Keep the interval relations (5m … 1w) in step with the 1-minute candles.

* Plain PostgreSQL: the relations are tables. Only buckets whose 1-minute data changed
  (``candle_changes`` rows, written by ``store.rebuild_candles``/``record_candle_change``)
  are recomputed, level by level from the one below (``REFRESH_PARENT``: 5m from 1m, 15m
  from 5m, …, 1w from 1d), and buckets left without data are deleted. Change rows are
  consumed in the same transaction as the recompute, so a crash loses nothing and rows
  committed by a concurrent writer after that delete stay for the next run.
* TimescaleDB: the relations are hierarchical continuous aggregates (the same parents);
  ``refresh_continuous_aggregate`` recomputes what TimescaleDB logged as changed, up to the
  bucket in progress and never into it (see ``_refresh_timescaledb``). It refuses to run
  inside a transaction block, so that path uses an autocommit connection and deletes the
  change rows it covered only afterwards.

The aggregation is the SQL twin of ``aggregates.resample`` over 1-minute candles and of the
continuous aggregates of migration 0003: first open, max high, min low, last close, summed
volume and trades, vwap = Σ(vwap·volume)/Σvolume over the 1-minute rows that have a vwap
(NULL when that volume is 0). Each level carries both sums exactly (``vwap_notional``,
``vwap_volume``), so a level built from the one below divides the very numbers the direct
1-minute weighting divides — even where minutes with and without vwap mix (OHLCVT
imports) — and both backends give the same digits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

import psycopg
from psycopg import sql

from kraken_hist.storage import ownership
from kraken_hist.storage.db import connect, has_timescaledb
from kraken_hist.core.intervals import INTERVAL_RELATIONS, REFRESH_PARENT, Interval
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.rules.sql import bucket_columns
from kraken_hist.storage.store import lock_symbol
from kraken_hist.storage.timescale import compress_due_chunks
from kraken_hist.core.timeutils import check_aware
from kraken_hist.rules.backoff import Backoff

log = logging.getLogger(__name__)

_MICRO = timedelta(microseconds=1)

def aggregate_columns(parent_minutes: int) -> sql.Composable:
    """The aggregate select list over a parent relation of `parent_minutes`."""
    return sql.SQL(bucket_columns(parent_minutes))


_REFRESH_LEVEL = """
WITH win (lo, hi) AS (
    SELECT * FROM unnest(%(los)s::timestamptz[], %(his)s::timestamptz[])
), built AS (
    SELECT date_bin(%(stride)s::interval, p.time, %(origin)s::timestamptz) AS bucket,
           {aggregate}
    FROM {parent} p JOIN win ON p.time >= win.lo AND p.time < win.hi
    WHERE p.symbol = %(symbol)s
    GROUP BY 1
), stale AS (
    -- Buckets of the windows that no longer have rows below them, found once as a set
    -- difference and deleted by key: no join for a planner to get wrong when statistics lag
    -- a large import (a nested loop over the CTE would be quadratic in the window).
    DELETE FROM {target} t
    WHERE t.symbol = %(symbol)s
      AND t.time >= (SELECT min(lo) FROM win) AND t.time < (SELECT max(hi) FROM win)
      AND t.time = ANY (ARRAY(
          SELECT x.time FROM {target} x JOIN win ON x.time >= win.lo AND x.time < win.hi
          WHERE x.symbol = %(symbol)s  -- and, as an index bound whatever the plan:
            AND x.time >= (SELECT min(lo) FROM win) AND x.time < (SELECT max(hi) FROM win)
          EXCEPT
          SELECT bucket FROM built))
    RETURNING 1
), written AS (
    INSERT INTO {target} AS t (symbol, time, open, high, low, close, vwap, volume, trades, vwap_volume,
                               vwap_notional)
    SELECT %(symbol)s, bucket, open, high, low, close, vwap, volume, trades, vwap_volume, vwap_notional
    FROM built
    ON CONFLICT (symbol, time) DO UPDATE
    SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
        vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
        vwap_volume = EXCLUDED.vwap_volume, vwap_notional = EXCLUDED.vwap_notional
    WHERE (t.open, t.high, t.low, t.close, t.vwap, t.volume, t.trades, t.vwap_volume, t.vwap_notional)
          IS DISTINCT FROM
          (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
           EXCLUDED.volume, EXCLUDED.trades, EXCLUDED.vwap_volume, EXCLUDED.vwap_notional)
    RETURNING 1
)
SELECT (SELECT count(*) FROM stale), (SELECT count(*) FROM written)
"""

Window = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshResult:
    """What one refresh did. ``written``/``deleted`` count buckets per interval (minutes);
    they stay empty on TimescaleDB, which does not report them."""

    timescaledb: bool
    symbols: tuple[str, ...]
    changes_consumed: int
    windows: dict[str, list[Window]] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)
    deleted: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: Symbols whose refresh failed (plain PostgreSQL), with the one-line reason: their changes
    #: stay queued and the other symbols were refreshed all the same.
    failed: dict[str, str] = field(default_factory=dict)
    chunks_compressed: int = 0  # TimescaleDB: chunks past the configured age compressed by this run

    def to_dict(self) -> dict[str, Any]:
        return {
            "timescaledb": self.timescaledb,
            "symbols": list(self.symbols),
            "changes_consumed": self.changes_consumed,
            "windows": {
                s: [[lo.isoformat(), hi.isoformat()] for lo, hi in ws] for s, ws in self.windows.items()
            },
            "written": {str(k): v for k, v in self.written.items()},
            "deleted": {str(k): v for k, v in self.deleted.items()},
            "chunks_compressed": self.chunks_compressed,
            "failed": dict(self.failed),
            "seconds": round(self.seconds, 6),
        }


def merge_windows(windows: Iterable[Window]) -> list[Window]:
    """Sorted, disjoint union of half-open windows (touching windows are joined)."""
    out: list[Window] = []
    for lo, hi in sorted(windows):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def widen_windows(windows: Iterable[Window], interval: Interval) -> list[Window]:
    """Each window widened to whole buckets of `interval`, then merged."""
    return merge_windows((interval.bucket_start(lo), interval.bucket_end(hi - _MICRO)) for lo, hi in windows)


def refresh_order() -> list[int]:
    """Intervals in the order the hierarchical refresh must visit them (parents first)."""
    order: list[int] = []
    pending = dict(REFRESH_PARENT)
    done = {1}
    while pending:
        ready = sorted(m for m, parent in pending.items() if parent in done)
        if not ready:
            raise RuntimeError(f"REFRESH_PARENT has a cycle or an unknown parent: {pending}")
        for minutes in ready:
            order.append(minutes)
            done.add(minutes)
            del pending[minutes]
    return order


def refresh_aggregates(
    db_url: str,
    symbol: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    registry: PairRegistry | None = None,
) -> RefreshResult:
    """Bring the interval relations up to date with the 1-minute candles (`symbol`: any name
    `registry`, default the database's, knows).

    Without `start`/`end`, recompute what ``candle_changes`` says changed (and consume those
    rows). With either, recompute that window (open ends: the stored data's ends) whatever
    the change rows say. Safe to run concurrently: work on a symbol is serialised by an
    advisory lock, and every write is an idempotent upsert.
    """
    began = time.monotonic()
    pairs = registry if registry is not None else database_registry(db_url)
    canonical = pairs.normalize(symbol) if symbol is not None else None
    lo = check_aware(start, "start") if start is not None else None
    hi = check_aware(end, "end") if end is not None else None
    if lo is not None and hi is not None and hi <= lo:
        raise ValueError(f"end {hi.isoformat()} must be after start {lo.isoformat()}")
    explicit = start is not None or end is not None
    with connect(db_url) as conn:
        timescale = has_timescaledb(conn)
        conn.rollback()
    if timescale:
        result = _refresh_timescaledb(db_url, canonical, lo, hi, explicit)
    else:
        result = _refresh_plain(db_url, canonical, lo, hi, explicit)
    result = RefreshResult(
        timescaledb=result.timescaledb,
        symbols=result.symbols,
        changes_consumed=result.changes_consumed,
        windows=result.windows,
        written=result.written,
        deleted=result.deleted,
        seconds=time.monotonic() - began,
        failed=result.failed,
        chunks_compressed=result.chunks_compressed,
    )
    log.info(
        "aggregates refreshed: %d symbols, %d change rows, %d buckets written, %d deleted in %.3fs",
        len(result.symbols), result.changes_consumed, sum(result.written.values()),
        sum(result.deleted.values()), result.seconds, extra={"event": "refresh.done"},
    )
    return result


# --- plain PostgreSQL -------------------------------------------------------------------


def _refresh_plain(
    db_url: str, symbol: str | None, start: datetime | None, end: datetime | None, explicit: bool,
    workers: int = 2,
) -> RefreshResult:
    """Per symbol, one transaction: its change rows consumed and its levels recomputed. Many
    symbols (an archive's) are shared among `workers` connections: aggregating is the
    server's CPU work, and symbols never wait for one another."""
    with connect(db_url) as conn:
        symbols = [symbol] if symbol else _symbols_to_refresh(conn, explicit)
    outcomes: dict[str, _SymbolRefresh] = {}

    def run(names: list[str]) -> None:
        with connect(db_url) as conn:
            for name in names:
                outcomes[name] = _refresh_symbol(conn, name, start, end, explicit)

    shares = [symbols[i::workers] for i in range(min(workers, len(symbols)))]
    if len(shares) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(shares), thread_name_prefix="refresh") as pool:
            for future in [pool.submit(run, share) for share in shares]:
                future.result()
    elif shares:
        run(shares[0])
    written = {m: 0 for m in refresh_order()}
    deleted = dict.fromkeys(written, 0)
    for outcome in outcomes.values():
        for minutes in written:
            written[minutes] += outcome.written.get(minutes, 0)
            deleted[minutes] += outcome.deleted.get(minutes, 0)
    return RefreshResult(
        timescaledb=False,
        symbols=tuple(name for name in symbols if outcomes[name].windows),
        changes_consumed=sum(outcome.consumed for outcome in outcomes.values()),
        windows={name: outcomes[name].windows for name in symbols if outcomes[name].windows},
        written=written,
        deleted=deleted,
        failed={name: outcome.failed for name, outcome in outcomes.items() if outcome.failed},
    )


@dataclass(slots=True)
class _SymbolRefresh:
    windows: list[Window] = field(default_factory=list)
    consumed: int = 0
    written: dict[int, int] = field(default_factory=dict)
    deleted: dict[int, int] = field(default_factory=dict)
    failed: str = ""


def _refresh_symbol(conn: psycopg.Connection, name: str, start: datetime | None, end: datetime | None,
                    explicit: bool) -> _SymbolRefresh:
    out = _SymbolRefresh(written=dict.fromkeys(refresh_order(), 0), deleted=dict.fromkeys(refresh_order(), 0))
    try:
        with conn.transaction():
            lock_symbol(conn, "refresh", name)
            # the symbol's data lock, shared: wait for a writer's transaction in flight (its
            # candles and change rows commit together) and keep writers out until done
            ownership.lock_symbol(conn, name, shared=True)
            if explicit:
                windows = _explicit_window(conn, name, start, end)
            else:
                rows = conn.execute(
                    "DELETE FROM candle_changes WHERE symbol = %s RETURNING start_time, end_time", (name,)
                ).fetchall()
                windows = merge_windows((row[0], row[1]) for row in rows)
                out.consumed = len(rows)
            if windows:
                _refresh_levels(conn, name, windows, out.written, out.deleted)
    except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
        if conn.broken:
            raise
        # this symbol's data cannot be aggregated (its transaction rolled back, so its
        # changes stay queued): the others are refreshed all the same. A missing table,
        # an outage and the like are everyone's problem and are raised.
        out.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.error("aggregate refresh of %s failed: %s", name, out.failed, extra={"event": "refresh.symbol_failed"})
        return _SymbolRefresh(failed=out.failed)
    out.windows = windows
    return out


def _symbols_to_refresh(conn: psycopg.Connection, explicit: bool) -> list[str]:
    if not explicit:
        return [r[0] for r in conn.execute("SELECT DISTINCT symbol FROM candle_changes ORDER BY 1")]
    # Every symbol with 1-minute candles, by a skip scan of the primary key.
    rows = conn.execute(
        """
        WITH RECURSIVE s(symbol) AS (
            SELECT min(symbol) FROM candles
            UNION ALL
            SELECT (SELECT min(c.symbol) FROM candles c WHERE c.symbol > s.symbol)
            FROM s WHERE s.symbol IS NOT NULL
        )
        SELECT symbol FROM s WHERE symbol IS NOT NULL
        """
    ).fetchall()
    return [r[0] for r in rows]


def _explicit_window(
    conn: psycopg.Connection, symbol: str, start: datetime | None, end: datetime | None
) -> list[Window]:
    if start is None or end is None:
        first, last = conn.execute(
            "SELECT min(time), max(time) FROM candles WHERE symbol = %s", (symbol,)
        ).fetchone() or (None, None)
        if first is None:
            return []
        start = start if start is not None else first
        end = end if end is not None else last + timedelta(minutes=1)
        if end <= start:
            return []
    return [(start, end)]


def _refresh_levels(
    conn: psycopg.Connection,
    symbol: str,
    minute_windows: list[Window],
    written: dict[int, int],
    deleted: dict[int, int],
) -> None:
    """Recompute, parents first, every bucket above `minute_windows`."""
    windows_at = {1: widen_windows(minute_windows, Interval(1))}
    for minutes in refresh_order():
        parent = REFRESH_PARENT[minutes]
        interval = Interval(minutes)
        windows = widen_windows(windows_at[parent], interval)
        windows_at[minutes] = windows
        statement = sql.SQL(_REFRESH_LEVEL).format(
            aggregate=aggregate_columns(parent),
            parent=sql.Identifier(INTERVAL_RELATIONS[parent]),
            target=sql.Identifier(INTERVAL_RELATIONS[minutes]),
        )
        row = conn.execute(
            statement,
            {
                "los": [w[0] for w in windows],
                "his": [w[1] for w in windows],
                "stride": interval.delta,
                "origin": interval.origin,
                "symbol": symbol,
            },
        ).fetchone()
        assert row is not None
        deleted[minutes] += row[0]
        written[minutes] += row[1]


# --- TimescaleDB ----------------------------------------------------------------------------

#: How long a refresh waits, in total, for a concurrent refresh of the same aggregate (a
#: TimescaleDB policy job, say) to finish before it gives up.
CONCURRENT_REFRESH_WAIT = 60.0
#: Seconds a periodic refresh may spend starting to compress chunks past the configured age.
COMPRESS_BUDGET = 30.0


def _refresh_timescaledb(
    db_url: str, symbol: str | None, start: datetime | None, end: datetime | None, explicit: bool
) -> RefreshResult:
    """Materialize every level, parents first, up to the start of its bucket in progress.

    TimescaleDB logs every change to ``candles`` (and to each aggregate's materialization)
    itself, so ``refresh_continuous_aggregate(rel, NULL, <bucket in progress>)`` recomputes
    exactly the invalidated buckets, wherever they are, and moves the watermark no further
    than the bucket in progress: that bucket is never materialized, real-time aggregation
    keeps it current. An explicit window (an import's, say) is recomputed alone, whatever was
    logged (``force``): refreshing everything pending besides would redo what a writer beside
    it keeps adding (an import's other connection), once per window.
    ``candle_changes`` rows (kept for plain PostgreSQL) are consumed by id after success.
    A periodic refresh (no window, all symbols) also compresses chunks past the configured age.
    Runs on an autocommit connection: refresh_continuous_aggregate refuses transaction blocks.
    """
    compressed = 0
    with connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended('refresh:timescaledb', 0))")
        try:
            ids: list[int] = []
            windows_by_symbol: dict[str, list[Window]] = {}
            if explicit:
                for name in [symbol] if symbol else _symbols_to_refresh(conn, True):
                    windows = _explicit_window(conn, name, start, end)
                    if windows:
                        windows_by_symbol[name] = windows
            else:
                rows = conn.execute(
                    "SELECT id, symbol, start_time, end_time FROM candle_changes "
                    "WHERE %s::text IS NULL OR symbol = %s",
                    (symbol, symbol),
                ).fetchall()
                ids = [r[0] for r in rows]
                by_symbol: dict[str, list[Window]] = {}
                for _id, name, lo, hi in rows:
                    by_symbol.setdefault(name, []).append((lo, hi))
                windows_by_symbol = {name: merge_windows(ws) for name, ws in sorted(by_symbol.items())}
            changed = merge_windows(w for ws in windows_by_symbol.values() for w in ws)
            forced = changed if explicit else []
            now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            for minutes in refresh_order():
                interval = Interval(minutes)
                relation = INTERVAL_RELATIONS[minutes]
                in_progress = interval.bucket_start(now)
                if not any(lo < in_progress for lo, _hi in widen_windows(changed, interval)):
                    # No complete bucket of this level changed (nothing did, or only buckets in
                    # progress): nothing to materialize. Real-time aggregation serves whatever lies
                    # past the watermark, so a bucket completed meanwhile is right without it.
                    continue
                if not explicit:
                    _refresh_cagg(conn, relation, None, in_progress)
                    continue
                # An explicit window is recomputed whatever was logged (force), from the watermark
                # down when it lies beyond it: a refresh ending past the watermark moves it, and
                # unmaterialized rows before the window would be hidden until the next refresh.
                watermark = _watermark(conn, relation)
                for lo, hi in widen_windows(forced, interval):
                    start = None if watermark is None else min(lo, watermark)
                    hi = min(hi, in_progress)
                    if start is None or start < hi:
                        _refresh_cagg(conn, relation, start, hi, force=True)
            if ids:
                conn.execute("DELETE FROM candle_changes WHERE id = ANY(%s)", (ids,))
            if not explicit and symbol is None:
                busy = merge_windows(
                    [w for ws in windows_by_symbol.values() for w in ws]
                    + [(r[0], r[1]) for r in conn.execute("SELECT start_time, end_time FROM candle_changes")]
                )
                compressed = compress_due_chunks(conn, budget=COMPRESS_BUDGET, busy=busy)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended('refresh:timescaledb', 0))")
    return RefreshResult(
        timescaledb=True, symbols=tuple(windows_by_symbol), changes_consumed=len(ids),
        windows=windows_by_symbol, chunks_compressed=compressed,
    )


# (NULL while nothing is materialized: the watermark is then the type's minimum, 4714 BC)
_WATERMARK = """
SELECT NULLIF(greatest(_timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark(mat_hypertable_id)),
                       '0001-01-01T00:00:00Z'), '0001-01-01T00:00:00Z')
FROM _timescaledb_catalog.continuous_agg
WHERE user_view_schema = current_schema() AND user_view_name = %s
"""


def _watermark(conn: psycopg.Connection, relation: str) -> datetime | None:
    """Where `relation`'s materialized data ends (real-time aggregation serves what follows);
    None when nothing is materialized."""
    row = conn.execute(_WATERMARK, (relation,)).fetchone()
    if row is None:
        raise psycopg.errors.UndefinedTable(f'continuous aggregate "{relation}" does not exist')
    return row[0]


def _refresh_cagg(
    conn: psycopg.Connection, relation: str, lo: datetime | None, hi: datetime, *, force: bool = False
) -> None:
    """CALL refresh_continuous_aggregate in one pass (a manual refresh otherwise works in
    batches of 10 buckets: ~900 statements for a month of 5-minute buckets), waiting out a
    concurrent refresh of the same aggregate (TimescaleDB refuses overlapping ones at once
    rather than queueing them)."""
    statement = sql.SQL(
        "CALL refresh_continuous_aggregate({}, {}, {}, force => {}, options => '{{\"buckets_per_batch\": 0}}')"
    ).format(sql.Literal(relation), sql.Literal(lo), sql.Literal(hi), sql.Literal(force))
    deadline = time.monotonic() + CONCURRENT_REFRESH_WAIT
    waits = Backoff(0.05, 2.0)
    attempt = 0
    while True:
        try:
            conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            attempt += 1
            pause = waits.delay(attempt)
            if time.monotonic() + pause > deadline:
                raise
            log.info("refresh of %s waits for a concurrent refresh", relation, extra={"event": "refresh.wait"})
            time.sleep(pause)
