"""DatabaseWriter: buffered, thread-safe COPY ingestion that never loses or doubles a record.

``write_trade`` validates a trade and encodes it, once, into its PostgreSQL COPY text line;
under the lock it only appends the line to the open batch (deduplicating by trade id within
the batch and noting the touched minute). That one bytes form is what the flush thread COPYs,
what the spool stores and what a replay COPYs again: no per-row work after acceptance.

One named flush thread commits batches:

* trades, per batch and symbol under the symbol's data lock (``ownership.lock_symbol``): one
  index probe asks whether any id of the batch's [lowest, highest] range is stored (Kraken ids
  are contiguous) and one whether the archive owns any second of its minutes; if neither, the
  payload is COPY-ed straight into ``trades``; otherwise (or on a unique violation) it takes
  the staging merge (COPY into a temporary table, insert what is not stored and whose second
  the archive does not own: one owner per second).
* 1-minute candles of the touched minutes (build_candles), in the same transaction. On the
  fast path they are maintained incrementally: ``write_trade`` keeps an exact per-minute
  summary of the batch (count, Σvolume, Σprice·volume, high, low, first and last trade by
  (time, id)) and the flush thread keeps, for the last few minutes, the summary of what is
  stored; the new candle is their merge (vwap computed by the same SQL expression as
  ``store.rebuild_candles``, from the exact sums). The cached summary is used only when the
  database proves it current (see ``_CandleSums``); otherwise, and on the merge path, the
  minutes are rebuilt from all stored trades (``store.rebuild_candles``).
* candles: the newest value per bucket wins, but an exchange candle never overwrites one
  built from trades; changed buckets go to ``candle_changes``.
* sync status: applied only once every record accepted before it is committed.

Memory is bounded: past MAX_TRADE_BUFFER_SIZE trades (or MAX_CANDLE_BUFFER_SIZE candles)
waiting for the database, batches go to the local spool (``spool.py``) as blocks, one write
per batch, and the writer stays in spool mode (new batches are spooled too, keeping their
order) until the flush thread has replayed the spool; then it buffers in memory again. A
connectivity (or any non-data) error spills the batch in flight in front of the spool and
retries with back-off. A data error is bisected down to the offending record, which is
rejected and reported; the rest is kept.

A spool belongs to one database (``spool.claim``): its slot is labelled with the server's
``system_identifier`` and the database oid (and ``host:port/dbname`` for messages; never a
password). ``start`` refuses (SpoolOwnerError, one line naming both databases and what to do)
when an unowned slot holds another database's records, or records of a version that did not
label its spools (unless ``adopt_unlabelled_spool``: the caller vouches they belong here).
When the database is down at start, a labelled spool found there is *held*: its records are
numbered first, nothing of this writer is committed before them, and the flush thread's first
step, once the database answers, reads its identity: the held spool is then moved in front of
this writer's spool and replayed, or, if it belongs to another database, left where it is
(reported, counted in ``spool_foreign``) while this writer goes on with its own records.

Stopping never waits for a database that does not answer: once an attempt made while
stopping fails (or a wait for a connection lasts past a short grace), everything still in
memory is spooled and the flush thread ends, so ``stop()`` returns within a few seconds; the
next writer of the same database replays the spool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from datetime import datetime, timezone
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.copy import LibpqWriter

from kraken_hist.storage.writer import spool as spoolfmt
from kraken_hist.storage import ownership
from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import store
from kraken_hist.core.config import Settings, settings_or_env
from kraken_hist.storage.db import libpq_url, number_array, session_options, text_array
from kraken_hist.core.errors import DatabaseUnavailableError, PermanentError
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.storage.writer.spool import Block, DatabaseIdentity, Spool, read_blocks
from kraken_hist.storage.writer.spool import SpoolOwnerError as SpoolOwnerError  # raised by DatabaseWriter.start
from kraken_hist.core.types import CandleRecord, CandleSource, TradeRecord, TradeSource
from kraken_hist.rules.backoff import Backoff

logger = logging.getLogger(__name__)

UTC = timezone.utc

_TRADE_COLUMNS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")
_TRADE_SOURCES = {s: s.value for s in TradeSource} | {s.value: s.value for s in TradeSource}
_CANDLE_SOURCES = {s: s.value for s in CandleSource} | {s.value: s.value for s in CandleSource}
_BIGINT = 2**63
_MERGE_GAP_MINUTES = 15  # touched minutes closer than this are rebuilt as one window
_SPOOL_BLOCK = 5_000  # trades per spooled block in spool mode (at least trade_buffer_size)
_REPLAY_ROWS = 100_000  # records of consecutive spooled blocks committed in one transaction
#: bytes handed to libpq before waiting for the socket during a COPY: each wait gives the GIL
#: away, and getting it back from a busy producer thread takes up to the switch interval
_COPY_FLUSH_BYTES = 64 * 1024 * 1024
_FSYNC_EVERY = 1.0  # seconds: spool tail fsync policy
#: while stopping, a wait for a database connection longer than this means the database is away
_STOP_CONNECT_GRACE = 1.0
_CONNECT_SLICE = 0.1  # seconds: a connection wait is cut into slices, to notice a stop
_CACHE_MINUTES = 5  # stored-candle summaries are kept for minutes this close to the newest seen
_SPOOLED_SUMS_LIMIT = 200_000  # minute summaries kept in memory for spooled blocks (beyond: rebuild)
#: add and multiply never round here (unbounded precision in practice): candle sums are exact
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
_ONE = Decimal(1)
_NULL = "\\N"  # COPY text NULL

_COLUMN_LIST = sql.SQL(", ").join(map(sql.Identifier, _TRADE_COLUMNS))
_COPY_TRADES = sql.SQL("COPY trades ({}) FROM STDIN").format(_COLUMN_LIST)
_COPY_STAGE = sql.SQL("COPY writer_trades_stage ({}) FROM STDIN").format(_COLUMN_LIST)
# Any stored trade of these ids near the batch's minutes (store.identity_window: the time bound
# is what lets TimescaleDB read one or two chunks instead of all of them).
# The statements below serve every symbol of a batch at once. Each probes the index once per
# symbol (LATERAL … LIMIT 1: never a hash join over the whole table, whatever the planner
# thinks of the array) and carries the batch's whole time span as constants (%(lo)s, %(hi)s), so
# TimescaleDB excludes every other chunk when it plans.

# Per symbol its id range and first and last minute (numbers), the time bound widened by
# store.IDENTITY_TIME_SLACK (%(slack)s).
_PROBE_TRADES = """
SELECT EXISTS (
    SELECT 1 FROM unnest(%(symbol)s::text[], %(low)s::bigint[], %(high)s::bigint[], %(first)s::bigint[],
                         %(last)s::bigint[]) AS p(symbol, low, high, first, last)
    CROSS JOIN LATERAL (
        SELECT 1 FROM trades t
        WHERE t.symbol = p.symbol AND t.trade_id BETWEEN p.low AND p.high
          AND t.time >= to_timestamp(p.first * 60) - %(slack)s AND t.time <= to_timestamp((p.last + 1) * 60) + %(slack)s
          AND t.time >= %(lo)s AND t.time <= %(hi)s
        LIMIT 1) AS hit)
"""

_MERGE_TRADES = store.merge_staged_trades("writer_trades_stage", returning=True)

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

# Minutes travel as one array literal of minute numbers, numbers as array literals of their text:
# no per-element work in the driver, and PostgreSQL reads each number with its own scale.
# The stored candles of these (symbol, minute) pairs.
_STORED_CANDLES = """
SELECT p.symbol, p.m, c.source, c.trades, c.volume
FROM unnest(%(symbol)s::text[], %(minute)s::bigint[]) AS p(symbol, m)
CROSS JOIN LATERAL (
    SELECT source, trades, volume FROM candles
    WHERE symbol = p.symbol AND time = to_timestamp(p.m * 60) AND time >= %(lo)s AND time < %(hi)s) AS c
