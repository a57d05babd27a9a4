"""The REST rate limit shared through Redis: one pace and one back-off for every process of an
egress IP, per pair for Trades/OHLC; real Redis (database 15), real processes, real HTTP."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from kraken_hist.core.config import Settings
from kraken_hist.kraken.ratelimit import (
    PROCESS_WIDE,
    RateLimiter,
    place_slot,
    RateLimiterUnavailableError,
    RedisRateLimiter,
    limiter_for,
    limiter_namespace,
    process_limiter,
)
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.limiter_load import record_arrivals, run_load, summarize
from kraken_hist.testing.market import FakeMarket

pytestmark = [pytest.mark.redis]

START = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A limit of its own for this test, deleted afterwards."""
    name = f"kraken_hist:ratelimit:test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def shared(redis_url: str, namespace: str, interval: float, **options: object) -> RedisRateLimiter:
    """A limiter with its own Redis connection: what another process would have."""
    return RedisRateLimiter(redis.Redis.from_url(redis_url), namespace, interval, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def market() -> FakeMarket:
    return FakeMarket({p: generate_trades(p, START, START + timedelta(minutes=30), seed=i)
                       for i, p in enumerate(("BTC/USD", "ETH/USD"))})


def stamps_of(limiters: list[RedisRateLimiter], calls: int, pair: str | None = None) -> list[float]:
    """Each limiter in its own thread takes `calls` slots; the times the slots were given."""
    stamps: list[float] = []
    lock = threading.Lock()

    def work(limiter: RedisRateLimiter) -> None:
        for _ in range(calls):
            limiter.acquire(pair)
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work, args=(lim,), name=f"caller-{i}") for i, lim in enumerate(limiters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(stamps)


def test_callers_with_their_own_connections_share_one_pace(redis_url: str, namespace: str) -> None:
    limiters = [shared(redis_url, namespace, 0.1) for _ in range(4)]
    stamps = stamps_of(limiters, 4)
    assert len(stamps) == 16
    # a caller runs at its slot or later (a busy machine wakes threads late), never earlier: 16
    # slots an interval apart, whoever took them, span at least 15 intervals
    assert 15 * 0.1 - 0.02 <= stamps[-1] - stamps[0] < 3.0


def test_pairs_have_their_own_pace_inside_the_egress_pace(redis_url: str, namespace: str) -> None:
    btc = [shared(redis_url, namespace, 0.01, pair_interval=0.2) for _ in range(2)]
    eth = shared(redis_url, namespace, 0.01, pair_interval=0.2)
    done: dict[str, list[float]] = {}

    def run(name: str, limiters: list[RedisRateLimiter], pair: str) -> None:
        done[name] = stamps_of(limiters, 3, pair)

    threads = [threading.Thread(target=run, args=("btc", btc, "BTC/USD")),
               threading.Thread(target=run, args=("eth", eth and [eth], "ETH/USD"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one pair: 0.2 s apart, across callers (6 slots: at least 1.0 s)
    assert len(done["btc"]) == 6 and done["btc"][-1] - done["btc"][0] >= 1.0 - 0.02
    # another pair is not held up behind BTC/USD's queue: its 3 slots take 0.4 s, not 1.0 s
    assert done["eth"][-1] - done["eth"][0] < 0.9


def test_a_throttle_answer_blocks_every_process_and_the_back_off_is_shared(redis_url: str, namespace: str) -> None:
    first = shared(redis_url, namespace, 0.0, backoff_initial=0.3, backoff_factor=2.0, backoff_max=1.0)
    other = shared(redis_url, namespace, 0.0, backoff_initial=0.3, backoff_factor=2.0, backoff_max=1.0)
    assert first.acquire() == 0 and other.acquire() == 0
    assert first.throttled() == pytest.approx(0.3)
    assert other.stats().blocked_until_in == pytest.approx(0.3, abs=0.05)
    assert other.acquire() == pytest.approx(0.3, abs=0.05)  # the other process waits it out
    assert other.throttled() == pytest.approx(0.6)  # the streak is the egress's, not a process's
    assert first.throttled() == pytest.approx(1.0)  # capped
    first.acquire()
    other.succeeded()
    assert first.throttled() == pytest.approx(0.3)  # anyone's success starts the back-off over
    assert first.stats().throttles == 3 and other.stats().throttles == 1


def test_a_block_that_begins_while_waiting_for_a_slot_is_waited_out(redis_url: str, namespace: str) -> None:
    waiting = shared(redis_url, namespace, 0.1, backoff_initial=0.4, backoff_max=0.4)
    throttled = shared(redis_url, namespace, 0.1, backoff_initial=0.4, backoff_max=0.4)
    waiting.acquire()
    began = time.monotonic()
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(waiting.acquire()), name="waiter")
    thread.start()  # its slot is 0.1 s away...
    time.sleep(0.02)
    throttled.throttled()  # ...but another process is throttled meanwhile
    thread.join()
    assert time.monotonic() - began >= 0.4


def test_without_redis_no_call_is_made(namespace: str) -> None:
    dead = RedisRateLimiter(redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2),
                            namespace, 0.0, unavailable_timeout=0.3)
    began = time.monotonic()
    with pytest.raises(RateLimiterUnavailableError, match="not calling Kraken"):
        dead.acquire("BTC/USD")
    assert time.monotonic() - began < 3


def test_limiter_for_follows_the_settings(redis_url: str) -> None:
    base = Settings(redis_url=redis_url, rest_url="http://127.0.0.1:9", rest_min_interval=0.25,
                    rest_pair_min_interval=2.0, egress_id="nat-a")
    chosen = limiter_for(base)
    assert isinstance(chosen, RedisRateLimiter)  # auto, and Redis answers
    assert chosen.namespace == limiter_namespace("http://127.0.0.1:9", "nat-a") == "kraken_hist:ratelimit:127.0.0.1:9:nat-a"
    assert (chosen.min_interval, chosen.pair_interval) == (0.25, 2.0)
    assert limiter_for(base) is chosen  # one per process
    from dataclasses import replace

    assert isinstance(limiter_for(replace(base, rest_limiter="redis")), RedisRateLimiter)
    assert limiter_for(replace(base, rest_limiter="process")) is process_limiter()
    no_redis = replace(base, redis_url="redis://127.0.0.1:9/0")
    assert limiter_for(no_redis) is process_limiter()  # auto: the laptop fallback
    assert isinstance(limiter_for(replace(no_redis, rest_limiter="redis")), RedisRateLimiter)
    assert limiter_for(replace(base, egress_id="nat-b")).namespace.endswith(":nat-b")  # type: ignore[attr-defined]
    assert process_limiter() is PROCESS_WIDE.local()  # the one in-memory pace of the process


def test_the_client_takes_the_pair_slot_for_trades_and_ohlc(redis_url: str, namespace: str,
                                                              market: FakeMarket) -> None:
    limiter = shared(redis_url, namespace, 0.0, pair_interval=0.3)
    with FakeKrakenREST(market) as fake, KrakenRestClient(fake.url, limiter=limiter) as client:
        began = time.monotonic()
        client.get_server_time()
        client.get_trades("BTC/USD", count=5)
        client.get_ohlc("BTC/USD")  # same pair: 0.3 s after the Trades call
        client.get_trades("ETH/USD", count=5)  # another pair: at once
        client.get_system_status()
        assert time.monotonic() - began >= 0.3
    assert limiter.stats().calls == 5


# --- N real processes against the fake exchange's per-IP limit ---------------------------------

RATE = 20.0  # the fake's sustained calls/s per IP (all processes call from 127.0.0.1), burst 3
PACE = 1.1 / RATE  # the shared pace, with the headroom a busy 2-core machine's scheduling needs


@pytest.mark.slow
def test_processes_sharing_the_redis_limit_stay_under_it_and_are_never_throttled(
    redis_url: str, namespace: str, market: FakeMarket
) -> None:
    with FakeKrakenREST(market, rate_limit_per_second=RATE) as fake:
        arrivals = record_arrivals(fake)
        results = run_load(fake.url, processes=4, interval=PACE, calls=12, limiter="redis",
                           redis_url=redis_url, namespace=namespace)
        report = summarize(results, limit_per_second=RATE, throttled=fake.calls["throttled"], arrivals=arrivals)
        served = fake.calls["Trades"]
    assert report.calls == served == 48
    assert report.throttled == 0 and all(r["throttled"] == 0 and r["failed"] == 0 for r in results)
    # as the exchange saw them: 4 processes together at the pace one alone would keep
    assert report.rate <= RATE
    assert report.max_in_window <= RATE + 1  # a closed one-second window holds RATE + 1 evenly spaced calls


@pytest.mark.slow
def test_processes_with_their_own_limiters_are_throttled(redis_url: str, market: FakeMarket) -> None:
    """The problem the shared limit solves: four processes, each paced right on its own."""
    with FakeKrakenREST(market, rate_limit_per_second=RATE, block_seconds=0.5) as fake:
        results = run_load(fake.url, processes=4, interval=PACE, calls=5, limiter="process",
                           redis_url=redis_url, backoff=0.1, max_retries=0, start_delay=1.0)
        throttled = fake.calls["throttled"]
    assert throttled > 0 and sum(r["throttled"] for r in results) == throttled


@pytest.mark.slow
def test_a_throttle_answer_to_one_process_pauses_all_of_them(redis_url: str, namespace: str,
                                                               market: FakeMarket) -> None:
    with FakeKrakenREST(market, rate_limit_per_second=RATE) as fake:
        fake.inject("throttle", endpoint="Trades")  # the first call, whichever process makes it
        results = run_load(fake.url, processes=3, interval=PACE, calls=6, limiter="redis",
                           redis_url=redis_url, namespace=namespace, backoff=0.6)
        throttled = fake.calls["throttled"]
    assert throttled == 1  # the injected one; nobody ran into the exchange's own block
    sent = sorted(t for r in results for t in r["sent"])
    # after the first call was answered with a throttle, the next one (from any process) waited the block
    assert sent[1] - sent[0] >= 0.6 - 0.05
    assert sum(r["throttled"] for r in results) == 1 and all(r["failed"] == 0 for r in results)


def test_process_limiter_paces_pairs_too() -> None:
    limiter = RateLimiter(0.0, pair_interval=0.2)
    assert [limiter.acquire("BTC/USD") for _ in range(3)][0] == 0
    assert limiter.stats().waited_seconds == pytest.approx(0.4, abs=0.05)  # 0.2 s apart
    assert limiter.acquire("ETH/USD") == 0  # another pair: at once


# --- the spacing rule, as a pure function (the Redis script is its twin) --------------------------


@settings(max_examples=300, deadline=None)
@given(st.floats(0.0, 2.0), st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 3.0)), min_size=1, max_size=40))
def test_placed_slots_are_an_interval_apart_and_as_early_as_they_can_be(gap: float, asks: list[tuple[float, float]]) -> None:
    """Callers ask at non-decreasing times `now` for a slot no earlier than `now + wait` (a
    pair's next slot, a block's end): every slot granted is at least `gap` from every other,
    and is either the earliest asked for or directly after another slot."""
    reserved: list[float] = []
    granted: list[float] = []
    now = 0.0
    for step, wait in asks:
        now += step
        earliest = now + wait
        slot = place_slot(reserved, earliest, now, gap)
        assert slot >= earliest
        assert slot == earliest or any(abs(slot - (other + gap)) < 1e-9 for other in granted)
        granted.append(slot)
    ordered = sorted(granted)
    assert all(b - a >= gap - 1e-9 for a, b in zip(ordered, ordered[1:]))
