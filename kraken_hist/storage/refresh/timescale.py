"""The aggregate refresh on TimescaleDB, where the interval relations are hierarchical
continuous aggregates (the same parents as the plain tables).

``refresh_continuous_aggregate`` recomputes what TimescaleDB logged as changed, up to the bucket
in progress and never into it (see ``refresh_timescaledb``). It refuses to run inside a
transaction block, so this path uses an autocommit connection and deletes the change rows it
covered only afterwards.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import psycopg
from psycopg import sql

from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.rules import ranges
from kraken_hist.rules.backoff import Backoff
from kraken_hist.storage.db import connect
from kraken_hist.storage.refresh import windows as plan
from kraken_hist.storage.refresh.windows import RefreshResult, Window
from kraken_hist.storage.timescale import compress_due_chunks

log = logging.getLogger(__name__)

#: How long a refresh waits, in total, for a concurrent refresh of the same aggregate (a
#: TimescaleDB policy job, say) to finish before it gives up.
CONCURRENT_REFRESH_WAIT = 60.0
#: Seconds a periodic refresh may spend starting to compress chunks past the configured age.
COMPRESS_BUDGET = 30.0


def refresh_timescaledb(
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
            by_symbol: dict[str, list[Window]] = {}
            if explicit:
                for name in [symbol] if symbol else plan.read_symbols_to_refresh(conn, True):
                    windows = plan.read_explicit_window(conn, name, start, end)
                    if windows:
                        by_symbol[name] = windows
            else:
                rows = conn.execute(
                    "SELECT id, symbol, start_time, end_time FROM candle_changes "
                    "WHERE %s::text IS NULL OR symbol = %s",
                    (symbol, symbol),
                ).fetchall()
                ids = [r[0] for r in rows]
                by_symbol = plan.windows_by_symbol((name, lo, hi) for _id, name, lo, hi in rows)
            changed = ranges.union(*by_symbol.values())
            forced = changed if explicit else []
            now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            for minutes in plan.refresh_order():
                interval = Interval(minutes)
                relation = INTERVAL_RELATIONS[minutes]
                in_progress = interval.bucket_start(now)
                if not any(lo < in_progress for lo, _hi in plan.widen_windows(changed, interval)):
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
                for lo, hi in plan.widen_windows(forced, interval):
                    start = None if watermark is None else min(lo, watermark)
                    hi = min(hi, in_progress)
                    if start is None or start < hi:
                        _refresh_cagg(conn, relation, start, hi, force=True)
            if ids:
                conn.execute("DELETE FROM candle_changes WHERE id = ANY(%s)", (ids,))
            if not explicit and symbol is None:
                busy = ranges.union(
                    *by_symbol.values(),
                    [(r[0], r[1]) for r in conn.execute("SELECT start_time, end_time FROM candle_changes")],
                )
                compressed = compress_due_chunks(conn, budget=COMPRESS_BUDGET, busy=busy)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended('refresh:timescaledb', 0))")
    return RefreshResult(
        timescaledb=True, symbols=tuple(by_symbol), changes_consumed=len(ids),
        windows=by_symbol, chunks_compressed=compressed,
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
