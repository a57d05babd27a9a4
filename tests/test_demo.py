"""`kraken-hist demo` and the one-market fake exchange (issue 18): the demo runs on a database
of its own, never the user's, and the stream and REST of the fake tell one story."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from kraken_hist.cli.demo import demo_data_dir, demo_database_url, recreate_database
from kraken_hist.core.config import Settings
from kraken_hist.testing.fake_exchange import FakeExchange

def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

def test_fake_exchange_serves_one_market_on_rest_and_websocket() -> None:
    # Regression (issue 18): fake_rest and fake_ws were separate processes with different
    # generated markets, so a stream stored nothing and its catch-up pulled the other market in.
    with FakeExchange(["BTC/USD"], days=0.01, trades_per_second=20, publish_interval=0.05) as exchange:
        first = exchange.market.next_trade_id("BTC/USD")
        deadline = time.monotonic() + 5
        while exchange.market.next_trade_id("BTC/USD") == first and time.monotonic() < deadline:
            time.sleep(0.02)
        published = exchange.market.trades("BTC/USD")[-1]
        assert published.trade_id >= first
        with urllib.request.urlopen(f"{exchange.rest_url}/0/public/Trades?pair=XBTUSD&count=1000") as answer:
            body = json.loads(answer.read())
        rows = next(v for k, v in body["result"].items() if k != "last")
        assert published.trade_id in {row[6] for row in rows}  # the published trade is on REST too
        assert exchange.ws_url.startswith("ws://127.0.0.1:")

def test_demo_database_is_never_the_users(tmp_path: Path) -> None:
    configured = Settings(database_url="postgresql://u@db.example:5432/market", data_dir=tmp_path)
    url, where = demo_database_url(configured)
    assert url == "postgresql://u@db.example:5432/market_demo" and "market_demo" in where
    assert demo_data_dir(Settings(data_dir=tmp_path)) == tmp_path / "demo"
    with pytest.raises(Exception, match="not the demo's database"):
        recreate_database("postgresql://u@db.example:5432/market", configured)

# The demo's run itself (its own database, archive + REST + stream trades, nothing in the user's
# database) is tested once, as the README's quick start: tests/test_readme_quickstart.py.