"""

# Which of these (symbol, minute) pairs hold stored trades.
_MINUTES_WITH_TRADES = """
SELECT p.symbol, p.m
FROM unnest(%(symbol)s::text[], %(minute)s::bigint[]) AS p(symbol, m)
CROSS JOIN LATERAL (
    SELECT 1 FROM trades t
    WHERE t.symbol = p.symbol AND t.time >= to_timestamp(p.m * 60) AND t.time < to_timestamp((p.m + 1) * 60)
      AND t.time >= %(lo)s AND t.time < %(hi)s
    LIMIT 1) AS hit
"""

# The exact Sums of the stored trades of these minutes (minutes without trades are left out).
_MINUTE_SUMS = """
SELECT m, a.trades, a.volume, a.notional, a.high, a.low, f.time, f.trade_id, f.price, l.time, l.trade_id, l.price
FROM unnest(ARRAY(SELECT to_timestamp(n * 60) FROM unnest(%(minutes)s::bigint[]) AS n)) AS m
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS trades, sum(volume) AS volume, sum(price * volume) AS notional,
           max(price) AS high, min(price) AS low
    FROM trades WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute') a
CROSS JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute'
    ORDER BY time, trade_id LIMIT 1) f
CROSS JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE symbol = %(symbol)s AND time >= m AND time < m + interval '1 minute'
    ORDER BY time DESC, trade_id DESC LIMIT 1) l
"""

# Candles from merged Sums. Numbers travel as text so PostgreSQL reads them with the scales the
# rebuild's sum(price * volume) and sum(volume) have: the vwap division (which rounds at a scale
# chosen from its operands before trunc) is then the very one store.rebuild_candles computes.
_UPSERT_FROM_SUMS = f"""
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
SELECT s.symbol, to_timestamp(s.minute * 60), s.open, s.high, s.low, s.close,
       CASE WHEN s.volume > 0 THEN trunc(s.notional / s.volume, s.decimals) ELSE 0 END,
       s.volume, s.trades, 'trades', now()
FROM unnest(%(symbol)s::text[], %(decimals)s::integer[], %(minute)s::bigint[], %(open)s::numeric[],
            %(high)s::numeric[], %(low)s::numeric[], %(close)s::numeric[], %(notional)s::numeric[],
            %(volume)s::numeric[], %(trades)s::integer[])
     AS s(symbol, decimals, minute, open, high, low, close, notional, volume, trades)
{sql_rules.UPSERT_TRADES_CANDLE}"""

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

    def __init__(self, registry: Callable[[], PairRegistry]) -> None:
        self._registry = registry
        self._known: set[str] = set()

    def __call__(self, value: object) -> str:
        if value.__class__ is str and value in self._known:
            return value  # type: ignore[return-value]
        if not isinstance(value, str):
            raise _bad("symbol", f"must be a str, got {type(value).__name__}")
        try:
            canonical = self._registry().normalize(value)
        except ValueError as exc:
            raise InvalidRecordError(f"symbol: {exc}") from None
        if canonical != value:
            raise _bad("symbol", f"must be canonical ({canonical!r}), got {value!r}")
        if any(ch in value for ch in "\t\n\r\\"):
            raise _bad("symbol", f"must not contain tabs, newlines or backslashes: {value!r}")
        self._known.add(value)
        return value


_SIDES = {None: _NULL, "b": "b", "s": "s"}
_SECONDS = [f"{second:02d}." for second in range(61)]
_ORD_TYPES = {None: _NULL, "m": "m", "l": "l"}


class _TradeEncoder:
    """Validate a TradeRecord and encode it as its COPY text line, in one pass.

    The cheap checks run inline; anything unusual goes through the field checkers, which
    name the field. The text of a minute (``YYYY-MM-DD HH:MM:``) and its number are cached,
    so a time costs one dict lookup and a short format."""

    _CACHE_LIMIT = 100_000

    def __init__(self, symbol_check: _SymbolCheck) -> None:
        self._symbol = symbol_check
        self._minutes: dict[tuple[int, int, int, int, int], tuple[str, int]] = {}

    def __call__(self, record: object) -> tuple[str, int, int, str]:
        """record → (symbol, trade_id, minute number, COPY line)."""
        if record.__class__ is not TradeRecord and not isinstance(record, TradeRecord):
            raise InvalidRecordError(f"record must be a TradeRecord, got {type(record).__name__}")
        trade_id = record.trade_id
        if trade_id.__class__ is not int or not -_BIGINT <= trade_id < _BIGINT:
            raise _bad("trade_id", f"must be an int within bigint range, got {trade_id!r}")
        side = _SIDES.get(record.side)  # type: ignore[call-overload]
        if side is None:
            raise _bad("side", f"must be 'b', 's' or None, got {record.side!r}")
        ord_type = _ORD_TYPES.get(record.ord_type)  # type: ignore[call-overload]
        if ord_type is None:
            raise _bad("ord_type", f"must be 'm', 'l' or None, got {record.ord_type!r}")
        source = record.source
        source = source._value_ if source.__class__ is TradeSource else _TRADE_SOURCES.get(source)  # type: ignore[call-overload]
        if source is None:
            raise _bad("source", f"must be one of {sorted(_TRADE_SOURCES)}, got {record.source!r}")
        symbol = self._symbol(record.symbol)
        when = record.time
        if when.__class__ is not datetime or when.tzinfo is not UTC:
            when = _utc(when, "time")
        price = record.price
        if price.__class__ is not Decimal or not price.is_finite() or price <= _ZERO:
            price = _number(price, "price", positive=True)
        volume = record.volume
        if volume.__class__ is not Decimal or not volume.is_finite() or volume < _ZERO:
            volume = _number(volume, "volume", positive=False)
        key = (when.year, when.month, when.day, when.hour, when.minute)
        cached = self._minutes.get(key)
        if cached is None:
            cached = self._minute(when, key)
        # (format specs and Decimal.__format__ are slow: a seconds table, str() and !s instead)
        return symbol, trade_id, cached[1], (
            f"{symbol}\t{trade_id}\t{cached[0]}{_SECONDS[when.second]}{str(1_000_000 + when.microsecond)[1:]}+00"
            f"\t{price!s}\t{volume!s}\t{side}\t{ord_type}\t{source}\n"
        )

    def _minute(self, when: datetime, key: tuple[int, int, int, int, int]) -> tuple[str, int]:
        if len(self._minutes) >= self._CACHE_LIMIT:
            self._minutes.clear()
        start = when.replace(second=0, microsecond=0)
        entry = (f"{when.year:04d}-{when.month:02d}-{when.day:02d} {when.hour:02d}:{when.minute:02d}:",
                 int(start.timestamp()) // 60)
        self._minutes[key] = entry
        return entry


def _decode_trade_line(line: bytes) -> tuple:
    """A COPY line back to a row (for rejection reports and bisection)."""
    f = line.decode().rstrip("\n").split("\t")
    return (f[0], int(f[1]), datetime.fromisoformat(f[2]), Decimal(f[3]), Decimal(f[4]),
            None if f[5] == _NULL else f[5], None if f[6] == _NULL else f[6], f[7])


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


# ---------------------------------------------------------------- trade batches

# A minute's summary of a set of trades, exact (a list: updated in place while a batch is open):
# [count, Σvolume, Σprice·volume, high, low, first time, first id, first price, last time, last id, last price]
Sums = list
#: {symbol: {minute number: Sums}}
BatchSums = dict[str, dict[int, Sums]]


def _merge_sums(a: Sums, b: Sums) -> Sums:
    """The summary of the union of two disjoint sets of trades (a new list)."""
    add = _EXACT.add
    first = a[5:8] if (a[5], a[6]) <= (b[5], b[6]) else b[5:8]
    last = a[8:11] if (a[8], a[9]) >= (b[8], b[9]) else b[8:11]
    return [a[0] + b[0], add(a[1], b[1]), add(a[2], b[2]), max(a[3], b[3]), min(a[4], b[4]), *first, *last]


def _plain(value: Decimal) -> Decimal:
    """`value` with a non-positive exponent, as PostgreSQL stores it (``6E+4`` → ``60000``), so
    Python's exponents of sums and products match PostgreSQL's numeric scales."""
    return value.quantize(_ONE, context=_EXACT) if value.as_tuple().exponent > 0 else value  # type: ignore[operator]


def _sums_size(sums: BatchSums | None) -> int:
    return sum(len(minutes) for minutes in sums.values()) if sums else 0


class _OpenBatch:
    """Trades accepted and not yet handed on: their COPY lines, and per symbol the ids (for
    in-batch dedupe) and touched minutes (with each minute's Sums when building candles,
    else None)."""

    __slots__ = ("lines", "symbols", "accepted", "first_seq", "started")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.symbols: dict[str, tuple[set[int], dict[int, Sums | None]]] = {}  # symbol → (ids, minutes)
        self.accepted: list[float] = []
        self.first_seq = 0
        self.started = 0.0

    def meta(self) -> dict[str, list]:
        """{symbol: [lowest id, highest id, sorted minutes]} (the spool block meta)."""
        return {symbol: [min(ids), max(ids), sorted(minutes)] for symbol, (ids, minutes) in self.symbols.items()}

    def sums(self) -> BatchSums | None:
        """The batch's per-minute summaries (None when they were not kept)."""
        out: BatchSums = {}
        for symbol, (_, minutes) in self.symbols.items():
            if None in minutes.values():
                return None
            out[symbol] = minutes  # type: ignore[assignment]
        return out or None


