"""The import's temp tables and COPY into them (or straight into ``trades``).

Each connection of an import creates the stages once; their rows go at commit, so a chunk's
transaction always starts from empty stages."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from kraken_hist.ingest.archive.binary_copy import BINARY_HEADER, BINARY_TRAILER
from kraken_hist.ingest.archive.rows import TradeChunk

TRADE_STAGE = "csv_trade_stage"
OHLC_STAGE = "csv_ohlc_stage"
CANDLE_STAGE = "csv_candle_stage"

#: What a connection of the import runs first: the stages, and commits that do not wait for their
#: WAL flush (each file's final bookkeeping commits synchronously, flushing everything before it).
CONNECTION_SETUP = (
    f"CREATE TEMP TABLE IF NOT EXISTS {TRADE_STAGE} "
    "(LIKE trades INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS {OHLC_STAGE} (time timestamptz NOT NULL, open numeric NOT NULL, "
    "high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL, vwap numeric, "
    "volume numeric NOT NULL, trades integer NOT NULL, line bigint NOT NULL) ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS {CANDLE_STAGE} (time timestamptz NOT NULL, open numeric NOT NULL, "
    "high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL, notional numeric NOT NULL, "
    "volume numeric NOT NULL, trades integer NOT NULL) ON COMMIT DELETE ROWS",
    "SET synchronous_commit = off",
)


def truncate(conn: psycopg.Connection, stage: str) -> None:
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(stage)))


def copy_into(table: str, columns: Sequence[str], binary: bool = False) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN{}").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL(" (FORMAT binary)" if binary else ""))


def copy(conn: psycopg.Connection, statement: str | sql.Composed, payload: Sequence[bytes]) -> None:
    with conn.cursor().copy(statement) as cursor:
        cursor.write(b"".join(payload))


def copy_chunk(conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Sequence[bytes],
               binary: bool) -> None:
    """COPY a chunk's text lines, or binary tuples (framed here with header and trailer)."""
    payload = [BINARY_HEADER, *rows, BINARY_TRAILER] if binary else rows
    copy(conn, copy_into(table, columns, binary), payload)


def copy_trades(conn: psycopg.Connection, table: str, chunk: TradeChunk) -> None:
    """COPY a chunk's rows into `table` (``trades`` or its staging twin)."""
    copy_chunk(conn, table, chunk.columns, chunk.payload, chunk.binary)
