"""KrakenWSClient against the fake v2 server on loopback: streaming, acks, refusals, faults."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from itertools import count
from typing import Callable, Iterator

import pytest

from kraken_hist.core.errors import KrakenHistError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket
from kraken_hist.core.timeutils import utcnow
from kraken_hist.kraken.ws_client import (
    ConnectionLostError,
    KrakenWSClient,
    Subscription,
    SubscriptionRefusedError,
    SubscriptionTimeoutError,
    to_ws_symbol,
)
from kraken_hist.kraken.ws_parsing import MethodResponse, OhlcMessage, TradeMessage
from kraken_hist.kraken.ws_subscriptions import (
    SYMBOLS_PER_REQUEST,
    acked_subscription,
    late_subscriptions,
    subscribe_requests,
    wanted_subscriptions,
)

from .helpers import wait_for

SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD")
FAST = dict(heartbeat_timeout=1.0, ack_timeout=1.0, backoff_base=0.05, backoff_cap=0.2, poll_interval=0.05)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    wait_for(predicate, timeout=timeout, what=what, interval=0.01)


class Sink:
    """Collects what the client delivers, thread-safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trades: dict[str, dict[int, object]] = {}
        self.candles: list[OhlcMessage] = []
        self.errors: list[KrakenHistError] = []
        self.snapshots = 0

    def on_trade(self, message: TradeMessage) -> None:
        with self.lock:
            self.snapshots += message.snapshot
            for trade in message.trades:
                self.trades.setdefault(trade.symbol, {})[trade.trade_id] = trade.to_historical()

    def on_ohlc(self, message: OhlcMessage) -> None:
        with self.lock:
            self.candles.append(message)

    def on_error(self, error: KrakenHistError) -> None:
        with self.lock:
            self.errors.append(error)

    def ids(self, symbol: str) -> set[int]:
        with self.lock:
            return set(self.trades.get(symbol, {}))


@pytest.fixture
def market() -> FakeMarket:
    now = utcnow()
    return FakeMarket({s: generate_trades(s, now - timedelta(minutes=20), now, seed=3) for s in SYMBOLS})


@pytest.fixture
def server(market: FakeMarket) -> Iterator[FakeKrakenWS]:
    with FakeKrakenWS(market, heartbeat_interval=0.2) as fake:
        yield fake


def make_client(url: str, sink: Sink, symbols=SYMBOLS, **kwargs) -> KrakenWSClient:
    options = {**FAST, **kwargs}
    return KrakenWSClient(
        url, symbols, on_trade=sink.on_trade, on_ohlc=sink.on_ohlc, on_error=sink.on_error,
        rng=random.Random(7), **options,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [("BTC/USD", "BTC/USD"), ("XBTUSD", "BTC/USD"), ("XXBTZUSD", "BTC/USD"), ("xbtusd", "BTC/USD"),
     ("XBT/USD", "BTC/USD"), ("xdg/usd", "DOGE/USD"), ("XDGUSD", "DOGE/USD"), ("eth/usd", "ETH/USD"),
     (" SOL/USD ", "SOL/USD"), ("FOO/BAR", "FOO/BAR")],
)
def test_symbols_in_any_kraken_name_become_v2_names(name: str, expected: str) -> None:
    assert to_ws_symbol(name) == expected


def test_streams_every_published_trade_for_several_symbols(server: FakeKrakenWS, market: FakeMarket) -> None:
    sink = Sink()
    with make_client(server.url, sink) as client:
        assert client.wait_connected(5)
        server.wait_for_subscribers("trade", SYMBOLS)
        published = {s: [t.trade_id for t in server.publish_new(s, 40)] for s in SYMBOLS}
        for symbol in SYMBOLS:
            wait_until(lambda: set(published[symbol]) <= sink.ids(symbol), what=f"{symbol} trades")
        state = client.state()
    assert not client.is_running
    assert state.refused == {} and state.reconnects == 0
    assert {s.symbol for s in state.subscribed} == set(SYMBOLS)
    assert {(s.channel, s.interval) for s in state.subscribed} == {("trade", 0), ("ohlc", 1)}
    for symbol in SYMBOLS:
        # snapshot (the last 50 before) + the published ones, each exactly the market's trade
        expected = {t.trade_id: t for t in market.trades(symbol)[-90:]}
        assert sink.trades[symbol] == expected
    assert sink.snapshots == len(SYMBOLS)
    latest = {c.symbol: c for m in sink.candles for c in m.candles}
    for symbol in SYMBOLS:
        candle = latest[symbol]
        (truth,) = market.candles(symbol, 1, candle.time, candle.time + timedelta(minutes=1))
        assert candle == truth


