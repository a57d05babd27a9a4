"""Every Kraken pair, under any of its names: backfill, import (a whole archive), candles, gaps
and the stream for pairs that are not built in, against the fake exchange's own listing."""

from __future__ import annotations

import json
import random
import zipfile
from datetime import datetime, timedelta, timezone
from typing import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from kraken_hist.cli import cli
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.testing.universe import default_universe

UTC = timezone.utc
START = datetime(2025, 4, 1, tzinfo=UTC)
HOURS = 3


def history(symbol: str) -> list:
    return generate_trades(symbol, START, START + timedelta(hours=HOURS), seed=3, trades_per_minute=6)


@pytest.fixture
def market() -> FakeMarket:
    """The whole fake market: every listed pair (and the delisted ones) has a history, made on demand."""
    return FakeMarket({}, clock=ManualClock(START + timedelta(hours=HOURS)), universe=default_universe(),
                      generate=history)


@pytest.fixture
def fake(market: FakeMarket) -> Iterator[FakeKrakenREST]:
    with FakeKrakenREST(market) as server:
        yield server


@pytest.fixture
def env(db_url: str, fake: FakeKrakenREST, tmp_path) -> dict[str, str]:
    return {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": fake.url, "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
            "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data")}


def run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def stored(db_url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


def fake_candles(market: FakeMarket, symbol: str) -> list[tuple]:
    return [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades)
            for c in market.candles(symbol, 1, START, START + timedelta(hours=HOURS))]


def test_any_pair_by_any_name_is_backfilled_under_one_symbol_with_kraken_s_candles(db_url, env, fake, market):
    listing = default_universe().find("XXRPZEUR")
    assert listing is not None and listing.price_decimals not in (1, 2)  # decimals of its own, not built in
    since = START.isoformat()
    run(env, "backfill", "ADA/USD", "--since", since, "--no-progress")
    run(env, "backfill", "XRPUSD", "--since", since, "--no-progress")  # REST altname
    run(env, "backfill", "XXRPZEUR", "--since", since, "--no-progress")  # legacy REST key
    run(env, "backfill", "xrp/eur", "--no-progress")  # the same pair again: resumes, nothing new
    assert fake.calls["AssetPairs"] == 1  # the whole answer once; every later name resolves offline
    symbols = [row[0] for row in stored(db_url, "SELECT DISTINCT symbol FROM trades ORDER BY 1")]
    assert symbols == ["ADA/USD", "XRP/EUR", "XRP/USD"]
    for symbol in symbols:
        count = stored(db_url, "SELECT count(*), count(DISTINCT trade_id) FROM trades WHERE symbol = %s", symbol)[0]
        assert count[0] == count[1] == len(market.trades(symbol))
        rows = stored(db_url, "SELECT time, open, high, low, close, vwap, volume, trades FROM candles "
                              "WHERE symbol = %s ORDER BY time", symbol)
        assert rows == fake_candles(market, symbol)  # vwap rounded down at the pair's own decimals
    table = json.loads(run(env, "pairs", "--search", "XRP", "--json"))
    xrp_eur = next(row for row in table if row["symbol"] == "XRP/EUR")
    assert (xrp_eur["rest_key"], xrp_eur["altname"], xrp_eur["price_decimals"], xrp_eur["status"]) == (
        "XXRPZEUR", "XRPEUR", listing.price_decimals, "online")
    # offline afterwards: reads and gap detection need no exchange at all
    offline = {**env, "KRAKEN_HIST_REST_URL": "http://127.0.0.1:9"}
    assert "no gaps" in run(offline, "gaps", "XRPEUR", "ADAUSD")
    hourly = run(offline, "candles", "ADAUSD", "-i", "1h", "--end", (START + timedelta(hours=HOURS)).isoformat(),
                 "--last", "2")
    assert hourly.count((START + timedelta(hours=HOURS - 1)).strftime("%Y-%m-%d")) >= 1
    assert fake.calls["AssetPairs"] == 1


