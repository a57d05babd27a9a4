"""One pace for every REST call, and a pause for everyone after a throttle answer.

Kraken limits public calls per IP, and Trades/OHLC also per pair (KRAKEN.md): about one
call per second stays within it, and once throttled, calls keep failing for a few seconds,
longer if you keep calling. So every call takes a *slot*: slots of one egress IP are
``min_interval`` apart, slots of one pair ``pair_interval`` apart, and a throttle answer
blocks every caller of that IP for a back-off that grows with each throttle in a row (capped)
and resets after a call gets through.

Two limiters keep that rule:

- :class:`RateLimiter` holds the slots in memory: every thread of one process shares it
  (:func:`process_limiter`). Enough for one process on a laptop.
- :class:`RedisRateLimiter` holds them in Redis, so every process on every machine that
  shares an egress IP (the ``egress_id`` setting) shares one limit and one back-off. A Lua
  script reserves the slot atomically on Redis' own clock (``TIME``), so callers are served
  in the order they asked, machines' clocks never matter, and nobody polls.

:func:`limiter_for` picks one from the settings.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import redis

from kraken_hist.ops import metrics
from kraken_hist.core.errors import TransientError
from kraken_hist.rules.backoff import Backoff

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "kraken_hist:ratelimit"


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


class RateLimiterUnavailableError(TransientError):
    """The shared limiter's Redis did not answer: no call is made rather than one over the limit."""


def _check_intervals(min_interval: float, pair_interval: float | None, backoff_initial: float,
                     backoff_factor: float, backoff_max: float) -> None:
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
        _check_intervals(min_interval, pair_interval, backoff_initial, backoff_factor, backoff_max)
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


# --- the shared limiter ------------------------------------------------------------------

# Times are integer microseconds of Redis' clock (exact in Lua's doubles until year 2255).
# KEYS[1]: the egress hash {blocked, streak}; KEYS[2]: the egress's reserved slots (a sorted
# set, score = slot); KEYS[3] (optional): the pair hash {next}. ARGV: egress interval µs, pair
# interval µs, key TTL ms. The slot is the earliest time, at or after now, the block's end and
# the pair's next slot, that lies at least one egress interval away from every slot reserved
# before: a caller waiting for its pair's slot does not hold up callers of other pairs.
# Returns the delay to the slot (µs).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local gap = tonumber(ARGV[1])
local slot = math.max(now, tonumber(redis.call('HGET', KEYS[1], 'blocked')) or 0)
if #KEYS > 2 then slot = math.max(slot, tonumber(redis.call('HGET', KEYS[3], 'next')) or 0) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%.0f', now - gap))
if gap > 0 then
  local taken = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%.0f', slot - gap), '+inf', 'WITHSCORES')
  for i = 2, #taken, 2 do
    local other = tonumber(taken[i])
    if other - slot >= gap then break end
    slot = math.max(slot, other + gap)
  end
end
local member = string.format('%.0f', slot)
redis.call('ZADD', KEYS[2], slot, member)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if #KEYS > 2 then
  redis.call('HSET', KEYS[3], 'next', string.format('%.0f', slot + tonumber(ARGV[2])))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return string.format('%.0f', slot - now)
"""

# KEYS[1]: the egress hash. ARGV: initial block µs, factor, maximum block µs, key TTL ms.
# Returns the block length (µs) and the streak.
_THROTTLED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local streak = redis.call('HINCRBY', KEYS[1], 'streak', 1)
local block = math.min(tonumber(ARGV[3]), tonumber(ARGV[1]) * tonumber(ARGV[2]) ^ (streak - 1))
local untl = now + block
if untl > (tonumber(redis.call('HGET', KEYS[1], 'blocked')) or 0) then
  redis.call('HSET', KEYS[1], 'blocked', string.format('%.0f', untl))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {string.format('%.0f', block), streak}
"""

