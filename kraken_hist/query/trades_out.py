"""Trades out of storage: one symbol's trades in (time, id) order, streamed with constant memory,
as records or DataFrames, and the merge of a multi-symbol trade replay (paced by ``streams.pace``).

Every read is bounded by ``[lo, hi)`` in time, where the caller has already cut `hi` at "now"
(no look-ahead: a trade is known from its own time on). Rows are streamed on a connection of
their own (psycopg ``Cursor.stream``: libpq chunked rows, `batch_size` rows a chunk), the
mechanism candle replay uses: memory stays at one chunk however long the range, with fewer
round trips than a DECLAREd cursor's FETCHes. The connection is closed when the iterator ends
or is closed.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import pandas as pd

from kraken_hist.query.provider.streams import merge as merge_streams
from kraken_hist.query.provider.streams import pace, stream_rows
from kraken_hist.storage.copy_out import BLOCK_BYTES, copy_blocks, has_pyarrow, parse_block
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.core.timeutils import UTC
from kraken_hist.core.types import HistoricalTrade

#: Columns of a trade DataFrame, in order (index: UTC ``DatetimeIndex`` named ``time``).
TRADE_FRAME_COLUMNS = ("trade_id", "price", "volume", "side", "ord_type")

_TRADES_TEMPLATE = """
SELECT {columns}
FROM trades
WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s
ORDER BY time, trade_id
"""



def trades_query(columns: str) -> str:
    """`columns` of one symbol's trades in ``[%(lo)s, %(hi)s)``, in Kraken's order (time, then
    id) — the order the 1-minute candle rule uses (``rules.sql.MINUTE_CANDLES_FROM_TRADES``)."""
    return _TRADES_TEMPLATE.format(columns=columns)


#: One symbol's trades as HistoricalTrade rows.
TRADES_SQL = trades_query("symbol, trade_id, time, price, volume, side, ord_type")

#: The rows of a trade DataFrame: exact (Decimal) or with numeric → float8 done by the server
#: (what backtesting libraries compute with; no Decimal object is ever built).
FRAME_SQL = {
    True: trades_query("time, trade_id, price, volume, side, ord_type"),
    False: trades_query("time, trade_id, price::float8, volume::float8, side, ord_type"),
}

_TRADE_FIELDS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type")
_SETTERS = tuple(getattr(HistoricalTrade, name).__set__ for name in _TRADE_FIELDS)
_new = object.__new__

#: Merge order of a multi-symbol replay: time, then Kraken id, then symbol (ids are per pair).
MERGE_KEY = operator.attrgetter("time", "trade_id", "symbol")


def iter_trades(rows: Iterable[Sequence[Any]]) -> Iterator[HistoricalTrade]:
    """HistoricalTrades from ``TRADES_SQL`` rows. Stored rows passed every check on their way
    in, so the slots are filled directly (the validating constructor costs as much as the read)."""
    s_symbol, s_id, s_time, s_price, s_volume, s_side, s_ord = _SETTERS
    for symbol, trade_id, when, price, volume, side, ord_type in rows:
        trade = _new(HistoricalTrade)
        s_symbol(trade, symbol)
        s_id(trade, trade_id)
        s_time(trade, when)
        s_price(trade, price)
        s_volume(trade, volume)
        s_side(trade, side)
        s_ord(trade, ord_type)
        yield trade


def read_trades(url: str, symbol: str, lo: datetime, hi: datetime, *, batch_size: int = 10_000
                ) -> Iterator[HistoricalTrade]:
    """`symbol`'s stored trades in ``[lo, hi)`` by (time, id), streamed."""
    return iter_trades(stream_rows(url, TRADES_SQL, {"symbol": symbol, "lo": lo, "hi": hi}, batch_size))


def _frame(rows: list[tuple[Any, ...]], symbol: str, exact: bool) -> pd.DataFrame:
    """A trade DataFrame from rows (time, trade_id, price, volume, side, ord_type)."""
    columns = list(zip(*rows)) if rows else [()] * 6
    index = pd.DatetimeIndex(pd.to_datetime(list(columns[0]), utc=True), name="time") if rows else \
        pd.DatetimeIndex([], tz=UTC, name="time")
    number = object if exact else "float64"
    frame = pd.DataFrame(
        {
            "trade_id": pd.Series(columns[1], index=index, dtype="int64"),
            "price": pd.Series(columns[2], index=index, dtype=number),
            "volume": pd.Series(columns[3], index=index, dtype=number),
            "side": pd.Series(columns[4], index=index, dtype=object),
            "ord_type": pd.Series(columns[5], index=index, dtype=object),
        },
        index=index,
        columns=list(TRADE_FRAME_COLUMNS),
    )
    frame.attrs["symbol"] = symbol
    return frame


