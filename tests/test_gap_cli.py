"""``kraken-hist gaps``: the table of gaps, then filling, against the fake exchange."""

import json
from datetime import datetime, timedelta, timezone

from click.testing import CliRunner

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.cli.main import cli
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def test_gaps_lists_then_fills(db_url, conn, tmp_path):
    history = generate_trades("ETH/USD", T0, T0 + timedelta(hours=2), trades_per_minute=5)
    market = FakeMarket({"ETH/USD": history}, clock=ManualClock(T0 + timedelta(days=2)))
    with FakeKrakenREST(market) as server:
        client = KrakenRestClient(server.url, min_interval=0, max_retries=0, limiter=RateLimiter(0))
        with KrakenTradesBackfill(db_url, client=client) as bf:
            bf.backfill_symbol("ETH/USD", since=T0)
        conn.execute("DELETE FROM trades WHERE trade_id BETWEEN 20 AND 29")
        conn.commit()
        env = {
            "KRAKEN_HIST_DATABASE_URL": db_url,
            "KRAKEN_HIST_REST_URL": server.url,
            "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
            "KRAKEN_HIST_DATA_DIR": str(tmp_path),
        }
        runner = CliRunner()
        listed = runner.invoke(cli, ["gaps", "ETH/USD"], env=env)
        assert listed.exit_code == 0, listed.output
        assert "trade_ids" in listed.output and "20..29 (10)" in listed.output

        as_json = runner.invoke(cli, ["gaps", "--json"], env=env)
        assert json.loads(as_json.output)[0]["first_missing_id"] == 20

        filled = runner.invoke(cli, ["gaps", "ETH/USD", "--fill", "--no-progress"], env=env)
        assert filled.exit_code == 0, filled.output
        assert "ETH/USD: 1 found, 1 filled" in filled.output
        assert server.calls["Trades"] >= 1

        after = runner.invoke(cli, ["gaps", "--since", "2025-03-01"], env=env)
        assert after.exit_code == 0 and after.output.strip() == "no gaps"
        client.close()


def test_gaps_refuses_an_unknown_symbol(settings):
    result = CliRunner().invoke(cli, ["gaps", "NOPE/USD"], env={"KRAKEN_HIST_DATABASE_URL": settings.database_url})
    assert result.exit_code != 0 and "unknown symbol" in result.output