def test_refused_symbol_is_reported_and_others_keep_streaming(server: FakeKrakenWS) -> None:
    sink = Sink()
    symbols = ("BTC/USD", "FOO/BAR", "ETH/USD")
    with make_client(server.url, sink, symbols=symbols) as client:
        assert client.wait_connected(5)
        server.wait_for_subscribers("trade", ["BTC/USD", "ETH/USD"])
        ids = [t.trade_id for t in server.publish_new("ETH/USD", 5)]
        wait_until(lambda: set(ids) <= sink.ids("ETH/USD"), what="ETH/USD trades")
        time.sleep(0.5)  # heartbeats flow meanwhile; the refusal must stay visible
        state = client.state()
    refused = [e for e in sink.errors if isinstance(e, SubscriptionRefusedError)]
    assert {(e.channel, e.symbol) for e in refused} == {("trade", "FOO/BAR"), ("ohlc", "FOO/BAR")}
    assert all(e.reason == "Currency pair not supported FOO/BAR" for e in refused)
    assert state.refused == {
        Subscription("trade", "FOO/BAR"): "Currency pair not supported FOO/BAR",
        Subscription("ohlc", "FOO/BAR", 1): "Currency pair not supported FOO/BAR",
    }
    assert state.reconnects == 0


def test_missing_ack_is_an_error_and_the_connection_is_renewed(market: FakeMarket) -> None:
    with FakeKrakenWS(market, heartbeat_interval=0.2, mute=["SOL/USD"]) as server:
        sink = Sink()
        with make_client(server.url, sink, symbols=("BTC/USD", "SOL/USD"), ack_timeout=0.4) as client:
            wait_until(lambda: any(isinstance(e, SubscriptionTimeoutError) for e in sink.errors), what="ack timeout")
            server.muted.clear()  # the exchange recovers: the replayed subscribe is acked
            assert client.wait_connected(5)
            wait_until(lambda: len(client.state().subscribed) == 4, what="all subscribed")
            state = client.state()
    timeouts = [e for e in sink.errors if isinstance(e, SubscriptionTimeoutError)]
    assert "SOL/USD" in str(timeouts[0]) and "BTC/USD" not in str(timeouts[0])
    assert state.reconnects >= 1 and state.refused == {}


def test_reconnects_after_drops_and_replays_subscriptions(server: FakeKrakenWS) -> None:
    sink = Sink()
    connects: list[int] = []
    with make_client(server.url, sink, on_connect=connects.append) as client:
        assert client.wait_connected(5)
        for _ in range(3):
            server.wait_for_subscribers("trade", SYMBOLS)
            assert server.drop_connections() == 1
            wait_until(lambda: server.subscribers("trade", "BTC/USD") == 1, what="resubscribe")
        server.wait_for_subscribers("trade", SYMBOLS)
        ids = [t.trade_id for t in server.publish_new("BTC/USD", 10)]
        wait_until(lambda: set(ids) <= sink.ids("BTC/USD"), what="trades after reconnect")
        state = client.state()
    assert connects == [1, 2, 3, 4]
    assert state.reconnects == 3
    assert sum(isinstance(e, ConnectionLostError) for e in sink.errors) >= 3


def test_watchdog_reconnects_a_stalled_connection(server: FakeKrakenWS) -> None:
    sink = Sink()
    with make_client(server.url, sink, symbols=("BTC/USD",), heartbeat_timeout=0.5) as client:
        assert client.wait_connected(5)
        server.wait_for_subscribers("trade", ["BTC/USD"])
        assert server.stall() == 1
        wait_until(lambda: client.state().reconnects == 1 and client.state().connected, what="watchdog reconnect")
        server.wait_for_subscribers("trade", ["BTC/USD"])
        ids = [t.trade_id for t in server.publish_new("BTC/USD", 3)]
        wait_until(lambda: set(ids) <= sink.ids("BTC/USD"), what="trades after stall")
    assert any("watchdog" in str(e) for e in sink.errors if isinstance(e, ConnectionLostError))


