"""A Time and Sales file into the database, chunk by chunk, and its bookkeeping at the end.

A parser thread prepares the next chunks while the database stores the current ones; plain
files (chunks ending on minute boundaries, whole seconds) are stored on ``writers``
connections at once, since the server's work per row (two indexes) is the bound. Each chunk
commits with its candles and coverage (``chunk_store``); the file's final bookkeeping
(resume point, import record) commits last, so a crash mid-file leaves complete chunks (with
parallel writers, not necessarily consecutive ones) that a re-run skips as duplicates,
coverage of exactly their seconds, and no resume point past them.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import IO

import psycopg

from kraken_hist.core.timeutils import floor_minute, since_cursor
from kraken_hist.ingest.archive import chunk_store
from kraken_hist.ingest.archive.chunk_store import ChunkCounts, Span
from kraken_hist.ingest.archive.job import FileJob, ImportHost
from kraken_hist.ingest.archive.results import Tally, record_import
from kraken_hist.ingest.archive.rows import SecondBlocker, TradeChunk
from kraken_hist.ingest.archive.staging import CONNECTION_SETUP
from kraken_hist.ingest.archive.threads import ConnectionPool, Prefetcher
from kraken_hist.ingest.archive.trade_lines import parse_header_trades
from kraken_hist.ingest.archive.vectorized import stream_plain_trades
from kraken_hist.rules import ranges
from kraken_hist.storage import ownership, store

ONE_SECOND = timedelta(seconds=1)
ONE_MINUTE = timedelta(minutes=1)
#: About what a Time and Sales line takes (``1700000000,30000.1,0.00012345``): files under two
#: chunks of it are stored on the file's own connection, not worth a pool of writers.
BYTES_PER_LINE = 32
#: Chunks stored between two aggregate refreshes during a parallel import.
REFRESH_EVERY = 10


def import_trades(host: ImportHost, job: FileJob, stream: IO[bytes], head: bytes, first_line_no: int) -> None:
    """Store a Time and Sales file (`head`: what was read of it already), then its bookkeeping.

    Seconds that REST or WebSocket coverage touches are left to that id-bearing source
    (``SecondBlocker``, and afresh under the lock for each chunk)."""
    conn, layout, symbol = job.conn, job.layout, job.symbol
    holes: list[Span] = []
    if not layout.has_ids:
        holes = ranges.union(*(store.read_coverage(conn, symbol, source) for source in ownership.ID_SOURCES))
    blocker = SecondBlocker(holes)
    if layout.is_plain_time_and_sales:
        chunks: Iterator[TradeChunk] = stream_plain_trades(
            stream, symbol=symbol, report=job.report, chunk_size=host.chunk_size, blocker=blocker, head=head,
            first_line_no=first_line_no)
    else:
        chunks = parse_header_trades(
            stream, layout=layout, symbol=symbol, report=job.report, chunk_size=host.chunk_size,
            blocker=blocker, first_line_no=first_line_no)
    decimals = host.price_decimals(symbol)
    with host.transaction(conn), Prefetcher(chunks, name=f"csv-parse-{job.source.name}") as parsed:
        if layout.is_plain_time_and_sales and not host.strict and host.writers > 1 \
                and job.source.size > 2 * host.chunk_size * BYTES_PER_LINE:  # a smaller file is one or two chunks
            covered_to = ParallelStore(host, symbol, decimals, holes, job.tally).run(parsed)
        else:
            covered_to = _store_in_order(job, decimals, parsed, holes)
        with host.durably(conn):
            ownership.lock_symbol(conn, symbol)
            _finish(job, covered_to)


def _store_in_order(job: FileJob, decimals: int, parsed: Iterable[TradeChunk], holes: Sequence[Span]) -> datetime | None:
    """Store chunks one after the other on the file's connection; returns where the recorded
    coverage ends."""
    has_ids = job.layout.has_ids
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
        counts = chunk_store.store_chunk(job.conn, job.symbol, decimals, chunk, has_ids, claim, holes)
        job.tally.count_trades(chunk, counts, has_ids)
    return covered_to


class ParallelStore:
    """Store plain chunks on ``writers`` connections at once, each chunk in its own
    transaction with the coverage of exactly the seconds it holds.

    Plain chunks end on minute boundaries and carry whole seconds, so chunk N claims
    ``[end of chunk N-1, its last second + 1s)``: a quiet stretch between chunks goes to
    the later one, and whichever chunks commit (a crash may leave any subset), coverage
    never claims a second whose trades are not stored. Results are counted in file order,
    and every ``REFRESH_EVERY`` chunks the aggregates are refreshed up to the stored prefix
    of the file on the same workers, so little is left to refresh at the end.
    """

    def __init__(self, host: ImportHost, symbol: str, decimals: int, holes: Sequence[Span], tally: Tally) -> None:
        self.host = host
        self.symbol = symbol
        self.decimals = decimals
        self.holes = holes
        self.tally = tally
        self.pending: collections.deque[tuple[TradeChunk, concurrent.futures.Future[ChunkCounts]]] = \
            collections.deque()
        self.refreshes: list[concurrent.futures.Future[bool]] = []
        self.settled = 0
        # On TimescaleDB the aggregates are refreshed once, at the end: refreshing the hierarchy
        # beside the import's own writes took 107 s of a 10M-row import that takes 36 s and one
        # 8 s refresh without (benchmarks/csv_import.py); the plain tables keep up every ten chunks.
        self.periodic = host.refresh and not host.into_timescaledb()

    def run(self, parsed: Iterable[TradeChunk]) -> datetime | None:
        """Store every chunk; returns where the claimed coverage ends."""
        claimed_to: datetime | None = None
        # A chunk's commit need not wait for its WAL flush: the file's final bookkeeping commits
        # synchronously on the main connection, which flushes all of it; a server crash before
        # then loses whole chunks (trades, candles and coverage together), which a re-run stores.
        with ConnectionPool(self.host.db_url, self.host.writers, CONNECTION_SETUP) as pool:
            try:
                for chunk in parsed:
                    claim = None
                    if chunk.last_time is not None:
                        claim = (claimed_to or chunk.first_time, chunk.last_time + ONE_SECOND)
                        claimed_to = claim[1]
                    self.pending.append((chunk, pool.submit(self._store, chunk, claim)))
                    while len(self.pending) > self.host.writers:
                        self._settle_oldest(pool)
                while self.pending:
                    self._settle_oldest(pool)
                for refresh in self.refreshes:
                    refresh.result()
            except BaseException:
                waiting = [future for _chunk, future in self.pending] + self.refreshes
                for future in waiting:  # let started transactions end before closing
                    future.cancel()
                concurrent.futures.wait(waiting)
                raise
        return claimed_to

    def _store(self, conn: psycopg.Connection, chunk: TradeChunk, claim: Span | None) -> ChunkCounts:
        # shared: this import's chunks claim disjoint seconds; every other writer of the
        # symbol takes the lock exclusively and waits for them (and they for it)
        return chunk_store.store_chunk(conn, self.symbol, self.decimals, chunk, False, claim, self.holes, shared=True)

    def _settle_oldest(self, pool: ConnectionPool) -> None:
        """Count the oldest chunk in flight (waiting for it), and refresh every REFRESH_EVERY."""
        chunk, future = self.pending.popleft()
        tally = self.tally
        tally.count_trades(chunk, future.result(), False)
        self.settled += 1
        if self.periodic and tally.candles and chunk.last_time is not None and self.settled % REFRESH_EVERY == 0:
            start = tally.refreshed_to or tally.first_time
            end = floor_minute(chunk.last_time) + ONE_MINUTE  # every minute before it is stored
            assert start is not None
            self.refreshes.append(pool.submit(lambda _conn: self.host.refresh_window(self.symbol, start, end)))
            tally.refreshed_to = end


def _finish(job: FileJob, covered_to: datetime | None) -> None:
    """Close the file's claim and, when the file ends after everything stored, move the
    resume point to its end (caller holds the symbol's lock).

    The frontier after the file is then "the first Kraken id at or after its end": the
    resume cursor asks REST for exactly that, and ``last_trade_id`` is cleared because the
    id stored before the file no longer continues into what follows it (the ids between
    are the archive's trades). Backfill, stream and gap fill establish it from there.
    """
    conn, source, symbol, layout, tally = job.conn, job.source, job.symbol, job.layout, job.tally
    if tally.first_time is None or tally.last_time is None:
        record_import(conn, source.label, symbol, layout, tally, job.report, None)
        return
    # Whole-second times: the file holds all of its last second S, so it ends at S+1s.
    step = ONE_SECOND if tally.last_time.microsecond == 0 else timedelta(microseconds=1)
    end = tally.last_time + step
    start = covered_to or tally.first_time
    if end > start:
        owned = [] if layout.has_ids else ownership.read_id_owned(conn, symbol, start, end)
        chunk_store.record_claim(conn, symbol, (start, end), layout.has_ids, owned)
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
    record_import(conn, source.label, symbol, layout, tally, job.report, end)
