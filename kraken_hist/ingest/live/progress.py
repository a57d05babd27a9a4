"""The live stream's durable progress: write down only what the writer has made durable.

Once the writer has committed everything handed to it, ``sync_status(symbol, 'trades')`` and
coverage ``'ws'`` advance to each record's contiguous frontier — never past a hole, never while
a record's first id is unknown — and the refused trades placed since are recorded, all symbols
in one transaction. A crash at any moment therefore resumes from a correct point.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from kraken_hist.core.errors import DatabaseUnavailableError, KrakenHistError
from kraken_hist.core.timeutils import to_unix_ns
from kraken_hist.core.types import Refused, TradeSource
from kraken_hist.ingest.live.records import LiveState, TradeWriter
from kraken_hist.storage import ownership, store
from kraken_hist.storage.db import connect, translate_errors

logger = logging.getLogger("kraken_hist.ingest.live")


class ProgressRecorder:
    """Advances the stored resume points of `state`'s symbols in `db_url` after `writer` has
    flushed (waiting up to `flush_timeout` seconds for it); every `interval` seconds from
    :meth:`run` until `stop` is set."""

    def __init__(self, state: LiveState, writer: TradeWriter, db_url: str, stop: threading.Event, *,
                 interval: float, flush_timeout: float, name: str) -> None:
        self._state = state
        self.writer = writer
        self.db_url = db_url
        self._stop = stop
        self.interval = interval
        self.flush_timeout = flush_timeout
        self.name = name

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.persist_progress()
            except KrakenHistError as exc:
                logger.warning("%s: could not record progress (%s); will retry", self.name, exc)

    def persist_progress(self, flush_timeout: float | None = None) -> int:
        """Flush the writer, then advance sync_status and coverage 'ws' of every symbol whose
        contiguous frontier moved (never while a record's first id is not known yet). Returns
        how many symbols advanced."""
        todo: dict[str, tuple[int, datetime, datetime | None]] = {}
        with self._state.lock:
            for symbol, state in self._state.symbols.items():
                seq = state.seq
                frontier, when = seq.frontier, seq.frontier_time
                if frontier is not None and when is not None and frontier >= 0 and frontier != state.persisted:
                    todo[symbol] = (frontier, when, seq.covered_from)
            refused, self._state.refused_todo = self._state.refused_todo, {}
        if not todo and not refused:
            return 0
        try:
            return self._persist(todo, refused, flush_timeout)
        except BaseException:
            with self._state.lock:  # recorded next time
                for symbol, items in refused.items():
                    self._state.refused_todo.setdefault(symbol, [])[:0] = items
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
        with self._state.lock:
            for symbol, (frontier, _, _) in todo.items():
                self._state.symbols[symbol].persisted = frontier
        return len(advanced)

    @staticmethod
    def _write_refused(conn: Any, symbol: str, items: Iterable[tuple[Refused, TradeSource]]) -> None:
        by_source: dict[TradeSource, list[Refused]] = {}
        for item, source in items:
            by_source.setdefault(source, []).append(item)
        for source, group in by_source.items():
            store.write_refused_trades(conn, symbol, group, source.value)
