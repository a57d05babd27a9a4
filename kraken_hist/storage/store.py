"""SQL building blocks shared by every writer: candles from trades, coverage, sync status.

All functions take an open psycopg connection and run inside the caller's transaction,
so a writer can store a page of trades, rebuild its minutes' candles and advance its
resume point atomically. Nothing here commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from kraken_hist.rules.sql import MINUTE_CANDLES_FROM_TRADES, UPSERT_TRADES_CANDLE
from kraken_hist.storage import ownership
from kraken_hist.core.bounds import trade_id_problem
from kraken_hist.storage.db import number_array, text_array
from kraken_hist.core.timeutils import check_aware, floor_minute

_REBUILD_CANDLES = f"""
WITH built AS ({MINUTE_CANDLES_FROM_TRADES}
), stale AS (
    -- Found once as a set difference and deleted by key: no join for a planner to get wrong
    -- when statistics lag a large import (a nested loop over the CTE is quadratic).
    DELETE FROM candles c
    WHERE c.symbol = %(symbol)s AND c.time >= %(start)s AND c.time < %(end)s
      AND c.time = ANY (ARRAY(
          SELECT time FROM candles
          WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(start)s AND time < %(end)s
          EXCEPT
          SELECT minute FROM built))
    RETURNING 1
)
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT %(symbol)s, minute, open, high, low, close, vwap, volume, trades, 'trades', now()
FROM built
{UPSERT_TRADES_CANDLE}"""


#: The same Kraken trade reaches us with times a few microseconds apart (REST's float seconds,
#: the WebSocket's RFC 3339). Stored copies of a batch's trades are looked for within this much
#: of the batch's times: on TimescaleDB, where the trade key holds time, that bound lets the
#: planner read the one or two chunks concerned instead of every chunk (~600 for BTC/USD's
#: history: 45-108 ms a probe instead of under 1 ms). Identity stays (symbol, trade_id).
IDENTITY_TIME_SLACK = timedelta(minutes=1)


def identity_window(first: datetime, last: datetime) -> dict[str, datetime]:
    """The ``lo``/``hi`` parameters of :func:`merge_staged_trades` and of the writers' probes
    for a batch whose trades lie in ``[first, last]``."""
    return {"lo": check_aware(first) - IDENTITY_TIME_SLACK, "hi": check_aware(last) + IDENTITY_TIME_SLACK}


def merge_staged_trades(stage: str, *, archive: bool = False, returning: bool = False) -> str:
    """INSERT into ``trades`` the rows of temp table `stage` that are not stored yet.

    (symbol, trade_id) is a trade's identity, recognised here rather than by ON CONFLICT
    alone (on TimescaleDB the key also holds time). Stored trades are looked for between the
    named parameters ``%(lo)s`` and ``%(hi)s`` (:func:`identity_window` of the stage's times).
    An id-family writer leaves out the seconds the archive owns; the archive importer removes
    the id family's seconds from its stage first (``ownership``: one owner per second). Run
    it under ``ownership.lock_symbol``.
    """
    owner = "" if archive else "AND NOT " + ownership.ARCHIVE_OWNED.format(alias="s")
    return f"""
INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
SELECT DISTINCT ON (s.symbol, s.trade_id)
       s.symbol, s.trade_id, s.time, s.price, s.volume, s.side, s.ord_type, s.source
FROM {stage} s
WHERE NOT EXISTS (SELECT 1 FROM trades t
                  WHERE t.symbol = s.symbol AND t.trade_id = s.trade_id
                    AND t.time >= %(lo)s AND t.time <= %(hi)s)
  {owner}
ORDER BY s.symbol, s.trade_id, s.ctid
ON CONFLICT DO NOTHING
{"RETURNING symbol, time" if returning else ""}
"""


def minute_window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """Widen ``[start, end)`` to whole minutes: floor the start, ceil the end."""
    lo = floor_minute(start)
    hi = floor_minute(end)
    if hi < check_aware(end):
        hi += timedelta(minutes=1)
    return lo, max(hi, lo + timedelta(minutes=1))


def rebuild_candles(conn: psycopg.Connection, symbol: str, start: datetime, end: datetime, *, decimals: int) -> int:
    """Rebuild the 1-minute candles of every minute touching ``[start, end)`` from **all**
    stored trades of those minutes (a minute split across pages comes out whole).

    Candles of minutes that no longer hold trades are removed if they were built from
    trades; exchange candles in minutes that now hold trades are replaced (trades are
    authoritative). vwap at the pair's price `decimals`. Records the window in
    ``candle_changes``. Returns candles written.
    """
    lo, hi = minute_window(start, end)
    cur = conn.execute(_REBUILD_CANDLES, {"symbol": symbol, "start": lo, "end": hi, "decimals": decimals})
    record_candle_change(conn, symbol, lo, hi)
    return cur.rowcount


def record_candle_change(conn: psycopg.Connection, symbol: str, start: datetime, end: datetime) -> None:
    """Note that 1-minute candles in ``[start, end)`` changed, for the incremental aggregate refresh."""
    lo, hi = minute_window(start, end)
    record_candle_minute_changes(conn, [symbol], [int(lo.timestamp()) // 60], [int(hi.timestamp()) // 60])


def record_candle_minute_changes(conn: psycopg.Connection, symbols: Sequence[str], starts: Sequence[int],
                                 ends: Sequence[int]) -> None:
    """:func:`record_candle_change` for many windows at once, given in minute numbers (since the
    epoch): one statement for every pair of a writer's batch."""
    if symbols:
        conn.execute(
            "INSERT INTO candle_changes (symbol, start_time, end_time) SELECT s, to_timestamp(lo * 60), "
            "to_timestamp(hi * 60) FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(s, lo, hi)",
            (text_array(symbols), number_array(starts), number_array(ends)))


# An id-bearing source never claims what the archive owns (ownership.py: one owner per second).
_ADD_COVERAGE = """
INSERT INTO coverage AS c (symbol, source, ranges)
SELECT u.symbol, %(source)s,
       range_agg(tstzrange(u.lo, u.hi, '[)'))
       - coalesce((SELECT ranges FROM coverage
                   WHERE symbol = u.symbol AND source = 'csv' AND %(source)s <> 'csv'),
                  '{}'::tstzmultirange)
FROM unnest(%(symbol)s::text[], %(lo)s::timestamptz[], %(hi)s::timestamptz[]) AS u(symbol, lo, hi)
GROUP BY u.symbol
ON CONFLICT (symbol, source) DO UPDATE
SET ranges = c.ranges + EXCLUDED.ranges, updated_at = now()
"""


def add_coverage(conn: psycopg.Connection, symbol: str, source: str, start: datetime, end: datetime) -> None:
    """Record ``[start, end)`` as known complete for `symbol` from `source` (merged, idempotent);
    REST/WebSocket coverage leaves out the seconds the archive owns."""
    add_coverage_many(conn, source, [(symbol, start, end)])


def add_coverage_many(conn: psycopg.Connection, source: str, spans: Iterable[tuple[str, datetime, datetime]]) -> None:
    """:func:`add_coverage` for many (symbol, start, end) spans of one source, in one statement."""
    kept = [(symbol, check_aware(start, "start"), check_aware(end, "end")) for symbol, start, end in spans]
    kept = [span for span in kept if span[1] < span[2]]
    if kept:
        conn.execute(_ADD_COVERAGE, {"source": source, "symbol": text_array(s[0] for s in kept),
                                     "lo": text_array(s[1].isoformat() for s in kept),
                                     "hi": text_array(s[2].isoformat() for s in kept)})


def read_coverage(
    conn: psycopg.Connection, symbol: str, source: str | None = None
) -> list[tuple[datetime, datetime]]:
    """Covered ranges of `symbol` (of one source, or of all merged), sorted and disjoint."""
    rows = conn.execute(
        """
        SELECT lower(r), upper(r)
        FROM (SELECT unnest(range_agg(ranges)) AS r
              FROM coverage WHERE symbol = %s AND (%s::text IS NULL OR source = %s)) merged
        ORDER BY 1
        """,
        (symbol, source, source),
    ).fetchall()
    return [(row[0], row[1]) for row in rows if row[0] is not None]


def write_sync_status(
    conn: psycopg.Connection,
    symbol: str,
    data_type: str,
    *,
    last_time: datetime | None,
    cursor: str | None = None,
    last_trade_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Upsert how far `data_type` ingestion of `symbol` has come (the resume point)."""
    conn.execute(
        """
        INSERT INTO sync_status AS s (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, now())
        ON CONFLICT (symbol, data_type) DO UPDATE
        SET last_time = EXCLUDED.last_time, cursor = EXCLUDED.cursor,
            last_trade_id = EXCLUDED.last_trade_id,
            details = s.details || EXCLUDED.details, updated_at = now()
        """,
        (symbol, data_type, last_time, cursor, last_trade_id, Jsonb(details or {})),
    )


def read_sync_status(conn: psycopg.Connection, symbol: str, data_type: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT last_time, cursor, last_trade_id, details, updated_at FROM sync_status "
        "WHERE symbol = %s AND data_type = %s",
        (symbol, data_type),
    ).fetchone()
    if row is None:
        return None
    return dict(zip(("last_time", "cursor", "last_trade_id", "details", "updated_at"), row))


def lock_symbol(conn: psycopg.Connection, purpose: str, symbol: str) -> None:
    """Serialise `purpose` work on `symbol` across processes until this transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{purpose}:{symbol}",))


_ADVANCE_SYNC = """
INSERT INTO sync_status AS s (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)
SELECT u.symbol, %(data_type)s, u.last_time, u.cursor, u.last_trade_id, %(details)s, now()
FROM unnest(%(symbol)s::text[], %(last_time)s::timestamptz[], %(cursor)s::text[], %(last_trade_id)s::bigint[])
     AS u(symbol, last_time, cursor, last_trade_id)
ON CONFLICT (symbol, data_type) DO UPDATE
SET last_time = EXCLUDED.last_time, cursor = EXCLUDED.cursor, last_trade_id = EXCLUDED.last_trade_id,
    details = s.details || EXCLUDED.details, updated_at = now()
WHERE (s.last_trade_id IS NULL OR s.last_trade_id < EXCLUDED.last_trade_id)
  AND (s.last_time IS NULL OR s.last_time <= EXCLUDED.last_time)
RETURNING symbol
"""


def advance_sync_status(conn: psycopg.Connection, data_type: str,
                        frontiers: Sequence[tuple[str, datetime, str, int]], details: dict[str, Any]) -> list[str]:
    """Move the resume points of many symbols forward — (symbol, last_time, cursor,
    last_trade_id) each — where both the stored id and time are behind (never backwards), in one
    statement. Returns the symbols that moved."""
    if not frontiers:
        return []
    rows = conn.execute(_ADVANCE_SYNC, {  # arrays as literals: one string each for the driver
        "data_type": data_type, "details": Jsonb(details), "symbol": text_array(f[0] for f in frontiers),
        "last_time": text_array(check_aware(f[1], "last_time").isoformat() for f in frontiers),
        "cursor": text_array(f[2] for f in frontiers), "last_trade_id": number_array(f[3] for f in frontiers)}).fetchall()
    return [row[0] for row in rows]


def write_refused_trades(conn: psycopg.Connection, symbol: str, refused: Iterable[Any], source: str) -> int:
    """Record trades the exchange sent with impossible values (``types.Refused`` with a valid
    id): their ids are accounted for, refused rather than missing. Idempotent (the first
    sighting is kept); returns how many were new."""
    rows = [(symbol, r.trade_id, r.time, source, r.reason) for r in refused
            if r.trade_id is not None and trade_id_problem(r.trade_id) is None]
    if not rows:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO refused_trades (symbol, trade_id, time, source, reason) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (symbol, trade_id) DO NOTHING",
            rows,
        )
        return cur.rowcount if cur.rowcount >= 0 else len(rows)


def read_refused_ids(conn: psycopg.Connection, symbol: str, lo: int, hi: int) -> list[int]:
    """Refused trade ids of `symbol` in ``[lo, hi]``, sorted."""
    return [row[0] for row in conn.execute(
        "SELECT trade_id FROM refused_trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s ORDER BY 1",
        (symbol, lo, hi))]
