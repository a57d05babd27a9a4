"""The writer's two threads: the flush thread, which commits what :meth:`Buffers.next_work`
hands it (and, when the database fails, spills it and retries with back-off), and the
spool-sync thread, which fsyncs the spool tail about once a second.

Each step runs its database work outside the lock and returns its bookkeeping as a function,
run under the lock together with taking the next step: one lock hold per batch (a producer
thread holds the lock often, and each contended acquire gives the GIL away; getting it back
from a busy producer takes a switch interval).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from kraken_hist.rules.backoff import Backoff
from kraken_hist.storage.writer import spool_format, spool_labels
from kraken_hist.storage.writer.batches import Inflight, TradeChunk
from kraken_hist.storage.writer.buffers import Buffers
from kraken_hist.storage.writer.commit import Committer, Unavailable
from kraken_hist.storage.writer.spool import Block, read_blocks
from kraken_hist.storage.writer.sums import sums_size

logger = logging.getLogger(__name__)

#: First wait after the database failed a commit; doubles up to ``max_retry_delay``, half
#: jitter so that writers cut off together do not come back together.
COMMIT_RETRY_BASE = 0.2
_FSYNC_EVERY = 1.0  # seconds: spool tail fsync policy


class FlushLoop:
    """The flush thread's work (:meth:`run` is its target)."""

    def __init__(self, buffers: Buffers, committer: Committer, max_retry_delay: float) -> None:
        self.buffers = buffers
        self.committer = committer
        self.backoff = Backoff(COMMIT_RETRY_BASE, max_retry_delay, jitter="half")
        self.max_retry_delay = max_retry_delay

    def run(self) -> None:
        buffers, committer = self.buffers, self.committer
        attempt = 0
        finish: Callable[[], None] | None = None
        while True:
            with buffers.cond:
                buffers.apply_counts(committer.counts)
                if finish is not None:
                    finish()
                    finish = None
                    buffers.cond.notify_all()
                work = buffers.next_work()
            if work is None:
                return
            kind, payload = work
            try:
                if kind == "memory":
                    finish = self._commit_memory(payload)
                elif kind == "syncs":
                    committer.commit_rows("syncs", payload)
                    finish = self._clear_inflight
                elif kind == "identify":
                    finish = self._identify()
                else:
                    finish = self._replay(payload)
                attempt = 0
                buffers.outage = False
            except Unavailable as exc:
                attempt += 1
                delay = self.backoff.delay(attempt)
                stopping = buffers.state != "running"
                logger.warning("writer: database unavailable (%s); %s", exc,
                               "spooling what is left and stopping" if stopping else f"retrying in {delay:.1f}s",
                               extra={"event": "writer_retry"})
                with buffers.cond:
                    buffers.apply_counts(committer.counts)
                    buffers.stats["errors"] += 1
                    buffers.stats["retries"] += 1
                    buffers.spill_inflight(kind, payload)
                    buffers.outage = True
                    buffers.backoff_until = time.monotonic() + delay
            except Exception:  # noqa: BLE001 - the thread must survive; records stay where they are
                logger.exception("writer: unexpected error in the flush thread", extra={"event": "writer_bug"})
                with buffers.cond:
                    buffers.apply_counts(committer.counts)
                    buffers.stats["errors"] += 1
                    buffers.spill_inflight(kind, payload)
                    buffers.backoff_until = time.monotonic() + self.max_retry_delay

    def _clear_inflight(self) -> None:
        self.buffers.inflight_min = None

    def _commit_memory(self, work: Inflight) -> Callable[[], None]:
        """Commit a batch taken from the buffers: trades, candles, then the sync updates that
        waited for them. What commits is cleared from `work`, so a failure spills the rest."""
        chunk = work.chunk()
        committed = 0.0
        if chunk is not None:
            self.committer.commit_trades(chunk)
            work.trades = None
            committed = time.monotonic()
        self.committer.commit_rows("candles", work.candles)
        self.committer.commit_rows("syncs", work.syncs)
        buffers = self.buffers

        def finish() -> None:
            if chunk is not None and chunk.accepted:
                buffers.latencies.extend(committed - t for t in chunk.accepted)
            buffers.inflight_min = None

        return finish

    def _identify(self) -> Callable[[], None]:
        """Read this writer's database identity (the first step once the database answers);
        the bookkeeping labels the spool, and replays each held spool of this database (moved
        in front of ours) or leaves one of another where it is."""
        buffers = self.buffers
        spool = buffers.spool
        assert spool is not None
        identity = self.committer.identify(buffers.identity.description)
        try:  # only this thread writes the label; appends (under the lock) do not touch it
            spool.write_label(identity)
        except OSError as exc:  # the pending label (our description) still names this database
            logger.error("writer: could not label %s with %s: %s", spool.directory, identity, exc,
                         extra={"event": "writer_spool_label"})

        def finish() -> None:
            buffers.identity = identity
            mine = []
            for held in buffers.held:
                if spool_labels.same_database(held.label, identity):  # type: ignore[arg-type]
                    mine.append(held)
                    continue
                logger.error("writer: %s",
                             spool_labels.foreign_message(held.directory, held.pending, held.label, identity),
                             extra={"event": "writer_spool_foreign"})
                buffers.stats["spool_foreign"] += held.pending
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
            buffers.held = []
            if spool:
                buffers.set_spool_mode(True)

        return finish

    def _replay(self, blocks: list[Block]) -> Callable[[], None]:
        """Commit a group of spooled blocks."""
        buffers = self.buffers
        spool = buffers.spool
        assert spool is not None
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
                    with buffers.cond:
                        buffers.stats["spool_corrupt"] += 1
                        buffers.spooled_sums -= sums_size(block.sums)  # type: ignore[arg-type]
                        spool.done(block)
                        buffers.cond.notify_all()
        if good:
            if kind == spool_format.TRADE:
                self.committer.commit_trades(TradeChunk.from_blocks(good, payloads))
            else:
                rows = [(0, 0.0, row) for payload in payloads for _, row in spool_format.decode_lines(payload)]
                self.committer.commit_rows("candles" if kind == spool_format.CANDLE else "syncs", rows)

        def finish() -> None:
            for block in good:
                buffers.spooled_sums -= sums_size(block.sums)  # type: ignore[arg-type]
                spool.done(block)
                buffers.stats["replayed"] += block.count

        return finish


def fsync_loop(buffers: Buffers, stop: threading.Event) -> None:
    """The spool-sync thread: fsync the spool tail about once a second while it holds
    unsynced blocks (outside the writer's lock)."""
    while not stop.wait(_FSYNC_EVERY):
        with buffers.lock:
            fd = buffers.spool.take_sync_fd() if buffers.spool is not None else None
        if fd is not None:
            try:
                _fsync_close(fd)
            except OSError:
                logger.exception("writer: spool fsync failed", extra={"event": "writer_spool_fsync"})


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
