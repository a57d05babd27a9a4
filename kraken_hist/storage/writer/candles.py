"""The 1-minute candles a flush writes: merged from exact summaries where that is proven
right, rebuilt from the stored trades otherwise, and the explicit candles of ``write_candle``.

On the fast path (a batch of new trades) a touched minute's candle is the merge of the
batch's summary with the summary of what is stored, which the flush thread holds for the last
few minutes (:class:`CandleSums`), so a dense minute is never re-aggregated. Every candle
that changes is noted in ``candle_changes`` for the refresh.
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Iterable, Sequence

import psycopg

from kraken_hist.rules.ranges import number_runs
from kraken_hist.storage import store
from kraken_hist.storage.db import number_array, text_array
from kraken_hist.storage.writer import statements
from kraken_hist.storage.writer.records import minute_number, minute_start
from kraken_hist.storage.writer.statements import pairs_params
from kraken_hist.storage.writer.sums import BatchSums, MinuteSums

MERGE_GAP_MINUTES = 15  # touched minutes closer than this are rebuilt as one window
CACHE_MINUTES = 5  # stored-candle summaries are kept for minutes this close to the newest seen


def minute_windows(minutes: Iterable[int], gap: int = MERGE_GAP_MINUTES) -> list[tuple[datetime, datetime]]:
    """Touched minutes (numbers) → a few [start, end) windows (minutes at most `gap` apart
    joined; gap 1: only consecutive minutes)."""
    return [(minute_start(a), minute_start(b)) for a, b in number_runs(minutes, gap)]


class CandleSums:
    """The flush thread's exact MinuteSums of the stored trades of recent minutes (per symbol,
    the last CACHE_MINUTES behind the newest minute seen), and the proof that one is current.

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
        self.minutes: dict[str, dict[int, MinuteSums]] = {}
        self.newest: dict[str, int] = {}
        self._staged: dict[str, dict[int, MinuteSums | None]] = {}
        self._staged_newest: dict[str, int] = {}

    def begin(self, minutes: dict[str, Iterable[int]]) -> None:
        """Start a transaction touching `minutes` ({symbol: minute numbers})."""
        self._staged = {}
        self._staged_newest = {
            symbol: max(max(touched, default=-1), self.newest.get(symbol, -1)) for symbol, touched in minutes.items()}

    def horizon(self, symbol: str) -> int:
        """Oldest minute worth holding a summary for."""
        return self._staged_newest.get(symbol, self.newest.get(symbol, -1)) - CACHE_MINUTES

    def stage(self, symbol: str, minute: int, sums: MinuteSums | None) -> None:
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
            for minute in [m for m in held if m < newest - CACHE_MINUTES]:
                del held[minute]
        self._staged, self._staged_newest = {}, {}

    def queue_checks(self, conn: psycopg.Connection, batch: BatchSums) -> tuple:
        """Send (in the caller's pipeline) the two queries that prove or refute the held
        summaries of every symbol of the batch."""
        warm: dict[str, dict[int, MinuteSums]] = {}
        asked: tuple[list[str], list[int]] = ([], [])
        cold: tuple[list[str], list[int]] = ([], [])
        for symbol, minutes in batch.items():
            held = self.minutes.get(symbol, {})
            warm[symbol] = {minute: held[minute] for minute in minutes if minute in held}
            for minute in minutes:
                into = asked if minute in held else cold
                into[0].append(symbol)
                into[1].append(minute)
        stored = conn.execute(statements.STORED_CANDLES, pairs_params(*asked)) if asked[0] else None
        occupied = conn.execute(statements.MINUTES_WITH_TRADES, pairs_params(*cold)) if cold[0] else None
        return warm, stored, occupied

    @staticmethod
    def classify(batch: BatchSums, checks: tuple) -> dict[str, tuple[dict[int, MinuteSums], list[int]]]:
        """The batch's minutes → per symbol ({minute: merged MinuteSums} to write
        incrementally, [minutes to rebuild])."""
        warm, stored, occupied = checks
        rows = {(row[0], row[1]): row[2:] for row in stored.fetchall()} if stored is not None else {}
        has_trades = {(row[0], row[1]) for row in occupied.fetchall()} if occupied is not None else set()
        out: dict[str, tuple[dict[int, MinuteSums], list[int]]] = {}
        for symbol, minutes in batch.items():
            held_by_minute = warm.get(symbol, {})
            merged: dict[int, MinuteSums] = {}
            doubtful: list[int] = []
            for minute, part in minutes.items():
                held = held_by_minute.get(minute)
                if held is not None:
                    row = rows.get((symbol, minute))
                    if row is not None and row[0] == "trades" and row[1] == held.trades and row[2] == held.volume:
                        merged[minute] = held.merged(part)
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
        rows = conn.execute(statements.MINUTE_SUMS, {"symbol": symbol, "minutes": number_array(recent)}).fetchall()
        for row in rows:
            self.stage(symbol, minute_number(row[0]), MinuteSums(*row[1:]))
        return len(rows)


