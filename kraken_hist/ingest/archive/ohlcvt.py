"""OHLCVT files into the database: 1-minute rows fill ``candles`` (source ``csv_ohlc``, vwap
NULL) only in minutes no trades cover; other intervals go to ``exchange_candles``, for
``comparison.compare_exchange_candles`` to check against our aggregates."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import psycopg
from psycopg import sql

from kraken_hist.ingest.archive.job import FileJob, ImportHost
from kraken_hist.ingest.archive.ohlcvt_lines import parse_ohlcvt
from kraken_hist.ingest.archive.results import Tally, record_import
from kraken_hist.ingest.archive.rows import OhlcChunk
from kraken_hist.ingest.archive.staging import OHLC_STAGE, copy, truncate
from kraken_hist.ingest.archive.threads import Prefetcher
from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import store

ONE_MINUTE = timedelta(minutes=1)

# OHLCVT 1m rows fill only minutes that no trade source covers and no trades candle holds
# (and an exchange candle never replaces one built from trades: rules.sql.upsert_candle).
_MERGE_OHLC_1M = f"""
WITH eligible AS (
    SELECT s.* FROM {OHLC_STAGE} s
    WHERE NOT EXISTS (
            SELECT 1 FROM coverage cv
            WHERE cv.symbol = %(symbol)s AND cv.source <> 'ohlc'
              AND cv.ranges && tstzrange(s.time, s.time + interval '1 minute'))
      AND NOT EXISTS (
            SELECT 1 FROM candles c
            WHERE c.symbol = %(symbol)s AND c.time = s.time AND c.source = 'trades')
), written AS (
    INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
    SELECT %(symbol)s, time, open, high, low, close, vwap, volume, trades, 'csv_ohlc', now() FROM eligible
    {sql_rules.upsert_candle().strip()}
    RETURNING 1
)
SELECT (SELECT count(*) FROM eligible), (SELECT count(*) FROM written)
"""

_MERGE_EXCHANGE = f"""
INSERT INTO exchange_candles AS c (symbol, interval, time, open, high, low, close, vwap, volume, trades, source)
SELECT %(symbol)s, %(interval)s, time, open, high, low, close, vwap, volume, trades, 'csv_ohlc'
FROM {OHLC_STAGE}
{sql_rules.UPSERT_EXCHANGE_CANDLE}"""

_COPY_STAGE = sql.SQL("COPY {} (time, open, high, low, close, vwap, volume, trades, line) FROM STDIN").format(
    sql.Identifier(OHLC_STAGE))


def import_ohlcvt(host: ImportHost, job: FileJob, lines: Iterable[bytes], first_line_no: int) -> None:
    """Store an OHLCVT file chunk by chunk (1-minute files with their ``ohlc`` coverage), then
    its import record."""
    conn, layout, symbol, tally = job.conn, job.layout, job.symbol, job.tally
    assert layout.interval is not None
    width = timedelta(minutes=layout.interval)
    chunks = parse_ohlcvt(lines, layout=layout, report=job.report, chunk_size=host.chunk_size,
                          first_line_no=first_line_no)
    with host.transaction(conn), Prefetcher(chunks, name=f"csv-parse-{job.source.name}") as parsed:
        for chunk in parsed:
            with conn.transaction():
                if chunk.rows:
                    truncate(conn, OHLC_STAGE)
                    copy(conn, _COPY_STAGE, chunk.payload)
                    _merge_ohlc_chunk(conn, symbol, layout.interval, chunk, tally)
                if layout.interval == 1 and chunk.last_time is not None:
                    start = tally.first_time or chunk.first_time
                    assert start is not None
                    store.add_coverage(conn, symbol, "ohlc", start, chunk.last_time + width)
            tally.advance(chunk)
        with host.durably(conn):
            end = tally.last_time + width if tally.last_time is not None else None
            record_import(conn, job.source.label, symbol, layout, tally, job.report, end)


def _merge_ohlc_chunk(conn: psycopg.Connection, symbol: str, interval: int, chunk: OhlcChunk, tally: Tally) -> None:
    if interval == 1:
        eligible, written = conn.execute(_MERGE_OHLC_1M, {"symbol": symbol}).fetchone()
        tally.covered += chunk.rows - eligible
        tally.duplicates += eligible - written
        tally.imported += written
        tally.candles += written
        if written and chunk.first_time is not None and chunk.last_time is not None:
            store.record_candle_change(conn, symbol, chunk.first_time, chunk.last_time + ONE_MINUTE)
    else:
        written = conn.execute(_MERGE_EXCHANGE, {"symbol": symbol, "interval": interval}).rowcount
        tally.imported += written
        tally.duplicates += chunk.rows - written