def test_a_pair_kraken_does_not_have_is_refused_with_the_closest_names(env):
    result = CliRunner().invoke(cli, ["backfill", "XRPUSE", "--no-progress"], env=env)
    assert result.exit_code != 0
    assert "unknown symbol 'XRPUSE'" in result.output and "XRP/USD" in result.output


def _archive_member(trades: list) -> bytes:
    return "".join(f"{int(t.time.timestamp())},{t.price},{t.volume}\n" for t in trades).encode()


def test_a_whole_trading_history_zip_imports_every_pair_and_delisted_ones_from_their_file_names(
        db_url, env, market, tmp_path):
    universe = default_universe()
    rng = random.Random(4)
    listed = rng.sample([s for s in universe.symbols(listed_only=True) if s != "BTC/USD"], 12)
    delisted = [s for s in universe.symbols() if not universe.get(s).listed][:2]
    path = tmp_path / "Kraken_Trading_History.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for symbol in listed + delisted:
            archive.writestr(f"TimeAndSales_Combined/{universe.get(symbol).altname}.csv",
                             _archive_member(market.trades(symbol)))
        archive.writestr("TimeAndSales_Combined/NOTAPAIR.csv", "1743465600,1,1\n")
    result = CliRunner().invoke(cli, ["import", str(path), "--no-progress", "--json"], env=env)
    assert result.exit_code == 1  # one member refused
    outcome = json.loads(result.output)["results"]
    by_file = {r["file"].rsplit("/", 1)[-1]: r for r in outcome}
    assert by_file["NOTAPAIR.csv"]["status"] == "refused" and "NOTAPAIR" in by_file["NOTAPAIR.csv"]["reason"]
    for symbol in listed + delisted:
        record = by_file[f"{universe.get(symbol).altname}.csv"]
        assert (record["status"], record["symbol"]) == ("imported", symbol)
        assert record["imported"] == len(market.trades(symbol))
    counts = dict(stored(db_url, "SELECT symbol, count(*) FROM trades GROUP BY 1"))
    assert counts == {s: len(market.trades(s)) for s in listed + delisted}  # nothing under a wrong symbol
    pairs = {row[0]: row[1:] for row in stored(db_url, "SELECT symbol, status, origin, decimals_inferred, "
                                                       "price_decimals FROM pairs")}
    for symbol in delisted:  # recorded from the file name, decimals read off its prices
        status, origin, inferred, decimals = pairs[symbol]
        assert (status, origin, inferred) == ("inferred", "file_name", True)
        assert decimals == universe.get(symbol).price_decimals  # the file's prices carry the pair's places
    for symbol in listed:
        assert pairs[symbol][:3] == ("online", "asset_pairs", False)


def test_one_stream_carries_hundreds_of_pairs(db_url, settings):
    """`kraken-hist stream all`: hundreds of pairs on one connection (subscribed in batches),
    every trade stored under its pair, in the pair's own decimals."""
    import time

    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.ingest.live import WebSocketDBIntegration
    from kraken_hist.storage.pair_store import PairResolver
    from kraken_hist.kraken.rest_client import KrakenRestClient
    from kraken_hist.testing.fake_ws import FakeKrakenWS
    from kraken_hist.core.timeutils import utcnow
    from kraken_hist.storage.writer import DatabaseWriter
    from kraken_hist.kraken.ws_client import KrakenWSClient

    from .helpers import FAST_WS

    now = utcnow()
    live_market = FakeMarket({}, universe=default_universe(), generate=lambda s: generate_trades(
        s, now - timedelta(minutes=3), now - timedelta(seconds=5), seed=9, trades_per_minute=2))
    with FakeKrakenREST(live_market) as rest, FakeKrakenWS(live_market, heartbeat_interval=0.5) as ws:
        client = KrakenRestClient(rest.url, min_interval=0.0)
        resolver = PairResolver(db_url, fetch_asset_pairs=client.get_asset_pairs)
        symbols = resolver.expand(["all"])[:250]
        assert len(symbols) == 250 and fake_has_all(live_market, symbols)
        writer = DatabaseWriter(db_url, trade_flush_interval=0.2, settings=settings, data_dir=settings.data_dir).start()
        backfill = KrakenTradesBackfill(db_url, client=client)
        integration = WebSocketDBIntegration(writer, db_url=db_url, rest=backfill, symbols=symbols,
                                             progress_interval=0.5).start()
        stream = KrakenWSClient(ws.url, symbols, **integration.callbacks(), ohlc_intervals=(), **FAST_WS)
        stream.start()
        try:
            assert stream.wait_connected(30)
            ws.wait_for_subscribers("trade", symbols, timeout=30)
            for symbol in symbols:
                ws.publish_new(symbol, 2)
            expected = {s: len(live_market.trades(s, now - timedelta(minutes=5))) for s in symbols}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = dict(stored(db_url, "SELECT symbol, count(*) FROM trades GROUP BY 1"))
                if got == expected:
                    break
                time.sleep(0.2)
            assert got == expected
        finally:
            stream.stop()
            integration.stop()
            writer.stop()
            backfill.close()
            client.close()


