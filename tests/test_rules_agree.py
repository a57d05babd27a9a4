"""One rule, every rendering: Kraken's 1-minute candle and the bucket rule, checked against a
reference computed here with exact Fractions over the same trades.

The 1-minute rule (KRAKEN.md): trades bucketed by minute; open/close = first/last by (time,
id); high/low; volume = Σv; trades = count; vwap = Σ(p·v)/Σv rounded DOWN to the pair's price
decimals. Wider buckets (epoch-aligned, weeks from Monday): first open, max high, min low, last
close, Σ volume, Σ trades, vwap = Σ(vwap·volume)/Σvolume of the minutes, handed out rounded
down to the pair's decimals.

Renderings: the Python twin (``rules.candles``), the SQL (``store.rebuild_candles`` over
COPYed trades), the writer (``DatabaseWriter``, the live stream's way in), the archive import
(``BulkCSVImporter`` over Time and Sales files: no ids, so order within a second follows the
file, which is written in id order), ``rules.candles.resample``, the refreshed interval
relations and the provider's on-the-fly intervals; gap detection's rebuild, which judges stored
candles by the SQL rule, finds none stale after any path that stores them.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import psycopg
import pytest

from kraken_hist.core.types import GapKind, HistoricalTrade, TradeRecord, TradeSource
from kraken_hist.gaps.detection import read_symbol_gaps
from kraken_hist.ingest.archive.importer import BulkCSVImporter
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.rules.candles import candles_from_trades, resample
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.storage.writer import DatabaseWriter

from .trade_data import store_trades

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MONDAY = datetime(1970, 1, 5, tzinfo=UTC)
T0 = datetime(2024, 6, 3, tzinfo=UTC)  # a Monday at 00:00: every bucket kind starts here
MINUTES = 200

#: symbol → (Kraken altname for archive file names, price decimals, a typical price)
PAIRS = {
    "BTC/USD": ("XBTUSD", 1, "60000"),
    "ETH/USD": ("ETHUSD", 2, "3000"),
    "ETH/BTC": ("ETHXBT", 5, "0.05"),
    "DOGE/USD": ("XDGUSD", 7, "0.12"),
}
#: Stored relations, as the refresh keeps them (minutes → relation).
RELATIONS = {5: "candles_5m", 15: "candles_15m", 30: "candles_30m", 60: "candles_1h", 240: "candles_4h",
             1440: "candles_1d", 10080: "candles_1w"}
#: Intervals asked of resample and of the provider: stored ones and ones built on the fly.
ASKED = (5, 7, 60, 90, 1440, 10080)
FIELDS = ("open", "high", "low", "close", "volume", "trades")


# ----- the trades


def trade(symbol: str, trade_id: int, minute: int, second: int, price: str | Decimal, volume: str | Decimal):
    return HistoricalTrade(symbol=symbol, trade_id=trade_id, time=T0 + timedelta(minutes=minute, seconds=second),
                           price=Decimal(price), volume=Decimal(volume))


def market_trades(seed: int = 11) -> list[HistoricalTrade]:
    """Several pairs over 200 minutes: quiet minutes, minutes of one trade, busy ones, bursts
    sharing a second (ordered by id), ids with holes, volumes of 8 and 12 decimals and whole."""
    rng = random.Random(seed)
    out = []
    for symbol, (_, decimals, price) in PAIRS.items():
        tick = Decimal(1).scaleb(-decimals)
        ticks = int(Decimal(price) / tick)
        trade_id = rng.randrange(1, 10**6)
        for minute in range(MINUTES):
            for second in sorted(rng.randrange(60) for _ in range(rng.choice((0, 0, 1, 1, 2, 5, 30)))):
                ticks = max(1, ticks + rng.randint(-3, 3))
                volume = rng.choice((Decimal(rng.randint(1, 10**9)).scaleb(-8), Decimal(rng.randint(1, 50)),
                                     Decimal(rng.randint(1, 10**12)).scaleb(-12)))
                out.append(trade(symbol, trade_id, minute, second, Decimal(ticks) * tick, volume))
                trade_id += rng.choice((1, 1, 1, 7))
    return out


def edge_trades() -> list[HistoricalTrade]:
    """Minutes made to tell roundings and orders apart."""
    return [
        trade("BTC/USD", 10, 0, 30, "100.0", "0.5"),  # one trade
        trade("BTC/USD", 11, 1, 0, "100.0", "1"), trade("BTC/USD", 12, 1, 1, "100.2", "1"),  # vwap exactly 100.1
        trade("BTC/USD", 13, 2, 0, "100.0", "1"), trade("BTC/USD", 14, 2, 1, "100.1", "5"),  # 100.083…: half-even 100.1
        # one second, ids not in the order of the prices: open 101.0 (id 20), close 99.0 (id 24)
        trade("BTC/USD", 20, 3, 7, "101.0", "2"), trade("BTC/USD", 21, 3, 7, "98.5", "1"),
        trade("BTC/USD", 22, 3, 7, "103.0", "1"), trade("BTC/USD", 24, 3, 7, "99.0", "3"),
        # 100.1 - 1e-13: rounded to 12 digits it is 100.1, truncated 100.0
        trade("BTC/USD", 30, 4, 0, "100.0", "0.00000001"), trade("BTC/USD", 31, 4, 0, "100.1", "9999.99999999"),
        # prices written with more places than the pair's, volumes whose sum needs all 20
        trade("ETH/USD", 40, 0, 5, "3000.10", "0.00000000000000000001"),
        trade("ETH/USD", 41, 0, 6, "3000.2500", "3.3"), trade("ETH/USD", 42, 0, 6, "2999.99", "7"),
        trade("DOGE/USD", 50, 9, 59, "0.1234567", "12345.678"), trade("DOGE/USD", 51, 9, 59, "0.1234568", "1"),
    ]


def extreme_trades() -> list[HistoricalTrade]:
    """DOGE minutes whose exact vwap is 0.1200001 - 1e-23 and 0.1200001 - 1e-47: truncated,
    0.1200000. Possible values (core.bounds: under 10**20, at most 20 places), but 10**8 and
    10**20 DOGE against a trade of 10**-8 and 10**-20 DOGE."""
    return [trade("DOGE/USD", 60, 0, 0, "0.1200000", "0.00000001"),
            trade("DOGE/USD", 61, 0, 1, "0.1200001", "99999999.99999999"),
            trade("DOGE/USD", 62, 1, 0, "0.1200000", "0.00000000000000000001"),
            trade("DOGE/USD", 63, 1, 1, "0.1200001", "99999999999999999999")]


DATASETS = {"market": market_trades, "edges": edge_trades, "extreme": extreme_trades}


# ----- the reference, exact


def floor_at(value: Fraction, decimals: int) -> Fraction:
    scale = 10**decimals
    return Fraction(math.floor(value * scale), scale)


def last_place(value: Decimal) -> Fraction:
    """One unit in the last place of `value` as written (a rounded quotient is within it)."""
    return Fraction(10) ** value.as_tuple().exponent


def bucket_of(when: datetime, minutes: int) -> datetime:
    origin = MONDAY if minutes % 10080 == 0 else EPOCH
    return origin + (when - origin) // timedelta(minutes=minutes) * timedelta(minutes=minutes)


def reference_minutes(trades) -> dict:
    """(symbol, 1, minute) → open, high, low, close, volume, trades, vwap (exact, truncated)."""
    groups = defaultdict(list)
    for t in sorted(trades, key=lambda t: (t.symbol, t.time, t.trade_id)):
        groups[(t.symbol, 1, bucket_of(t.time, 1))].append(t)
    out = {}
    for key, group in groups.items():
        prices = [Fraction(t.price) for t in group]
        volume = sum(Fraction(t.volume) for t in group)
        notional = sum(Fraction(t.price) * Fraction(t.volume) for t in group)
        out[key] = {"open": prices[0], "high": max(prices), "low": min(prices), "close": prices[-1],
                    "volume": volume, "trades": len(group), "vwap": floor_at(notional / volume, PAIRS[key[0]][1])}
    return out


def reference_buckets(trades, intervals) -> dict:
    """(symbol, minutes, start) → the bucket's columns, its vwap the exact quotient of the
    minutes' volume-weighted truncated vwaps (the handed-out one is that, truncated)."""
    minutes = reference_minutes(trades)
    out = {}
    for interval in intervals:
        groups = defaultdict(list)
        for (symbol, _, when), row in sorted(minutes.items()):
            groups[(symbol, interval, bucket_of(when, interval))].append(row)
        for key, rows in groups.items():
            volume = sum(r["volume"] for r in rows)
            out[key] = {"open": rows[0]["open"], "high": max(r["high"] for r in rows),
                        "low": min(r["low"] for r in rows), "close": rows[-1]["close"], "volume": volume,
                        "trades": sum(r["trades"] for r in rows),
                        "vwap": sum(r["vwap"] * r["volume"] for r in rows) / volume}
    return out