def upsert_from_sums(conn: psycopg.Connection, merged: BatchSums, decimals: dict[str, int]) -> None:
    """Write the candles of merged MinuteSums, every symbol in one statement, and note the changes."""
    rows = [(symbol, decimals[symbol], minute, s.first_price, s.high, s.low, s.last_price, s.notional, s.volume,
             s.trades)
            for symbol, by_minute in merged.items() for minute, s in by_minute.items()]
    columns = list(zip(*rows))  # one transposition for every pair's rows
    conn.execute(statements.UPSERT_FROM_SUMS, {
        name: text_array(values) if name == "symbol" else number_array(values)
        for name, values in zip(statements.SUMS_COLUMNS, columns)})
    changed = [(symbol, start, end) for symbol, by_minute in merged.items()
               for start, end in number_runs(by_minute, MERGE_GAP_MINUTES)]
    if changed:
        store.record_candle_minute_changes(conn, *zip(*changed))


def maintain_candles(conn: psycopg.Connection, cache: CandleSums, decimals: Callable[[str], int],
                     minutes: dict[str, Iterable[int]], checks: tuple | None, batch_sums: BatchSums | None,
                     counts: dict[str, int], *, fast: bool) -> None:
    """Bring the candles of the touched `minutes` ({symbol: minutes}) up to date: merged
    from exact sums where the held summary is proven current (every symbol in one
    statement), rebuilt from stored trades otherwise. `decimals`: a pair's price decimals."""
    rebuild: dict[str, list[tuple[datetime, datetime]]] = {}
    if checks is not None and batch_sums is not None:
        plans = cache.classify(batch_sums, checks)
        merged = {symbol: plan[0] for symbol, plan in plans.items() if plan[0]}
        if merged:
            upsert_from_sums(conn, merged, {symbol: decimals(symbol) for symbol in merged})
            cache.stage_merged(merged)
        for symbol, (symbol_merged, doubtful) in plans.items():
            counts["candles_incremental"] += len(symbol_merged)
            counts["candles_fallback"] += len(doubtful)
            if doubtful:  # never re-aggregate a merged (maybe dense) minute
                rebuild[symbol] = minute_windows(doubtful, gap=1)
        doubtful_by_symbol = {symbol: plan[1] for symbol, plan in plans.items() if plan[1]}
    else:
        doubtful_by_symbol = {symbol: list(symbol_minutes) for symbol, symbol_minutes in minutes.items()}
        rebuild = {symbol: minute_windows(doubtful) for symbol, doubtful in doubtful_by_symbol.items()}
        if fast:
            counts["candles_fallback"] += sum(len(doubtful) for doubtful in doubtful_by_symbol.values())
    for symbol, runs in rebuild.items():
        places = decimals(symbol)
        for start, end in runs:
            counts["candles_rebuilt"] += store.rebuild_candles(conn, symbol, start, end, decimals=places)
        counts["candles_seeded"] += cache.seed(conn, symbol, doubtful_by_symbol[symbol])


def store_candles(conn: psycopg.Connection, rows: Sequence[tuple]) -> dict[str, int]:
    """Upsert explicit candle rows (the newest value per bucket wins, in arrival order) and
    note the changed ones."""
    latest: dict[tuple[str, datetime], tuple] = {}
    for row in rows:
        latest.pop((row[0], row[1]), None)
        latest[(row[0], row[1])] = row
    columns = list(zip(*latest.values()))
    changed = conn.execute(statements.UPSERT_CANDLES, [list(column) for column in columns]).fetchall()
    by_symbol: dict[str, list[int]] = {}
    for symbol, when in changed:
        by_symbol.setdefault(symbol, []).append(minute_number(when))
    for symbol, minutes in by_symbol.items():
        for start, end in minute_windows(minutes):
            store.record_candle_change(conn, symbol, start, end)
    return {"candles_written": len(changed), "candles_unchanged": len(rows) - len(changed)}