def read_trade_frames(url: str, symbol: str, lo: datetime, hi: datetime, *, chunk_rows: int = 100_000,
                      exact: bool = False) -> Iterator[pd.DataFrame]:
    """`symbol`'s trades in ``[lo, hi)`` as DataFrames of at most `chunk_rows` rows each, in
    order: float64 prices and volumes, or Decimals if `exact`.

    With pyarrow (the ``export`` extra) rows come by COPY and are parsed in C++
    (``copy_out``); without it, as tuples from a stream."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    params = {"symbol": symbol, "lo": lo, "hi": hi}
    if not has_pyarrow():
        yield from _tuple_frames(stream_rows(url, FRAME_SQL[exact], params, min(chunk_rows, 10_000)), symbol,
                                 chunk_rows, exact)
        return
    import pyarrow as pa

    names = ("time", "trade_id", "price", "volume", "side", "ord_type")
    number = pa.string() if exact else pa.float64()
    types = {"time": pa.timestamp("us", tz="UTC"), "trade_id": pa.int64(), "price": number, "volume": number,
             "side": pa.string(), "ord_type": pa.string()}
    statement = f"COPY ({FRAME_SQL[True].strip()}) TO STDOUT (FORMAT csv)"
    pending: list[Any] = []  # tables not handed out yet
    with connect(url, autocommit=True, options="-c TimeZone=UTC") as conn, translate_errors():
        for block in copy_blocks(conn, statement, params, block_bytes=min(BLOCK_BYTES, 64 * chunk_rows)):
            pending.append(parse_block(block, names, types))
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            while table.num_rows >= chunk_rows:
                yield _arrow_frame(table.slice(0, chunk_rows), symbol, exact)
                table = table.slice(chunk_rows)
            pending = [table] if table.num_rows else []
    if pending:
        yield _arrow_frame(pending[0], symbol, exact)


def _arrow_frame(table: Any, symbol: str, exact: bool) -> pd.DataFrame:
    """A trade DataFrame from an Arrow table (time, trade_id, price, volume, side, ord_type);
    exact prices and volumes arrive as text and become Decimals with the stored digits."""
    decimals = {name: list(map(Decimal, table.column(name).to_pylist())) for name in ("price", "volume")} if exact \
        else {}
    frame = table.to_pandas().set_index("time")
    frame.index = pd.DatetimeIndex(frame.index, name="time")
    for name, values in decimals.items():
        frame[name] = pd.Series(values, index=frame.index, dtype=object)
    for name in ("side", "ord_type"):
        frame[name] = frame[name].astype(object)
    frame.attrs["symbol"] = symbol
    return frame


def _tuple_frames(rows: Iterator[tuple[Any, ...]], symbol: str, chunk_rows: int, exact: bool) -> Iterator[pd.DataFrame]:
    try:
        chunk: list[tuple[Any, ...]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == chunk_rows:
                yield _frame(chunk, symbol, exact)
                chunk = []
        if chunk:
            yield _frame(chunk, symbol, exact)
    finally:
        rows.close()  # type: ignore[attr-defined]


def concat_frames(frames: Iterable[pd.DataFrame], symbol: str, exact: bool) -> pd.DataFrame:
    """One DataFrame of the chunks (an empty, typed one when there are none)."""
    parts = list(frames)
    if not parts:
        return _frame([], symbol, exact)
    frame = parts[0] if len(parts) == 1 else pd.concat(parts)
    frame.attrs["symbol"] = symbol
    return frame


def merge(streams: Sequence[Iterator[HistoricalTrade]]) -> Iterator[HistoricalTrade]:
    """Several symbols' ordered streams as one, by (time, id, symbol)."""
    return merge_streams(streams, MERGE_KEY)


__all__ = [
    "MERGE_KEY",
    "TRADES_SQL",
    "TRADE_FRAME_COLUMNS",
    "concat_frames",
    "iter_trades",
    "merge",
    "pace",
    "read_trade_frames",
    "read_trades",
    "stream_rows",
    "trades_query",
]