def test_pings_keep_a_quiet_connection_alive(market: FakeMarket) -> None:
    with FakeKrakenWS(market, heartbeat_interval=3600) as server:  # no heartbeats at all
        sink = Sink()
        with make_client(server.url, sink, symbols=("BTC/USD",), heartbeat_timeout=0.6, ping_after=0.2) as client:
            assert client.wait_connected(5)
            time.sleep(1.5)
            state = client.state()
    assert state.reconnects == 0 and state.connected
    assert server.stats["requests"] >= 4  # 2 subscribes + pings answered by pongs


def test_malformed_frames_are_skipped_never_fatal(server: FakeKrakenWS) -> None:
    sink = Sink()
    with make_client(server.url, sink, symbols=("BTC/USD",)) as client:
        assert client.wait_connected(5)
        server.wait_for_subscribers("trade", ["BTC/USD"])
        server.send_malformed()
        ids = [t.trade_id for t in server.publish_new("BTC/USD", 5)]
        wait_until(lambda: set(ids) <= sink.ids("BTC/USD"), what="trades after malformed frames")
        state = client.state()
    assert state.malformed == 5 and state.reconnects == 0


def test_a_failing_callback_does_not_end_the_stream(server: FakeKrakenWS) -> None:
    seen: list[int] = []

    def explode(message: TradeMessage) -> None:
        seen.extend(t.trade_id for t in message.trades)
        raise RuntimeError("strategy bug")

    client = KrakenWSClient(server.url, ["BTC/USD"], ohlc_intervals=(), on_trade=explode, **FAST)
    with client:
        assert client.wait_connected(5)
        server.wait_for_subscribers("trade", ["BTC/USD"])
        first = server.publish_new("BTC/USD", 2)
        second = server.publish_new("BTC/USD", 2)
        wait_until(lambda: second[-1].trade_id in seen, what="second batch")
        state = client.state()
    assert first[0].trade_id in seen and state.errors >= 2 and state.reconnects == 0


def test_unreachable_server_keeps_retrying_until_stopped() -> None:
    errors: list[KrakenHistError] = []
    client = KrakenWSClient("ws://127.0.0.1:9/v2", ["BTC/USD"], on_error=errors.append, **FAST)
    client.start()
    wait_until(lambda: len(errors) >= 3, what="several failed connects")
    started = time.monotonic()
    client.stop()
    assert time.monotonic() - started < 2
    assert not client.is_running and all(isinstance(e, ConnectionLostError) for e in errors)
    assert client.state().connections == 0


# --- the subscription decisions (pure) ------------------------------------------------------------


def test_subscribe_requests_group_by_channel_and_interval_in_chunks_of_fifty() -> None:
    names = ["BTC/USD", "ETH/USD"] + [f"T{i}/USD" for i in range(SYMBOLS_PER_REQUEST)]
    subs = wanted_subscriptions(names, PairRegistry(), trades=True, ohlc_intervals=(1, 5))
    requests = subscribe_requests(subs, count(7), trade_snapshot=False, ohlc_snapshot=True)
    assert [(r[0], r[2]["params"]["channel"], r[2]["params"].get("interval"), len(r[1])) for r in requests] == [
        (7, "trade", None, 50), (8, "trade", None, 2), (9, "ohlc", 1, 50), (10, "ohlc", 1, 2),
        (11, "ohlc", 5, 50), (12, "ohlc", 5, 2)]
    assert requests[0][2]["params"]["snapshot"] is False and requests[2][2]["params"]["snapshot"] is True
    assert requests[0][2]["params"]["symbol"][:2] == ["BTC/USD", "ETH/USD"]


def test_an_ack_answers_the_subscription_its_request_asked_for() -> None:
    trade, ohlc1, ohlc5 = Subscription("trade", "BTC/USD"), Subscription("ohlc", "BTC/USD", 1), Subscription(
        "ohlc", "BTC/USD", 5)
    ack = MethodResponse(method="subscribe", success=True, req_id=3, channel="ohlc", symbol="BTC/USD", interval=5)
    assert acked_subscription(ack, [ohlc1, ohlc5], [trade]) == ohlc5
    assert acked_subscription(ack, [], [trade, ohlc1, ohlc5]) == ohlc5  # no request known: any pending one
    refused = MethodResponse(method="subscribe", success=False, symbol="BTC/USD", error="Currency pair not supported")
    assert acked_subscription(refused, [trade], []) == trade  # a refusal names no channel
    assert acked_subscription(ack, [trade], []) is None
    assert late_subscriptions({ohlc5: 1.0, trade: 1.0, ohlc1: 3.0}, now=2.0) == [ohlc5, trade]
