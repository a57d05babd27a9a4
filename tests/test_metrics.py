"""Prometheus metrics and health of ``kraken-hist stream`` (a real process, fake exchange, real
database), and the endpoint itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kraken_hist.ops.metrics import MetricsServer, TradeTracker
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.market import FakeMarket

from .helpers import LIVE_SYMBOLS as SYMBOLS, StreamProcess, free_port, get, scrape, value, wait_for


def test_stream_serves_metrics_and_health(db_url: str, tmp_path: Path,
                                          exchange: tuple[FakeMarket, FakeKrakenWS, FakeKrakenREST]) -> None:
    market, ws, rest = exchange
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_WS_URL": ws.url,
        "KRAKEN_HIST_REST_URL": rest.url,
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
        "KRAKEN_HIST_METRICS_PORT": str(port),
    }
    stream = StreamProcess(env, *SYMBOLS, "--flush-interval", "0.2", "--status-interval", "0.2",
                           "--heartbeat-timeout", "3")
    try:
        try:
            ws.wait_for_subscribers("trade", SYMBOLS, timeout=30)
        except TimeoutError:
            raise AssertionError("\n".join(stream.lines)) from None
        for symbol in SYMBOLS:
            ws.publish_new(symbol, 30)
        samples = wait_for(lambda: (s := scrape(port)) and (value(s, "kraken_hist_stream_trades_total",
                                                                   symbol="ETH/USD") or 0) >= 30 and s,
                           what="trades in the metrics")
        assert ws.drop_connections() >= 1
        wait_for(lambda: value(scrape(port), "kraken_hist_ws_reconnects_total") == 1.0, what="a reconnect")
        ws.wait_for_subscribers("trade", SYMBOLS, timeout=30)
        ws.publish_new("BTC/USD", 5)
        samples = wait_for(lambda: (s := scrape(port)) and value(s, "kraken_hist_writer_spool_pending") == 0
                           and (value(s, "kraken_hist_writer_written_total", kind="trades") or 0) >= 65 and s,
                           what="trades written")
        status, body = get(f"http://127.0.0.1:{port}/healthz")
    finally:
        code = stream.terminate()
    assert code == 0, "\n".join(stream.lines)
    assert value(samples, "kraken_hist_stream_trades_total", symbol="BTC/USD") >= 35  # type: ignore[operator]
    for symbol in SYMBOLS:
        assert 0 <= value(samples, "kraken_hist_stream_last_trade_age_seconds", symbol=symbol) < 30  # type: ignore[operator]
    assert value(samples, "kraken_hist_ws_connected") == 1.0
    # a fresh stream fetches the first minute's earlier trades through REST, through the limiter
    assert value(samples, "kraken_hist_rest_calls_total", endpoint="Trades", outcome="ok") >= 1  # type: ignore[operator]
    assert value(samples, "kraken_hist_rest_wait_seconds_count") >= 1  # type: ignore[operator]
    assert value(samples, "kraken_hist_writer_commit_latency_seconds", quantile="0.99") is not None
    assert value(samples, "kraken_hist_database_up") == 1.0
    assert value(samples, "kraken_hist_aggregate_lag_seconds") is not None
    assert value(samples, "kraken_hist_rest_blocked_seconds") == 0.0
    assert status == 200 and json.loads(body)["ok"] is True and json.loads(body)["connected"] is True
    assert any("metrics on http://127.0.0.1:" in line for line in stream.lines)


def test_the_endpoint_answers_metrics_health_and_nothing_else() -> None:
    registry = CollectorRegistry()
    healthy = [True]
    with MetricsServer(0, registry, health=lambda: (healthy[0], {"why": "test"}), host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/metrics")[0] == 200
        assert get(base + "/healthz") == (200, '{"ok": true, "why": "test"}')
        healthy[0] = False
        assert get(base + "/healthz")[0] == 503
        assert get(base + "/")[0] == 404


def test_trade_tracker_counts_per_symbol_and_ages_the_last_trade() -> None:
    now = [100.0]
    tracker = TradeTracker(clock=lambda: now[0])
    seen: list[Any] = []
    on_trade = tracker.wrap(seen.append)

    class Trade:
        def __init__(self, symbol: str) -> None:
            self.symbol = symbol

    class Message:
        trades = (Trade("BTC/USD"), Trade("BTC/USD"), Trade("ETH/USD"))

    on_trade(Message())
    now[0] += 2.5
    counts, ages = tracker.snapshot()
    assert len(seen) == 1  # the integration still gets every message
    assert counts == {"BTC/USD": 2, "ETH/USD": 1} and ages == {"BTC/USD": 2.5, "ETH/USD": 2.5}


@pytest.mark.parametrize("port", ["x", "70000"])
def test_bad_metrics_port_is_one_clear_line(port: str) -> None:
    from kraken_hist.core.config import Settings
    from kraken_hist.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="KRAKEN_HIST_METRICS_PORT must be a TCP port"):
        Settings.from_env({"KRAKEN_HIST_METRICS_PORT": port})