def fake_has_all(market: FakeMarket, symbols: list[str]) -> bool:
    return all(market.has(s) for s in symbols)


def _pair_of(name: str):
    from kraken_hist.core.pairs import Pair

    item = default_universe().find(name)
    assert item is not None
    return Pair(symbol=item.symbol, altname=item.altname, rest_key=item.rest_key, wsname=item.wsname,
                price_decimals=item.price_decimals, lot_decimals=item.lot_decimals, origin="asset_pairs")


def test_the_registry_a_service_is_given_is_the_one_it_fetches_and_stores_with(db_url, fake, market, settings):
    """No global decides: a backfill given a registry that knows ADA/USD (the database's table
    does not, and AssetPairs is never asked) fetches and stores it; the same backfill without a
    registry uses its database's and refuses the name."""
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.core.errors import UnknownSymbolError
    from kraken_hist.core.pairs import PairRegistry
    from kraken_hist.kraken.rest_client import KrakenRestClient

    registry = PairRegistry()
    registry.add(_pair_of("ADAUSD"))
    with KrakenRestClient(fake.url, min_interval=0) as client:
        with KrakenTradesBackfill(db_url, client, settings=settings, registry=registry) as job:
            job.backfill_symbol("ADAUSD", since=START)
        with KrakenTradesBackfill(db_url, client, settings=settings) as job, pytest.raises(UnknownSymbolError):
            job.backfill_symbol("SOLEUR", since=START)
    assert fake.calls.get("AssetPairs", 0) == 0
    assert stored(db_url, "SELECT count(*) FROM trades WHERE symbol = 'ADA/USD'")[0][0] == len(market.trades("ADA/USD"))
    assert stored(db_url, "SELECT time, open, high, low, close, vwap, volume, trades FROM candles "
                          "WHERE symbol = 'ADA/USD' ORDER BY time") == fake_candles(market, "ADA/USD")


def test_a_pair_another_process_learnt_is_known_to_a_running_writer(db_url):
    """The database's registry reads the table again when a name is missing: a pair another
    process stored in the table is accepted by a writer started before it was there."""
    from decimal import Decimal

    from kraken_hist.storage.pair_store import database_registry, write_pairs
    from kraken_hist.core.types import TradeRecord
    from kraken_hist.storage.writer import DatabaseWriter

    pair = _pair_of("DOTUSD")
    assert not database_registry(db_url).is_known(pair.symbol)
    with DatabaseWriter(db_url, trade_flush_interval=0.05) as writer:
        with psycopg.connect(db_url, autocommit=True) as conn:  # as `kraken-hist pairs --refresh` elsewhere
            write_pairs(conn, [pair])
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while not database_registry(db_url).is_known(pair.symbol):  # re-read at most once a second
            assert datetime.now(UTC) < deadline
        writer.write_trade(TradeRecord(symbol=pair.symbol, trade_id=1, time=START, price=Decimal("4.1234"),
                                       volume=Decimal("2"), side="b", ord_type="l"))
        assert writer.flush(timeout=10)
    assert stored(db_url, "SELECT symbol, vwap FROM candles") == [(pair.symbol, Decimal("4.1234"))]
