"""Bulk import of Kraken's downloadable history: Time and Sales and OHLCVT files, plain or zipped.

Files are streamed in chunks (bounded memory whatever their size; zip members are read
straight from the archive) and COPYed into PostgreSQL. A parser thread prepares the next
chunks while the database stores the current ones; plain Time and Sales files are parsed a
block at a time with numpy (``csv_vectorized``) into binary COPY rows and stored on two
connections at once, since the server's work per row (two indexes) is the bound.

Integrity (DESIGN.md, "Data integrity rules"):

* Id-less trades get stable synthetic ids (``csv_formats.synthetic_trade_id``), so a
  re-import stores nothing twice.
* A Time and Sales second that REST or WebSocket coverage touches is left to that
  id-bearing source (no overlap); coverage ``csv`` is recorded for what the file covers, and
  the trades resume point moves to the file's end so a REST backfill continues from there.
* 1-minute candles of the imported minutes are written in the same transaction as the
  trades: straight from the parser's exact sums when no other trade shares those minutes
  (the common case, and the reason the import keeps up with COPY), otherwise rebuilt from
  all stored trades (``store.rebuild_candles``); both give the same numbers. Then the
  higher intervals are refreshed (``refresh.refresh_aggregates``).
* OHLCVT 1-minute rows go to ``candles`` (source ``csv_ohlc``, vwap NULL) only in minutes no
  trades cover; other intervals go to ``exchange_candles``, and ``compare_exchange_candles``
  checks them against our aggregates.

Transactions: strict mode imports a file in one transaction and fails at its first bad line,
leaving the database unchanged. Otherwise each chunk commits with its candles and coverage,
bad lines are skipped and reported, and the file's final bookkeeping (resume point, import
record) commits last: a crash mid-file leaves complete chunks (with parallel writers, not
necessarily consecutive ones) that a re-run skips as duplicates, coverage of exactly their
seconds, and no resume point past them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import io
import itertools
import logging
import queue
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import psycopg
from psycopg import sql

from kraken_hist.rules import ranges as gaps

from kraken_hist.storage import ownership

from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import store
from kraken_hist.core.config import Settings
from kraken_hist.ingest.archive.formats import (
    OHLCVT,
    BadRow,
    BadRowReport,
    Layout,
    LayoutError,
    OhlcChunk,
    SecondBlocker,
    TradeChunk,
    parse_header_trades,
    parse_ohlcvt,
    sniff_layout,
)
from kraken_hist.ingest.archive.vectorized import BINARY_HEADER, BINARY_TRAILER, stream_plain_trades
from kraken_hist.storage.db import connect, has_timescaledb
from kraken_hist.core.errors import PermanentError, UnknownSymbolError
from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry, PairResolver, database_registry
from kraken_hist.core.pairs import Pair, PairRegistry, parse_csv_filename, symbol_from_wsname
from kraken_hist.core.timeutils import EPOCH, floor_minute, since_cursor
from kraken_hist.rules.backoff import Backoff

log = logging.getLogger(__name__)

ONE_SECOND = timedelta(seconds=1)
ONE_MINUTE = timedelta(minutes=1)
#: About what a Time and Sales line takes (``1700000000,30000.1,0.00012345``): files under two
#: chunks of it are stored on the file's own connection, not worth a pool of writers.
_BYTES_PER_LINE = 32
#: Chunks stored between two aggregate refreshes during a parallel import.
_REFRESH_EVERY = 10

#: Called after each chunk with (bytes read, lines read) since the previous call.
ProgressCallback = Callable[[int, int], None]


class ImportRefusedError(PermanentError):
    """A file that cannot be imported as it is (unknown pair, unknown layout); nothing was stored."""


# --------------------------------------------------------------------------- results

@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What importing one file (or one zip member) did."""

    file: str  # path, or "archive.zip:member"
    status: str  # "imported", "refused" (nothing stored) or "failed" (strict mode: nothing stored)
    symbol: str | None = None
    kind: str | None = None  # "trades" or "ohlcvt"
    interval: int | None = None  # minutes, OHLCVT only
    layout: str | None = None
    reason: str | None = None  # why refused or failed
    lines: int = 0
    bytes: int = 0
    imported: int = 0  # rows stored by this import
    duplicates: int = 0  # rows already stored (a re-import)
    covered: int = 0  # rows left out: their time is covered by id-bearing trades
    bad: int = 0  # lines skipped as bad (see bad_examples)
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    bad_examples: tuple[BadRow, ...] = ()
    first_time: datetime | None = None  # time range of the file's good rows
    last_time: datetime | None = None
    candles: int = 0  # 1-minute candles written (built from trades, or OHLCVT 1m rows)
    refreshed: bool = False  # higher intervals refreshed afterwards
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "imported"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "status": self.status, "symbol": self.symbol, "kind": self.kind,
            "interval": self.interval, "layout": self.layout, "reason": self.reason,
            "lines": self.lines, "bytes": self.bytes, "imported": self.imported,
            "duplicates": self.duplicates, "covered": self.covered, "bad": self.bad,
            "bad_by_reason": dict(self.bad_by_reason),
            "bad_examples": [b.to_dict() for b in self.bad_examples],
            "first_time": self.first_time.isoformat() if self.first_time else None,
            "last_time": self.last_time.isoformat() if self.last_time else None,
            "candles": self.candles, "refreshed": self.refreshed, "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class _Tally:
    lines: int = 0
    bytes: int = 0
    imported: int = 0
    duplicates: int = 0
    covered: int = 0
    candles: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None
    max_id: int | None = None
    refreshed_to: datetime | None = None  # aggregates already refreshed from first_time to here


# --------------------------------------------------------------------------- sources

@dataclass(frozen=True, slots=True)
class _Source:
    """One CSV to read: a file on disk or a member of a zip archive."""

    label: str  # what reports show
    name: str  # the file name the pair and interval are read from
    size: int
    opener: Callable[[], IO[bytes]]


_DECIMALS_SAMPLE = 1 << 16  # bytes read to infer a pair's price decimals from its prices


