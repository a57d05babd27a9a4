"""The fake exchange speaks Kraken's REST formats and rules (KRAKEN.md, the recorded samples)."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from kraken_hist.rules.candles import candles_from_trades
from kraken_hist.testing.fake_rest import FakeKrakenREST, demo_market
from kraken_hist.testing.history import MAX_BURST, format_trade_time, generate_trades, trade_time_ns
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.timeutils import from_unix_decimal, to_unix_seconds

START = datetime(2025, 3, 1, tzinfo=timezone.utc)
HOURS = 14


@pytest.fixture(scope="module")
def history() -> list:
    return generate_trades("BTC/USD", START, START + timedelta(hours=HOURS), seed=7)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START + timedelta(hours=13, seconds=42))


@pytest.fixture
def fake(history: list, clock: ManualClock):
    market = FakeMarket({"BTC/USD": history, "ETH/USD": generate_trades("ETH/USD", START, START + timedelta(hours=2))},
                        clock=clock)
    with FakeKrakenREST(market) as server:
        yield server


def get(fake: FakeKrakenREST, method: str, **params: object) -> dict:
    response = requests.get(f"{fake.url}/0/public/{method}", params=params, timeout=5)
    assert response.status_code == 200, response.text
    return json.loads(response.text, parse_float=Decimal)


# --- the generated history --------------------------------------------------------------


def test_history_is_deterministic_contiguous_and_bursty(history: list) -> None:
    again = generate_trades("BTC/USD", START, START + timedelta(hours=HOURS), seed=7)
    assert again == history
    assert generate_trades("BTC/USD", START, START + timedelta(hours=HOURS), seed=8) != history
    assert [t.trade_id for t in history] == list(range(1, len(history) + 1))
    assert all(a.time <= b.time for a, b in zip(history, history[1:]))
    shared = Counter(t.time for t in history)
    assert 2 <= max(shared.values()) <= MAX_BURST
    minutes = {t.time.replace(second=0, microsecond=0) for t in history}
    assert 0.5 * HOURS * 60 < len(minutes) < HOURS * 60  # quiet minutes exist
    assert all(t.price == t.price.quantize(Decimal("0.1")) for t in history)
    assert all(START <= t.time < START + timedelta(hours=HOURS) for t in history)


def test_reported_time_truncates_back_to_the_stored_microsecond(history: list) -> None:
    for trade in history[:500]:
        text = format_trade_time(trade_time_ns(trade.time))
        assert len(text.split(".")[1]) <= 7
        assert from_unix_decimal(Decimal(text)) == trade.time


# --- Trades -------------------------------------------------------------------------------


def test_trades_answer_has_krakens_shape(fake: FakeKrakenREST, history: list) -> None:
    raw = requests.get(f"{fake.url}/0/public/Trades", params={"pair": "XBTUSD", "since": 0, "count": 5}, timeout=5)
    body = json.loads(raw.text, parse_float=Decimal)
    assert body["error"] == []
    assert set(body["result"]) == {"XXBTZUSD", "last"}
    rows = body["result"]["XXBTZUSD"]
    assert len(rows) == 5
    price, volume, when, side, ord_type, misc, trade_id = rows[0]
    assert price == f"{history[0].price:.5f}" and volume == f"{history[0].volume:.8f}"
    assert isinstance(when, Decimal) and side in ("b", "s") and ord_type in ("m", "l") and misc == ""
    assert trade_id == 1
    last = body["result"]["last"]
    assert isinstance(last, str) and last == str(trade_time_ns(history[4].time))


def test_trades_since_is_exclusive_and_a_burst_can_be_cut(fake: FakeKrakenREST, history: list) -> None:
    times = Counter(t.time for t in history)
    burst_time = next(t for t, n in times.items() if n >= 3)
    first_of_burst = next(t for t in history if t.time == burst_time)
    count = first_of_burst.trade_id  # the page ends inside the burst
    page = get(fake, "Trades", pair="XBTUSD", since=0, count=count)["result"]
    following = get(fake, "Trades", pair="XBTUSD", since=page["last"], count=10)["result"]["XXBTZUSD"]
    # the rest of the burst shares the cursor's timestamp, so an exclusive since skips it
    assert following[0][6] == first_of_burst.trade_id + times[burst_time]


def test_trades_since_inclusive_repeats_the_boundary(history: list, clock: ManualClock) -> None:
    with FakeKrakenREST(FakeMarket({"BTC/USD": history}, clock=clock), since_inclusive=True) as fake:
        page = get(fake, "Trades", pair="XBTUSD", since=0, count=10)["result"]
        again = get(fake, "Trades", pair="XBTUSD", since=page["last"], count=10)["result"]["XXBTZUSD"]
    assert again[0][6] <= 10


def test_trades_only_until_the_clock_and_default_is_the_latest(fake: FakeKrakenREST, history: list,
                                                               clock: ManualClock) -> None:
    visible = [t for t in history if t.time <= clock()]
    latest = get(fake, "Trades", pair="XBTUSD")["result"]["XXBTZUSD"]
    assert latest[-1][6] == visible[-1].trade_id and len(latest) == 1000
    end = get(fake, "Trades", pair="XBTUSD", since=latest[-1][6] and get(fake, "Trades", pair="XBTUSD")["result"]["last"])
    assert end["result"]["XXBTZUSD"] == []
    clock.advance(timedelta(hours=1))
    assert get(fake, "Trades", pair="XBTUSD")["result"]["XXBTZUSD"][-1][6] > visible[-1].trade_id


def test_trades_since_in_seconds_and_a_slash_symbol_key(fake: FakeKrakenREST, history: list) -> None:
    since = START + timedelta(hours=1)
    rows = get(fake, "Trades", pair="BTC/USD", since=to_unix_seconds(since), count=3)["result"]
    assert "BTC/USD" in rows
    assert rows["BTC/USD"][0][6] == next(t.trade_id for t in history if t.time > since)


@pytest.mark.parametrize("params", [{"pair": "FOOBAR"}, {"pair": "XDGUSD"}])
def test_unknown_pair(fake: FakeKrakenREST, params: dict) -> None:
    assert get(fake, "Trades", **params) == {"error": ["EQuery:Unknown asset pair"]}
    assert get(fake, "OHLC", **params) == {"error": ["EQuery:Unknown asset pair"]}


def test_invalid_arguments(fake: FakeKrakenREST) -> None:
    assert get(fake, "Trades", pair="XBTUSD", count=5000)["error"] == ["EGeneral:Invalid arguments"]
    assert get(fake, "OHLC", pair="XBTUSD", interval=7)["error"] == ["EGeneral:Invalid arguments"]
    response = requests.get(f"{fake.url}/0/public/Nope", timeout=5)
    assert response.status_code == 404 and response.json()["error"] == ["EGeneral:Unknown method"]


# --- OHLC ----------------------------------------------------------------------------------


def test_ohlc_follows_krakens_rules(fake: FakeKrakenREST, history: list, clock: ManualClock) -> None:
    result = get(fake, "OHLC", pair="XBTUSD", interval=1)["result"]
    rows = result["XXBTZUSD"]
    now = to_unix_seconds(clock())
    current = now - now % 60
    assert len(rows) == 720
    assert rows[-1][0] == current and rows[0][0] == current - 719 * 60
    assert result["last"] == current - 60
    built = {to_unix_seconds(c.time): c for c in candles_from_trades([t for t in history if t.time <= clock()])}
    fillers = 0
    previous_close = None
    for row in rows:
        when, o, h, low, c, vwap, volume, count = row
        candle = built.get(when)
        if candle is None:
            fillers += 1
            assert (o, h, low, c, vwap, volume, count) == (previous_close, previous_close, previous_close,
                                                           previous_close, "0.0", "0.00000000", 0)
        else:
            assert (o, h, low, c, vwap, volume, count) == (
                f"{candle.open:.1f}", f"{candle.high:.1f}", f"{candle.low:.1f}", f"{candle.close:.1f}",
                f"{candle.vwap:.1f}", f"{candle.volume:.8f}", candle.trades)
        previous_close = c
    assert fillers > 50
    since = rows[100][0]
    later = get(fake, "OHLC", pair="XBTUSD", interval=1, since=since)["result"]["XXBTZUSD"]
    assert later == rows[101:]


def test_ohlc_wider_interval_and_last_as_string(history: list, clock: ManualClock) -> None:
    with FakeKrakenREST(FakeMarket({"BTC/USD": history}, clock=clock), ohlc_last_as_string=True) as fake:
        result = get(fake, "OHLC", pair="XBTUSD", interval=60)["result"]
    rows = result["XXBTZUSD"]
    assert [r[0] % 3600 for r in rows] == [0] * len(rows)
    assert len(rows) == 14  # hours since the first trade, the unfinished one included
    assert result["last"] == str(rows[-2][0])
    hour = [t for t in history if START + timedelta(hours=2) <= t.time < START + timedelta(hours=3)]
    row = next(r for r in rows if r[0] == to_unix_seconds(START + timedelta(hours=2)))
    assert row[7] == len(hour) and row[1] == f"{hour[0].price:.1f}" and row[4] == f"{hour[-1].price:.1f}"


# --- other endpoints -----------------------------------------------------------------------


def test_time_status_and_asset_pairs(fake: FakeKrakenREST, clock: ManualClock) -> None:
    assert get(fake, "Time")["result"] == {"unixtime": to_unix_seconds(clock()),
                                           "rfc1123": "Sat, 01 Mar 25 13:00:42 +0000"}
    assert get(fake, "SystemStatus")["result"] == {"status": "online", "timestamp": "2025-03-01T13:00:42Z"}
    pairs = get(fake, "AssetPairs")["result"]
    assert set(pairs) == {"XXBTZUSD", "XETHZUSD"}
    assert pairs["XXBTZUSD"]["altname"] == "XBTUSD" and pairs["XXBTZUSD"]["wsname"] == "XBT/USD"
    assert pairs["XXBTZUSD"]["pair_decimals"] == 1
    assert set(get(fake, "AssetPairs", pair="ETHUSD")["result"]) == {"XETHZUSD"}


def test_answers_have_the_recorded_shapes(fake: FakeKrakenREST, samples_dir: Path) -> None:
    """Each field of our answers has the JSON type of the same field in a real answer."""

    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(value[0])] if value and not isinstance(value[0], (str, int, Decimal)) else [
                type(v).__name__ for v in value]
        return type(value).__name__

    real_trades = json.loads((samples_dir / "http_trades.json").read_text(), parse_float=Decimal)["result"]
    ours = get(fake, "Trades", pair="XBTUSD", since=0, count=3)["result"]
    assert shape(ours["XXBTZUSD"][0]) == shape(real_trades["XBTUSDT"][0])
    assert type(ours["last"]) is type(real_trades["last"])
    real_ohlc = json.loads((samples_dir / "http_ohlc.json").read_text(), parse_float=Decimal)["result"]
    ohlc = get(fake, "OHLC", pair="XBTUSD")["result"]
    assert shape(ohlc["XXBTZUSD"][0]) == shape(real_ohlc["XBTUSDT"][0])
    assert type(ohlc["last"]) is type(real_ohlc["last"])
    for method, sample in (("Time", "http_server_time.json"), ("SystemStatus", "http_system_status.json")):
        real = json.loads((samples_dir / sample).read_text(), parse_float=Decimal)
        assert shape(get(fake, method)) == shape(real)
    real_pair = json.loads((samples_dir / "http_asset_pairs.json").read_text())["result"]["XBTUSDT"]
    ours_pair = get(fake, "AssetPairs")["result"]["XXBTZUSD"]
    for key in ("altname", "wsname", "base", "quote", "pair_decimals", "lot_decimals", "status"):
        assert type(ours_pair[key]) is type(real_pair[key])


# --- rate limit and faults -----------------------------------------------------------------


def test_rate_limit_throttles_with_http_200_and_extends_when_hammered(history: list, clock: ManualClock) -> None:
    market = FakeMarket({"BTC/USD": history}, clock=clock)
    with FakeKrakenREST(market, rate_limit_per_second=5, burst=2, block_seconds=0.3, block_extension=0.1) as fake:
        answers = [requests.get(f"{fake.url}/0/public/Time", timeout=5) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert [bool(a.json().get("error")) for a in answers] == [False, False, True, True]
        assert answers[2].json() == {"error": ["EGeneral:Too many requests"]}
        # hammering while blocked keeps it blocked past the original 0.3 s
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert get(fake, "Time") == {"error": ["EGeneral:Too many requests"]}
            time.sleep(0.05)
        time.sleep(1.6)  # a quiet wait lets the block end
        assert get(fake, "Time")["error"] == []
        assert fake.calls["throttled"] >= 5


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("throttle", 200, ["EGeneral:Too many requests"]),
        ("unavailable", 200, ["EService:Unavailable"]),
        ("busy", 200, ["EService:Busy"]),
        ("internal", 200, ["EGeneral:Internal error"]),
        ("rate_limit", 200, ["EAPI:Rate limit exceeded"]),
        ("5xx", 502, None),
        ("520", 520, None),
        ("429", 429, None),
    ],
)
def test_injected_error_answers(fake: FakeKrakenREST, kind: str, status: int, error: list | None) -> None:
    fake.inject(kind, endpoint="Trades")
    assert get(fake, "Time")["error"] == []  # another endpoint is unaffected
    response = requests.get(f"{fake.url}/0/public/Trades", params={"pair": "XBTUSD"}, timeout=5)
    assert response.status_code == status
    if error is not None:
        assert response.json() == {"error": error}
    assert get(fake, "Trades", pair="XBTUSD", count=1)["error"] == []
    assert fake.calls[f"fault:{kind}"] == 1 and fake.pending_faults() == 0


def test_injected_drop_malformed_and_slow(history: list, clock: ManualClock) -> None:
    with FakeKrakenREST(FakeMarket({"BTC/USD": history}, clock=clock), slow_seconds=0.5) as fake:
        fake.inject("drop")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{fake.url}/0/public/Time", timeout=5)
        fake.inject("malformed")
        with pytest.raises(ValueError):
            requests.get(f"{fake.url}/0/public/Time", timeout=5).json()
        fake.inject("slow", count=2)
        with pytest.raises(requests.Timeout):
            requests.get(f"{fake.url}/0/public/Time", timeout=(1, 0.1))
        began = time.monotonic()
        assert requests.get(f"{fake.url}/0/public/Time", timeout=5).json()["error"] == []
        assert time.monotonic() - began >= 0.4
        with pytest.raises(ValueError):
            fake.inject("meteor")


def test_market_append_extends_the_history(history: list, clock: ManualClock) -> None:
    market = FakeMarket({"BTC/USD": history[:100]}, clock=clock)
    with pytest.raises(ValueError):
        market.append("BTC/USD", history[101:102])  # ids must continue
    market.append("BTC/USD", history[100:200])
    assert market.next_trade_id("BTC/USD") == 201
    assert market.trades("BTC/USD") == history[:200]


def test_demo_market_runs_on_the_real_clock() -> None:
    now = datetime.now(timezone.utc)
    market = demo_market(["BTC/USD"], days=0.05, trades_per_minute=5, seed=1, now=now)
    visible = market.trades("BTC/USD")
    assert visible and visible[-1].time <= datetime.now(timezone.utc)
    assert len(visible) < market.next_trade_id("BTC/USD") - 1  # future trades exist, unseen yet