# KEYS[1]: the egress hash. Returns the block end relative to now (µs, <= 0: not blocked).
_BLOCKED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return string.format('%.0f', (tonumber(redis.call('HGET', KEYS[1], 'blocked')) or 0) - now)
"""

_MICRO = 1_000_000


def limiter_namespace(rest_url: str, egress_id: str) -> str:
    """Redis key prefix of one limit: the exchange (host and port of its REST URL) as seen
    from one egress IP. Different exchanges (the real one, a local fake) never share a limit."""
    parts = urlsplit(rest_url)
    host = parts.netloc or parts.path or "exchange"
    return f"{KEY_PREFIX}:{host}:{egress_id}"


class RedisRateLimiter:
    """The limit shared by every process that uses the same Redis and `namespace` (see the
    module docstring). Counters in :meth:`stats` are this object's own.

    When Redis does not answer, a call waits up to `unavailable_timeout` seconds for it and
    then raises :class:`RateLimiterUnavailableError` (a transient error: tasks retry later)
    — never a call outside the shared limit.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        min_interval: float = 1.0,
        *,
        pair_interval: float | None = None,
        backoff_initial: float = 2.0,
        backoff_factor: float = 2.0,
        backoff_max: float = 60.0,
        unavailable_timeout: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_intervals(min_interval, pair_interval, backoff_initial, backoff_factor, backoff_max)
        self.client = client
        self.namespace = namespace
        self.min_interval = float(min_interval)
        self.pair_interval = float(min_interval if pair_interval is None else pair_interval)
        self.backoff_initial = float(backoff_initial)
        self.backoff_factor = float(backoff_factor)
        self.backoff_max = float(backoff_max)
        self.unavailable_timeout = unavailable_timeout
        self._sleep = sleep
        self._reserve = client.register_script(_RESERVE)
        self._throttle = client.register_script(_THROTTLED)
        self._blocked = client.register_script(_BLOCKED)
        self._lock = threading.Lock()
        self._calls = self._throttles = 0
        self._waited = 0.0

    @property
    def egress_key(self) -> str:
        return f"{self.namespace}:ip"

    @property
    def slots_key(self) -> str:
        return f"{self.namespace}:slots"

    def pair_key(self, pair: str) -> str:
        return f"{self.namespace}:pair:{pair}"

    def _ttl_ms(self) -> int:
        # keys outlive their furthest slot or block; an idle limit forgets its streak
        return int((max(self.min_interval, self.pair_interval) + self.backoff_max + 600) * 1000)

    def _redis(self, script: Callable[..., object], keys: list[str], args: list[object]) -> object:
        deadline = time.monotonic() + self.unavailable_timeout
        while True:
            try:
                return script(keys=keys, args=args)
            except redis.RedisError as exc:
                metrics.limiter_error()
                if time.monotonic() >= deadline:
                    raise RateLimiterUnavailableError(
                        f"the shared REST rate limit in Redis is unavailable ({exc}); not calling Kraken"
                    ) from exc
                logger.warning("shared REST rate limit: Redis unavailable (%s); waiting for it", exc,
                               extra={"event": "rest_limiter_unavailable"})
                self._sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def acquire(self, pair: str | None = None) -> float:
        """Reserve the next slot of the egress (and of `pair`), sleep until it, and check that
        no throttle block began meanwhile (else take a slot after the block); returns the
        seconds waited."""
        keys = [self.egress_key, self.slots_key] + ([self.pair_key(pair)] if pair is not None else [])
        args = [round(self.min_interval * _MICRO), round(self.pair_interval * _MICRO), self._ttl_ms()]
        waited = 0.0
        while True:
            delay = max(0, int(self._redis(self._reserve, keys, args))) / _MICRO  # type: ignore[arg-type]
            if delay <= 0:
                break  # the slot is now: the script saw no block
            self._sleep(delay)
            waited += delay
            # a throttle answer seen by another process while we slept moves our slot too
            if int(self._redis(self._blocked, [self.egress_key], [])) <= 0:  # type: ignore[arg-type]
                break
        with self._lock:
            self._calls += 1
            self._waited += waited
        metrics.rest_wait(waited)
        return waited

    def throttled(self, pair: str | None = None) -> float:
        """Record a throttle answer: block every caller of this egress for the shared
        back-off (which then grows, up to ``backoff_max``); returns the block in seconds."""
        args = [round(self.backoff_initial * _MICRO), self.backoff_factor, round(self.backoff_max * _MICRO),
                self._ttl_ms()]
        block_us, streak = self._redis(self._throttle, [self.egress_key], args)  # type: ignore[misc]
        block = int(block_us) / _MICRO
        with self._lock:
            self._throttles += 1
        logger.warning("Kraken throttled us; pausing REST calls of every process of %s for %.1f s "
                       "(throttle #%d in a row)", self.namespace, block, int(streak),
                       extra={"event": "rest_throttled"})
        return block

    def succeeded(self, pair: str | None = None) -> None:
        """A call got through: the next throttle (of anyone) starts the back-off over."""
        try:
            self.client.hset(self.egress_key, "streak", 0)
        except redis.RedisError as exc:  # the streak only lengthens the next block; nothing to undo
            logger.debug("could not reset the shared throttle streak: %s", exc)

    def blocked_for(self) -> float:
        """Seconds until the shared block of this egress ends (0 when not blocked)."""
        return max(0, int(self._redis(self._blocked, [self.egress_key], []))) / _MICRO  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forget this limit's shared state (every key of the namespace) and own counters."""
        keys = list(self.client.scan_iter(match=f"{self.namespace}:*", count=500))
        if keys:
            self.client.delete(*keys)
        with self._lock:
            self._calls = self._throttles = 0
            self._waited = 0.0

    def stats(self) -> LimiterStats:
        try:
            blocked = self.blocked_for()
        except RateLimiterUnavailableError:
            blocked = 0.0
        with self._lock:
            return LimiterStats(calls=self._calls, throttles=self._throttles, waited_seconds=self._waited,
                                blocked_until_in=blocked)