def _price_decimals_of(source: _Source) -> int:
    """The most decimal places among the prices of the file's first lines (the price is the
    second field in Time and Sales and the first OHLC field in OHLCVT): what the pair quotes
    prices in, as far as the file shows it, for pairs Kraken no longer lists."""
    with source.opener() as stream:
        sample = stream.read(_DECIMALS_SAMPLE)
    places = 0
    for line in sample.splitlines()[:-1] or sample.splitlines():
        fields = line.split(b",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue
        price = fields[1].strip()
        if b"." in price and b"e" not in price.lower():
            places = max(places, len(price.split(b".", 1)[1]))
    return min(places, 12)


def _file_source(path: Path) -> _Source:
    return _Source(str(path), path.name, path.stat().st_size, lambda: open(path, "rb", buffering=1 << 20))


def _zip_sources(archive: zipfile.ZipFile, path: Path, pattern: str) -> list[_Source]:
    """CSV members of `archive` whose base name matches `pattern`, streamed on demand."""
    sources = []
    for info in archive.infolist():
        base = info.filename.rsplit("/", 1)[-1]
        if info.is_dir() or info.filename.startswith("__MACOSX/") or base.startswith("._"):
            continue
        if not fnmatch.fnmatch(base.lower(), pattern.lower()):
            continue
        opener = (lambda i=info: io.BufferedReader(archive.open(i), 1 << 20))  # type: ignore[misc]
        sources.append(_Source(f"{path}:{info.filename}", base, info.file_size, opener))
    return sources


# --------------------------------------------------------------------------- prefetch thread

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Prefetcher(Generic[T]):
    """Runs a chunk generator in a named thread up to `depth` chunks ahead of the consumer.

    Parsing (Python) and storing (the server) then overlap; the bounded queue keeps memory
    bounded. Errors in the parser (strict mode's first bad line) are raised in the consumer.
    """

    def __init__(self, chunks: Iterator[T], name: str, depth: int = 2) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> "_Prefetcher[T]":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the parser thread (if still running) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def _run(self) -> None:
        try:
            for item in self._chunks:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which raises it
            self._put(_Failure(exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _ConnectionPool:
    """`size` worker threads, each with its own autocommit connection (set up by `setup`
    statements): ``submit(fn, *args)`` runs ``fn(conn, *args)`` on one of them."""

    def __init__(self, db_url: str, size: int, setup: Sequence[str]) -> None:
        self._db_url = db_url
        self._setup = setup
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="csv-store")

    def __enter__(self) -> "_ConnectionPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._connections:
            conn.close()

    def submit(self, fn: Callable[..., T], *args: Any) -> "concurrent.futures.Future[T]":
        return self._executor.submit(self._run, fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self._db_url, autocommit=True)
            for statement in self._setup:
                conn.execute(statement)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return fn(conn, *args)


# --------------------------------------------------------------------------- SQL

_TRADE_STAGE = "csv_trade_stage"
_OHLC_STAGE = "csv_ohlc_stage"
_CANDLE_STAGE = "csv_candle_stage"

_CREATE_STAGES = (
    "CREATE TEMP TABLE IF NOT EXISTS csv_trade_stage "
    "(LIKE trades INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS csv_ohlc_stage (time timestamptz NOT NULL, open numeric NOT NULL, "
    "high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL, vwap numeric, "
    "volume numeric NOT NULL, trades integer NOT NULL, line bigint NOT NULL) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS csv_candle_stage (time timestamptz NOT NULL, open numeric NOT NULL, "
    "high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL, notional numeric NOT NULL, "
    "volume numeric NOT NULL, trades integer NOT NULL) ON COMMIT DELETE ROWS",
)

_MERGE_TRADES = store.merge_staged_trades(_TRADE_STAGE, archive=True)
_MERGE_ID_TRADES = store.merge_staged_trades(_TRADE_STAGE)

_TRADES_PRESENT = "SELECT EXISTS (SELECT 1 FROM trades WHERE symbol = %s AND time >= %s AND time < %s)"

# Staged archive rows of seconds the id family owns (given as arrays of range bounds) go.
_DROP_STAGED_IN = f"""
DELETE FROM {_TRADE_STAGE} s
WHERE EXISTS (SELECT 1 FROM unnest(%s::timestamptz[], %s::timestamptz[]) AS b(lo, hi)
              WHERE s.time >= b.lo AND s.time < b.hi)
"""

# Candles the parser built for minutes that hold no other trade: the same numbers and the same
# upsert as store.rebuild_candles (vwap = trunc(Σp·v / Σv) from the exact sums), without
# reading the trades back.
_INSERT_CANDLES_FROM_STAGE = """
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT %(symbol)s, time, open, high, low, close,
       CASE WHEN volume > 0 THEN trunc(notional / volume, %(decimals)s) ELSE 0 END,
       volume, trades, 'trades', now()
FROM csv_candle_stage
"""
_UPSERT_CANDLES_FROM_STAGE = _INSERT_CANDLES_FROM_STAGE + sql_rules.UPSERT_TRADES_CANDLE

_CANDLES_PRESENT = "SELECT EXISTS (SELECT 1 FROM candles WHERE symbol = %s AND time >= %s AND time < %s)"

# Minutes without any stored trade cannot hold a valid 'trades' candle (rebuild_candles drops such too).
_DELETE_STALE_CANDLES = """
DELETE FROM candles WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(lo)s AND time < %(hi)s
"""

# OHLCVT 1m rows fill only minutes that no trade source covers and no trades candle holds.
_MERGE_OHLC_1M = """
WITH eligible AS (
    SELECT s.* FROM csv_ohlc_stage s
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
    ON CONFLICT (symbol, time) DO UPDATE
    SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
        vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
        source = 'csv_ohlc', updated_at = now()
    WHERE c.source <> 'trades'
      AND (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
          IS DISTINCT FROM
          (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
           EXCLUDED.volume, EXCLUDED.trades, 'csv_ohlc')
    RETURNING 1
)
SELECT (SELECT count(*) FROM eligible), (SELECT count(*) FROM written)
"""

_MERGE_EXCHANGE = """
INSERT INTO exchange_candles AS c (symbol, interval, time, open, high, low, close, vwap, volume, trades, source)
SELECT %(symbol)s, %(interval)s, time, open, high, low, close, vwap, volume, trades, 'csv_ohlc'
FROM csv_ohlc_stage
ON CONFLICT (symbol, interval, time) DO UPDATE
SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades, source = EXCLUDED.source
WHERE (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
       EXCLUDED.volume, EXCLUDED.trades, EXCLUDED.source)
"""


def _copy_into(table: str, columns: Sequence[str], binary: bool = False) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN{}").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL(" (FORMAT binary)" if binary else ""))


def _copy(conn: psycopg.Connection, statement: str | sql.Composed, payload: Sequence[bytes]) -> None:
    with conn.cursor().copy(statement) as copy:
        copy.write(b"".join(payload))


def _copy_chunk(conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Sequence[bytes],
                binary: bool) -> None:
    """COPY a chunk's text lines, or binary tuples (framed here with header and trailer)."""
    payload = [BINARY_HEADER, *rows, BINARY_TRAILER] if binary else rows
    _copy(conn, _copy_into(table, columns, binary), payload)


def _copy_trades(conn: psycopg.Connection, table: str, chunk: TradeChunk) -> None:
    """COPY a chunk's rows into `table` (``trades`` or its staging twin)."""
    _copy_chunk(conn, table, chunk.columns, chunk.payload, chunk.binary)


# --------------------------------------------------------------------------- the importer

#: Attempts at a chunk's transaction that the server ended to break a deadlock or a
#: serialization conflict (TimescaleDB's compression job converting the chunk being written,
#: say): the chunk is stored whole or not at all, so it is simply stored again.
CHUNK_ATTEMPTS = 5


def _retried(conn: psycopg.Connection, work: Callable[[], T]) -> T:
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


class BulkCSVImporter:
    """Import Kraken's downloadable CSV history (plain files, directories, zip archives).

    ``chunk_size`` rows are parsed, stored and (outside strict mode) committed at a time;
    memory stays bounded by a few chunks whatever the file size. Plain Time and Sales files
    are stored on ``writers`` connections at once (outside strict mode, which keeps a file in
    one transaction): PostgreSQL's work per row, mostly index upkeep, then uses more than
    one core.
    """

    def __init__(
        self,
        db_url: str | None = None,
        chunk_size: int = 100_000,
        *,
        settings: Settings | None = None,
        strict: bool = False,
        registry: PairRegistry | None = None,
        resolver: PairResolver | None = None,
        max_examples: int = 20,
        refresh: bool = True,
        progress: ProgressCallback | None = None,
        writers: int = 2,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        self.writers = writers
        self._batching = False
        self._local = threading.local()  # a batch's main connection, per thread
        self._mains: list[psycopg.Connection] = []
        self._mains_lock = threading.Lock()
        self._db_url_arg = db_url
        self._settings = settings
        self._db_url: str | None = None
        self.chunk_size = chunk_size
        self.strict = strict
        self._registry = registry if registry is not None else (resolver.registry if resolver is not None else None)
        self.resolver = resolver  # names → pairs; given by entry points so unknown names are looked up at Kraken
        self.max_examples = max_examples
        self.refresh = refresh
        self._timescaledb: bool | None = None
        self.progress = progress

    registry = GivenOrDatabaseRegistry()  # the registry given, else the database's

    @property
    def db_url(self) -> str:
        """The database (resolved and schema-checked on first use, not at construction)."""
        if self._db_url is None:
            from kraken_hist.storage.migrate import prepare_database

            self._db_url = prepare_database(self._db_url_arg, self._settings)
        return self._db_url

    # ----- public entry points

    def import_csv_file(self, path: str | Path, symbol: str | None = None) -> ImportResult:
        """Import one CSV file, or a zip archive holding exactly one CSV file.

        Raises ImportRefusedError when the file cannot be read as a Kraken CSV (the reason
        says why) and StrictModeError in strict mode at the first bad line (nothing stored).
        """
        path = Path(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                sources = _zip_sources(archive, path, "*.csv")
                if len(sources) != 1:
                    raise ImportRefusedError(
                        f"{path}: the archive holds {len(sources)} CSV files; use import_archive() for several"
                    )
                return self._import_readable(sources[0], symbol)
        if not path.is_file():
            raise ImportRefusedError(f"{path}: no such file")
        return self._import_source(_file_source(path), symbol)

    def import_archive(self, path: str | Path, symbol: str | None = None, pattern: str = "*.csv") -> list[ImportResult]:
        """Import every CSV member of a zip archive (``Kraken_OHLCVT.zip`` and the like),
        streamed without unpacking. Members that cannot be imported are reported as refused."""
        path = Path(path)
        with zipfile.ZipFile(path) as archive, self._batch() as batch:
            return batch(self._import_many(_zip_sources(archive, path, pattern), symbol))

    def _import_many(self, sources: Sequence[_Source], symbol: str | None) -> list[ImportResult]:
        """Several files, ``writers`` at a time (each on its own connection; members of one pair
        one after the other, since one import per pair runs at a time), results in order."""
        if self.writers < 2 or self.strict or len(sources) < 2:
            return [self._import_or_refuse(source, symbol) for source in sources]
        with concurrent.futures.ThreadPoolExecutor(self.writers, thread_name_prefix="csv-file") as pool:
            return list(pool.map(lambda source: self._import_or_refuse(source, symbol), sources))

    def import_directory(self, path: str | Path, pattern: str = "*.csv") -> list[ImportResult]:
        """Import every file in `path` matching `pattern` (zip archives among them too),
        in name order; files that cannot be imported are reported as refused."""
        results: list[ImportResult] = []
        with self._batch() as batch:
            for item in sorted(Path(path).iterdir()):
                if item.is_file() and fnmatch.fnmatch(item.name.lower(), pattern.lower()):
                    results.extend(self._import_path(item, None))
            return batch(results)

    def import_paths(self, paths: Iterable[str | Path], symbol: str | None = None) -> list[ImportResult]:
        """Import files, zip archives and directories (``*.csv`` and ``*.zip`` in them)."""
        results: list[ImportResult] = []
        with self._batch() as batch:
            for raw in paths:
                results.extend(self._import_path(Path(raw), symbol))
            return batch(results)

    def _import_path(self, path: Path, symbol: str | None) -> list[ImportResult]:
        results: list[ImportResult] = []
        if path.is_dir():
            for item in sorted(path.iterdir()):
                if item.is_file() and item.suffix.lower() in (".csv", ".zip"):
                    results.extend(self._import_path(item, symbol))
        elif path.is_file() and zipfile.is_zipfile(path):
            results.extend(self.import_archive(path, symbol))
        elif path.is_file():
            results.append(self._import_or_refuse(_file_source(path), symbol))
        else:
            results.append(ImportResult(file=str(path), status="refused", reason="no such file or directory"))
        return results

    @contextlib.contextmanager
    def _batch(self) -> Iterator[Callable[[list[ImportResult]], list[ImportResult]]]:
        """Many files in one run (a whole archive, a directory): one main connection for all of
        them and one aggregate refresh at the end instead of one per file — what a file costs
        beyond its rows is what an archive of hundreds of small members pays hundreds of times.
        Yields the function that refreshes and returns the results (marked refreshed)."""
        if self._batching:  # nested (a directory holding archives): the outer batch finishes
            yield lambda results: results
            return
        self._batching = True

        def finish(results: list[ImportResult]) -> list[ImportResult]:
            self._flush_wal()  # the files' final commits did not wait for the disk: this does
            pending = [r for r in results if r.ok and r.candles and not r.refreshed]
            if not (pending and self.refresh and self._refresh_all()):
                return results
            return [dataclasses.replace(r, refreshed=True) if r in pending else r for r in results]

        try:
            yield finish
        finally:
            self._batching = False
            with self._mains_lock:
                for conn in self._mains:
                    conn.close()
                self._mains.clear()
            self._local = threading.local()

    def compare_exchange_candles(self, symbol: str, interval: int, **kwargs: Any) -> "CandleComparison":
        """Compare imported OHLCVT candles of `interval` with our aggregates (see the function)."""
        return compare_exchange_candles(self.db_url, symbol, interval, **kwargs)

    # ----- one file

    def _import_or_refuse(self, source: _Source, symbol: str | None) -> ImportResult:
        try:
            return self._import_readable(source, symbol)
        except (ImportRefusedError, LayoutError) as exc:
            log.warning("csv import refused %s: %s", source.label, exc, extra={"event": "csv_import_refused"})
            return ImportResult(file=source.label, status="refused", reason=str(exc))
        except PermanentError as exc:  # strict mode's first bad line, among others
            log.warning("csv import failed %s: %s", source.label, exc, extra={"event": "csv_import_failed"})
            return ImportResult(file=source.label, status="failed", reason=str(exc))

    def _import_readable(self, source: _Source, symbol: str | None) -> ImportResult:
        """Import `source`; a member of an archive that cannot be read (a CRC mismatch, a zlib
        or truncation error) is refused with one line naming the member and the error. Chunks
        committed before the damage stay (each with exactly its coverage); the archive's other
        members go on."""
        try:
            return self._import_source(source, symbol)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            kind = "zlib error" if isinstance(exc, zlib.error) else "damaged member"
            raise ImportRefusedError(f"{source.label}: {kind}: {exc} (what was read before it is stored)") from exc

    def _resolve_symbol(self, source: _Source, symbol: str | None) -> str:
        """The pair of a file: `symbol`, else its file name — through the pair table and
        Kraken's AssetPairs; a pair neither knows (delisted) is recorded from the file name,
        its price decimals read off the file's own prices."""
        resolver = self._pair_resolver()
        try:
            stem = symbol or parse_csv_filename(source.name)[0]
        except UnknownSymbolError:
            raise ImportRefusedError(
                f"{source.label}: cannot tell the pair from the file name {source.name!r}; name the file "
                "<ALTNAME>.csv or <ALTNAME>_<minutes>.csv (e.g. XBTUSD.csv) or pass the symbol") from None
        try:
            return resolver.resolve(stem).symbol
        except UnknownSymbolError as exc:
            unknown = exc
        decimals = _price_decimals_of(source)
        try:
            if symbol and "/" in symbol:  # --symbol BASE/QUOTE names a pair Kraken no longer lists
                base, quote = symbol.strip().upper().split("/", 1)
                inferred = Pair(symbol=symbol_from_wsname(f"{base}/{quote}"), altname=f"{base}{quote}",
                                rest_key=f"{base}{quote}", price_decimals=decimals, status="inferred",
                                origin="file_name", decimals_inferred=True)
            else:
                inferred = resolver.registry.infer_from_stem(stem, price_decimals=decimals)
        except UnknownSymbolError:
            how = f"symbol {symbol!r} is unknown" if symbol else f"cannot tell the pair from the file name {source.name!r}"
            raise ImportRefusedError(
                f"{source.label}: {how} ({unknown}); name the file <ALTNAME>.csv or <ALTNAME>_<minutes>.csv "
                "(e.g. XBTUSD.csv) or pass --symbol BASE/QUOTE") from None
        pair = resolver.record_inferred(inferred)
        log.warning("csv import %s: %s is not listed by Kraken; recorded from the file name as %s "
                    "(price decimals %d read off the file; `kraken-hist pairs --search %s` shows it)",
                    source.label, stem, pair.symbol, pair.price_decimals, pair.altname,
                    extra={"event": "csv_import_inferred_pair"})
        return pair.symbol

    def _pair_resolver(self) -> PairResolver:
        if self.resolver is None:  # offline: the database's table (and what is inferred here)
            self.resolver = PairResolver(self.db_url, registry=self.registry)
        return self.resolver

    def _import_source(self, source: _Source, symbol: str | None) -> ImportResult:
        started = time.monotonic()
        resolved = self._resolve_symbol(source, symbol)
        with source.opener() as stream:
            first = stream.readline()
            if first.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some tools write
                first = first[3:]
            try:
                layout = sniff_layout(first, source.name)
            except LayoutError as exc:
                raise ImportRefusedError(f"{source.label}: {exc}") from None
            report = BadRowReport(source.label, strict=self.strict, max_examples=self.max_examples)
            lines: Iterable[bytes] = stream if layout.header else itertools.chain([first], stream)
            head = b"" if layout.header else first
            first_line_no = 2 if layout.header else 1
            tally = _Tally()
            if layout.header:
                tally.lines, tally.bytes = 1, len(first)
            log.info("csv import %s: %s, %s", source.label, resolved, layout.describe(),
                     extra={"event": "csv_import_start"})
            with self._main_connection(resolved) as conn:
                if layout.kind == OHLCVT:
                    self._import_ohlcvt(conn, source, layout, resolved, lines, first_line_no, report, tally)
                else:
                    self._import_trades(conn, source, layout, resolved, stream, head, first_line_no, report, tally)
        refreshed = tally.refreshed_to is not None
        if tally.candles and self.refresh and not self._batching and tally.first_time is not None \
                and tally.last_time is not None:
            start = tally.refreshed_to or tally.first_time
            end = tally.last_time + timedelta(minutes=layout.interval or 1)
            if end > start:
                refreshed = self._refresh(resolved, start, end)
        result = ImportResult(
            file=source.label, status="imported", symbol=resolved, kind=layout.kind, interval=layout.interval,
            layout=layout.describe(), lines=tally.lines, bytes=tally.bytes, imported=tally.imported,
            duplicates=tally.duplicates, covered=tally.covered, bad=report.total,
            bad_by_reason=dict(report.counts), bad_examples=tuple(report.examples),
            first_time=tally.first_time, last_time=tally.last_time, candles=tally.candles,
            refreshed=refreshed, seconds=time.monotonic() - started,
        )
        log.info("csv import %s done: %d imported, %d duplicates, %d covered, %d bad", source.label,
                 result.imported, result.duplicates, result.covered, result.bad, extra={"event": "csv_import_done"})
        return result

    @contextlib.contextmanager
    def _main_connection(self, symbol: str) -> Iterator[psycopg.Connection]:
        """The file's connection, holding the one-import-per-symbol session lock while the file
        is stored (kept open across the files of a batch; a broken one is replaced)."""
        conn = getattr(self._local, "main", None) if self._batching else None
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.db_url, autocommit=True)
            # chunks commit without waiting for their WAL flush: each file's final bookkeeping
            # commits synchronously (_durably), flushing everything before it
            for statement in (*_CREATE_STAGES, "SET synchronous_commit = off"):
                conn.execute(statement)
            if self._batching:
                self._local.main = conn
                with self._mains_lock:
                    self._mains.append(conn)
        key = (f"csv-import:{symbol}",)
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", key)
        try:
            yield conn
        finally:
            if not self._batching:
                conn.close()
            elif not conn.closed and not conn.broken:
                try:
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", key)
                except psycopg.Error:
                    conn.close()

    @contextlib.contextmanager
    def _durably(self, conn: psycopg.Connection) -> Iterator[None]:
        """A file's final transaction, committed synchronously: its commit flushes the WAL of
        every chunk committed before it (a server crash before then loses whole chunks, which a
        re-run stores). In a batch (an archive's members) one flush at the batch's end does it
        for every file (``_flush_wal``): a file costs no disk flush of its own."""
        with conn.transaction():
            if not self._batching:
                conn.execute("SET LOCAL synchronous_commit = on")
            yield

    def _flush_wal(self) -> None:
        """Make every commit so far durable: a synchronous commit flushes the WAL up to it."""
        with contextlib.closing(connect(self.db_url, autocommit=True)) as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SELECT txid_current()")  # a transaction id: its commit is a WAL record

    def _transaction(self, conn: psycopg.Connection) -> contextlib.AbstractContextManager[Any]:
        """Strict mode: the whole file in one transaction (chunks become savepoints)."""
        return conn.transaction() if self.strict else contextlib.nullcontext()

    def _advance(self, tally: _Tally, chunk: TradeChunk | OhlcChunk) -> None:
        tally.lines += chunk.lines
        tally.bytes += chunk.bytes
        if chunk.first_time is not None and tally.first_time is None:
            tally.first_time = chunk.first_time
        if chunk.last_time is not None:
            tally.last_time = chunk.last_time
        if self.progress is not None:
            self.progress(chunk.bytes, chunk.lines)

    # ----- Time and Sales

    def _import_trades(self, conn: psycopg.Connection, source: _Source, layout: Layout, symbol: str,
                       stream: IO[bytes], head: bytes, first_line_no: int, report: BadRowReport,
                       tally: _Tally) -> None:
        holes: list[tuple[datetime, datetime]] = []
        if not layout.has_ids:
            holes = gaps.union(*(store.read_coverage(conn, symbol, source) for source in ownership.ID_SOURCES))
        blocker = SecondBlocker(holes)
        if layout.is_plain_time_and_sales:
            chunks: Iterator[TradeChunk] = stream_plain_trades(
                stream, symbol=symbol, report=report, chunk_size=self.chunk_size, blocker=blocker, head=head,
                first_line_no=first_line_no)
        else:
            chunks = parse_header_trades(
                stream, layout=layout, symbol=symbol, report=report, chunk_size=self.chunk_size,
                blocker=blocker, first_line_no=first_line_no)
        with self._transaction(conn), _Prefetcher(chunks, name=f"csv-parse-{source.name}") as parsed:
            if layout.is_plain_time_and_sales and not self.strict and self.writers > 1 \
                    and source.size > 2 * self.chunk_size * _BYTES_PER_LINE:  # a smaller file is one or two chunks
                covered_to = self._store_in_parallel(parsed, symbol, holes, tally)
            else:
                covered_to = self._store_in_order(conn, parsed, symbol, layout, holes, tally)
            with self._durably(conn):
                ownership.lock_symbol(conn, symbol)
                self._finish_trades(conn, source, symbol, layout, tally, covered_to, report)

    def _store_in_order(self, conn: psycopg.Connection, parsed: Iterable[TradeChunk], symbol: str, layout: Layout,
                        holes: Sequence[tuple[datetime, datetime]], tally: _Tally) -> datetime | None:
        """Store chunks one after the other on `conn`; returns where the recorded coverage ends."""
        covered_to: datetime | None = None  # coverage recorded up to here (exclusive)
        for chunk in parsed:
            claim = None
            if chunk.last_time is not None:
                # Up to the chunk's last second, exclusive: with ids from the file (no minute
                # boundaries) that second may continue in the next chunk.
                start = covered_to or chunk.first_time
                assert start is not None
                claim = (start, max(start, chunk.last_time))
                covered_to = claim[1]
            counts = _retried(conn, lambda: self._locked_chunk(conn, symbol, chunk, layout.has_ids, claim, holes))
            self._count(tally, chunk, counts, layout.has_ids)
        return covered_to

    def _store_in_parallel(self, parsed: Iterable[TradeChunk], symbol: str,
                           holes: Sequence[tuple[datetime, datetime]], tally: _Tally) -> datetime | None:
        """Store plain chunks on ``writers`` connections at once, each chunk in its own
        transaction with the coverage of exactly the seconds it holds.

        Plain chunks end on minute boundaries and carry whole seconds, so chunk N claims
        ``[end of chunk N-1, its last second + 1s)``: a quiet stretch between chunks goes to
        the later one, and whichever chunks commit (a crash may leave any subset), coverage
        never claims a second whose trades are not stored. Results are counted in file order,
        and every ``_REFRESH_EVERY`` chunks the aggregates are refreshed up to the stored prefix
        of the file on the same workers, so little is left to refresh at the end.
        """
        claimed_to: datetime | None = None
        pending: collections.deque[tuple[TradeChunk, concurrent.futures.Future[tuple[int, int, int]]]] = \
            collections.deque()
        refreshes: list[concurrent.futures.Future[bool]] = []
        settled = 0
        # On TimescaleDB the aggregates are refreshed once, at the end: refreshing the hierarchy
        # beside the import's own writes took 107 s of a 10M-row import that takes 36 s and one
        # 8 s refresh without (benchmarks/csv_import.py); the plain tables keep up every ten chunks.
        periodic = self.refresh and not self._into_timescaledb()

        def settle_oldest() -> None:
            nonlocal settled
            chunk, future = pending.popleft()
            self._count(tally, chunk, future.result(), False)
            settled += 1
            if periodic and tally.candles and chunk.last_time is not None and settled % _REFRESH_EVERY == 0:
                start = tally.refreshed_to or tally.first_time
                end = floor_minute(chunk.last_time) + ONE_MINUTE  # every minute before it is stored
                assert start is not None
                refreshes.append(pool.submit(lambda _conn: self._refresh(symbol, start, end)))
                tally.refreshed_to = end

        # A chunk's commit need not wait for its WAL flush: the file's final bookkeeping commits
        # synchronously on the main connection, which flushes all of it; a server crash before
        # then loses whole chunks (trades, candles and coverage together), which a re-run stores.
        setup = (*_CREATE_STAGES, "SET synchronous_commit = off")
        with _ConnectionPool(self.db_url, self.writers, setup) as pool:
            try:
                for chunk in parsed:
                    claim = None
                    if chunk.last_time is not None:
                        claim = (claimed_to or chunk.first_time, chunk.last_time + ONE_SECOND)
                        claimed_to = claim[1]
                    pending.append((chunk, pool.submit(self._store_plain_chunk, symbol, chunk, claim, holes)))
                    while len(pending) > self.writers:
                        settle_oldest()
                while pending:
                    settle_oldest()
                for refresh in refreshes:
                    refresh.result()
            except BaseException:
                waiting = [future for _chunk, future in pending] + refreshes
                for future in waiting:  # let started transactions end before closing
                    future.cancel()
                concurrent.futures.wait(waiting)
                raise
        return claimed_to

    def _store_plain_chunk(self, conn: psycopg.Connection, symbol: str, chunk: TradeChunk,
                           claim: tuple[datetime, datetime] | None,
                           holes: Sequence[tuple[datetime, datetime]]) -> tuple[int, int, int, int]:
        # shared: this import's chunks claim disjoint seconds; every other writer of the
        # symbol takes the lock exclusively and waits for them (and they for it)
        return _retried(conn, lambda: self._locked_chunk(conn, symbol, chunk, False, claim, holes, shared=True))

    def _count(self, tally: _Tally, chunk: TradeChunk, counts: tuple[int, int, int, int], has_ids: bool) -> None:
        inserted, duplicates, candles, owned = counts
        tally.imported += inserted
        tally.duplicates += duplicates
        tally.covered += chunk.covered + owned
        tally.candles += candles
        if has_ids and chunk.rows:
            tally.max_id = max(tally.max_id or chunk.max_id, chunk.max_id)
        self._advance(tally, chunk)

    def _locked_chunk(self, conn: psycopg.Connection, symbol: str, chunk: TradeChunk, has_ids: bool,
                      claim: tuple[datetime, datetime] | None, holes: Sequence[tuple[datetime, datetime]],
                      *, shared: bool = False) -> tuple[int, int, int, int]:
        ownership.lock_symbol(conn, symbol, shared=shared)
        return self._store_trade_chunk(conn, symbol, chunk, has_ids, claim, holes)

    def _store_trade_chunk(self, conn: psycopg.Connection, symbol: str, chunk: TradeChunk, has_ids: bool,
                           claim: tuple[datetime, datetime] | None,
                           parsed_around: Sequence[tuple[datetime, datetime]]) -> tuple[int, int, int, int]:
        """Store a chunk, the 1-minute candles of its minutes and its claim on the archive's
        seconds; returns (inserted, already stored, candles written, left to the id family).

        The caller holds the symbol's lock: the id family's seconds are read afresh here
        (`parsed_around` is what the parser already left out), so a backfill or stream that
        committed since the import began keeps its seconds (ownership.py).

        Fast path (plain files): when no trade at all is stored in the chunk's minutes and no
        second it holds became the id family's, the rows are COPYed straight into ``trades``
        and the parser's candles are written as they are. Otherwise (a re-import, REST or
        WebSocket trades near, ids from the file) through staging: rows of id-owned seconds
        are removed, the rest merged by identity, candles rebuilt from all stored trades.
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
        counts = (0, 0, 0, 0)
        if lo is not None and hi is not None:
            assert chunk.first_time is not None and chunk.last_time is not None
            rows_span = [(ownership.second_floor(chunk.first_time), chunk.last_time + ONE_SECOND)]
            newly_owned = gaps.subtract(gaps.intersect(owned, rows_span), ownership.whole_seconds(parsed_around))
            if chunk.candles is not None and not has_ids and not present and not newly_owned:
                try:
                    with conn.transaction():
                        _copy_trades(conn, "trades", chunk)
                        counts = (chunk.rows, 0, self._write_parsed_candles(
                            conn, symbol, self.registry.get(symbol).price_decimals, chunk, lo, hi), 0)
                except psycopg.errors.UniqueViolation:
                    log.info("csv import: %s rows appeared concurrently in %s..%s, deduplicating", symbol,
                             lo.isoformat(), hi.isoformat(), extra={"event": "csv_import_conflict"})
            if counts == (0, 0, 0, 0):
                counts = self._merge_trade_chunk(conn, symbol, chunk, has_ids, newly_owned)
        if claim is not None:
            self._claim(conn, symbol, claim, has_ids, owned)
        return counts

    @staticmethod
    def _claim(conn: psycopg.Connection, symbol: str, claim: tuple[datetime, datetime], has_ids: bool,
               owned: Sequence[tuple[datetime, datetime]]) -> None:
        """Record what the file proves complete: the archive's whole seconds, or (a file with
        ids) coverage of the id family."""
        if has_ids:
            store.add_coverage(conn, symbol, ownership.ID_FILE_SOURCE, *claim)
            return
        for lo, hi in ownership.archive_claim(claim, owned):
            store.add_coverage(conn, symbol, ownership.ARCHIVE_SOURCE, lo, hi)

    def _merge_trade_chunk(self, conn: psycopg.Connection, symbol: str, chunk: TradeChunk, has_ids: bool,
                           id_owned: Sequence[tuple[datetime, datetime]]) -> tuple[int, int, int, int]:
        """Staging path: drop the rows of `id_owned` seconds, insert what is not stored, rebuild
        candles. Rows with Kraken's ids merge as the id family's (archive seconds left out)."""
        assert chunk.first_time is not None and chunk.last_time is not None
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(_TRADE_STAGE)))
        _copy_trades(conn, _TRADE_STAGE, chunk)
        left = 0
        if id_owned and not has_ids:
            left = conn.execute(_DROP_STAGED_IN, ([a for a, _ in id_owned], [b for _, b in id_owned])).rowcount
        inserted = conn.execute(_MERGE_ID_TRADES if has_ids else _MERGE_TRADES,
                                store.identity_window(chunk.first_time, chunk.last_time)).rowcount
        candles = store.rebuild_candles(conn, symbol, chunk.first_time, chunk.last_time + ONE_SECOND,
                                        decimals=self.registry.get(symbol).price_decimals) if inserted else 0
        return inserted, chunk.rows - inserted - left, candles, left

    @staticmethod
    def _write_parsed_candles(conn: psycopg.Connection, symbol: str, decimals: int, chunk: TradeChunk,
                              lo: datetime, hi: datetime) -> int:
        """Write the parser's candles of ``[lo, hi)`` (minutes holding only this chunk's trades)."""
        assert chunk.candles is not None
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(_CANDLE_STAGE)))
        _copy_chunk(conn, _CANDLE_STAGE, ("time", "open", "high", "low", "close", "notional", "volume", "trades"),
                    chunk.candles, chunk.binary)
        params = {"symbol": symbol, "decimals": decimals, "lo": lo, "hi": hi}
        if conn.execute(_CANDLES_PRESENT, (symbol, lo, hi)).fetchone()[0]:
            conn.execute(_DELETE_STALE_CANDLES, params)
            written = conn.execute(_UPSERT_CANDLES_FROM_STAGE, params).rowcount
        else:  # nothing to replace (a first import): a plain insert, a third cheaper than the upsert
            written = conn.execute(_INSERT_CANDLES_FROM_STAGE, params).rowcount
        store.record_candle_change(conn, symbol, lo, hi)
        return written

    def _finish_trades(self, conn: psycopg.Connection, source: _Source, symbol: str, layout: Layout, tally: _Tally,
                       covered_to: datetime | None, report: BadRowReport) -> None:
        """Close the file's claim and, when the file ends after everything stored, move the
        resume point to its end (caller holds the symbol's lock).

        The frontier after the file is then "the first Kraken id at or after its end": the
        resume cursor asks REST for exactly that, and ``last_trade_id`` is cleared because the
        id stored before the file no longer continues into what follows it (the ids between
        are the archive's trades). Backfill, stream and gap fill establish it from there.
        """
        if tally.first_time is None or tally.last_time is None:
            self._record_import(conn, source, symbol, layout, tally, report, None)
            return
        # Whole-second times: the file holds all of its last second S, so it ends at S+1s.
        step = ONE_SECOND if tally.last_time.microsecond == 0 else timedelta(microseconds=1)
        end = tally.last_time + step
        start = covered_to or tally.first_time
        if end > start:
            owned = [] if layout.has_ids else ownership.read_id_owned(conn, symbol, start, end)
            self._claim(conn, symbol, (start, end), layout.has_ids, owned)
        if layout.has_ids:  # the id frontier is the file's last id
            frontier, last_id = end, tally.max_id
        else:  # the archive's time ends where its last claimed second ends (the id family may own the file's tail)
            archive = store.read_coverage(conn, symbol, ownership.ARCHIVE_SOURCE)
            frontier, last_id = (archive[-1][1] if archive else None), None
        status = store.read_sync_status(conn, symbol, "trades")
        if frontier is not None and (status is None or status["last_time"] is None or frontier > status["last_time"]):
            store.write_sync_status(
                conn, symbol, "trades", last_time=frontier, cursor=since_cursor(frontier), last_trade_id=last_id,
                details={"resumed_from": "csv", "csv_file": source.label},
            )
        self._record_import(conn, source, symbol, layout, tally, report, end)

    def _record_import(self, conn: psycopg.Connection, source: _Source, symbol: str, layout: Layout,
                       tally: _Tally, report: BadRowReport, end: datetime | None) -> None:
        """Keep a record of the import in sync_status (data_type 'csv_import'), one key per file."""
        data_type = "csv_import" if layout.kind != OHLCVT else f"csv_ohlcvt_{layout.interval}"
        previous = store.read_sync_status(conn, symbol, data_type)
        last = end
        if previous is not None and previous["last_time"] is not None:
            last = max(previous["last_time"], end) if end is not None else previous["last_time"]
        store.write_sync_status(
            conn, symbol, data_type, last_time=last,
            details={source.label: {
                "imported": tally.imported, "duplicates": tally.duplicates, "covered": tally.covered,
                "bad": report.total, "lines": tally.lines,
                "first_time": tally.first_time.isoformat() if tally.first_time else None,
                "last_time": tally.last_time.isoformat() if tally.last_time else None,
            }},
        )

    # ----- OHLCVT

    def _import_ohlcvt(self, conn: psycopg.Connection, source: _Source, layout: Layout, symbol: str,
                       lines: Iterable[bytes], first_line_no: int, report: BadRowReport, tally: _Tally) -> None:
        assert layout.interval is not None
        width = timedelta(minutes=layout.interval)
        chunks = parse_ohlcvt(lines, layout=layout, report=report, chunk_size=self.chunk_size,
                              first_line_no=first_line_no)
        stage = sql.Identifier(_OHLC_STAGE)
        with self._transaction(conn), _Prefetcher(chunks, name=f"csv-parse-{source.name}") as parsed:
            for chunk in parsed:
                with conn.transaction():
                    if chunk.rows:
                        conn.execute(sql.SQL("TRUNCATE {}").format(stage))
                        _copy(conn, sql.SQL("COPY {} (time, open, high, low, close, vwap, volume, trades, line) "
                                            "FROM STDIN").format(stage), chunk.payload)
                        self._merge_ohlc_chunk(conn, symbol, layout.interval, chunk, tally)
                    if layout.interval == 1 and chunk.last_time is not None:
                        start = tally.first_time or chunk.first_time
                        assert start is not None
                        store.add_coverage(conn, symbol, "ohlc", start, chunk.last_time + width)
                self._advance(tally, chunk)
            with self._durably(conn):
                end = tally.last_time + width if tally.last_time is not None else None
                self._record_import(conn, source, symbol, layout, tally, report, end)

    @staticmethod
    def _merge_ohlc_chunk(conn: psycopg.Connection, symbol: str, interval: int, chunk: OhlcChunk, tally: _Tally) -> None:
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

    # ----- aggregates

    def _into_timescaledb(self) -> bool:
        """Whether the database is TimescaleDB (asked once per importer)."""
        if self._timescaledb is None:
            with contextlib.closing(connect(self.db_url, autocommit=True)) as conn:
                self._timescaledb = has_timescaledb(conn)
        return self._timescaledb

    def _refresh(self, symbol: str, start: datetime, end: datetime) -> bool:
        """Refresh the higher intervals over the imported window, when the refresh job exists."""
        try:
            from kraken_hist.storage.refresh import refresh_aggregates
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.refresh":
                raise
            log.info("csv import: kraken_hist.storage.refresh not available; aggregates not refreshed",
                     extra={"event": "csv_import_no_refresh"})
            return False
        refresh_aggregates(self.db_url, symbol, start, end)
        return True

    def _refresh_all(self) -> bool:
        """One refresh of every pending change (a batch's files, whatever their symbols)."""
        from kraken_hist.storage.refresh import refresh_aggregates

        refresh_aggregates(self.db_url)
        return True


# --------------------------------------------------------------------------- OHLCVT check

@dataclass(frozen=True, slots=True)
class CandleMismatch:
    """One bucket where the exchange's candle and ours differ (None: that side has no candle)."""

    time: datetime
    fields: tuple[str, ...]
    exchange: dict[str, Any] | None
    ours: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(), "fields": list(self.fields),
                "exchange": {k: str(v) for k, v in self.exchange.items()} if self.exchange else None,
                "ours": {k: str(v) for k, v in self.ours.items()} if self.ours else None}


@dataclass(frozen=True, slots=True, kw_only=True)
class CandleComparison:
    """Exchange candles (OHLCVT import) against our aggregates over the same buckets."""

    symbol: str
    interval: int
    compared: int  # buckets present on either side
    matching: int
    mismatched: int  # both sides present, some field differs
    missing_ours: int  # the exchange has a candle, we have none
    missing_exchange: int  # we have a candle, the exchange none
    examples: tuple[CandleMismatch, ...] = ()

    @property
    def ok(self) -> bool:
        return self.compared == self.matching

    def to_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "interval": self.interval, "compared": self.compared,
                "matching": self.matching, "mismatched": self.mismatched, "missing_ours": self.missing_ours,
                "missing_exchange": self.missing_exchange, "ok": self.ok,
                "examples": [m.to_dict() for m in self.examples]}


_FIELDS = ("open", "high", "low", "close", "volume", "trades")


def _ours_query(interval: int, use_relation: bool) -> sql.Composable:
    """Our candles of `interval`: the stored relation, or computed from 1-minute candles.

    Kraken's buckets start at the epoch (its weeks on Thursdays); our weekly relation starts
    on Mondays (a convention, KRAKEN.md), so weekly buckets are always computed from 1-minute
    candles with the exchange's origin: like is compared with like."""
    columns = sql.SQL("time, open, high, low, close, volume, trades")
    if use_relation and interval in INTERVAL_RELATIONS and Interval(interval).origin == EPOCH:
        return sql.SQL("SELECT {} FROM {} WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s").format(
            columns, sql.Identifier(INTERVAL_RELATIONS[interval]))
    return sql.SQL(
        """SELECT date_bin(make_interval(mins => %(interval)s), time, %(origin)s) AS time,
                  (array_agg(open ORDER BY time))[1] AS open, max(high) AS high, min(low) AS low,
                  (array_agg(close ORDER BY time DESC))[1] AS close, sum(volume) AS volume,
                  sum(trades)::integer AS trades
           FROM candles WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s
           GROUP BY 1""")


def compare_exchange_candles(
    db_url: str,
    symbol: str,
    interval: int,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    use_relation: bool = True,
    max_examples: int = 20,
    registry: PairRegistry | None = None,
) -> CandleComparison:
    """Compare ``exchange_candles`` of `interval` (imported OHLCVT rows) with our candles of
    the same buckets: the stored relation of that interval (``use_relation``, after a
    refresh) or buckets computed from 1-minute candles (always, and for 720 which is not
    stored). Compares open, high, low, close, volume and trade count, exactly."""
    symbol = (registry if registry is not None else database_registry(db_url)).normalize(symbol)
    with contextlib.closing(connect(db_url, autocommit=True)) as conn:
        lo, hi = conn.execute(
            "SELECT min(time), max(time) FROM exchange_candles WHERE symbol = %s AND interval = %s "
            "AND (%s::timestamptz IS NULL OR time >= %s) AND (%s::timestamptz IS NULL OR time < %s)",
            (symbol, interval, start, start, end, end),
        ).fetchone()
        if lo is None:
            return CandleComparison(symbol=symbol, interval=interval, compared=0, matching=0, mismatched=0,
                                    missing_ours=0, missing_exchange=0)
        hi = hi + timedelta(minutes=interval)
        query = sql.SQL(
            """WITH ex AS (SELECT time, open, high, low, close, volume, trades FROM exchange_candles
                           WHERE symbol = %(symbol)s AND interval = %(interval)s
                             AND time >= %(lo)s AND time < %(hi)s),
                    ours AS ({ours})
               SELECT coalesce(ex.time, ours.time), ex.open, ex.high, ex.low, ex.close, ex.volume, ex.trades,
                      ours.time IS NOT NULL, ours.open, ours.high, ours.low, ours.close, ours.volume, ours.trades,
                      ex.time IS NOT NULL
               FROM ex FULL JOIN ours ON ours.time = ex.time ORDER BY 1""").format(ours=_ours_query(interval, use_relation))
        params = {"symbol": symbol, "interval": interval, "lo": lo, "hi": hi, "origin": EPOCH}
        counts = {"compared": 0, "matching": 0, "mismatched": 0, "missing_ours": 0, "missing_exchange": 0}
        examples: list[CandleMismatch] = []
        with conn.transaction(), conn.cursor(name="csv_compare") as cur:
            cur.execute(query, params)
            for row in cur:
                counts["compared"] += 1
                theirs = dict(zip(_FIELDS, row[1:7])) if row[14] else None
                ours = dict(zip(_FIELDS, row[8:14])) if row[7] else None
                if theirs is None or ours is None:
                    counts["missing_ours" if ours is None else "missing_exchange"] += 1
                    differing = _FIELDS
                else:
                    differing = tuple(f for f in _FIELDS if theirs[f] != ours[f])
                    if not differing:
                        counts["matching"] += 1
                        continue
                    counts["mismatched"] += 1
                if len(examples) < max_examples:
                    examples.append(CandleMismatch(row[0], differing, theirs, ours))
    return CandleComparison(symbol=symbol, interval=interval, examples=tuple(examples), **counts)
