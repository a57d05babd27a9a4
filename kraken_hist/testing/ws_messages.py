"""What the fake WebSocket server says, as Kraken's v2 says it: trade and ohlc items, RFC 3339
times, JSON numbers, the running candle of a bucket, and frames a client must skip. Pure."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from kraken_hist.core.timeutils import EPOCH
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade
from kraken_hist.testing.market import FakeMarket

OHLC_INTERVALS = (1, 5, 15, 30, 60, 240, 1440, 10080, 21600)
TRADE_SNAPSHOT_DEPTH = 50

#: What ``send_malformed`` sends by default: each must be logged and skipped by a client.
MALFORMED_FRAMES = (
    "this is not json",
    '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","pri',
    '{"channel":"mystery","type":"update","data":[]}',
    '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":"x",'
    '"qty":1.0,"ord_type":"limit","trade_id":1,"timestamp":"2025-01-01T00:00:00.000000Z"}]}',
    "[]",
)


def rfc3339(when: datetime, digits: int = 6) -> str:
    base = when.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{when.microsecond:06d}{'0' * (digits - 6)}Z"


def _num(value: Decimal) -> str:
    """A Decimal as JSON number text (never exponent notation, never through float)."""
    return format(value, "f")


@lru_cache(maxsize=64)
def _quoted(symbol: str) -> str:
    return json.dumps(symbol)


@lru_cache(maxsize=4096)
def _trade_time(when: datetime) -> str:
    return rfc3339(when)


def trade_item(trade: HistoricalTrade) -> str:
    """One v2 trade object as JSON text (hand-built so numbers stay exact decimals)."""
    side = "sell" if trade.side == "s" else "buy"
    ord_type = "market" if trade.ord_type == "m" else "limit"
    return (
        f'{{"symbol":{_quoted(trade.symbol)},"side":"{side}","price":{trade.price:f},'
        f'"qty":{trade.volume:f},"ord_type":"{ord_type}","trade_id":{trade.trade_id},'
        f'"timestamp":"{_trade_time(trade.time)}"}}'
    )


def candle_item(candle: HistoricalCandle) -> str:
    """One v2 ohlc object; ``timestamp`` (deprecated) is the interval END, as Kraken sends it."""
    end = candle.time + timedelta(minutes=candle.interval)
    return (
        f'{{"symbol":{json.dumps(candle.symbol)},"open":{_num(candle.open)},"high":{_num(candle.high)},'
        f'"low":{_num(candle.low)},"close":{_num(candle.close)},"trades":{candle.trades},'
        f'"volume":{_num(candle.volume)},"vwap":{_num(candle.vwap or Decimal(0))},'
        f'"interval_begin":"{rfc3339(candle.time, 9)}","interval":{candle.interval},'
        f'"timestamp":"{rfc3339(end)}"}}'
    )


def next_trades(
    market: FakeMarket,
    symbol: str,
    count: int,
    *,
    when: datetime | None = None,
    rng: random.Random | None = None,
) -> list[HistoricalTrade]:
    """`count` new trades continuing `symbol`'s id sequence and price, at `when` (default now)."""
    pair = market.universe.get(market.canonical(symbol))
    rng = rng or random.Random()
    first_id = market.next_trade_id(pair.symbol)
    stamp = when or market.now()
    recent = market.trades_since(pair.symbol, None, 1) if market.has(pair.symbol) else []
    quantum = Decimal(1).scaleb(-pair.price_decimals)
    price = recent[0][0].price if recent else Decimal(100)
    tick = max(1, int(price / quantum))
    step = max(1, tick // 20_000)
    out = []
    for offset in range(count):
        tick = max(1, tick + rng.randint(-2, 2) * step)
        out.append(
            HistoricalTrade(
                symbol=pair.symbol,
                trade_id=first_id + offset,
                time=stamp,
                price=Decimal(tick) * quantum,
                volume=Decimal(rng.randint(1, 50_000_000)).scaleb(-8),
                side=rng.choice("bs"),
                ord_type=rng.choice("lm"),
            )
        )
    return out


@dataclass
class RunningCandle:
    """The running candle of one bucket, updated trade by trade (vwap from exact sums)."""

    key: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal = Decimal(0)
    notional: Decimal = Decimal(0)
    count: int = 0

    def add(self, trade: HistoricalTrade) -> None:
        self.high = max(self.high, trade.price)
        self.low = min(self.low, trade.price)
        self.close = trade.price
        self.volume += trade.volume
        self.notional += trade.price * trade.volume
        self.count += 1

    def candle(self, symbol: str, interval: int, decimals: int) -> HistoricalCandle:
        vwap = Decimal(0)
        if self.volume:
            vwap = (self.notional / self.volume).quantize(Decimal(1).scaleb(-decimals), rounding="ROUND_DOWN")
        return HistoricalCandle(
            symbol=symbol, interval=interval, time=EPOCH + timedelta(minutes=self.key * interval),
            open=self.open, high=self.high, low=self.low, close=self.close,
            volume=self.volume, vwap=vwap, trades=self.count,
        )
