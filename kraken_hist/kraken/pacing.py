"""The pace of REST calls held in memory: slots ``min_interval`` apart across every thread of a
process, ``pair_interval`` apart for one pair, and a pause for everyone after a throttle answer.

Kraken limits public calls per IP, and Trades/OHLC also per pair (KRAKEN.md): about one call
per second stays within it, and once throttled, calls keep failing for a few seconds, longer if
you keep calling. :class:`RateLimiter` keeps that rule for one process; the Redis-shared twin
(``kraken_hist.kraken.redis_limiter``) keeps it for every process behind one egress IP, placing
slots with the same rule (:func:`place_slot`).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kraken_hist.ops import metrics
from kraken_hist.rules.backoff import Backoff

logger = logging.getLogger("kraken_hist.kraken.ratelimit")  # one logger for the rate limit, whichever limiter


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterStats:
    calls: int
    throttles: int
    waited_seconds: float
    blocked_until_in: float  # seconds until the current block ends (0 when not blocked)


class Limiter(Protocol):
    """What a REST client needs: ``acquire`` before each call, ``throttled`` after a throttle
    answer, ``succeeded`` after a call that got through. `pair` is the canonical symbol of a
    Trades/OHLC call (limited per pair too), None for other endpoints."""

    def acquire(self, pair: str | None = None) -> float: ...

    def throttled(self, pair: str | None = None) -> float: ...

    def succeeded(self, pair: str | None = None) -> None: ...

    def stats(self) -> LimiterStats: ...


def check_intervals(min_interval: float, pair_interval: float | None, backoff_initial: float,
                    backoff_factor: float, backoff_max: float) -> None:
    """Refuse a pace no limiter can keep (both limiters take the same settings)."""
    if min_interval < 0 or (pair_interval is not None and pair_interval < 0) or backoff_initial < 0 \
            or backoff_max < backoff_initial or backoff_factor < 1:
        raise ValueError("intervals must be non-negative, backoff_max >= backoff_initial, factor >= 1")


def place_slot(reserved: list[float], earliest: float, now: float, gap: float) -> float:
    """Reserve and return the first slot at or after `earliest` that lies at least `gap` away
    from every slot in `reserved` (ascending; updated in place, slots before ``now - gap``
    dropped). A caller waiting for a pair's slot so never holds up callers of other pairs.
    The Redis limiter's script does the same."""
    del reserved[: bisect.bisect_left(reserved, now - gap)]
    slot = earliest
    if gap > 0:
        for other in reserved[bisect.bisect_right(reserved, slot - gap):]:
            if other - slot >= gap:
                break
            slot = max(slot, other + gap)
    bisect.insort(reserved, slot)
    return slot


class RateLimiter:
    """In-process, thread-safe pacing (see the module docstring)."""

    def __init__(
        self,
        min_interval: float = 1.0,
        *,
        pair_interval: float | None = None,
        backoff_initial: float = 2.0,
        backoff_factor: float = 2.0,
        backoff_max: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        check_intervals(min_interval, pair_interval, backoff_initial, backoff_factor, backoff_max)
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._min_interval = float(min_interval)
        self._pair_interval = None if pair_interval is None else float(pair_interval)
        self.backoff_initial = float(backoff_initial)
        self.backoff_factor = float(backoff_factor)
        self.backoff_max = float(backoff_max)
        self._reserved: list[float] = []  # slots given out, ascending (recent and future ones)
        self._next_pair_slot: dict[str, float] = {}
        self._blocked_until = 0.0
        self._streak = 0
        self._calls = 0
        self._throttles = 0
        self._waited = 0.0

    @property
    def min_interval(self) -> float:
        return self._min_interval

    @min_interval.setter
    def min_interval(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"min_interval must not be negative, got {value}")
        with self._lock:
            self._min_interval = float(value)

    @property
    def pair_interval(self) -> float:
        """Seconds between calls of one pair (``min_interval`` unless set)."""
        return self._min_interval if self._pair_interval is None else self._pair_interval

    @pair_interval.setter
    def pair_interval(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"pair_interval must not be negative, got {value}")
        with self._lock:
            self._pair_interval = None if value is None else float(value)

    def acquire(self, pair: str | None = None) -> float:
        """Wait for this caller's slot (slots are ``min_interval`` apart across all threads,
        ``pair_interval`` apart for one pair, and never inside a throttle block); returns the
        seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                slot = max(now, self._blocked_until)
                if pair is not None:
                    slot = max(slot, self._next_pair_slot.get(pair, 0.0))
                slot = place_slot(self._reserved, slot, now, self._min_interval)
                if pair is not None:
                    self._next_pair_slot[pair] = slot + self.pair_interval
            delay = slot - now
            if delay > 0:
                self._sleep(delay)
                waited += delay
            with self._lock:
                # a throttle answer seen by another thread while we slept moves our slot too
                if self._clock() >= self._blocked_until:
                    self._calls += 1
                    self._waited += waited
                    break
        metrics.rest_wait(waited)
        return waited

    def throttled(self, pair: str | None = None) -> float:
        """Record a throttle answer: block every thread for the current back-off (which then
        grows, up to ``backoff_max``); returns the block length in seconds."""
        with self._lock:
            self._streak += 1
            block = Backoff(self.backoff_initial, self.backoff_max, self.backoff_factor).delay(self._streak)
            self._throttles += 1
            until = self._clock() + block
            self._blocked_until = max(self._blocked_until, until)
        logger.warning("Kraken throttled us; pausing all REST calls for %.1f s (throttle #%d in a row)",
                       block, self._streak, extra={"event": "rest_throttled"})
        return block

    def succeeded(self, pair: str | None = None) -> None:
        """A call got through: the next throttle starts the back-off from the beginning."""
        with self._lock:
            self._streak = 0

    def reset(self) -> None:
        """Forget blocks, slots and counters (tests, or after reconfiguring)."""
        with self._lock:
            self._reserved.clear()
            self._next_pair_slot.clear()
            self._blocked_until = 0.0
            self._streak = 0
            self._calls = self._throttles = 0
            self._waited = 0.0

    def stats(self) -> LimiterStats:
        with self._lock:
            return LimiterStats(
                calls=self._calls,
                throttles=self._throttles,
                waited_seconds=self._waited,
                blocked_until_in=max(0.0, self._blocked_until - self._clock()),
            )
