"""Bulk import of Kraken's downloadable history: Time and Sales and OHLCVT files, plain or zipped.

Files are streamed in chunks (bounded memory whatever their size; zip members are read
straight from the archive, ``sources``) and COPYed into PostgreSQL: Time and Sales by
``trades_file`` (chunk by chunk through ``chunk_store``), OHLCVT by ``ohlcvt``. This module
is the service: which files, their pairs and layouts, one connection and lock per file, one
aggregate refresh per run, the results.

Integrity (DESIGN.md, "Data integrity rules"):

* Id-less trades get stable synthetic ids (``rows.synthetic_trade_id``), so a re-import
  stores nothing twice.
* A Time and Sales second that REST or WebSocket coverage touches is left to that
  id-bearing source (no overlap); coverage ``csv`` is recorded for what the file covers, and
  the trades resume point moves to the file's end so a REST backfill continues from there.
* 1-minute candles of the imported minutes are written in the same transaction as the
  trades (``chunk_store``). Then the higher intervals are refreshed
  (``refresh.refresh_aggregates``).
* OHLCVT 1-minute rows go to ``candles`` (source ``csv_ohlc``, vwap NULL) only in minutes no
  trades cover; other intervals go to ``exchange_candles``, and ``compare_exchange_candles``
  checks them against our aggregates.

Transactions: strict mode imports a file in one transaction and fails at its first bad line,
leaving the database unchanged. Otherwise each chunk commits with its candles and coverage,
bad lines are skipped and reported, and the file's final bookkeeping (resume point, import
record) commits last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import itertools
import logging
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from kraken_hist.core.config import Settings
from kraken_hist.core.errors import PermanentError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.ingest.archive.chunk_store import CHUNK_ATTEMPTS
from kraken_hist.ingest.archive.comparison import CandleComparison, CandleMismatch, compare_exchange_candles
from kraken_hist.ingest.archive.job import FileJob
from kraken_hist.ingest.archive.layout import OHLCVT, LayoutError, sniff_layout
from kraken_hist.ingest.archive.ohlcvt import import_ohlcvt
from kraken_hist.ingest.archive.results import ImportRefusedError, ImportResult, ProgressCallback, Tally, result_of
from kraken_hist.ingest.archive.rows import BadRowReport
from kraken_hist.ingest.archive.sources import Source, file_source, resolve_symbol, zip_sources
from kraken_hist.ingest.archive.staging import CONNECTION_SETUP
from kraken_hist.ingest.archive.trades_file import import_trades
from kraken_hist.storage.db import connect, has_timescaledb
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry, PairResolver

__all__ = ["CHUNK_ATTEMPTS", "BulkCSVImporter", "CandleComparison", "CandleMismatch", "ImportRefusedError",
           "ImportResult", "ProgressCallback", "compare_exchange_candles"]

log = logging.getLogger(__name__)


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
                sources = zip_sources(archive, path, "*.csv")
                if len(sources) != 1:
                    raise ImportRefusedError(
                        f"{path}: the archive holds {len(sources)} CSV files; use import_archive() for several"
                    )
                return self._import_readable(sources[0], symbol)
        if not path.is_file():
            raise ImportRefusedError(f"{path}: no such file")
        return self._import_source(file_source(path), symbol)

    def import_archive(self, path: str | Path, symbol: str | None = None, pattern: str = "*.csv") -> list[ImportResult]:
        """Import every CSV member of a zip archive (``Kraken_OHLCVT.zip`` and the like),
        streamed without unpacking. Members that cannot be imported are reported as refused."""
        path = Path(path)
        with zipfile.ZipFile(path) as archive, self._batch() as batch:
            return batch(self._import_many(zip_sources(archive, path, pattern), symbol))

    def _import_many(self, sources: Sequence[Source], symbol: str | None) -> list[ImportResult]:
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
            results.append(self._import_or_refuse(file_source(path), symbol))
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

    def compare_exchange_candles(self, symbol: str, interval: int, **kwargs: Any) -> CandleComparison:
        """Compare imported OHLCVT candles of `interval` with our aggregates (see the function)."""
        return compare_exchange_candles(self.db_url, symbol, interval, **kwargs)

    # ----- one file

    def _import_or_refuse(self, source: Source, symbol: str | None) -> ImportResult:
        try:
            return self._import_readable(source, symbol)
        except (ImportRefusedError, LayoutError) as exc:
            log.warning("csv import refused %s: %s", source.label, exc, extra={"event": "csv_import_refused"})
            return ImportResult(file=source.label, status="refused", reason=str(exc))
        except PermanentError as exc:  # strict mode's first bad line, among others
            log.warning("csv import failed %s: %s", source.label, exc, extra={"event": "csv_import_failed"})
            return ImportResult(file=source.label, status="failed", reason=str(exc))

    def _import_readable(self, source: Source, symbol: str | None) -> ImportResult:
        """Import `source`; a member of an archive that cannot be read (a CRC mismatch, a zlib
        or truncation error) is refused with one line naming the member and the error. Chunks
        committed before the damage stay (each with exactly its coverage); the archive's other
        members go on."""
        try:
            return self._import_source(source, symbol)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            kind = "zlib error" if isinstance(exc, zlib.error) else "damaged member"
            raise ImportRefusedError(f"{source.label}: {kind}: {exc} (what was read before it is stored)") from exc
    def _resolve_symbol(self, source: Source, symbol: str | None) -> str:
        """The pair of a file (see ``sources.resolve_symbol``)."""
        return resolve_symbol(self._pair_resolver(), source, symbol)

    def _pair_resolver(self) -> PairResolver:
        if self.resolver is None:  # offline: the database's table (and what is inferred here)
            self.resolver = PairResolver(self.db_url, registry=self.registry)
        return self.resolver

    def _import_source(self, source: Source, symbol: str | None) -> ImportResult:
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
            tally = Tally(progress=self.progress)
            if layout.header:
                tally.lines, tally.bytes = 1, len(first)
            log.info("csv import %s: %s, %s", source.label, resolved, layout.describe(),
                     extra={"event": "csv_import_start"})
            with self._main_connection(resolved) as conn:
                job = FileJob(conn, source, layout, resolved, report, tally)
                if layout.kind == OHLCVT:
                    import_ohlcvt(self, job, lines, first_line_no)
                else:
                    import_trades(self, job, stream, head, first_line_no)
        refreshed = tally.refreshed_to is not None
        if tally.candles and self.refresh and not self._batching and tally.first_time is not None \
                and tally.last_time is not None:
            start = tally.refreshed_to or tally.first_time
            end = tally.last_time + timedelta(minutes=layout.interval or 1)
            if end > start:
                refreshed = self.refresh_window(resolved, start, end)
        result = result_of(source.label, resolved, layout, tally, report, refreshed=refreshed,
                           seconds=time.monotonic() - started)
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
            # commits synchronously (durably), flushing everything before it
            for statement in CONNECTION_SETUP:
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
    def durably(self, conn: psycopg.Connection) -> Iterator[None]:
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

    def transaction(self, conn: psycopg.Connection) -> contextlib.AbstractContextManager[Any]:
        """Strict mode: the whole file in one transaction (chunks become savepoints)."""
        return conn.transaction() if self.strict else contextlib.nullcontext()

    # ----- what a file's import asks of the importer (job.ImportHost)

    def price_decimals(self, symbol: str) -> int:
        return self.registry.get(symbol).price_decimals

    def into_timescaledb(self) -> bool:
        """Whether the database is TimescaleDB (asked once per importer)."""
        if self._timescaledb is None:
            with contextlib.closing(connect(self.db_url, autocommit=True)) as conn:
                self._timescaledb = has_timescaledb(conn)
        return self._timescaledb

    def refresh_window(self, symbol: str, start: datetime, end: datetime) -> bool:
        """Refresh the higher intervals over the imported window, when the refresh job exists."""
        try:
            from kraken_hist.storage.refresh import refresh_aggregates
        except ModuleNotFoundError as exc:
            if exc.name != "kraken_hist.storage.refresh":
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
