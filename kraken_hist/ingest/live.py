"""Live ingestion: WebSocket v2 messages → records → the DatabaseWriter, losing nothing on reconnect.

Kraken's trade ids are contiguous per pair, so continuity is checked id by id. Per symbol an
:class:`IdSequence` (a pure state machine) keeps the *frontier* (every id of the record up to
it has been handed to the writer), the highest id seen, and the holes between them. A jump in
ids (a reconnect, a dropped frame, a restart after hours) opens a hole; a background thread
fetches exactly those ids through REST Trades (paced by the process-wide limiter) and hands
them to the same writer. Snapshot replays and REST/WS overlap are dropped by id.

Where a record starts is exact too. After an archive import (sync_status ``last_time`` E, no
``last_trade_id``) the record starts at the first trade at/after E, which REST fetched from
E tells — nothing the archive holds is fetched or handed over again. On a fresh start it
starts at the first trade of the minute the first live trade falls in, fetched by REST, so
that minute's candle is built from all of its trades. Until REST has said where the record
starts, live trades are still handed over, but nothing is written down as done.

A trade the exchange sent with an impossible value (``bounds``: a WebSocket item or a REST row
it refused) takes its place in the sequence without being written: its id is accounted for,
recorded in ``refused_trades`` by the progress step that vouches for it, and never fetched again.

Only the contiguous part is ever recorded as done: once the writer has made it durable,
``sync_status(symbol, 'trades')`` and coverage ``'ws'`` advance to the frontier, never past a
hole — so a crash at any moment resumes from a correct point.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, Iterable, Protocol

from kraken_hist.storage import ownership

from kraken_hist.storage import store
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.core.errors import DatabaseUnavailableError, ExchangePermanentError, KrakenHistError, TransientError
from kraken_hist.core.bounds import trade_id_problem
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.core.timeutils import UTC, floor_minute, to_unix_ns
from kraken_hist.core.types import CandleRecord, CandleSource, HistoricalTrade, Refused, TradeRecord, TradeSource
from kraken_hist.kraken.ws_parsing import OhlcMessage, TradeMessage, WsTrade
from kraken_hist.rules.backoff import Backoff

logger = logging.getLogger(__name__)
_trade_id = attrgetter("trade_id")
_new_record = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass sets its own fields
#: the inline path sets exactly these; should TradeRecord change, every record takes the constructor
_INLINE_FIELDS_MATCH = tuple(f.name for f in fields(TradeRecord)) == (
    "symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")
_SIDES = (None, "b", "s")
_ORD_TYPES = (None, "m", "l")

ONE_MICROSECOND = timedelta(microseconds=1)
Trade = HistoricalTrade | WsTrade  # what REST pages and WebSocket frames carry
#: REST fetches start this much before the last trade we hold: the same trade's time may
#: differ by a microsecond between REST and WebSocket, and duplicates are dropped by id anyway.
REST_MARGIN_NS = 1_000_000
#: REST pages in a row that bring no new trade id before a catch-up gives up for this turn.
MAX_IDLE_PAGES = 3


@dataclass(frozen=True, slots=True)
class _RefusedTrade:
    """A refused trade placed in the id sequence like any other, but never written."""

    symbol: str
    trade_id: int
    time: datetime
    refused: Refused


class TradeWriter(Protocol):
    """What we need of :class:`kraken_hist.storage.writer.DatabaseWriter`."""

    def write_trade(self, trade: TradeRecord) -> Any: ...

    def write_candle(self, candle: CandleRecord) -> Any: ...

    def flush(self, timeout: float | None = None) -> Any: ...


class TradesFetcher(Protocol):
    """One REST Trades page after a ``since`` cursor: KrakenTradesBackfill (or an adapter)."""

    def fetch_trades_page(self, symbol: str, since: str | int | datetime | None) -> TradesPage: ...


class RestTrades:
    """Adapts a :class:`KrakenRestClient` to :class:`TradesFetcher`."""

    def __init__(self, client: Any, page_size: int = 1000) -> None:
        self.client = client
        self.page_size = page_size

    def fetch_trades_page(self, symbol: str, since: str | int | datetime | None) -> TradesPage:
        return self.client.get_trades(symbol, since=since, count=self.page_size)


# What IdSequence.accept says about one trade (ordered: NEW and OPENED mean "hand it over").
OLD = 0  # already handed over (a snapshot replay, REST/WebSocket overlap)
EARLY = 1  # before the record's start: the archive's, or older than the minute this record starts in
NEW = 2  # hand it over
OPENED = 3  # hand it over; ids just below it are missing (a new hole: wake the catch-up)


@dataclass(frozen=True, slots=True)
class Hole:
    """Missing ids ``lo..hi``; ``after`` is the time of trade ``lo - 1`` (REST pages by time, so
    fetching starts just before it). ``lo`` None: the lower end is not known yet — the hole runs
    from the first trade at/after ``after`` (the record's anchor) up to ``hi``."""

    lo: int | None
    hi: int
    after: datetime

    @property
    def since(self) -> int:
        """The REST Trades ``since`` (ns, exclusive) to fetch this hole from. With ``lo`` unknown,
        exactly the anchor minus 1 ns: nothing older is requested (it is the archive's)."""
        return to_unix_ns(self.after) - (1 if self.lo is None else REST_MARGIN_NS)


@dataclass(frozen=True, slots=True)
class Fetch:
    """One REST catch-up job: ids ``lo..hi`` (``hi`` None: whatever REST has after them), paged
    from ``since`` (ns, exclusive). ``lo`` None: the pages start at the record's anchor, and their
    first trade at/after it is the first id of the record."""

    lo: int | None
    hi: int | None
    since: int


class IdSequence:
    """Which trade ids of one pair have been handed to the writer: a pure state machine (no I/O,
    clock or lock — the integration holds its lock around every call; threads and REST paging
    stay outside).

    The *record* is the ids ``start..max_seen``: each handed over exactly once, except the
    ``holes`` (sorted, disjoint, below ``max_seen``). The ``frontier`` is the highest id with
    every id of the record up to it handed over — what may be written down as the resume point.

    ``start`` may not be known (``pending``): after an archive ("everything before ``anchor`` is
    stored, the first Kraken id after it is not known") or on a fresh start (the anchor is the
    start of the first trade's minute, so that minute is stored whole). Then the record begins
    with the first trade at/after ``anchor``: trades before it are ``EARLY`` (never handed over),
    later ones are handed over as they come and the ids below the lowest of them form a hole
    ``(None, hi)``, and ``start`` is fixed by REST pages fetched from the anchor (``accept(...,
    fixes_start=True)``: the first of their trades at/after the anchor is the first id after it).
    Until then the frontier is unknown (None) and nothing is written down. ``exact=False`` (no
    REST to ask): the first trade at/after the anchor starts the record; a fresh record starts at
    its first trade.
    """

    __slots__ = ("exact", "pending", "anchor", "origin", "max_seen", "max_seen_time", "holes", "covered_from",
                 "tail_check")

    def __init__(self, *, exact: bool = True) -> None:
        """A fresh record: nothing known yet; its first trade decides where it starts."""
        self.exact = exact
        self.pending = True  # the record's first id is not known yet
        self.anchor: datetime | None = None  # while pending: trades before it are not ours
        self.origin: int | None = None  # REST is never asked for anything before this `since` (anchor - 1 ns)
        self.max_seen: int | None = None
        self.max_seen_time: datetime | None = None
        self.holes: list[Hole] = []
        self.covered_from: datetime | None = None  # start of the time range the record vouches for
        self.tail_check = False  # ask REST what came after max_seen (after a reconnect)

    @classmethod
    def resume(cls, last_id: int, last_time: datetime, *, exact: bool = True) -> "IdSequence":
        """Every id up to `last_id` (traded at `last_time`) is stored."""
        seq = cls(exact=exact)
        seq.pending = False
        seq.max_seen, seq.max_seen_time, seq.covered_from = last_id, last_time, last_time
        return seq

    @classmethod
    def after(cls, anchor: datetime, *, exact: bool = True) -> "IdSequence":
        """Everything before `anchor` is stored (an archive ends there); the first id after it is
        not known. With REST, catch-up starts at once from the anchor."""
        seq = cls(exact=exact)
        seq.anchor = anchor
        seq.origin = to_unix_ns(anchor) - 1
        if exact:
            seq.covered_from = anchor
            seq.tail_check = True
        return seq

    def copy(self) -> "IdSequence":
        twin = IdSequence.__new__(IdSequence)
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.holes = list(self.holes)
        return twin

    # --- transitions ----------------------------------------------------------------------

    def accept(self, trade_id: int, when: datetime, fixes_start: bool = False) -> int:
        """Place one trade; returns OLD, EARLY, NEW or OPENED. `fixes_start`: the trade comes
        from REST pages fetched from the anchor (a :class:`Fetch` with ``lo`` None)."""
        if self.pending:
            anchor = self.anchor
            if anchor is None:  # a fresh record: its first trade decides where it starts
                if not self.exact:
                    return self._start(trade_id, when)
                anchor = self.anchor = self.covered_from = floor_minute(when)
                self.origin = to_unix_ns(anchor) - 1
            if when < anchor:
                return EARLY
            if fixes_start or not self.exact:
                return self._start(trade_id, when)
            if self.max_seen is None:
                self.max_seen, self.max_seen_time = trade_id, when
                self.holes.append(Hole(None, trade_id - 1, anchor))
                return OPENED
        return self._place(trade_id, when)

    def append_run(self, last_id: int, last_time: datetime) -> None:
        """Ids ``max_seen + 1 .. last_id`` were handed over (the caller checked they continue
        the sequence with no gap: they land above every hole, and — above an id at/after the
        anchor — after the anchor)."""
        self.max_seen, self.max_seen_time = last_id, last_time

    def request_tail(self) -> None:
        """Ask REST what traded after the newest id we hold (the stream was away)."""
        if self.max_seen is not None or self.anchor is not None:
            self.tail_check = True

    def next_fetch(self) -> Fetch | None:
        """The REST job this record needs first: its lowest hole, else a requested tail check
        (which it consumes), else None."""
        if self.holes:
            hole = self.holes[0]
            return Fetch(hole.lo, hole.hi, self.since(hole))
        if not self.tail_check:
            return None
        self.tail_check = False
        if self.pending:
            return None if self.origin is None else Fetch(None, None, self.origin)
        assert self.max_seen is not None and self.max_seen_time is not None
        return Fetch(self.max_seen + 1, None, self._clamp(to_unix_ns(self.max_seen_time) - REST_MARGIN_NS))

    def since(self, hole: Hole) -> int:
        """Where REST pages for `hole` start: just before it, never before the record's anchor."""
        return self._clamp(hole.since)

    def _clamp(self, since: int) -> int:
        return since if self.origin is None or since > self.origin else self.origin

    def _start(self, trade_id: int, when: datetime) -> int:
        """`trade_id` is the first id of the record (the first trade at/after the anchor)."""
        self.pending = False
        self.anchor = None
        if self.max_seen is None:
            self.max_seen, self.max_seen_time = trade_id, when
            if self.covered_from is None:
                self.covered_from = when + ONE_MICROSECOND  # same-instant trades before it unknown
            return NEW
        first = self.holes[0]  # (None, hi): every id handed over so far is above hi
        if trade_id <= first.hi:
            self.holes[0] = Hole(trade_id, first.hi, first.after)
        else:  # we hold it already (hi + 1) — or sources disagree on a time at the boundary:
            del self.holes[0]  # the record starts at the lowest id we hold
        return self._place(trade_id, when)

    def _place(self, trade_id: int, when: datetime) -> int:
        top = self.max_seen
        assert top is not None
        if trade_id > top:
            verdict = NEW
            if trade_id > top + 1:
                assert self.max_seen_time is not None
                self.holes.append(Hole(top + 1, trade_id - 1, self.max_seen_time))
                verdict = OPENED
            self.max_seen, self.max_seen_time = trade_id, when
            return verdict
        holes = self.holes
        for index, hole in enumerate(holes):
            if trade_id > hole.hi:
                continue
            if hole.lo is not None and trade_id < hole.lo:
                return OLD
            pieces = []
            if hole.lo is None or trade_id > hole.lo:
                pieces.append(Hole(hole.lo, trade_id - 1, hole.after))
            if trade_id < hole.hi:
                pieces.append(Hole(trade_id + 1, hole.hi, when))
            holes[index:index + 1] = pieces
            return NEW
        return OLD

    # --- reading --------------------------------------------------------------------------

    @property
    def frontier(self) -> int | None:
        """Every id of the record up to here is handed over (None: not known yet)."""
        if self.pending:
            return None
        if self.holes:
            lo = self.holes[0].lo
            assert lo is not None
            return lo - 1
        return self.max_seen

    @property
    def frontier_time(self) -> datetime | None:
        if self.pending:
            return None
        return self.holes[0].after if self.holes else self.max_seen_time

    def still_missing(self, lo: int | None, hi: int) -> list[Hole]:
        """The holes overlapping ids ``lo..hi`` (``lo`` None: from the record's start)."""
        return [h for h in self.holes if (h.lo is None or h.lo <= hi) and (lo is None or h.hi >= lo)]

    def missing_ids(self) -> int:
        """How many ids are known missing (holes whose lower end is not known yet not counted)."""
        return sum(h.hi - h.lo + 1 for h in self.holes if h.lo is not None)

    def open_holes(self) -> list[tuple[int | None, int]]:
        return [(h.lo, h.hi) for h in self.holes]


@dataclass
class _Symbol:
    """One pair: its id sequence, and the integration's bookkeeping around it."""

    seq: IdSequence
    persisted: int | None = None  # frontier last written to sync_status
    retry_at: float = 0.0
    failures: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveStats:
    """Counters of the integration (a copy)."""

    ws_trades: int
    duplicates: int
    before_start: int  # trades older than a record's anchor (the archive's, or before its first minute)
    rest_trades: int
    rest_calls: int
    holes_opened: int
    missing_ids: int  # ids known missing right now (open holes)
    candles: int
    candles_skipped: int
    rejected: int
    refused: int  # trades the exchange sent with impossible values: accounted for, recorded, not written
    frontier: dict[str, int | None]  # None: nothing yet, or the first id after the anchor not known yet
    persisted: dict[str, int | None]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class WebSocketDBIntegration:
    """Turns :class:`KrakenWSClient` callbacks into writer calls and keeps the id sequence whole.

    Hand its callbacks to the client: ``KrakenWSClient(url, symbols, **integration.callbacks())``.
    `writer` is a started DatabaseWriter; `rest` fetches missing ids (KrakenTradesBackfill, or
    ``RestTrades(KrakenRestClient)``); without it holes are only reported, and a record starts
    at the first trade seen. `db_url` is used to read where each stored sequence ends on start
    and to advance sync status and coverage.
    """

    def __init__(
        self,
        writer: TradeWriter,
        *,
        db_url: str,
        rest: TradesFetcher | None = None,
        symbols: Iterable[str] = (),
        progress_interval: float = 5.0,
        retry_cap: float = 60.0,
        flush_timeout: float = 60.0,
        pages_per_turn: int = 10,
        name: str = "kraken-live",
        registry: PairRegistry | None = None,
    ) -> None:
        self.writer = writer
        self.db_url = db_url
        self._registry = registry
        self.rest = rest
        self.progress_interval = progress_interval
        self.retry_cap = retry_cap
        self.flush_timeout = flush_timeout
        self.pages_per_turn = pages_per_turn
        self.name = name
        self._symbols: dict[str, _Symbol] = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._counts = dict.fromkeys(
            ("ws_trades", "duplicates", "before_start", "rest_trades", "rest_calls", "holes_opened",
             "candles", "candles_skipped", "rejected", "refused"), 0
        )
        self._refused_todo: dict[str, list[tuple[Refused, TradeSource]]] = {}  # for the next progress step
        self._initial = list(symbols)  # normalized at start, once the database's pairs are known
        self._record = _RecordFactory()

    registry = GivenOrDatabaseRegistry()  # the registry given, else the database's

    def callbacks(self) -> dict[str, Any]:
        """Keyword arguments for KrakenWSClient."""
        return {"on_trade": self.on_trade, "on_ohlc": self.on_ohlc, "on_connect": self.on_connect,
                "on_error": self.on_error}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "WebSocketDBIntegration":
        """Read where each symbol's stored sequence ends; start the REST and progress threads."""
        if self._initial:
            self.load_positions([self.registry.normalize(s) for s in self._initial])
        self._stop.clear()
        targets = [(f"{self.name}-progress", self._progress_loop)]
        if self.rest is not None:
            targets.append((f"{self.name}-catchup", self._catchup_loop))
        for thread_name, target in targets:
            thread = threading.Thread(target=target, name=thread_name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads, then record durable progress one last time (flushes the writer).
        Holes still open stay open in the database's view: the next run fetches them."""
        self._stop.set()
        with self._work:
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout)
        self._threads.clear()
        try:
            self.persist_progress(flush_timeout=min(self.flush_timeout, 10.0))
        except KrakenHistError as exc:  # the data is safe in the writer; only the resume point lags
            logger.error("%s: could not record final progress (%s); the next run re-checks from the "
                         "previous resume point", self.name, exc)

    def __enter__(self) -> "WebSocketDBIntegration":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _new_sequence(self) -> IdSequence:
        return IdSequence(exact=self.rest is not None)

    def load_positions(self, symbols: Iterable[str]) -> None:
        """Where each symbol's record continues, from the database.

        - sync_status ``last_trade_id``: every id up to it is stored (the contiguous resume point);
        - sync_status ``last_time`` E without ``last_trade_id`` (an archive import ends there):
          everything before E is stored and the first id after it is not known yet — REST
          fetches from E, and its first trade at/after E is where the record continues (ids
          before it, the archive's, are never asked for again);
        - no sync_status row (or one holding neither): the highest stored id, if any.
        Ids between that point and the first live trade are fetched by REST."""
        with connect(self.db_url) as conn:
            for symbol in symbols:
                seq, persisted, where = self._stored_position(conn, symbol)
                with self._lock:
                    state = self._symbols.get(symbol)
                    if state is None or state.seq.max_seen is None:  # nothing seen by this run yet
                        self._symbols[symbol] = _Symbol(seq, persisted=persisted)
                logger.info("%s: %s continues %s", self.name, symbol, where)

    def _stored_position(self, conn: Any, symbol: str) -> tuple[IdSequence, int | None, str]:
        exact = self.rest is not None
        status = store.read_sync_status(conn, symbol, "trades")
        last_id = status["last_trade_id"] if status else None
        if last_id is None and status is not None and status["last_time"] is not None:
            anchor = status["last_time"]
            return IdSequence.after(anchor, exact=exact), None, f"with the first trade at/after {anchor.isoformat()}"
        if last_id is None:
            row = conn.execute("SELECT max(trade_id) FROM trades WHERE symbol = %s AND trade_id >= 0",
                               (symbol,)).fetchone()
            last_id = row[0] if row else None
        if last_id is None:
            return self._new_sequence(), None, "from its first live trade's minute" if exact else "from its first live trade"
        row = conn.execute("SELECT time FROM trades WHERE symbol = %s AND trade_id = %s", (symbol, last_id)).fetchone()
        when = row[0] if row else (status["last_time"] if status else None)
        if when is None:
            return self._new_sequence(), None, f"afresh (trade id {last_id} has no known time)"
        return IdSequence.resume(last_id, when, exact=exact), last_id, f"after trade id {last_id}"

    # --- WebSocket callbacks --------------------------------------------------------------

    def on_connect(self, number: int) -> None:
        """After a reconnect, ask REST what traded since our last id (the stream cannot tell
        us about trades that happened while we were away until the next one arrives)."""
        with self._work:
            self._connections = number
            if number > 1:
                for state in self._symbols.values():
                    state.seq.request_tail()
                self._work.notify_all()

    def on_error(self, error: KrakenHistError) -> None:
        """Errors are logged by the client; a refused symbol has no stream to check."""
        if isinstance(error, ExchangePermanentError):
            logger.error("%s: %s", self.name, error)

    def on_trade(self, message: TradeMessage) -> None:
        """Hand new trades to the writer; drop replays; open holes on jumps; place refused items."""
        self._accept(self._with_refused(message.trades, message.refused, None), TradeSource.WEBSOCKET)

    def on_ohlc(self, message: OhlcMessage) -> None:
        """1-minute exchange candles for minutes our trades do not cover (the writer never lets
        them replace a candle built from trades)."""
        for candle in message.candles:
            if candle.interval != 1:
                continue
            with self._lock:
                state = self._symbols.get(candle.symbol)
                covered_from = state.seq.covered_from if state is not None else None
                covered_to = state.seq.frontier_time if state is not None else None
                covered = (
                    covered_from is not None and covered_to is not None
                    and covered_from <= candle.time and candle.time + timedelta(minutes=1) <= covered_to
                )
            if covered:
                self._counts["candles_skipped"] += 1
                continue
            try:
                record = CandleRecord(
                    symbol=candle.symbol, time=candle.time, open=candle.open, high=candle.high,
                    low=candle.low, close=candle.close, volume=candle.volume, vwap=candle.vwap,
                    trades=candle.trades, source=CandleSource.WS_OHLC,
                )
            except ValueError as exc:
                self._counts["rejected"] += 1
                logger.warning("%s: ohlc candle refused (%s): %r", self.name, exc, candle)
                continue
            self.writer.write_candle(record)
            self._counts["candles"] += 1

    # --- continuity -----------------------------------------------------------------------

    def _accept(self, trades: Iterable[Trade], source: TradeSource, fixes_start: bool = False) -> int:
        """Write the trades not seen before, in id order; returns how many were written.

        One lock hold per symbol of a message. The common case — a message continuing the
        sequence — skips the per-id bookkeeping: the state moves once, after every record is
        with the writer (so a progress flush never vouches for a trade the writer has not
        accepted). `fixes_start`: REST pages fetched from a record's anchor (see IdSequence)."""
        fresh = 0
        counter = "ws_trades" if source is TradeSource.WEBSOCKET else "rest_trades"
        by_symbol: dict[str, list[Trade]] = {}
        for trade in trades:
            group = by_symbol.get(trade.symbol)
            if group is None:
                by_symbol[trade.symbol] = [trade]
            else:
                group.append(trade)
        for symbol, group in by_symbol.items():
            group.sort(key=_trade_id)
            with self._work:
                state = self._symbols.get(symbol)
                if state is None:
                    state = self._symbols[symbol] = _Symbol(self._new_sequence())
                seq = state.seq
                top = seq.max_seen
                first = group[0].trade_id
                if (top is not None and first == top + 1 and group[-1].trade_id - first == len(group) - 1
                        and not (fixes_start and seq.pending)):
                    fresh += self._append_run(seq, group, source, counter)
                else:
                    fresh += self._accept_each(seq, group, source, counter, fixes_start)
        return fresh

    def _with_refused(self, trades: Iterable[Trade], refused: Iterable[Refused], symbol: str | None) -> list[Any]:
        """`trades` and the refused items with a valid id, placed in time: their own time when it
        is possible, else the time of the trade just before them (so a REST fetch from there
        starts early enough), else they are left out (a later REST page places them)."""
        batch: list[Any] = list(trades)
        extra = []
        for item in refused:
            if item.trade_id is None or trade_id_problem(item.trade_id) is not None:
                continue
            try:
                name = self.registry.normalize(item.symbol) if item.symbol else symbol
            except ValueError:
                name = None
            if name is None:
                continue
            when = item.time
            if when is None:
                before = [t.time for t in batch if t.symbol == name and t.trade_id < item.trade_id]
                if before:
                    when = max(before)
                else:
                    with self._lock:
                        state = self._symbols.get(name)
                        when = state.seq.max_seen_time if state is not None else None
            if when is not None:
                extra.append(_RefusedTrade(name, item.trade_id, when, item))
        return batch + extra if extra else batch

    def _note_refused(self, trade: "_RefusedTrade", source: TradeSource) -> None:
        """A refused trade took its place in the sequence: record it with the next progress step."""
        self._refused_todo.setdefault(trade.symbol, []).append((trade.refused, source))
        self._counts["refused"] += 1

    def _append_run(self, seq: IdSequence, run: list[Trade], source: TradeSource, counter: str) -> int:
        """Hand over ids ``max_seen + 1 ..`` with no gap (caller holds the lock); ``max_seen``
        follows the last one handed over, even if the writer fails midway."""
        record, write = self._record, self.writer.write_trade
        handed = None
        written = 0
        try:
            for trade in run:
                if trade.__class__ is _RefusedTrade:
                    self._note_refused(trade, source)  # type: ignore[arg-type]
                    handed = trade
                    continue
                try:
                    write(record(trade, source))
                except ValueError as exc:  # the id is still accounted for: REST cannot do better
                    self._refused(trade, exc)
                else:
                    written += 1
                handed = trade
        finally:
            if handed is not None:
                seq.append_run(handed.trade_id, handed.time)
            self._counts[counter] += written
        return written

    def _accept_each(self, seq: IdSequence, group: list[Trade], source: TradeSource, counter: str,
                     fixes_start: bool) -> int:
        """Place each trade in the sequence; hand over the new ones (caller holds the lock). If
        the writer fails midway, only what it took is accounted for: the rest is fetched again."""
        record, write, counts = self._record, self.writer.write_trade, self._counts
        saved = seq.copy()
        placed = written = 0
        opened = False
        try:
            for trade in group:
                verdict = seq.accept(trade.trade_id, trade.time, fixes_start)
                if verdict >= NEW:
                    if verdict == OPENED:
                        opened = True
                        self._opened(trade.symbol, seq.holes[-1])
                    if trade.__class__ is _RefusedTrade:
                        self._note_refused(trade, source)  # type: ignore[arg-type]
                        placed += 1
                        continue
                    try:
                        write(record(trade, source))
                    except ValueError as exc:
                        self._refused(trade, exc)
                    else:
                        written += 1
                elif verdict == OLD:
                    counts["duplicates"] += 1
                else:
                    counts["before_start"] += 1
                placed += 1
        except BaseException:
            state = self._symbols[group[0].symbol]
            state.seq = seq = saved
            for trade in group[:placed]:
                seq.accept(trade.trade_id, trade.time, fixes_start)
            raise
        finally:
            counts[counter] += written
            if opened:
                self._work.notify_all()
        return written

    def _opened(self, symbol: str, hole: Hole) -> None:
        if hole.lo is None:  # where the record starts: not a loss, the trades before the first one we saw
            logger.info("%s: %s trades from %s up to id %d: fetching them by REST",
                        self.name, symbol, hole.after.isoformat(), hole.hi)
            return
        self._counts["holes_opened"] += 1
        logger.warning("%s: %s trade ids %d..%d missing; fetching them by REST", self.name, symbol, hole.lo, hole.hi)

    def _refused(self, trade: Trade, exc: ValueError) -> None:
        self._counts["rejected"] += 1
        logger.error("%s: trade refused (%s): %r", self.name, exc, trade)

    # --- REST catch-up --------------------------------------------------------------------

    def _next_job(self) -> tuple[str, Fetch] | None:
        """The earliest hole (or a tail check) of a symbol not waiting out a retry."""
        now = time.monotonic()
        for symbol, state in self._symbols.items():
            if state.retry_at > now:
                continue
            job = state.seq.next_fetch()
            if job is not None:
                return symbol, job
        return None

    def _catchup_loop(self) -> None:
        assert self.rest is not None
        while not self._stop.is_set():
            with self._work:
                job = self._next_job()
                if job is None:
                    self._work.wait(timeout=0.5)
                    continue
            symbol, fetch = job
            try:
                self._fill(symbol, fetch)
                with self._lock:
                    self._symbols[symbol].failures = 0
            except (TransientError, ExchangePermanentError) as exc:
                with self._lock:
                    state = self._symbols[symbol]
                    state.failures += 1
                    delay = Backoff(1.0, self.retry_cap).delay(state.failures)
                    state.retry_at = time.monotonic() + delay
                    if fetch.hi is None:
                        state.seq.tail_check = True
                logger.warning("%s: REST catch-up of %s failed (%s); again in %.1fs", self.name, symbol, exc, delay)

    def _fill(self, symbol: str, job: Fetch) -> None:
        """Page REST Trades from just before the job's first id (or from its anchor) until its
        ids are all in (a tail check: until REST has nothing newer). At most ``pages_per_turn``
        pages, then other symbols get their turn; the rest is picked up on the next round."""
        assert self.rest is not None
        since = str(job.since)
        fixes_start = job.lo is None  # the pages run on from the anchor: their first trade at/after it starts the record
        page_size = int(getattr(self.rest, "page_size", 1000))
        idle = 0  # pages in a row that placed no new id
        for _ in range(self.pages_per_turn):
            if self._stop.is_set():
                return
            page = self.rest.fetch_trades_page(symbol, since)
            self._counts["rest_calls"] += 1
            with self._lock:
                before = self._progress_mark(symbol)
            self._accept(self._with_refused(page.trades, page.refused, symbol), TradeSource.REST, fixes_start)
            with self._lock:
                idle = idle + 1 if self._progress_mark(symbol) == before else 0
            rows = len(page.trades) + len(page.refused)  # a refused row is a row of the page all the same
            if job.hi is None:
                if rows < page_size or page.last == since:
                    return  # caught up with what REST knows
                if int(page.last) <= int(since) or idle >= MAX_IDLE_PAGES:
                    raise _NotYetError(f"REST paging of {symbol} does not advance: {idle} full pages in a row "
                                       f"brought no new trade (since {since}, last {page.last})")
                since = page.last
                continue
            if idle >= MAX_IDLE_PAGES:
                raise _NotYetError(f"REST paging of {symbol} does not advance: {idle} pages in a row brought "
                                   f"none of the missing ids (since {since}, last {page.last})")
            with self._lock:
                seq = self._symbols[symbol].seq
                still_open = seq.still_missing(job.lo, job.hi)
                # Continue from just before the first id still missing, not from `last`: a page cut
                # inside a burst sharing one timestamp would make an exclusive `since` skip the rest.
                resume = seq.since(still_open[0]) if still_open else 0
            if not still_open:
                logger.info("%s: %s trade ids %s..%d filled by REST", self.name, symbol,
                            "(first after the anchor)" if job.lo is None else job.lo, job.hi)
                return
            if not page.trades:
                raise _NotYetError(f"REST has no {symbol} trades after {since} yet (need ids "
                                   f"{'the first after the anchor' if job.lo is None else job.lo}..{job.hi})")
            following = resume if resume > int(since) else int(page.last)
            if following <= int(since):
                raise _NotYetError(f"REST paging of {symbol} does not advance past {since}")
            since = str(following)
        with self._lock:  # let the other symbols go first
            state = self._symbols.pop(symbol)
            self._symbols[symbol] = state
            if job.hi is None:
                state.seq.tail_check = True

    def _progress_mark(self, symbol: str) -> tuple[Any, ...]:
        """What a page that places a new id changes (caller holds the lock)."""
        state = self._symbols.get(symbol)
        if state is None:
            return ()
        return state.seq.pending, state.seq.max_seen, tuple(state.seq.open_holes())

    # --- durable progress -----------------------------------------------------------------

    def _progress_loop(self) -> None:
        while not self._stop.wait(self.progress_interval):
            try:
                self.persist_progress()
            except KrakenHistError as exc:
                logger.warning("%s: could not record progress (%s); will retry", self.name, exc)

    def persist_progress(self, flush_timeout: float | None = None) -> int:
        """Flush the writer, then advance sync_status and coverage 'ws' of every symbol whose
        contiguous frontier moved (never while a record's first id is not known yet). Returns
        how many symbols advanced."""
        todo: dict[str, tuple[int, datetime, datetime | None]] = {}
        with self._lock:
            for symbol, state in self._symbols.items():
                seq = state.seq
                frontier, when = seq.frontier, seq.frontier_time
                if frontier is not None and when is not None and frontier >= 0 and frontier != state.persisted:
                    todo[symbol] = (frontier, when, seq.covered_from)
            refused, self._refused_todo = self._refused_todo, {}
        if not todo and not refused:
            return 0
        try:
            return self._persist(todo, refused, flush_timeout)
        except BaseException:
            with self._lock:  # recorded next time
                for symbol, items in refused.items():
                    self._refused_todo.setdefault(symbol, [])[:0] = items
            raise

    def _persist(self, todo: dict[str, tuple[int, datetime, datetime | None]],
                 refused: dict[str, list[tuple[Refused, TradeSource]]], flush_timeout: float | None) -> int:
        timeout = self.flush_timeout if flush_timeout is None else flush_timeout
        if not self.writer.flush(timeout=timeout):  # is everything accepted so far durable?
            raise DatabaseUnavailableError(f"writer did not commit within {timeout}s; resume point not advanced")
        with translate_errors(), connect(self.db_url) as conn, conn.transaction():
            # coverage claims seconds: the symbols' data locks, all symbols in one transaction
            ownership.lock_symbols(conn, [*todo, *refused])
            for symbol, items in refused.items():  # before the resume point that passes them
                self._write_refused(conn, symbol, items)
            advanced = store.advance_sync_status(conn, "trades", [
                (symbol, when, str(to_unix_ns(when)), frontier) for symbol, (frontier, when, _) in todo.items()],
                details={"live": True})
            store.add_coverage_many(conn, "ws", [(symbol, covered_from, when)
                                                 for symbol, (_, when, covered_from) in todo.items()
                                                 if covered_from is not None])
        with self._lock:
            for symbol, (frontier, _, _) in todo.items():
                self._symbols[symbol].persisted = frontier
        return len(advanced)

    @staticmethod
    def _write_refused(conn: Any, symbol: str, items: Iterable[tuple[Refused, TradeSource]]) -> None:
        by_source: dict[TradeSource, list[Refused]] = {}
        for item, source in items:
            by_source.setdefault(source, []).append(item)
        for source, group in by_source.items():
            store.write_refused_trades(conn, symbol, group, source.value)

    # --- state ----------------------------------------------------------------------------

    def stats(self) -> LiveStats:
        with self._lock:
            return LiveStats(
                **self._counts,
                missing_ids=sum(s.seq.missing_ids() for s in self._symbols.values()),
                frontier={k: s.seq.frontier for k, s in self._symbols.items()},
                persisted={k: s.persisted for k, s in self._symbols.items()},
            )

    def open_holes(self) -> dict[str, list[tuple[int | None, int]]]:
        """Missing id ranges per symbol (empty when the stream is whole). A range starting at
        None runs from the first trade at/after the record's anchor, not known yet."""
        with self._lock:
            return {k: s.seq.open_holes() for k, s in self._symbols.items() if s.seq.holes}


class _RecordFactory:
    """Trade → TradeRecord by TradeRecord's own rules, checked inline for the values the
    parsers produce (a canonical symbol, an int id, a UTC datetime, finite Decimals, REST
    letters). The dataclass route costs about 3.4 µs a trade — a third of the reader
    thread's time at 50,000 trades/s — this one about 1.3 µs. Anything else goes through the
    constructor, which converts what it may and raises the ValueError naming the field."""

    def __init__(self) -> None:
        self._symbols: set[str] = set()  # canonical names TradeRecord has accepted

    def __call__(self, trade: Trade, source: TradeSource) -> TradeRecord:
        symbol, when, price, volume = trade.symbol, trade.time, trade.price, trade.volume
        if (
            symbol.__class__ is str and symbol in self._symbols and trade.trade_id.__class__ is int
            and when.__class__ is datetime and when.tzinfo is UTC
            and price.__class__ is Decimal and price.is_finite() and price > 0
            and volume.__class__ is Decimal and volume.is_finite() and volume >= 0
            and trade.side in _SIDES and trade.ord_type in _ORD_TYPES and source.__class__ is TradeSource
        ):
            record = _new_record(TradeRecord)
            _set_field(record, "symbol", symbol)
            _set_field(record, "trade_id", trade.trade_id)
            _set_field(record, "time", when)
            _set_field(record, "price", price)
            _set_field(record, "volume", volume)
            _set_field(record, "side", trade.side)
            _set_field(record, "ord_type", trade.ord_type)
            _set_field(record, "source", source)
            return record
        record = TradeRecord.from_trade(trade, source)  # type: ignore[arg-type]
        if record.symbol == symbol and _INLINE_FIELDS_MATCH:
            self._symbols.add(symbol)
        return record


class _NotYetError(TransientError):
    """REST has not (yet) got the ids we are missing; retried with back-off."""
