"""What waits for the database, shared by the producers and the flush thread under one
condition: the open trade batch, the candle and sync buffers, the spool and its mode, the
sequence numbers that tell what is durable, and the choice of what to commit next.

Memory is bounded: past ``max_trades`` trades (or the writer's MAX_CANDLE_BUFFER_SIZE candles)
waiting for the database, batches go to the local spool as blocks, one write per batch, and
the writer stays in spool mode (new batches are spooled too, keeping their order) until the
flush thread has replayed the spool; then it buffers in memory again. A failed batch is
spilled in front of the spool (it is older than anything spooled).

Every method expects the caller to hold ``lock`` (``cond``'s lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from kraken_hist.storage.writer import spool_format
from kraken_hist.storage.writer.batches import Inflight, OpenBatch, TradeChunk
from kraken_hist.storage.writer.records import BIGINT
from kraken_hist.storage.writer.spool import Block, Spool
from kraken_hist.storage.writer.spool_labels import DatabaseIdentity
from kraken_hist.storage.writer.sums import sums_size

logger = logging.getLogger(__name__)

_SPOOL_BLOCK = 5_000  # trades per spooled block in spool mode (at least trade_buffer_size)
_REPLAY_ROWS = 100_000  # records of consecutive spooled blocks committed in one transaction
_SPOOLED_SUMS_LIMIT = 200_000  # minute summaries kept in memory for spooled blocks (beyond: rebuild)

STAT_NAMES = (
    "trades_accepted", "candles_accepted", "syncs_accepted", "recovered",
    "trades_written", "trades_duplicate", "trades_rejected",
    "candles_written", "candles_unchanged", "candles_rejected",
    "syncs_written", "syncs_rejected",
    "flushes", "errors", "retries", "spooled", "replayed", "spool_corrupt",
    "merge_fallbacks", "candles_rebuilt",
    "candles_incremental", "candles_fallback", "candles_seeded", "spool_foreign",
)


class Buffers:
    """The writer's shared state. Records are numbered (``seq``) as they are accepted; a
    record is durable once every record up to it is committed (:meth:`watermark`)."""

    def __init__(self, trade_buffer_size: int, trade_flush_interval: float, candle_flush_interval: float, *,
                 max_trades: int) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.trade_buffer_size = trade_buffer_size
        self.trade_flush_interval = trade_flush_interval
        self.candle_flush_interval = candle_flush_interval
        self.state = "new"  # new → running → stopping → stopped
        self.abort = False  # stop's timeout passed: spool everything and end the flush thread
        self.seq = 0
        self.open = OpenBatch()
        self.candles: list[tuple] = []  # (seq, accepted_at, row)
        self.syncs: list[tuple] = []
        self.inflight_min: int | None = None  # lowest seq of the batch being committed
        self.flush_target = 0  # the highest seq a flush() waits for
        self.spool: Spool | None = None
        self.spool_mode = False
        # which database this writer writes to (known once the server answered)
        self.identity = DatabaseIdentity("?")
        self.held: list[Spool] = []  # spools found at start, replayed once the identity matches
        self.outage = False  # the flush thread's last attempt found the database unavailable
        # trades in the open batch at which it is handed on: spooled past this many
        self.max_trades = max_trades  # trades waiting in memory at most
        self.block_limit = max_trades
        self.spool_block = min(max_trades, max(trade_buffer_size, _SPOOL_BLOCK))
        self.backoff_until = 0.0
        self.spooled_sums = 0  # minute summaries attached to spooled blocks
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.stats = dict.fromkeys(STAT_NAMES, 0)

    def refuse(self) -> None:
        """Raise: records are accepted only while running."""
        raise RuntimeError(f"writer is {self.state}: call start() first" if self.state == "new"
                           else f"writer is {self.state}")

    def admit(self, counter: str) -> int:
        """Number one more accepted record, counted in `counter`; returns its seq."""
        if self.state != "running":
            self.refuse()
        self.seq += 1
        self.stats[counter] += 1
        return self.seq

    def apply_counts(self, counts: dict[str, int]) -> None:
        """Move the flush thread's counters (kept without the lock) into the stats."""
        if counts:
            for name, value in counts.items():
                self.stats[name] += value
            counts.clear()

    # ------------------------------------------------------------ the spool
    def set_spool_mode(self, on: bool) -> None:
        self.spool_mode = on
        self.block_limit = self.spool_block if on else self.max_trades

    def hand_to_spool(self, reason: str) -> None:
        """The open buffers reached their limit: spool them (entering spool mode)."""
        if not self.spool_mode:
            logger.warning("writer: %s; spooling new records to %s until the database catches up", reason,
                           self.spool.directory if self.spool is not None else "?",
                           extra={"event": "writer_spooling"})
            self.set_spool_mode(True)
        self.seal_open()
        self.cond.notify()

    def seal_open(self) -> None:
        """Append the open trade batch and candle buffer to the spool tail, one block each."""
        spool = self.spool
        assert spool is not None
        batch = self.open
        if batch.lines:
            self.open = OpenBatch()
            payload = "".join(batch.lines).encode()
            block = spool.append(spool_format.TRADE, len(batch.lines), batch.meta(), payload, batch.first_seq)
            sums = batch.sums()
            size = sums_size(sums)
            if size and self.spooled_sums + size <= _SPOOLED_SUMS_LIMIT:  # memory stays bounded
                block.sums = sums
                self.spooled_sums += size
            self.stats["spooled"] += len(batch.lines)
        candles = self.candles
        if candles:
            self.candles = []
            spool.append(spool_format.CANDLE, len(candles), {}, _candle_payload(candles), candles[0][0])
            self.stats["spooled"] += len(candles)

    def spool_syncs(self, syncs: list[tuple]) -> None:
        if syncs:
            assert self.spool is not None
            payload = spool_format.encode_lines([spool_format.encode_sync(e[2]) for e in syncs])
            self.spool.append(spool_format.SYNC, len(syncs), {}, payload, syncs[0][0])
            self.stats["spooled"] += len(syncs)

    def spill(self, chunk: TradeChunk | None, candles: list[tuple], syncs: list[tuple]) -> None:
        """The database failed: put the batch in flight in front of the spool (it is older
        than anything spooled), the open buffers at its tail, and every waiting sync status
        after them; spool new records until the database answers again."""
        assert self.spool is not None
        blocks: list[tuple[str, int, dict, bytes, int]] = []
        if chunk is not None and chunk.count:
            blocks.append((spool_format.TRADE, chunk.count, chunk.meta, chunk.payload, chunk.first_seq))
        if candles:
            blocks.append((spool_format.CANDLE, len(candles), {}, _candle_payload(candles), candles[0][0]))
        self.stats["spooled"] += self.spool.prepend(blocks)
        self.inflight_min = None
        if not self.spool_mode:
            logger.warning("writer: database unavailable; spooling new records to %s", self.spool.directory,
                           extra={"event": "writer_spooling"})
            self.set_spool_mode(True)
        self.seal_open()
        waiting = sorted(syncs + self.syncs, key=lambda e: e[0])
        self.syncs = []
        self.spool_syncs(waiting)
        self.cond.notify_all()

    def spill_inflight(self, kind: str, payload: Any) -> None:
        """:meth:`spill` what :meth:`next_work` handed out as (`kind`, `payload`)."""
        if kind == "memory":
            self.spill(payload.chunk(), payload.candles, payload.syncs)
        elif kind == "syncs":
            self.spill(None, [], payload)
        elif kind == "identify":  # the database is away: spool mode, as for a failed batch
            self.spill(None, [], [])

    def replay_group(self) -> list[Block]:
        """The first pending spooled block and the following ones of the same kind, up to
        _REPLAY_ROWS records: one transaction."""
        assert self.spool is not None
        group: list[Block] = []
        rows = 0
        for block in self.spool.blocks():
            if group and (block.kind != group[0].kind or block.segment is not group[0].segment
                          or rows + block.count > _REPLAY_ROWS):
                break
            group.append(block)
            rows += block.count
        return group

    # ------------------------------------------------------------ durability
    def watermark(self) -> int:
        """Highest seq such that every record up to it is committed (or rejected)."""
        low = self.seq + 1
        if self.open.lines:
            low = self.open.first_seq
        for buffer in (self.candles, self.syncs):
            if buffer:
                low = min(low, buffer[0][0])
        if self.inflight_min is not None:
            low = min(low, self.inflight_min)
        return min(low, self.spooled_low()) - 1

    def spooled_low(self) -> int:
        """Lowest seq pending in the spool or in a held spool (a large number if none)."""
        low = BIGINT
        for spool in (self.spool, *self.held):
            first = spool.first() if spool is not None else None
            if first is not None:
                low = min(low, first.first_seq)
        return low

    def eligible_syncs(self) -> list[tuple]:
        """Take the queued sync updates whose predecessors are all committed (or in the batch
        being taken)."""
        if not self.syncs:
            return []
        low = self.seq + 1
        if self.open.lines:
            low = self.open.first_seq
        if self.candles:
            low = min(low, self.candles[0][0])
        low = min(low, self.spooled_low())
        count = 0
        while count < len(self.syncs) and self.syncs[count][0] < low:
            count += 1
        eligible = self.syncs[:count]
        del self.syncs[:count]
        return eligible

    # ------------------------------------------------------------ what the flush thread does next
    def next_work(self) -> tuple[str, Any] | None:
        """Wait (releasing the lock) until there is something to do, and say what: identify
        the database, commit sync statuses, replay spooled blocks, or commit a batch taken from
        memory ("memory", Inflight). None: the flush thread is done (everything is committed
        or spooled)."""
        while True:
            now = time.monotonic()
            spool = self.spool
            assert spool is not None
            if self.abort or (self.outage and self.state == "stopping"):
                # stopping without a database (or past stop's timeout): everything to the spool
                self.spill(None, [], [])
                spool.close_tail()
                return None
            open_trades, candles = self.open, self.candles
            if self.spool_mode and (
                (open_trades.lines and now - open_trades.started >= self.trade_flush_interval)
                or (candles and now - candles[0][1] >= self.candle_flush_interval)
            ):
                self.seal_open()  # spool mode: aged records go to the spool, in order
                continue
            deadlines = []
            if open_trades.lines:
                deadlines.append(open_trades.started + self.trade_flush_interval)
            if candles:
                deadlines.append(candles[0][1] + self.candle_flush_interval)
            if now < self.backoff_until:
                self.cond.wait(min([self.backoff_until, *deadlines]) - now)
                continue
            if not self.identity.known and (self.held or self.state == "running" or open_trades.lines
                                            or candles or self.syncs or spool):
                return "identify", None  # before anything is committed: whose database is this?
            eligible = self.eligible_syncs()
            if eligible:  # before later spooled sync statuses
                self.inflight_min = eligible[0][0]
                return "syncs", eligible
            if spool.first() is not None:
                return "spool", self.replay_group()
            if self.spool_mode:
                self.set_spool_mode(False)
                logger.info("writer: spool drained; back to buffering in memory", extra={"event": "writer_spool_drained"})
                self.cond.notify_all()
            urgent = self.state == "stopping" or self.flush_target > self.watermark()
            take_trades = bool(open_trades.lines) and (
                urgent or len(open_trades.lines) >= self.trade_buffer_size
                or now - open_trades.started >= self.trade_flush_interval
            )
            take_candles = bool(candles) and (urgent or now - candles[0][1] >= self.candle_flush_interval)
            if take_trades or take_candles:
                batch: OpenBatch | None = None
                taken: list[tuple] = []
                if take_trades:
                    batch, self.open = open_trades, OpenBatch()
                if take_candles:
                    taken, self.candles = candles, []
                self.inflight_min = min(
                    ([batch.first_seq] if batch is not None else []) + ([taken[0][0]] if taken else []))
                return "memory", Inflight(batch, taken, self.eligible_syncs())
            if self.state == "stopping" and not (open_trades.lines or candles or self.syncs or spool):
                spool.close_tail()
                return None
            self.cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)


def _candle_payload(candles: list[tuple]) -> bytes:
    return spool_format.encode_lines([spool_format.encode_candle(e[2]) for e in candles])
