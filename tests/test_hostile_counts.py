"""Trade counts near 2**31 and one symbol's failing refresh (issue 14): counts fit their columns,
a refresh failure of one symbol neither stops the others nor crashes the stream."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from kraken_hist.core.bounds import MAX_TRADE_COUNT, count_problem
from kraken_hist.cli.stream import PeriodicRefresh
from kraken_hist.ingest.archive.formats import BadRowReport, parse_ohlcvt, sniff_layout
from kraken_hist.kraken.rest_parsing import parse_ohlc_result
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.core.types import CandleRecord
from kraken_hist.storage.writer import DatabaseWriter

UTC = timezone.utc
T0 = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday


def write_candles(db_url: str, rows: list[tuple[str, datetime, int]]) -> None:
    with DatabaseWriter(db_url, candle_flush_interval=0.05) as writer:
        for symbol, when, count in rows:
            writer.write_candle(CandleRecord(symbol=symbol, time=when, open=Decimal(10), high=Decimal(11),
                                             low=Decimal(9), close=Decimal(10), volume=Decimal(1), vwap=Decimal(10),
                                             trades=count, source="csv_ohlc"))
        assert writer.flush(timeout=10)


def stored(db_url: str, relation: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(f"SELECT symbol, time, trades FROM {relation} ORDER BY 1, 2").fetchall()


def test_counts_are_bounded_at_every_edge() -> None:
    assert count_problem(MAX_TRADE_COUNT) is None and count_problem(0) is None
    assert "does not fit" in count_problem(2**31)  # type: ignore[operator]
    page = parse_ohlc_result({"XXBTZUSD": [[1741000000, "1", "1", "1", "1", "1", "1", 2**31],
                                           [1741000060, "1", "1", "1", "1", "1", "1", 5]], "last": 1741000000},
                             "BTC/USD", 1, now=T0 + timedelta(days=30))
    assert [r.count for r in page.rows] == [5] and "does not fit" in page.refused[0].reason
    report = BadRowReport("XBTUSD_1.csv")
    lines = [b"1741003200,1,1,1,1,1,2147483648\n", b"1741003260,1,1,1,1,1,2147483000\n"]
    layout = sniff_layout(lines[0], "XBTUSD_1.csv")
    chunks = list(parse_ohlcvt(lines, layout=layout, report=report, chunk_size=10))
    assert sum(c.rows for c in chunks) == 1 and report.counts == {"trades": 1}
    with pytest.raises(ValueError, match="does not fit"):
        CandleRecord(symbol="BTC/USD", time=T0, open=1, high=1, low=1, close=1, volume=1, vwap=1, trades=2**31)


def test_counts_near_2_31_aggregate_at_every_level(db_url: str) -> None:
    big = MAX_TRADE_COUNT - 10
    # two near-2**31 minutes in one 5-minute bucket, and a symbol sorted after it
    write_candles(db_url, [("BTC/USD", T0, big), ("BTC/USD", T0 + timedelta(minutes=1), big),
                           ("ETH/USD", T0, 7)])
    result = refresh_aggregates(db_url)
    assert result.failed == {} and set(result.symbols) == {"BTC/USD", "ETH/USD"}
    for relation in ("candles_5m", "candles_1h", "candles_1d", "candles_1w"):
        assert [row[2] for row in stored(db_url, relation)] == [2 * big, 7], relation


def test_a_symbol_whose_refresh_fails_does_not_stop_the_others_nor_the_stream(
        db_url: str, caplog: pytest.LogCaptureFixture, plain_postgresql: None) -> None:
    # (plain PostgreSQL: the refresh runs per symbol there; on TimescaleDB candles_5m is a view,
    # refreshed for all symbols at once)
    with psycopg.connect(db_url, autocommit=True) as conn:  # BTC/USD's buckets cannot be written
        conn.execute("""CREATE FUNCTION refuse_btc() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN RAISE EXCEPTION 'integer out of range' USING ERRCODE = '22003'; END $$""")
        conn.execute("CREATE TRIGGER refuse_btc BEFORE INSERT ON candles_5m FOR EACH ROW "
                     "WHEN (NEW.symbol = 'BTC/USD') EXECUTE FUNCTION refuse_btc()")
    write_candles(db_url, [("BTC/USD", T0, 3), ("ETH/USD", T0, 7), ("SOL/USD", T0, 9)])
    result = refresh_aggregates(db_url)
    assert list(result.failed) == ["BTC/USD"] and "integer out of range" in result.failed["BTC/USD"]
    assert set(result.symbols) == {"ETH/USD", "SOL/USD"}
    assert [row[0] for row in stored(db_url, "candles_5m")] == ["ETH/USD", "SOL/USD"]
    with psycopg.connect(db_url) as conn:  # BTC/USD's changes stay queued for the next refresh
        assert conn.execute("SELECT DISTINCT symbol FROM candle_changes").fetchall() == [("BTC/USD",)]
    # the stream's periodic refresh logs it and goes on (it used to crash the stream)
    with caplog.at_level(logging.WARNING, logger="kraken_hist.cli.stream"):
        PeriodicRefresh(db_url, 60).run()
    assert any("BTC/USD" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
