"""Hand trades to the writer in id order, each id once: the live stream's continuity step.

WebSocket messages and REST catch-up pages both come here. Per symbol the trades are placed in
its :class:`~kraken_hist.ingest.live.ids.IdSequence` under the shared lock: replays and overlap
are dropped by id, a jump opens a hole (and wakes the REST catch-up), a refused trade takes its
place without being written. The common case — a message continuing the sequence — skips the
per-id bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from kraken_hist.core.bounds import trade_id_problem
from kraken_hist.core.types import Refused, TradeSource
from kraken_hist.ingest.live.ids import NEW, OLD, OPENED, Hole, IdSequence
from kraken_hist.ingest.live.records import LiveState, RecordFactory, RefusedTrade, Symbol, Trade, TradeWriter

logger = logging.getLogger("kraken_hist.ingest.live")
_trade_id = attrgetter("trade_id")


class TradeHandover:
    """Places trades in their symbol's id sequence and writes the new ones (see the module
    docstring). `normalize` turns a pair name a refused item carries into our canonical one;
    `name` prefixes log lines."""

    def __init__(self, state: LiveState, writer: TradeWriter, *, normalize: Callable[[str], str], name: str) -> None:
        self._state = state
        self.writer = writer
        self._normalize = normalize
        self.name = name
        self._record = RecordFactory()

    def accept(self, trades: Iterable[Trade], source: TradeSource, fixes_start: bool = False) -> int:
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
            with self._state.work:
                state = self._state.symbols.get(symbol)
                if state is None:
                    state = self._state.symbols[symbol] = Symbol(self._state.new_sequence())
                seq = state.seq
                top = seq.max_seen
                first = group[0].trade_id
                if (top is not None and first == top + 1 and group[-1].trade_id - first == len(group) - 1
                        and not (fixes_start and seq.pending)):
                    fresh += self._append_run(seq, group, source, counter)
                else:
                    fresh += self._accept_each(seq, group, source, counter, fixes_start)
        return fresh

    def with_refused(self, trades: Iterable[Trade], refused: Iterable[Refused], symbol: str | None) -> list[Any]:
        """`trades` and the refused items with a valid id, placed in time: their own time when it
        is possible, else the time of the trade just before them (so a REST fetch from there
        starts early enough), else they are left out (a later REST page places them)."""
        batch: list[Any] = list(trades)
        extra = []
        for item in refused:
            if item.trade_id is None or trade_id_problem(item.trade_id) is not None:
                continue
            try:
                name = self._normalize(item.symbol) if item.symbol else symbol
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
                    with self._state.lock:
                        state = self._state.symbols.get(name)
                        when = state.seq.max_seen_time if state is not None else None
            if when is not None:
                extra.append(RefusedTrade(name, item.trade_id, when, item))
        return batch + extra if extra else batch

    def _note_refused(self, trade: "RefusedTrade", source: TradeSource) -> None:
        """A refused trade took its place in the sequence: record it with the next progress step."""
        self._state.refused_todo.setdefault(trade.symbol, []).append((trade.refused, source))
        self._state.counts["refused"] += 1

    def _append_run(self, seq: IdSequence, run: list[Trade], source: TradeSource, counter: str) -> int:
        """Hand over ids ``max_seen + 1 ..`` with no gap (caller holds the lock); ``max_seen``
        follows the last one handed over, even if the writer fails midway."""
        record, write = self._record, self.writer.write_trade
        handed = None
        written = 0
        try:
            for trade in run:
                if trade.__class__ is RefusedTrade:
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
            self._state.counts[counter] += written
        return written

    def _accept_each(self, seq: IdSequence, group: list[Trade], source: TradeSource, counter: str,
                     fixes_start: bool) -> int:
        """Place each trade in the sequence; hand over the new ones (caller holds the lock). If
        the writer fails midway, only what it took is accounted for: the rest is fetched again."""
        record, write, counts = self._record, self.writer.write_trade, self._state.counts
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
                    if trade.__class__ is RefusedTrade:
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
            state = self._state.symbols[group[0].symbol]
            state.seq = seq = saved
            for trade in group[:placed]:
                seq.accept(trade.trade_id, trade.time, fixes_start)
            raise
        finally:
            counts[counter] += written
            if opened:
                self._state.work.notify_all()
        return written

    def _opened(self, symbol: str, hole: Hole) -> None:
        if hole.lo is None:  # where the record starts: not a loss, the trades before the first one we saw
            logger.info("%s: %s trades from %s up to id %d: fetching them by REST",
                        self.name, symbol, hole.after.isoformat(), hole.hi)
            return
        self._state.counts["holes_opened"] += 1
        logger.warning("%s: %s trade ids %d..%d missing; fetching them by REST", self.name, symbol, hole.lo, hole.hi)

    def _refused(self, trade: Trade, exc: ValueError) -> None:
        self._state.counts["rejected"] += 1
        logger.error("%s: trade refused (%s): %r", self.name, exc, trade)
