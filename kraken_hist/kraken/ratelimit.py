"""One pace for every REST call, and a pause for everyone after a throttle answer.

Kraken limits public calls per IP, and Trades/OHLC also per pair (KRAKEN.md): about one
call per second stays within it, and once throttled, calls keep failing for a few seconds,
longer if you keep calling. So every call takes a *slot*: slots of one egress IP are
``min_interval`` apart, slots of one pair ``pair_interval`` apart, and a throttle answer
blocks every caller of that IP for a back-off that grows with each throttle in a row (capped)
and resets after a call gets through.

Two limiters keep that rule:

- :class:`RateLimiter` (``pacing``) holds the slots in memory: every thread of one process
  shares it (:func:`process_limiter`). Enough for one process on a laptop.
- :class:`RedisRateLimiter` (``redis_limiter``) holds them in Redis, so every process on every
  machine that shares an egress IP (the ``egress_id`` setting) shares one limit and one back-off.

:func:`limiter_for` picks one from the settings. Services and clients take the limiter as an
argument (``limiter=``); the instances here are the defaults an entry point hands them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import redis

from kraken_hist.kraken.pacing import Limiter, LimiterStats, RateLimiter, place_slot
from kraken_hist.kraken.redis_limiter import (
    KEY_PREFIX,
    RateLimiterUnavailableError,
    RedisRateLimiter,
    limiter_namespace,
)

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings

__all__ = [
    "KEY_PREFIX", "PROCESS_WIDE", "Limiter", "LimiterStats", "RateLimiter", "RateLimiterUnavailableError",
    "RedisRateLimiter", "limiter_for", "limiter_namespace", "place_slot", "process_limiter", "redis_answers",
    "shared_limiter",
]

logger = logging.getLogger(__name__)


class ProcessWideLimiters:
    """The limiters of this process: the in-memory one, and one Redis-shared one per Redis URL
    and namespace (with whether a Redis answers at a URL, asked once).

    They must be shared, one per process: Kraken counts calls per egress IP, so every REST
    client of the process has to take its slots from the same pace and see the same throttle
    block — two in-memory limiters would each allow the full rate. Keyed by process id, so a
    forked child makes its own Redis connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: RateLimiter | None = None
        self._shared: dict[tuple[int, str, str], RedisRateLimiter] = {}
        self._redis_answers: dict[tuple[int, str], bool] = {}

    def local(self, min_interval: float | None = None, pair_interval: float | None = None) -> RateLimiter:
        """The in-memory limiter, created on first use.

        Passing `min_interval` sets the shared pace (the latest setting wins: it comes from the
        one Settings object of the process); `pair_interval` likewise (None: ``min_interval``).
        """
        with self._lock:
            if self._local is None:
                self._local = RateLimiter(1.0 if min_interval is None else min_interval, pair_interval=pair_interval)
            elif min_interval is not None:
                if min_interval != self._local.min_interval:
                    logger.debug("process REST pace changed from %.3f s to %.3f s",
                                 self._local.min_interval, min_interval)
                    self._local.min_interval = min_interval
                self._local.pair_interval = pair_interval
            return self._local

    def redis_answers(self, url: str, timeout: float = 0.5) -> bool:
        """Whether a Redis answers at `url` (asked once per process and URL)."""
        key = (os.getpid(), url)
        with self._lock:
            known = self._redis_answers.get(key)
        if known is not None:
            return known
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
            answers = True
        except redis.RedisError as exc:
            answers = False
            logger.info("no Redis at %s (%s): the REST rate limit is this process's own", url, exc,
                        extra={"event": "rest_limiter_local"})
        finally:
            client.close()
        with self._lock:
            self._redis_answers[key] = answers
        return answers

    def shared(self, redis_url: str, namespace: str, min_interval: float = 1.0,
               pair_interval: float | None = None) -> RedisRateLimiter:
        """The :class:`RedisRateLimiter` of `namespace` at `redis_url` (one Redis connection pool
        per process). The pace is updated to the latest setting."""
        key = (os.getpid(), redis_url, namespace)
        with self._lock:
            limiter = self._shared.get(key)
            if limiter is None:
                limiter = self._shared[key] = RedisRateLimiter(_redis_client(redis_url), namespace, min_interval,
                                                               pair_interval=pair_interval)
            else:
                limiter.min_interval = float(min_interval)
                limiter.pair_interval = float(min_interval if pair_interval is None else pair_interval)
            return limiter


#: The one set of limiters of this process (see :class:`ProcessWideLimiters` for why it is one).
PROCESS_WIDE = ProcessWideLimiters()


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


def process_limiter(min_interval: float | None = None, pair_interval: float | None = None) -> RateLimiter:
    """The in-memory limiter shared by every REST client of this process (``PROCESS_WIDE.local``)."""
    return PROCESS_WIDE.local(min_interval, pair_interval)


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis answers at `url` (asked once per process and URL)."""
    return PROCESS_WIDE.redis_answers(url, timeout)


def shared_limiter(redis_url: str, namespace: str, min_interval: float = 1.0,
                   pair_interval: float | None = None) -> RedisRateLimiter:
    """The process's :class:`RedisRateLimiter` of `namespace` at `redis_url` (``PROCESS_WIDE.shared``)."""
    return PROCESS_WIDE.shared(redis_url, namespace, min_interval, pair_interval)


def limiter_for(settings: "Settings") -> Limiter:
    """The limiter the settings ask for: shared through Redis (``rest_limiter`` ``redis``, or
    ``auto`` when Redis answers at ``redis_url``), else the process's own."""
    pace, pair_pace = settings.rest_min_interval, settings.rest_pair_min_interval
    mode = settings.rest_limiter
    if mode == "redis" or (mode == "auto" and redis_answers(settings.redis_url)):
        return shared_limiter(settings.redis_url, limiter_namespace(settings.rest_url, settings.egress_id),
                              pace, pair_pace)
    return process_limiter(pace, pair_pace)
