"""One pace for every REST call of a process, and a process-wide pause after a throttle answer.

Kraken limits public calls per IP (KRAKEN.md): about one call per second stays within it,
and once throttled, calls keep failing for a few seconds, longer if you keep calling. So all
threads share one limiter that hands out call slots ``min_interval`` apart, and a throttle
answer blocks **every** thread for a back-off that grows with each throttle in a row (capped)
and resets after a call gets through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterStats:
    calls: int
    throttles: int
    waited_seconds: float
    blocked_until_in: float  # seconds until the current block ends (0 when not blocked)


class RateLimiter:
    """Thread-safe pacing: ``acquire()`` before each call, ``throttled()`` after a throttle
    answer, ``succeeded()`` after a call that got through."""

    def __init__(
        self,
        min_interval: float = 1.0,
        *,
        backoff_initial: float = 2.0,
        backoff_factor: float = 2.0,
        backoff_max: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if min_interval < 0 or backoff_initial < 0 or backoff_max < backoff_initial or backoff_factor < 1:
            raise ValueError("intervals must be non-negative, backoff_max >= backoff_initial, factor >= 1")
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._min_interval = float(min_interval)
        self.backoff_initial = float(backoff_initial)
        self.backoff_factor = float(backoff_factor)
        self.backoff_max = float(backoff_max)
        self._next_slot = 0.0
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

    def acquire(self) -> float:
        """Wait for this caller's slot (slots are ``min_interval`` apart across all threads and
        never inside a throttle block); returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                slot = max(now, self._next_slot, self._blocked_until)
                self._next_slot = slot + self._min_interval
            delay = slot - now
            if delay > 0:
                self._sleep(delay)
                waited += delay
            with self._lock:
                # a throttle answer seen by another thread while we slept moves our slot too
                if self._clock() >= self._blocked_until:
                    self._calls += 1
                    self._waited += waited
                    return waited

    def throttled(self) -> float:
        """Record a throttle answer: block every thread for the current back-off (which then
        grows, up to ``backoff_max``); returns the block length in seconds."""
        with self._lock:
            block = min(self.backoff_max, self.backoff_initial * self.backoff_factor**self._streak)
            self._streak += 1
            self._throttles += 1
            until = self._clock() + block
            self._blocked_until = max(self._blocked_until, until)
            self._next_slot = max(self._next_slot, self._blocked_until)
        logger.warning("Kraken throttled us; pausing all REST calls for %.1f s (throttle #%d in a row)",
                       block, self._streak)
        return block

    def succeeded(self) -> None:
        """A call got through: the next throttle starts the back-off from the beginning."""
        with self._lock:
            self._streak = 0

    def reset(self) -> None:
        """Forget blocks, slots and counters (tests, or after reconfiguring)."""
        with self._lock:
            self._next_slot = 0.0
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


_process_lock = threading.Lock()
_process_limiter: RateLimiter | None = None


def process_limiter(min_interval: float | None = None) -> RateLimiter:
    """The limiter shared by every REST client of this process, created on first use.

    Passing `min_interval` sets the shared pace (the latest setting wins: it comes from the
    one Settings object of the process).
    """
    global _process_limiter
    with _process_lock:
        if _process_limiter is None:
            _process_limiter = RateLimiter(1.0 if min_interval is None else min_interval)
        elif min_interval is not None and min_interval != _process_limiter.min_interval:
            logger.debug("process REST pace changed from %.3f s to %.3f s",
                         _process_limiter.min_interval, min_interval)
            _process_limiter.min_interval = min_interval
        return _process_limiter
