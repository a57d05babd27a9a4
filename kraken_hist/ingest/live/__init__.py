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

The rooms: ``ids`` (the pure id sequence), ``handover`` (trades → writer in id
order), ``catchup`` (the REST thread), ``progress`` (durable progress),
``records`` (what they share); this module wires them to the WebSocket client's callbacks.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any, Iterable

from kraken_hist.core.errors import ExchangePermanentError, KrakenHistError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.types import CandleRecord, CandleSource, TradeSource
from kraken_hist.ingest.live.catchup import MAX_IDLE_PAGES, NotYetError, RestCatchUp
from kraken_hist.ingest.live.handover import TradeHandover
from kraken_hist.ingest.live.ids import EARLY, NEW, OLD, OPENED, REST_MARGIN_NS, Fetch, Hole, IdSequence
from kraken_hist.ingest.live.progress import ProgressRecorder
from kraken_hist.ingest.live.records import (
    LiveState,
    LiveStats,
    RestTrades,
    Symbol,
    Trade,
    TradesFetcher,
    TradeWriter,
)
from kraken_hist.kraken.ws_parsing import OhlcMessage, TradeMessage
from kraken_hist.storage import store
from kraken_hist.storage.db import connect
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry

__all__ = [  # the names used from outside, importable from here as before the split
    "EARLY", "MAX_IDLE_PAGES", "NEW", "OLD", "OPENED", "REST_MARGIN_NS", "Fetch", "Hole", "IdSequence",
    "LiveStats", "NotYetError", "RestTrades", "Trade", "TradeWriter", "TradesFetcher", "WebSocketDBIntegration",
]

logger = logging.getLogger(__name__)


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
        self._state = LiveState(self._new_sequence)
        self._symbols = self._state.symbols  # (the same dict and lock as the parts below use)
        self._lock = self._state.lock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._initial = list(symbols)  # normalized at start, once the database's pairs are known
        self._handover = TradeHandover(self._state, writer, normalize=lambda pair: self.registry.normalize(pair),
                                       name=name)
        self._catchup = (None if rest is None else RestCatchUp(
            self._state, self._handover, rest, self._stop, pages_per_turn=pages_per_turn, retry_cap=retry_cap,
            name=name))
        self._progress = ProgressRecorder(self._state, writer, db_url, self._stop, interval=progress_interval,
                                          flush_timeout=flush_timeout, name=name)

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
        targets = [(f"{self.name}-progress", self._progress.run)]
        if self._catchup is not None:
            targets.append((f"{self.name}-catchup", self._catchup.run))
        for thread_name, target in targets:
            thread = threading.Thread(target=target, name=thread_name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads, then record durable progress one last time (flushes the writer).
        Holes still open stay open in the database's view: the next run fetches them."""
        self._stop.set()
        with self._state.work:
            self._state.work.notify_all()
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
                        self._symbols[symbol] = Symbol(seq, persisted=persisted)
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
        with self._state.work:
            self._connections = number
            if number > 1:
                for state in self._symbols.values():
                    state.seq.request_tail()
                self._state.work.notify_all()

    def on_error(self, error: KrakenHistError) -> None:
        """Errors are logged by the client; a refused symbol has no stream to check."""
        if isinstance(error, ExchangePermanentError):
            logger.error("%s: %s", self.name, error)

    def on_trade(self, message: TradeMessage) -> None:
        """Hand new trades to the writer; drop replays; open holes on jumps; place refused items."""
        handover = self._handover
        handover.accept(handover.with_refused(message.trades, message.refused, None), TradeSource.WEBSOCKET)

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
                self._state.counts["candles_skipped"] += 1
                continue
            try:
                record = CandleRecord(
                    symbol=candle.symbol, time=candle.time, open=candle.open, high=candle.high,
                    low=candle.low, close=candle.close, volume=candle.volume, vwap=candle.vwap,
                    trades=candle.trades, source=CandleSource.WS_OHLC,
                )
            except ValueError as exc:
                self._state.counts["rejected"] += 1
                logger.warning("%s: ohlc candle refused (%s): %r", self.name, exc, candle)
                continue
            self.writer.write_candle(record)
            self._state.counts["candles"] += 1

    # --- durable progress -----------------------------------------------------------------

    def persist_progress(self, flush_timeout: float | None = None) -> int:
        """Flush the writer, then advance sync_status and coverage 'ws' of every symbol whose
        contiguous frontier moved (never while a record's first id is not known yet). Returns
        how many symbols advanced."""
        return self._progress.persist_progress(flush_timeout)

    # --- state ----------------------------------------------------------------------------

    def stats(self) -> LiveStats:
        with self._lock:
            return LiveStats(
                **self._state.counts,
                missing_ids=sum(s.seq.missing_ids() for s in self._symbols.values()),
                frontier={k: s.seq.frontier for k, s in self._symbols.items()},
                persisted={k: s.persisted for k, s in self._symbols.items()},
            )

    def open_holes(self) -> dict[str, list[tuple[int | None, int]]]:
        """Missing id ranges per symbol (empty when the stream is whole). A range starting at
        None runs from the first trade at/after the record's anchor, not known yet."""
        with self._lock:
            return {k: s.seq.open_holes() for k, s in self._symbols.items() if s.seq.holes}

