"""How the backfill stores one page: trades, their minutes' candles, coverage, refused trades and
the resume point, in the caller's one transaction — so a run killed at any instant resumes from
"pages 1..k stored", never half a page."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg

from kraken_hist.core.types import HistoricalTrade, Refused, TradeRecord, TradeSource
from kraken_hist.storage import ownership, store

logger = logging.getLogger("kraken_hist.ingest.backfill")

SYNC_TYPE = "trades"
COVERAGE_SOURCE = "rest"

Trade = HistoricalTrade | TradeRecord

_MERGE_STAGED = store.merge_staged_trades("trades_staging")


def check_batch(symbol: str, batch: list[Trade]) -> None:
    """Refuse a batch that cannot be right before it reaches the database (cheap checks:
    the records' own constructors validated the rest)."""
    for t in batch:
        if t.symbol != symbol:
            raise ValueError(f"trade {t.trade_id} is for {t.symbol}, not {symbol}")
        if t.price <= 0 or t.volume < 0:
            raise ValueError(f"trade {t.trade_id} of {symbol} has price {t.price} and volume {t.volume}")


class TradeStaging:
    """The session's temporary table trades are COPYed into before the merge; one per
    connection (created on its first use, emptied at every commit)."""

    def __init__(self) -> None:
        self.ready = False

    def insert(self, conn: psycopg.Connection, symbol: str, batch: list[Trade], source: TradeSource) -> int:
        """Merge `batch` into ``trades``; returns how many were new."""
        if not batch:
            return 0
        if not self.ready:
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS trades_staging "
                "(LIKE trades INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self.ready = True
        with conn.cursor() as cur:
            with cur.copy(
                "COPY trades_staging (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
            ) as copy:
                src = source.value
                for t in batch:
                    copy.write_row((symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, src))
            # (symbol, trade_id) is a trade's identity; on TimescaleDB the key also holds time,
            # so duplicates are recognised here and not by ON CONFLICT alone. Seconds the
            # archive owns are left to it (ownership.py).
            cur.execute(_MERGE_STAGED, store.identity_window(min(t.time for t in batch), max(t.time for t in batch)))
            inserted = cur.rowcount
            cur.execute("TRUNCATE trades_staging")
        return inserted


def write_page(
    conn: psycopg.Connection,
    staging: TradeStaging,
    symbol: str,
    batch: list[Trade],
    *,
    source: TradeSource,
    decimals: int,
    covered: tuple[datetime, datetime] | None,
    refused: Sequence[Refused],
    cursor: str | None,
    resume_time: datetime | None,
) -> int:
    """Inside the caller's transaction: lock the symbol, merge `batch`, rebuild the candles of the
    minutes it touches, add `covered`, record `refused` and, when `cursor` is given, advance the
    resume point. Returns how many trades were new."""
    ownership.lock_symbol(conn, symbol)
    inserted = staging.insert(conn, symbol, batch, source)
    if batch:
        times = [t.time for t in batch]
        store.rebuild_candles(conn, symbol, min(times), max(times) + timedelta(microseconds=1), decimals=decimals)
    if covered is not None:
        store.add_coverage(conn, symbol, source.value, covered[0], covered[1])
    if refused:
        store.write_refused_trades(conn, symbol, refused, source.value)
    if cursor is not None:
        last_time = resume_time or (covered[1] if covered else batch[-1].time if batch else None)
        last_id = max((t.trade_id for t in batch), default=None)
        advance_resume_point(conn, symbol, cursor, last_time, last_id)
    return inserted


def advance_resume_point(
    conn: psycopg.Connection, symbol: str, cursor: str, last_time: datetime | None, last_id: int | None
) -> None:
    """Move sync_status(symbol, 'trades') to `cursor` — never backwards."""
    current = store.read_sync_status(conn, symbol, SYNC_TYPE)
    if current is not None and current["cursor"] is not None and int(current["cursor"]) > int(cursor):
        # another run (or an import) is already further: never move the resume point back
        logger.debug("%s: resume point %s is ahead of %s; left as is", symbol, current["cursor"], cursor)
        return
    if last_id is None and current is not None:
        last_id = current["last_trade_id"]
    store.write_sync_status(
        conn, symbol, SYNC_TYPE, last_time=last_time, cursor=cursor, last_trade_id=last_id,
        details={"source": COVERAGE_SOURCE},
    )
