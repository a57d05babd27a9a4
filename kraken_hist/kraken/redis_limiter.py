"""The pace of REST calls shared through Redis by every process behind one egress IP.

The same rule as :class:`~kraken_hist.kraken.pacing.RateLimiter` (slots ``min_interval``
apart, ``pair_interval`` apart per pair, one growing pause after a throttle answer), held in
Redis so that every process on every machine sharing an egress IP (the ``egress_id`` setting)
shares one limit and one back-off. A Lua script reserves the slot atomically on Redis' own
clock (``TIME``), so callers are served in the order they asked, machines' clocks never matter,
and nobody polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from kraken_hist.core.errors import TransientError
from kraken_hist.kraken.pacing import LimiterStats, check_intervals
from kraken_hist.ops import metrics

logger = logging.getLogger("kraken_hist.kraken.ratelimit")  # one logger for the rate limit, whichever limiter

KEY_PREFIX = "kraken_hist:ratelimit"


class RateLimiterUnavailableError(TransientError):
    """The shared limiter's Redis did not answer: no call is made rather than one over the limit."""


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
        check_intervals(min_interval, pair_interval, backoff_initial, backoff_factor, backoff_max)
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
