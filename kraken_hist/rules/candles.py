"""Trades → 1-minute candles and candles → wider candles, in pure Python.

The twin of the rules in :mod:`rules.sql`; ``tests/test_rules_agree.py`` checks both against
an exact reference. Kraken's 1-minute rule (KRAKEN.md): trades bucketed by ``floor(time/60)``;
open/close = first/last trade by (time, id); high/low; volume = sum; count = number of trades;
vwap = Σ(p·v)/Σv rounded DOWN to the pair's price decimals. Sums keep every digit and the vwap
is cut, never rounded, first (``_EXACT``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import ROUND_DOWN, Context, Decimal, localcontext
from itertools import groupby

from kraken_hist.core.intervals import Interval
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.types import CandleRecord, CandleSource, HistoricalCandle, HistoricalTrade, TradeRecord

Trade = HistoricalTrade | TradeRecord

#: Wide enough that sums of products of possible values (``core.bounds``: 20 digits either side
#: of the point) are exact, and a quotient is cut, never rounded, before it is truncated: the
#: default 28 digits would round 0.1200001 - 1e-47 up to 0.1200001.
_EXACT = Context(prec=200, rounding=ROUND_DOWN)


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The sum of `values`, every digit kept (as PostgreSQL sums numerics)."""
    with localcontext(_EXACT):
        return sum(values, Decimal(0))


def kraken_vwap(trades: Sequence[Trade], price_decimals: int) -> Decimal:
    """Σ(p·v)/Σv truncated to `price_decimals` (0 when the minute had no volume), exactly."""
    with localcontext(_EXACT):
        volume = sum((t.volume for t in trades), Decimal(0))
        notional = sum((t.price * t.volume for t in trades), Decimal(0))
    return Decimal(0) if volume == 0 else vwap_from_sums(notional, volume, price_decimals)


def vwap_from_sums(notional: Decimal, volume: Decimal, price_decimals: int) -> Decimal:
    """`notional` / `volume` (positive) truncated to `price_decimals`, exactly: Kraken's vwap
    from a span's Σp·v and Σv (a minute's, or an information bar's)."""
    with localcontext(_EXACT):
        return (notional / volume).quantize(Decimal(1).scaleb(-price_decimals))


def vwap_at_decimals(vwap: Decimal, price_decimals: int) -> Decimal:
    """An interval's vwap (an exact quotient of stored sums, dozens of digits) as it is handed
    out: at the pair's price decimals, rounded down like Kraken's 1-minute vwap."""
    quantum = Decimal(1).scaleb(-price_decimals)
    exponent = vwap.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= -price_decimals:
        return vwap
    return vwap.quantize(quantum, rounding=ROUND_DOWN)


def candles_from_trades(
    trades: Iterable[Trade], *, price_decimals: int | None = None, registry: PairRegistry | None = None
) -> list[CandleRecord]:
    """1-minute candles (source TRADES) of `trades`, which may come in any order; vwap at
    `price_decimals`, or at each pair's decimals in `registry` (default: the built-in pairs)."""
    pairs = registry if registry is not None or price_decimals is not None else PairRegistry()
    ordered = sorted(trades, key=lambda t: (t.symbol, t.time, t.trade_id))
    out: list[CandleRecord] = []
    for (symbol, minute), group in groupby(
        ordered, key=lambda t: (t.symbol, t.time.replace(second=0, microsecond=0))
    ):
        minute_trades = list(group)
        decimals = price_decimals if price_decimals is not None else pairs.get(symbol).price_decimals  # type: ignore[union-attr]
        prices = [t.price for t in minute_trades]
        out.append(
            CandleRecord(
                symbol=symbol,
                time=minute,
                open=minute_trades[0].price,
                high=max(prices),
                low=min(prices),
                close=minute_trades[-1].price,
                volume=exact_sum(t.volume for t in minute_trades),
                vwap=kraken_vwap(minute_trades, decimals),
                trades=len(minute_trades),
                source=CandleSource.TRADES,
            )
        )
    return out


def resample(candles: Iterable[HistoricalCandle | CandleRecord], interval: Interval | int) -> list[HistoricalCandle]:
    """Aggregate candles into `interval` buckets: first open, max high, min low, last close,
    summed volume and trades, volume-weighted vwap (over candles that have one).

    From 1-minute candles this is exactly what the stored relations hold. Resampling already
    resampled candles is not, where a bucket mixed minutes with and without vwap: its vwap is
    then weighted here by its whole volume, while the relations keep the volume of just the
    minutes that had a vwap (``vwap_volume``, which HistoricalCandle does not carry)."""
    target = Interval.parse(interval)
    ordered = sorted(candles, key=lambda c: (c.symbol, c.time))
    out: list[HistoricalCandle] = []
    for (symbol, start), group in groupby(ordered, key=lambda c: (c.symbol, target.bucket_start(c.time))):
        items = list(group)
        weighted = [c for c in items if c.vwap is not None]
        weight = exact_sum(c.volume for c in weighted)
        with localcontext(_EXACT):
            notional = sum((c.vwap * c.volume for c in weighted), Decimal(0))  # type: ignore[operator]
        vwap = notional / weight if weight else None
        out.append(
            HistoricalCandle(
                symbol=symbol,
                interval=target.minutes,
                time=start,
                open=items[0].open,
                high=max(c.high for c in items),
                low=min(c.low for c in items),
                close=items[-1].close,
                volume=exact_sum(c.volume for c in items),
                vwap=vwap,
                trades=sum(c.trades for c in items),
            )
        )
    return out
