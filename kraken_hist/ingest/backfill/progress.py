"""What a backfill run reports: a progress event per stored page, log lines with an ETA, and
the result of the run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

logger = logging.getLogger("kraken_hist.ingest.backfill")

LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillProgress:
    """Handed to the progress callback after each stored page."""

    symbol: str
    pages: int
    trades: int
    position: datetime | None  # time of the newest trade stored so far in this phase
    start: datetime | None
    target: datetime | None  # until, or the time the run started ("now")
    phase: str  # "forward" or "backward"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillResult:
    symbol: str
    pages: int
    trades_fetched: int
    trades_stored: int
    repairs: int
    backward_windows: int
    first_time: datetime | None
    last_time: datetime | None
    last_trade_id: int | None
    caught_up: bool
    reached_until: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("first_time", "last_time"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


class Tally:
    """Counters of one backfill_symbol run, across phases."""

    def __init__(self) -> None:
        self.pages = self.fetched = self.stored = self.repairs = 0
        self.first_time: datetime | None = None
        self.last_time: datetime | None = None
        self.last_id: int | None = None
        self.caught_up = False
        self.reached_until = False


class ProgressLog:
    """Progress as log lines every LOG_EVERY_SECONDS: pages, trades, trades/s, position, ETA."""

    def __init__(self, symbol: str, phase: str, start: datetime | None, target: datetime | None) -> None:
        self.symbol, self.phase = symbol, phase
        self.start, self.target = start, target
        self.began = time.monotonic()
        self.logged = self.began
        self.first_position: datetime | None = None

    def page(self, pages: int, trades: int, position: datetime | None) -> None:
        if position is not None and self.first_position is None:
            self.first_position = self.start if self.start is not None and self.start <= position else position
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY_SECONDS:
            self.logged = now
            self._log(pages, trades, position, now)

    def done(self, pages: int, trades: int, position: datetime | None) -> None:
        if pages:
            self._log(pages, trades, position, time.monotonic())

    def _log(self, pages: int, trades: int, position: datetime | None, now: float) -> None:
        elapsed = max(now - self.began, 1e-9)
        eta = "-"
        if position is not None and self.first_position is not None and self.target is not None:
            done = (position - self.first_position).total_seconds()
            left = (self.target - position).total_seconds()
            if done > 0 and left > 0:
                eta = str(timedelta(seconds=round(left / (done / elapsed))))
            elif left <= 0:
                eta = "0:00:00"
        logger.info(
            "%s %s backfill: %d pages, %d trades, %.0f trades/s, at %s, ETA %s",
            self.symbol, self.phase, pages, trades, trades / elapsed,
            position.isoformat() if position else "-", eta,
        )