# --- one limiter per process and setting --------------------------------------------------

_process_lock = threading.Lock()
_process_limiter: RateLimiter | None = None
_shared: dict[tuple[int, str, str], RedisRateLimiter] = {}
_redis_answers: dict[tuple[int, str], bool] = {}


def process_limiter(min_interval: float | None = None, pair_interval: float | None = None) -> RateLimiter:
    """The in-memory limiter shared by every REST client of this process, created on first use.

    Passing `min_interval` sets the shared pace (the latest setting wins: it comes from the
    one Settings object of the process); `pair_interval` likewise (None: ``min_interval``).
    """
    global _process_limiter
    with _process_lock:
        if _process_limiter is None:
            _process_limiter = RateLimiter(1.0 if min_interval is None else min_interval,
                                           pair_interval=pair_interval)
        elif min_interval is not None:
            if min_interval != _process_limiter.min_interval:
                logger.debug("process REST pace changed from %.3f s to %.3f s",
                             _process_limiter.min_interval, min_interval)
                _process_limiter.min_interval = min_interval
            _process_limiter.pair_interval = pair_interval
        return _process_limiter


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis answers at `url` (asked once per process and URL)."""
    key = (os.getpid(), url)
    with _process_lock:
        known = _redis_answers.get(key)
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
    with _process_lock:
        _redis_answers[key] = answers
    return answers


def shared_limiter(redis_url: str, namespace: str, min_interval: float = 1.0,
                   pair_interval: float | None = None) -> RedisRateLimiter:
    """The process's :class:`RedisRateLimiter` of `namespace` at `redis_url` (one Redis
    connection pool per process; a forked child makes its own). The pace is updated to the
    latest setting."""
    key = (os.getpid(), redis_url, namespace)
    with _process_lock:
        limiter = _shared.get(key)
        if limiter is None:
            limiter = _shared[key] = RedisRateLimiter(_redis_client(redis_url), namespace, min_interval,
                                                      pair_interval=pair_interval)
        else:
            limiter.min_interval = float(min_interval)
            limiter.pair_interval = float(min_interval if pair_interval is None else pair_interval)
        return limiter


def limiter_for(settings: "Settings") -> Limiter:
    """The limiter the settings ask for: shared through Redis (``rest_limiter`` ``redis``, or
    ``auto`` when Redis answers at ``redis_url``), else the process's own."""
    pace, pair_pace = settings.rest_min_interval, settings.rest_pair_min_interval
    mode = settings.rest_limiter
    if mode == "redis" or (mode == "auto" and redis_answers(settings.redis_url)):
        return shared_limiter(settings.redis_url, limiter_namespace(settings.rest_url, settings.egress_id),
                              pace, pair_pace)
    return process_limiter(pace, pair_pace)
