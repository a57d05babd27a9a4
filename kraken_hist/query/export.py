"""Export stored trades or candles to Parquet or CSV files, one file per day or month for big ranges.

Rows leave the server as ``COPY (query) TO STDOUT (FORMAT csv)`` — the cheapest way out of
PostgreSQL — and are written as they arrive: CSV as received; Parquet by parsing blocks of
rows with pyarrow's CSV reader (C++, no Python object per row) into row groups of one file.
Memory stays at about one block whatever the range.

Column types (Parquet): ``time`` timestamp[us, UTC]; ids and counts int64; prices, volumes and
vwap ``decimal128(38, 18)`` — exact: a value that would not fit (more than 18 decimals) fails
the export instead of being rounded. Candles' vwap comes as every read hands it out: at the
pair's price decimals, rounded down (``rules.candles.vwap_at_decimals``; on the server
``rules.sql.vwap_at_places``), in CSV and Parquet alike.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import postgresql

from kraken_hist.storage.copy_out import copy_blocks, count_rows, has_pyarrow, parse_block
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.core.errors import ConfigurationError
from kraken_hist.core.intervals import Interval
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import UTC
from kraken_hist.query.provider.candle_sql import select_candles  # the query layer's one definition of every interval

#: Parquet's exact decimal type for prices, volumes and vwap.
DECIMAL = (38, 18)


class ExportKind(str, enum.Enum):
    TRADES = "trades"
    CANDLES = "candles"


class ExportFormat(str, enum.Enum):
    PARQUET = "parquet"
    CSV = "csv"


class Partition(str, enum.Enum):
    NONE = "none"
    DAY = "day"
    MONTH = "month"
    AUTO = "auto"  # a month per file when the range is longer than 31 days, else one file


@dataclass(frozen=True, slots=True)
class Piece:
    """One output file: the rows in ``[lo, hi)``, named `label` (None: the single file)."""

    label: str | None
    lo: datetime
    hi: datetime


def plan_pieces(lo: datetime, hi: datetime, partition: Partition | str) -> list[Piece]:
    """The files of an export of ``[lo, hi)``: whole UTC days or months (cut at `lo` and `hi`),
    sorted, disjoint, covering the range; ``[Piece(None, lo, hi)]`` unpartitioned."""
    part = Partition(partition)
    if part is Partition.AUTO:
        part = Partition.MONTH if hi - lo > timedelta(days=31) else Partition.NONE
    if part is Partition.NONE or hi <= lo:
        return [Piece(None, lo, hi)]
    pieces: list[Piece] = []
    start = lo.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if part is Partition.MONTH:
        start = start.replace(day=1)
    while start < hi:
        if part is Partition.DAY:
            nxt, label = start + timedelta(days=1), start.strftime("%Y-%m-%d")
        else:
            nxt = (start + timedelta(days=32)).replace(day=1)
            label = start.strftime("%Y-%m")
        pieces.append(Piece(label, max(start, lo), min(nxt, hi)))
        start = nxt
    return pieces


@dataclass(frozen=True, slots=True)
class Columns:
    """What an export holds: the query's column names and their Arrow types."""

    names: tuple[str, ...]
    types: dict[str, Any]


def _columns(kind: ExportKind) -> Columns:
    import pyarrow as pa

    number = pa.decimal128(*DECIMAL)
    if kind is ExportKind.TRADES:
        names = ("time", "trade_id", "price", "volume", "side", "ord_type", "source")
        types = {"time": pa.timestamp("us", tz="UTC"), "trade_id": pa.int64(), "price": number, "volume": number,
                 "side": pa.string(), "ord_type": pa.string(), "source": pa.string()}
    else:
        names = ("time", "open", "high", "low", "close", "volume", "vwap", "trades")
        types = {"time": pa.timestamp("us", tz="UTC"), "trades": pa.int64(),
                 **{n: number for n in ("open", "high", "low", "close", "volume", "vwap")}}
    return Columns(names, types)


def candles_query(interval: Interval, price_decimals: int | None = None) -> tuple[str, dict[str, Any]]:
    """Candles of `interval` whose bucket starts in ``[lo, hi)`` (the provider's
    ``select_candles``), vwap at `price_decimals` rounded down like every read hands it out
    (None: as stored, at most the Parquet scale); the query and its other parameters."""
    probe = datetime(2000, 1, 1, tzinfo=UTC)
    inner = select_candles(interval, ["-"], probe, probe, vwap_places=price_decimals is not None).compile(
        dialect=postgresql.psycopg.dialect())
    vwap = "vwap" if price_decimals is not None and price_decimals <= DECIMAL[1] else f"round(vwap, {DECIMAL[1]})"
    query = f"SELECT time, open, high, low, close, volume, {vwap} AS vwap, trades FROM ({inner.string}) c ORDER BY time"
    params = dict(inner.params)
    if price_decimals is not None:
        params["places"] = price_decimals
    return query, params


