"""The flush's SQL: one statement per step, each serving every symbol of a batch at once.

Each statement probes the index once per symbol (``LATERAL … LIMIT 1``: never a hash join over
the whole table, whatever the planner thinks of an array it cannot estimate) and carries the
batch's whole time span as constants (``%(lo)s``, ``%(hi)s``), so TimescaleDB excludes every
other chunk when it plans (``tests/test_writer_batch_plans.py`` checks both). Minutes travel as
one array literal of minute numbers and numbers as array literals of their text: no
per-element work in the driver, and PostgreSQL reads each number with its own scale.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import store
from kraken_hist.storage.db import number_array, text_array
from kraken_hist.storage.writer.records import TRADE_COLUMNS, minute_start

_COLUMN_LIST = sql.SQL(", ").join(map(sql.Identifier, TRADE_COLUMNS))
COPY_TRADES = sql.SQL("COPY trades ({}) FROM STDIN").format(_COLUMN_LIST)
COPY_STAGE = sql.SQL("COPY writer_trades_stage ({}) FROM STDIN").format(_COLUMN_LIST)
CREATE_STAGE = "CREATE TEMP TABLE IF NOT EXISTS writer_trades_stage (LIKE trades) ON COMMIT DELETE ROWS"

#: Whether any trade of these ids is stored near the batch's minutes: per symbol its id range and
#: first and last minute (numbers), the time bound widened by store.IDENTITY_TIME_SLACK
#: (%(slack)s; store.identity_window: the time bound lets TimescaleDB read one or two chunks).
PROBE_TRADES = """
SELECT EXISTS (
    SELECT 1 FROM unnest(%(symbol)s::text[], %(low)s::bigint[], %(high)s::bigint[], %(first)s::bigint[],
                         %(last)s::bigint[]) AS p(symbol, low, high, first, last)
    CROSS JOIN LATERAL (
        SELECT 1 FROM trades t
        WHERE t.symbol = p.symbol AND t.trade_id BETWEEN p.low AND p.high
          AND t.time >= to_timestamp(p.first * 60) - %(slack)s AND t.time <= to_timestamp((p.last + 1) * 60) + %(slack)s
          AND t.time >= %(lo)s AND t.time <= %(hi)s
        LIMIT 1) AS hit)
"""

MERGE_TRADES = store.merge_staged_trades("writer_trades_stage", returning=True)

#: Explicit 1-minute candles, one row per (symbol, minute), the changed ones returned.
UPSERT_CANDLES = f"""
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT s.*, now()
FROM unnest(%s::text[], %s::timestamptz[], %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[],
            %s::numeric[], %s::numeric[], %s::integer[], %s::text[])
     AS s(symbol, time, open, high, low, close, vwap, volume, trades, source)
{sql_rules.upsert_candle()}RETURNING symbol, time
"""

#: The stored candles of these (symbol, minute) pairs.
STORED_CANDLES = """
SELECT p.symbol, p.m, c.source, c.trades, c.volume
FROM unnest(%(symbol)s::text[], %(minute)s::bigint[]) AS p(symbol, m)
CROSS JOIN LATERAL (
    SELECT source, trades, volume FROM candles
    WHERE symbol = p.symbol AND time = to_timestamp(p.m * 60) AND time >= %(lo)s AND time < %(hi)s) AS c
"""

#: Which of these (symbol, minute) pairs hold stored trades.
MINUTES_WITH_TRADES = """
SELECT p.symbol, p.m
FROM unnest(%(symbol)s::text[], %(minute)s::bigint[]) AS p(symbol, m)
CROSS JOIN LATERAL (
    SELECT 1 FROM trades t
    WHERE t.symbol = p.symbol AND t.time >= to_timestamp(p.m * 60) AND t.time < to_timestamp((p.m + 1) * 60)
      AND t.time >= %(lo)s AND t.time < %(hi)s
    LIMIT 1) AS hit
"""

#: The exact MinuteSums of the stored trades of one symbol's minutes, in the field order of
#: MinuteSums after the minute (minutes without trades are left out).
MINUTE_SUMS = """
SELECT m, a.trades, a.volume, a.notional, a.high, a.low, f.time, f.trade_id, f.price, l.time, l.trade_id, l.price
FROM unnest(ARRAY(SELECT to_timestamp(n * 60) FROM unnest(%(minutes)s::bigint[]) AS n)) AS m
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS trades, sum(volume) AS volume, sum(price * volume) AS notional,
           max(price) AS high, min(price) AS low
    FROM trades WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute') a
CROSS JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute'
    ORDER BY time, trade_id LIMIT 1) f
CROSS JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute'
    ORDER BY time DESC, trade_id DESC LIMIT 1) l
"""

#: Candles from merged MinuteSums. Numbers travel as text so PostgreSQL reads them with the
#: scales the rebuild's sum(price * volume) and sum(volume) have: the vwap division (which
#: rounds at a scale chosen from its operands before trunc) is then the very one
#: store.rebuild_candles computes.
UPSERT_FROM_SUMS = f"""
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT s.symbol, to_timestamp(s.minute * 60), s.open, s.high, s.low, s.close,
       {sql_rules.kraken_vwap("s.notional", "s.volume", "s.decimals")},
       s.volume, s.trades, 'trades', now()
FROM unnest(%(symbol)s::text[], %(decimals)s::integer[], %(minute)s::bigint[], %(open)s::numeric[],
            %(high)s::numeric[], %(low)s::numeric[], %(close)s::numeric[], %(notional)s::numeric[],
            %(volume)s::numeric[], %(trades)s::integer[])
     AS s(symbol, decimals, minute, open, high, low, close, notional, volume, trades)
{sql_rules.UPSERT_TRADES_CANDLE}"""

#: UPSERT_FROM_SUMS' arrays, in the order of the rows built for it.
SUMS_COLUMNS = ("symbol", "decimals", "minute", "open", "high", "low", "close", "notional", "volume", "trades")

#: One sync status: last_time never moves backwards; cursor/last_trade_id are kept unless
#: given; details merge.
UPSERT_SYNC = """
INSERT INTO sync_status AS s (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, now())
ON CONFLICT (symbol, data_type) DO UPDATE
SET last_time = GREATEST(s.last_time, EXCLUDED.last_time),
    cursor = COALESCE(EXCLUDED.cursor, s.cursor),
    last_trade_id = COALESCE(EXCLUDED.last_trade_id, s.last_trade_id),
    details = s.details || EXCLUDED.details, updated_at = now()
"""


def probe_params(meta: dict[str, list]) -> dict[str, Any]:
    """PROBE_TRADES' and ownership.ARCHIVE_TOUCHES_ANY's parameters (array literals): per
    symbol its id range and first and last minute; the whole span."""
    entries = meta.values()
    firsts, lasts = [min(e[2]) for e in entries], [max(e[2]) for e in entries]
    return {"symbol": text_array(meta), "low": number_array(e[0] for e in entries),
            "high": number_array(e[1] for e in entries), "first": number_array(firsts), "last": number_array(lasts),
            "slack": store.IDENTITY_TIME_SLACK,
            **store.identity_window(minute_start(min(firsts)), minute_start(max(lasts) + 1))}


def pairs_params(symbols: list[str], minutes: list[int]) -> dict[str, Any]:
    """(symbol, minute) pairs as STORED_CANDLES and MINUTES_WITH_TRADES take them."""
    return {"symbol": text_array(symbols), "minute": number_array(minutes), "lo": minute_start(min(minutes)),
            "hi": minute_start(max(minutes) + 1)}
