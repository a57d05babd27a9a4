"""Export stored trades or candles to Parquet or CSV files, one file per day or month for big ranges.

Rows leave the server as ``COPY (query) TO STDOUT (FORMAT csv)`` — the cheapest way out of
PostgreSQL — and are written as they arrive: CSV as received; Parquet by parsing blocks of
rows with pyarrow's CSV reader (C++, no Python object per row) into row groups of one file.
Memory stays at about one block whatever the range.

Column types (Parquet): ``time`` timestamp[us, UTC]; ids and counts int64; prices, volumes and
vwap ``decimal128(38, 18)`` — exact: a value that would not fit (more than 18 decimals) fails
the export instead of being rounded. Aggregated candles' vwap (an exact quotient with more
digits) is rounded to 18 decimals on the server, in CSV and Parquet alike.
"""

from __future__ import annotations

import enum
import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.dialects import postgresql

from .db import connect, translate_errors
from .errors import ConfigurationError
from .intervals import Interval
from .timeutils import UTC

#: Parquet's exact decimal type for prices, volumes and vwap.
DECIMAL = (38, 18)
BLOCK_BYTES = 32 * 1024 * 1024  # rows parsed (and written as one row group) at a time


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


_TRADES_QUERY = """
SELECT time, trade_id, price, volume, side, ord_type, source
FROM trades
WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s
ORDER BY time, trade_id
"""


def candles_query(interval: Interval) -> tuple[str, dict[str, Any]]:
    """Candles of `interval` whose bucket starts in ``[lo, hi)`` (the provider's
    ``select_candles``), vwap rounded to the Parquet scale; the query and its other parameters."""
    from .provider import select_candles  # the query layer's one definition of every interval

    probe = datetime(2000, 1, 1, tzinfo=UTC)
    inner = select_candles(interval, ["-"], probe, probe).compile(dialect=postgresql.psycopg.dialect())
    query = (f"SELECT time, open, high, low, close, volume, round(vwap, {DECIMAL[1]}) AS vwap, trades "
             f"FROM ({inner.string}) c ORDER BY time")
    return query, dict(inner.params)


def copy_statement(kind: ExportKind, interval: Interval | None) -> tuple[str, dict[str, Any]]:
    """``COPY (query) TO STDOUT`` for `kind` and its fixed parameters; symbol, lo and hi are
    added per file (psycopg binds COPY parameters client-side)."""
    query, params = (_TRADES_QUERY, {}) if kind is ExportKind.TRADES else candles_query(interval or Interval(1))
    return f"COPY ({query.strip()}) TO STDOUT (FORMAT csv)", params


def copy_blocks(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any],
                block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The COPY's output in blocks of whole rows of about `block_bytes` each."""
    buffer = bytearray()
    with conn.cursor().copy(statement, params) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= block_bytes:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _count_rows(block: bytes) -> int:
    return block.count(b"\n")


class _ParquetSink:
    """Blocks of CSV rows → row groups of one Parquet file (opened on the first block)."""

    def __init__(self, path: Path, columns: Columns) -> None:
        import pyarrow as pa

        self.path = path
        self.columns = columns
        self.schema = pa.schema([(name, columns.types[name]) for name in columns.names])
        self.writer: Any = None

    def write(self, block: bytes) -> None:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        table = pcsv.read_csv(
            io.BytesIO(block),
            read_options=pcsv.ReadOptions(column_names=list(self.columns.names)),
            convert_options=pcsv.ConvertOptions(column_types=self.columns.types, strings_can_be_null=True),
        )
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
) -> ExportResult:
    """Write `symbol`'s `kind` rows in ``[lo, hi)`` (candles: buckets starting there, already
    cut at the last complete bucket by the caller) to `out`: a file when unpartitioned, else a
    directory of ``YYYY-MM[-DD].<format>`` files (days or months without rows get none).

    `on_progress(piece, rows)` is called as blocks are written. Returns what was written."""
    kind, fmt = ExportKind(kind), ExportFormat(fmt)
    if fmt is ExportFormat.PARQUET:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:  # pragma: no cover - pyarrow is a dependency of the 'export' extra
            raise ConfigurationError("Parquet export needs pyarrow: pip install 'kraken-hist[export]'") from exc
    pieces = plan_pieces(lo, hi, partition)
    target = Path(out)
    single = pieces[0].label is None
    if not single:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(kind)
    statement, fixed = copy_statement(kind, interval)
    result = ExportResult()
    began = time.perf_counter()
    with connect(url, autocommit=True, options="-c TimeZone=UTC") as conn, translate_errors():
        for piece in pieces:
            path = target if single else target / f"{piece.label}.{fmt.value}"
            sink = _ParquetSink(path, columns) if fmt is ExportFormat.PARQUET else _CsvSink(path, columns)
            try:
                for block in copy_blocks(conn, statement, fixed | {"symbol": symbol, "lo": piece.lo, "hi": piece.hi}):
                    sink.write(block)
                    rows = _count_rows(block)
                    result.rows += rows
                    if on_progress is not None:
                        on_progress(piece, rows)
            finally:
                written = sink.close(always=single)
            if written:
                result.files.append(path)
                result.bytes += path.stat().st_size
    result.seconds = time.perf_counter() - began
    return result


def raw_copy(url: str, statement: str, params_list: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """The limit an export is measured against: the same COPY statements, their bytes read and
    dropped. Returns (rows, bytes)."""
    rows = size = 0
    with connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
        for params in params_list:
            with conn.cursor().copy(statement, params) as copy:
                for data in copy:
                    size += len(data)
                    rows += 1
    return rows, size


__all__ = ["ExportFormat", "ExportKind", "ExportResult", "Partition", "Piece", "copy_statement", "export",
           "plan_pieces", "raw_copy"]
