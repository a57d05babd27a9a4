"""Helpers shared by the trades-out tests: store generated trades (and their candles) as writers do."""

from __future__ import annotations

from datetime import timedelta

from kraken_hist.storage import store
from kraken_hist.core.pairs import PAIR_MAP


def store_trades(conn, trades, source="rest"):
    """COPY `trades` into ``trades`` and build their 1-minute candles from them (``store``)."""
    with conn.cursor().copy(
        "COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
    ) as copy:
        for t in trades:
            copy.write_row((t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, source))
    for symbol in {t.symbol for t in trades}:
        times = [t.time for t in trades if t.symbol == symbol]
        store.rebuild_candles(conn, symbol, min(times), max(times) + timedelta(microseconds=1),
            decimals=PAIR_MAP[symbol].price_decimals)
    conn.commit()


def by_time_and_id(trades):
    return sorted(trades, key=lambda t: (t.time, t.trade_id))
