"""Keep the interval relations (5m … 1w) in step with the 1-minute candles.

One entry point, two backends:

* plain PostgreSQL (``plain``): the relations are tables; the buckets above the windows
  listed in ``candle_changes`` are recomputed level by level and the change rows consumed in
  the same transaction;
* TimescaleDB (``timescale``): the relations are hierarchical continuous aggregates;
  ``refresh_continuous_aggregate`` recomputes what TimescaleDB logged, up to the bucket in
  progress and never into it.

The windows, their widening per level and the levels' order are ``windows``'.

The aggregation is the bucket rule of ``rules.sql.bucket_columns`` (the SQL twin of
``rules.candles.resample`` over 1-minute candles; the continuous aggregates of migration 0003
spell it with TimescaleDB's first()/last(), and ``tests/test_timescaledb.py`` compares their
rows with it): first open, max high, min low, last close, summed volume and trades, vwap =
Σ(vwap·volume)/Σvolume over the 1-minute rows that have a vwap (NULL when that volume is 0).
Each level carries both sums exactly (``vwap_notional``, ``vwap_volume``), so a level built
from the one below divides the very numbers the direct 1-minute weighting divides — even where
minutes with and without vwap mix (OHLCVT imports) — and both backends give the same digits.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime

from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import check_aware
from kraken_hist.storage.db import connect, has_timescaledb
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.storage.refresh.plain import refresh_plain
from kraken_hist.storage.refresh.timescale import refresh_timescaledb
from kraken_hist.storage.refresh.windows import RefreshResult, Window, refresh_order, widen_windows

log = logging.getLogger(__name__)


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
    refresh = refresh_timescaledb if timescale else refresh_plain
    result = dataclasses.replace(refresh(db_url, canonical, lo, hi, explicit), seconds=time.monotonic() - began)
    log.info(
        "aggregates refreshed: %d symbols, %d change rows, %d buckets written, %d deleted in %.3fs",
        len(result.symbols), result.changes_consumed, sum(result.written.values()),
        sum(result.deleted.values()), result.seconds, extra={"event": "refresh.done"},
    )
    return result


__all__ = ["RefreshResult", "Window", "refresh_aggregates", "refresh_order", "widen_windows"]
