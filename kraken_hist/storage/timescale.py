"""TimescaleDB housekeeping: chunk compression past a configured age, and storage figures.

Migration 0003 sets ``trades`` and ``candles`` up for compression (segment by symbol, ordered
by time) with a compression policy per table. TimescaleDB's job scheduler runs those policies
when it is healthy; it is not always (2.28.3 on PostgreSQL 15.20 fails every job with
``cannot drop portal "" while it is being set up``), so the periodic aggregate refresh also
compresses due chunks itself (:func:`compress_due_chunks`), reading the age from the policy:
the policy's ``compress_after`` is the one setting, changed by :func:`set_compress_after`
(``kraken-hist db upgrade`` applies ``KRAKEN_HIST_COMPRESS_AFTER_DAYS``).

Everything here is a no-op on plain PostgreSQL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

import psycopg
from psycopg import sql

from kraken_hist.rules import ranges
from kraken_hist.storage.db import has_timescaledb

log = logging.getLogger(__name__)

#: Hypertables that are compressed, and how.
COMPRESSED_TABLES = ("trades", "candles")

# Uncompressed chunks of our hypertables whose whole range lies past the policy's age.
_DUE_CHUNKS = """
SELECT format('%%I.%%I', c.chunk_schema, c.chunk_name), c.hypertable_name, c.range_start, c.range_end
FROM timescaledb_information.chunks c
JOIN timescaledb_information.jobs j
  ON j.hypertable_schema = c.hypertable_schema AND j.hypertable_name = c.hypertable_name
 AND j.proc_name = 'policy_compression'
WHERE c.hypertable_schema = current_schema() AND c.hypertable_name = ANY(%(tables)s)
  AND NOT c.is_compressed
  AND c.range_end <= now() - (j.config->>'compress_after')::interval
ORDER BY c.range_start, c.hypertable_name
"""

_POLICY_AGE = """
SELECT (config->>'compress_after')::interval FROM timescaledb_information.jobs
WHERE proc_name = 'policy_compression' AND hypertable_schema = current_schema() AND hypertable_name = %s
"""


def compress_due_chunks(
    conn: psycopg.Connection, *, budget: float | None = None, busy: Sequence[tuple[datetime, datetime]] = ()
) -> int:
    """Compress the chunks of ``trades``/``candles`` older than their policy's age.

    Chunks overlapping a `busy` window (1-minute candles changed since the last refresh:
    someone is writing there, an import say) wait for a later run; compressed chunks take
    late rows too, only more slowly. No new chunk is started once `budget` seconds have
    passed. Needs an autocommit connection (each chunk is its own transaction). Returns the
    number of chunks compressed."""
    if not has_timescaledb(conn):
        return 0
    started = time.monotonic()
    done = 0
    for chunk, table, lo, hi in conn.execute(_DUE_CHUNKS, {"tables": list(COMPRESSED_TABLES)}).fetchall():
        if budget is not None and time.monotonic() - started >= budget:
            break
        if ranges.intersect([(lo, hi)], busy):
            continue
        began = time.monotonic()
        conn.execute("SELECT compress_chunk(%s::regclass, if_not_compressed => true)", (chunk,))
        done += 1
        log.info("compressed %s chunk %s [%s, %s) in %.1fs", table, chunk, lo.isoformat(), hi.isoformat(),
                 time.monotonic() - began, extra={"event": "timescale.compressed"})
    return done


def read_compress_after(conn: psycopg.Connection, table: str = "trades") -> timedelta | None:
    """The age past which `table`'s chunks are compressed; None without a policy (or TimescaleDB)."""
    if not has_timescaledb(conn):
        return None
    row = conn.execute(_POLICY_AGE, (table,)).fetchone()
    return row[0] if row else None


def set_compress_after(conn: psycopg.Connection, age: timedelta | None) -> bool:
    """Make `age` the compression age of ``trades`` and ``candles`` (None or zero: no policy,
    nothing is compressed any more; compressed chunks stay so). False on plain PostgreSQL."""
    if not has_timescaledb(conn):
        return False
    for table in COMPRESSED_TABLES:
        if read_compress_after(conn, table) == age:
            continue
        conn.execute("SELECT remove_compression_policy(%s, if_exists => true)", (table,))
        if age:
            conn.execute("SELECT add_compression_policy(%s, %s::interval)", (table, age))
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeStorage:
    """How much room the trades take. ``bytes_uncompressed``: what they would take without
    compression (table, indexes and TOAST, as TimescaleDB measured them before compressing);
    ``bytes_stored``: what they take now."""

    trades: int
    bytes_uncompressed: int
    bytes_stored: int
    chunks: int = 0
    chunks_compressed: int = 0
    compress_after: timedelta | None = None

    @property
    def per_trade_uncompressed(self) -> float | None:
        return self.bytes_uncompressed / self.trades if self.trades else None

    @property
    def per_trade_stored(self) -> float | None:
        return self.bytes_stored / self.trades if self.trades else None


def read_trade_storage(conn: psycopg.Connection, trades: int | None = None) -> TradeStorage:
    """Bytes per trade before and after compression (equal on plain PostgreSQL).
    `trades`: the row count, when the caller has counted already."""
    if trades is None:
        trades = conn.execute("SELECT count(*) FROM trades").fetchone()[0]  # type: ignore[index]
    if not has_timescaledb(conn):
        size = conn.execute("SELECT pg_total_relation_size('trades')").fetchone()[0]  # type: ignore[index]
        return TradeStorage(trades=trades, bytes_uncompressed=size, bytes_stored=size)
    stored = conn.execute("SELECT hypertable_size('trades')").fetchone()[0] or 0  # type: ignore[index]
    before, after, chunks, compressed = conn.execute(
        sql.SQL(
            "SELECT coalesce(before_compression_total_bytes, 0), coalesce(after_compression_total_bytes, 0), "
            "coalesce(total_chunks, 0), coalesce(number_compressed_chunks, 0) "
            "FROM hypertable_compression_stats('trades')"
        )
    ).fetchone() or (0, 0, 0, 0)
    return TradeStorage(
        trades=trades, bytes_uncompressed=stored - after + before, bytes_stored=stored,
        chunks=chunks, chunks_compressed=compressed, compress_after=read_compress_after(conn),
    )