# ----- the renderings: each gives {(symbol, minutes, time): {column: value}} and how its vwap is given


def as_row(open_, high, low, close, volume, trades, vwap) -> dict:
    return {"open": open_, "high": high, "low": low, "close": close, "volume": volume, "trades": trades,
            "vwap": vwap}


def read_candles(db_url: str) -> dict:
    """The stored 1-minute candles, once gap detection (which rebuilds every minute with the
    SQL rule to compare) has found none of them stale."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT symbol, time, open, high, low, close, volume, trades, vwap FROM candles "
                            "WHERE source = 'trades'").fetchall()
        conn.rollback()
        for symbol in {r[0] for r in rows}:
            scan = read_symbol_gaps(conn, symbol, min_gap_minutes=0, verify_candles=True,
                                    price_decimals=PAIRS[symbol][1])
            conn.rollback()
            assert [g for g in scan.gaps if g.kind is GapKind.CANDLES] == [], symbol
    return {(r[0], 1, r[1]): as_row(*r[2:]) for r in rows}


def python_twin(trades, **_):
    shuffled = list(trades)
    random.Random(5).shuffle(shuffled)  # the twin orders by (time, id) itself
    return {(c.symbol, 1, c.time): as_row(c.open, c.high, c.low, c.close, c.volume, c.trades, c.vwap)
            for c in candles_from_trades(shuffled)}


def sql_rebuild(trades, db_url, **_):
    shuffled = list(trades)
    random.Random(6).shuffle(shuffled)  # the rule orders by (time, id), not by the heap
    with psycopg.connect(db_url) as conn:
        store_trades(conn, shuffled)
    return read_candles(db_url)


def writer(trades, settings, **_):
    w = DatabaseWriter(settings.database_url, settings=settings, trade_buffer_size=37, trade_flush_interval=0.05,
                       candle_flush_interval=0.05).start()
    try:
        for t in sorted(trades, key=lambda t: (t.time, t.trade_id)):  # as the stream delivers them
            w.write_trade(TradeRecord(symbol=t.symbol, trade_id=t.trade_id, time=t.time, price=t.price,
                                      volume=t.volume, source=TradeSource.WEBSOCKET))
        assert w.flush(timeout=30)
    finally:
        w.stop()
    return read_candles(settings.database_url)


def archive(trades, db_url, tmp_path: Path, **_):
    importer = BulkCSVImporter(db_url, chunk_size=50)
    for symbol, (altname, _, _) in PAIRS.items():
        mine = sorted((t for t in trades if t.symbol == symbol), key=lambda t: (t.time, t.trade_id))
        if mine:
            path = tmp_path / f"{altname}.csv"
            path.write_text("".join(f"{int((t.time - EPOCH).total_seconds())},{t.price:f},{t.volume:f}\n"
                                    for t in mine))
            importer.import_csv_file(path)
    return read_candles(db_url)


def resampled(trades, **_):
    minutes = candles_from_trades(trades)
    return {(c.symbol, c.interval, c.time): as_row(c.open, c.high, c.low, c.close, c.volume, c.trades, c.vwap)
            for interval in ASKED for c in resample(minutes, interval)}


def relations(trades, db_url, **_):
    with psycopg.connect(db_url) as conn:
        store_trades(conn, trades)
    refresh_aggregates(db_url)
    out = {}
    with psycopg.connect(db_url) as conn:
        for minutes, relation in RELATIONS.items():
            for r in conn.execute(f"SELECT symbol, time, open, high, low, close, volume, trades, vwap, "
                                  f"vwap_notional, vwap_volume FROM {relation}"):
                # the stored sums are exact: their quotient is the bucket's vwap
                out[(r[0], minutes, r[1])] = as_row(*r[2:8], Fraction(r[9]) / Fraction(r[10])) | {"stored": r[8]}
    return out


def provider(trades, db_url, **_):
    with psycopg.connect(db_url) as conn:
        store_trades(conn, trades)
    refresh_aggregates(db_url)  # an unstored interval is built from the largest stored one dividing it
    end = T0 + timedelta(days=8)
    out = {}
    with HistoricalDataProvider(db_url, clock=lambda: end) as reader:
        for symbol in sorted({t.symbol for t in trades}):
            for interval in ASKED:
                for c in reader.get_candles(symbol, interval, T0 - timedelta(days=7), end):
                    out[(c.symbol, c.interval, c.time)] = as_row(c.open, c.high, c.low, c.close, c.volume,
                                                                 c.trades, c.vwap)
    return out


#: rendering → (function, which reference, vwap as given: "truncated" at the pair's decimals,
#: "exact" sums (the stored vwap their quotient to its last place), or "quotient" rounded at
#: Decimal's 28 digits)
RENDERINGS = {
    "python twin": (python_twin, "minutes", "truncated"),
    "sql rebuild": (sql_rebuild, "minutes", "truncated"),
    "writer": (writer, "minutes", "truncated"),
    "archive import": (archive, "minutes", "truncated"),
    "resample": (resampled, "buckets", "quotient"),
    "refreshed relations": (relations, "buckets", "exact"),
    "provider": (provider, "buckets", "truncated"),
}

#: Renderings that need no database.
IN_MEMORY = {"python twin", "resample"}

def cases():
    for dataset in DATASETS:
        for rendering in RENDERINGS:
            yield pytest.param(dataset, rendering, id=f"{dataset}-{rendering.replace(' ', '_')}")


@pytest.mark.parametrize(("dataset", "rendering"), list(cases()))
def test_every_rendering_agrees_with_the_exact_rule(dataset, rendering, request, tmp_path):
    trades = DATASETS[dataset]()
    render, reference, vwap_kind = RENDERINGS[rendering]
    intervals = ASKED if rendering != "refreshed relations" else tuple(RELATIONS)
    expected = reference_minutes(trades) if reference == "minutes" else reference_buckets(trades, intervals)
    databases = {} if rendering in IN_MEMORY else {"db_url": request.getfixturevalue("db_url"),
                                                   "settings": request.getfixturevalue("settings")}
    actual = render(trades, tmp_path=tmp_path, **databases)

    assert sorted(actual) == sorted(expected)
    wrong = []
    for key, want in expected.items():
        got = actual[key]
        if any(Fraction(got[f]) != want[f] for f in FIELDS):
            wrong.append((key, "columns", {f: got[f] for f in FIELDS}, {f: want[f] for f in FIELDS}))
        decimals = PAIRS[key[0]][1]
        vwap = want["vwap"] if reference == "minutes" else floor_at(want["vwap"], decimals)
        if vwap_kind == "truncated" and Fraction(got["vwap"]) != vwap:
            wrong.append((key, "vwap", got["vwap"], vwap))
        if vwap_kind == "exact" and (got["vwap"] != want["vwap"]
                                     or abs(Fraction(got["stored"]) - want["vwap"]) > last_place(got["stored"])):
            wrong.append((key, "vwap", got["stored"], want["vwap"]))
        if vwap_kind == "quotient" and abs(Fraction(got["vwap"]) - want["vwap"]) > want["vwap"] / 10**27:
            wrong.append((key, "vwap", got["vwap"], want["vwap"]))
    assert not wrong, f"{len(wrong)} of {len(expected)} candles differ, first: {wrong[:3]}"
