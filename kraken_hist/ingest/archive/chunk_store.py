"""One chunk of Time and Sales into the database: its trades, the 1-minute candles of its
minutes and its claim on the archive's seconds, in one transaction.

Fast path (plain files): when no trade at all is stored in the chunk's minutes and no second
it holds became the id family's, the rows are COPYed straight into ``trades`` and the parser's
candles (exact sums) are written as they are. Otherwise (a re-import, REST or WebSocket trades
near, ids from the file) through staging: rows of id-owned seconds are removed, the rest
merged by identity (``store.merge_staged_trades``), candles rebuilt from all stored trades
(``store.rebuild_candles``). Both give the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

import psycopg

from kraken_hist.core.timeutils import floor_minute
from kraken_hist.ingest.archive.rows import TradeChunk
from kraken_hist.ingest.archive.staging import CANDLE_STAGE, TRADE_STAGE, copy_chunk, copy_trades, truncate
from kraken_hist.rules import ranges
from kraken_hist.rules import sql as sql_rules
from kraken_hist.rules.backoff import Backoff
from kraken_hist.storage import ownership, store

log = logging.getLogger(__name__)

T = TypeVar("T")
Span = tuple[datetime, datetime]
#: (inserted, already stored, candles written, left to the id family)
ChunkCounts = tuple[int, int, int, int]

ONE_SECOND = timedelta(seconds=1)
ONE_MINUTE = timedelta(minutes=1)

_MERGE_TRADES = store.merge_staged_trades(TRADE_STAGE, archive=True)
_MERGE_ID_TRADES = store.merge_staged_trades(TRADE_STAGE)

_TRADES_PRESENT = "SELECT EXISTS (SELECT 1 FROM trades WHERE symbol = %s AND time >= %s AND time < %s)"

# Staged archive rows of seconds the id family owns (given as arrays of range bounds) go.
_DROP_STAGED_IN = f"""
DELETE FROM {TRADE_STAGE} s
WHERE EXISTS (SELECT 1 FROM unnest(%s::timestamptz[], %s::timestamptz[]) AS b(lo, hi)
              WHERE s.time >= b.lo AND s.time < b.hi)
"""

# Candles the parser built for minutes that hold no other trade: the same numbers and the same
# upsert as store.rebuild_candles (Kraken's vwap from the exact sums), without reading the
# trades back.
_INSERT_CANDLES_FROM_STAGE = f"""
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT %(symbol)s, time, open, high, low, close,
       {sql_rules.kraken_vwap("notional", "volume", "%(decimals)s")},
       volume, trades, 'trades', now()
