import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from kraken_hist.rules.candles import candles_from_trades, kraken_vwap, resample
from kraken_hist.core.timeutils import from_unix_decimal
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade

UTC = timezone.utc


def t(trade_id, second, price, volume, minute=0):
    return HistoricalTrade(symbol="BTC/USD", trade_id=trade_id, time=datetime(2025, 1, 1, 0, minute, second, tzinfo=UTC), price=Decimal(price), volume=Decimal(volume))


def test_vwap_is_rounded_down_not_half_even():
    trades = [t(1, 0, "100.0", "1"), t(2, 1, "100.2", "1")]  # exact 100.1
    assert kraken_vwap(trades, 1) == Decimal("100.1")
    trades = [t(1, 0, "100.0", "1"), t(2, 1, "100.1", "2")]  # 100.0666…
    assert kraken_vwap(trades, 1) == Decimal("100.0")
    trades = [t(1, 0, "100.0", "1"), t(2, 1, "100.1", "5")]  # 100.0833…: half-even gives 100.1
    assert kraken_vwap(trades, 1) == Decimal("100.0")


def test_open_close_follow_time_then_id_and_minutes_split():
    trades = [t(3, 5, "11", "1"), t(1, 5, "10", "1"), t(2, 5, "12", "1"), t(4, 10, "9", "2", minute=1)]
    first, second = candles_from_trades(trades)
    assert (first.open, first.high, first.low, first.close, first.trades, first.volume) == (Decimal(10), Decimal(12), Decimal(10), Decimal(11), 3, Decimal(3))
    assert second.time == datetime(2025, 1, 1, 0, 1, tzinfo=UTC) and second.trades == 1


def test_resample_weights_vwap_by_volume():
    base = datetime(2025, 1, 1, tzinfo=UTC)
    candles = [
        HistoricalCandle(symbol="BTC/USD", interval=1, time=base + timedelta(minutes=i), open=Decimal(o), high=Decimal(h), low=Decimal(lo), close=Decimal(c), volume=Decimal(v), vwap=Decimal(w), trades=n)
        for i, (o, h, lo, c, v, w, n) in enumerate([(10, 12, 9, 11, 1, 10, 2), (11, 15, 11, 14, 3, 14, 5), (14, 14, 8, 8, 0, 0, 0)])
    ]
    (bucket,) = resample(candles, 5)
    assert (bucket.open, bucket.high, bucket.low, bucket.close, bucket.volume, bucket.trades) == (Decimal(10), Decimal(15), Decimal(8), Decimal(8), Decimal(4), 7)
    assert bucket.vwap == Decimal(13)


def test_candles_built_from_real_trades_equal_krakens_candles(samples_dir):
    """KRAKEN.md's rule, checked on the recorded XBTUSDT answers: 409 whole minutes."""
    trades_raw = json.loads((samples_dir / "http_trades.json").read_text(), parse_float=Decimal)["result"]["XBTUSDT"]
    ohlc_raw = json.loads((samples_dir / "http_ohlc.json").read_text())["result"]["XBTUSDT"]
    trades = [
        HistoricalTrade(symbol="BTC/USDT", trade_id=row[6], time=from_unix_decimal(row[2]), price=Decimal(row[0]), volume=Decimal(row[1]), side=row[3], ord_type=row[4])
        for row in trades_raw
    ]
    built = {c.time: c for c in candles_from_trades(trades)}
    first_whole = trades[0].time.replace(second=0, microsecond=0) + timedelta(minutes=1)
    last_whole = trades[-1].time.replace(second=0, microsecond=0)
    compared = quiet = 0
    for row in ohlc_raw:
        minute = datetime.fromtimestamp(row[0], UTC)
        if not first_whole <= minute < last_whole:
            continue
        count = row[7]
        if count == 0:
            assert minute not in built  # a filler candle is a quiet minute, not trading
            quiet += 1
            continue
        candle = built[minute]
        assert (candle.open, candle.high, candle.low, candle.close) == tuple(Decimal(x) for x in row[1:5])
        assert candle.volume == Decimal(row[6]) and candle.trades == count
        assert candle.vwap == Decimal(row[5]), minute
        compared += 1
    assert compared + quiet == 409 and quiet == 137
