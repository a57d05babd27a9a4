"""DatabaseWriter: buffered, thread-safe COPY ingestion that never loses or doubles a record.

``write_trade``/``write_candle`` validate and append to a buffer (a WebSocket reader thread
calls them, so they only take a lock). One named flush thread commits batches:

* trades: deduplicated in the batch, then, per symbol under ``store.lock_symbol(conn,
  TRADES_LOCK, symbol)``, the ids already stored in the batch's id range are read and
  skipped (Kraken ids are contiguous, so this is one index range scan), the rest is COPY-ed
  (binary) straight into ``trades``; only if someone else stored one of them meanwhile
  (a unique violation) does the batch take the staging merge. The 1-minute candles of the
  touched minutes are rebuilt from stored trades in the same transaction (build_candles).
* candles: the newest value per bucket wins, but an exchange candle never overwrites one
  built from trades; changed buckets go to ``candle_changes``.
* sync status: applied only once every record accepted before it is committed.

Failures: a connectivity (or any non-data) error spills the batch and the buffers to the
local spool (``spool.py``) in acceptance order and switches to spool mode (new records go
to the spool too) until a replay with back-off has drained it; records past the in-memory
caps go there as well. A data error is bisected down to the offending record, which is
rejected and reported; the rest is kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections import deque
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psycopg
import psycopg_pool
from psycopg import sql

from . import spool as spoolfmt
from . import store
from .config import Settings
from .db import libpq_url
from .errors import DatabaseUnavailableError, PermanentError
from .pairs import DEFAULT_REGISTRY
from .spool import Spool
from .types import CandleRecord, CandleSource, TradeRecord, TradeSource

logger = logging.getLogger(__name__)

UTC = timezone.utc
#: Purpose name for ``store.lock_symbol`` around trade inserts; every trade writer should take it.
TRADES_LOCK = "trades"

_TRADE_COLUMNS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")
_TRADE_TYPES = ("text", "int8", "timestamptz", "numeric", "numeric", "text", "text", "text")
_TRADE_SOURCES = {s: s.value for s in TradeSource} | {s.value: s.value for s in TradeSource}
_CANDLE_SOURCES = {s: s.value for s in CandleSource} | {s.value: s.value for s in CandleSource}
_BIGINT = 2**63
_MERGE_GAP_MINUTES = 15  # touched minutes closer than this are rebuilt as one window
_REPLAY_CHUNK = 10_000
_FSYNC_EVERY = 1.0  # seconds: spool tail fsync policy

_COPY_TRADES = sql.SQL("COPY trades ({}) FROM STDIN (FORMAT BINARY)").format(
    sql.SQL(", ").join(map(sql.Identifier, _TRADE_COLUMNS))
)

_MERGE_TRADES = """
INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
SELECT s.symbol, s.trade_id, s.time, s.price, s.volume, s.side, s.ord_type, s.source
FROM writer_trades_stage s
WHERE NOT EXISTS (SELECT 1 FROM trades t WHERE t.symbol = s.symbol AND t.trade_id = s.trade_id)
ON CONFLICT DO NOTHING
RETURNING symbol, time
"""

_UPSERT_CANDLES = """
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT s.*, now()
FROM unnest(%s::text[], %s::timestamptz[], %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[],
            %s::numeric[], %s::numeric[], %s::integer[], %s::text[])
     AS s(symbol, time, open, high, low, close, vwap, volume, trades, source)
ON CONFLICT (symbol, time) DO UPDATE
SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
    source = EXCLUDED.source, updated_at = now()
WHERE (c.source <> 'trades' OR EXCLUDED.source = 'trades')
  AND (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
       EXCLUDED.volume, EXCLUDED.trades, EXCLUDED.source)
RETURNING symbol, time
"""

# last_time never moves backwards; cursor/last_trade_id are kept unless given; details merge.
_UPSERT_SYNC = """
INSERT INTO sync_status AS s (symbol, data_type, last_time, cursor, last_trade_id, details, updated_at)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, now())
ON CONFLICT (symbol, data_type) DO UPDATE
SET last_time = GREATEST(s.last_time, EXCLUDED.last_time),
    cursor = COALESCE(EXCLUDED.cursor, s.cursor),
    last_trade_id = COALESCE(EXCLUDED.last_trade_id, s.last_trade_id),
    details = s.details || EXCLUDED.details, updated_at = now()
