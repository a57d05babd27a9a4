"""A deterministic, realistic trade history per pair, for the fake exchanges and for tests.

The shapes that make real data hard are there on purpose: contiguous trade ids, bursts of
up to 17 trades sharing one timestamp (one taker order filling several makers), quiet
minutes, prices at the pair's decimals, volumes at 8 decimals. Times are whole microseconds
(what we store); the fake REST server adds a deterministic sub-microsecond part so the
nanosecond ``last`` cursor and the 7-decimal float times look like Kraken's.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal

from kraken_hist.testing.universe import default_universe
from kraken_hist.core.timeutils import EPOCH, check_aware, floor_minute, to_unix_ns
from kraken_hist.core.types import HistoricalTrade

MAX_BURST = 17  # the most real trades seen sharing one timestamp

#: Rough starting prices so generated data looks like the pair it names.
START_PRICES: dict[str, Decimal] = {
    "BTC/USD": Decimal("100000"),
    "BTC/USDT": Decimal("100000"),
    "BTC/EUR": Decimal("90000"),
    "ETH/USD": Decimal("3000"),
    "ETH/USDT": Decimal("3000"),
    "SOL/USD": Decimal("150"),
    "ETH/BTC": Decimal("0.03"),
    "DOGE/USD": Decimal("0.15"),
}


def generate_trades(
    symbol: str,
    start: datetime,
    end: datetime,
    *,
    seed: int = 1,
    trades_per_minute: float = 20.0,
    quiet_fraction: float = 0.3,
    first_trade_id: int = 1,
) -> list[HistoricalTrade]:
    """Trades of `symbol` in ``[start, end)``, oldest first, ids ``first_trade_id, +1, ...``.

    The same arguments always give the same trades. `trades_per_minute` is the average over
    all minutes; a fraction `quiet_fraction` of minutes has no trade at all.
    """
    pair = default_universe().find(symbol)
    if pair is None:
        raise ValueError(f"the fake exchange lists no pair {symbol!r}")
    lo, hi = check_aware(start, "start"), check_aware(end, "end")
    if hi <= lo:
        return []
    if not 0 <= quiet_fraction < 1:
        raise ValueError(f"quiet_fraction must be in [0, 1), got {quiet_fraction}")
    rng = random.Random(f"{pair.symbol}:{seed}")
    quantum = Decimal(1).scaleb(-pair.price_decimals)
    tick = int(START_PRICES.get(pair.symbol, Decimal(100)) / quantum)  # price in ticks
    step = max(1, tick // 20_000)  # ~0.005% per move
    per_active_minute = trades_per_minute / (1 - quiet_fraction)
    trades: list[HistoricalTrade] = []
    next_id = first_trade_id
    minute = floor_minute(lo)
    last_micros = -1
    while minute < hi:
        if rng.random() >= quiet_fraction:
            count = max(1, round(rng.expovariate(1 / per_active_minute))) if per_active_minute > 0 else 0
            offsets = sorted(rng.sample(range(60_000_000), k=min(count, 60)))
            remaining = count
            for i, offset in enumerate(offsets):
                if remaining <= 0:
                    break
                when = minute + timedelta(microseconds=offset)
                micros = _micros(when)
                if when < lo or when >= hi or micros <= last_micros:
                    continue
                events_left = len(offsets) - i
                burst = 1
                if rng.random() < 0.15 or remaining > 2 * events_left:
                    burst = min(remaining, rng.randint(2, MAX_BURST))
                side = "b" if rng.random() < 0.5 else "s"
                ord_type = "m" if burst > 1 or rng.random() < 0.6 else "l"
                tick = max(1, tick + rng.randint(-3, 3) * step)
                for _ in range(burst):
                    trades.append(
                        HistoricalTrade(
                            symbol=pair.symbol,
                            trade_id=next_id,
                            time=when,
                            price=Decimal(tick) * quantum,
                            volume=Decimal(rng.randint(1, 50_000_000)).scaleb(-8),
                            side=side,
                            ord_type=ord_type,
                        )
                    )
                    next_id += 1
                    # a taker order walks the book: each fill at the same or a worse price
                    tick = max(1, tick + (step if side == "b" else -step) * rng.randint(0, 1))
                remaining -= burst
                last_micros = micros
        minute += timedelta(minutes=1)
    return trades


def _micros(when: datetime) -> int:
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def trade_time_ns(time: datetime) -> int:
    """Nanoseconds of a trade time as the fake exchange reports it: the stored microsecond plus
    a deterministic sub-microsecond part (a function of the time, so trades sharing one
    timestamp share it too), like Kraken's ``last`` which carries more digits than the float."""
    ns = to_unix_ns(time)
    return ns + (ns // 1000 * 2_654_435_761) % 1000


def format_trade_time(ns: int) -> str:
    """Kraken's float trade time text from nanoseconds: at most 7 decimals, truncated (so that
    reading it back truncated to the microsecond gives the stored time), trailing zeros dropped."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    digits = f"{fraction // 100:07d}".rstrip("0") or "0"
    return f"{seconds}.{digits}"