class _TradeChunk:
    """Trades to commit in one transaction: COPY text payload and per-symbol metadata.
    ``overlap``: id ranges of the chunk's parts overlap, so it may hold duplicates."""

    __slots__ = ("payload", "count", "meta", "overlap", "first_seq", "accepted", "sums")

    def __init__(self, payload: bytes, count: int, meta: dict[str, list], *, overlap: bool = False,
                 first_seq: int = 0, accepted: list[float] | None = None, sums: BatchSums | None = None) -> None:
        self.payload = payload
        self.count = count
        self.meta = meta
        self.overlap = overlap
        self.first_seq = first_seq
        self.accepted = accepted
        self.sums = sums  # exact per-minute summaries of exactly these trades, when known

    @classmethod
    def from_batch(cls, batch: _OpenBatch) -> "_TradeChunk":
        return cls("".join(batch.lines).encode(), len(batch.lines), batch.meta(), first_seq=batch.first_seq,
                   accepted=batch.accepted, sums=batch.sums())

    @classmethod
    def from_lines(cls, lines: list[bytes]) -> "_TradeChunk":
        """Rebuild the metadata from the lines themselves (bisection: a rare path)."""
        ids: dict[str, list[int]] = {}
        minutes: dict[str, set[int]] = {}
        for line in lines:
            symbol, trade_id, when, _ = line.split(b"\t", 3)
            key = symbol.decode()
            ids.setdefault(key, []).append(int(trade_id))
            minutes.setdefault(key, set()).add(int(datetime.fromisoformat(when.decode()).timestamp()) // 60)
        meta = {s: [min(v), max(v), sorted(minutes[s])] for s, v in ids.items()}
        return cls(b"".join(lines), len(lines), meta, overlap=True)

    @classmethod
    def from_blocks(cls, blocks: list[Block], payloads: list[bytes]) -> "_TradeChunk":
        meta: dict[str, list] = {}
        overlap = False
        for block in blocks:
            for symbol, (low, high, minutes) in block.meta.items():
                seen = meta.get(symbol)
                if seen is None:
                    meta[symbol] = [low, high, set(minutes), [(low, high)]]
                    continue
                overlap = overlap or any(low <= b and a <= high for a, b in seen[3])
                seen[0], seen[1] = min(seen[0], low), max(seen[1], high)
                seen[2].update(minutes)
                seen[3].append((low, high))
        sums: BatchSums | None = None
        if not overlap and all(block.sums is not None for block in blocks):
            sums = {}
            for block in blocks:  # disjoint (no overlapping id ranges): summaries merge exactly
                for symbol, minutes in block.sums.items():  # type: ignore[attr-defined]
                    into = sums.setdefault(symbol, {})
                    for minute, part in minutes.items():
                        held = into.get(minute)
                        into[minute] = part if held is None else _merge_sums(held, part)
        return cls(b"".join(payloads), sum(b.count for b in blocks),
                   {s: [m[0], m[1], sorted(m[2])] for s, m in meta.items()}, overlap=overlap, sums=sums)


class _Inflight:
    """A batch taken from the buffers by the flush thread; the trade chunk is built outside
    the lock, once."""

    __slots__ = ("trades", "_chunk", "candles", "syncs")

    def __init__(self, trades: _OpenBatch | None, candles: list[tuple], syncs: list[tuple]) -> None:
        self.trades = trades
        self._chunk: _TradeChunk | None = None
        self.candles = candles
        self.syncs = syncs

    def chunk(self) -> _TradeChunk | None:
        if self.trades is None:
            return None
        if self._chunk is None:
            self._chunk = _TradeChunk.from_batch(self.trades)
        return self._chunk


# ---------------------------------------------------------------- error classification

def _classify(exc: BaseException) -> Exception:
    """Driver error → _BadData (bisect) or _Unavailable (spill and retry)."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return _BadData(str(exc).strip())
    return _Unavailable(f"{type(exc).__name__}: {str(exc).strip()}")


def _minute_runs(minutes: Iterable[int], gap: int = _MERGE_GAP_MINUTES) -> list[tuple[datetime, datetime]]:
    """Touched minutes (numbers since the epoch) → a few [start, end) windows (minutes at most
    `gap` apart joined; gap 1: only consecutive minutes)."""
    return [(datetime.fromtimestamp(a * 60, UTC), datetime.fromtimestamp(b * 60, UTC))
            for a, b in _minute_number_runs(minutes, gap)]


def _minute_number_runs(minutes: Iterable[int], gap: int = _MERGE_GAP_MINUTES) -> list[tuple[int, int]]:
    """:func:`_minute_runs` as minute numbers."""
    ordered = sorted(set(minutes))
    runs: list[tuple[datetime, datetime]] = []
    if not ordered:
        return runs
    start = prev = ordered[0]
    for minute in ordered[1:]:
        if minute - prev > gap:
            runs.append((start, prev + 1))
            start = minute
        prev = minute
    runs.append((start, prev + 1))
    return runs


def _at(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


def _probe_params(meta: dict[str, list]) -> dict[str, Any]:
    """_PROBE_TRADES' and ARCHIVE_TOUCHES_ANY's parameters (array literals: no per-element
    work in the driver): per symbol its id range and first and last minute; the whole span."""
    entries = meta.values()
    firsts, lasts = [min(e[2]) for e in entries], [max(e[2]) for e in entries]
    return {"symbol": text_array(meta), "low": number_array(e[0] for e in entries),
            "high": number_array(e[1] for e in entries), "first": number_array(firsts), "last": number_array(lasts),
            "slack": store.IDENTITY_TIME_SLACK, **store.identity_window(_at(min(firsts)), _at(max(lasts) + 1))}


def _pairs_params(symbols: list[str], minutes: list[int]) -> dict[str, Any]:
    """(symbol, minute) pairs as _STORED_CANDLES and _MINUTES_WITH_TRADES take them."""
    return {"symbol": text_array(symbols), "minute": number_array(minutes), "lo": _at(min(minutes)),
            "hi": _at(max(minutes) + 1)}


def _minute_of(when: datetime) -> int:
    return int(when.timestamp()) // 60


class _CandleSums:
    """The flush thread's exact Sums of the stored trades of recent minutes (per symbol, the
    last _CACHE_MINUTES behind the newest minute seen), and the proof that one is current.

    A held summary is trusted for a minute only when the database shows, under the per-symbol
    trades lock (which every trade writer takes) and before the batch's COPY, that the stored
    candle is still the one built from it: source 'trades' with the same trades count and
    volume (trade writers rebuild the candles of the minutes they add to, and trades are never
    deleted, so another writer's trades change the count). A minute without a summary is
    merged only when no trade of it is stored at all. The batch's trades are all new (no id of
    its range was stored and the COPY into the key succeeded), so what is stored afterwards is
    exactly summary ∪ batch. Anything else is rebuilt from all stored trades and, if recent,
    summarised again from the database. Changes are staged and applied after COMMIT only, so a
    rollback never leaves a summary ahead of the database."""

    def __init__(self) -> None:
        self.minutes: dict[str, dict[int, Sums]] = {}
        self.newest: dict[str, int] = {}
        self._staged: dict[str, dict[int, Sums | None]] = {}
        self._staged_newest: dict[str, int] = {}

    def begin(self, minutes: dict[str, Iterable[int]]) -> None:
        """Start a transaction touching `minutes` ({symbol: minute numbers})."""
        self._staged = {}
        self._staged_newest = {
            symbol: max(max(touched, default=-1), self.newest.get(symbol, -1)) for symbol, touched in minutes.items()}

    def horizon(self, symbol: str) -> int:
        """Oldest minute worth holding a summary for."""
        return self._staged_newest.get(symbol, self.newest.get(symbol, -1)) - _CACHE_MINUTES

    def stage(self, symbol: str, minute: int, sums: Sums | None) -> None:
        """Hold `sums` for `minute` after COMMIT (None: forget it)."""
        self._staged.setdefault(symbol, {})[minute] = sums if minute >= self.horizon(symbol) else None

    def stage_merged(self, merged: BatchSums) -> None:
        """:meth:`stage` every merged summary of a batch."""
        for symbol, by_minute in merged.items():
            horizon = self.horizon(symbol)
            staged = self._staged.setdefault(symbol, {})
            for minute, sums in by_minute.items():
                staged[minute] = sums if minute >= horizon else None

    def commit(self) -> None:
        """The transaction committed: apply what it staged, forget minutes left behind."""
        for symbol, newest in self._staged_newest.items():
            held = self.minutes.setdefault(symbol, {})
            for minute, sums in self._staged.get(symbol, {}).items():
                if sums is None:
                    held.pop(minute, None)
                else:
                    held[minute] = sums
            self.newest[symbol] = newest
            for minute in [m for m in held if m < newest - _CACHE_MINUTES]:
                del held[minute]
        self._staged, self._staged_newest = {}, {}

    def queue_checks(self, conn: psycopg.Connection, batch: BatchSums) -> tuple:
        """Send (in the caller's pipeline) the two queries that prove or refute the held
        summaries of every symbol of the batch."""
        warm: dict[str, dict[int, Sums]] = {}
        asked: tuple[list[str], list[int]] = ([], [])
        cold: tuple[list[str], list[int]] = ([], [])
        for symbol, minutes in batch.items():
            held = self.minutes.get(symbol, {})
            warm[symbol] = {minute: held[minute] for minute in minutes if minute in held}
            for minute in minutes:
                into = asked if minute in held else cold
                into[0].append(symbol)
                into[1].append(minute)
        stored = conn.execute(_STORED_CANDLES, _pairs_params(*asked)) if asked[0] else None
        occupied = conn.execute(_MINUTES_WITH_TRADES, _pairs_params(*cold)) if cold[0] else None
        return warm, stored, occupied

    @staticmethod
    def classify(batch: BatchSums, checks: tuple) -> dict[str, tuple[dict[int, Sums], list[int]]]:
        """The batch's minutes → per symbol ({minute: merged Sums} to write incrementally,
        [minutes to rebuild])."""
        warm, stored, occupied = checks
        rows = {(row[0], row[1]): row[2:] for row in stored.fetchall()} if stored is not None else {}
        has_trades = {(row[0], row[1]) for row in occupied.fetchall()} if occupied is not None else set()
        out: dict[str, tuple[dict[int, Sums], list[int]]] = {}
        for symbol, minutes in batch.items():
            held_by_minute = warm.get(symbol, {})
            merged: dict[int, Sums] = {}
            doubtful: list[int] = []
            for minute, part in minutes.items():
                held = held_by_minute.get(minute)
                if held is not None:
                    row = rows.get((symbol, minute))
                    if row is not None and row[0] == "trades" and row[1] == held[0] and row[2] == held[1]:
                        merged[minute] = _merge_sums(held, part)
                    else:
                        doubtful.append(minute)
                elif (symbol, minute) in has_trades:
                    doubtful.append(minute)
                else:
                    merged[minute] = part
            out[symbol] = (merged, doubtful)
        return out

    def seed(self, conn: psycopg.Connection, symbol: str, minutes: Iterable[int]) -> int:
        """After a rebuild: summarise the recent ones of `minutes` from the stored trades
        (within the transaction, under the lock) and forget the others. Returns how many."""
        horizon = self.horizon(symbol)
        recent = sorted(minute for minute in minutes if minute >= horizon)
        for minute in minutes:
            self.stage(symbol, minute, None)
        if not recent:
            return 0
        rows = conn.execute(_MINUTE_SUMS, {"symbol": symbol, "minutes": number_array(recent)}).fetchall()
        for row in rows:
            self.stage(symbol, _minute_of(row[0]), list(row[1:]))
        return len(rows)


_SUMS_COLUMNS = ("symbol", "decimals", "minute", "open", "high", "low", "close", "notional", "volume", "trades")


def _upsert_from_sums(conn: psycopg.Connection, merged: dict[str, dict[int, Sums]],
                      decimals: dict[str, int]) -> None:
    """Write the candles of merged Sums, every symbol in one statement, and note the changes."""
    rows = [(symbol, decimals[symbol], minute, r[7], r[3], r[4], r[10], r[2], r[1], r[0])
            for symbol, by_minute in merged.items() for minute, r in by_minute.items()]
    columns = list(zip(*rows))  # one transposition for every pair's rows
    conn.execute(_UPSERT_FROM_SUMS, {name: text_array(values) if name == "symbol" else number_array(values)
                                     for name, values in zip(_SUMS_COLUMNS, columns)})
    changed = [(symbol, start, end) for symbol, by_minute in merged.items()
               for start, end in _minute_number_runs(by_minute)]
    if changed:
        store.record_candle_minute_changes(conn, *zip(*changed))


#: First wait after the database failed a commit; doubles up to ``max_retry_delay``, half
#: jitter so that writers cut off together do not come back together.
COMMIT_RETRY_BASE = 0.2


# ---------------------------------------------------------------- the writer

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

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._registry = registry
        self._price_decimals: dict[str, int] = {}
        self._check_symbol = _SymbolCheck(lambda: self.registry)
        self._encode_trade = _TradeEncoder(self._check_symbol)
        self._state = "new"  # new → running → stopping → stopped
        self._abort = False
        self._seq = 0
        self._open = _OpenBatch()
        self._candles: list[tuple] = []  # (seq, accepted_at, row)
        self._syncs: list[tuple] = []
        self._inflight_min: int | None = None
        self._flush_target = 0
        self._spool: Spool | None = None
        self._spool_mode = False
        # which database this writer writes to (known once the server answered)
        self._identity = DatabaseIdentity("?")
        self._held: list[Spool] = []  # spools found at start, replayed once the identity matches
        self._outage = False  # the flush thread's last attempt found the database unavailable
        self._stop_requested: float | None = None
        # trades in the open batch at which it is handed on: spooled past this many
        self._block_limit = self.MAX_TRADE_BUFFER_SIZE
        self._spool_block = min(self.MAX_TRADE_BUFFER_SIZE, max(trade_buffer_size, _SPOOL_BLOCK))
        self._backoff_until = 0.0
        self._thread: threading.Thread | None = None
        self._fsync_thread: threading.Thread | None = None
        self._fsync_stop = threading.Event()
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._spooled_sums = 0  # minute summaries attached to spooled blocks
        self._candle_sums = _CandleSums()  # the flush thread's
        self.url: str | None = None
        self._latencies: deque[float] = deque(maxlen=100_000)
        self._counts: dict[str, int] = {}  # the flush thread's, not yet in _stats
        self.rejected: deque[tuple[str, tuple, str]] = deque(maxlen=1000)
        self._stats = dict.fromkeys(
            (
                "trades_accepted", "candles_accepted", "syncs_accepted", "recovered",
                "trades_written", "trades_duplicate", "trades_rejected",
                "candles_written", "candles_unchanged", "candles_rejected",
                "syncs_written", "syncs_rejected",
                "flushes", "errors", "retries", "spooled", "replayed", "spool_corrupt",
                "merge_fallbacks", "candles_rebuilt",
                "candles_incremental", "candles_fallback", "candles_seeded", "spool_foreign",
            ),
            0,
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "DatabaseWriter":
        """Resolve the database, open the pool and the spool, recover a crashed run's spool
        of the same database, and start the flush thread. A database that is down does not
        stop the start (a spool found then waits for the identity check); another database's
        spool does (SpoolOwnerError, nothing replayed or removed)."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"writer cannot start: it is {self._state}")
        settings = settings_or_env(self._settings)
        self.url = self._resolve_url(settings)
        identity = self._read_identity_at_start()
        root = (self._data_dir if self._data_dir is not None else Path(settings.data_dir)) / "spool"
        found = spoolfmt.claim(root, identity, adopt_unlabelled=self.adopt_unlabelled_spool)
        spool, held, recovered = found.spool, found.held, found.recovered
        self._stats["spool_corrupt"] = spool.corrupt + sum(h.corrupt for h in held)
        if spool:
            logger.warning("writer: replaying %d spooled records from %s", spool.pending, spool.directory,
                           extra={"event": "writer_spool_recover"})
        for other in held:
            logger.warning("writer: %s holds %d spooled records for database %s; they are replayed once %s "
                           "answers and proves to be that database", other.directory, other.pending, other.label,
                           identity.description, extra={"event": "writer_spool_held"})
        self._open_pool()  # connects in the background; the first batch need not wait for it
        with self._lock:
            self._spool = spool
            self._held = held
            self._identity = identity
            self._seq = recovered
            self._stats["recovered"] = recovered
            if recovered:
                self._set_spool_mode_locked(True)
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="kraken_hist-writer-flush", daemon=True)
            self._thread.start()
            self._fsync_thread = threading.Thread(target=self._fsync_run, name="kraken_hist-writer-spool-sync",
                                                  daemon=True)
            self._fsync_thread.start()
        return self

    def _read_identity_at_start(self) -> DatabaseIdentity:
        """This writer's database identity, or a pending one (description only) while the
        server does not answer."""
        assert self.url is not None
        description = spoolfmt.describe_url(self.url)
        try:
            with psycopg.connect(self.url, autocommit=True,
                                 connect_timeout=max(1, math.ceil(self.connect_timeout))) as conn:
                return spoolfmt.read_identity(conn, description)
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
        with self._cond:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return True
            if self._state == "running":
                self._state = "stopping"
                self._stop_requested = time.monotonic()
                # one more attempt at once (the database may be back), none after a failure
                self._backoff_until = 0.0
                self._outage = False
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
        self._fsync_stop.set()
        if self._fsync_thread is not None:
            self._fsync_thread.join()
        with self._cond:
            clean = not (self._open.lines or self._candles or self._syncs or self._spool or self._held)
            if self._spool is not None:
                self._spool.close()
            for held in self._held:  # never reached the database: left as found, for the next start
                held.close()
            self._state = "stopped"
            self._cond.notify_all()
        self._drop_pool()
        return clean

    def __enter__(self) -> "DatabaseWriter":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ accepting
    def _refuse_locked(self) -> None:
        raise RuntimeError(f"writer is {self._state}: call start() first" if self._state == "new"
                           else f"writer is {self._state}")

    def write_trade(self, record: TradeRecord) -> None:
        """Accept one trade (validated here; InvalidRecordError names the bad field)."""
        symbol, trade_id, minute, line = self._encode_trade(record)
        notional = None
        if self.build_candles:  # the minute's exact summary is kept as the batch grows
            when, price, volume = record.time, record.price, record.volume
            if "E+" in line:  # a positive exponent: PostgreSQL stores the value with scale 0
                price, volume = _plain(price), _plain(volume)
            notional = _EXACT.multiply(price, volume)
        now = time.monotonic()
        with self._lock:
            if self._state != "running":
                self._refuse_locked()
            self._seq += 1
            stats = self._stats
            stats["trades_accepted"] += 1
            batch = self._open
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
                    minutes[minute] = [1, volume, notional, price, price, when, trade_id, price, when, trade_id, price]
                else:
                    sums[0] += 1
                    sums[1] = _EXACT.add(sums[1], volume)
                    sums[2] = _EXACT.add(sums[2], notional)
                    if price > sums[3]:
                        sums[3] = price
                    elif price < sums[4]:
                        sums[4] = price
                    last = sums[8]
                    if when > last or (when == last and trade_id > sums[9]):
                        sums[8], sums[9], sums[10] = when, trade_id, price
                    else:
                        first = sums[5]
                        if when < first or (when == first and trade_id < sums[6]):
                            sums[5], sums[6], sums[7] = when, trade_id, price
            lines = batch.lines
            lines.append(line)
            batch.accepted.append(now)
            count = len(lines)
            if count == 1:
                batch.first_seq = self._seq
                batch.started = now
                self._cond.notify()  # an idle flush thread learns its deadline
                return
            if count >= self._block_limit:
                self._hand_to_spool_locked("trade buffer full")
                return
            if count != self.trade_buffer_size or self._spool_mode:
                return
            self._cond.notify()
        # Let the woken flush thread take the lock now: a tight producer loop would otherwise
        # re-acquire it first every time and starve the flush (no pipelining).
        time.sleep(0)

    def write_candle(self, record: CandleRecord) -> None:
        """Accept one 1-minute candle; a later one for the same bucket replaces it."""
        row = _candle_row(record, self._check_symbol)
        now = time.monotonic()
        with self._lock:
            if self._state != "running":
                self._refuse_locked()
            self._seq += 1
            self._stats["candles_accepted"] += 1
            self._candles.append((self._seq, now, row))
            if len(self._candles) == 1:
                self._cond.notify()
            elif len(self._candles) >= self.MAX_CANDLE_BUFFER_SIZE:
                self._hand_to_spool_locked("candle buffer full")

    def update_sync_status(self, symbol: str, data_type: str, timestamp: datetime | None, **details: Any) -> None:
        """Record how far `data_type` ingestion of `symbol` has come, once every record
        accepted before this call is committed. ``cursor`` and ``last_trade_id`` go to their
        columns; other details are merged into the jsonb ``details``. ``last_time`` never
        moves backwards."""
        symbol = self._check_symbol(self.registry.normalize(symbol))
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
        with self._cond:
            if self._state != "running":
                self._refuse_locked()
            self._seq += 1
            self._stats["syncs_accepted"] += 1
            if self._spool_mode:  # after every record before it, in spool order
                self._seal_open_locked()
                self._spool_syncs_locked([(self._seq, time.monotonic(), row)])
            else:
                self._syncs.append((self._seq, time.monotonic(), row))
            self._cond.notify()

    # ------------------------------------------------------------ the spool (all under the lock)
    def _set_spool_mode_locked(self, on: bool) -> None:
        self._spool_mode = on
        self._block_limit = self._spool_block if on else self.MAX_TRADE_BUFFER_SIZE

    def _hand_to_spool_locked(self, reason: str) -> None:
        """The open buffers reached their limit: spool them (entering spool mode)."""
        if not self._spool_mode:
            logger.warning("writer: %s; spooling new records to %s until the database catches up", reason,
                           self._spool.directory if self._spool is not None else "?",
                           extra={"event": "writer_spooling"})
            self._set_spool_mode_locked(True)
        self._seal_open_locked()
        self._cond.notify()

    def _seal_open_locked(self) -> None:
        """Append the open trade batch and candle buffer to the spool tail, one block each."""
        spool = self._spool
        assert spool is not None
        batch = self._open
        if batch.lines:
            self._open = _OpenBatch()
            payload = "".join(batch.lines).encode()
            block = spool.append(spoolfmt.TRADE, len(batch.lines), batch.meta(), payload, batch.first_seq)
            sums = batch.sums()
            size = _sums_size(sums)
            if size and self._spooled_sums + size <= _SPOOLED_SUMS_LIMIT:  # memory stays bounded
                block.sums = sums
                self._spooled_sums += size
            self._stats["spooled"] += len(batch.lines)
        candles = self._candles
        if candles:
            self._candles = []
            payload = spoolfmt.encode_lines([spoolfmt.encode_candle(e[2]) for e in candles])
            spool.append(spoolfmt.CANDLE, len(candles), {}, payload, candles[0][0])
            self._stats["spooled"] += len(candles)

    def _spool_syncs_locked(self, syncs: list[tuple]) -> None:
        if syncs:
            assert self._spool is not None
            payload = spoolfmt.encode_lines([spoolfmt.encode_sync(e[2]) for e in syncs])
            self._spool.append(spoolfmt.SYNC, len(syncs), {}, payload, syncs[0][0])
            self._stats["spooled"] += len(syncs)

    def _spill_locked(self, chunk: _TradeChunk | None, candles: list[tuple], syncs: list[tuple]) -> None:
        """The database failed: put the batch in flight in front of the spool (it is older
        than anything spooled), the open buffers at its tail, and every waiting sync status
        after them; spool new records until the database answers again."""
        assert self._spool is not None
        blocks: list[tuple[str, int, dict, bytes, int]] = []
        if chunk is not None and chunk.count:
            blocks.append((spoolfmt.TRADE, chunk.count, chunk.meta, chunk.payload, chunk.first_seq))
        if candles:
            blocks.append((spoolfmt.CANDLE, len(candles), {},
                           spoolfmt.encode_lines([spoolfmt.encode_candle(e[2]) for e in candles]), candles[0][0]))
        self._stats["spooled"] += self._spool.prepend(blocks)
        self._inflight_min = None
        if not self._spool_mode:
            logger.warning("writer: database unavailable; spooling new records to %s", self._spool.directory,
                           extra={"event": "writer_spooling"})
            self._set_spool_mode_locked(True)
        self._seal_open_locked()
        waiting = sorted(syncs + self._syncs, key=lambda e: e[0])
        self._syncs = []
        self._spool_syncs_locked(waiting)
        self._cond.notify_all()

    def _fsync_run(self) -> None:
        """The spool-sync thread: fsync the spool tail about once a second while it holds
        unsynced blocks (outside the writer's lock)."""
        while not self._fsync_stop.wait(_FSYNC_EVERY):
            with self._lock:
                fd = self._spool.take_sync_fd() if self._spool is not None else None
            if fd is not None:
                try:
                    _fsync_close(fd)
                except OSError:
                    logger.exception("writer: spool fsync failed", extra={"event": "writer_spool_fsync"})

    # ------------------------------------------------------------ durability
    def _watermark_locked(self) -> int:
        """Highest seq such that every record up to it is committed (or rejected)."""
        low = self._seq + 1
        if self._open.lines:
            low = self._open.first_seq
        for buffer in (self._candles, self._syncs):
            if buffer:
                low = min(low, buffer[0][0])
        if self._inflight_min is not None:
            low = min(low, self._inflight_min)
        return min(low, self._spooled_low_locked()) - 1

    def _spooled_low_locked(self) -> int:
        """Lowest seq pending in the spool or in a held spool (a large number if none)."""
        low = _BIGINT
        for spool in (self._spool, *self._held):
            first = spool.first() if spool is not None else None
            if first is not None:
                low = min(low, first.first_seq)
        return low

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
        = written + duplicate/unchanged + rejected + pending (+ ``spool_foreign``: recovered
        records of a held spool that proved to be another database's, left on disk).
        ``spool_held``: records of held spools (part of ``spool_pending``)."""
        with self._lock:
            stats: dict[str, Any] = dict(self._stats)
            stats["trade_buffer"] = len(self._open.lines)
            stats["candle_buffer"] = len(self._candles)
            stats["sync_buffer"] = len(self._syncs)
            stats["spool_held"] = sum(held.pending for held in self._held)
            stats["spool_pending"] = (self._spool.pending if self._spool is not None else 0) + stats["spool_held"]
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
        finish: Callable[[], None] | None = None
        while True:
            # One lock hold per batch, for the last batch's bookkeeping and taking the next:
            # a producer thread holds the lock often, and each contended acquire gives the
            # GIL away (and getting it back from a busy producer takes a switch interval).
            with self._cond:
                self._apply_counts_locked()
                if finish is not None:
                    finish()
                    finish = None
                    self._cond.notify_all()
                work = self._next_work_locked()
            if work is None:
                return
            kind, payload = work
            try:
                if kind == "memory":
                    finish = self._commit_memory(payload)
                elif kind == "syncs":
                    self._commit_rows("syncs", payload)
                    finish = self._clear_inflight_locked
                elif kind == "identify":
                    finish = self._identify()
                else:
                    finish = self._replay(payload)
                attempt = 0
                self._outage = False
            except _Unavailable as exc:
                attempt += 1
                delay = Backoff(COMMIT_RETRY_BASE, self.max_retry_delay, jitter="half").delay(attempt)
                stopping = self._state != "running"
                logger.warning("writer: database unavailable (%s); %s", exc,
                               "spooling what is left and stopping" if stopping else f"retrying in {delay:.1f}s",
                               extra={"event": "writer_retry"})
                with self._cond:
                    self._apply_counts_locked()
                    self._stats["errors"] += 1
                    self._stats["retries"] += 1
                    self._spill_inflight_locked(kind, payload)
                    self._outage = True
                    self._backoff_until = time.monotonic() + delay
            except Exception:  # noqa: BLE001 - the thread must survive; records stay where they are
                logger.exception("writer: unexpected error in the flush thread", extra={"event": "writer_bug"})
                with self._cond:
                    self._apply_counts_locked()
                    self._stats["errors"] += 1
                    self._spill_inflight_locked(kind, payload)
                    self._backoff_until = time.monotonic() + self.max_retry_delay

    def _apply_counts_locked(self) -> None:
        """Move the flush thread's counters (kept without the lock) into the stats."""
        if self._counts:
            for name, value in self._counts.items():
                self._stats[name] += value
            self._counts.clear()

    def _clear_inflight_locked(self) -> None:
        self._inflight_min = None

    def _next_work_locked(self) -> tuple[str, Any] | None:
        while True:
            now = time.monotonic()
            spool = self._spool
            assert spool is not None
            if self._abort or (self._outage and self._state == "stopping"):
                # stopping without a database (or past stop's timeout): everything to the spool
                self._spill_locked(None, [], [])
                spool.close_tail()
                return None
            open_trades, candles = self._open, self._candles
            if self._spool_mode and (
                (open_trades.lines and now - open_trades.started >= self.trade_flush_interval)
                or (candles and now - candles[0][1] >= self.candle_flush_interval)
            ):
                self._seal_open_locked()  # spool mode: aged records go to the spool, in order
                continue
            deadlines = []
            if open_trades.lines:
                deadlines.append(open_trades.started + self.trade_flush_interval)
            if candles:
                deadlines.append(candles[0][1] + self.candle_flush_interval)
            if now < self._backoff_until:
                self._cond.wait(min([self._backoff_until, *deadlines]) - now)
                continue
            if not self._identity.known and (self._held or self._state == "running" or open_trades.lines
                                             or candles or self._syncs or spool):
                return "identify", None  # before anything is committed: whose database is this?
            eligible = self._eligible_syncs_locked()
            if eligible:  # before later spooled sync statuses
                self._inflight_min = eligible[0][0]
                return "syncs", eligible
            if spool.first() is not None:
                return "spool", self._replay_group_locked()
            if self._spool_mode:
                self._set_spool_mode_locked(False)
                logger.info("writer: spool drained; back to buffering in memory", extra={"event": "writer_spool_drained"})
                self._cond.notify_all()
            urgent = self._state == "stopping" or self._flush_target > self._watermark_locked()
            take_trades = bool(open_trades.lines) and (
                urgent or len(open_trades.lines) >= self.trade_buffer_size
                or now - open_trades.started >= self.trade_flush_interval
            )
            take_candles = bool(candles) and (urgent or now - candles[0][1] >= self.candle_flush_interval)
            if take_trades or take_candles:
                batch: _OpenBatch | None = None
                taken: list[tuple] = []
                if take_trades:
                    batch, self._open = open_trades, _OpenBatch()
                if take_candles:
                    taken, self._candles = candles, []
                self._inflight_min = min(
                    ([batch.first_seq] if batch is not None else []) + ([taken[0][0]] if taken else []))
                return "memory", _Inflight(batch, taken, self._eligible_syncs_locked())
            if self._state == "stopping" and not (open_trades.lines or candles or self._syncs or spool):
                spool.close_tail()
                return None
            self._cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def _eligible_syncs_locked(self) -> list[tuple]:
        """Queued sync updates whose predecessors are all committed (or in the batch being taken)."""
        if not self._syncs:
            return []
        low = self._seq + 1
        if self._open.lines:
            low = self._open.first_seq
        if self._candles:
            low = min(low, self._candles[0][0])
        low = min(low, self._spooled_low_locked())
        count = 0
        while count < len(self._syncs) and self._syncs[count][0] < low:
            count += 1
        eligible = self._syncs[:count]
        del self._syncs[:count]
        return eligible

    def _replay_group_locked(self) -> list[Block]:
        """The first pending spooled block and the following ones of the same kind, up to
        _REPLAY_ROWS records: one transaction."""
        assert self._spool is not None
        group: list[Block] = []
        rows = 0
        for block in self._spool.blocks():
            if group and (block.kind != group[0].kind or block.segment is not group[0].segment
                          or rows + block.count > _REPLAY_ROWS):
                break
            group.append(block)
            rows += block.count
        return group

    def _spill_inflight_locked(self, kind: str, payload: Any) -> None:
        if kind == "memory":
            self._spill_locked(payload.chunk(), payload.candles, payload.syncs)
        elif kind == "syncs":
            self._spill_locked(None, [], payload)
        elif kind == "identify":  # the database is away: spool mode, as for a failed batch
            self._spill_locked(None, [], [])

    def _commit_memory(self, work: "_Inflight") -> Callable[[], None]:
        """Commit a batch taken from the buffers: trades, candles, then the sync updates that
        waited for them. What commits is cleared from `work`, so a failure spills the rest.
        Returns its bookkeeping, to run under the lock."""
        chunk = work.chunk()
        committed = 0.0
        if chunk is not None:
            self._commit_trades(chunk)
            work.trades = None
            committed = time.monotonic()
        self._commit_rows("candles", work.candles)
        self._commit_rows("syncs", work.syncs)

        def finish() -> None:
            if chunk is not None and chunk.accepted:
                self._latencies.extend(committed - t for t in chunk.accepted)
            self._inflight_min = None

        return finish

    def _identify(self) -> Callable[[], None]:
        """Read this writer's database identity (the first step once the database answers);
        returns the bookkeeping, to run under the lock: label the spool, and replay each held
        spool of this database (moved in front of ours) or leave one of another where it is."""
        assert self._spool is not None
        try:
            with self._connection() as conn:
                identity = spoolfmt.read_identity(conn, self._identity.description)
        except psycopg_pool.PoolTimeout as exc:
            self._drop_pool()
            raise _Unavailable(str(exc)) from exc
        except psycopg.Error as exc:
            self._drop_pool()
            raise _Unavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc
        spool = self._spool
        try:  # only this thread writes the label; appends (under the lock) do not touch it
            spool.write_label(identity)
        except OSError as exc:  # the pending label (our description) still names this database
            logger.error("writer: could not label %s with %s: %s", spool.directory, identity, exc,
                         extra={"event": "writer_spool_label"})

        def finish() -> None:
            self._identity = identity
            mine = []
            for held in self._held:
                if spoolfmt.same_database(held.label, identity):  # type: ignore[arg-type]
                    mine.append(held)
                    continue
                logger.error("writer: %s", spoolfmt.foreign_message(held.directory, held.pending, held.label, identity),
                             extra={"event": "writer_spool_foreign"})
                self._stats["spool_foreign"] += held.pending
                held.close()
            for held in reversed(mine):  # the oldest ends up first
                logger.warning("writer: replaying %d spooled records from %s", held.pending, held.directory,
                               extra={"event": "writer_spool_recover"})
                try:
                    spool.absorb(held, front=True)
                except OSError as exc:  # what did not move stays there, for the next start
                    logger.error("writer: could not move the spooled records of %s (%s); the next start "
                                 "replays them", held.directory, exc, extra={"event": "writer_spool_held"})
                held.close()
            self._held = []
            if spool:
                self._set_spool_mode_locked(True)

        return finish

    def _replay(self, blocks: list[Block]) -> Callable[[], None]:
        """Commit a group of spooled blocks; returns their bookkeeping, to run under the lock."""
        assert self._spool is not None
        kind = blocks[0].kind
        try:
            payloads = read_blocks(blocks)
            good = blocks
        except ValueError:  # damaged since it was written: find the block, drop it, keep the rest
            payloads, good = [], []
            for block in blocks:
                try:
                    payloads.extend(read_blocks([block]))
                    good.append(block)
                except ValueError as exc:
                    logger.error("writer: spooled block unreadable and dropped: %s", exc,
                                 extra={"event": "writer_spool_bad"})
                    with self._cond:
                        self._stats["spool_corrupt"] += 1
                        self._spooled_sums -= _sums_size(block.sums)  # type: ignore[arg-type]
                        self._spool.done(block)
                        self._cond.notify_all()
        if good:
            if kind == spoolfmt.TRADE:
                self._commit_trades(_TradeChunk.from_blocks(good, payloads))
            else:
                rows = [(0, 0.0, row) for payload in payloads for _, row in spoolfmt.decode_lines(payload)]
                self._commit_rows("candles" if kind == spoolfmt.CANDLE else "syncs", rows)
        spool = self._spool

        def finish() -> None:
            for block in good:
                self._spooled_sums -= _sums_size(block.sums)  # type: ignore[arg-type]
                spool.done(block)
                self._stats["replayed"] += block.count

        return finish

    # ------------------------------------------------------------ committing (bisect on bad data)
    def _commit_trades(self, chunk: _TradeChunk) -> None:
        """Commit a trade chunk; one the database refuses for its data is bisected until the
        bad record is found and rejected."""
        try:
            counts = self._transaction("trades", chunk)
        except _BadData as exc:
            if chunk.count == 1:
                self._reject("trades", _decode_trade_line(chunk.payload), str(exc))
                return
            lines = chunk.payload.splitlines(keepends=True)
            half = len(lines) // 2
            self._commit_trades(_TradeChunk.from_lines(lines[:half]))
            self._commit_trades(_TradeChunk.from_lines(lines[half:]))
            return
        self._count(counts)

    def _commit_rows(self, kind: str, entries: list[tuple]) -> None:
        """Commit candle or sync `entries` ((seq, accepted_at, row) tuples), consuming the
        list from the front."""
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
        self._count(counts)

    def _count(self, counts: dict[str, int]) -> None:
        """Add a committed transaction's counters (flush thread only; applied under the lock
        with the batch's bookkeeping)."""
        mine = self._counts
        mine["flushes"] = mine.get("flushes", 0) + 1
        for name, value in counts.items():
            mine[name] = mine.get(name, 0) + value

    def _reject(self, kind: str, row: tuple, reason: str) -> None:
        logger.error("writer: %s record refused by the database and dropped: %s (%r)", kind, reason, row,
                     extra={"event": "writer_reject"})
        self._counts[kind + "_rejected"] = self._counts.get(kind + "_rejected", 0) + 1
        self.rejected.append((kind, row, reason))
        if self._on_reject is not None:
            self._on_reject(kind, row, reason)

    def _open_pool(self) -> psycopg_pool.ConnectionPool:
        """The pool, opened at start and again after an outage (a fresh pool connects at once,
        where a pool that lost its server reconnects on its own, slowing, back-off).

        Connections are not checked when taken (a round trip per batch): one that died while
        idle fails its batch like any outage, and the batch is spilled and retried on a new
        pool."""
        if self._pool is None:
            assert self.url is not None
            self._pool = psycopg_pool.ConnectionPool(
                self.url,
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, math.ceil(self.connect_timeout)),
                        "options": session_options()},
                name="kraken_hist-writer",
                timeout=self.connect_timeout,
            )
            self._pool.open(wait=False)
        return self._pool

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # (stopping: do not wait for a worker still trying to connect)
            pool.close(timeout=1.0 if self._state == "running" else 0.2)

    @contextlib.contextmanager
    def _connection(self) -> Any:
        """A pooled connection, waited for up to connect_timeout — or, while stopping, about
        _STOP_CONNECT_GRACE: a database that gives no connection then is treated as down."""
        pool = self._open_pool()
        started = time.monotonic()
        deadline = started + self.connect_timeout
        while True:
            try:
                conn = pool.getconn(timeout=max(0.001, min(_CONNECT_SLICE, deadline - time.monotonic())))
                break
            except psycopg_pool.PoolTimeout:
                now = time.monotonic()
                stop_requested = self._stop_requested
                if now >= deadline or (stop_requested is not None
                                       and now - max(started, stop_requested) >= _STOP_CONNECT_GRACE):
                    raise psycopg_pool.PoolTimeout(f"no database connection within {now - started:.1f}s") from None
        try:
            with conn:
                yield conn
        finally:
            pool.putconn(conn)

    def _transaction(self, kind: str, rows: Any) -> dict[str, int]:
        try:
            return self._transaction_once(kind, rows)
        except _Unavailable:
            self._drop_pool()
            raise

    def _transaction_once(self, kind: str, rows: Any) -> dict[str, int]:
        try:
            with self._connection() as conn:
                if kind == "trades":
                    try:
                        with conn.transaction():
                            counts = self._store_trades(conn, rows, merge=rows.overlap)
                    except psycopg.errors.UniqueViolation:
                        # stored meanwhile (every writer takes the symbol lock, so this is a last resort)
                        with conn.transaction():
                            counts = self._store_trades(conn, rows, merge=True)
                    self._candle_sums.commit()  # only now: the summaries describe what is stored
                    return counts
                with conn.transaction():
                    if kind == "candles":
                        return self._store_candles(conn, rows)
                    for row in rows:
                        conn.execute(_UPSERT_SYNC, row)
                    return {"syncs_written": len(rows)}
        except psycopg_pool.PoolTimeout as exc:
            raise _Unavailable(str(exc)) from exc
        except psycopg.Error as exc:
            raise _classify(exc) from exc

    def _store_trades(self, conn: psycopg.Connection, chunk: _TradeChunk, *, merge: bool) -> dict[str, int]:
        meta = chunk.meta
        cache = self._candle_sums
        cache.begin({symbol: entry[2] for symbol, entry in meta.items()})
        batch_sums = chunk.sums if self.build_candles and not merge else None
        # the locks, probes and candle checks: one statement each for all symbols, one round trip
        with conn.pipeline():
            ownership.lock_symbols(conn, meta)
            params = None if merge else _probe_params(meta)
            probes = [] if params is None else [
                conn.execute(_PROBE_TRADES, params),
                # seconds the archive owns are not ours to store: the merge leaves them out
                conn.execute(ownership.ARCHIVE_TOUCHES_ANY, params),
            ]
            checks = cache.queue_checks(conn, batch_sums) if batch_sums else None
        merge = merge or any(cursor.fetchone()[0] for cursor in probes)
        minutes: dict[str, Iterable[int]]
        if not merge:
            cursor = conn.cursor()
            with cursor.copy(_COPY_TRADES, writer=LibpqWriter(cursor, flush_threshold=_COPY_FLUSH_BYTES)) as copy:
                copy.write(chunk.payload)
            written = chunk.count
            minutes = {symbol: entry[2] for symbol, entry in meta.items()}
        else:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS writer_trades_stage (LIKE trades) ON COMMIT DELETE ROWS")
            with conn.cursor().copy(_COPY_STAGE) as copy:
                copy.write(chunk.payload)
            touched = [minute for _, _, symbol_minutes in meta.values() for minute in symbol_minutes]
            inserted = conn.execute(_MERGE_TRADES, store.identity_window(_at(min(touched)), _at(max(touched) + 1))
                                    ).fetchall()
            written = len(inserted)
            by_symbol: dict[str, set[int]] = {}
            for symbol, when in inserted:
                by_symbol.setdefault(symbol, set()).add(int(when.timestamp()) // 60)
            minutes = by_symbol
        counts = {
            "trades_written": written, "trades_duplicate": chunk.count - written, "merge_fallbacks": int(merge),
            "candles_rebuilt": 0, "candles_incremental": 0, "candles_fallback": 0, "candles_seeded": 0,
        }
        if self.build_candles:
            self._maintain_candles(conn, minutes, None if merge else checks, batch_sums, counts, fast=not merge)
        return counts

    def _maintain_candles(self, conn: psycopg.Connection, minutes: dict[str, Iterable[int]],
                          checks: tuple | None, batch_sums: BatchSums | None, counts: dict[str, int], *,
                          fast: bool) -> None:
        """Bring the candles of the touched `minutes` ({symbol: minutes}) up to date: merged
        from exact Sums where the held summary is proven current (every symbol in one
        statement), rebuilt from stored trades otherwise."""
        cache = self._candle_sums
        rebuild: dict[str, list[tuple[datetime, datetime]]] = {}
        if checks is not None and batch_sums is not None:
            plans = cache.classify(batch_sums, checks)
            merged = {symbol: plan[0] for symbol, plan in plans.items() if plan[0]}
            if merged:
                _upsert_from_sums(conn, merged, {symbol: self._decimals(symbol) for symbol in merged})
                cache.stage_merged(merged)
            for symbol, (symbol_merged, doubtful) in plans.items():
                counts["candles_incremental"] += len(symbol_merged)
                counts["candles_fallback"] += len(doubtful)
                if doubtful:  # never re-aggregate a merged (maybe dense) minute
                    rebuild[symbol] = _minute_runs(doubtful, gap=1)
            doubtful_by_symbol = {symbol: plan[1] for symbol, plan in plans.items() if plan[1]}
        else:
            doubtful_by_symbol = {symbol: list(symbol_minutes) for symbol, symbol_minutes in minutes.items()}
            rebuild = {symbol: _minute_runs(doubtful) for symbol, doubtful in doubtful_by_symbol.items()}
            if fast:
                counts["candles_fallback"] += sum(len(doubtful) for doubtful in doubtful_by_symbol.values())
        for symbol, runs in rebuild.items():
            decimals = self._decimals(symbol)
            for start, end in runs:
                counts["candles_rebuilt"] += store.rebuild_candles(conn, symbol, start, end, decimals=decimals)
            counts["candles_seeded"] += cache.seed(conn, symbol, doubtful_by_symbol[symbol])

    def _decimals(self, symbol: str) -> int:
        """The pair's price decimals (looked up once per symbol: the flush asks for hundreds)."""
        places = self._price_decimals.get(symbol)
        if places is None:
            places = self._price_decimals[symbol] = self.registry.get(symbol).price_decimals
        return places

    def _store_candles(self, conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, int]:
        latest: dict[tuple[str, datetime], tuple] = {}
        for row in rows:
            latest.pop((row[0], row[1]), None)
            latest[(row[0], row[1])] = row  # the newest value wins, in arrival order
        columns = list(zip(*latest.values()))
        changed = conn.execute(_UPSERT_CANDLES, [list(column) for column in columns]).fetchall()
        by_symbol: dict[str, list[int]] = {}
        for symbol, when in changed:
            by_symbol.setdefault(symbol, []).append(int(when.timestamp()) // 60)
        for symbol, minutes in by_symbol.items():
            for start, end in _minute_runs(minutes):
                store.record_candle_change(conn, symbol, start, end)
        return {"candles_written": len(changed), "candles_unchanged": len(rows) - len(changed)}


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
