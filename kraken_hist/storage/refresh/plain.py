"""The aggregate refresh on plain PostgreSQL, where the interval relations are tables.

Only buckets whose 1-minute data changed (``candle_changes`` rows, written by
``store.rebuild_candles``/``record_candle_change``) are recomputed, level by level from the one
below (``REFRESH_PARENT``: 5m from 1m, 15m from 5m, …, 1w from 1d), with the bucket rule of
``rules.sql.bucket_columns``; buckets left without data are deleted. A symbol's change rows are
consumed in the transaction of its recompute, so a crash loses nothing and rows committed by a
concurrent writer after that delete stay for the next run.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from kraken_hist.core.intervals import INTERVAL_RELATIONS, REFRESH_PARENT, Interval
from kraken_hist.rules import ranges
from kraken_hist.rules.sql import bucket_columns
from kraken_hist.storage import ownership
from kraken_hist.storage.db import connect
from kraken_hist.storage.refresh.windows import (
    RefreshResult,
    Window,
    read_explicit_window,
    read_symbols_to_refresh,
    refresh_order,
    widen_windows,
)
from kraken_hist.storage.store import lock_symbol

log = logging.getLogger(__name__)


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


def refresh_plain(
    db_url: str, symbol: str | None, start: datetime | None, end: datetime | None, explicit: bool,
    workers: int = 2,
) -> RefreshResult:
    """Per symbol, one transaction: its change rows consumed and its levels recomputed. Many
    symbols (an archive's) are shared among `workers` connections: aggregating is the
    server's CPU work, and symbols never wait for one another."""
    with connect(db_url) as conn:
        symbols = [symbol] if symbol else read_symbols_to_refresh(conn, explicit)
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
                windows = read_explicit_window(conn, name, start, end)
            else:
                rows = conn.execute(
                    "DELETE FROM candle_changes WHERE symbol = %s RETURNING start_time, end_time", (name,)
                ).fetchall()
                windows = ranges.normalize((row[0], row[1]) for row in rows)
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
