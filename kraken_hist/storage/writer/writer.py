"""DatabaseWriter: buffered, thread-safe COPY ingestion that never loses or doubles a record.

``write_trade`` validates a trade and encodes it, once, into its COPY text line (``records``);
under the lock it only appends the line to the open batch (deduplicating by trade id within
the batch, and keeping the touched minute's exact summary, ``sums``, when building candles).
A named flush thread commits batches (``flush_thread``, ``commit``): trades, the 1-minute
candles of the touched minutes in the same transaction (``candles``), explicit candles (the
newest value per bucket wins, but an exchange candle never overwrites one built from trades),
and sync statuses, each applied only once every record accepted before it is committed.
Memory is bounded (``buffers``): past a limit, or while the database is away, batches go to
the local spool (``spool``) and are replayed in order; a data error is bisected down to the
offending record, which is rejected and reported.

A spool belongs to one database (``spool_claim.claim``): its slot is labelled with the
server's ``system_identifier`` and the database oid. ``start`` refuses (SpoolOwnerError, one
line naming both databases and what to do) when an unowned slot holds another database's
records, or records of a version that did not label its spools (unless
``adopt_unlabelled_spool``: the caller vouches they belong here). When the database is down at
start, a labelled spool found there is *held*: its records are numbered first, nothing of this
writer is committed before them, and the flush thread's first step, once the database
answers, reads its identity: the held spool is then moved in front of this writer's spool and
replayed, or, if it belongs to another database, left where it is (reported, counted in
``spool_foreign``) while this writer goes on with its own records.

Stopping never waits for a database that does not answer: once an attempt made while
stopping fails (or a wait for a connection lasts past a short grace), everything still in
memory is spooled and the flush thread ends, so ``stop()`` returns within a few seconds; the
next writer of the same database replays the spool.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import psycopg

from kraken_hist.core.config import Settings, settings_or_env
from kraken_hist.core.errors import DatabaseUnavailableError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.types import CandleRecord, TradeRecord
from kraken_hist.storage.db import libpq_url
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.storage.writer import spool_format, spool_labels
from kraken_hist.storage.writer.buffers import Buffers
from kraken_hist.storage.writer.commit import Committer
from kraken_hist.storage.writer.flush_thread import FlushLoop, fsync_loop
from kraken_hist.storage.writer.records import SymbolCheck, TradeEncoder, candle_row, sync_row
from kraken_hist.storage.writer.spool_claim import claim
from kraken_hist.storage.writer.spool_labels import DatabaseIdentity
from kraken_hist.storage.writer.sums import EXACT, MinuteSums, plain

logger = logging.getLogger(__name__)

_multiply = EXACT.multiply


class DatabaseWriter:
    """Buffered, thread-safe writer of trades, 1-minute candles and sync status.

    ``write_*`` never block on the database. Records are durable (committed) once
    :meth:`flush` returns True, or after :meth:`stop`; while the database is away or behind
    they are kept in the local spool (``<data_dir>/spool``) and replayed, in order, when it
    answers again or on the next start after a crash — by a writer of the same database only
    (see the module docstring; ``start`` raises SpoolOwnerError on another database's spool).

    ``adopt_unlabelled_spool``: replay a spool that does not record its database (written by
    a version before spools were labelled) into this writer's database. Off by default: such
    a spool is refused like another database's, since nothing tells where it was meant to go;
    the error says how to replay or move it.
    """

    MAX_TRADE_BUFFER_SIZE = 10_000
    MAX_CANDLE_BUFFER_SIZE = 1_000

    def __init__(
        self,
        db_url: str | None = None,
        trade_buffer_size: int = 100,
        trade_flush_interval: float = 5.0,
        candle_flush_interval: float = 1.0,
        pool_min_size: int = 2,
        pool_max_size: int = 10,
        *,
        settings: Settings | None = None,
        data_dir: Path | str | None = None,
        build_candles: bool = True,
        connect_timeout: float = 5.0,
        max_retry_delay: float = 5.0,
        on_reject: Callable[[str, tuple, str], None] | None = None,
        adopt_unlabelled_spool: bool = False,
        registry: PairRegistry | None = None,
    ) -> None:
        if not 1 <= trade_buffer_size <= self.MAX_TRADE_BUFFER_SIZE:
            raise ValueError(f"trade_buffer_size must be within 1..{self.MAX_TRADE_BUFFER_SIZE}, got {trade_buffer_size}")
        if trade_flush_interval <= 0 or candle_flush_interval <= 0:
            raise ValueError("flush intervals must be positive")
        if not 1 <= pool_min_size <= pool_max_size:
            raise ValueError(f"need 1 <= pool_min_size <= pool_max_size, got {pool_min_size}, {pool_max_size}")
        self._db_url = db_url
        self._settings = settings
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.trade_buffer_size = trade_buffer_size
        self.trade_flush_interval = float(trade_flush_interval)
        self.candle_flush_interval = float(candle_flush_interval)
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.build_candles = build_candles
        self.connect_timeout = connect_timeout
        self.max_retry_delay = max_retry_delay
        self._on_reject = on_reject
        self.adopt_unlabelled_spool = adopt_unlabelled_spool

        self._buffers = Buffers(trade_buffer_size, self.trade_flush_interval, self.candle_flush_interval,
                                max_trades=self.MAX_TRADE_BUFFER_SIZE)
        self._lock = self._buffers.lock
        self._registry = registry
        self._check_symbol = SymbolCheck(lambda: self.registry)
        self._encode_trade = TradeEncoder(self._check_symbol)
        self._committer: Committer | None = None  # once started (it needs the database's URL)
        self._thread: threading.Thread | None = None
        self._fsync_thread: threading.Thread | None = None
        self._fsync_stop = threading.Event()
        self.url: str | None = None
        self.rejected: deque[tuple[str, tuple, str]] = deque(maxlen=1000)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "DatabaseWriter":
        """Resolve the database, open the pool and the spool, recover a crashed run's spool
        of the same database, and start the flush thread. A database that is down does not
        stop the start (a spool found then waits for the identity check); another database's
        spool does (SpoolOwnerError, nothing replayed or removed)."""
        buffers = self._buffers
        with self._lock:
            if buffers.state != "new":
                raise RuntimeError(f"writer cannot start: it is {buffers.state}")
        settings = settings_or_env(self._settings)
        self.url = self._resolve_url(settings)
        identity = self._read_identity_at_start()
        root = (self._data_dir if self._data_dir is not None else Path(settings.data_dir)) / "spool"
        found = claim(root, identity, adopt_unlabelled=self.adopt_unlabelled_spool)
        spool, held, recovered = found.spool, found.held, found.recovered
        buffers.stats["spool_corrupt"] = spool.corrupt + sum(h.corrupt for h in held)
        if spool:
            logger.warning("writer: replaying %d spooled records from %s", spool.pending, spool.directory,
                           extra={"event": "writer_spool_recover"})
        for other in held:
            logger.warning("writer: %s holds %d spooled records for database %s; they are replayed once %s "
                           "answers and proves to be that database", other.directory, other.pending, other.label,
                           identity.description, extra={"event": "writer_spool_held"})
        committer = self._committer = Committer(
            self.url, pool_min_size=self.pool_min_size, pool_max_size=self.pool_max_size,
            connect_timeout=self.connect_timeout, build_candles=self.build_candles,
            registry=lambda: self.registry, on_reject=self._on_reject, rejected=self.rejected)
        committer.open_pool()  # connects in the background; the first batch need not wait for it
        with self._lock:
            buffers.spool = spool
            buffers.held = held
            buffers.identity = identity
            buffers.seq = recovered
            buffers.stats["recovered"] = recovered
            if recovered:
                buffers.set_spool_mode(True)
            buffers.state = "running"
            loop = FlushLoop(buffers, committer, self.max_retry_delay)
            self._thread = threading.Thread(target=loop.run, name="kraken_hist-writer-flush", daemon=True)
            self._thread.start()
            self._fsync_thread = threading.Thread(target=fsync_loop, args=(buffers, self._fsync_stop),
                                                  name="kraken_hist-writer-spool-sync", daemon=True)
            self._fsync_thread.start()
        return self

    def _read_identity_at_start(self) -> DatabaseIdentity:
        """This writer's database identity, or a pending one (description only) while the
        server does not answer."""
        assert self.url is not None
        description = spool_labels.describe_url(self.url)
        try:
            with psycopg.connect(self.url, autocommit=True,
                                 connect_timeout=max(1, math.ceil(self.connect_timeout))) as conn:
                return spool_labels.read_identity(conn, description)
        except psycopg.OperationalError as exc:
            logger.warning("writer: cannot reach %s to read its identity (%s); spooled records wait for it",
                           description, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                           extra={"event": "writer_identity_pending"})
            return DatabaseIdentity(description)

    @property
    def registry(self) -> PairRegistry:
        """The pairs this writer stores: the registry given, or (once started) its database's."""
        if self._registry is None:
            url = getattr(self, "url", None)
            if url is None:
                return PairRegistry()  # not started: the built-in pairs
            self._registry = database_registry(url)
        return self._registry

    def _resolve_url(self, settings: Settings) -> str:
        from kraken_hist.storage import migrate

        if self._db_url is None and settings.database_url is None:
            return migrate.prepare_database(None, settings)  # embedded: started and migrated
        url = libpq_url(self._db_url or settings.database_url or "")
        try:
            migrate.ensure_schema(url)
        except DatabaseUnavailableError as exc:
            logger.warning("writer: %s; records will be spooled until it answers", exc,
                           extra={"event": "writer_db_unavailable"})
        return url

    def stop(self, timeout: float | None = 60.0) -> bool:
        """Flush everything accepted, stop the threads, close the pool. Idempotent.

        Returns True when everything reached the database. It waits up to `timeout` seconds
        for a database that answers; one that does not (an attempt made while stopping fails,
        or no connection comes within about a second) is not waited for. Either way what is
        left is spooled locally (replayed on the next start of a writer of this database) and
        it returns False: with the database down it returns within a few seconds.
        """
        buffers = self._buffers
        with buffers.cond:
            if buffers.state in ("new", "stopped"):
                buffers.state = "stopped"
                return True
            if buffers.state == "running":
                buffers.state = "stopping"
                assert self._committer is not None
                self._committer.stop_requested = time.monotonic()
                # one more attempt at once (the database may be back), none after a failure
                buffers.backoff_until = 0.0
                buffers.outage = False
                buffers.cond.notify_all()
            thread = self._thread
        assert thread is not None
        thread.join(timeout)
        if thread.is_alive():
            with buffers.cond:
                buffers.abort = True
                buffers.cond.notify_all()
            thread.join(max(self.connect_timeout * 2, 10.0))
            if thread.is_alive():
                logger.error("writer: flush thread did not stop; spooled records are safe",
                             extra={"event": "writer_stop_stuck"})
        self._fsync_stop.set()
        if self._fsync_thread is not None:
            self._fsync_thread.join()
        with buffers.cond:
            clean = not (buffers.open.lines or buffers.candles or buffers.syncs or buffers.spool or buffers.held)
            if buffers.spool is not None:
                buffers.spool.close()
            for held in buffers.held:  # never reached the database: left as found, for the next start
                held.close()
            buffers.state = "stopped"
            buffers.cond.notify_all()
        if self._committer is not None:
            self._committer.drop_pool()
        return clean

    def __enter__(self) -> "DatabaseWriter":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ accepting
    def write_trade(self, record: TradeRecord) -> None:
        """Accept one trade (validated here; InvalidRecordError names the bad field)."""
        symbol, trade_id, minute, line = self._encode_trade(record)
        notional = None
        if self.build_candles:  # the minute's exact summary is kept as the batch grows
            when, price, volume = record.time, record.price, record.volume
            if "E+" in line:  # a positive exponent: PostgreSQL stores the value with scale 0
                price, volume = plain(price), plain(volume)
            notional = _multiply(price, volume)
        now = time.monotonic()
        buffers = self._buffers
        with self._lock:  # (Buffers.admit, inline: the hot path)
            if buffers.state != "running":
                buffers.refuse()
            buffers.seq += 1
            stats = buffers.stats
            stats["trades_accepted"] += 1
            batch = buffers.open
            seen = batch.symbols.get(symbol)
            if seen is None:
                seen = batch.symbols[symbol] = (set(), {})
            ids, minutes = seen
            if trade_id in ids:
                stats["trades_duplicate"] += 1  # the same trade is already waiting in this batch
                return
            ids.add(trade_id)
            if notional is None:
                minutes[minute] = None
            else:
                sums = minutes.get(minute)
                if sums is None:
                    minutes[minute] = MinuteSums.of_trade(when, trade_id, price, volume, notional)
                else:
                    sums.add(when, trade_id, price, volume, notional)
            lines = batch.lines
            lines.append(line)
            batch.accepted.append(now)
            count = len(lines)
            if count == 1:
                batch.first_seq = buffers.seq
                batch.started = now
                buffers.cond.notify()  # an idle flush thread learns its deadline
                return
            if count >= buffers.block_limit:
                buffers.hand_to_spool("trade buffer full")
                return
            if count != self.trade_buffer_size or buffers.spool_mode:
                return
            buffers.cond.notify()
        # Let the woken flush thread take the lock now: a tight producer loop would otherwise
        # re-acquire it first every time and starve the flush (no pipelining).
        time.sleep(0)

    def write_candle(self, record: CandleRecord) -> None:
        """Accept one 1-minute candle; a later one for the same bucket replaces it."""
        row = candle_row(record, self._check_symbol)
        now = time.monotonic()
        buffers = self._buffers
        with self._lock:
            buffers.candles.append((buffers.admit("candles_accepted"), now, row))
            if len(buffers.candles) == 1:
                buffers.cond.notify()
            elif len(buffers.candles) >= self.MAX_CANDLE_BUFFER_SIZE:
                buffers.hand_to_spool("candle buffer full")

    def update_sync_status(self, symbol: str, data_type: str, timestamp: datetime | None, **details: Any) -> None:
        """Record how far `data_type` ingestion of `symbol` has come, once every record
        accepted before this call is committed. ``cursor`` and ``last_trade_id`` go to their
        columns; other details are merged into the jsonb ``details``. ``last_time`` never
        moves backwards."""
        row = sync_row(self._check_symbol(self.registry.normalize(symbol)), data_type, timestamp, details)
        spool_format.encode_sync(row)  # refuses fields the spool could not hold
        buffers = self._buffers
        with buffers.cond:
            seq = buffers.admit("syncs_accepted")
            if buffers.spool_mode:  # after every record before it, in spool order
                buffers.seal_open()
                buffers.spool_syncs([(seq, time.monotonic(), row)])
            else:
                buffers.syncs.append((seq, time.monotonic(), row))
            buffers.cond.notify()

    # ------------------------------------------------------------ durability
    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything accepted so far is committed; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        buffers = self._buffers
        with buffers.cond:
            target = buffers.seq
            buffers.flush_target = max(buffers.flush_target, target)
            buffers.cond.notify_all()
            while buffers.watermark() < target:
                if buffers.state in ("stopped", "new"):
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                buffers.cond.wait(remaining if remaining is not None else 1.0)
            return True

    def get_stats(self) -> dict[str, Any]:
        """Counters since start. For each kind: accepted (+ recovered from a crashed run's spool)
        = written + duplicate/unchanged + rejected + pending (+ ``spool_foreign``: recovered
        records of a held spool that proved to be another database's, left on disk).
        ``spool_held``: records of held spools (part of ``spool_pending``)."""
        buffers = self._buffers
        with self._lock:
            stats: dict[str, Any] = dict(buffers.stats)
            stats["trade_buffer"] = len(buffers.open.lines)
            stats["candle_buffer"] = len(buffers.candles)
            stats["sync_buffer"] = len(buffers.syncs)
            stats["spool_held"] = sum(held.pending for held in buffers.held)
            stats["spool_pending"] = (buffers.spool.pending if buffers.spool is not None else 0) + stats["spool_held"]
            stats["spool_mode"] = buffers.spool_mode
            stats["in_flight"] = buffers.inflight_min is not None
            stats["state"] = buffers.state
            latencies = sorted(buffers.latencies)
        stats["written"] = stats["trades_written"] + stats["candles_written"]
        if latencies:
            stats["latency_p50_ms"] = round(latencies[len(latencies) // 2] * 1000, 1)
            stats["latency_p99_ms"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1)
            stats["latency_max_ms"] = round(latencies[-1] * 1000, 1)
        return stats