FROM {CANDLE_STAGE}
"""
_UPSERT_CANDLES_FROM_STAGE = _INSERT_CANDLES_FROM_STAGE + sql_rules.UPSERT_TRADES_CANDLE

_CANDLES_PRESENT = "SELECT EXISTS (SELECT 1 FROM candles WHERE symbol = %s AND time >= %s AND time < %s)"

# Minutes without any stored trade cannot hold a valid 'trades' candle (rebuild_candles drops such too).
_DELETE_STALE_CANDLES = """
DELETE FROM candles WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(lo)s AND time < %(hi)s
"""

#: Attempts at a chunk's transaction that the server ended to break a deadlock or a
#: serialization conflict (TimescaleDB's compression job converting the chunk being written,
#: say): the chunk is stored whole or not at all, so it is simply stored again.
CHUNK_ATTEMPTS = 5


def retried(conn: psycopg.Connection, work: Callable[[], T]) -> T:
    """`work` in one transaction on `conn`, run again (up to CHUNK_ATTEMPTS times) when the
    server rolls it back as a deadlock victim or for a serialization failure."""
    for attempt in range(1, CHUNK_ATTEMPTS + 1):
        try:
            with conn.transaction():
                return work()
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            if attempt == CHUNK_ATTEMPTS:
                raise
            log.warning("csv import: a chunk's transaction was rolled back (%s); storing it again",
                        str(exc).strip().splitlines()[0], extra={"event": "csv_import_chunk_retry"})
            time.sleep(Backoff(0.1, 1.0).delay(attempt))
    raise AssertionError("unreachable")


def store_chunk(conn: psycopg.Connection, symbol: str, decimals: int, chunk: TradeChunk, has_ids: bool,
                claim: Span | None, holes: Sequence[Span], *, shared: bool = False) -> ChunkCounts:
    """Store a chunk in its own transaction (stored again if the server rolls it back) under
    the symbol's lock: `shared` when this import's other chunks, which claim disjoint seconds,
    may be stored at the same time (every other writer of the symbol takes it exclusively)."""
    def work() -> ChunkCounts:
        ownership.lock_symbol(conn, symbol, shared=shared)
        return store_trade_chunk(conn, symbol, decimals, chunk, has_ids, claim, holes)

    return retried(conn, work)


def store_trade_chunk(conn: psycopg.Connection, symbol: str, decimals: int, chunk: TradeChunk, has_ids: bool,
                      claim: Span | None, parsed_around: Sequence[Span]) -> ChunkCounts:
    """Store a chunk, the 1-minute candles of its minutes (vwap at `decimals`) and its claim on
    the archive's seconds; returns (inserted, already stored, candles written, left to the id
    family).

    The caller holds the symbol's lock: the id family's seconds are read afresh here
    (`parsed_around` is what the parser already left out), so a backfill or stream that
    committed since the import began keeps its seconds (ownership.py).
    """
    lo = hi = None
    if chunk.rows and chunk.first_time is not None and chunk.last_time is not None:
        lo, hi = floor_minute(chunk.first_time), floor_minute(chunk.last_time) + ONE_MINUTE
    bounds = [b for b in (lo, hi, *(claim or ())) if b is not None]
    if not bounds:
        return 0, 0, 0, 0
    window = (min(bounds), max(bounds))
    present = conn.execute(_TRADES_PRESENT, (symbol, *window)).fetchone()[0]
    # A file with Kraken's ids is of the id family: merged by identity, it owns no seconds
    owned = [] if has_ids else ownership.read_id_owned(conn, symbol, *window, with_trades=present)
    counts: ChunkCounts = (0, 0, 0, 0)
    if lo is not None and hi is not None:
        assert chunk.first_time is not None and chunk.last_time is not None
        rows_span = [(ownership.second_floor(chunk.first_time), chunk.last_time + ONE_SECOND)]
        newly_owned = ranges.subtract(ranges.intersect(owned, rows_span), ownership.whole_seconds(parsed_around))
        if chunk.candles is not None and not has_ids and not present and not newly_owned:
            try:
                with conn.transaction():
                    copy_trades(conn, "trades", chunk)
                    counts = (chunk.rows, 0, write_parsed_candles(conn, symbol, decimals, chunk, lo, hi), 0)
            except psycopg.errors.UniqueViolation:
                log.info("csv import: %s rows appeared concurrently in %s..%s, deduplicating", symbol,
                         lo.isoformat(), hi.isoformat(), extra={"event": "csv_import_conflict"})
        if counts == (0, 0, 0, 0):
            counts = merge_trade_chunk(conn, symbol, decimals, chunk, has_ids, newly_owned)
    if claim is not None:
        record_claim(conn, symbol, claim, has_ids, owned)
    return counts


def record_claim(conn: psycopg.Connection, symbol: str, claim: Span, has_ids: bool, owned: Sequence[Span]) -> None:
    """Record what the file proves complete: the archive's whole seconds, or (a file with
    ids) coverage of the id family."""
    if has_ids:
        store.add_coverage(conn, symbol, ownership.ID_FILE_SOURCE, *claim)
        return
    for lo, hi in ownership.archive_claim(claim, owned):
        store.add_coverage(conn, symbol, ownership.ARCHIVE_SOURCE, lo, hi)


def merge_trade_chunk(conn: psycopg.Connection, symbol: str, decimals: int, chunk: TradeChunk, has_ids: bool,
                      id_owned: Sequence[Span]) -> ChunkCounts:
    """Staging path: drop the rows of `id_owned` seconds, insert what is not stored, rebuild
    candles. Rows with Kraken's ids merge as the id family's (archive seconds left out)."""
    assert chunk.first_time is not None and chunk.last_time is not None
    truncate(conn, TRADE_STAGE)
    copy_trades(conn, TRADE_STAGE, chunk)
    left = 0
    if id_owned and not has_ids:
        left = conn.execute(_DROP_STAGED_IN, ([a for a, _ in id_owned], [b for _, b in id_owned])).rowcount
    inserted = conn.execute(_MERGE_ID_TRADES if has_ids else _MERGE_TRADES,
                            store.identity_window(chunk.first_time, chunk.last_time)).rowcount
    candles = store.rebuild_candles(conn, symbol, chunk.first_time, chunk.last_time + ONE_SECOND,
                                    decimals=decimals) if inserted else 0
    return inserted, chunk.rows - inserted - left, candles, left


def write_parsed_candles(conn: psycopg.Connection, symbol: str, decimals: int, chunk: TradeChunk,
                         lo: datetime, hi: datetime) -> int:
    """Write the parser's candles of ``[lo, hi)`` (minutes holding only this chunk's trades)."""
    assert chunk.candles is not None
    truncate(conn, CANDLE_STAGE)
    copy_chunk(conn, CANDLE_STAGE, ("time", "open", "high", "low", "close", "notional", "volume", "trades"),
               chunk.candles, chunk.binary)
    params = {"symbol": symbol, "decimals": decimals, "lo": lo, "hi": hi}
    if conn.execute(_CANDLES_PRESENT, (symbol, lo, hi)).fetchone()[0]:
        conn.execute(_DELETE_STALE_CANDLES, params)
        written = conn.execute(_UPSERT_CANDLES_FROM_STAGE, params).rowcount
    else:  # nothing to replace (a first import): a plain insert, a third cheaper than the upsert
        written = conn.execute(_INSERT_CANDLES_FROM_STAGE, params).rowcount
    store.record_candle_change(conn, symbol, lo, hi)
    return written
