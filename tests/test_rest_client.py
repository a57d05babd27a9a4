"""The REST client against the fake exchange: error envelope, retries, faults, pacing, throttling."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from kraken_hist.core.config import Settings
from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError, UnknownSymbolError
from kraken_hist.kraken.ratelimit import RateLimiter, process_limiter
from kraken_hist.kraken.rest_client import (
    ExchangeThrottledError,
    KrakenRestClient,
    classify_error,
    unwrap,
)
from kraken_hist.testing.fake_rest import FAULTS, FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock

START = datetime(2025, 5, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def history() -> list:
    return generate_trades("BTC/USD", START, START + timedelta(hours=13), seed=3)


@pytest.fixture
def market(history: list) -> FakeMarket:
    return FakeMarket({"BTC/USD": history}, clock=ManualClock(START + timedelta(hours=12, seconds=30)))


@pytest.fixture
def fake(market: FakeMarket):
    with FakeKrakenREST(market, slow_seconds=0.6) as server:
        yield server


def client_for(url: str, **options: object) -> KrakenRestClient:
    defaults: dict[str, object] = {
        "limiter": RateLimiter(0, backoff_initial=0.02, backoff_max=0.1),
        "retry_base_delay": 0.01,
        "timeout": (1.0, 0.3),
    }
    defaults.update(options)
    return KrakenRestClient(url, **defaults)  # type: ignore[arg-type]


# --- the one place errors are decided -----------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (["EGeneral:Too many requests"], ExchangeThrottledError),
        (["EAPI:Rate limit exceeded"], ExchangeThrottledError),
        (["EService:Unavailable"], ExchangeTransientError),
        (["EService:Busy"], ExchangeTransientError),
        (["EGeneral:Internal error"], ExchangeTransientError),
        (["EDatabase:Internal error"], ExchangeTransientError),
        (["EService:Unavailable:maintenance window"], ExchangeTransientError),
        (["EQuery:Unknown asset pair"], ExchangePermanentError),
        (["EGeneral:Invalid arguments"], ExchangePermanentError),
        (["EGeneral:Something new"], ExchangePermanentError),
        (["EService:Busy", "EQuery:Unknown asset pair"], ExchangePermanentError),
    ],
)
def test_classify_error(messages: list[str], expected: type) -> None:
    assert classify_error(messages) is expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"error":["EGeneral:Too many requests"]}', ExchangeThrottledError),
        (429, b"<html>slow down</html>", ExchangeThrottledError),
        (500, b"<html>oops</html>", ExchangeTransientError),
        (502, b"", ExchangeTransientError),
        (520, b"<html>cloudflare</html>", ExchangeTransientError),
        (521, b"", ExchangeTransientError),
        (522, b"", ExchangeTransientError),
        (200, b'{"error":[],"result":{"XX', ExchangeTransientError),
        (200, b'{"error":[]}', ExchangeTransientError),
        (503, b'{"error":["EQuery:Unknown asset pair"]}', ExchangeTransientError),
        (200, b'{"error":["EQuery:Unknown asset pair"]}', ExchangePermanentError),
        (404, b'{"error":["EGeneral:Unknown method"]}', ExchangePermanentError),
        (403, b"<html>forbidden</html>", ExchangePermanentError),
    ],
)
def test_unwrap_failures(status: int, body: bytes, expected: type) -> None:
    with pytest.raises(expected) as caught:
        unwrap(status, body, "Trades")
    assert type(caught.value) is expected


def test_unwrap_result_keeps_decimals() -> None:
    result = unwrap(200, b'{"error":[],"result":{"t":1762795433.9717445}}', "x")
    assert str(result["t"]) == "1762795433.9717445"


# --- endpoints ---------------------------------------------------------------------------


def test_endpoints(fake: FakeKrakenREST, history: list) -> None:
    with client_for(fake.url) as client:
        page = client.get_trades("xbtusd", since="0", count=50)
        assert page.symbol == "BTC/USD" and page.trades == history[:50]
        assert int(page.last) > 0
        assert client.get_trades("BTC/USD", since=history[10].time, count=5).trades[0] == history[10]
        ohlc = client.get_ohlc("BTC/USD")
        assert len(ohlc.rows) == 720 and ohlc.rows[-1].time > ohlc.finished_rows()[-1].time
        assert any(r.is_filler for r in ohlc.rows)
        assert client.get_server_time() == START + timedelta(hours=12, seconds=30)
        assert client.get_system_status().online
        assert client.get_asset_pairs(["BTC/USD"])["XXBTZUSD"]["pair_decimals"] == 1
        with pytest.raises(ValueError):
            client.get_ohlc("BTC/USD", interval=7)
        with pytest.raises(UnknownSymbolError):
            client.get_trades("NOPE/USD")


def test_from_settings_uses_the_base_url_and_the_process_pace(fake: FakeKrakenREST) -> None:
    client = KrakenRestClient.from_settings(Settings(rest_url=fake.url + "/", rest_min_interval=0.0,
                                                     rest_limiter="process"))
    try:
        assert client.base_url == fake.url and client.limiter is process_limiter()
        assert process_limiter().min_interval == 0.0
        assert client.get_system_status().status == "online"
    finally:
        client.close()


@pytest.mark.parametrize("kind", sorted(set(FAULTS) - {"invalid"}))
def test_every_transient_fault_is_retried(fake: FakeKrakenREST, history: list, kind: str) -> None:
    fake.inject(kind, count=2, endpoint="Trades")
    with client_for(fake.url) as client:
        page = client.get_trades("BTC/USD", since="0", count=10)
        assert page.trades == history[:10]
        assert client.stats().retries == 2
    assert fake.calls["Trades"] == 3


def test_permanent_errors_fail_at_once(fake: FakeKrakenREST) -> None:
    fake.inject("invalid")
    with client_for(fake.url) as client:
        with pytest.raises(ExchangePermanentError, match="Invalid arguments"):
            client.get_server_time()
        with pytest.raises(ExchangePermanentError, match="Unknown asset pair"):
            client.get_trades("ETH/USD")
        assert client.stats().retries == 0
    assert fake.calls["total"] == 2


def test_retries_are_bounded(fake: FakeKrakenREST) -> None:
    fake.inject("unavailable", count=10)
    with client_for(fake.url, max_retries=3) as client:
        with pytest.raises(ExchangeTransientError, match="gave up after 4 attempts"):
            client.get_server_time()
    assert fake.calls["Time"] == 4


def test_a_dead_server_is_transient() -> None:
    with client_for("http://127.0.0.1:9", max_retries=1) as client:
        with pytest.raises(ExchangeTransientError):
            client.get_server_time()


# --- the rate limiter --------------------------------------------------------------------


def test_limiter_paces_calls_shared_across_threads() -> None:
    limiter = RateLimiter(0.05)
    stamps: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(3):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=work, name=f"pacer-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    assert len(stamps) == 12
    # a thread runs at its slot or later (a busy machine wakes it late), never earlier: twelve
    # slots an interval apart, whichever thread took them, span at least eleven intervals
    # (the spacing rule itself: tests/test_ratelimit_shared.py, test_placed_slots_*)
    assert stamps[-1] - stamps[0] >= 11 * 0.05 - 0.01


def test_limiter_backoff_blocks_every_thread_grows_and_resets() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(0.0, backoff_initial=1.0, backoff_factor=2.0, backoff_max=5.0,
                          clock=lambda: now[0], sleep=sleep)
    assert limiter.acquire() == 0
    assert [limiter.throttled() for _ in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert limiter.acquire() == pytest.approx(5.0)  # the longest block wins; everyone waits it out
    limiter.succeeded()
    assert limiter.throttled() == 1.0  # a call got through: back-off starts over
    assert limiter.stats().throttles == 5


def test_limiter_block_seen_by_a_sleeping_thread() -> None:
    limiter = RateLimiter(0.05, backoff_initial=0.3, backoff_max=0.3)
    limiter.acquire()
    done: list[float] = []
    began = time.monotonic()
    waiter = threading.Thread(target=lambda: done.append(limiter.acquire()), name="waiter")
    waiter.start()  # its slot is 50 ms away...
    limiter.throttled()  # ...but a throttle answer arrives meanwhile
    waiter.join()
    assert time.monotonic() - began >= 0.29


def test_throttling_slows_the_client_down_instead_of_failing(market: FakeMarket) -> None:
    with FakeKrakenREST(market, rate_limit_per_second=20, burst=2, block_seconds=0.1,
                        block_extension=0.05) as fake:
        limiter = RateLimiter(0.0, backoff_initial=0.1, backoff_max=0.4)
        with client_for(fake.url, limiter=limiter, max_retries=10) as client:
            for _ in range(15):
                assert client.get_server_time() == START + timedelta(hours=12, seconds=30)
            assert client.stats().throttled >= 1 and client.stats().failures == 0
    assert limiter.stats().throttles == client.stats().throttled


def test_paced_client_is_never_throttled(market: FakeMarket) -> None:
    with FakeKrakenREST(market, rate_limit_per_second=20, burst=1.5) as fake:
        with client_for(fake.url, limiter=RateLimiter(1 / 18)) as client:
            for _ in range(20):
                client.get_server_time()
    assert fake.calls["throttled"] == 0


def test_timeouts_are_explicit(fake: FakeKrakenREST) -> None:
    fake.inject("slow", count=10)
    began = time.monotonic()
    with client_for(fake.url, max_retries=1, timeout=(1.0, 0.1)) as client:
        with pytest.raises(ExchangeTransientError, match="timed out"):
            client.get_server_time()
    assert time.monotonic() - began < 1.0

