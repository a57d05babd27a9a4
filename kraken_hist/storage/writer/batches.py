"""Batches of accepted trades on their way to the database.

An :class:`OpenBatch` grows under the writer's lock (one appended line per trade); the flush
thread hands it on as a :class:`TradeChunk`, the unit committed in one transaction, whether
it comes from memory, from spooled blocks or from a bisection.
"""

from __future__ import annotations

from datetime import datetime

from kraken_hist.storage.writer.records import minute_number
from kraken_hist.storage.writer.spool import Block
from kraken_hist.storage.writer.sums import BatchSums, MinuteSums


class OpenBatch:
    """Trades accepted and not yet handed on: their COPY lines, and per symbol the ids (for
    in-batch dedupe) and touched minutes (with each minute's MinuteSums when building
    candles, else None)."""

    __slots__ = ("lines", "symbols", "accepted", "first_seq", "started")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.symbols: dict[str, tuple[set[int], dict[int, MinuteSums | None]]] = {}  # symbol → (ids, minutes)
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


class TradeChunk:
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
    def from_batch(cls, batch: OpenBatch) -> "TradeChunk":
        return cls("".join(batch.lines).encode(), len(batch.lines), batch.meta(), first_seq=batch.first_seq,
                   accepted=batch.accepted, sums=batch.sums())

    @classmethod
    def from_lines(cls, lines: list[bytes]) -> "TradeChunk":
        """Rebuild the metadata from the lines themselves (bisection: a rare path)."""
        ids: dict[str, list[int]] = {}
        minutes: dict[str, set[int]] = {}
        for line in lines:
            symbol, trade_id, when, _ = line.split(b"\t", 3)
            key = symbol.decode()
            ids.setdefault(key, []).append(int(trade_id))
            minutes.setdefault(key, set()).add(minute_number(datetime.fromisoformat(when.decode())))
        meta = {s: [min(v), max(v), sorted(minutes[s])] for s, v in ids.items()}
        return cls(b"".join(lines), len(lines), meta, overlap=True)

    @classmethod
    def from_blocks(cls, blocks: list[Block], payloads: list[bytes]) -> "TradeChunk":
        """Consecutive spooled trade blocks as one chunk (their summaries merged when every
        block has them and no two blocks' id ranges overlap)."""
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
                        into[minute] = part if held is None else held.merged(part)
        return cls(b"".join(payloads), sum(b.count for b in blocks),
                   {s: [m[0], m[1], sorted(m[2])] for s, m in meta.items()}, overlap=overlap, sums=sums)


class Inflight:
    """A batch taken from the buffers by the flush thread; the trade chunk is built outside
    the lock, once."""

    __slots__ = ("trades", "_chunk", "candles", "syncs")

    def __init__(self, trades: OpenBatch | None, candles: list[tuple], syncs: list[tuple]) -> None:
        self.trades = trades
        self._chunk: TradeChunk | None = None
        self.candles = candles
        self.syncs = syncs

    def chunk(self) -> TradeChunk | None:
        if self.trades is None:
            return None
        if self._chunk is None:
            self._chunk = TradeChunk.from_batch(self.trades)
        return self._chunk
