from datetime import datetime, timezone
from decimal import Decimal

import pytest

from kraken_hist.core.types import CandleRecord, CandleSource, DataGap, GapKind, TradeRecord, TradeSource

UTC = timezone.utc
T0 = datetime(2025, 11, 10, 17, 23, 53, 971744, tzinfo=UTC)


def trade(**overrides):
    values = dict(symbol="xbt/usd", trade_id=1, time=T0, price=Decimal("105433.6"), volume=Decimal("0.00027625"), side="b", ord_type="l")
    values.update(overrides)
    return TradeRecord(**values)


def test_trade_record_normalises_symbol_and_keeps_decimals():
    record = trade()
    assert record.symbol == "BTC/USD"
    assert record.price == Decimal("105433.6") and record.source is TradeSource.REST


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"price": Decimal("NaN")}, "price must be finite"),
        ({"price": Decimal("Infinity")}, "price must be finite"),
        ({"price": Decimal("0")}, "price must be positive"),
        ({"price": Decimal("-1")}, "price must be positive"),
        ({"price": 1.5}, "price must be a Decimal"),
        ({"volume": Decimal("-0.1")}, "volume must not be negative"),
        ({"time": datetime(2025, 1, 1)}, "time must be timezone-aware"),
        ({"symbol": "NOPE"}, "symbol must be a BASE/QUOTE name"),
        ({"symbol": "XBTUSD"}, "symbol must be a BASE/QUOTE name"),
        ({"side": "buy"}, "side must be"),
        ({"trade_id": "7"}, "trade_id must be an int"),
    ],
)
def test_trade_record_refuses_what_cannot_be_right(overrides, message):
    with pytest.raises(ValueError, match=message):
        trade(**overrides)


def candle(**overrides):
    values = dict(symbol="BTC/USD", time=datetime(2025, 1, 1, 0, 1, tzinfo=UTC), open=Decimal(10), high=Decimal(12), low=Decimal(9), close=Decimal(11), volume=Decimal(3), vwap=Decimal("10.5"), trades=4)
    values.update(overrides)
    return CandleRecord(**values)


def test_candle_record_defaults_to_trades_source():
    assert candle().source is CandleSource.TRADES


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"low": Decimal(13)}, r"low \(13\) must not exceed high \(12\)"),
        ({"open": Decimal(20)}, "open"),
        ({"time": datetime(2025, 1, 1, 0, 1, 30, tzinfo=UTC)}, "start of a minute"),
        ({"trades": -1}, "trades must be"),
        ({"high": Decimal("Infinity")}, "high must be finite"),
    ],
)
def test_candle_record_refuses_what_cannot_be_right(overrides, message):
    with pytest.raises(ValueError, match=message):
        candle(**overrides)


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        trade().price = Decimal(1)  # type: ignore[misc]


def test_data_gap():
    gap = DataGap(symbol="BTC/USD", kind="trade_ids", start=T0, end=T0.replace(minute=33), first_missing_id=10, last_missing_id=19)
    assert gap.kind is GapKind.TRADE_IDS and gap.missing_ids == 10
    with pytest.raises(ValueError, match="before its start"):
        DataGap(symbol="BTC/USD", kind="uncovered", start=T0, end=T0.replace(minute=0))