"""


class InvalidRecordError(PermanentError, ValueError):
    """A record that cannot be right, refused at ``write_*``; the message names the field."""


class _Unavailable(Exception):
    """The batch could not be committed for a reason other than its data: retry later."""


class _BadData(Exception):
    """The database refused the batch's data: bisect to find the record."""


# ---------------------------------------------------------------- validation (cheap re-checks)

def _bad(field: str, message: str) -> InvalidRecordError:
    return InvalidRecordError(f"{field} {message}")


def _utc(value: object, field: str) -> datetime:
    if not isinstance(value, datetime):
        raise _bad(field, f"must be a datetime, got {type(value).__name__}")
    tz = value.tzinfo
    if tz is UTC:
        return value
    if tz is None or tz.utcoffset(value) is None:
        raise _bad(field, f"must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


_ZERO = Decimal(0)


def _number(value: object, field: str, *, positive: bool) -> Decimal:
    if value.__class__ is not Decimal and not isinstance(value, Decimal):
        raise _bad(field, f"must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():  # type: ignore[attr-defined]
        raise _bad(field, f"must be finite, got {value}")
    if positive and value <= _ZERO:  # type: ignore[operator]
        raise _bad(field, f"must be positive, got {value}")
    if value < _ZERO:  # type: ignore[operator]
        raise _bad(field, f"must not be negative, got {value}")
    return value  # type: ignore[return-value]


class _SymbolCheck:
    """Canonical symbols already checked (the registry can grow at run time)."""

    def __init__(self) -> None:
        self._known: set[str] = set()

    def __call__(self, value: object) -> str:
        if value in self._known:
            return value  # type: ignore[return-value]
        if not isinstance(value, str):
            raise _bad("symbol", f"must be a str, got {type(value).__name__}")
        try:
            canonical = DEFAULT_REGISTRY.normalize(value)
        except ValueError as exc:
            raise InvalidRecordError(f"symbol: {exc}") from None
        if canonical != value:
            raise _bad("symbol", f"must be canonical ({canonical!r}), got {value!r}")
        if any(ch in value for ch in "\t\n\r\\"):
            raise _bad("symbol", f"must not contain tabs, newlines or backslashes: {value!r}")
        self._known.add(value)
        return value


def _trade_row(record: object, symbol_check: _SymbolCheck) -> tuple:
    if not isinstance(record, TradeRecord):
        raise InvalidRecordError(f"record must be a TradeRecord, got {type(record).__name__}")
    trade_id = record.trade_id
    if type(trade_id) is not int or not -_BIGINT <= trade_id < _BIGINT:
        raise _bad("trade_id", f"must be an int within bigint range, got {trade_id!r}")
    side, ord_type = record.side, record.ord_type
    if side not in (None, "b", "s"):
        raise _bad("side", f"must be 'b', 's' or None, got {side!r}")
    if ord_type not in (None, "m", "l"):
        raise _bad("ord_type", f"must be 'm', 'l' or None, got {ord_type!r}")
    source = record.source
    source = source._value_ if source.__class__ is TradeSource else _TRADE_SOURCES.get(source)  # type: ignore[call-overload]
    if source is None:
        raise _bad("source", f"must be one of {sorted(_TRADE_SOURCES)}, got {record.source!r}")
    return (
        symbol_check(record.symbol),
        trade_id,
        _utc(record.time, "time"),
        _number(record.price, "price", positive=True),
        _number(record.volume, "volume", positive=False),
        side,
        ord_type,
        source,
    )


def _candle_row(record: object, symbol_check: _SymbolCheck) -> tuple:
    if not isinstance(record, CandleRecord):
        raise InvalidRecordError(f"record must be a CandleRecord, got {type(record).__name__}")
    when = _utc(record.time, "time")
    if when.second or when.microsecond:
        raise _bad("time", f"must be the start of a minute, got {when.isoformat()}")
    open_ = _number(record.open, "open", positive=True)
    high = _number(record.high, "high", positive=True)
    low = _number(record.low, "low", positive=True)
    close = _number(record.close, "close", positive=True)
    if low > high:
        raise _bad("low", f"({low}) must not exceed high ({high})")
    if not low <= open_ <= high:
        raise _bad("open", f"({open_}) must lie between low ({low}) and high ({high})")
    if not low <= close <= high:
        raise _bad("close", f"({close}) must lie between low ({low}) and high ({high})")
    vwap = record.vwap
    if vwap is not None:
        vwap = _number(vwap, "vwap", positive=False)
    trades = record.trades
    if type(trades) is not int or not 0 <= trades < 2**31:
        raise _bad("trades", f"must be a non-negative int, got {trades!r}")
    source = _CANDLE_SOURCES.get(record.source)  # type: ignore[call-overload]
    if source is None:
        raise _bad("source", f"must be one of {sorted(_CANDLE_SOURCES)}, got {record.source!r}")
    return (
        symbol_check(record.symbol), when, open_, high, low, close, vwap,
        _number(record.volume, "volume", positive=False), trades, source,
    )


# ---------------------------------------------------------------- error classification

def _classify(exc: BaseException) -> Exception:
    """Driver error → _BadData (bisect) or _Unavailable (spill and retry)."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return _BadData(str(exc).strip())
    return _Unavailable(f"{type(exc).__name__}: {str(exc).strip()}")


def _minute_runs(times: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    """Touched minutes → a few [start, end) windows (minutes closer than the merge gap joined)."""
    minutes = sorted({int(t.timestamp()) // 60 for t in times})
    runs: list[tuple[datetime, datetime]] = []
    if not minutes:
        return runs
    start = prev = minutes[0]
    for minute in minutes[1:]:
        if minute - prev > _MERGE_GAP_MINUTES:
            runs.append((start, prev + 1))
            start = minute
        prev = minute
    runs.append((start, prev + 1))
    return [(datetime.fromtimestamp(a * 60, UTC), datetime.fromtimestamp(b * 60, UTC)) for a, b in runs]


def backoff_delay(attempt: int, *, base: float = 0.2, cap: float = 5.0) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): exponential, capped, half jitter."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30))
    return ceiling / 2 + random.random() * ceiling / 2


# ---------------------------------------------------------------- the writer

class DatabaseWriter:
    """Buffered, thread-safe writer of trades, 1-minute candles and sync status.

    ``write_*`` never block on the database. Records are durable (committed) once
    :meth:`flush` returns True, or after :meth:`stop`; while the database is away they are
    kept in the local spool (``<data_dir>/spool``) and replayed, in order, when it answers
    again or on the next start after a crash.
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

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._check_symbol = _SymbolCheck()
        self._state = "new"  # new → running → stopping → stopped
        self._abort = False
        self._seq = 0
        self._trades: list[tuple] = []  # (seq, accepted_at, row)
        self._candles: list[tuple] = []
        self._syncs: list[tuple] = []
        self._inflight_min: int | None = None
        self._flush_target = 0
        self._spool: Spool | None = None
        self._spool_mode = False
        self._backoff_until = 0.0
        self._last_fsync = 0.0
        self._thread: threading.Thread | None = None
        self._pool: psycopg_pool.ConnectionPool | None = None
        self.url: str | None = None
        self._latencies: deque[float] = deque(maxlen=100_000)
        self.rejected: deque[tuple[str, tuple, str]] = deque(maxlen=1000)
        self._stats = dict.fromkeys(
            (
                "trades_accepted", "candles_accepted", "syncs_accepted", "recovered",
                "trades_written", "trades_duplicate", "trades_rejected",
                "candles_written", "candles_unchanged", "candles_rejected",
                "syncs_written", "syncs_rejected",
                "flushes", "errors", "retries", "spooled", "replayed", "spool_corrupt",
                "merge_fallbacks", "candles_rebuilt",
            ),
            0,
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "DatabaseWriter":
        """Resolve the database, open the pool and the spool, recover a crashed run's spool,
        and start the flush thread. A database that is down does not stop the start."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"writer cannot start: it is {self._state}")
        settings = self._settings if self._settings is not None else Settings.from_env()
        self.url = self._resolve_url(settings)
        root = (self._data_dir if self._data_dir is not None else Path(settings.data_dir)) / "spool"
        spool = Spool.open_free_slot(root)
        recovered = spool.recover(next_seq=1)
        self._stats["spool_corrupt"] = spool.corrupt
        if recovered:
            logger.warning("writer: replaying %d spooled records from %s", recovered, spool.directory,
                           extra={"event": "writer_spool_recover"})
        with self._lock:
            self._spool = spool
            self._seq = recovered
            self._stats["recovered"] = recovered
            self._spool_mode = recovered > 0
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="kraken_hist-writer-flush", daemon=True)
            self._thread.start()
        return self

    def _resolve_url(self, settings: Settings) -> str:
        from . import migrate

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
        """Flush everything accepted, stop the thread, close the pool. Idempotent.

        Returns True when everything reached the database; if it could not within `timeout`
        seconds, what is left is spooled locally (replayed on the next start) and it
        returns False.
        """
        with self._cond:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return True
            if self._state == "running":
                self._state = "stopping"
                self._cond.notify_all()
            thread = self._thread
        assert thread is not None
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            thread.join(max(self.connect_timeout * 2, 10.0))
            if thread.is_alive():
                logger.error("writer: flush thread did not stop; spooled records are safe",
                             extra={"event": "writer_stop_stuck"})
        with self._cond:
            clean = not (self._trades or self._candles or self._syncs or self._spool)
            if self._spool is not None:
                self._spool.close()
            self._state = "stopped"
            self._cond.notify_all()
        self._drop_pool()
        return clean

    def __enter__(self) -> "DatabaseWriter":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ accepting
    def write_trade(self, record: TradeRecord) -> None:
        """Accept one trade (validated here; InvalidRecordError names the bad field)."""
        self._accept("trades", spoolfmt.encode_trade, _trade_row(record, self._check_symbol))

    def write_candle(self, record: CandleRecord) -> None:
        """Accept one 1-minute candle; a later one for the same bucket replaces it."""
        self._accept("candles", spoolfmt.encode_candle, _candle_row(record, self._check_symbol))

    def update_sync_status(self, symbol: str, data_type: str, timestamp: datetime | None, **details: Any) -> None:
        """Record how far `data_type` ingestion of `symbol` has come, once every record
        accepted before this call is committed. ``cursor`` and ``last_trade_id`` go to their
        columns; other details are merged into the jsonb ``details``. ``last_time`` never
        moves backwards."""
        symbol = self._check_symbol(DEFAULT_REGISTRY.normalize(symbol))
        if not isinstance(data_type, str) or not data_type or any(c in data_type for c in "\t\n"):
            raise InvalidRecordError(f"data_type must be a non-empty name, got {data_type!r}")
        when = None if timestamp is None else _utc(timestamp, "timestamp")
        cursor = details.pop("cursor", None)
        last_trade_id = details.pop("last_trade_id", None)
        if last_trade_id is not None and (type(last_trade_id) is not int or not -_BIGINT <= last_trade_id < _BIGINT):
            raise InvalidRecordError(f"last_trade_id must be an int, got {last_trade_id!r}")
        try:
            details_json = json.dumps(details, default=str, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"details must be JSON-serialisable: {exc}") from None
        row = (symbol, data_type, when, None if cursor is None else str(cursor), last_trade_id, details_json)
        spoolfmt.encode_sync(row)  # refuses fields the spool could not hold
        self._accept("syncs", spoolfmt.encode_sync, row)

    def _accept(self, kind: str, encode: Callable[[tuple], str], row: tuple) -> None:
        if self._accept_locked(kind, encode, row):
            # Let the woken flush thread take the lock now: a tight producer loop would
            # otherwise re-acquire it first every time and starve the flush (no pipelining).
            time.sleep(0)

    def _accept_locked(self, kind: str, encode: Callable[[tuple], str], row: tuple) -> bool:
        """Buffer or spool one validated row; True when the flush thread was woken."""
        now = time.monotonic()
        with self._cond:
            if self._state != "running":
                raise RuntimeError(f"writer is {self._state}: call start() first" if self._state == "new"
                                   else f"writer is {self._state}")
            self._seq += 1
            self._stats[kind + "_accepted"] += 1
            if self._spool_mode:
                self._spool_locked([encode(row)], self._seq)
                return False
            buffer: list[tuple] = getattr(self, "_" + kind)
            buffer.append((self._seq, now, row))
            wake = kind == "syncs"
            if kind == "trades":
                if len(buffer) >= self.MAX_TRADE_BUFFER_SIZE:
                    self._enter_spool_mode_locked("trade buffer full")
                wake = len(buffer) == self.trade_buffer_size or self._spool_mode
            elif kind == "candles" and len(buffer) >= self.MAX_CANDLE_BUFFER_SIZE:
                self._enter_spool_mode_locked("candle buffer full")
                wake = True
            if wake:
                self._cond.notify_all()
            return wake

    def _spool_locked(self, bodies: list[str], first_seq: int) -> None:
        assert self._spool is not None
        self._stats["spooled"] += self._spool.append(bodies, first_seq)

    def _enter_spool_mode_locked(self, reason: str) -> None:
        if not self._spool_mode:
            logger.warning("writer: %s; spooling new records to %s", reason,
                           self._spool.directory if self._spool is not None else "?", extra={"event": "writer_spooling"})
            self._spool_mode = True

    # ------------------------------------------------------------ durability
    def _watermark_locked(self) -> int:
        """Highest seq such that every record up to it is committed (or rejected)."""
        low = self._seq + 1
        for buffer in (self._trades, self._candles, self._syncs):
            if buffer:
                low = min(low, buffer[0][0])
        if self._inflight_min is not None:
            low = min(low, self._inflight_min)
        if self._spool is not None:
            for segment in self._spool.segments:
                if segment.records > segment.done:
                    low = min(low, segment.first_seq)
        return low - 1

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything accepted so far is committed; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._seq
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            while self._watermark_locked() < target:
                if self._state == "stopped" or (self._state == "new"):
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
            return True

    def get_stats(self) -> dict[str, Any]:
        """Counters since start. For each kind: accepted (+ recovered from a crashed run's spool)
        = written + duplicate/unchanged + rejected + pending."""
        with self._lock:
            stats: dict[str, Any] = dict(self._stats)
            stats["trade_buffer"] = len(self._trades)
            stats["candle_buffer"] = len(self._candles)
            stats["sync_buffer"] = len(self._syncs)
            stats["spool_pending"] = self._spool.pending if self._spool is not None else 0
            stats["spool_mode"] = self._spool_mode
            stats["in_flight"] = self._inflight_min is not None
            stats["state"] = self._state
            latencies = sorted(self._latencies)
        stats["written"] = stats["trades_written"] + stats["candles_written"]
        if latencies:
            stats["latency_p50_ms"] = round(latencies[len(latencies) // 2] * 1000, 1)
            stats["latency_p99_ms"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1)
            stats["latency_max_ms"] = round(latencies[-1] * 1000, 1)
        return stats

    # ------------------------------------------------------------ the flush thread
    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                work = self._next_work_locked()
            if work is None:
                return
            kind, payload = work
            try:
                if kind == "fsync":
                    _fsync_close(payload)
                elif kind == "memory":
                    self._commit_memory(*payload)
                elif kind == "syncs":
                    self._commit_rows("syncs", payload)
                    with self._cond:
                        self._inflight_min = None
                        self._cond.notify_all()
                else:
                    self._replay(payload)
                attempt = 0
            except _Unavailable as exc:
                attempt += 1
                delay = backoff_delay(attempt, cap=self.max_retry_delay)
                logger.warning("writer: database unavailable (%s); retrying in %.1fs", exc, delay,
                               extra={"event": "writer_retry"})
                with self._cond:
                    self._stats["errors"] += 1
                    self._stats["retries"] += 1
                    self._spill_inflight_locked(kind, payload)
                    self._backoff_until = time.monotonic() + delay
            except Exception:  # noqa: BLE001 - the thread must survive; records stay where they are
                logger.exception("writer: unexpected error in the flush thread", extra={"event": "writer_bug"})
                with self._cond:
                    self._stats["errors"] += 1
                    self._spill_inflight_locked(kind, payload)
                    self._backoff_until = time.monotonic() + self.max_retry_delay

    def _next_work_locked(self) -> tuple[str, Any] | None:
        while True:
            now = time.monotonic()
            spool = self._spool
            assert spool is not None
            if self._abort:
                self._spill_locked([], [], [])
                spool.close_tail()
                return None
            if spool.dirty and now - self._last_fsync >= _FSYNC_EVERY:
                self._last_fsync = now
                fd = spool.take_sync_fd()
                if fd is not None:
                    return "fsync", fd
            if now < self._backoff_until:
                self._cond.wait(self._backoff_until - now)
                continue
            urgent = self._state == "stopping" or self._flush_target > self._watermark_locked() or self._spool_mode
            take_trades = bool(self._trades) and (
                urgent or len(self._trades) >= self.trade_buffer_size
                or now - self._trades[0][1] >= self.trade_flush_interval
            )
            take_candles = bool(self._candles) and (
                urgent or now - self._candles[0][1] >= self.candle_flush_interval
            )
            if take_trades or take_candles:
                trades: list[tuple] = []
                candles: list[tuple] = []
                if take_trades:
                    trades, self._trades = self._trades, []
                if take_candles:
                    candles, self._candles = self._candles, []
                self._inflight_min = min(batch[0][0] for batch in (trades, candles) if batch)
                eligible = self._eligible_syncs_locked()
                return "memory", (trades, candles, eligible)
            eligible = self._eligible_syncs_locked()
            if eligible:
                self._inflight_min = eligible[0][0]
                return "syncs", eligible
            if self._spool_mode and not self._trades and not self._candles:
                sealed = spool.sealed()
                if sealed:
                    return "spool", sealed
                if spool.segments:  # only the tail: seal it so it can be replayed
                    spool.close_tail()
                    continue
                self._spool_mode = False
                logger.info("writer: spool drained; back to buffering in memory", extra={"event": "writer_spool_drained"})
                self._cond.notify_all()
                continue
            if self._state == "stopping" and not (self._trades or self._candles or self._syncs or spool.segments):
                spool.close_tail()
                return None
            deadlines = []
            if self._trades:
                deadlines.append(self._trades[0][1] + self.trade_flush_interval)
            if self._candles:
                deadlines.append(self._candles[0][1] + self.candle_flush_interval)
            if spool.dirty:
                deadlines.append(self._last_fsync + _FSYNC_EVERY)
            self._cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def _eligible_syncs_locked(self) -> list[tuple]:
        """Queued sync updates whose predecessors are all committed (or in the batch being taken)."""
        if not self._syncs:
            return []
        low = self._seq + 1
        for buffer in (self._trades, self._candles):
            if buffer:
                low = min(low, buffer[0][0])
        if self._spool is not None:
            for segment in self._spool.segments:
                if segment.records > segment.done:
                    low = min(low, segment.first_seq)
        count = 0
        while count < len(self._syncs) and self._syncs[count][0] < low:
            count += 1
        eligible = self._syncs[:count]
        del self._syncs[:count]
        return eligible

    def _spill_inflight_locked(self, kind: str, payload: Any) -> None:
        if kind == "memory":
            self._spill_locked(*payload)
        elif kind == "syncs":
            self._spill_locked([], [], payload)

    def _spill_locked(self, trades: list[tuple], candles: list[tuple], syncs: list[tuple]) -> None:
        """Move the uncommitted in-flight entries and everything buffered to the front of the
        spool, in acceptance order, and spool new records until the database answers again."""
        entries: list[tuple[int, str]] = []
        for encode, items in (
            (spoolfmt.encode_trade, trades + self._trades),
            (spoolfmt.encode_candle, candles + self._candles),
            (spoolfmt.encode_sync, syncs + self._syncs),
        ):
            entries.extend((e[0], encode(e[2])) for e in items)
        self._trades, self._candles, self._syncs = [], [], []
        self._inflight_min = None
        if entries:
            entries.sort(key=lambda pair: pair[0])
            assert self._spool is not None
            self._stats["spooled"] += self._spool.prepend([body for _, body in entries], entries[0][0])
        self._enter_spool_mode_locked("database unavailable")
        self._cond.notify_all()

    def _commit_memory(self, trades: list[tuple], candles: list[tuple], syncs: list[tuple]) -> None:
        """Commit a batch taken from the buffers; the lists are consumed as they commit, so a
        failure leaves exactly the uncommitted entries in them (to spill)."""
        accepted = [e[1] for e in trades] + [e[1] for e in candles]
        self._commit_rows("trades", trades)
        self._commit_rows("candles", candles)
        self._commit_rows("syncs", syncs)
        done = time.monotonic()
        with self._cond:
            self._latencies.extend(done - t for t in accepted)
            self._inflight_min = None
            self._cond.notify_all()

    def _replay(self, segments: list[spoolfmt.Segment]) -> None:
        assert self._spool is not None
        for segment in segments:
            for chunk in self._spool.read(segment, _REPLAY_CHUNK):
                rows: dict[str, list[tuple]] = {spoolfmt.TRADE: [], spoolfmt.CANDLE: [], spoolfmt.SYNC: []}
                for kind, row in chunk:
                    rows[kind].append((0, 0.0, row))
                self._commit_rows("trades", rows[spoolfmt.TRADE])
                self._commit_rows("candles", rows[spoolfmt.CANDLE])
                self._commit_rows("syncs", rows[spoolfmt.SYNC])
                with self._cond:
                    segment.done += len(chunk)
                    self._stats["replayed"] += len(chunk)
            with self._cond:
                self._spool.remove(segment)
                self._cond.notify_all()

    # ------------------------------------------------------------ committing (bisect on bad data)
    def _commit_rows(self, kind: str, entries: list[tuple]) -> None:
        """Commit `entries` ((seq, accepted_at, row) tuples), consuming the list from the front."""
        if entries:
            self._commit_prefix(kind, entries, len(entries))

    def _commit_prefix(self, kind: str, entries: list[tuple], count: int) -> None:
        """Commit the first `count` entries and delete them from `entries`; a batch the database
        refuses for its data is bisected until the bad record is found and rejected."""
        try:
            counts = self._transaction(kind, [e[2] for e in entries[:count]])
        except _BadData as exc:
            if count == 1:
                self._reject(kind, entries[0][2], str(exc))
                del entries[0]
                return
            half = count // 2
            self._commit_prefix(kind, entries, half)
            self._commit_prefix(kind, entries, count - half)
            return
        del entries[:count]
        with self._lock:
            self._stats["flushes"] += 1
            for name, value in counts.items():
                self._stats[name] += value

    def _reject(self, kind: str, row: tuple, reason: str) -> None:
        logger.error("writer: %s record refused by the database and dropped: %s (%r)", kind, reason, row,
                     extra={"event": "writer_reject"})
        with self._lock:
            self._stats[kind + "_rejected"] += 1
            self.rejected.append((kind, row, reason))
        if self._on_reject is not None:
            self._on_reject(kind, row, reason)

    def _open_pool(self) -> psycopg_pool.ConnectionPool:
        """The pool, opened on first use and after an outage (a fresh pool connects at once,
        where a pool that lost its server reconnects on its own, slowing, back-off)."""
        if self._pool is None:
            assert self.url is not None
            self._pool = psycopg_pool.ConnectionPool(
                self.url,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, math.ceil(self.connect_timeout))},
                check=psycopg_pool.ConnectionPool.check_connection,
                name="kraken_hist-writer",
                timeout=self.connect_timeout,
            )
            self._pool.open(wait=False)
        return self._pool

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=1.0)

    def _transaction(self, kind: str, rows: Sequence[tuple]) -> dict[str, int]:
        try:
            return self._transaction_once(kind, rows)
        except _Unavailable:
            self._drop_pool()
            raise

    def _transaction_once(self, kind: str, rows: Sequence[tuple]) -> dict[str, int]:
        pool = self._open_pool()
        try:
            with pool.connection() as conn:
                with conn.transaction():
                    if kind == "trades":
                        return self._store_trades(conn, rows)
                    if kind == "candles":
                        return self._store_candles(conn, rows)
                    for row in rows:
                        conn.execute(_UPSERT_SYNC, row)
                    return {"syncs_written": len(rows)}
        except psycopg_pool.PoolTimeout as exc:
            raise _Unavailable(f"no database connection within {self.connect_timeout}s") from exc
        except psycopg.Error as exc:
            raise _classify(exc) from exc

    def _store_trades(self, conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, int]:
        unique: dict[tuple[str, int], tuple] = {}
        for row in rows:
            unique.setdefault((row[0], row[1]), row)
        by_symbol: dict[str, list[int]] = {}
        for symbol, trade_id in unique:
            by_symbol.setdefault(symbol, []).append(trade_id)
        for symbol in sorted(by_symbol):
            store.lock_symbol(conn, TRADES_LOCK, symbol)
            ids = by_symbol[symbol]
            low, high = min(ids), max(ids)
            if high - low < 4 * len(ids) + 1000:  # contiguous ids: one index range scan
                stored = conn.execute(
                    "SELECT trade_id FROM trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s",
                    (symbol, low, high),
                ).fetchall()
            else:
                stored = conn.execute(
                    "SELECT trade_id FROM trades WHERE symbol = %s AND trade_id = ANY(%s)", (symbol, ids)
                ).fetchall()
            for (trade_id,) in stored:
                unique.pop((symbol, trade_id), None)
        fresh = list(unique.values())
        inserted: list[tuple[str, datetime]]
        fallback = 0
        if fresh:
            try:
                with conn.transaction(), conn.cursor().copy(_COPY_TRADES) as copy:
                    copy.set_types(_TRADE_TYPES)
                    for row in fresh:
                        copy.write_row(row)
                inserted = [(row[0], row[2]) for row in fresh]
            except psycopg.errors.UniqueViolation:
                fallback = 1  # stored meanwhile by a writer that does not take TRADES_LOCK
                inserted = self._merge_trades(conn, fresh)
        else:
            inserted = []
        rebuilt = 0
        if self.build_candles and inserted:
            times: dict[str, list[datetime]] = {}
            for symbol, when in inserted:
                times.setdefault(symbol, []).append(when)
            for symbol, symbol_times in times.items():
                for start, end in _minute_runs(symbol_times):
                    rebuilt += store.rebuild_candles(conn, symbol, start, end)
        return {
            "trades_written": len(inserted),
            "trades_duplicate": len(rows) - len(inserted),
            "merge_fallbacks": fallback,
            "candles_rebuilt": rebuilt,
        }

    @staticmethod
    def _merge_trades(conn: psycopg.Connection, rows: list[tuple]) -> list[tuple[str, datetime]]:
        """The staging path: COPY into a temporary table, insert what is not stored yet."""
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS writer_trades_stage (LIKE trades) ON COMMIT DELETE ROWS")
        with conn.cursor().copy(
            sql.SQL("COPY writer_trades_stage ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.SQL(", ").join(map(sql.Identifier, _TRADE_COLUMNS))
            )
        ) as copy:
            copy.set_types(_TRADE_TYPES)
            for row in rows:
                copy.write_row(row)
        return [(r[0], r[1]) for r in conn.execute(_MERGE_TRADES).fetchall()]

    def _store_candles(self, conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, int]:
        latest: dict[tuple[str, datetime], tuple] = {}
        for row in rows:
            latest.pop((row[0], row[1]), None)
            latest[(row[0], row[1])] = row  # the newest value wins, in arrival order
        columns = list(zip(*latest.values()))
        changed = conn.execute(_UPSERT_CANDLES, [list(column) for column in columns]).fetchall()
        by_symbol: dict[str, list[datetime]] = {}
        for symbol, when in changed:
            by_symbol.setdefault(symbol, []).append(when)
        for symbol, times in by_symbol.items():
            for start, end in _minute_runs(times):
                store.record_candle_change(conn, symbol, start, end)
        return {"candles_written": len(changed), "candles_unchanged": len(rows) - len(changed)}


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