def copy_statement(kind: ExportKind | str, interval: Interval | None,
                   price_decimals: int | None = None) -> tuple[str, dict[str, Any]]:
    """``COPY (query) TO STDOUT`` for `kind` and its fixed parameters; symbol, lo and hi are
    added per file (psycopg binds COPY parameters client-side). Candles' vwap at `price_decimals`."""
    if ExportKind(kind) is ExportKind.TRADES:
        from kraken_hist.query.trades_out import trades_query  # (and not pandas at import)

        query, params = trades_query("time, trade_id, price, volume, side, ord_type, source"), {}
    else:
        query, params = candles_query(interval or Interval(1), price_decimals)
    return f"COPY ({query.strip()}) TO STDOUT (FORMAT csv)", params


class _ParquetSink:
    """Blocks of CSV rows → row groups of one Parquet file (opened on the first block)."""

    def __init__(self, path: Path, columns: Columns) -> None:
        import pyarrow as pa

        self.path = path
        self.columns = columns
        self.schema = pa.schema([(name, columns.types[name]) for name in columns.names])
        self.writer: Any = None

    def write(self, block: bytes) -> None:
        import pyarrow.parquet as pq

        table = parse_block(block, self.columns.names, self.columns.types)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.writer.write_table(table)

    def close(self, *, always: bool) -> bool:
        """Finish the file; with `always`, write an empty one (with the schema) if no row came."""
        import pyarrow.parquet as pq

        if self.writer is None:
            if not always:
                return False
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.writer.close()
        return True


class _CsvSink:
    """Blocks of CSV rows → one CSV file with a header line."""

    def __init__(self, path: Path, columns: Columns) -> None:
        self.path = path
        self.header = (",".join(columns.names) + "\n").encode()
        self.file: Any = None

    def write(self, block: bytes) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")
            self.file.write(self.header)
        self.file.write(block)

    def close(self, *, always: bool) -> bool:
        if self.file is None:
            if not always:
                return False
            self.write(b"")
        self.file.close()
        return True


@dataclass(slots=True)
class ExportResult:
    """What an export wrote: files, rows, bytes, seconds."""

    files: list[Path] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"files": [str(p) for p in self.files], "rows": self.rows, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


def export(
    url: str,
    symbol: str,
    kind: ExportKind | str,
    lo: datetime,
    hi: datetime,
    out: Path | str,
    *,
    fmt: ExportFormat | str = ExportFormat.PARQUET,
    partition: Partition | str = Partition.AUTO,
    interval: Interval | None = None,
    on_progress: Callable[[Piece, int], None] | None = None,
    registry: PairRegistry | None = None,
) -> ExportResult:
    """Write `symbol`'s `kind` rows in ``[lo, hi)`` (candles: buckets starting there, already
    cut at the last complete bucket by the caller) to `out`: a file when unpartitioned, else a
    directory of ``YYYY-MM[-DD].<format>`` files (days or months without rows get none).
    Candles' vwap is at the pair's price decimals, from `registry` (default: the database's).

    `on_progress(piece, rows)` is called as blocks are written. Returns what was written."""
    kind, fmt = ExportKind(kind), ExportFormat(fmt)
    if fmt is ExportFormat.PARQUET and not has_pyarrow():  # pragma: no cover - the 'export' extra brings it
        raise ConfigurationError("Parquet export needs pyarrow: pip install 'kraken-hist[export]'")
    pieces = plan_pieces(lo, hi, partition)
    target = Path(out)
    single = pieces[0].label is None
    if not single:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(kind)
    decimals = None
    if kind is ExportKind.CANDLES:
        decimals = (registry or database_registry(url)).get(symbol).price_decimals
    statement, fixed = copy_statement(kind, interval, decimals)
    result = ExportResult()
    began = time.perf_counter()
    # Blocks are parsed and written on a thread of their own (pyarrow releases the GIL) while
    # the next ones arrive; at most two wait, so memory stays at a few blocks.
    with connect(url, autocommit=True, options="-c TimeZone=UTC") as conn, translate_errors(), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer") as writer:
        for piece in pieces:
            path = target if single else target / f"{piece.label}.{fmt.value}"
            sink = _ParquetSink(path, columns) if fmt is ExportFormat.PARQUET else _CsvSink(path, columns)
            pending: deque[Future[None]] = deque()
            try:
                for block in copy_blocks(conn, statement, fixed | {"symbol": symbol, "lo": piece.lo, "hi": piece.hi}):
                    pending.append(writer.submit(sink.write, block))
                    while len(pending) > 2:
                        pending.popleft().result()
                    rows = count_rows(block)
                    result.rows += rows
                    if on_progress is not None:
                        on_progress(piece, rows)
                while pending:
                    pending.popleft().result()
            finally:
                for future in pending:  # after a failure: let queued writes finish before closing
                    future.exception()
                written = sink.close(always=single)
            if written:
                result.files.append(path)
                result.bytes += path.stat().st_size
    result.seconds = time.perf_counter() - began
    return result


__all__ = ["ExportFormat", "ExportKind", "ExportResult", "Partition", "Piece", "copy_statement", "export",
           "plan_pieces"]
