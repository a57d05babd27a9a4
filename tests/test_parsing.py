"""REST answers → records: the recorded real answers parse exactly and agree with each other."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from kraken_hist.rules.candles import candles_from_trades
from kraken_hist.core.errors import ExchangePermanentError
from kraken_hist.kraken.rest_parsing import (
    ParseError,
    loads,
    pair_entry,
    parse_ohlc_result,
    parse_server_time,
    parse_system_status,
    parse_trade,
    parse_trades_result,
)
from kraken_hist.kraken.rest_client import unwrap
from kraken_hist.core.timeutils import from_unix_ns
from kraken_hist.core.types import CandleSource

UTC = timezone.utc


def test_trade_row_is_read_from_the_numbers_text() -> None:
    row = loads('["105433.60000","0.00027625",1762795433.9717445,"b","l","",10218208]')
    trade = parse_trade("BTC/USDT", row)
    assert trade.price == Decimal("105433.60000") and trade.volume == Decimal("0.00027625")
    assert trade.time == datetime(2025, 11, 10, 17, 23, 53, 971744, tzinfo=UTC)  # truncated, not rounded
    assert (trade.side, trade.ord_type, trade.trade_id) == ("b", "l", 10218208)


def test_a_binary_float_time_is_refused() -> None:
    row = json.loads('["105433.6","0.1",1762795433.9717445,"b","l","",1]')  # parsed without Decimal
    with pytest.raises(ParseError, match="parse_float=Decimal"):
        parse_trade("BTC/USD", row)


@pytest.mark.parametrize(
    "row",
    [
        ["1", "1", "1700000000.1", "b", "l", ""],  # no trade id (pre-2022 answers)
        ["1", "1", "1700000000.1", "b", "l", "", "12"],  # id as a string
        ["x", "1", "1700000000.1", "b", "l", "", 12],
        ["-1", "1", "1700000000.1", "b", "l", "", 12],
    ],
)
def test_bad_trade_rows(row: list) -> None:
    with pytest.raises(ParseError):
        parse_trade("BTC/USD", row)


def test_pair_key_is_the_single_non_last_key() -> None:
    assert pair_entry({"XXBTZUSD": [], "last": "1"}) == ("XXBTZUSD", [])
    assert pair_entry({"last": 5, "BTC/USD": [1]}) == ("BTC/USD", [1])
    for bad in ({"last": "1"}, {"A": [], "B": [], "last": "1"}, ["A"]):
        with pytest.raises(ParseError):
            pair_entry(bad)  # type: ignore[arg-type]


def test_trades_last_must_be_nanoseconds() -> None:
    assert parse_trades_result({"XBTUSD": [], "last": 1790359841138228746}, "BTC/USD").last == "1790359841138228746"
    for last in (None, "17.5", "abc"):
        with pytest.raises(ParseError):
            parse_trades_result({"XBTUSD": [], "last": last}, "BTC/USD")


def test_ohlc_last_int_or_string_and_filler_rows() -> None:
    hour = 1_699_999_200  # 2023-11-14 22:00 UTC
    rows = [[hour + 60, "10.0", "10.0", "10.0", "10.0", "10.0", "1.0", 1],
            [hour + 120, "10.0", "10.0", "10.0", "10.0", "0.0", "0.00000000", 0],
            [hour + 180, "11", "11", "11", "11", "11", "2", 2]]
    for last in (hour + 120, str(hour + 120)):
        page = parse_ohlc_result({"XXBTZUSD": rows, "last": last}, "BTC/USD", 1)
        assert page.last == hour + 120 and page.refused == ()
        assert [r.time.minute for r in page.finished_rows()] == [1, 2]
        assert [r.time.minute for r in page.trading_rows()] == [1]
    assert page.rows[1].is_filler and not page.rows[0].is_filler
    assert page.rows[0].to_candle_record().source is CandleSource.REST_OHLC
    with pytest.raises(ValueError):
        page.rows[1].to_candle_record()
    assert page.rows[1].to_candle().vwap is None


def test_time_and_status() -> None:
    assert parse_server_time({"unixtime": 1762820224, "rfc1123": "x"}) == datetime(2025, 11, 11, 0, 17, 4, tzinfo=UTC)
    status = parse_system_status({"status": "maintenance", "timestamp": "2025-11-11T00:17:10Z"})
    assert not status.online and status.timestamp == datetime(2025, 11, 11, 0, 17, 10, tzinfo=UTC)


# --- recorded real answers ------------------------------------------------------------------


def _result(path: Path) -> object:
    return unwrap(200, path.read_bytes(), path.name)


def test_recorded_trades_parse_exactly(samples_dir: Path) -> None:
    page = parse_trades_result(_result(samples_dir / "http_trades.json"), "BTC/USDT")  # type: ignore[arg-type]
    raw = json.loads((samples_dir / "http_trades.json").read_text(), parse_float=Decimal)["result"]["XBTUSDT"]
    assert len(page.trades) == 1000
    assert [t.trade_id for t in page.trades] == list(range(10218208, 10219208))  # contiguous [real]
    for trade, row in zip(page.trades, raw):
        assert trade.price.as_tuple() == Decimal(row[0]).as_tuple()  # digits and exponent kept
        assert trade.volume.as_tuple() == Decimal(row[1]).as_tuple()
        micros = int((row[2] * 1_000_000).to_integral_value(rounding="ROUND_FLOOR"))
        assert trade.time == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
        assert (trade.side, trade.ord_type) == (row[3], row[4])
    # `last` is the nanosecond time of the last trade, more precise than its float
    assert from_unix_ns(page.last) == page.trades[-1].time


def test_candles_from_recorded_trades_equal_krakens_candles(samples_dir: Path) -> None:
    trades = parse_trades_result(_result(samples_dir / "http_trades.json"), "BTC/USDT").trades  # type: ignore[arg-type]
    ohlc = parse_ohlc_result(_result(samples_dir / "http_ohlc.json"), "BTC/USDT", 1)  # type: ignore[arg-type]
    assert len(ohlc.rows) == 721 and len(ohlc.finished_rows()) == 720
    built = {c.time: c for c in candles_from_trades(trades)}
    rows = {r.time: r for r in ohlc.rows}
    first = trades[0].time.replace(second=0, microsecond=0) + timedelta(minutes=1)  # first whole minute
    last = trades[-1].time.replace(second=0, microsecond=0)  # exclusive: the last minute is partial
    minutes = int((last - first).total_seconds() // 60)
    assert minutes == 409
    quiet = 0
    for i in range(minutes):
        minute = first + timedelta(minutes=i)
        row = rows[minute]
        candle = built.get(minute)
        if candle is None:
            quiet += 1
            previous = rows[minute - timedelta(minutes=1)]
            assert row.is_filler
            assert row.open == row.high == row.low == row.close == previous.close
            assert row.vwap == 0 and row.volume == 0
        else:
            assert (row.open, row.high, row.low, row.close, row.volume, row.count) == (
                candle.open, candle.high, candle.low, candle.close, candle.volume, candle.trades)
            assert row.vwap == candle.vwap
    assert quiet == 137


def test_recorded_small_answers(samples_dir: Path) -> None:
    answers = json.loads((samples_dir / "http_recorded_small.json").read_text())
    trades = parse_trades_result(unwrap(200, answers["trades_BTC/USD_2026-09-25"], "t"), "BTC/USD")
    assert [t.trade_id for t in trades.trades] == [109118758, 109118759, 109118760]
    assert trades.trades[1].time == trades.trades[2].time  # two fills of one taker order
    assert trades.trades[0].time == datetime(2026, 9, 25, 18, 10, 40, 939291, tzinfo=UTC)
    assert trades.last == "1790359841138228746" and from_unix_ns(trades.last) == trades.trades[-1].time
    hourly = parse_ohlc_result(unwrap(200, answers["ohlc_1h_BTC/USD_2026-09-25"], "o"), "BTC/USD", 60)
    assert len(hourly.rows) == 4 and hourly.last == 1790355600
    assert len(hourly.finished_rows()) == 3 and hourly.rows[0].count == 9205
    with pytest.raises(ExchangePermanentError, match="EQuery:Unknown asset pair"):
        unwrap(200, answers["unknown_pair_error"], "Trades")
